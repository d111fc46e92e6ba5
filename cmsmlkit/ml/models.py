"""Network architectures, built from a :class:`~cmsmlkit.config.ModelConfig`.

Every model maps input rows ``[B, n_inputs]`` (see
:class:`~cmsmlkit.ml.dataset.InputLayout`) to logits ``[B, n_outputs]``:
one logit for a binary classifier (trained with binary cross entropy, the
log-odds of class 1), one per class for more classes (softmax, cross
entropy). :func:`probabilities` turns either into class probabilities
``[B, C]``, and :class:`WithProbabilities` wraps a network for export.

- ``mlp``: :class:`MLP` over the whole row.
- ``deepsets``: :class:`DeepSets`, permutation invariant over the objects of
  each padded collection; padded slots (mask 0) never contribute.
- ``custom``: your ``nn.Module`` from ``import_path`` ("package.module:Class"),
  constructed with those of ``n_inputs``, ``n_outputs``, ``n_classes`` and
  ``layout`` (an :class:`~cmsmlkit.ml.dataset.InputLayout`) that its
  ``__init__`` accepts, plus ``kwargs``; ``forward(x)`` takes the same rows
  and returns ``[B, n_outputs]`` logits.

>>> import torch
>>> from cmsmlkit.config import ModelConfig
>>> net = build_model(ModelConfig(hidden=[8]), n_inputs=3, n_classes=2)
>>> net(torch.zeros(4, 3)).shape
torch.Size([4, 1])
>>> probabilities(net(torch.zeros(4, 3)), n_classes=2).shape
torch.Size([4, 2])
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    from .dataset import InputLayout

__all__ = [
    "MLP",
    "DeepSets",
    "WithProbabilities",
    "build_model",
    "import_model_class",
    "n_outputs",
    "probabilities",
]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
}


def n_outputs(n_classes: int) -> int:
    """Logits of a classifier of ``n_classes`` classes: 1 for binary, else one per class."""
    return 1 if n_classes == 2 else n_classes


n_outputs_of = n_outputs


def probabilities(logits: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Class probabilities ``[B, C]``: ``[1 - sigmoid, sigmoid]`` of one logit, else softmax.

    >>> probabilities(torch.zeros(1, 1), 2).tolist()
    [[0.5, 0.5]]
    """
    if logits.shape[1] == 1 and n_classes == 2:
        p = torch.sigmoid(logits)
        return torch.cat([1.0 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


class WithProbabilities(nn.Module):
    """A network followed by its class probabilities ``[B, C]``: what ONNX and TorchScript hold.

    ``n_outputs`` is the network's number of logits (1 for a binary classifier).
    """

    def __init__(self, net: nn.Module, n_classes: int, n_outputs: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.one_logit = (n_outputs if n_outputs is not None else n_outputs_of(n_classes)) == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        if self.one_logit:
            p = torch.sigmoid(logits)
            return torch.cat([1.0 - p, p], dim=1)
        return torch.softmax(logits, dim=1)


def _stack(
    width: int, hidden: list[int], dropout: float, activation: str
) -> tuple[list[nn.Module], int]:
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(width, size), _ACTIVATIONS[activation]()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    return layers, width


class MLP(nn.Module):
    """A fully connected network: (Linear, activation, dropout) per hidden layer, then a linear head.

    >>> MLP(4, 1, [8], 0.0, "relu")(torch.zeros(2, 4)).shape
    torch.Size([2, 1])
    """

    def __init__(
        self, n_inputs: int, n_outputs: int, hidden: list[int], dropout: float, activation: str
    ) -> None:
        super().__init__()
        layers, width = _stack(n_inputs, hidden, dropout, activation)
        layers.append(nn.Linear(width, n_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DeepSets(nn.Module):
    """Deep Sets over the padded collections, concatenated with the scalar features.

    For each collection, a per-object network ``phi`` (widths ``object_hidden``)
    maps each object's fields to an embedding; the embeddings of the real
    objects (mask 1) are pooled (mean, sum or max), so the output does not
    depend on the order of the objects nor on the padding. The pooled
    embeddings and the scalars go through ``rho`` (widths ``hidden``) to the
    logits. An event without objects pools to zeros.

    >>> from cmsmlkit.ml.dataset import FeatureSpec, InputLayout
    >>> layout = InputLayout([FeatureSpec("ht", "scalars/ht"),
    ...                       FeatureSpec("J.pt", "objects/J/pt", 3, "J")], with_masks=True)
    >>> net = DeepSets(layout, 1, object_hidden=[8], hidden=[8])
    >>> net(torch.zeros(2, layout.n_inputs)).shape
    torch.Size([2, 1])
    """

    def __init__(
        self,
        layout: InputLayout,
        n_outputs: int,
        *,
        object_hidden: list[int],
        hidden: list[int],
        dropout: float = 0.0,
        activation: str = "relu",
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        if not layout.masks:
            raise ConfigError(
                "model.type: deepsets needs object features (Collection.field) in train.features; "
                "with scalars only, use type: mlp."
            )
        if pooling not in ("mean", "sum", "max"):
            raise ConfigError(f"model.pooling must be mean, sum or max, not {pooling!r}.")
        self.pooling = pooling
        where = layout.offsets()
        scalars = [where[f.name] for f in layout.features if f.collection is None]
        self.register_buffer("scalar_idx", torch.tensor(scalars, dtype=torch.long))
        self.phis = nn.ModuleList()
        self.n_collections = len(layout.masks)
        width = len(scalars)
        for i, (coll, length) in enumerate(layout.masks):
            fields = [f for f in layout.features if f.collection == coll]
            # [L, F] column of field f of slot l
            idx = torch.tensor(
                [[where[f.name] + slot for f in fields] for slot in range(length)],
                dtype=torch.long,
            )
            self.register_buffer(f"obj_idx_{i}", idx)
            mask = torch.arange(where[f"mask:{coll}"], where[f"mask:{coll}"] + length)
            self.register_buffer(f"mask_idx_{i}", mask)
            layers, out = _stack(len(fields), object_hidden, 0.0, activation)
            self.phis.append(nn.Sequential(*layers))
            width += out
        layers, width = _stack(width, hidden, dropout, activation)
        layers.append(nn.Linear(width, n_outputs))
        self.rho = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x[:, self.scalar_idx]]
        for i, phi in enumerate(self.phis):
            objects = x[:, getattr(self, f"obj_idx_{i}")]  # [B, L, F]
            mask = x[:, getattr(self, f"mask_idx_{i}")].unsqueeze(-1)  # [B, L, 1]
            emb = phi(objects) * mask
            if self.pooling == "sum":
                pooled = emb.sum(dim=1)
            elif self.pooling == "mean":
                pooled = emb.sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
            else:
                # padded slots cannot win the max; an empty set gives 0
                filled = emb + (mask - 1.0) * 1e9
                pooled = filled.max(dim=1).values * (mask.sum(dim=1) > 0).to(emb.dtype)
            parts.append(pooled)
        return self.rho(torch.cat(parts, dim=1))


def import_model_class(import_path: str) -> type[nn.Module]:
    """The class named by ``"package.module:ClassName"``; a clear error when it cannot be found."""
    module_name, _, class_name = import_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"model.import_path {import_path!r}: cannot import {module_name!r} ({exc}); make the "
            "module importable (pip install -e your package, or add its directory to PYTHONPATH)."
        ) from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        names = [
            n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module)
        ]
        raise ConfigError(
            f"model.import_path {import_path!r}: {module_name} has no torch.nn.Module named "
            f"{class_name!r}; its nn.Modules: {', '.join(names) or 'none'}."
        )
    return cls


def _custom(config: ModelConfig, n_inputs: int, n_classes: int, layout: Any) -> nn.Module:
    cls = import_model_class(config.import_path or "")
    offered = {
        "n_inputs": n_inputs,
        "n_outputs": n_outputs(n_classes),
        "n_classes": n_classes,
        "layout": layout,
    }
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if takes_any or k in params}
    kwargs.update(config.kwargs)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"model.import_path {config.import_path!r}: {cls.__name__}(**{sorted(kwargs)}) failed "
            f"({exc}); its __init__ may take n_inputs, n_outputs, n_classes, layout and the names "
            "in model.kwargs."
        ) from None


def build_model(
    config: ModelConfig, n_inputs: int, n_classes: int, layout: InputLayout | None = None
) -> nn.Module:
    """The network of ``config`` for rows of ``n_inputs`` columns and ``n_classes`` classes.

    ``layout`` (what each input column is) is needed by ``deepsets`` and
    offered to ``custom`` models.
    """
    outputs = n_outputs(n_classes)
    if config.type == "mlp":
        return MLP(n_inputs, outputs, list(config.hidden), config.dropout, config.activation)
    if config.type == "deepsets":
        if layout is None:
            raise ConfigError("model.type: deepsets needs the input layout.")
        if layout.n_inputs != n_inputs:
            raise ConfigError(
                f"the input layout has {layout.n_inputs} columns but the model {n_inputs}."
            )
        return DeepSets(
            layout,
            outputs,
            object_hidden=list(config.object_hidden),
            hidden=list(config.hidden),
            dropout=config.dropout,
            activation=config.activation,
            pooling=config.pooling,
        )
    if config.type == "custom":
        return _custom(config, n_inputs, n_classes, layout)
    raise ConfigError(f"unknown model type {config.type!r}")  # pragma: no cover - config refuses it
