"""Network architectures, built from a :class:`~cmsmlkit.config.ModelConfig`.

Every model maps standardised input rows [B, D] to class logits [B, C]
(C = 2 for a binary classifier too, so binary and multiclass share one head).

>>> from cmsmlkit.config import ModelConfig
>>> net = build_model(ModelConfig(hidden=[8]), n_inputs=3, n_classes=2)
>>> net(__import__("torch").zeros(4, 3)).shape
torch.Size([4, 2])
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig

__all__ = ["MLP", "build_model"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
}


class MLP(nn.Module):
    """A fully connected network: (Linear, activation, dropout) per hidden layer, then a linear head."""

    def __init__(
        self, n_inputs: int, n_classes: int, hidden: list[int], dropout: float, activation: str
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_inputs
        for size in hidden:
            layers += [nn.Linear(width, size), _ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(config: ModelConfig, n_inputs: int, n_classes: int) -> nn.Module:
    """The network of ``config`` for ``n_inputs`` input columns and ``n_classes`` classes."""
    if config.type == "mlp":
        return MLP(n_inputs, n_classes, list(config.hidden), config.dropout, config.activation)
    raise ValueError(
        f"unknown model type {config.type!r}"
    )  # pragma: no cover - the config refuses it
