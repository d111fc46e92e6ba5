"""A real one-node SLURM for tests: the session fixture ``slurm_cluster``.

It starts munged, slurmctld and slurmd from the Debian packages (``slurm-wlm``,
``munge``; see RECIPES.md) inside a private network namespace with only
loopback, so nothing listens outside and parallel test sessions do not clash,
waits until ``sinfo`` shows the node idle, and at the end cancels the jobs,
stops the daemons and removes the namespace and its temporary directory.
It needs root (a network namespace) and is skipped, or fails when
``CMSML_REQUIRE_SERVERS`` is set, without the packages.

Everything that talks to SLURM must run *inside* the namespace: ``sbatch`` and
``sinfo``, and also the dask scheduler and the ``Client`` (the SLURM workers
connect back to the scheduler on 127.0.0.1 of the namespace). Python 3.11 has
no ``os.setns``, and entering with ``setns`` from the pytest process would move
only one thread and leave dask's event-loop threads behind, so the test body
runs as a script in a subprocess started with ``nsenter --net=...``::

    from slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

    @pytest.mark.slurm
    @pytest.mark.slow
    def test_on_slurm(slurm_cluster, tmp_path):  # noqa: F811
        script = tmp_path / "job.py"
        script.write_text(f'''
    from cmsmlkit.cluster import dask_client
    from cmsmlkit.config import ClusterConfig
    with dask_client(ClusterConfig(type="slurm", partition="{slurm_cluster.partition}",
                                   interface="lo", workers=1)) as client:
        print(client.submit(sum, [1, 2]).result())
    ''')
        done = slurm_cluster.python(script, cwd=tmp_path)
        assert done.stdout.strip().endswith("3")

``slurm_cluster.run(["sinfo"])`` runs any command there, ``python(script)``
runs a script with this test run's Python (``sys.executable``, so the SLURM
jobs it submits use the same environment), ``env`` holds the variables to pass
(``SLURM_CONF``) and ``partition`` the partition's name (the default one).
Both helpers raise with the command's output when it fails. Every module that
imports the fixture shares one cluster per test process. Run this file
(``python tests/slurm_cluster.py``) to start the cluster by hand for debugging.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = ["SlurmCluster", "slurm_cluster"]

PARTITION = "cmsml"
_APT = "slurm-wlm munge"


@dataclass
class SlurmCluster:
    """A running one-node SLURM in the network namespace ``netns``."""

    netns: str
    base: Path
    partition: str = PARTITION
    env: dict[str, str] = field(default_factory=dict)
    node: str = ""
    _daemons: list[subprocess.Popen] = field(default_factory=list, repr=False)

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    @property
    def prefix(self) -> list[str]:
        """The command prefix that runs a program inside the namespace."""
        return ["nsenter", f"--net={self.netns_path}"]

    def run(
        self,
        cmd: Sequence[str] | str,
        *,
        timeout: float = 120,
        check: bool = True,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (a list, or a string for ``bash -c``) inside the namespace.

        Returns the completed process with text ``stdout``/``stderr``; with
        ``check`` a non-zero exit raises ``AssertionError`` showing both.
        """
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        done = subprocess.run(
            self.prefix + argv,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{argv} exited with {done.returncode} in namespace {self.netns}\n"
                f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}\n"
                f"--- slurm logs\n{self.logs()}"
            )
        return done

    def python(
        self,
        script: str | Path,
        *args: str,
        timeout: float = 300,
        check: bool = True,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Python script file with this interpreter inside the namespace."""
        return self.run([sys.executable, str(script), *args], timeout=timeout, check=check, cwd=cwd)

    def logs(self, lines: int = 20) -> str:
        """The last ``lines`` of each daemon's log, for failure messages."""
        out = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.base / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"[{name}]\n" + "\n".join(tail))
        return "\n".join(out)

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 60) -> SlurmCluster:
        """Create the namespace, start munged, slurmctld and slurmd; wait for an idle node."""
        subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
        for cmd in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", "127.0.0.2/8", "dev", "lo"],
        ):
            # Slurm cannot resolve 127.0.0.1 with a single loopback address (RECIPES.md)
            subprocess.run(self.prefix + cmd, check=True, capture_output=True)
        munge = self.base / "munge"
        munge.mkdir()
        munge.chmod(0o755)  # munged refuses a socket directory other users cannot reach
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = munge / "munge.socket.2"
        self._spawn(
            "munged",
            "--foreground",
            f"--key-file={key}",
            f"--socket={socket_path}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={self.base / 'munged.log'}",
            f"--seed-file={munge / 'munged.seed'}",
        )
        self._wait(socket_path.exists, timeout, "munged to create its socket")
        conf = self._write_conf(socket_path)
        self.env = {"SLURM_CONF": str(conf)}
        self._spawn("slurmctld", "-D", "-i", "-f", str(conf))
        self._spawn("slurmd", "-D", "-N", self.node, "-f", str(conf))
        self._wait(self._idle, timeout, f"the SLURM node {self.node} to be idle")
        return self

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons, delete the namespace and the directory."""
        if self.env and self._daemons:
            with _suppress():
                self.run(["scancel", "--partition", self.partition], check=False, timeout=20)
                self._wait(lambda: not self._jobs(), 20, "the jobs to end", fail=False)
        for proc in reversed(self._daemons):  # slurmd, slurmctld, munged
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self._daemons.clear()
        # whatever a job left behind in the namespace is ours: end it by pid
        listed = subprocess.run(
            ["ip", "netns", "pids", self.netns], capture_output=True, text=True, check=False
        )
        for pid in listed.stdout.split():
            with _suppress():
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True, check=False)
        shutil.rmtree(self.base, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def _spawn(self, *argv: str) -> None:
        log = open(self.base / f"{argv[0]}.out", "wb")  # noqa: SIM115 (lives as long as the daemon)
        proc = subprocess.Popen(
            self.prefix + list(argv),
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self._daemons.append(proc)
        time.sleep(0.2)
        if proc.poll() is not None:
            out = (self.base / f"{argv[0]}.out").read_text(errors="replace")
            raise RuntimeError(
                f"{argv[0]} exited at once ({proc.returncode}):\n{out}\n{self.logs()}"
            )

    def _write_conf(self, socket_path: Path) -> Path:
        (self.base / "state").mkdir()
        (self.base / "spool").mkdir()
        with open("/proc/meminfo") as f:
            mem_mb = int(f.readline().split()[1]) // 1024
        conf = self.base / "slurm.conf"
        conf.write_text(
            f"""\
ClusterName=cmsml
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
StateSaveLocation={self.base / "state"}
SlurmdSpoolDir={self.base / "spool"}
SlurmctldPidFile={self.base / "slurmctld.pid"}
SlurmdPidFile={self.base / "slurmd.pid"}
SlurmctldLogFile={self.base / "slurmctld.log"}
SlurmdLogFile={self.base / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=2 RealMemory={mem_mb // 2} State=UNKNOWN
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )
        return conf

    def _idle(self) -> bool:
        for proc in self._daemons:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{proc.args[2]} exited ({proc.returncode}) while starting:\n{self.logs()}"
                )
        done = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False, timeout=20)
        return done.returncode == 0 and done.stdout.strip() == "idle"

    def _jobs(self) -> list[str]:
        done = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=20)
        return done.stdout.split() if done.returncode == 0 else []

    def _wait(self, ready, timeout: float, what: str, fail: bool = True) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.3)
        if fail:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")


class _suppress:
    """Ignore any error while tearing down (what is left is removed with the namespace)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def start_slurm() -> SlurmCluster:
    """Start a one-node SLURM in a fresh namespace (the caller stops it)."""
    base = Path(tempfile.mkdtemp(prefix="cmsml-slurm-"))
    base.chmod(0o755)  # jobs and munge clients of any user read the config and socket
    cluster = SlurmCluster(
        netns=f"cmsml-slurm-{os.getpid()}-{base.name[-6:]}",
        base=base,
        node=socket.gethostname().split(".")[0],
    )
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise


#: The one cluster of this test process and how many fixture definitions use it: a module
#: that imports the fixture gets its own session-scoped definition, and all must share it.
_SHARED: dict[str, Any] = {"cluster": None, "users": 0}


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running one-node SLURM (see the module docstring); stopped after the session."""
    from servers import require_binaries

    require_binaries("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "nsenter", "ip", apt=_APT)
    if os.geteuid() != 0:
        message = "the one-node SLURM needs root (it creates a network namespace)"
        if os.environ.get("CMSML_REQUIRE_SERVERS"):
            pytest.fail(message + " (CMSML_REQUIRE_SERVERS is set)")
        pytest.skip(message)
    if _SHARED["cluster"] is None:
        _SHARED["cluster"] = start_slurm()
    _SHARED["users"] += 1
    try:
        yield _SHARED["cluster"]
    finally:
        _SHARED["users"] -= 1
        if _SHARED["users"] == 0:
            _SHARED["cluster"].stop()
            _SHARED["cluster"] = None


if __name__ == "__main__":
    started = start_slurm()
    print(f"SLURM up in namespace {started.netns}; SLURM_CONF={started.env['SLURM_CONF']}")
    print(f"e.g.: {' '.join(started.prefix)} env SLURM_CONF={started.env['SLURM_CONF']} sinfo")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        started.stop()
