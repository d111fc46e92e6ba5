"""A real ``mlflow server`` on loopback for tracking tests.

The server runs as a subprocess of the test session with a SQLite backend
store and a served artifact store in a temporary directory, listening on
127.0.0.1 only; the fixture waits for ``/health`` and stops the server at the
end of the session.

Use it by importing the fixture into a test module::

    from mlflow_server import mlflow_server  # noqa: F401
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

#: Seconds the server may take to answer /health (it migrates a fresh database first).
START_TIMEOUT = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """``SimpleNamespace(uri, directory, log)`` of a running ``mlflow server`` on 127.0.0.1."""
    directory: Path = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log_path = directory / "server.log"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{directory / 'mlflow.db'}",
        "--artifacts-destination",
        str(directory / "artifacts"),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _healthy(url):
            if process.poll() is not None:
                pytest.fail(
                    f"mlflow server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server did not answer {url}/health in {START_TIMEOUT} s:\n"
                    f"{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield SimpleNamespace(uri=url, directory=directory, log=log_path)
    finally:
        # the server's own process group (gunicorn/uvicorn workers included), nothing else
        try:
            os.killpg(process.pid, 15)
            process.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(timeout=10)
