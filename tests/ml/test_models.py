"""Tests of cmsmlkit/ml/models.py: the MLP built from a ModelConfig."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cmsmlkit.config import ModelConfig
from cmsmlkit.ml.models import MLP, build_model


def linear_shapes(net: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_output_shape_is_batch_by_classes(n_classes):
    net = build_model(ModelConfig(hidden=[16, 8]), n_inputs=7, n_classes=n_classes)
    out = net(torch.randn(11, 7))
    assert out.shape == (11, n_classes)
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    ("hidden", "expected"),
    [
        ([32], [(6, 32), (32, 2)]),
        ([64, 64], [(6, 64), (64, 64), (64, 2)]),
        ([128, 32, 16, 8], [(6, 128), (128, 32), (32, 16), (16, 8), (8, 2)]),
    ],
)
def test_depth_and_width_follow_hidden(hidden, expected):
    net = build_model(ModelConfig(hidden=hidden), n_inputs=6, n_classes=2)
    assert isinstance(net, MLP)
    assert linear_shapes(net) == expected
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == sum(i * o + o for i, o in expected)


@pytest.mark.parametrize(
    ("name", "cls"),
    [("relu", nn.ReLU), ("gelu", nn.GELU), ("silu", nn.SiLU), ("tanh", nn.Tanh), ("elu", nn.ELU)],
)
def test_activation_after_every_hidden_layer(name, cls):
    net = build_model(ModelConfig(hidden=[8, 8, 8], activation=name, dropout=0.0), 4, 3)
    layers = list(net.net)
    assert [type(m) for m in layers] == [nn.Linear, cls] * 3 + [nn.Linear]


def test_dropout_layers_and_train_eval_behaviour():
    net = build_model(ModelConfig(hidden=[256, 256], dropout=0.5), n_inputs=5, n_classes=2)
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert [d.p for d in drops] == [0.5, 0.5]
    x = torch.randn(64, 5)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    torch.manual_seed(0)
    assert not torch.equal(net(x), net(x))


def test_no_dropout_layer_when_dropout_is_zero():
    net = build_model(ModelConfig(hidden=[8], dropout=0.0), n_inputs=3, n_classes=2)
    assert not any(isinstance(m, nn.Dropout) for m in net.modules())
    x = torch.randn(10, 3)
    net.train()
    assert torch.equal(net(x), net(x))


def test_gradients_reach_every_parameter():
    net = build_model(ModelConfig(hidden=[8, 4]), n_inputs=3, n_classes=2)
    loss = nn.functional.cross_entropy(net(torch.randn(16, 3)), torch.randint(0, 2, (16,)))
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in net.parameters())
