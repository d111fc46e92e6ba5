"""``cmsml doctor``: is this environment ready for cmsmlkit, and what to do if not.

Each check gives one :class:`Check`: a status (``OK``, ``WARN`` or ``MISSING``),
what was found, and the command that fixes it. ``MISSING`` is reserved for what
cmsmlkit cannot run without (its required packages); everything that only some
work needs (a GRID proxy for CMS data, dasgoclient for DAS names, a GPU, batch
schedulers) is ``WARN`` when absent. Nothing here prints a proxy's content: only
its path and the time it has left.

>>> from cmsmlkit import doctor
>>> checks = doctor.run_checks(network=False)  # doctest: +SKIP
>>> print(doctor.format_table(checks))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from .cluster import PROXY_FIX, proxy_path, proxy_seconds_left

__all__ = [
    "Check",
    "PACKAGES",
    "DEFAULT_REDIRECTOR",
    "check_packages",
    "check_proxy",
    "check_xrootd",
    "check_program",
    "check_gpu",
    "check_cluster",
    "run_checks",
    "format_table",
    "exit_status",
]

Status = Literal["OK", "WARN", "MISSING"]

#: Packages checked, in the order shown: (distribution name, required).
PACKAGES: tuple[tuple[str, bool], ...] = (
    ("cmsmlkit", True),
    ("torch", True),
    ("coffea", True),
    ("uproot", True),
    ("awkward", True),
    ("lightning", True),
    ("optuna", True),
    ("mlflow", True),
    ("h5py", True),
    ("dask", True),
    ("dask-jobqueue", False),
)

DEFAULT_REDIRECTOR = "root://cms-xrd-global.cern.ch/"

#: A proxy with less than this many seconds left is a warning (a long job would outlive it).
PROXY_WARN_S = 6 * 3600

_CMSENV = "source /cvmfs/cms.cern.ch/cmsset_default.sh (on LXPLUS or any machine with CVMFS)"


@dataclass(frozen=True)
class Check:
    """The outcome of one check.

    Attributes
    ----------
    name : str
        What was checked, e.g. ``"torch"`` or ``"GRID proxy"``.
    status : {"OK", "WARN", "MISSING"}
        ``MISSING`` only for what cmsmlkit needs to run at all.
    detail : str
        What was found (a version, a path and time left, an error).
    fix : str
        The command or step that fixes it; empty when nothing is to be done.
    """

    name: str
    status: Status
    detail: str
    fix: str = ""

    def __repr__(self) -> str:
        fix = f", fix={self.fix!r}" if self.fix else ""
        return f"Check({self.name!r}, {self.status}, {self.detail!r}{fix})"


# --------------------------------------------------------------------------- packages


def _requirements() -> dict[str, str]:
    """cmsmlkit's own version specifiers, e.g. ``{"torch": ">=2.1"}``, from its metadata."""
    try:
        requires = metadata.requires("cmsmlkit") or []
    except metadata.PackageNotFoundError:
        return {}
    found: dict[str, str] = {}
    for line in requires:
        if "extra ==" in line:
            continue
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*([^;]*)", line)
        if match:
            found[_normal(match.group(1))] = match.group(2).strip()
    return found


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _satisfies(version: str, specifier: str) -> bool | None:
    """Whether ``version`` meets ``specifier``; None when it cannot be told."""
    if not specifier:
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ImportError:
        return None
    try:
        return Version(version) in SpecifierSet(specifier)
    except ValueError:
        return None


def _pip_line(name: str, specifier: str) -> str:
    if name == "torch":  # the CPU wheel; a bare `torch` pulls several GB of CUDA
        return "pip install torch==2.13.0  (the CPU build; on a GPU node see pytorch.org)"
    if name == "cmsmlkit":
        return "pip install -e .  (in your cmsmlkit checkout)"
    return f"pip install '{name}{specifier}'"


def check_packages(packages: Iterable[tuple[str, bool]] = PACKAGES) -> list[Check]:
    """Installed version of each package against cmsmlkit's requirement.

    Parameters
    ----------
    packages
        ``(distribution name, required)`` pairs; a missing required package is
        ``MISSING``, a missing optional one ``WARN``.

    Examples
    --------
    >>> check_packages([("no-such-package-xyz", False)])[0].status
    'WARN'
    """
    wanted = _requirements()
    checks = []
    for name, required in packages:
        specifier = wanted.get(_normal(name), "")
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            status: Status = "MISSING" if required else "WARN"
            need = "required" if required else "optional: needed for HTCondor/SLURM clusters"
            checks.append(
                Check(name, status, f"not installed ({need})", _pip_line(name, specifier))
            )
            continue
        ok = _satisfies(version, specifier)
        if ok is False:
            checks.append(
                Check(
                    name,
                    "MISSING" if required else "WARN",
                    f"{version} installed, cmsmlkit needs {specifier}",
                    _pip_line(name, specifier),
                )
            )
        else:
            checks.append(Check(name, "OK", version))
    return checks


# --------------------------------------------------------------------------- GRID proxy


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {minutes:02d}m"


def check_proxy() -> Check:
    """The GRID proxy: present, and how long it is valid.

    Where it is: ``$X509_USER_PROXY``, else ``/tmp/x509up_u<uid>``. The time
    left comes from ``voms-proxy-info --timeleft`` when it is installed, else
    from the certificate's notAfter (with the ``cryptography`` package). Only
    reading CMS data over XRootD and DAS need a proxy, so its absence is a WARN.
    """
    path = proxy_path()
    where = "$X509_USER_PROXY" if os.environ.get("X509_USER_PROXY") else "default location"
    if not path.is_file():
        return Check(
            "GRID proxy",
            "WARN",
            f"none at {path} ({where}); needed for root:// CMS data and DAS",
            PROXY_FIX,
        )
    left = proxy_seconds_left(path)
    if left is None:
        return Check(
            "GRID proxy",
            "WARN",
            f"{path}: present, time left unknown (no voms-proxy-info, no cryptography)",
            "pip install cryptography  (or use voms-proxy-info --timeleft)",
        )
    if left <= 0:
        return Check("GRID proxy", "WARN", f"{path}: expired", PROXY_FIX)
    if left < PROXY_WARN_S:
        return Check(
            "GRID proxy",
            "WARN",
            f"{path}: {_duration(left)} left; a long job would outlive it",
            PROXY_FIX,
        )
    return Check("GRID proxy", "OK", f"{path}: {_duration(left)} left")


# --------------------------------------------------------------------------- XRootD

_NET_FIX = "check the network (outside CERN: a GRID proxy and open port 1094), or use local files"


def _host_of(redirector: str) -> str:
    """``root://host:port/`` -> ``root://host:port`` (what ``xrdfs`` takes)."""
    match = re.match(r"^(root|xroot)s?://([^/]+)", redirector)
    if not match:
        return ""
    return f"{redirector.split('://')[0]}://{match.group(2)}"


_PING = """
import sys
from XRootD import client
status, _ = client.FileSystem(sys.argv[1]).ping(timeout=int(sys.argv[2]))
print(status.message.strip())
sys.exit(0 if status.ok else 1)
"""


def check_xrootd(redirector: str = DEFAULT_REDIRECTOR, timeout: float = 5.0) -> Check:
    """Whether an XRootD redirector answers, within about ``timeout`` seconds.

    Uses the XRootD Python client's ``ping`` (``pip install xrootd``) when it is
    installed, else ``xrdfs HOST query config version``; either runs in a
    subprocess with XRootD's connection retries cut down and a hard time limit.
    Unreachable is a WARN: offline machines and laptops outside CERN can still
    work on local files.
    """
    name = "XRootD redirector"
    host = _host_of(redirector)
    if not host:
        return Check(name, "WARN", f"{redirector!r} is not a root:// URL", "")
    seconds = str(max(int(timeout), 1))
    if importlib.util.find_spec("XRootD") is not None:
        command, how = [sys.executable, "-c", _PING, host, seconds], "XRootD ping"
    elif shutil.which("xrdfs") is not None:
        command, how = ["xrdfs", host, "query", "config", "version"], "xrdfs query config"
    else:
        return Check(
            name,
            "WARN",
            "cannot check: neither the XRootD Python client nor xrdfs is installed",
            "pip install xrootd  (or apt-get install xrootd-client)",
        )
    env = {
        **os.environ,
        "XRD_REQUESTTIMEOUT": seconds,
        "XRD_CONNECTIONWINDOW": seconds,
        "XRD_CONNECTIONRETRY": "1",
        "XRD_STREAMTIMEOUT": seconds,
    }
    try:
        out = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout + 5, check=False, env=env
        )
    except subprocess.TimeoutExpired:
        return Check(name, "WARN", f"{host}: no answer within {timeout:g} s ({how})", _NET_FIX)
    if out.returncode == 0:
        return Check(name, "OK", f"{host} answers ({how})")
    error = (out.stderr or out.stdout).strip().splitlines()
    return Check(name, "WARN", f"{host}: {error[-1] if error else 'no answer'} ({how})", _NET_FIX)


# --------------------------------------------------------------------------- programs


def check_program(program: str, why: str, fix: str) -> Check:
    """Whether ``program`` is on ``PATH`` (a WARN with ``fix`` if not)."""
    path = shutil.which(program)
    if path is None:
        return Check(program, "WARN", f"not on PATH ({why})", fix)
    return Check(program, "OK", path)


def check_gpu() -> Check:
    """Whether torch sees a CUDA GPU; training runs on the CPU otherwise (a WARN)."""
    try:
        import torch
    except ImportError:
        return Check("GPU", "WARN", "torch is not installed", _pip_line("torch", ""))
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return Check("GPU", "OK", f"{len(names)} x {names[0]} (CUDA {torch.version.cuda})")
    build = "CPU-only torch build" if torch.version.cuda is None else "no CUDA device visible"
    return Check(
        "GPU",
        "WARN",
        f"none: training runs on the CPU ({build})",
        "for GPU training: a GPU node (HTCondor request_gpus = 1, SWAN GPU) and a CUDA torch",
    )


def check_cluster() -> list[Check]:
    """Batch-cluster tools: dask-jobqueue, condor_submit, sbatch (each optional)."""
    checks = []
    if importlib.util.find_spec("dask_jobqueue") is None:
        checks.append(
            Check(
                "dask_jobqueue",
                "WARN",
                "not importable (cluster: htcondor/slurm)",
                "pip install dask-jobqueue",
            )
        )
    else:
        checks.append(Check("dask_jobqueue", "OK", "importable"))
    checks.append(
        check_program(
            "condor_submit",
            "cluster: htcondor, cmsml submit --scheduler htcondor",
            "log in to LXPLUS (lxplus.cern.ch), where HTCondor is set up",
        )
    )
    checks.append(
        check_program(
            "sbatch",
            "cluster: slurm, cmsml submit --scheduler slurm",
            "run on a SLURM login node (ask your site), or use HTCondor/local",
        )
    )
    return checks


# --------------------------------------------------------------------------- all together


def run_checks(
    *, redirector: str = DEFAULT_REDIRECTOR, network: bool = True, timeout: float = 5.0
) -> list[Check]:
    """Every check, in the order of the table.

    Parameters
    ----------
    redirector
        The XRootD redirector to ping.
    network
        False skips the XRootD ping (offline machines, tests).
    timeout
        Seconds the ping may take.
    """
    checks = [Check("python", "OK", sys.version.split()[0])]
    checks += check_packages()
    checks.append(check_proxy())
    if network:
        checks.append(check_xrootd(redirector, timeout=timeout))
    checks.append(check_program("dasgoclient", "needed for DAS dataset names in source:", _CMSENV))
    checks.append(check_gpu())
    checks += check_cluster()
    return checks


def exit_status(checks: Iterable[Check]) -> int:
    """0 when nothing required is missing, else 1."""
    return 1 if any(c.status == "MISSING" for c in checks) else 0


def format_table(checks: Iterable[Check]) -> str:
    """A plain-text table: check, status, what was found, and the fix under each problem."""
    checks = list(checks)
    width = max(len(c.name) for c in checks) if checks else 5
    lines = [f"{'check':<{width}}  {'status':<7}  found", f"{'-' * width}  -------  -----"]
    for c in checks:
        lines.append(f"{c.name:<{width}}  {c.status:<7}  {c.detail}")
        if c.fix and c.status != "OK":
            lines.append(f"{'':<{width}}  {'':<7}  fix: {c.fix}")
    missing = sum(c.status == "MISSING" for c in checks)
    warned = sum(c.status == "WARN" for c in checks)
    if missing:
        lines.append(f"\n{missing} required item(s) missing: cmsmlkit cannot run until fixed.")
    else:
        lines.append(
            "\nEverything required is here"
            + (f"; {warned} warning(s) for optional features." if warned else ".")
        )
    return "\n".join(lines)
