"""The Trainer: HDF5 files -> a trained classifier in a model bundle.

:meth:`Trainer.fit` reads the features of the HDF5 inputs, splits the events
(stratified, seeded) into training, validation and test sets, standardises
the inputs with statistics of the training split only, trains the network with
PyTorch Lightning (early stopping and checkpointing on the validation AUC),
restores the best epoch's weights, evaluates them on the test split, draws the
figures and writes the bundle; with tracking enabled the run, its per-epoch
metrics, figures and bundle go to MLflow.

>>> from cmsmlkit import Trainer
>>> trainer = Trainer(inputs=["data.h5"], features=["ht", "GoodJet.*"], max_epochs=10)
>>> result = trainer.fit()  # doctest: +SKIP
>>> result  # doctest: +SKIP
TrainResult(test AUC = 0.912, epochs = 10, bundle = 'model')
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
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
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from ..config import ClusterConfig, TrainConfig, build_config
from ..errors import ConfigError, DataError, did_you_mean

if TYPE_CHECKING:
    from .dataset import InputData

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
)
#: The accelerator names Lightning knows ("gpu" and "cuda" are the same on NVIDIA machines).
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
#: Rows per forward pass when scoring the test split.
_EVAL_BATCH = 65536


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes
    ----------
    bundle_path : Path or None
        The model bundle directory; None when ``fit(write_bundle=False)``.
    metrics : dict
        ``test_auc``, ``val_auc`` (best epoch), ``test_accuracy``, ``best_epoch``
        (counted from 1), ``epochs_trained``, ``n_train``, ``n_val``, ``n_test``,
        ``class_names``, ``seconds``, and for more than two classes
        ``test_auc_<class>`` (one-vs-rest) per class.
    history : dict of str to list of float
        ``train_loss``, ``val_loss`` and ``val_auc`` per epoch.
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
    """Collects train_loss, val_loss and val_auc at the end of each training epoch."""

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "val_auc": []}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # validation has run by now, and the epoch means of train_loss are final
        metrics = trainer.callback_metrics
        for key, values in self.history.items():
            if key in metrics:
                values.append(float(metrics[key]))


class _Batches:
    """Tensors served one whole batch at a time (a batch of indices in, a batch out)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(index)
        return tuple(t[index] for t in self.tensors)


def _loader(
    tensors: Sequence[torch.Tensor], batch_size: int, *, shuffle: bool, seed: int
) -> DataLoader:
    """A DataLoader over in-memory tensors that slices batches instead of collating single rows."""
    data = _Batches(*tensors)
    if shuffle:
        generator = torch.Generator()
        generator.manual_seed(seed)
        sampler: Any = RandomSampler(data, generator=generator)  # type: ignore[arg-type]
    else:
        sampler = SequentialSampler(data)  # type: ignore[arg-type]
    batches = BatchSampler(sampler, batch_size=batch_size, drop_last=False)
    return DataLoader(data, sampler=batches, batch_size=None, num_workers=0)  # type: ignore[arg-type]


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


def _flat_params(config: TrainConfig, data: InputData) -> dict[str, Any]:
    """The run's parameters as flat scalars (MLflow stores strings of at most a few kB)."""
    c = config

    def text(value: Any, limit: int = 500) -> str:
        s = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        return s if len(s) <= limit else s[: limit - 3] + "..."

    return {
        "model.type": c.model.type,
        "model.hidden": text(c.model.hidden),
        "model.dropout": c.model.dropout,
        "model.activation": c.model.activation,
        "learning_rate": c.learning_rate,
        "weight_decay": c.weight_decay,
        "batch_size": c.batch_size,
        "max_epochs": c.max_epochs,
        "patience": c.patience,
        "val_fraction": c.val_fraction,
        "test_fraction": c.test_fraction,
        "class_weights": text(c.class_weights),
        "event_weights": c.event_weights,
        "seed": c.seed,
        "features": text(c.features),
        "n_inputs": data.n_inputs,
        "n_classes": len(data.class_names),
        "class_names": text(data.class_names),
        "inputs": text(c.inputs),
    }


def _metric_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


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
            trials, quick experiments).

        Returns
        -------
        TrainResult
        """
        from .. import tracking
        from .dataset import load_inputs

        start = time.perf_counter()
        config = self.config
        pl.seed_everything(config.seed, workers=True, verbose=False)
        data = load_inputs(config.inputs, config.features)
        output = self.output
        with tracking.start_run(
            config.tracking,
            directory=output.resolve().parent,
            run_name=output.name,
            params=_flat_params(config, data),
        ) as handle:
            module, splits, history, best = self._train(data, handle, callbacks or [])
            y_test, proba, w_test = self._evaluate(module, splits["test"])
            metrics = self._metrics(data, splits, history, best, y_test, proba, w_test)
            # figures only where they go somewhere: drawing them costs seconds per training
            wanted = write_bundle or handle.run_id is not None
            figures = self._figures(data, history, y_test, proba, w_test) if wanted else {}
            metrics["seconds"] = round(time.perf_counter() - start, 3)
            bundle_path = None
            if write_bundle:
                bundle_path = self._write_bundle(
                    module, data, splits["standardiser"], metrics, history, figures
                )
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
        result = TrainResult(
            bundle_path=bundle_path, metrics=metrics, history=history, run_id=run_id
        )
        log.info("%r", result)
        return result

    # ------------------------------------------------------------------ steps

    def _train(
        self, data: InputData, handle: Any, callbacks: list[Any]
    ) -> tuple[Any, dict[str, Any], dict[str, list[float]], float | None]:
        from lightning.fabric.utilities.exceptions import MisconfigurationException
        from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

        from .dataset import Standardiser, split_indices
        from .module import ClassifierModule

        config = self.config
        n_classes = len(data.class_names)
        idx = split_indices(data.labels, config.val_fraction, config.test_fraction, config.seed)
        train_idx = idx["train"]
        standardiser = Standardiser.fit(data.X[train_idx], data.valid[train_idx], data.features)
        rows = standardiser.transform(data.X, data.valid)
        event_w = (
            np.abs(data.weights) if config.event_weights else np.ones(data.n_events, np.float32)
        )
        if config.event_weights and not np.isfinite(event_w).all():
            raise DataError(
                "the /weight of some events is NaN or infinite; fix the weights or set event_weights: false."
            )
        weights_per_class = class_weights(
            data.labels[train_idx],
            n_classes,
            config.class_weights,
            event_w[train_idx] if config.event_weights else None,
        )

        split_tensors = {
            key: (
                torch.from_numpy(np.ascontiguousarray(rows[which])),
                torch.from_numpy(data.labels[which]),
                torch.from_numpy(np.ascontiguousarray(event_w[which], dtype=np.float32)),
            )
            for key, which in idx.items()
        }
        # the splits hold copies now; drop the full-size arrays (raw and standardised) so that
        # training keeps one copy of the data in memory, not three
        del rows
        data.X = np.empty((0, data.n_inputs), dtype=np.float32)  # a copy, not a view of the old
        data.valid = np.empty((0, data.n_inputs), dtype=bool)
        train_loader = _loader(
            split_tensors["train"], config.batch_size, shuffle=True, seed=config.seed
        )
        val_loader = _loader(
            split_tensors["val"], config.batch_size, shuffle=False, seed=config.seed
        )

        module = ClassifierModule(
            model_config=config.model.to_dict(),
            n_inputs=data.n_inputs,
            n_classes=n_classes,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            class_weights=weights_per_class,
        )
        history = _History()
        with tempfile.TemporaryDirectory(prefix="cmsmlkit-train-") as tmp, _quiet():
            checkpoint = ModelCheckpoint(
                dirpath=tmp, filename="best", monitor="val_auc", mode="max", save_top_k=1
            )
            early = EarlyStopping(monitor="val_auc", mode="max", patience=config.patience)
            n_batches = max(1, math.ceil(len(train_idx) / config.batch_size))
            try:
                trainer = pl.Trainer(
                    max_epochs=config.max_epochs,
                    accelerator=config.accelerator,
                    devices=1,
                    callbacks=[early, checkpoint, history, *callbacks],
                    logger=handle.lightning_logger(),
                    default_root_dir=tmp,
                    enable_progress_bar=sys.stderr.isatty(),
                    enable_model_summary=False,
                    deterministic=True,
                    num_sanity_val_steps=0,
                    log_every_n_steps=min(50, n_batches),
                )
            except (MisconfigurationException, ModuleNotFoundError, ValueError) as exc:
                raise ConfigError(
                    f"train.accelerator = {config.accelerator!r} cannot be used on this machine "
                    f"({exc}); use 'cpu', or 'auto' to take a GPU when there is one."
                ) from None
            trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
            best_score = checkpoint.best_model_score
            if checkpoint.best_model_path:
                state = torch.load(
                    checkpoint.best_model_path, map_location="cpu", weights_only=False
                )
                module.load_state_dict(state["state_dict"])
        module = module.cpu().eval()
        splits = {"idx": idx, "test": split_tensors["test"], "standardiser": standardiser}
        best = float(best_score) if best_score is not None else None
        return module, splits, history.history, best

    @staticmethod
    def _evaluate(
        module: Any, test: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, y, w = test
        with torch.no_grad():
            proba = torch.cat(
                [
                    torch.softmax(module(x[i : i + _EVAL_BATCH]), dim=1)
                    for i in range(0, len(x), _EVAL_BATCH)
                ]
            )
        return y.numpy(), proba.numpy().astype(np.float64), w.numpy()

    def _metrics(
        self,
        data: InputData,
        splits: dict[str, Any],
        history: dict[str, list[float]],
        best: float | None,
        y_test: np.ndarray,
        proba: np.ndarray,
        w_test: np.ndarray,
    ) -> dict[str, Any]:
        from sklearn.metrics import roc_auc_score

        from .module import auc_score

        val_auc = history.get("val_auc", [])
        best_epoch = int(np.argmax(val_auc)) + 1 if val_auc else 0
        metrics: dict[str, Any] = {
            "test_auc": auc_score(y_test, proba, w_test),
            "val_auc": best if best is not None else (max(val_auc) if val_auc else float("nan")),
            "test_accuracy": float(np.average(proba.argmax(axis=1) == y_test, weights=w_test)),
            "best_epoch": best_epoch,
            "epochs_trained": len(history.get("train_loss", [])),
            "n_train": len(splits["idx"]["train"]),
            "n_val": len(splits["idx"]["val"]),
            "n_test": len(splits["idx"]["test"]),
            "class_names": list(data.class_names),
        }
        if len(data.class_names) > 2:
            for c, name in enumerate(data.class_names):
                is_c = y_test == c
                metrics[f"test_auc_{name}"] = (
                    float(roc_auc_score(is_c, proba[:, c], sample_weight=w_test))
                    if 0 < is_c.sum() < len(is_c)
                    else float("nan")
                )
        return metrics

    def _figures(
        self,
        data: InputData,
        history: dict[str, list[float]],
        y_test: np.ndarray,
        proba: np.ndarray,
        w_test: np.ndarray,
    ) -> dict[str, Any]:
        from .. import plots

        weights = w_test if self.config.event_weights else None
        names = data.class_names
        return {
            "roc": plots.roc_figure(y_test, proba, names, weights=weights),
            "scores": plots.score_figure(y_test, proba, names, weights=weights),
            "confusion": plots.confusion_figure(y_test, proba, names),
            "loss": plots.loss_figure(history),
        }

    def _write_bundle(
        self,
        module: Any,
        data: InputData,
        standardiser: Any,
        metrics: dict[str, Any],
        history: dict[str, list[float]],
        figures: dict[str, Any],
    ) -> Path:
        from .bundle import save_bundle

        config = self.config
        info = {
            "model": {
                **config.model.to_dict(),
                "n_inputs": data.n_inputs,
                "n_classes": len(data.class_names),
            },
            "features": [spec.to_dict() for spec in data.features],
            "standardisation": standardiser.to_dict(),
            "class_names": list(data.class_names),
            "padding": data.padding,
            "skim": data.skim_config,
            "convert": data.convert_config,
            "train": config.to_dict(),
            "provenance": data.provenance,
            "metrics": metrics,
            "history": history,
        }
        return Path(save_bundle(self.output, model=module.model, info=info, figures=figures))
