"""The one place that turns a ``cluster:`` block into somewhere to run work.

>>> from cmsmlkit.config import ClusterConfig
>>> with dask_client(ClusterConfig()) as client:  # one local worker: in-process
...     client is None
True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .config import ClusterConfig
from .errors import ConfigError

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["dask_client"]


@contextlib.contextmanager
def dask_client(config: ClusterConfig | None) -> Iterator[Client | None]:
    """Yield a dask ``Client`` for ``config``, or ``None`` to run in this process.

    ``local`` with one worker runs in-process (no scheduler to start, nothing
    to pickle); more workers start a ``LocalCluster`` of processes, closed on exit.
    ``address`` connects to a running scheduler and leaves it running.
    """
    config = config or ClusterConfig()
    if config.type == "local" and config.workers == 1:
        yield None
        return
    from distributed import Client, LocalCluster

    if config.type == "local":
        with (
            LocalCluster(
                n_workers=config.workers,
                threads_per_worker=config.threads_per_worker,
                processes=True,
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    if config.type == "address":
        if not config.address:
            raise ConfigError(
                "cluster.type is 'address' but cluster.address is not set (e.g. tcp://host:8786)."
            )
        with Client(config.address) as client:
            yield client
        return
    raise ConfigError(
        f"cluster.type '{config.type}' is not available in this version of cmsmlkit; "
        "use 'local' or 'address' (the address of a running dask scheduler)."
    )
