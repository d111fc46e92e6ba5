"""The Tuner: an Optuna study over the Trainer's architecture and learning rate.

Each trial trains one model with the ``train:`` section as its base, the
sampled depth, width and learning rate on top; hopeless trials are pruned on
the validation AUC each epoch; the best trial's bundle is copied to
``<output>/best``.

>>> from cmsmlkit import Tuner
>>> tuner = Tuner(n_trials=5, output="tune", train={"inputs": ["demo.h5"]})  # doctest: +SKIP
>>> result = tuner.run()  # doctest: +SKIP
>>> result.bundle_path  # doctest: +SKIP
PosixPath('tune/best')
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ClusterConfig, TrainConfig, TuneConfig, build_config
from ..errors import CmsmlError, ConfigError

__all__ = ["Tuner", "TuneResult"]

log = logging.getLogger(__name__)


@dataclass
class TuneResult:
    """The outcome of a study: the best bundle, its validation AUC and parameters."""

    bundle_path: Path
    best_value: float
    best_params: dict[str, Any]
    n_trials: int
    n_pruned: int
    summary_path: Path
    trials: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        return (
            f"TuneResult(best val AUC = {self.best_value:.4f}, params={self.best_params}, "
            f"trials={self.n_trials} ({self.n_pruned} pruned), bundle={str(self.bundle_path)!r})"
        )


class Tuner:
    """Search the MLP's depth, width and learning rate with Optuna.

    Parameters
    ----------
    config
        A :class:`~cmsmlkit.config.TuneConfig`, a dict, or a YAML path.
    train
        The base training configuration each trial starts from.
    cluster
        Where trials run (in this version: in this process, one after another).
    **fields
        Any field of ``TuneConfig`` as a keyword.
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
        lo, hi = self.config.depth
        if lo > hi or lo < 1:
            raise ConfigError(
                f"tune.depth must be [min, max] with 1 <= min <= max, got {self.config.depth}."
            )
        for key in ("width", "learning_rate"):
            lo, hi = getattr(self.config, key)
            if not 0 < lo <= hi:
                raise ConfigError(
                    f"tune.{key} must be [min, max] with 0 < min <= max, got [{lo}, {hi}]."
                )

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Tuner(n_trials={c.n_trials}, depth={c.depth}, width={c.width}, "
            f"learning_rate={c.learning_rate}, output={c.output!r})"
        )

    @property
    def output(self) -> Path:
        return Path(self.config.output)

    def _storage(self) -> str:
        if self.config.storage:
            return self.config.storage
        return f"sqlite:///{(self.output / 'study.db').resolve()}"

    def _trial_config(self, trial: Any) -> TrainConfig:
        c = self.config
        depth = trial.suggest_int("depth", *c.depth)
        width = trial.suggest_int("width", *c.width, log=True)
        learning_rate = trial.suggest_float("learning_rate", *c.learning_rate, log=True)
        model = self.train_config.model.model_copy(update={"hidden": [width] * depth})
        return self.train_config.model_copy(
            update={
                "model": model,
                "learning_rate": learning_rate,
                "max_epochs": c.max_epochs or self.train_config.max_epochs,
                "output": str(self.output / "trials" / f"trial_{trial.number:04d}"),
                "tracking": self.train_config.tracking.model_copy(update={"enabled": False}),
            }
        )

    def run(self) -> TuneResult:
        """Run (or resume) the study and copy the best trial's bundle to ``<output>/best``."""
        import optuna
        from optuna_integration import PyTorchLightningPruningCallback

        from .trainer import Trainer

        self.output.mkdir(parents=True, exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            study_name=self.config.study_name,
            storage=self._storage(),
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=self.config.seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2),
            load_if_exists=True,
        )

        def objective(trial: optuna.Trial) -> float:
            cfg = self._trial_config(trial)
            pruning = PyTorchLightningPruningCallback(trial, monitor="val_auc")
            result = Trainer(cfg).fit(callbacks=[pruning])
            trial.set_user_attr("bundle", str(result.bundle_path))
            trial.set_user_attr("epochs", result.metrics.get("epochs_trained"))
            return float(result.metrics["val_auc"])

        callbacks = []
        if self.config.target is not None:
            target = self.config.target

            def stop_at_target(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                if trial.value is not None and trial.value >= target:
                    log.info(
                        "trial %d reached the target %.4f; stopping the study", trial.number, target
                    )
                    study.stop()

            callbacks.append(stop_at_target)

        finished = sum(t.state.is_finished() for t in study.trials)
        remaining = max(self.config.n_trials - finished, 0)
        if remaining:
            study.optimize(
                objective, n_trials=remaining, timeout=self.config.timeout, callbacks=callbacks
            )

        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            raise CmsmlError(
                f"no trial of study '{self.config.study_name}' completed "
                f"({len(study.trials)} trials: all pruned or failed); raise tune.n_trials or check the logs."
            )
        best = study.best_trial
        best_dir = self.output / "best"
        _copy_dir_atomically(Path(best.user_attrs["bundle"]), best_dir)

        trials = [
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": t.params,
                "epochs": t.user_attrs.get("epochs", len(t.intermediate_values)),
            }
            for t in study.trials
        ]
        summary = {
            "study_name": self.config.study_name,
            "storage": self._storage(),
            "best_trial": best.number,
            "best_value": best.value,
            "best_params": best.params,
            "trials": trials,
        }
        summary_path = self.output / "study.json"
        tmp = summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, summary_path)
        return TuneResult(
            bundle_path=best_dir,
            best_value=float(best.value),
            best_params=dict(best.params),
            n_trials=len(study.trials),
            n_pruned=sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
            summary_path=summary_path,
            trials=trials,
        )


def _copy_dir_atomically(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
