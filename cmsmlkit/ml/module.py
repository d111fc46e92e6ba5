"""The LightningModule that trains a classifier: weighted (binary) cross entropy, validation AUC.

Batches are ``(x, y, w)``: input rows ``[B, n_inputs]``, class indices
``[B]`` and per-event weights ``[B]`` (event weight, or 1). A binary
classifier has one logit and is trained with binary cross entropy (the logit
is the log-odds of class 1); more classes have one logit each and cross
entropy. Each event's loss is weighted by its class weight times its event
weight; a batch's loss is the weighted mean. At the end of each validation
epoch the module logs ``val_loss`` (weighted mean over the whole validation
set) and ``val_auc`` (binary: the ROC AUC of the class-1 probability;
multiclass: the macro average of one-vs-rest AUCs, weighted by the event
weights), which early stopping, checkpointing and Optuna's pruning callback
monitor. The optimiser (adamw, adam, sgd) and learning-rate schedule (none,
cosine, onecycle, plateau) are hyperparameters.

>>> from cmsmlkit.ml.module import ClassifierModule
>>> module = ClassifierModule({"hidden": [16]}, n_inputs=4, n_classes=2)
>>> module.hparams.n_inputs
4
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.nn import functional as F

from ..config import ModelConfig
from ..errors import ConfigError
from .models import build_model, probabilities

__all__ = ["ClassifierModule", "auc_score"]


def auc_score(labels: np.ndarray, proba: np.ndarray, weights: np.ndarray | None = None) -> float:
    """ROC AUC of class probabilities: binary on class 1, macro one-vs-rest for more classes.

    Returns 0.5 (no separation measurable) when fewer than two classes are present.

    >>> import numpy as np
    >>> auc_score(np.array([0, 0, 1, 1]), np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]))
    1.0
    """
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    n_classes = proba.shape[1]
    if len(np.unique(labels)) < 2:
        return 0.5
    if n_classes == 2:
        return float(roc_auc_score(labels, proba[:, 1], sample_weight=weights))
    present = np.unique(labels)
    if len(present) < n_classes:
        # one-vs-rest over the classes that are there; an absent class has no ROC curve
        aucs = [roc_auc_score(labels == c, proba[:, c], sample_weight=weights) for c in present]
        return float(np.mean(aucs))
    return float(
        roc_auc_score(
            labels,
            proba,
            multi_class="ovr",
            average="macro",
            labels=list(range(n_classes)),
            sample_weight=weights,
        )
    )


OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("none", "cosine", "onecycle", "plateau")


class ClassifierModule(pl.LightningModule):
    """A network from :func:`~cmsmlkit.ml.models.build_model`, trained with weighted cross entropy.

    Parameters
    ----------
    model_config : dict
        A :class:`~cmsmlkit.config.ModelConfig` as a dict (``ModelConfig.to_dict()``).
    n_inputs, n_classes : int
        Input columns and classes ``C`` (2 for a binary classifier, which has one logit).
    learning_rate, weight_decay : float
        The optimiser's settings.
    class_weights : list of float, optional
        One loss weight per class; none weighs every class 1.
    optimizer : {"adamw", "adam", "sgd"}
        sgd uses Nesterov momentum 0.9.
    scheduler : {"none", "cosine", "onecycle", "plateau"}
        cosine anneals over ``max_epochs``; onecycle steps per batch up to
        ``learning_rate``; plateau halves the rate when ``val_loss`` stalls 2 epochs.
    layout : dict, optional
        The :class:`~cmsmlkit.ml.dataset.InputLayout` as a dict (set models need it).

    Examples
    --------
    >>> import torch
    >>> module = ClassifierModule({"hidden": [8]}, n_inputs=3, n_classes=2, class_weights=[1.0, 3.0])
    >>> module(torch.zeros(5, 3)).shape
    torch.Size([5, 1])
    >>> module.probabilities(torch.zeros(5, 3)).shape
    torch.Size([5, 2])
    """

    def __init__(
        self,
        model_config: dict[str, Any],
        n_inputs: int,
        n_classes: int,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        class_weights: Sequence[float] | None = None,
        optimizer: str = "adamw",
        scheduler: str = "none",
        layout: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if class_weights is not None:
            class_weights = [float(w) for w in class_weights]
            if len(class_weights) != n_classes:
                raise ConfigError(
                    f"class_weights has {len(class_weights)} entries for {n_classes} classes; "
                    "give one weight per class."
                )
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer must be one of {OPTIMIZERS}, not {optimizer!r}.")
        if scheduler not in SCHEDULERS:
            raise ConfigError(f"train.scheduler must be one of {SCHEDULERS}, not {scheduler!r}.")
        # parameters go to MLflow from the Trainer, once, in their YAML spelling
        self.save_hyperparameters(logger=False)
        from .dataset import InputLayout

        config = ModelConfig.model_validate(model_config)
        input_layout = InputLayout.from_dict(layout) if layout is not None else None
        self.n_classes = n_classes
        self.model = build_model(
            config, n_inputs=n_inputs, n_classes=n_classes, layout=input_layout
        )
        weights = torch.ones(n_classes) if class_weights is None else torch.tensor(class_weights)
        self.class_weights: torch.Tensor
        self.register_buffer("class_weights", weights.float(), persistent=False)
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 1]`` (binary) or ``[B, C]`` of input rows."""
        return self.model(x)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[B, C]`` of input rows."""
        return probabilities(self(x).float(), self.n_classes)

    def _event_weights(self, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.class_weights[y] * w

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        weights = self._event_weights(y, w)
        logits = logits.float()
        if logits.shape[1] == 1:
            per_event = F.binary_cross_entropy_with_logits(
                logits[:, 0], y.to(logits.dtype), reduction="none"
            )
        else:
            per_event = F.cross_entropy(logits, y, reduction="none")
        # a weighted mean, so that the scale of the event weights does not set the learning rate
        return (weights * per_event).sum() / weights.sum().clamp_min(
            torch.finfo(weights.dtype).tiny
        )

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y, w = batch
        loss = self._loss(self(x), y, w)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_outputs.clear()

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        x, y, w = batch
        logits = self(x)
        self._val_outputs.append((logits.detach().float(), y.detach(), w.detach()))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        logits = torch.cat([o[0] for o in self._val_outputs])
        y = torch.cat([o[1] for o in self._val_outputs])
        w = torch.cat([o[2] for o in self._val_outputs])
        self._val_outputs.clear()
        loss = self._loss(logits, y, w)
        proba = probabilities(logits, self.n_classes).cpu().numpy()
        # the AUC weighs events by their event weights only: class weights are a training device
        auc = auc_score(y.cpu().numpy(), proba, w.cpu().numpy())
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_auc", torch.tensor(auc, dtype=torch.float32), prog_bar=True)

    def predict_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Class probabilities ``[B, C]`` of a batch (its first tensor)."""
        return self.probabilities(batch[0])

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        lr, decay = hp["learning_rate"], hp["weight_decay"]
        params = self.parameters()
        optimizer: torch.optim.Optimizer
        if hp["optimizer"] == "adam":
            optimizer = torch.optim.Adam(params, lr=lr, weight_decay=decay)
        elif hp["optimizer"] == "sgd":
            optimizer = torch.optim.SGD(
                params, lr=lr, weight_decay=decay, momentum=0.9, nesterov=True
            )
        else:
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=decay)
        schedule = hp["scheduler"]
        if schedule == "none":
            return optimizer
        if schedule == "cosine":
            epochs = max(int(self.trainer.max_epochs or 1), 1)
            sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": sched, "interval": "epoch"},
            }
        if schedule == "onecycle":
            steps = max(int(self.trainer.estimated_stepping_batches), 1)
            sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": sched, "interval": "step"},
            }
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.5, patience=2
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": sched, "monitor": "val_loss", "interval": "epoch"},
        }
