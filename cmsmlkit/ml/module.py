"""The LightningModule that trains a classifier: weighted cross entropy, validation AUC.

Batches are ``(x, y, w)``: standardised input rows ``[B, D]``, class indices
``[B]`` and per-event weights ``[B]`` (event weight, or 1). Each event's cross
entropy is weighted by its class weight times its event weight; a batch's
loss is the weighted mean. At the end of each validation epoch the module
logs ``val_loss`` (weighted mean over the whole validation set) and
``val_auc`` (binary: the ROC AUC of the class-1 probability; multiclass:
the macro average of one-vs-rest AUCs), which early stopping, checkpointing
and Optuna's pruning callback monitor.

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
from .models import build_model

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


class ClassifierModule(pl.LightningModule):
    """A network from :func:`~cmsmlkit.ml.models.build_model`, trained with weighted cross entropy.

    Parameters
    ----------
    model_config : dict
        A :class:`~cmsmlkit.config.ModelConfig` as a dict (``ModelConfig.to_dict()``).
    n_inputs, n_classes : int
        Input columns ``D`` and classes ``C`` (2 for a binary classifier).
    learning_rate, weight_decay : float
        AdamW's settings.
    class_weights : list of float, optional
        One loss weight per class; none weighs every class 1.

    Examples
    --------
    >>> import torch
    >>> module = ClassifierModule({"hidden": [8]}, n_inputs=3, n_classes=2, class_weights=[1.0, 3.0])
    >>> module(torch.zeros(5, 3)).shape
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
    ) -> None:
        super().__init__()
        if class_weights is not None:
            class_weights = [float(w) for w in class_weights]
            if len(class_weights) != n_classes:
                raise ConfigError(
                    f"class_weights has {len(class_weights)} entries for {n_classes} classes; "
                    "give one weight per class."
                )
        # parameters go to MLflow from the Trainer, once, in their YAML spelling
        self.save_hyperparameters(logger=False)
        config = ModelConfig.model_validate(model_config)
        self.model = build_model(config, n_inputs=n_inputs, n_classes=n_classes)
        weights = torch.ones(n_classes) if class_weights is None else torch.tensor(class_weights)
        self.class_weights: torch.Tensor
        self.register_buffer("class_weights", weights.float(), persistent=False)
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, C]`` of input rows ``[B, D]``."""
        return self.model(x)

    def _event_weights(self, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.class_weights[y] * w

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        weights = self._event_weights(y, w)
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
        self._val_outputs.append((logits.detach(), y.detach(), w.detach()))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        logits = torch.cat([o[0] for o in self._val_outputs])
        y = torch.cat([o[1] for o in self._val_outputs])
        w = torch.cat([o[2] for o in self._val_outputs])
        self._val_outputs.clear()
        loss = self._loss(logits, y, w)
        proba = torch.softmax(logits.float(), dim=1).cpu().numpy()
        # the AUC weighs events by their event weights only: class weights are a training device
        auc = auc_score(y.cpu().numpy(), proba, w.cpu().numpy())
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_auc", torch.tensor(auc, dtype=torch.float32), prog_bar=True)

    def predict_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Class probabilities ``[B, C]`` of a batch (its first tensor)."""
        return torch.softmax(self(batch[0]), dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(),
            lr=self.hparams["learning_rate"],
            weight_decay=self.hparams["weight_decay"],
        )
