"""The one place that turns a ``cluster:`` block into somewhere to run work.

``local`` runs in this process (one worker) or on a dask ``LocalCluster``;
``slurm`` and ``htcondor`` submit one batch job per worker through
dask-jobqueue (``SLURMCluster``, ``HTCondorCluster`` with the LXPLUS
defaults); ``address`` connects to a scheduler that is already running.

>>> from cmsmlkit.config import ClusterConfig
>>> with dask_client(ClusterConfig()) as client:  # one local worker: in-process
...     client is None
True
>>> cluster = jobqueue_cluster(  # doctest: +SKIP
...     ClusterConfig(type="htcondor", workers=10, lcg_view="LCG_105/x86_64-el9-gcc13-opt")
... )
>>> print(cluster.job_script())  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ClusterConfig
from .errors import ConfigError, MissingDependencyError

if TYPE_CHECKING:
    from dask_jobqueue import JobQueueCluster
    from distributed import Client

__all__ = [
    "dask_client",
    "jobqueue_cluster",
    "grid_proxy",
    "proxy_path",
    "proxy_seconds_left",
    "PROXY_FIX",
    "WORKER_MALLOC",
]

log = logging.getLogger(__name__)

#: The command that makes a GRID proxy valid for 8 days (the longest VOMS gives).
PROXY_FIX = "voms-proxy-init -voms cms -rfc -valid 192:00"
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)

_LCG_VIEWS = "/cvmfs/sft.cern.ch/lcg/views"

#: glibc malloc settings for worker processes. distributed starts workers with
#: MALLOC_TRIM_THRESHOLD_=65536, which also freezes the mmap threshold at 128 kB:
#: every array of a chunk is then a fresh mmap, and a skim ran 1.7x slower on a
#: worker than in-process (benchmarks/skim.py). These keep arrays up to 32 MB on
#: the heap and still give memory back to the system above 64 MB free.
WORKER_MALLOC = {"MALLOC_TRIM_THRESHOLD_": "67108864", "MALLOC_MMAP_THRESHOLD_": "33554432"}


@contextlib.contextmanager
def dask_client(config: ClusterConfig | dict[str, Any] | None) -> Iterator[Client | None]:
    """Yield a dask ``Client`` for ``config``, or ``None`` to run in this process.

    ``local`` with one worker (and no ``adapt_max``) runs in-process: no
    scheduler to start, nothing to pickle. More workers start a
    ``LocalCluster`` of processes; ``slurm``/``htcondor`` submit
    ``workers`` batch jobs (or scale between ``adapt_min`` and ``adapt_max``
    as work waits). Everything started here is stopped on exit, the jobs
    included; ``address`` connects to a running scheduler and leaves it running
    (a Client this process already has to that scheduler is used as it is).

    Examples
    --------
    >>> with dask_client({"type": "local", "workers": 2}) as client:  # doctest: +SKIP
    ...     client.submit(sum, [1, 2]).result()
    3
    """
    config = _as_config(config)
    if config.type == "local" and config.workers == 1 and config.adapt_max is None:
        yield None
        return
    from distributed import Client

    if config.type == "address":
        current = _current_client(config.address)
        if current is not None:  # this process is already connected (a notebook's Client)
            yield current
            return
        with Client(config.address) as client:
            yield client
        return
    with contextlib.ExitStack() as stack:
        if config.type == "local":
            import dask
            from distributed import LocalCluster

            # set while workers may start (adapt, restarts): glibc reads them once, at start
            stack.enter_context(
                dask.config.set(
                    {
                        f"distributed.nanny.pre-spawn-environ.{k}": v
                        for k, v in WORKER_MALLOC.items()
                    }
                )
            )
            cluster = LocalCluster(
                n_workers=config.workers if config.adapt_max is None else (config.adapt_min or 0),
                threads_per_worker=config.threads_per_worker,
                processes=True,
                dashboard_address=None,
            )
        else:
            cluster = jobqueue_cluster(config)
        stack.enter_context(cluster)
        client = stack.enter_context(Client(cluster))
        if config.adapt_max is not None:
            if config.type == "local":
                cluster.adapt(minimum=config.adapt_min or 0, maximum=config.adapt_max)
            else:
                cluster.adapt(minimum_jobs=config.adapt_min or 0, maximum_jobs=config.adapt_max)
        elif config.type != "local":
            cluster.scale(jobs=config.workers)
            log.info(
                "submitted %d %s job(s) for dask workers; work starts as they run",
                config.workers,
                config.type,
            )
        yield client


def _current_client(address: str | None) -> Client | None:
    """The running Client of this process connected to ``address``, if there is one."""
    from distributed import Client

    try:
        client = Client.current(allow_global=True)
    except ValueError:  # no client in this process
        return None
    if client.status != "running" or getattr(client.scheduler, "address", None) != address:
        return None
    return client


def jobqueue_cluster(config: ClusterConfig | dict[str, Any]) -> JobQueueCluster:
    """The dask-jobqueue cluster for a ``slurm`` or ``htcondor`` block, with no jobs yet.

    Its scheduler runs in this process; ``cluster.job_script()`` shows the
    batch script (SLURM) or submit description (HTCondor) of one worker job,
    ``cluster.scale(jobs=n)`` submits jobs. :func:`dask_client` does both and
    closes the cluster afterwards; close it yourself when you use this alone.

    HTCondor gets the LXPLUS defaults: ``MY.JobFlavour = "longlunch"`` (quoted,
    as HTCondor needs), the GRID proxy shipped (``x509userproxy``, and
    ``X509_USER_PROXY`` set on the worker), scheduler and worker ports in
    ``ports`` (10000-10100), and the workers' Python from ``lcg_view`` (sourced
    before the worker starts) or ``container`` (``MY.SingularityImage``).

    Raises
    ------
    ConfigError
        For ``local``/``address``, or a setting the scheduler cannot honour.
    MissingDependencyError
        Without dask-jobqueue.
    """
    config = _as_config(config)
    if config.type not in ("slurm", "htcondor"):
        raise ConfigError(
            f"cluster.type is {config.type!r}: only slurm and htcondor run batch jobs."
        )
    try:
        import dask_jobqueue
    except ImportError as exc:  # pragma: no cover - a dependency of cmsmlkit
        raise MissingDependencyError(
            f"cluster.type: {config.type} needs dask-jobqueue: pip install dask-jobqueue"
        ) from exc
    cores = config.cores or config.threads_per_worker
    common: dict[str, Any] = {
        "cores": cores,
        "processes": cores // config.threads_per_worker,
        "memory": config.memory or f"{2 * cores}GB",
        "python": config.python or ("python3" if config.lcg_view or config.container else None),
        "interface": config.interface,
        "local_directory": config.local_directory,
        "log_directory": config.log_directory,
        "job_script_prologue": _environment(config),
    }
    common = {k: v for k, v in common.items() if v is not None}
    scheduler: dict[str, Any] = {"dashboard_address": None}  # as LocalCluster: no web server
    if config.type == "slurm":
        if config.container:
            raise ConfigError(
                "cluster.container is used on htcondor only (MY.SingularityImage); on SLURM "
                f"start the workers in it through cluster.python, e.g. "
                f"'apptainer exec {config.container} python3'."
            )
        directives = config.extra_directives
        if isinstance(directives, dict):
            directives = [f"--{k.lstrip('-')}={v}" for k, v in directives.items()]
        return dask_jobqueue.SLURMCluster(
            queue=config.partition,
            account=config.account,
            walltime=config.walltime or "01:00:00",
            job_extra_directives=list(directives),
            scheduler_options=scheduler,
            silence_logs="error",
            **common,
        )
    return dask_jobqueue.HTCondorCluster(
        disk=config.disk or f"{2 * cores}GB",
        job_extra_directives=_condor_directives(config),
        worker_extra_args=[f"--{kind}-port={_port_range(config)}" for kind in ("worker", "nanny")],
        scheduler_options={**scheduler, "port": _free_port(config)},
        silence_logs="error",
        **common,
    )


def grid_proxy(path: str | Path | None = None) -> Path:
    """The GRID proxy file, checked to exist and to be valid now.

    Looks at ``path``, else ``$X509_USER_PROXY``, else ``/tmp/x509up_u<uid>``.
    The time left is read with ``voms-proxy-info`` when it is installed, else
    from the certificate itself (with the ``cryptography`` package), else not
    checked. Never reads more of the file than its expiry.

    Raises
    ------
    ConfigError
        When the file is missing or the proxy has expired; the message gives
        the command that makes a new one (:data:`PROXY_FIX`).

    Examples
    --------
    >>> grid_proxy()  # doctest: +SKIP
    PosixPath('/tmp/x509up_u1000')
    """
    if path is None:
        where = "$X509_USER_PROXY" if os.environ.get("X509_USER_PROXY") else "the default"
        proxy = proxy_path()
    else:
        where, proxy = "the file you gave", Path(path).expanduser()
    if not proxy.is_file():
        raise ConfigError(
            f"no GRID proxy at {proxy} ({where}). Make one with `{PROXY_FIX}` "
            "(it is written to /tmp/x509up_u<uid>; set X509_USER_PROXY if you move it)."
        )
    left = proxy_seconds_left(proxy)
    if left is not None and left <= 0:
        raise ConfigError(
            f"the GRID proxy {proxy} has expired ({-left / 3600:.1f} h ago). "
            f"Renew it with `{PROXY_FIX}`."
        )
    return proxy


# --------------------------------------------------------------------------- helpers


def _as_config(config: ClusterConfig | dict[str, Any] | None) -> ClusterConfig:
    if isinstance(config, ClusterConfig):
        return config
    from .config import build_config

    return build_config(ClusterConfig, config, {})


def _environment(config: ClusterConfig) -> list[str]:
    """Shell lines run on the worker before it starts (LCG view, proxy, malloc)."""
    lines = ["export " + " ".join(f"{k}={v}" for k, v in WORKER_MALLOC.items())]
    if config.lcg_view:
        view = config.lcg_view.rstrip("/")
        if not view.startswith("/"):
            if view.count("/") != 1:
                raise ConfigError(
                    f"cluster.lcg_view {config.lcg_view!r} must read 'LCG_<version>/<platform>' "
                    "(e.g. 'LCG_105/x86_64-el9-gcc13-opt') or be a full /cvmfs path."
                )
            view = f"{_LCG_VIEWS}/{view}"
        lines.append(f"source {view if view.endswith('.sh') else view + '/setup.sh'}")
    if config.type == "htcondor" and config.ship_proxy:
        # HTCondor copies x509userproxy into the job's sandbox under its own name
        name = grid_proxy(config.proxy).name
        lines.append(f"export X509_USER_PROXY=$_CONDOR_SCRATCH_DIR/{name}")
    return lines


def _condor_directives(config: ClusterConfig) -> dict[str, Any]:
    directives: dict[str, Any] = {"MY.JobFlavour": f'"{config.job_flavour}"'}
    if config.walltime:
        directives["MY.MaxRuntime"] = _seconds(config.walltime)
    if config.ship_proxy:
        directives["x509userproxy"] = str(grid_proxy(config.proxy).resolve())
    if config.container:
        directives["MY.SingularityImage"] = f'"{config.container}"'
    if config.account:
        directives["accounting_group"] = config.account
    extra = config.extra_directives
    if isinstance(extra, list):
        pairs = {}
        for line in extra:
            key, eq, value = line.partition("=")
            if not eq or not key.strip():
                raise ConfigError(
                    f"cluster.extra_directives: {line!r} is not an HTCondor submit line "
                    "'key = value' (e.g. 'requirements = (OpSysAndVer =?= \"AlmaLinux9\")')."
                )
            pairs[key.strip()] = value.strip()
        extra = pairs
    directives.update(extra)
    return directives


def _port_range(config: ClusterConfig) -> str:
    low, _, high = config.ports.replace(":", "-").partition("-")
    return f"{int(low)}:{int(high)}"


def _free_port(config: ClusterConfig) -> int:
    """A port in ``config.ports`` that nothing listens on now, for the scheduler."""
    low, high = (int(p) for p in _port_range(config).split(":"))
    for port in range(low, high + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    raise ConfigError(
        f"no free port in cluster.ports {config.ports} for the dask scheduler on this machine; "
        "stop an old scheduler (e.g. a notebook kernel still holding a cluster) or widen the range."
    )


def _seconds(text: str) -> int:
    """SLURM's time forms '[D-]HH:MM:SS' or minutes -> seconds (HTCondor's MaxRuntime)."""
    days, _, clock = text.strip().rpartition("-")
    parts = clock.split(":")
    if (
        not all(p.isdigit() for p in parts)
        or len(parts) not in (1, 3)
        or not (days or "0").isdigit()
    ):
        raise ConfigError(
            f"cluster.walltime {text!r} must read 'HH:MM:SS', 'D-HH:MM:SS' or minutes."
        )
    h, m, s = (int(p) for p in parts) if len(parts) == 3 else (0, int(parts[0]), 0)
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def _default_proxy() -> str:
    return f"/tmp/x509up_u{os.getuid()}"


def proxy_path() -> Path:
    """Where the GRID proxy is: ``$X509_USER_PROXY``, else ``/tmp/x509up_u<uid>``."""
    env = os.environ.get("X509_USER_PROXY")
    return Path(env or _default_proxy()).expanduser()


def proxy_seconds_left(path: str | Path) -> float | None:
    """Seconds until the proxy at ``path`` expires (negative: expired), or None if unknown.

    Asks ``voms-proxy-info --timeleft`` when it is installed, else reads the
    certificate's notAfter (with ``cryptography``); None when neither can tell.
    The proxy's content is never logged.
    """
    path = Path(path)
    tool = shutil.which("voms-proxy-info")
    if tool is not None:
        try:
            done = subprocess.run(
                [tool, "--file", str(path), "--timeleft"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            return float(done.stdout.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError, OSError):
            pass  # fall back to reading the certificate
    try:
        from cryptography import x509
    except ImportError:
        return None
    try:
        block = _PEM_CERT.search(path.read_bytes())
        if block is None:
            return None
        cert = x509.load_pem_x509_certificate(block.group(0))
    except (OSError, ValueError):
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    return (cert.not_valid_after_utc - now).total_seconds()
