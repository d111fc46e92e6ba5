"""The Tuner: an Optuna study over the Trainer's configuration, in parallel and resumable.

Each trial trains one model with the ``train:`` section as its base and the
parameters sampled from ``tune.space`` on top (any dotted path of the
``train:`` section; ``depth`` and ``width`` build ``model.hidden``). Hopeless
trials are pruned on the validation AUC of each epoch (optuna-integration's
Lightning callback), by default with asynchronous successive halving
(``asha``: a median cut after the first epoch, then only the best quarter goes
on past epochs 2, 5, 17, ...), which on the demo study trains under half the
epochs of no pruning for the same best AUC (``benchmarks/tune.py``). Trials
run in this process one after another, or as dask tasks on the ``cluster:``
(one trial per worker at a time), all sharing one Optuna storage: SQLite in
the output directory by default, a journal file on a shared filesystem
(``journal:///eos/.../study.log``), or a database URL. A rerun resumes the
stored study; a trial left running by a dead worker (no heartbeat for three
``tune.heartbeat`` periods) is marked failed and retried with the same
parameters. With tracking enabled the study is an MLflow run and each trial a
nested run with its parameters and per-epoch curves. The best trial's
configuration is retrained (seeded: the same model) into the bundle
``<output>/best``, the study summarised in ``<output>/study.json`` and its
figures drawn in ``<output>/figures``.

>>> from cmsmlkit import Tuner
>>> tuner = Tuner(n_trials=5, output="tune", train={"inputs": ["demo.h5"]},
...               space={"learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
...                      "model.activation": ["relu", "gelu"], "depth": {"low": 1, "high": 3}})
>>> tuner.search_space()["model.activation"]
['relu', 'gelu']
>>> result = tuner.run()  # doctest: +SKIP
>>> result.bundle_path  # doctest: +SKIP
PosixPath('tune/best')
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ClusterConfig, ParamSpec, TrainConfig, TuneConfig, build_config, validate
from ..errors import CmsmlError, ConfigError, MissingDependencyError, did_you_mean

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure

    from ..tracking import RunHandle

__all__ = ["Tuner", "TuneResult"]

log = logging.getLogger(__name__)

#: Search-space names that are not train paths: ``model.hidden = [width] * depth``.
PSEUDO_PARAMS = ("depth", "width")
#: Train paths a study cannot vary: the data, where results go, how they are tracked.
FIXED_PATHS = ("inputs", "val_inputs", "test_inputs", "output", "tracking", "resume")
#: Heartbeats a running trial may miss before it counts as abandoned.
MISSED_HEARTBEATS = 3
#: The objective: validation AUC of the best epoch, reported every epoch for pruning.
MONITOR = "val_auc"


def _default_space(config: TuneConfig) -> dict[str, ParamSpec]:
    """The space searched when ``tune.space`` is not given."""
    return {
        "depth": ParamSpec(low=config.depth[0], high=config.depth[1]),
        "width": ParamSpec(low=config.width[0], high=config.width[1], log=True),
        "learning_rate": ParamSpec(
            low=config.learning_rate[0], high=config.learning_rate[1], log=True
        ),
        "model.dropout": ParamSpec(low=0.0, high=0.5),
        "model.activation": ParamSpec(choices=["relu", "gelu", "silu"]),
        "batch_size": ParamSpec(choices=[256, 512, 1024]),
        "weight_decay": ParamSpec(low=1e-6, high=1e-2, log=True),
    }


# --------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class _Param:
    """One searched or fixed parameter, its values checked against TrainConfig."""

    name: str
    kind: str  # "int", "float", "categorical" or "fixed"
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: tuple[Any, ...] = ()
    value: Any = None

    @property
    def encoded(self) -> bool:
        """Choices Optuna cannot store as they are (lists, mappings) go in as JSON text."""
        return any(not isinstance(c, (type(None), bool, int, float, str)) for c in self.choices)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "fixed":
            return self.value
        if self.kind == "int":
            return trial.suggest_int(
                self.name, self.low, self.high, step=self.step or 1, log=self.log
            )
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)
        if self.encoded:
            return self.decode(
                trial.suggest_categorical(self.name, [json.dumps(c) for c in self.choices])
            )
        return trial.suggest_categorical(self.name, list(self.choices))

    def decode(self, raw: Any) -> Any:
        """The value of a stored Optuna parameter (JSON text for list or mapping choices)."""
        return json.loads(raw) if self.kind == "categorical" and self.encoded else raw

    def describe(self) -> Any:
        """The YAML form of this parameter (as the summary and MLflow show it)."""
        if self.kind == "fixed":
            return {"value": self.value}
        if self.kind == "categorical":
            return list(self.choices)
        spec: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            spec["log"] = True
        if self.step is not None:
            spec["step"] = self.step
        return spec


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


def _get_path(config: Any, path: str) -> Any:
    for part in path.split("."):
        config = getattr(config, part)
    return config


def _path_exists(path: str) -> bool:
    try:
        _check_path(path)
    except ConfigError:
        return False
    return True


def _check_path(path: str) -> None:
    """Raise a ConfigError unless ``path`` names a field of TrainConfig that a study may vary."""
    from pydantic import BaseModel

    if path in PSEUDO_PARAMS:
        return
    current: Any = TrainConfig
    walked: list[str] = []
    for part in path.split("."):
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            raise ConfigError(
                f"tune.space: '{path}' goes into '{'.'.join(walked)}', which is a value, "
                "not a section; name the field itself."
            )
        fields = current.model_fields
        if part not in fields:
            where = f"train.{'.'.join(walked)}" if walked else "train"
            names = sorted(fields) + (list(PSEUDO_PARAMS) if not walked else [])
            raise ConfigError(
                f"tune.space: '{path}' is not a parameter of the training: {where} has no "
                f"field '{part}'.{did_you_mean(part, names)} Valid here: {', '.join(names)}."
            )
        walked.append(part)
        current = _annotation_model(fields[part].annotation)
    if path.split(".")[0] in FIXED_PATHS:
        raise ConfigError(
            f"tune.space: '{path}' cannot be searched (the study sets inputs, outputs and "
            f"tracking itself); remove it from tune.space and set it in train:."
        )


def _annotation_model(annotation: Any) -> Any:
    """The config class inside an annotation such as ``ModelConfig`` or ``ModelConfig | None``."""
    import typing

    from pydantic import BaseModel

    candidates = [annotation, *typing.get_args(annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return annotation


# --------------------------------------------------------------------------- the Tuner


@dataclass
class TuneResult:
    """The outcome of a study: the best bundle, its validation AUC and parameters.

    Attributes
    ----------
    bundle_path : Path
        ``<output>/best``: a copy of the best trial's bundle.
    best_value : float
        Its validation AUC.
    best_params : dict
        Its sampled parameters (search-space names to values).
    n_trials : int
        Trials in the study (all states, failed and retried ones included).
    n_pruned : int
        Trials stopped early by the pruner.
    summary_path : Path
        ``<output>/study.json``.
    trials : list of dict
        Per trial: number, state, value, params, epochs, seconds, worker.
    n_complete, n_failed : int
        Trials that ran to the end, and trials that failed (including those of dead workers).
    total_epochs : int
        Epochs trained over all trials.
    figures : list of Path
        The study's figures (history, parameter importances, parallel coordinates, curves).
    run_id : str or None
        The study's MLflow run, when tracking is enabled.

    Examples
    --------
    >>> TuneResult(Path("tune/best"), 0.91234, {"depth": 2}, 10, 4, Path("tune/study.json"))
    TuneResult(best val AUC = 0.9123, params={'depth': 2}, trials=10 (4 pruned), bundle='tune/best')
    """

    bundle_path: Path
    best_value: float
    best_params: dict[str, Any]
    n_trials: int
    n_pruned: int
    summary_path: Path
    trials: list[dict[str, Any]] = field(default_factory=list, repr=False)
    n_complete: int = 0
    n_failed: int = 0
    total_epochs: int = 0
    figures: list[Path] = field(default_factory=list, repr=False)
    run_id: str | None = None

    def __repr__(self) -> str:
        return (
            f"TuneResult(best val AUC = {self.best_value:.4f}, params={self.best_params}, "
            f"trials={self.n_trials} ({self.n_pruned} pruned), bundle={str(self.bundle_path)!r})"
        )


class Tuner:
    """Search the training configuration with Optuna, prune, parallelise, resume.

    Parameters
    ----------
    config : TuneConfig, dict, str or Path, optional
        The ``tune:`` configuration (a YAML path reads the whole file as one).
    train : TrainConfig or dict, optional
        The base training configuration each trial starts from.
    cluster : ClusterConfig, optional
        Where trials run: one worker (the default) runs them in this process one
        after another; more workers, a batch cluster or a scheduler address run
        one trial per worker at a time as dask tasks. Every worker must see the
        output directory and the storage (a shared filesystem on a cluster).
    **fields
        Any field of :class:`~cmsmlkit.config.TuneConfig` as a keyword; keywords
        override ``config``.

    Examples
    --------
    >>> tuner = Tuner(n_trials=30, space={"model.dropout": {"low": 0.0, "high": 0.3}})
    >>> tuner
    Tuner(n_trials=30, space=[model.dropout], sampler='tpe', pruner='asha', output='tune')
    >>> result = tuner.run()  # doctest: +SKIP
    """

    def __init__(
        self,
        config: TuneConfig | dict[str, Any] | str | Path | None = None,
        *,
        train: TrainConfig | dict[str, Any] | None = None,
        cluster: ClusterConfig | None = None,
        **fields: Any,
    ) -> None:
        self.config = build_config(TuneConfig, config, fields)
        self.train_config = build_config(TrainConfig, train, {})
        self.cluster = cluster or ClusterConfig()
        self._params = self._build_space()
        self._storage_url()  # a malformed storage fails here, not after the first trial
        if self.config.sampler == "cmaes":
            self._sampler(self.config.seed, parallel=False)  # is the cmaes package there?

    def __repr__(self) -> str:
        c = self.config
        searched = [p.name for p in self._params if p.kind != "fixed"]
        return (
            f"Tuner(n_trials={c.n_trials}, space=[{', '.join(searched)}], "
            f"sampler={c.sampler!r}, pruner={c.pruner!r}, output={c.output!r})"
        )

    @property
    def output(self) -> Path:
        """The study's directory: storage, trials, best bundle, summary, figures."""
        return Path(self.config.output)

    def search_space(self) -> dict[str, Any]:
        """The space searched, in its YAML form (``tune.space``, or the default).

        >>> Tuner(space={"depth": {"low": 1, "high": 3}, "model.dropout": 0.2}).search_space()
        {'depth': {'low': 1, 'high': 3}, 'model.dropout': {'value': 0.2}}
        """
        return {p.name: p.describe() for p in self._params}

    # ------------------------------------------------------------------ space

    def _build_space(self) -> list[_Param]:
        c = self.config
        if c.space is None:
            lo, hi = c.depth
            if not 1 <= lo <= hi:
                raise ConfigError(
                    f"tune.depth must be [min, max] with 1 <= min <= max, got {c.depth}."
                )
            for key in ("width", "learning_rate"):
                lo, hi = getattr(c, key)
                if not 0 < lo <= hi:
                    raise ConfigError(
                        f"tune.{key} must be [min, max] with 0 < min <= max, got [{lo}, {hi}]."
                    )
            space = {
                name: spec
                for name, spec in _default_space(c).items()
                if name in PSEUDO_PARAMS or _path_exists(name)
            }
        else:
            legacy = [
                key
                for key in ("depth", "width", "learning_rate")
                if getattr(c, key)
                != TuneConfig.model_fields[key].get_default(call_default_factory=True)
            ]
            if legacy:
                raise ConfigError(
                    f"tune.{legacy[0]} sets a range of the default search space, which is not "
                    f"used when tune.space is given; put it into tune.space instead, e.g. "
                    f"space: {{{legacy[0]}: {{low: ..., high: ...}}}}."
                )
            space = dict(c.space)
        if "model.hidden" in space and ({"depth", "width"} & set(space)):
            raise ConfigError(
                "tune.space names model.hidden and also depth/width, which build model.hidden; "
                "keep one of the two."
            )
        return [self._param(name, spec) for name, spec in space.items()]

    def _param(self, name: str, spec: ParamSpec) -> _Param:
        _check_path(name)
        fields = spec.model_fields_set
        if "value" in fields:
            return _Param(name, "fixed", value=self._checked(name, spec.value))
        if spec.choices is not None:
            choices = tuple(self._checked(name, choice) for choice in spec.choices)
            return _Param(name, "categorical", choices=choices)
        low = self._checked(name, spec.low)
        high = self._checked(name, spec.high)
        whole = all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high))
        if isinstance(low, bool) or not isinstance(low, (int, float)):
            raise ConfigError(
                f"tune.space.{name}: a range needs a numeric parameter, but {name} is "
                f"{type(low).__name__}; give choices instead."
            )
        if whole and spec.step is not None and not float(spec.step).is_integer():
            raise ConfigError(f"tune.space.{name}: {name} is a whole number; use a whole step.")
        step = (int(spec.step) if whole else float(spec.step)) if spec.step is not None else None
        return _Param(name, "int" if whole else "float", low, high, spec.log, step)

    def _checked(self, name: str, value: Any) -> Any:
        """``value`` as the training config reads it (e.g. '1e-3' -> 0.001); a ConfigError if invalid."""
        if name in PSEUDO_PARAMS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"tune.space.{name}: {name} must be a whole number >= 1, got {value!r}."
                )
            return value
        try:
            config = self._trial_config_from({name: value})
        except ConfigError as exc:
            raise ConfigError(
                f"tune.space.{name}: the value {value!r} is not valid: {exc}"
            ) from None
        return _get_path(config, name)

    def _trial_config_from(self, values: dict[str, Any], output: str | None = None) -> TrainConfig:
        """The base training config with ``values`` (search-space names) put in, validated."""
        data = self.train_config.to_dict(full=True)
        depth = values.get("depth")
        width = values.get("width")
        if depth is not None or width is not None:
            hidden = self.train_config.model.hidden
            depth = depth if depth is not None else len(hidden)
            width = width if width is not None else hidden[0]
            data["model"]["hidden"] = [width] * depth
        for name, value in values.items():
            if name not in PSEUDO_PARAMS:
                _set_path(data, name, value)
        data["tracking"]["enabled"] = False  # the Tuner tracks the trials itself
        if "resume" in data:
            data["resume"] = False  # a trial that died is retried from scratch
        if self.config.max_epochs:
            data["max_epochs"] = self.config.max_epochs
        if output is not None:
            data["output"] = output
        return validate(TrainConfig, data, prefix="train")

    # ------------------------------------------------------------------ storage and study

    def _storage_url(self) -> str:
        """The Optuna storage: ``tune.storage``, or SQLite ``<output>/study.db``."""
        url = self.config.storage
        if not url:
            return f"sqlite:///{(self.output / 'study.db').resolve()}"
        if url.startswith("journal://"):
            if not url[len("journal://") :]:
                raise ConfigError(
                    "tune.storage 'journal://' names no file; write journal:///shared/dir/study.log "
                    "(three slashes for an absolute path)."
                )
            return url
        if "://" not in url:
            raise ConfigError(
                f"tune.storage {mask_uri(url)!r} is not a URL. Use sqlite:///path/study.db (local "
                "disk), journal:///path/study.log (a shared filesystem such as EOS or AFS), or a "
                "database URL such as postgresql://user@host/db."
            )
        return url

    def _sampler(self, seed: int, parallel: bool) -> optuna.samplers.BaseSampler:
        import optuna

        kind = self.config.sampler
        with warnings.catch_warnings():
            # multivariate TPE is "experimental" in Optuna 3 and 4 (and the default in 5)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if kind == "random":
                return optuna.samplers.RandomSampler(seed=seed)
            if kind == "cmaes":
                try:
                    import cmaes  # noqa: F401
                except ImportError:
                    raise MissingDependencyError(
                        "tune.sampler: cmaes needs the cmaes package: pip install cmaes"
                    ) from None
                return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
            # constant_liar: parallel trials see each other's running parameters and spread out
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=parallel)

    def _pruner(self) -> optuna.pruners.BasePruner:
        """The pruner of ``tune.pruner``, with the ``tune.pruner_*`` settings it reads."""
        import optuna

        c = self.config
        if c.pruner == "none":
            return optuna.pruners.NopPruner()
        if c.pruner == "hyperband":
            max_epochs = c.max_epochs or self.train_config.max_epochs
            return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs)
        if c.pruner == "percentile":
            return optuna.pruners.PercentilePruner(
                c.pruner_percentile,
                n_startup_trials=c.pruner_startup_trials,
                n_warmup_steps=c.pruner_warmup_epochs,
            )
        median = optuna.pruners.MedianPruner(
            n_startup_trials=c.pruner_startup_trials, n_warmup_steps=c.pruner_warmup_epochs
        )
        if c.pruner == "asha":
            halving = optuna.pruners.SuccessiveHalvingPruner(
                min_resource=max(c.pruner_warmup_epochs, 1),
                reduction_factor=c.pruner_reduction_factor,
            )
            if c.pruner_warmup_epochs > 0:
                return halving
            return _halving_pruner_class()(median, halving)
        return median

    def _load_study(self, storage: Any, seed: int = 0, parallel: bool = False) -> optuna.Study:
        import optuna

        return optuna.create_study(
            study_name=self.config.study_name,
            storage=storage,
            direction="maximize",
            sampler=self._sampler(seed, parallel),
            pruner=self._pruner(),
            load_if_exists=True,
        )

    def _retry_abandoned(self, study: optuna.Study) -> list[int]:
        """Fail the running trials whose worker stopped beating, and enqueue them again.

        A trial counts as abandoned when neither its last heartbeat nor its start
        is more recent than ``MISSED_HEARTBEATS * tune.heartbeat`` seconds; it is
        marked FAIL and, up to ``tune.retries`` times, re-enqueued with the same
        parameters (Optuna's RetryFailedTrialCallback).
        """
        from optuna.trial import TrialState

        grace = MISSED_HEARTBEATS * self.config.heartbeat
        now = time.time()
        failed = []
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
            last = max(float(trial.user_attrs.get("heartbeat", 0.0)), started)
            if now - last <= grace:
                continue
            try:
                study.tell(trial.number, state=TrialState.FAIL)
            except (RuntimeError, ValueError):  # finished meanwhile, or failed by another process
                continue
            log.warning(
                "trial %d (worker %s) gave no sign of life for %.0f s: its worker died. "
                "Marked failed; retried with the same parameters.",
                trial.number,
                trial.user_attrs.get("worker", "unknown"),
                now - last,
            )
            _retry(study, trial, self.config.retries)
            failed.append(trial.number)
        return failed

    # ------------------------------------------------------------------ the study

    def run(self) -> TuneResult:
        """Run (or resume) the study; the best trial is retrained into the bundle ``<output>/best``.

        Trials start until ``n_trials`` of them are complete or pruned, the time
        budget is spent or the target is reached; ``<output>/study.json`` and the
        figures in ``<output>/figures`` summarise the study.

        Returns
        -------
        TuneResult
        """
        import optuna

        from .. import tracking
        from ..cluster import dask_client

        self.output.mkdir(parents=True, exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        url = self._storage_url()
        storage = _open_storage(url)
        try:
            study = self._load_study(storage, seed=self.config.seed)
            params = {"tune": self.config.to_dict(), "space": self.search_space()}
            with (
                tracking.start_run(
                    self.train_config.tracking,
                    directory=self.output.resolve().parent,
                    run_name=f"{self.output.name}-{self.config.study_name}",
                    params=params,
                ) as run,
                dask_client(self.cluster) as client,
            ):
                self._optimize(study, storage, url, client, run)
                return self._finish(study, url, run, client)
        finally:
            _close_storage(storage)

    def _optimize(
        self, study: optuna.Study, storage: Any, url: str, client: Any, run: RunHandle
    ) -> None:
        """Start trials until the budget, the time or the target says stop."""
        from optuna.trial import TrialState
        from tqdm.auto import tqdm

        c = self.config
        started = time.monotonic()
        parent = run if run.enabled else None
        next_seed = c.seed + len(study.trials)
        finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
        threads = c.threads_per_trial or (self.cluster.threads_per_worker if client else None)

        launched = 0

        def done() -> int:
            return len(study.get_trials(deepcopy=False, states=finished_states))

        def task() -> _Task:
            nonlocal next_seed, launched
            next_seed += 1
            launched += 1
            return _Task(url, next_seed - 1, client is not None, threads, parent)

        def stop(running: int = 0) -> str | None:
            # the time budget counts once this run has started a trial: a rerun always adds one
            return self._stop_reason(study, done(), running, started if launched else None)

        self._retry_abandoned(study)
        with tqdm(
            total=c.n_trials, initial=min(done(), c.n_trials), desc="trials", unit="trial"
        ) as bar:
            if client is None:
                while stop() is None:
                    self._run_trial(task(), storage)
                    self._retry_abandoned(study)
                    bar.update(min(done(), c.n_trials) - bar.n)
            else:
                self._optimize_on(
                    client, study, task, stop, lambda: bar.update(min(done(), c.n_trials) - bar.n)
                )
        log.info("study '%s' stopped: %s", c.study_name, stop())

    def _optimize_on(
        self,
        client: Any,
        study: optuna.Study,
        task: Callable[[], _Task],
        stop: Callable[[int], str | None],
        progress: Callable[[], Any],
    ) -> None:
        """One trial per worker at a time, as dask tasks; a new one whenever one finishes."""
        from distributed import wait

        running: dict[Any, str | None] = {}  # future -> the worker it was sent to
        while True:
            workers = list(client.scheduler_info().get("workers", {}))
            slots = max(len(workers), self.cluster.adapt_max or self.cluster.workers)
            while len(running) < slots and stop(len(running)) is None:
                idle = [w for w in workers if w not in running.values()]
                worker = idle[0] if idle else None
                # an idle worker is asked for (loosely: it may be gone); on a batch cluster
                # whose jobs have not started yet, the scheduler places the trial
                where = {"workers": [worker], "allow_other_workers": True} if worker else {}
                future = client.submit(self._run_trial, task(), pure=False, **where)
                running[future] = worker
            if not running:
                return
            finished, _ = wait(list(running), return_when="FIRST_COMPLETED")
            for future in finished:
                running.pop(future)
                try:
                    future.result()
                except BaseException:
                    for other in running:
                        other.cancel()
                    raise
            self._retry_abandoned(study)
            progress()

    def _stop_reason(
        self, study: optuna.Study, done: int, running: int, started: float | None
    ) -> str | None:
        """Why no further trial should start, or None (``started``: when the clock began)."""
        from optuna.trial import TrialState

        c = self.config
        if done + running >= c.n_trials:
            return f"{done} of {c.n_trials} trials done"
        if (
            c.timeout is not None
            and started is not None
            and time.monotonic() - started >= c.timeout
        ):
            return f"the time budget of {c.timeout:g} s is spent"
        if c.target is not None:
            values = [
                t.value
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None
            ]
            if values and max(values) >= c.target:
                return f"the target val AUC {c.target:g} is reached ({max(values):.4f})"
        return None

    # ------------------------------------------------------------------ one trial

    def _run_trial(self, task: _Task, storage: Any = None) -> dict[str, Any]:
        """Run one trial (in this process or on a dask worker) and return its outcome."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        own_storage = storage is None
        if own_storage:
            storage = _open_storage(task.storage)
        ran: list[optuna.trial.FrozenTrial] = []
        try:
            with _torch_threads(task.threads):
                study = self._load_study(storage, seed=task.seed, parallel=task.parallel)
                study.optimize(
                    functools.partial(self._objective, parent=task.parent),
                    n_trials=1,
                    callbacks=[lambda _, trial: ran.append(trial)],
                )
        finally:
            if own_storage:
                _close_storage(storage)
        trial = ran[0]
        return {"number": trial.number, "state": trial.state.name, "value": trial.value}

    def _objective(self, trial: optuna.Trial, parent: RunHandle | None) -> float:
        from optuna_integration import PyTorchLightningPruningCallback

        from .trainer import Trainer

        values = {p.name: p.suggest(trial) for p in self._params}
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("threads", _torch_num_threads())
        output = self.output.resolve() / "trials" / f"trial_{trial.number:04d}"
        cfg = self._trial_config_from(values, output=str(output))
        start = time.perf_counter()
        with _heartbeat(trial, self.config.heartbeat), _trial_run(parent, trial, values) as run:
            try:
                callbacks = [_epoch_logger(run), PyTorchLightningPruningCallback(trial, MONITOR)]
                result = Trainer(cfg).fit(callbacks=callbacks, write_bundle=False)
            finally:
                trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))
            metrics = result.metrics
            trial.set_user_attr("epochs", metrics.get("epochs_trained"))
            trial.set_user_attr("test_auc", _number(metrics.get("test_auc")))
            run.log_metrics(
                {
                    "best_val_auc": metrics.get("val_auc"),
                    "test_auc": metrics.get("test_auc"),
                    "epochs_trained": metrics.get("epochs_trained"),
                }
            )
        return float(metrics[MONITOR])

    # ------------------------------------------------------------------ the result

    def _finish(
        self, study: optuna.Study, url: str, run: RunHandle, client: Any = None
    ) -> TuneResult:
        from optuna.trial import TrialState

        all_trials = study.get_trials(deepcopy=False)
        complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
        if not complete:
            raise CmsmlError(
                f"no trial of study '{self.config.study_name}' completed ({len(all_trials)} "
                "trials: all pruned or failed); raise tune.n_trials, loosen the pruner "
                "(tune.pruner_startup_trials, tune.pruner_warmup_epochs, or tune.pruner: median) "
                "or check the logs."
            )
        best = study.best_trial
        best_dir = self.output / "best"
        summary_path = self.output / "study.json"
        bundle_metrics = self._best_bundle(best, best_dir, summary_path, client)

        trials = [
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": t.params,
                "epochs": t.user_attrs.get("epochs") or len(t.intermediate_values),
                "seconds": t.user_attrs.get("seconds"),
                "worker": t.user_attrs.get("worker"),
                "retry_of": _retried_from(t),
            }
            for t in all_trials
        ]
        counts = {state: sum(t.state == state for t in all_trials) for state in TrialState}
        figure_paths = self._draw_figures(study, run) if self.config.figures else []
        summary = {
            "study_name": self.config.study_name,
            "storage": mask_uri(url),
            "sampler": self.config.sampler,
            "pruner": self.config.pruner,
            "space": self.search_space(),
            "n_trials": len(all_trials),
            "n_complete": counts[TrialState.COMPLETE],
            "n_pruned": counts[TrialState.PRUNED],
            "n_failed": counts[TrialState.FAIL],
            "total_epochs": sum(int(t["epochs"] or 0) for t in trials),
            "best_trial": best.number,
            "best_value": best.value,
            "best_params": best.params,
            "best_bundle": str(best_dir),
            "best_bundle_trial": best.number,
            "best_bundle_val_auc": bundle_metrics.get("val_auc"),
            "best_bundle_test_auc": bundle_metrics.get("test_auc"),
            "mlflow_run_id": run.run_id,
            "figures": [str(p) for p in figure_paths],
            "trials": trials,
        }
        tmp = summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        os.replace(tmp, summary_path)
        run.log_metrics(
            {
                "best_val_auc": best.value,
                "best_trial": best.number,
                "n_complete": summary["n_complete"],
                "n_pruned": summary["n_pruned"],
                "n_failed": summary["n_failed"],
                "total_epochs": summary["total_epochs"],
            }
        )
        run.log_artifacts(best_dir, artifact_path="best")
        result = TuneResult(
            bundle_path=best_dir,
            best_value=float(best.value),
            best_params=dict(best.params),
            n_trials=len(all_trials),
            n_pruned=summary["n_pruned"],
            summary_path=summary_path,
            trials=trials,
            n_complete=summary["n_complete"],
            n_failed=summary["n_failed"],
            total_epochs=summary["total_epochs"],
            figures=figure_paths,
            run_id=run.run_id,
        )
        log.info("%r", result)
        return result

    def _best_bundle(
        self,
        best: optuna.trial.FrozenTrial,
        best_dir: Path,
        summary_path: Path,
        client: Any,
    ) -> dict[str, Any]:
        """Retrain the best trial's configuration into the bundle ``best_dir``; its metrics.

        Trials keep no weights (writing a bundle per trial would cost more than one
        retraining); the training is seeded and deterministic, so the bundle is the
        trial's model. A rerun that finds the same best trial keeps its bundle.
        """
        with contextlib.suppress(OSError, ValueError):
            previous = json.loads(summary_path.read_text())
            if (
                previous.get("best_bundle_trial") == best.number
                and (best_dir / "bundle.json").is_file()
            ):
                return {
                    "val_auc": previous.get("best_bundle_val_auc"),
                    "test_auc": previous.get("best_bundle_test_auc"),
                }
        values = {}
        for param in self._params:
            values[param.name] = (
                param.value if param.kind == "fixed" else param.decode(best.params[param.name])
            )
        config = self._trial_config_from(values, output=str(best_dir.resolve()))
        threads = self.config.threads_per_trial
        if client is not None:
            threads = threads or self.cluster.threads_per_worker
            metrics = client.submit(_train_bundle, config, threads, pure=False).result()
        else:
            metrics = _train_bundle(config, threads)
        if metrics["val_auc"] is not None and abs(metrics["val_auc"] - best.value) > 1e-3:
            log.warning(
                "the best trial %d reached val AUC %.4f, its retraining into %s %.4f "
                "(training is not exactly reproducible on this machine)",
                best.number,
                best.value,
                best_dir,
                metrics["val_auc"],
            )
        return metrics

    def _draw_figures(self, study: optuna.Study, run: RunHandle) -> list[Path]:
        """Optuna's figures of the study, saved in ``<output>/figures`` and logged to the run."""
        import matplotlib.pyplot as plt
        import optuna.visualization.matplotlib as ovm

        from .. import plots

        makers = {
            "history": ovm.plot_optimization_history,
            "importances": ovm.plot_param_importances,
            "parallel_coordinates": ovm.plot_parallel_coordinate,
            "curves": ovm.plot_intermediate_values,
        }
        figures: dict[str, Figure] = {}
        paths: list[Path] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
            for name, make in makers.items():
                try:
                    axes = make(study)
                except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                    log.info("no %s figure for this study: %s", name, exc)
                    continue
                first = axes.flat[0] if hasattr(axes, "flat") else axes
                figures[name] = first.figure
        try:
            for name, fig in figures.items():
                paths.append(plots.save_figure(fig, self.output / "figures", name)[0])
            run.log_figures(figures)
        finally:
            for fig in figures.values():
                plt.close(fig)
        return paths


# --------------------------------------------------------------------------- helpers


@functools.cache
def _halving_pruner_class() -> type[optuna.pruners.BasePruner]:
    """``tune.pruner: asha``'s pruner class (made on first use: optuna is imported lazily)."""
    import optuna

    class HalvingPruner(optuna.pruners.BasePruner):
        """A median cut after the first epoch, then successive halving from the second on.

        Optuna's successive halving (ASHA) first compares trials at step 1, after
        two epochs, and counts every trial that reached a rung (the random start of
        a TPE study included); the median of the finished trials after the first
        epoch stops the hopeless ones a full epoch earlier.
        """

        def __init__(
            self,
            first_epoch: optuna.pruners.BasePruner,
            halving: optuna.pruners.SuccessiveHalvingPruner,
        ) -> None:
            self.first_epoch = first_epoch
            self.halving = halving

        def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
            if trial.last_step == 0:
                return self.first_epoch.prune(study, trial)
            return self.halving.prune(study, trial)

    return HalvingPruner


@dataclass(frozen=True)
class _Task:
    """What a worker needs to run one trial (sent to dask workers, so plain data)."""

    storage: str
    seed: int
    parallel: bool
    threads: int | None
    parent: RunHandle | None


def _open_storage(url: str) -> Any:
    """An Optuna storage for ``url``; journal files and SQLite get their directory made."""
    import optuna

    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal://") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        # parallel trials write to one file: wait for the lock instead of failing at once
        engine_kwargs = {"connect_args": {"timeout": 60}}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except Exception as exc:  # a bad URL fails in many ways (driver missing, refused, denied)
        raise ConfigError(
            f"tune.storage: cannot open the Optuna storage {mask_uri(url)} "
            f"({type(exc).__name__}: {mask_uri(str(exc))}). Check the URL; a database needs its "
            "driver (e.g. pip install psycopg2-binary for postgresql://)."
        ) from None


def _retry_callback() -> Any:
    """Optuna's callback that enqueues a failed trial again (renamed in Optuna 4.9)."""
    import optuna

    return getattr(
        optuna.storages,
        "RetryHeartbeatStaleTrialCallback",
        optuna.storages.RetryFailedTrialCallback,
    )


def _retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, max_retry: int) -> None:
    """Enqueue a failed ``trial`` again with its parameters, at most ``max_retry`` times in a row."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" or "deprecated", by Optuna version
        _retry_callback()(max_retry=max_retry)(study, trial)


def _retried_from(trial: optuna.trial.FrozenTrial) -> int | None:
    """The number of the failed trial that ``trial`` retries, or None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _retry_callback().retried_trial_number(trial)


def _close_storage(storage: Any) -> None:
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()


def mask_uri(uri: str) -> str:
    from ..tracking import mask_uri as mask

    return mask(uri) or ""


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _torch_num_threads() -> int:
    import torch

    return torch.get_num_threads()


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` (when given) for the block, then restored."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _heartbeat(trial: optuna.Trial, interval: float) -> Iterator[None]:
    """Record ``heartbeat`` (a Unix time) on ``trial`` every ``interval`` s while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                trial.set_user_attr("heartbeat", time.time())
            except Exception as exc:  # a storage hiccup: the next beat tries again
                log.debug("heartbeat of trial %d not stored: %s", trial.number, exc)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"cmsmlkit-heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def _trial_run(
    parent: RunHandle | None, trial: optuna.Trial, values: dict[str, Any]
) -> Iterator[RunHandle]:
    """A nested MLflow run for one trial under the study's run, from any process.

    ``tracking.start_run(nested=True)`` nests under the *active* run of this
    process; a trial on a dask worker has none, so the child is created by id
    with the ``mlflow.parentRunId`` tag that MLflow's UI nests by.
    """
    from ..tracking import RunHandle

    if parent is None:
        yield RunHandle(None)
        return
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=parent.uri)
    experiment_id = client.get_run(parent.run_id).info.experiment_id
    created = client.create_run(
        experiment_id,
        run_name=f"trial_{trial.number:04d}",
        tags={"mlflow.parentRunId": parent.run_id, "optuna.trial": str(trial.number)},
    )
    handle = RunHandle(created.info.run_id, parent.uri, parent.experiment)
    trial.set_user_attr("mlflow_run_id", handle.run_id)
    handle.log_params({**values, "trial": trial.number})
    status = "FAILED"
    try:
        yield handle
        status = "FINISHED"
    except BaseException as exc:
        if type(exc).__name__ == "TrialPruned":
            status = "KILLED"
            client.set_tag(handle.run_id, "optuna.state", "PRUNED")
        raise
    finally:
        client.set_terminated(handle.run_id, status)


def _epoch_logger(run: RunHandle) -> Any:
    """A Lightning callback that logs each epoch's losses and AUC to the trial's run."""
    import lightning.pytorch as pl

    class _EpochLogger(pl.Callback):
        # validation metrics before the pruning callback can stop the trial; the epoch's
        # mean training loss only exists once the training epoch ends
        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if not trainer.sanity_checking:
                run.log_metrics(
                    _scalars(trainer, ("val_loss", "val_auc")), step=trainer.current_epoch
                )

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            run.log_metrics(_scalars(trainer, ("train_loss",)), step=trainer.current_epoch)

    return _EpochLogger()


def _scalars(trainer: Any, names: tuple[str, ...]) -> dict[str, float]:
    metrics = trainer.callback_metrics
    return {name: float(metrics[name]) for name in names if name in metrics}


def _train_bundle(config: TrainConfig, threads: int | None) -> dict[str, Any]:
    """Train ``config`` and write its bundle (the best trial's, retrained); its metrics."""
    from .trainer import Trainer

    with _torch_threads(threads):
        metrics = Trainer(config).fit().metrics
    return {
        "val_auc": _number(metrics.get("val_auc")),
        "test_auc": _number(metrics.get("test_auc")),
    }
