"""The model bundle: saved atomically, read back checked, predicting like the torch model."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

import cmsmlkit
from cmsmlkit.config import ModelConfig
from cmsmlkit.errors import BundleError
from cmsmlkit.ml import bundle as bundle_module
from cmsmlkit.ml.bundle import FORMAT_VERSION, Bundle, save_bundle
from cmsmlkit.ml.dataset import FeatureSpec, Standardiser, feature_matrix
from cmsmlkit.ml.models import build_model
from cmsmlkit.plots import loss_figure

N_EVENTS = 50
L_JETS = 3
N_INPUTS = 2 + L_JETS  # ht, met, Jet.pt x 3


def make_columns(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_jets = rng.integers(0, L_JETS + 1, n)
    mask = np.arange(L_JETS)[None, :] < n_jets[:, None]
    jet_pt = np.where(mask, rng.exponential(40.0, (n, L_JETS)) + 20.0, 0.0)
    return {
        "scalars/ht": rng.normal(300.0, 80.0, n).astype(np.float32),
        "scalars/met": rng.exponential(50.0, n).astype(np.float32),
        "objects/Jet/pt": jet_pt.astype(np.float32),
        "objects/Jet/mask": mask,
    }


FEATURES = [
    FeatureSpec("ht", "scalars/ht"),
    FeatureSpec("met", "scalars/met"),
    FeatureSpec("Jet.pt", "objects/Jet/pt", length=L_JETS, collection="Jet"),
]


def make_info(standardiser: Standardiser, config: ModelConfig, **metrics: float) -> dict:
    return {
        "model": {**config.to_dict(), "n_inputs": N_INPUTS, "n_classes": 2},
        "features": [f.to_dict() for f in FEATURES],
        "standardisation": standardiser.to_dict(),
        "class_names": ["signal", "background"],
        "padding": {
            "Jet": {
                "max_len": L_JETS,
                "sort_by": "pt",
                "pad_value": 0.0,
                "fields": ["pt"],
                "n_truncated": 4,
            }
        },
        "skim": None,
        "convert": {"output": "data.h5"},
        "train": {"max_epochs": 2},
        "provenance": {"files": {"data.h5": "abc123"}},
        "metrics": {"test_auc": 0.9312, "test_loss": 0.41, **metrics},
        "history": {"train_loss": [0.7, 0.5], "val_loss": [0.72, 0.6]},
    }


@pytest.fixture(scope="module")
def columns() -> dict[str, np.ndarray]:
    return make_columns(N_EVENTS)


@pytest.fixture(scope="module")
def trained(columns):
    """A small MLP with random weights, its standardiser and config (no training needed)."""
    torch.manual_seed(3)
    config = ModelConfig(hidden=[16, 8], dropout=0.2, activation="gelu")
    net = build_model(config, N_INPUTS, 2)
    X, valid = feature_matrix(columns, FEATURES)
    return net, Standardiser.fit(X, valid, FEATURES), config


@pytest.fixture(scope="module")
def saved(tmp_path_factory, trained) -> Path:
    net, standardiser, config = trained
    path = tmp_path_factory.mktemp("bundles") / "model"
    info = make_info(standardiser, config, odd=float("nan"))
    figures = {"loss": loss_figure(info["history"])}
    assert save_bundle(path, model=net, info=info, figures=figures) == path
    return path


def copy_bundle(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in ("bundle.json", "model.pt", "model.onnx", "model.ts"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def edit_json(path: Path, **changes) -> None:
    data = json.loads((path / "bundle.json").read_text())
    data.update(changes)
    (path / "bundle.json").write_text(json.dumps(data))


# --------------------------------------------------------------------------- layout


def test_bundle_holds_every_file(saved):
    names = sorted(str(p.relative_to(saved)) for p in saved.rglob("*") if p.is_file())
    assert names == [
        "bundle.json",
        "figures/loss.pdf",
        "figures/loss.png",
        "metrics.json",
        "model.onnx",
        "model.pt",
        "model.ts",
    ]
    assert not saved.with_name("model.tmp").exists()
    assert (saved / "figures" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_bundle_json_records_everything(saved, trained):
    _, standardiser, config = trained
    info = json.loads((saved / "bundle.json").read_text())
    for key in (
        "model",
        "features",
        "standardisation",
        "class_names",
        "padding",
        "skim",
        "convert",
    ):
        assert key in info
    for key in (
        "train",
        "provenance",
        "metrics",
        "history",
        "format_version",
        "versions",
        "created",
        "files",
    ):
        assert key in info
    assert info["format_version"] == FORMAT_VERSION == 1
    # a binary classifier has one logit
    assert info["model"] == {**config.to_dict(), "n_inputs": 5, "n_classes": 2, "n_outputs": 1}
    assert info["standardisation"]["mean"] == pytest.approx(standardiser.mean.tolist())
    assert info["versions"]["cmsmlkit"] == cmsmlkit.__version__
    assert info["versions"]["torch"] == torch.__version__
    assert set(info["versions"]) >= {"cmsmlkit", "torch", "python", "lightning"}
    assert info["created"].endswith("+00:00")
    for name in ("model.pt", "model.onnx", "model.ts"):
        assert info["files"][name] == hashlib.sha256((saved / name).read_bytes()).hexdigest()
    # strict JSON: NaN becomes null, in bundle.json and metrics.json alike
    assert info["metrics"]["odd"] is None
    assert json.loads((saved / "metrics.json").read_text()) == {
        "test_auc": 0.9312,
        "test_loss": 0.41,
        "odd": None,
    }


def test_model_pt_is_a_plain_state_dict(saved, trained):
    net, _, _ = trained
    state = torch.load(saved / "model.pt", weights_only=True)
    assert list(state) == list(net.state_dict())
    for key, value in net.state_dict().items():
        assert torch.equal(state[key], value)


# --------------------------------------------------------------------------- loading


def test_loaded_bundle_attributes(saved, trained):
    net, standardiser, config = trained
    bundle = Bundle.load(saved)
    assert bundle.path == saved
    assert [f.name for f in bundle.features] == ["ht", "met", "Jet.pt"]
    assert bundle.features[2] == FEATURES[2]
    assert np.allclose(bundle.standardiser.mean, standardiser.mean)
    assert np.allclose(bundle.standardiser.std, standardiser.std)
    assert bundle.class_names == ["signal", "background"]
    assert bundle.padding["Jet"]["max_len"] == 3
    assert bundle.skim_config is None
    assert bundle.convert_config == {"output": "data.h5"}
    assert bundle.metrics["test_auc"] == 0.9312
    assert bundle.n_inputs == 5
    assert bundle.onnx_path == saved / "model.onnx"
    assert bundle.model_config == config
    model = bundle.model()
    assert model is bundle.model()  # cached
    assert not model.training
    assert repr(bundle) == (
        "Bundle('model': 2 classes ['signal', 'background'], 3 features / 5 inputs, "
        "MLP [16, 8], test AUC 0.93)"
    )


def test_predict_proba_equals_a_manual_torch_computation(saved, trained, columns):
    net, _, _ = trained
    # by hand: raw rows, mean/std over real entries, padded slots 0, softmax of the logits
    X = np.column_stack([columns["scalars/ht"], columns["scalars/met"], columns["objects/Jet/pt"]])
    valid = np.column_stack([np.ones((N_EVENTS, 2), bool), columns["objects/Jet/mask"]])
    jets = columns["objects/Jet/pt"][columns["objects/Jet/mask"]].astype(np.float64)
    mean = np.array(
        [columns["scalars/ht"].mean(), columns["scalars/met"].mean()] + [jets.mean()] * 3
    )
    std = np.array([columns["scalars/ht"].std(), columns["scalars/met"].std()] + [jets.std()] * 3)
    Z = np.where(valid, (X - mean) / std, 0.0).astype(np.float32)
    net.eval()
    with torch.no_grad():
        p1 = torch.sigmoid(net(torch.from_numpy(Z))).numpy()[:, 0]
    expected = np.column_stack([1.0 - p1, p1])

    bundle = Bundle.load(saved)
    proba = bundle.predict_proba(columns)
    assert proba.dtype == np.float32
    assert proba.shape == (N_EVENTS, 2)
    np.testing.assert_allclose(proba, expected, atol=1e-6)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    # batching does not change anything (beyond float32 rounding of a matrix product)
    np.testing.assert_allclose(bundle.predict_proba(columns, batch_size=7), proba, atol=1e-6)


def test_predict_proba_of_zero_events(saved, columns):
    empty = {key: value[:0] for key, value in columns.items()}
    proba = Bundle.load(saved).predict_proba(empty)
    assert proba.shape == (0, 2)
    assert proba.dtype == np.float32


def test_predict_proba_refuses_nan_and_missing_features(saved, columns):
    bundle = Bundle.load(saved)
    bad = dict(columns)
    bad["scalars/met"] = columns["scalars/met"].copy()
    bad["scalars/met"][[3, 9]] = np.nan
    with pytest.raises(cmsmlkit.errors.DataError, match="'met' in 2 events"):
        bundle.predict_proba(bad)
    missing = {k: v for k, v in columns.items() if k != "scalars/ht"}
    with pytest.raises(cmsmlkit.errors.DataError, match=r"feature 'ht' \(scalars/ht\)"):
        bundle.predict_proba(missing)


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_equals_torch(saved, trained, batch):
    net, _, _ = trained
    session = onnxruntime.InferenceSession(
        str(saved / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert (inp.name, out.name) == ("features", "probabilities")
    assert isinstance(inp.shape[0], str)  # dynamic batch axis
    assert inp.shape[1] == N_INPUTS
    x = np.random.default_rng(batch).normal(size=(batch, N_INPUTS)).astype(np.float32)
    (got,) = session.run(None, {"features": x})
    net.eval()
    with torch.no_grad():
        p1 = torch.sigmoid(net(torch.from_numpy(x))).numpy()[:, 0]
    expected = np.column_stack([1.0 - p1, p1])
    assert got.shape == (batch, 2)
    assert np.max(np.abs(got - expected)) <= 1e-5


# --------------------------------------------------------------------------- errors


def test_missing_directory(tmp_path):
    with pytest.raises(BundleError, match=r"model bundle .*no-such-model does not exist"):
        Bundle.load(tmp_path / "no-such-model")


@pytest.mark.parametrize("name", ["bundle.json", "model.pt"])
def test_missing_file(saved, tmp_path, name):
    path = copy_bundle(saved, tmp_path / "model")
    (path / name).unlink()
    with pytest.raises(BundleError, match=f"model bundle {path} has no {name}"):
        Bundle.load(path)


def test_invalid_json(saved, tmp_path):
    path = copy_bundle(saved, tmp_path / "model")
    (path / "bundle.json").write_text('{"format_version": 1,')
    with pytest.raises(BundleError, match=r"bundle.json is not valid JSON"):
        Bundle.load(path)


def test_newer_format_version(saved, tmp_path):
    path = copy_bundle(saved, tmp_path / "model")
    edit_json(path, format_version=FORMAT_VERSION + 1)
    with pytest.raises(BundleError) as info:
        Bundle.load(path)
    assert str(path) in str(info.value)
    assert "made by a newer cmsmlkit (format 2" in str(info.value)
    assert "upgrade: pip install -U cmsmlkit" in str(info.value)


def test_corrupted_model_pt(saved, tmp_path):
    path = copy_bundle(saved, tmp_path / "model")
    data = bytearray((path / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.pt").write_bytes(bytes(data))
    with pytest.raises(
        BundleError, match=r"model.pt does not match the sha256 recorded in bundle.json"
    ):
        Bundle.load(path)


def test_weights_not_matching_the_architecture(saved, tmp_path):
    path = copy_bundle(saved, tmp_path / "model")
    info = json.loads((path / "bundle.json").read_text())
    edit_json(path, model={**info["model"], "hidden": [32]})
    with pytest.raises(
        BundleError, match=r"do not match the architecture in bundle.json \(MLP \[32\]"
    ):
        Bundle.load(path)


class _Exploit:
    """A pickle that would create a directory when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickled_code_in_model_pt_is_refused(saved, tmp_path):
    path = copy_bundle(saved, tmp_path / "model")
    marker = tmp_path / "pwned"
    torch.save({"net.0.weight": _Exploit(marker)}, path / "model.pt")
    edit_json(
        path, files={"model.pt": hashlib.sha256((path / "model.pt").read_bytes()).hexdigest()}
    )
    with pytest.raises(
        BundleError, match=r"cannot be read as weights .* state_dict of tensors only"
    ):
        Bundle.load(path)
    assert not marker.exists()


# --------------------------------------------------------------------------- atomic writes


def test_save_replaces_an_old_bundle(tmp_path, trained):
    net, standardiser, config = trained
    path = tmp_path / "model"
    save_bundle(path, model=net, info=make_info(standardiser, config))
    (path / "figures").mkdir()  # a leftover of the old bundle disappears with it
    save_bundle(path, model=net, info=make_info(standardiser, config, test_auc=0.5))
    assert Bundle.load(path).metrics["test_auc"] == 0.5
    assert not (path / "figures").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failed_save_keeps_the_old_bundle(tmp_path, trained, monkeypatch):
    net, standardiser, config = trained
    path = tmp_path / "model"
    save_bundle(path, model=net, info=make_info(standardiser, config))
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def broken_export(*args, **kwargs):
        raise RuntimeError("ONNX export broke")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(RuntimeError, match="ONNX export broke"):
        save_bundle(path, model=net, info=make_info(standardiser, config, test_auc=0.1))
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert Bundle.load(path).metrics["test_auc"] == 0.9312


def test_onnx_disagreeing_with_torch_is_an_error(tmp_path, trained, monkeypatch):
    net, standardiser, config = trained
    monkeypatch.setattr(bundle_module, "ONNX_TOLERANCE", -1.0)
    with pytest.raises(
        BundleError, match=r"the ONNX export differs from the torch model by .* batch of 1"
    ):
        save_bundle(tmp_path / "model", model=net, info=make_info(standardiser, config))
    assert list(tmp_path.iterdir()) == []


def test_save_leaves_the_callers_model_alone(tmp_path, trained):
    net, standardiser, config = trained
    net.train()
    save_bundle(tmp_path / "model", model=net, info=make_info(standardiser, config))
    assert net.training
    net.eval()


def test_save_refuses_to_replace_a_directory_that_is_not_a_bundle(tmp_path, trained):
    net, standardiser, config = trained
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match=r"results holds files but no bundle.json"):
        save_bundle(tmp_path / "results", model=net, info=make_info(standardiser, config))
    assert (tmp_path / "results" / "notes.txt").read_text() == "keep me"


def test_save_needs_the_network_shape(tmp_path, trained):
    net, standardiser, config = trained
    info = make_info(standardiser, config)
    del info["model"]["n_inputs"]
    with pytest.raises(BundleError, match=r"info\['model'\] must hold 'n_inputs' and 'n_classes'"):
        save_bundle(tmp_path / "model", model=net, info=info)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- TorchScript


def test_torchscript_equals_torch_and_loads_without_cmsmlkit(saved, trained, columns):
    net, _, _ = trained
    bundle = Bundle.load(saved)
    assert bundle.torchscript_path == saved / "model.ts"
    scripted = torch.jit.load(str(bundle.torchscript_path))
    rows = bundle.rows(columns)
    assert rows.shape == (N_EVENTS, N_INPUTS) and rows.dtype == np.float32
    with torch.no_grad():
        got = scripted(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(got, bundle.predict_proba(columns), atol=1e-6)


def test_torchscript_in_coffea_torch_wrapper(saved, columns):
    """coffea's own torch_wrapper (no test double) runs the exported model on awkward arrays."""
    ak = pytest.importorskip("awkward")
    ml_tools = pytest.importorskip("coffea.ml_tools.torch_wrapper")
    bundle = Bundle.load(saved)

    class Scores(ml_tools.torch_wrapper):
        def prepare_awkward(self, events):
            cols = {
                "scalars/ht": ak.to_numpy(events.ht),
                "scalars/met": ak.to_numpy(events.met),
                "objects/Jet/pt": ak.to_numpy(events.jet_pt),
                "objects/Jet/mask": ak.to_numpy(events.jet_mask),
            }
            return (ak.Array(bundle.rows(cols)),), {}

    events = ak.zip(
        {
            "ht": columns["scalars/ht"],
            "met": columns["scalars/met"],
            "jet_pt": columns["objects/Jet/pt"],
            "jet_mask": columns["objects/Jet/mask"],
        },
        depth_limit=1,
    )
    scores = np.asarray(Scores(str(bundle.torchscript_path))(events))
    assert scores.shape == (N_EVENTS, 2)
    np.testing.assert_allclose(scores, bundle.predict_proba(columns), atol=1e-6)


def test_legacy_two_logit_bundle_still_predicts(tmp_path, trained, columns):
    """Bundles written before the one-logit binary head hold an MLP with two logits."""
    from cmsmlkit.ml.models import MLP

    _, standardiser, _ = trained
    torch.manual_seed(5)
    config = ModelConfig(hidden=[8], dropout=0.0)
    old = MLP(N_INPUTS, 2, [8], 0.0, "relu")
    path = save_bundle(tmp_path / "old", model=old, info=make_info(standardiser, config))
    assert json.loads((path / "bundle.json").read_text())["model"]["n_outputs"] == 2
    bundle = Bundle.load(path)
    rows = torch.from_numpy(bundle.rows(columns))
    with torch.no_grad():
        expected = torch.softmax(old.eval()(rows), dim=1).numpy()
    np.testing.assert_allclose(bundle.predict_proba(columns), expected, atol=1e-6)


def test_deepsets_bundle_with_masks_in_the_rows(tmp_path, columns):
    from cmsmlkit.ml.dataset import InputLayout

    layout = InputLayout(FEATURES, with_masks=True)
    X, valid = feature_matrix(columns, FEATURES)
    standardiser = Standardiser.fit(X, valid, FEATURES)
    config = ModelConfig(type="deepsets", hidden=[8], object_hidden=[8], dropout=0.0)
    torch.manual_seed(2)
    net = build_model(config, layout.n_inputs, 2, layout)
    info = make_info(standardiser, config)
    info["model"]["n_inputs"] = layout.n_inputs
    info["layout"] = layout.to_dict()
    path = save_bundle(tmp_path / "ds", model=net, info=info)
    bundle = Bundle.load(path)
    rows = bundle.rows(columns)
    assert rows.shape == (N_EVENTS, N_INPUTS + L_JETS)
    # the last L columns are the jet mask
    np.testing.assert_array_equal(rows[:, -L_JETS:], columns["objects/Jet/mask"].astype(np.float32))
    session = onnxruntime.InferenceSession(str(path / "model.onnx"))
    (got,) = session.run(None, {"features": rows})
    assert np.abs(got - bundle.predict_proba(columns)).max() <= 1e-5
