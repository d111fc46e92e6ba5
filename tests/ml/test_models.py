"""Tests of cmsmlkit/ml/models.py: MLP, Deep Sets and user models built from a ModelConfig."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cmsmlkit.config import ModelConfig
from cmsmlkit.errors import ConfigError
from cmsmlkit.ml.dataset import FeatureSpec, InputLayout
from cmsmlkit.ml.models import MLP, DeepSets, WithProbabilities, build_model, probabilities


def linear_shapes(net: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize(("n_classes", "n_out"), [(2, 1), (3, 3), (5, 5)])
def test_output_shape_is_one_logit_for_binary_else_one_per_class(n_classes, n_out):
    net = build_model(ModelConfig(hidden=[16, 8]), n_inputs=7, n_classes=n_classes)
    out = net(torch.randn(11, 7))
    assert out.shape == (11, n_out)
    assert out.dtype == torch.float32
    proba = probabilities(out, n_classes)
    assert proba.shape == (11, n_classes)
    assert torch.allclose(proba.sum(dim=1), torch.ones(11))


@pytest.mark.parametrize(
    ("hidden", "expected"),
    [
        ([32], [(6, 32), (32, 1)]),
        ([64, 64], [(6, 64), (64, 64), (64, 1)]),
        ([128, 32, 16, 8], [(6, 128), (128, 32), (32, 16), (16, 8), (8, 1)]),
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
    net = build_model(ModelConfig(hidden=[8, 4]), n_inputs=3, n_classes=3)
    loss = nn.functional.cross_entropy(net(torch.randn(16, 3)), torch.randint(0, 3, (16,)))
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in net.parameters())


# --------------------------------------------------------------------------- Deep Sets

#: ht, then 3 jets with pt and eta, then 2 muons with pt: row = ht | Jet.pt x3 | Jet.eta x3 |
#: Mu.pt x2 | Jet mask x3 | Mu mask x2
SET_FEATURES = [
    FeatureSpec("ht", "scalars/ht"),
    FeatureSpec("Jet.pt", "objects/Jet/pt", 3, "Jet"),
    FeatureSpec("Jet.eta", "objects/Jet/eta", 3, "Jet"),
    FeatureSpec("Mu.pt", "objects/Mu/pt", 2, "Mu"),
]


def set_rows(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 14, generator=g)
    n_jets = torch.randint(0, 4, (n,), generator=g)
    n_mu = torch.randint(0, 3, (n,), generator=g)
    jet_mask = (torch.arange(3)[None, :] < n_jets[:, None]).float()
    mu_mask = (torch.arange(2)[None, :] < n_mu[:, None]).float()
    x[:, 1:4] *= jet_mask
    x[:, 4:7] *= jet_mask
    x[:, 7:9] *= mu_mask
    x[:, 9:12] = jet_mask
    x[:, 12:14] = mu_mask
    return x


def test_layout_with_masks_and_offsets():
    layout = InputLayout(SET_FEATURES, with_masks=True)
    assert (layout.n_features, layout.n_inputs) == (9, 14)
    assert layout.masks == [("Jet", 3), ("Mu", 2)]
    assert layout.offsets() == {
        "ht": 0,
        "Jet.pt": 1,
        "Jet.eta": 4,
        "Mu.pt": 7,
        "mask:Jet": 9,
        "mask:Mu": 12,
    }
    assert InputLayout.from_dict(layout.to_dict()) == layout
    assert InputLayout(SET_FEATURES).n_inputs == 9


@pytest.mark.parametrize("pooling", ["mean", "sum", "max"])
def test_deepsets_is_permutation_invariant_and_ignores_padding(pooling):
    torch.manual_seed(0)
    layout = InputLayout(SET_FEATURES, with_masks=True)
    net = build_model(
        ModelConfig(type="deepsets", hidden=[16], object_hidden=[8, 8], pooling=pooling),
        n_inputs=14,
        n_classes=3,
        layout=layout,
    ).eval()
    assert isinstance(net, DeepSets)
    x = set_rows(64)
    out = net(x)
    assert out.shape == (64, 3)
    # swap jet 0 and jet 1 (pt, eta and mask together): the same output
    swapped = x.clone()
    for start in (1, 4, 9):
        swapped[:, [start, start + 1]] = x[:, [start + 1, start]]
    torch.testing.assert_close(net(swapped), out, rtol=1e-5, atol=1e-5)
    # garbage in padded slots changes nothing
    noisy = x.clone()
    pad = x[:, 9:12] == 0
    noisy[:, 1:4][pad] = 123.0
    noisy[:, 4:7][pad] = -55.0
    torch.testing.assert_close(net(noisy), out)
    # but a real jet's pt does change the output
    real = x[:, 9] == 1
    moved = x.clone()
    moved[real, 1] += 3.0
    assert not torch.allclose(net(moved)[real], out[real])


def test_deepsets_needs_objects():
    scalars = InputLayout([FeatureSpec("ht", "scalars/ht")], with_masks=True)
    with pytest.raises(ConfigError, match="deepsets needs object features"):
        build_model(ModelConfig(type="deepsets"), n_inputs=1, n_classes=2, layout=scalars)


def test_deepsets_exports_to_onnx_and_torchscript(tmp_path):
    import onnxruntime

    torch.manual_seed(1)
    layout = InputLayout(SET_FEATURES, with_masks=True)
    net = build_model(ModelConfig(type="deepsets", hidden=[8], object_hidden=[8]), 14, 2, layout)
    wrapped = WithProbabilities(net, n_classes=2).eval()
    x = set_rows(9, seed=4)
    with torch.no_grad():
        expected = wrapped(x).numpy()
    torch.onnx.export(
        wrapped,
        (x,),
        str(tmp_path / "m.onnx"),
        input_names=["features"],
        output_names=["probabilities"],
        dynamic_axes={"features": {0: "batch"}, "probabilities": {0: "batch"}},
        dynamo=False,
    )
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    (got,) = session.run(None, {"features": x.numpy()})
    assert np.abs(got - expected).max() <= 1e-5
    traced = torch.jit.trace(wrapped, (set_rows(3),))
    np.testing.assert_allclose(traced(x).detach().numpy(), expected, atol=1e-6)


# --------------------------------------------------------------------------- user models


def test_custom_model_by_import_path_gets_the_kwargs_it_asks_for(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "import torch\n"
        "class Linear(torch.nn.Module):\n"
        "    def __init__(self, n_inputs, n_outputs, layout, scale=1.0):\n"
        "        super().__init__()\n"
        "        self.layout, self.scale = layout, scale\n"
        "        self.lin = torch.nn.Linear(n_inputs, n_outputs)\n"
        "    def forward(self, x):\n"
        "        return self.lin(x) * self.scale\n"
        "class Loose(torch.nn.Module):\n"
        "    def __init__(self, **kwargs):\n"
        "        super().__init__()\n"
        "        self.kwargs = kwargs\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    layout = InputLayout(SET_FEATURES, with_masks=True)
    config = ModelConfig(type="custom", import_path="mynets:Linear", kwargs={"scale": 2.0})
    net = build_model(config, n_inputs=14, n_classes=2, layout=layout)
    assert net.lin.in_features == 14 and net.lin.out_features == 1
    assert net.scale == 2.0 and net.layout is layout
    loose = build_model(ModelConfig(type="custom", import_path="mynets:Loose"), 14, 4, layout)
    assert loose.kwargs == {"n_inputs": 14, "n_outputs": 4, "n_classes": 4, "layout": layout}
    with pytest.raises(
        ConfigError,
        match="mynets has no torch.nn.Module named 'Nope'; its nn.Modules: Linear, Loose",
    ):
        build_model(ModelConfig(type="custom", import_path="mynets:Nope"), 14, 2, layout)
    with pytest.raises(ConfigError, match="cannot import 'no_such_pkg'"):
        build_model(ModelConfig(type="custom", import_path="no_such_pkg:Net"), 14, 2, layout)
    with pytest.raises(
        ConfigError, match=r"Linear\(\*\*\['layout', 'n_inputs', 'n_outputs', 'wrong'\]\) failed"
    ):
        build_model(
            ModelConfig(type="custom", import_path="mynets:Linear", kwargs={"wrong": 1}),
            14,
            2,
            layout,
        )


def test_custom_type_needs_an_import_path():
    from cmsmlkit.config import build_config
    from cmsmlkit.errors import ConfigError as Err

    with pytest.raises(Err, match="type: custom needs import_path"):
        build_config(ModelConfig, {"type": "custom"}, {})
    with pytest.raises(Err, match="must read 'package.module:ClassName'"):
        build_config(ModelConfig, {"type": "custom", "import_path": "mynets.Linear"}, {})
