"""The Trainer: HDF5 files -> a trained classifier in a model bundle.

:meth:`Trainer.fit` builds an :class:`~cmsmlkit.ml.dataset.HDF5DataModule`
(which checks every input and reports bad data before any training), splits
the events (stratified by a seeded fraction, or by file), standardises with
statistics of the training split only, and trains the network with PyTorch
Lightning: the configured optimiser and learning-rate schedule, gradient
clipping, early stopping and checkpointing on a validation metric, a target
that ends training once reached, CPU by default and a GPU (with mixed
precision) when there is one. An interrupted training resumes from its last
checkpoint (``<output>.checkpoints``) when run again with the same
configuration. The best epoch's weights are evaluated on the test split (and
on training events, for the overtraining check), the figures are drawn, and
the bundle is written; with tracking enabled the run, its per-epoch metrics,
figures and bundle go to MLflow.

>>> from cmsmlkit import Trainer
>>> trainer = Trainer(inputs=["data.h5"], features=["ht", "GoodJet.*"], max_epochs=10)
>>> result = trainer.fit()  # doctest: +SKIP
>>> result  # doctest: +SKIP
TrainResult(test AUC = 0.912, epochs = 10, bundle = 'model')
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch

from ..config import ClusterConfig, TrackingConfig, TrainConfig, build_config, config_hash
from ..errors import ConfigError, DataError, did_you_mean

if TYPE_CHECKING:
    from .dataset import HDF5DataModule

__all__ = ["Trainer", "TrainResult", "class_weights"]

log = logging.getLogger(__name__)

#: Lightning's loggers, quietened during fit (banners about GPUs, TPUs, model summaries).
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning")
#: Lightning warnings that say nothing useful for in-memory tensors.
_QUIET_WARNINGS = (
    r".*does not have many workers.*",
    r".*GPU available but not used.*",
    r".*smaller than the logging interval.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*predict_dataloader.*",
    r".*treespec, LeafSpec.*",
    # the block loader gives each worker its own blocks, so its length is exact
    r".*`IterableDataset` has `__len__` defined.*",
    # slurm-wlm installed (a SLURM login node): one process per training is what cmsmlkit runs
    r".*The `srun` command is available on your system but is not used.*",
)
#: The accelerator names Lightning knows ("gpu" and "cuda" are the same on NVIDIA machines).
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
#: Training events scored for the overtraining check (train vs test score distributions).
OVERTRAINING_EVENTS = 200_000


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes
    ----------
    bundle_path : Path or None
        The model bundle directory; None when ``fit(write_bundle=False)``.
    metrics : dict
        ``test_auc``, ``val_auc`` (best epoch), ``train_auc`` (training events
        scored with the best weights: far above ``test_auc`` means overtraining),
        ``test_accuracy``, ``best_epoch`` (counted from 1), ``epochs_trained``,
        ``stopped_by`` (``max_epochs``, ``patience`` or ``target``), ``n_train``,
        ``n_val``, ``n_test``, ``class_names``, ``seconds``, and for more than
        two classes ``test_auc_<class>`` (one-vs-rest) per class.
    history : dict of str to list of float
        ``train_loss``, ``val_loss``, ``val_auc`` and ``lr`` per epoch.
    run_id : str or None
        The MLflow run, when tracking is enabled.

    Examples
    --------
    >>> TrainResult(Path("model"), {"test_auc": 0.9123, "epochs_trained": 12}, {})
    TrainResult(test AUC = 0.912, epochs = 12, bundle = 'model')
    """

    bundle_path: Path | None
    metrics: dict[str, Any]
    history: dict[str, list[float]] = field(default_factory=dict)
    run_id: str | None = None

    def __repr__(self) -> str:
        auc = self.metrics.get("test_auc")
        auc_text = f"{auc:.3f}" if isinstance(auc, float) else "n/a"
        bundle = str(self.bundle_path) if self.bundle_path is not None else None
        return (
            f"TrainResult(test AUC = {auc_text}, epochs = {self.metrics.get('epochs_trained')}, "
            f"bundle = {bundle!r})"
        )


def class_weights(
    labels: np.ndarray,
    n_classes: int,
    setting: str | Sequence[float],
    weights: np.ndarray | None = None,
) -> list[float]:
    """The loss weight of each class.

    ``"balanced"`` gives class ``c`` the weight ``N / (C * N_c)`` (with event
    weights: sums of weights instead of counts), so every class counts as much
    in the loss; ``"none"`` gives 1 each; a list is taken as it is and must
    have one positive entry per class.

    >>> import numpy as np
    >>> class_weights(np.array([0, 0, 0, 1]), 2, "balanced")
    [0.6666666666666666, 2.0]
    """
    if isinstance(setting, str):
        if setting == "none":
            return [1.0] * n_classes
        if setting != "balanced":
            raise ConfigError(
                f"train.class_weights must be 'balanced', 'none' or a list, not {setting!r}."
            )
        w = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=np.float64)
        per_class = np.bincount(labels, weights=w, minlength=n_classes)
        if (per_class <= 0).any():
            empty = [int(c) for c in np.flatnonzero(per_class <= 0)]
            raise DataError(
                f"the training split has no events (or zero total weight) of class(es) {empty}; "
                "balanced class weights need events of every class."
            )
        return [float(v) for v in per_class.sum() / (n_classes * per_class)]
    values = [float(v) for v in setting]
    if len(values) != n_classes:
        raise ConfigError(
            f"train.class_weights has {len(values)} entries but the data have {n_classes} classes; "
            "give one weight per class, in the order of the class names, or use 'balanced'."
        )
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise ConfigError(f"train.class_weights must all be positive numbers, got {values}.")
    return values


class _History(pl.Callback):
    """Collects train_loss, val_loss, val_auc and the learning rate at the end of each epoch.

    Its state is saved in the checkpoints, so a resumed training has the whole history.
    """

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {
            "train_loss": [],
            "val_loss": [],
            "val_auc": [],
            "lr": [],
        }

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # validation has run by now, and the epoch means of train_loss are final
        metrics = trainer.callback_metrics
        for key, values in self.history.items():
            if key in metrics:
                values.append(float(metrics[key]))
        if trainer.optimizers:
            self.history["lr"].append(float(trainer.optimizers[0].param_groups[0]["lr"]))

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: list(v) for k, v in state_dict["history"].items()}


class _EpochSeed(pl.Callback):
    """Seeds each epoch from (seed, epoch): the DataModule's shuffle and torch's random numbers
    (dropout), so a training resumed after an interruption continues exactly as it would have."""

    def __init__(self, datamodule: HDF5DataModule, seed: int) -> None:
        self.datamodule = datamodule
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.datamodule.set_epoch(trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # at the first batch, after the loader's iterator has drawn its own seed (a resumed
        # training may create that iterator at another moment)
        if batch_idx == 0:
            torch.manual_seed((self.seed * 1_000_003 + trainer.current_epoch) % 2**63)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning without its banners and worker warnings; user-visible errors still pass."""
    saved = {}
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = logger.level
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for pattern in _QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _flat_params(config: TrainConfig, dm: HDF5DataModule) -> dict[str, Any]:
    """The run's parameters as flat scalars (MLflow stores strings of at most a few kB)."""

    def text(value: Any, limit: int = 500) -> str:
        s = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        return s if len(s) <= limit else s[: limit - 3] + "..."

    params: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        if key == "tracking":
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                params[f"{key}.{sub}"] = text(v) if isinstance(v, (list, tuple, dict)) else v
        else:
            params[key] = text(value) if isinstance(value, (list, tuple)) else value
    params.update(
        {
            "n_inputs": dm.layout.n_inputs,
            "n_classes": len(dm.class_names),
            "class_names": text(dm.class_names),
            "loader": dm.mode,
        }
    )
    return params


def _metric_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def _device(accelerator: str) -> tuple[bool, str]:
    """Whether training runs on a GPU, and the precision ``auto`` means there."""
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if not on_gpu:
        return False, "32-true"
    return True, "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


class Trainer:
    """Train a classifier on cmsmlkit HDF5 files and write a model bundle.

    Parameters
    ----------
    config : TrainConfig, dict, str or Path, optional
        The ``train:`` configuration (a YAML path reads the whole file as one).
    cluster : ClusterConfig, optional
        Where the work runs; training itself runs in this process (on a GPU
        when ``accelerator`` finds one).
    **fields
        Any field of :class:`~cmsmlkit.config.TrainConfig` as a keyword; keywords
        override ``config``.

    Examples
    --------
    >>> trainer = Trainer(inputs=["data.h5"], model={"hidden": [32, 32]}, max_epochs=5)
    >>> trainer
    Trainer(inputs=['data.h5'], features=['*'], model=mlp[32, 32], max_epochs=5, output='model')
    >>> result = trainer.fit()  # doctest: +SKIP
    >>> result.metrics["test_auc"]  # doctest: +SKIP
    0.93
    """

    def __init__(
        self,
        config: TrainConfig | dict[str, Any] | str | Path | None = None,
        *,
        cluster: ClusterConfig | None = None,
        **fields: Any,
    ) -> None:
        self.config = build_config(TrainConfig, config, fields)
        self.cluster = cluster or ClusterConfig()
        if not self.config.inputs:
            raise ConfigError(
                "train.inputs is empty: list the HDF5 files written by HDF5Writer (cmsml convert)."
            )
        if not self.config.features:
            raise ConfigError("train.features is empty: name the input features, or ['*'] for all.")
        if self.config.accelerator not in ACCELERATORS:
            raise ConfigError(
                f"train.accelerator: unknown accelerator {self.config.accelerator!r}."
                f"{did_you_mean(self.config.accelerator, ACCELERATORS)} "
                f"Choose one of {', '.join(ACCELERATORS)}."
            )
        if not isinstance(self.config.class_weights, str):
            class_weights(
                np.zeros(0, dtype=np.int64),
                len(self.config.class_weights),
                self.config.class_weights,
            )
        if self.config.model.type == "custom":
            from .models import import_model_class

            import_model_class(self.config.model.import_path or "")

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Trainer(inputs={c.inputs}, features={c.features}, model={c.model.type}{c.model.hidden}, "
            f"max_epochs={c.max_epochs}, output={c.output!r})"
        )

    @property
    def output(self) -> Path:
        """The bundle directory."""
        return Path(self.config.output)

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints live while training (``<output>.checkpoints``), removed when done."""
        return self.output.with_name(self.output.name + ".checkpoints")

    def datamodule(self) -> HDF5DataModule:
        """The :class:`~cmsmlkit.ml.dataset.HDF5DataModule` of this configuration (not set up)."""
        from .dataset import HDF5DataModule

        return HDF5DataModule.from_config(self.config)

    # ------------------------------------------------------------------ work

    def fit(self, callbacks: list[Any] | None = None, write_bundle: bool = True) -> TrainResult:
        """Train, evaluate on the test split, and write the bundle.

        Parameters
        ----------
        callbacks : list of lightning callbacks, optional
            Extra callbacks (e.g. Optuna's pruning callback); exceptions they raise
            (such as ``optuna.TrialPruned``) propagate unchanged.
        write_bundle : bool
            Write the model bundle to ``output``; False writes nothing (the Tuner's
            trials, quick experiments) and keeps no checkpoints.

        Returns
        -------
        TrainResult
        """
        from .. import tracking

        start = time.perf_counter()
        config = self.config
        pl.seed_everything(config.seed, workers=True, verbose=False)
        dm = self.datamodule()
        dm.setup()  # every bad input is reported here, before anything is trained or written
        n_classes = len(dm.class_names)
        train_w = dm._weights[dm._assign == 0] if config.event_weights else None
        weights_per_class = class_weights(
            dm.split_labels("train"), n_classes, config.class_weights, train_w
        )
        output = self.output
        with tracking.start_run(
            config.tracking,
            directory=output.resolve().parent,
            run_name=output.name,
            params=_flat_params(config, dm),
        ) as handle:
            module, history, best, stopped_by = self._train(
                dm, handle, callbacks or [], weights_per_class, persistent=write_bundle
            )
            test = self._evaluate(module, dm, "test")
            train = self._evaluate(module, dm, "train", limit=OVERTRAINING_EVENTS)
            metrics = self._metrics(dm, history, best, stopped_by, test, train)
            # figures only where they go somewhere: drawing them costs seconds per training
            wanted = write_bundle or handle.run_id is not None
            figures = self._figures(dm, history, test, train) if wanted else {}
            metrics["seconds"] = round(time.perf_counter() - start, 3)
            bundle_path = None
            if write_bundle:
                bundle_path = self._write_bundle(module, dm, metrics, history, figures)
            # the per-epoch val_auc is already in the run; its best value gets a name of its own
            handle.log_metrics(
                {
                    _metric_name("best_val_auc" if k == "val_auc" else k): float(v)
                    for k, v in metrics.items()
                    if isinstance(v, (int, float))
                }
            )
            handle.log_figures(figures)
            if bundle_path is not None:
                handle.log_artifacts(bundle_path, artifact_path="bundle")
            run_id = handle.run_id
        if write_bundle:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        result = TrainResult(
            bundle_path=bundle_path, metrics=metrics, history=history, run_id=run_id
        )
        log.info("%r", result)
        return result

    # ------------------------------------------------------------------ steps

    def _resume_key(self, dm: HDF5DataModule) -> str:
        """What must not change for a checkpoint to be resumed: the config (but how long to
        train and where to log) and the input files' contents."""
        neutral = self.config.model_copy(
            update={
                "max_epochs": 1,
                "patience": 1,
                "target": None,
                "tracking": TrackingConfig(),
                "num_workers": 0,
                "resume": True,
            }
        )
        digest = hashlib.sha256(config_hash(neutral).encode())
        for entry in dm.provenance["inputs"]:
            digest.update(entry["sha256"].encode())
        return digest.hexdigest()[:16]

    def _checkpoint_start(self, dm: HDF5DataModule, directory: Path) -> str | None:
        """The checkpoint to resume from, or None; a stale checkpoint directory is cleared."""
        state = directory / "resume.json"
        last = directory / "last.ckpt"
        key = self._resume_key(dm)
        if self.config.resume and last.is_file() and state.is_file():
            try:
                saved = json.loads(state.read_text()).get("key")
            except (json.JSONDecodeError, OSError):
                saved = None
            if saved == key:
                log.warning("resuming the interrupted training from %s", last)
                return str(last)
            log.warning(
                "%s holds checkpoints of another configuration or other inputs; starting afresh",
                directory,
            )
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        (directory / "resume.json").write_text(json.dumps({"key": key}) + "\n")
        return None

    def _train(
        self,
        dm: HDF5DataModule,
        handle: Any,
        callbacks: list[Any],
        weights_per_class: list[float],
        *,
        persistent: bool,
    ) -> tuple[Any, dict[str, list[float]], float | None, str]:
        from lightning.fabric.utilities.exceptions import MisconfigurationException
        from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

        from .module import ClassifierModule

        config = self.config
        module = ClassifierModule(
            model_config=config.model.to_dict(),
            n_inputs=dm.layout.n_inputs,
            n_classes=len(dm.class_names),
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            class_weights=weights_per_class,
            optimizer=config.optimizer,
            scheduler=config.scheduler,
            layout=dm.layout.to_dict(),
        )
        history = _History()
        on_gpu, auto_precision = _device(config.accelerator)
        precision = auto_precision if config.precision == "auto" else config.precision
        if precision == "32":
            precision = "32-true"
        mode = "max" if config.monitor == "val_auc" else "min"
        with contextlib.ExitStack() as stack:
            stack.enter_context(_quiet())
            if persistent and config.resume:
                directory = self.checkpoint_dir
                ckpt_path = self._checkpoint_start(dm, directory)
            else:
                directory = Path(
                    stack.enter_context(tempfile.TemporaryDirectory(prefix="cmsmlkit-"))
                )
                ckpt_path = None
            checkpoint = ModelCheckpoint(
                dirpath=directory,
                filename="best",
                monitor=config.monitor,
                mode=mode,
                save_top_k=1,
                save_on_train_epoch_end=True,
                enable_version_counter=False,
            )
            # every epoch, whether it improved or not: what an interrupted training resumes from
            # (saved at the end of the epoch, after _History has recorded it)
            last = ModelCheckpoint(
                dirpath=directory,
                filename="last",
                monitor=None,
                save_top_k=1,
                save_on_train_epoch_end=True,
                enable_version_counter=False,
            )
            early = EarlyStopping(
                monitor=config.monitor,
                mode=mode,
                patience=config.patience,
                stopping_threshold=config.target,
                check_on_train_epoch_end=False,
            )
            n_batches = max(1, math.ceil(dm.n_events["train"] / config.batch_size))
            try:
                trainer = pl.Trainer(
                    max_epochs=config.max_epochs,
                    accelerator=config.accelerator,
                    devices=1,
                    precision=precision,
                    gradient_clip_val=config.gradient_clip,
                    gradient_clip_algorithm="norm",
                    callbacks=[
                        history,
                        _EpochSeed(dm, config.seed),
                        *callbacks,
                        early,
                        checkpoint,
                        last,
                    ],
                    logger=handle.lightning_logger(),
                    default_root_dir=directory,
                    enable_progress_bar=sys.stderr.isatty(),
                    enable_model_summary=False,
                    deterministic="warn" if on_gpu else True,
                    num_sanity_val_steps=0,
                    log_every_n_steps=min(50, n_batches),
                )
            except (MisconfigurationException, ModuleNotFoundError, ValueError) as exc:
                raise ConfigError(
                    f"train.accelerator = {config.accelerator!r} cannot be used on this machine "
                    f"with precision {precision} ({exc}); use 'cpu', or 'auto' to take a GPU when "
                    "there is one (train.precision: auto picks what the device supports)."
                ) from None
            try:
                trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
            except BaseException as exc:
                # a pruned trial is finished for good; anything else may be resumed
                if type(exc).__name__ == "TrialPruned" and persistent:
                    shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
                raise
            best_score = checkpoint.best_model_score
            if checkpoint.best_model_path:
                state = torch.load(
                    checkpoint.best_model_path, map_location="cpu", weights_only=True
                )
                module.load_state_dict(state["state_dict"])
        module = module.cpu().eval()
        best = float(best_score) if best_score is not None else None
        reason = getattr(early, "stopping_reason", None)
        name = getattr(reason, "name", "") or ""
        stopped_by = (
            "target"
            if "THRESHOLD" in name and "DIVERGENCE" not in name
            else "patience"
            if early.stopped_epoch
            else "max_epochs"
        )
        return module, history.history, best, stopped_by

    @staticmethod
    def _evaluate(
        module: Any, dm: HDF5DataModule, split: str, limit: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Labels, probabilities [N, C] and weights of ``split`` (at most ``limit`` events)."""
        ys, ps, ws = [], [], []
        n = 0
        with torch.no_grad():
            for x, y, w in dm.split_loader(split):
                ps.append(module.probabilities(x).double().numpy())
                ys.append(y.numpy())
                ws.append(w.numpy())
                n += len(y)
                if limit is not None and n >= limit:
                    break
        return np.concatenate(ys), np.concatenate(ps), np.concatenate(ws)

    def _metrics(
        self,
        dm: HDF5DataModule,
        history: dict[str, list[float]],
        best: float | None,
        stopped_by: str,
        test: tuple[np.ndarray, np.ndarray, np.ndarray],
        train: tuple[np.ndarray, np.ndarray, np.ndarray],
    ) -> dict[str, Any]:
        from sklearn.metrics import roc_auc_score

        from .module import auc_score

        y_test, proba, w_test = test
        monitored = history.get(self.config.monitor, [])
        pick = np.argmax if self.config.monitor == "val_auc" else np.argmin
        best_epoch = int(pick(monitored)) + 1 if monitored else 0
        val_auc = history.get("val_auc", [])
        metrics: dict[str, Any] = {
            "test_auc": auc_score(y_test, proba, w_test),
            "val_auc": (
                best
                if best is not None and self.config.monitor == "val_auc"
                else (val_auc[best_epoch - 1] if val_auc and best_epoch else float("nan"))
            ),
            "train_auc": auc_score(train[0], train[1], train[2]),
            "test_accuracy": float(np.average(proba.argmax(axis=1) == y_test, weights=w_test)),
            "best_epoch": best_epoch,
            "epochs_trained": len(history.get("train_loss", [])),
            "stopped_by": stopped_by,
            "n_train": dm.n_events["train"],
            "n_val": dm.n_events["val"],
            "n_test": dm.n_events["test"],
            "class_names": list(dm.class_names),
        }
        if len(dm.class_names) > 2:
            for c, name in enumerate(dm.class_names):
                is_c = y_test == c
                metrics[f"test_auc_{name}"] = (
                    float(roc_auc_score(is_c, proba[:, c], sample_weight=w_test))
                    if 0 < is_c.sum() < len(is_c)
                    else float("nan")
                )
        return metrics

    def _figures(
        self,
        dm: HDF5DataModule,
        history: dict[str, list[float]],
        test: tuple[np.ndarray, np.ndarray, np.ndarray],
        train: tuple[np.ndarray, np.ndarray, np.ndarray],
    ) -> dict[str, Any]:
        from .. import plots

        y_test, proba, w_test = test
        weighted = self.config.event_weights
        weights = w_test if weighted else None
        names = dm.class_names
        return {
            "roc": plots.roc_figure(y_test, proba, names, weights=weights),
            "scores": plots.score_figure(y_test, proba, names, weights=weights),
            "overtraining": plots.overtraining_figure(
                train[0],
                train[1],
                y_test,
                proba,
                names,
                train_weights=train[2] if weighted else None,
                test_weights=weights,
            ),
            "confusion": plots.confusion_figure(y_test, proba, names),
            "loss": plots.loss_figure({k: v for k, v in history.items() if k != "lr"}),
        }

    def _write_bundle(
        self,
        module: Any,
        dm: HDF5DataModule,
        metrics: dict[str, Any],
        history: dict[str, list[float]],
        figures: dict[str, Any],
    ) -> Path:
        from .bundle import save_bundle
        from .models import n_outputs

        config = self.config
        n_classes = len(dm.class_names)
        info = {
            "model": {
                **config.model.to_dict(),
                "n_inputs": dm.layout.n_inputs,
                "n_classes": n_classes,
                "n_outputs": n_outputs(n_classes),
            },
            "layout": dm.layout.to_dict(),
            "features": [spec.to_dict() for spec in dm.features],
            "standardisation": dm.standardiser.to_dict(),
            "class_names": list(dm.class_names),
            "padding": dm.padding,
            "skim": dm.skim_config,
            "convert": dm.convert_config,
            "train": config.to_dict(),
            "provenance": dm.provenance,
            "metrics": metrics,
            "history": history,
        }
        return Path(save_bundle(self.output, model=module.model, info=info, figures=figures))
