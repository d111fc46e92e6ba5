"""Experiment tracking with MLflow: one run per training, nested runs for tuning trials.

By default runs go to a local SQLite store, ``sqlite:///<directory>/mlflow.db``
(MLflow's old file store refuses to start in MLflow 3), with artifacts beside it
in ``<directory>/mlartifacts``; any tracking server works through
``tracking.uri``. Browse a local store with
``mlflow ui --backend-store-uri sqlite:///<directory>/mlflow.db``.

A leaf module: it knows MLflow and matplotlib figures, nothing of the stages.
MLflow is imported only when a run starts, so ``import cmsmlkit.tracking`` is
cheap; with ``tracking.enabled: false`` nothing of MLflow is imported at all.
A password in a URI (``https://user:secret@host``) is never shown: logs and
reprs mask it.

>>> from cmsmlkit.config import TrackingConfig
>>> from cmsmlkit.tracking import start_run
>>> with start_run(TrackingConfig(), directory="runs", run_name="mlp",
...                params={"model": {"hidden": [64, 64]}}) as run:  # doctest: +SKIP
...     run.log_metrics({"val_auc": 0.91}, step=3)
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import TrackingConfig
from .errors import ConfigError

if TYPE_CHECKING:
    from lightning.pytorch.loggers import MLFlowLogger
    from matplotlib.figure import Figure

__all__ = ["RunHandle", "default_uri", "mask_uri", "flatten_params", "start_run"]

log = logging.getLogger(__name__)

#: MLflow's limits (mlflow.utils.validation): key length, param value length, params per batch.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100

_PASSWORD = re.compile(r"(?P<head>//[^/@:]*:)(?P<password>[^/@]*)(?P<tail>@)")
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")


def default_uri(directory: str | os.PathLike[str]) -> str:
    """The default tracking URI: a SQLite file ``mlflow.db`` in ``directory`` (made absolute).

    >>> default_uri("/data/runs")
    'sqlite:////data/runs/mlflow.db'
    """
    return f"sqlite:///{Path(directory).absolute()}/mlflow.db"


def mask_uri(uri: str | None) -> str | None:
    """``uri`` with any password replaced by ``***``, fit for a log message.

    >>> mask_uri("https://alice:s3cret@mlflow.cern.ch/")
    'https://alice:***@mlflow.cern.ch/'
    """
    if uri is None:
        return None
    return _PASSWORD.sub(r"\g<head>***\g<tail>", uri)


def _key(name: str) -> str:
    """A key MLflow accepts: letters, digits, ``_ - . / space``; at most 250 characters."""
    return _BAD_KEY_CHARS.sub("_", name)[:MAX_KEY_LENGTH]


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings flattened to dotted keys, values as text cut to MLflow's length limit.

    >>> flatten_params({"model": {"hidden": [64, 64], "dropout": 0.1}, "seed": 42})
    {'model.hidden': '[64, 64]', 'model.dropout': '0.1', 'seed': '42'}
    """
    flat: dict[str, str] = {}
    for name, value in params.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{key}."))
        else:
            text = str(value)
            if len(text) > MAX_PARAM_VALUE_LENGTH:
                text = text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."
            flat[_key(key)] = text
    return flat


def _finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _quiet_mlflow() -> None:
    """MLflow and alembic (its database migrations) log at INFO on every store start."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


class RunHandle:
    """The run being tracked; every method is a no-op when tracking is disabled.

    Parameters
    ----------
    run_id
        The MLflow run id, or None for a disabled run.
    uri
        The tracking URI.
    experiment
        The experiment name.

    Examples
    --------
    >>> from cmsmlkit.tracking import RunHandle
    >>> run = RunHandle(None)  # what a disabled run yields
    >>> run.log_metrics({"val_auc": 0.9}, step=1)
    >>> run.lightning_logger()
    False
    """

    def __init__(
        self, run_id: str | None, uri: str | None = None, experiment: str | None = None
    ) -> None:
        self.run_id = run_id
        self.uri = uri
        self.experiment = experiment
        self._params: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        """Whether this handle logs anything."""
        return self.run_id is not None

    def _client(self) -> Any:
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters (nested mappings become dotted keys).

        MLflow never changes a logged parameter: a key already logged with the
        same value is skipped, one with a new value is skipped with a warning.
        """
        if not self.enabled or not params:
            return
        from mlflow.entities import Param

        new: list[Param] = []
        for key, value in flatten_params(params).items():
            if key in self._params:
                if self._params[key] != value:
                    log.warning(
                        "MLflow run %s: parameter %r is already %r; the new value %r is not logged.",
                        self.run_id,
                        key,
                        self._params[key],
                        value,
                    )
                continue
            self._params[key] = value
            new.append(Param(key, value))
        client = self._client()
        for start in range(0, len(new), MAX_PARAMS_PER_BATCH):
            client.log_batch(self.run_id, params=new[start : start + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log metrics at ``step``; entries that are not finite numbers (NaN, None, text) are skipped."""
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for name, value in metrics.items():
            number = _finite_number(value)
            if number is not None:
                batch.append(Metric(_key(name), number, now, int(step or 0)))
        if batch:
            self._client().log_batch(self.run_id, metrics=batch)

    def log_figures(self, figures: Mapping[str, Figure]) -> None:
        """Store each figure as the artifact ``figures/<name>.png``."""
        if not self.enabled:
            return
        client = self._client()
        for name, fig in figures.items():
            client.log_figure(self.run_id, fig, f"figures/{name}.png")

    def log_artifacts(
        self, dir_path: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        """Store the files of directory ``dir_path`` (e.g. the model bundle) under ``artifact_path``."""
        if not self.enabled:
            return
        self._client().log_artifacts(self.run_id, os.fspath(dir_path), artifact_path)

    def lightning_logger(self) -> MLFlowLogger | bool:
        """A Lightning ``MLFlowLogger`` writing to this run; ``False`` (Lightning's "no logger") when disabled."""
        if not self.enabled:
            return False
        from lightning.pytorch.loggers import MLFlowLogger

        return MLFlowLogger(
            experiment_name=self.experiment or "Default", tracking_uri=self.uri, run_id=self.run_id
        )

    def __repr__(self) -> str:
        if not self.enabled:
            return "RunHandle(disabled)"
        return f"RunHandle(run_id={self.run_id!r}, experiment={self.experiment!r}, uri={mask_uri(self.uri)!r})"


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go beside the database, not into the working directory."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri[len("sqlite:///") :])
    return (database.parent / "mlartifacts").absolute().as_uri()


@contextmanager
def start_run(
    config: TrackingConfig,
    *,
    directory: str | os.PathLike[str],
    run_name: str,
    params: Mapping[str, Any] | None = None,
    nested: bool = False,
) -> Iterator[RunHandle]:
    """Track a block of work as one MLflow run and yield its :class:`RunHandle`.

    The run ends FINISHED, or FAILED when the block raises (the exception goes
    on). With ``config.enabled`` false the handle does nothing.

    Parameters
    ----------
    config
        The tracking settings (URI, experiment name, enabled).
    directory
        Where the default SQLite store lives when ``config.uri`` is not set.
    run_name
        The run's name in the MLflow UI.
    params
        Parameters to log at the start (nested mappings become dotted keys).
    nested
        Start the run as a child of the active run (a tuning trial under its study).
    """
    if not config.enabled:
        yield RunHandle(None)
        return
    import mlflow

    _quiet_mlflow()
    uri = config.uri or default_uri(directory)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(config.experiment)
        if experiment is None:
            experiment_id = client.create_experiment(
                config.experiment, artifact_location=_artifact_location(uri)
            )
        else:
            experiment_id = experiment.experiment_id
    except Exception as exc:  # a bad URI fails in many ways (driver missing, refused, denied)
        raise ConfigError(
            f"tracking: cannot use the MLflow store {mask_uri(uri)} "
            f"({type(exc).__name__}: {mask_uri(str(exc))}). Check tracking.uri (a database URI "
            "needs its driver, e.g. pip install psycopg2-binary for postgresql://), or set "
            "tracking.enabled: false to train without MLflow."
        ) from None
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, nested=nested) as run:
        handle = RunHandle(run.info.run_id, uri, config.experiment)
        log.info("MLflow run %s (%s) in %s", run_name, handle.run_id, mask_uri(uri))
        if params:
            handle.log_params(params)
        yield handle
