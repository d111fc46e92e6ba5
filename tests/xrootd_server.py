"""A real XRootD server for ``root://`` tests, on loopback only (see RECIPES.md).

The fixture :func:`xrootd_server` starts Debian's ``xrootd`` once per session:

- as the ``xrootd`` user (the server refuses to run as root);
- inside a network namespace of its own with only ``lo`` up, since the server
  has no bind-address option and would otherwise listen on every interface;
- serving a fresh directory: ``root://127.0.0.1:1094//store/x.root`` is
  ``<directory>/store/x.root`` (``oss.localroot``), so CMS-style ``/store``
  paths work through a redirector setting as well.

Clients must run inside the same namespace: :meth:`XRootDServer.run` runs a
command there (``ip netns exec``). Use it from a test module with
``from xrootd_server import xrootd_server  # noqa: F401`` or register it with
``pytest_plugins = ["xrootd_server"]`` in conftest.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import require_binaries

PORT = 1094
_START_TIMEOUT_S = 20


@dataclass
class XRootDServer:
    """A running server: where it serves from, its URL, and how to reach it."""

    directory: Path
    netns: str
    port: int = PORT

    @property
    def url(self) -> str:
        """``root://127.0.0.1:PORT/`` (a redirector: append ``/store/...`` paths)."""
        return f"root://127.0.0.1:{self.port}/"

    def url_for(self, relative: str) -> str:
        """The ``root://`` URL of ``<directory>/<relative>``."""
        return f"{self.url}/{relative.lstrip('/')}"

    def put(self, source: str | os.PathLike[str], relative: str) -> str:
        """Copy a local file into the served directory (readable by the server); its URL."""
        target = self.directory / relative.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        for parent in target.relative_to(self.directory).parents:
            (self.directory / parent).chmod(0o755)
        shutil.copyfile(source, target)
        target.chmod(0o644)
        return self.url_for(relative)

    def run(
        self, command: Sequence[str], timeout: float = 300, **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside the server's network namespace (where 127.0.0.1 reaches it)."""
        return subprocess.run(  # noqa: S603 - a test helper running the test's own commands
            ["ip", "netns", "exec", self.netns, *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,  # type: ignore[arg-type]
        )


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)  # noqa: S603,S607


def _wait_ready(server: XRootDServer, process: subprocess.Popen[bytes], log: Path) -> None:
    probe = (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(1)\n"
        f"sys.exit(s.connect_ex(('127.0.0.1', {server.port})))\n"
    )
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if server.run(["python3", "-c", probe], timeout=10).returncode == 0:
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise RuntimeError(f"xrootd did not start within {_START_TIMEOUT_S} s. Its log:\n{tail}")


@pytest.fixture(scope="session")
def xrootd_server() -> Iterator[XRootDServer]:
    """A real XRootD server on 127.0.0.1:1094 in its own network namespace, stopped afterwards."""
    require_binaries("xrootd", "ip", "runuser", apt="xrootd-server xrootd-client iproute2")
    if os.geteuid() != 0:
        pytest.skip("starting xrootd in a network namespace needs root (ip netns, runuser)")
    netns = f"cmsml-xrd-{os.getpid()}"
    base = Path(tempfile.mkdtemp(prefix="cmsml-xrootd-"))
    base.chmod(0o755)  # the xrootd user must reach the served directory
    served = base / "data"
    admin = base / "admin"
    for d in (served, admin):
        d.mkdir()
    shutil.chown(admin, user="xrootd", group="xrootd")
    served.chmod(0o755)
    config = base / "xrootd.cfg"
    config.write_text(
        f"xrd.port {PORT}\n"
        f"oss.localroot {served}\n"
        "all.export / nolock r/o\n"
        f"all.adminpath {admin}\n"
        f"all.pidpath {admin}\n"
    )
    config.chmod(0o644)
    log = admin / "xrootd.log"
    _ip("netns", "add", netns)
    process: subprocess.Popen[bytes] | None = None
    try:
        _ip("netns", "exec", netns, "ip", "link", "set", "lo", "up")
        process = subprocess.Popen(  # noqa: S603
            ["ip", "netns", "exec", netns, "runuser", "-u", "xrootd", "--"]
            + ["xrootd", "-c", str(config), "-l", str(log), "-n", "cmsml"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        server = XRootDServer(served, netns)
        _wait_ready(server, process, log)
        yield server
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        subprocess.run(["ip", "netns", "delete", netns], check=False, capture_output=True)  # noqa: S603,S607
        shutil.rmtree(base, ignore_errors=True)
