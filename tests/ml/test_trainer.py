"""Tests of cmsmlkit/ml/trainer.py and cmsmlkit/ml/module.py: training on generated HDF5 files.

The toy problem: ``ht`` ~ N(150 + 80 y, 30), ``met`` ~ N(40 + 30 y, 15) and up to four
jets whose pt grows with the class index ``y``. ht alone separates neighbouring
classes with d' = 80/30 = 2.7 and met adds d' = 2, so the best possible AUC between
neighbouring classes is Phi(sqrt(2.7^2 + 2^2) / sqrt(2)) = Phi(2.36) = 0.99. A network
that learned anything in a few epochs lands well above the 0.9 floor the tests ask for;
a broken pipeline (no standardisation, shuffled labels, wrong split) falls below it.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from cmsmlkit.config import TrainConfig
from cmsmlkit.errors import ConfigError, DataError
from cmsmlkit.ml.module import ClassifierModule, auc_score
from cmsmlkit.ml.trainer import Trainer, TrainResult, class_weights

MAX_LEN = 4
NO_TRACKING = {"enabled": False}
METRIC_KEYS = {
    "test_auc",
    "val_auc",
    "test_accuracy",
    "best_epoch",
    "epochs_trained",
    "n_train",
    "n_val",
    "n_test",
    "class_names",
    "seconds",
    "train_auc",
    "stopped_by",
}


def write_h5(
    path: Path, labels: np.ndarray, class_names: list[str], *, seed: int = 0, shift: float = 1.0
) -> Path:
    """A file in the HDF5 contract of DESIGN.md holding the toy problem of this module's docstring."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    y = labels.astype(np.float32) * shift
    n_jets = rng.integers(0, MAX_LEN + 1, size=n)
    mask = np.arange(MAX_LEN)[None, :] < n_jets[:, None]
    with h5py.File(path, "w") as f:
        f["scalars/ht"] = (150 + 80 * y + rng.normal(0, 30, n)).astype(np.float32)
        f["scalars/met"] = (40 + 30 * y + rng.normal(0, 15, n)).astype(np.float32)
        pt = np.where(mask, 40 + 25 * y[:, None] + rng.exponential(20, (n, MAX_LEN)), 0.0)
        f["objects/Jet/pt"] = pt.astype(np.float32)
        f["objects/Jet/eta"] = np.where(mask, rng.uniform(-2.4, 2.4, (n, MAX_LEN)), 0.0).astype(
            np.float32
        )
        f["objects/Jet/mask"] = mask
        f["label"] = labels
        f["label"].attrs["class_names"] = json.dumps(class_names)
        f["weight"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
        f["event_id"] = np.stack([np.ones(n), np.ones(n), np.arange(n)], 1).astype(np.int64)
        f["dataset"] = labels
        f.attrs["cmsmlkit_version"] = "0.1.0"
        f.attrs["config"] = "output: toy.h5\n"
        f.attrs["skim_config"] = "cuts: ['num(Jet) >= 0']\n"
        f.attrs["padding"] = json.dumps(
            {"Jet": {"max_len": MAX_LEN, "sort_by": None, "pad_value": 0.0}}
        )
        f.attrs["class_names"] = json.dumps(class_names)
        f.attrs["datasets"] = json.dumps([{"name": c, "label": c} for c in class_names])
        f.attrs["cutflow"] = json.dumps({})
        f.attrs["input_files"] = json.dumps([])
        f.attrs["n_events"] = n
        f.attrs["created"] = "2025-01-01T00:00:00+00:00"
    return path


@pytest.fixture(scope="module")
def binary_file(tmp_path_factory) -> Path:
    labels = np.random.default_rng(1).integers(0, 2, 3000)
    return write_h5(
        tmp_path_factory.mktemp("bin") / "toy.h5", labels, ["signal", "background"], seed=2
    )


@pytest.fixture(scope="module")
def three_class_file(tmp_path_factory) -> Path:
    labels = np.random.default_rng(3).integers(0, 3, 3000)
    return write_h5(
        tmp_path_factory.mktemp("three") / "toy3.h5", labels, ["ttbar", "wjets", "dy"], seed=4
    )


def quick(path: Path, output: Path, **fields) -> Trainer:
    settings = {"max_epochs": 3, "batch_size": 256, "learning_rate": 3e-3, "tracking": NO_TRACKING}
    settings.update(fields)
    return Trainer(inputs=[str(path)], output=str(output), **settings)


# --------------------------------------------------------------------------- training


def test_binary_training_separates_and_writes_a_bundle(binary_file, tmp_path):
    from cmsmlkit.ml.bundle import Bundle

    result = quick(binary_file, tmp_path / "model").fit()
    m = result.metrics
    assert set(m) == METRIC_KEYS
    assert m["test_auc"] > 0.9 and m["val_auc"] > 0.9
    assert m["test_accuracy"] > 0.8
    assert (m["n_train"], m["n_val"], m["n_test"]) == (1800, 600, 600)
    assert m["class_names"] == ["signal", "background"]
    assert m["epochs_trained"] == 3 and 1 <= m["best_epoch"] <= 3
    assert m["val_auc"] == pytest.approx(max(result.history["val_auc"]))
    assert {k: len(v) for k, v in result.history.items()} == dict.fromkeys(
        ["train_loss", "val_loss", "val_auc", "lr"], 3
    )
    assert result.history["train_loss"][-1] < result.history["train_loss"][0]
    assert result.bundle_path == tmp_path / "model"
    assert (
        repr(result)
        == f"TrainResult(test AUC = {m['test_auc']:.3f}, epochs = 3, bundle = '{tmp_path / 'model'}')"
    )

    bundle = Bundle.load(result.bundle_path)
    assert bundle.class_names == ["signal", "background"]
    assert [f.name for f in bundle.features] == ["ht", "met", "Jet.eta", "Jet.pt"]
    assert bundle.metrics["test_auc"] == pytest.approx(m["test_auc"])
    assert bundle.skim_config == {"cuts": ["num(Jet) >= 0"]}
    assert bundle.padding["Jet"]["max_len"] == MAX_LEN
    info = json.loads((result.bundle_path / "bundle.json").read_text())
    assert info["provenance"]["inputs"][0]["n_events"] == 3000
    assert info["train"]["max_epochs"] == 3
    assert info["history"]["val_auc"] == pytest.approx(result.history["val_auc"])
    assert sorted(p.name for p in (result.bundle_path / "figures").glob("*.png")) == [
        "confusion.png",
        "loss.png",
        "overtraining.png",
        "roc.png",
        "scores.png",
    ]
    # the bundle's own preprocessing reproduces the trained separation on the whole file
    with h5py.File(binary_file, "r") as f:
        proba = bundle.predict_proba(f)
        labels = f["label"][:]
    assert proba.shape == (3000, 2)
    assert auc_score(labels, proba) > 0.9


def test_three_classes_with_event_weights(three_class_file, tmp_path):
    result = quick(three_class_file, tmp_path / "m3", event_weights=True).fit(write_bundle=False)
    m = result.metrics
    assert set(m) == METRIC_KEYS | {"test_auc_ttbar", "test_auc_wjets", "test_auc_dy"}
    assert m["test_auc"] > 0.9
    # the middle class overlaps both neighbours, the outer ones only one
    assert m["test_auc_ttbar"] > 0.9 and m["test_auc_dy"] > 0.9 and m["test_auc_wjets"] > 0.8
    assert m["test_auc"] == pytest.approx(
        np.mean([m[f"test_auc_{c}"] for c in ("ttbar", "wjets", "dy")]), abs=0.01
    )


def test_early_stopping_stops_when_val_auc_plateaus(tmp_path):
    # ht alone separates the classes completely: val AUC is 1.0 after the first epoch and
    # can never improve, so training stops after 1 + patience epochs
    labels = np.repeat([0, 1], 500)
    path = write_h5(tmp_path / "easy.h5", labels, ["s", "b"], shift=20.0)
    result = quick(path, tmp_path / "m", features=["ht"], max_epochs=30, patience=2).fit(
        write_bundle=False
    )
    assert result.history["val_auc"] == [1.0, 1.0, 1.0]
    assert result.metrics["epochs_trained"] == 3
    assert result.metrics["best_epoch"] == 1
    assert result.metrics["test_auc"] == 1.0


def test_same_seed_same_result_other_seed_other_result(binary_file, tmp_path):
    def run(seed: int) -> TrainResult:
        return quick(binary_file, tmp_path / "m", max_epochs=2, seed=seed).fit(write_bundle=False)

    first, again, other = run(7), run(7), run(8)
    assert first.history == again.history
    assert {k: v for k, v in first.metrics.items() if k != "seconds"} == {
        k: v for k, v in again.metrics.items() if k != "seconds"
    }
    assert first.history["train_loss"] != other.history["train_loss"]


def test_write_bundle_false_writes_nothing(binary_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = quick(binary_file, Path("model"), max_epochs=1).fit(write_bundle=False)
    assert result.bundle_path is None
    assert list(tmp_path.iterdir()) == []
    assert repr(result).endswith("epochs = 1, bundle = None)")


def test_user_callback_exception_propagates_unchanged(binary_file, tmp_path):
    class Stop(Exception):
        pass

    class Pruner(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            raise Stop(f"pruned at epoch {trainer.current_epoch}")

    with pytest.raises(Stop, match="pruned at epoch 0"):
        quick(binary_file, tmp_path / "model").fit(callbacks=[Pruner()])
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_tracking_logs_params_metrics_and_bundle(binary_file, tmp_path):
    import mlflow

    output = tmp_path / "runs" / "model"
    result = quick(binary_file, output, max_epochs=2, tracking={"experiment": "toy"}).fit()
    uri = f"sqlite:///{tmp_path / 'runs'}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("toy")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == result.run_id
    assert run.info.run_name == "model"
    assert run.data.params["learning_rate"] == "0.003"
    assert run.data.params["model.hidden"] == "64, 64"
    assert run.data.params["class_names"] == "signal, background"
    assert run.data.metrics["test_auc"] == pytest.approx(result.metrics["test_auc"])
    per_epoch = client.get_metric_history(run.info.run_id, "val_auc")
    assert len(per_epoch) >= 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "bundle")}
    assert "bundle/bundle.json" in artifacts and "bundle/model.onnx" in artifacts
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert "figures/roc.png" in figures


# --------------------------------------------------------------------------- configuration errors


def test_constructor_validates_and_opens_nothing(tmp_path):
    trainer = Trainer(
        inputs=[str(tmp_path / "missing.h5")], model={"hidden": [32, 16]}, max_epochs=5
    )
    assert repr(trainer) == (
        f"Trainer(inputs=['{tmp_path / 'missing.h5'}'], features=['*'], model=mlp[32, 16], "
        "max_epochs=5, output='model')"
    )
    assert Trainer(TrainConfig(inputs=["a.h5"]), max_epochs=2).config.max_epochs == 2
    with pytest.raises(ConfigError, match="Did you mean 'max_epochs'"):
        Trainer(inputs=["a.h5"], max_epoch=3)
    with pytest.raises(ConfigError, match="train.inputs is empty"):
        Trainer()
    with pytest.raises(ConfigError, match=r"must all be positive numbers, got \[1.0, -2.0\]"):
        Trainer(inputs=["a.h5"], class_weights=[1.0, -2.0])


def test_class_weights_of_wrong_length(binary_file, tmp_path):
    with pytest.raises(ConfigError) as err:
        quick(binary_file, tmp_path / "m", class_weights=[1.0, 2.0, 3.0]).fit()
    assert str(err.value).startswith(
        "train.class_weights has 3 entries but the data have 2 classes"
    )


def test_unknown_or_unavailable_accelerator_is_a_config_error(binary_file, tmp_path):
    with pytest.raises(ConfigError, match="unknown accelerator 'gpus'. Did you mean 'gpu'"):
        Trainer(inputs=["a.h5"], accelerator="gpus")
    # no TPU (torch_xla) on the test machines
    with pytest.raises(
        ConfigError, match="train.accelerator = 'tpu' cannot be used on this machine"
    ):
        quick(binary_file, tmp_path / "m", accelerator="tpu").fit()


def test_class_weight_settings():
    labels = np.array([0, 0, 0, 1])
    assert class_weights(labels, 2, "balanced") == pytest.approx([4 / 6, 2.0])
    assert class_weights(labels, 2, "none") == [1.0, 1.0]
    assert class_weights(labels, 2, [0.5, 3]) == [0.5, 3.0]
    # with event weights the sums of weights balance: class 0 weighs 3, class 1 weighs 1
    assert class_weights(labels, 2, "balanced", np.array([1.0, 1.0, 1.0, 1.0])) == pytest.approx(
        [4 / 6, 2.0]
    )
    assert class_weights(labels, 2, "balanced", np.array([0.5, 0.5, 1.0, 6.0])) == pytest.approx(
        [2.0, 2 / 3]
    )
    with pytest.raises(DataError, match=r"no events \(or zero total weight\) of class\(es\) \[2\]"):
        class_weights(labels, 3, "balanced")


# --------------------------------------------------------------------------- the LightningModule


def test_module_hyperparameters_and_forward():
    module = ClassifierModule(
        {"hidden": [8, 4], "activation": "tanh"}, n_inputs=5, n_classes=3, learning_rate=0.01
    )
    assert module.hparams.n_inputs == 5 and module.hparams.learning_rate == 0.01
    assert module.hparams.model_config == {"hidden": [8, 4], "activation": "tanh"}
    assert module(torch.zeros(7, 5)).shape == (7, 3)
    assert module.probabilities(torch.zeros(7, 5)).sum(dim=1).tolist() == pytest.approx([1.0] * 7)
    optimiser = module.configure_optimizers()
    assert isinstance(optimiser, torch.optim.AdamW) and optimiser.defaults["lr"] == 0.01
    with pytest.raises(ConfigError, match="class_weights has 1 entries for 3 classes"):
        ClassifierModule({}, n_inputs=5, n_classes=3, class_weights=[1.0])


def test_module_loss_is_the_weighted_mean_of_event_losses():
    torch.manual_seed(0)
    # binary: one logit and binary cross entropy
    module = ClassifierModule(
        {"hidden": [4], "dropout": 0.0}, n_inputs=2, n_classes=2, class_weights=[1.0, 3.0]
    )
    x = torch.randn(4, 2)
    y = torch.tensor([0, 1, 1, 0])
    w = torch.tensor([1.0, 2.0, 0.5, 1.0])
    logits = module(x)
    assert logits.shape == (4, 1)
    per_event = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, 0], y.float(), reduction="none"
    )
    total = torch.tensor([1.0, 6.0, 1.5, 1.0])  # class weight x event weight
    expected = (total * per_event).sum() / total.sum()
    assert module._loss(logits, y, w).item() == pytest.approx(expected.item(), rel=1e-6)
    proba = module.probabilities(x)
    assert torch.allclose(proba[:, 1], torch.sigmoid(logits[:, 0]))
    assert torch.allclose(proba.sum(dim=1), torch.ones(4))
    # three classes: one logit per class and cross entropy
    module3 = ClassifierModule({"hidden": [4]}, n_inputs=2, n_classes=3, class_weights=[1, 2, 3])
    y3 = torch.tensor([0, 1, 2, 2])
    logits3 = module3(x)
    per_event3 = torch.nn.functional.cross_entropy(logits3, y3, reduction="none")
    total3 = torch.tensor([1.0, 4.0, 1.5, 3.0])
    expected3 = (total3 * per_event3).sum() / total3.sum()
    assert module3._loss(logits3, y3, w).item() == pytest.approx(expected3.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("optimizer", "scheduler", "opt_class", "sched_class"),
    [
        ("adam", "cosine", torch.optim.Adam, torch.optim.lr_scheduler.CosineAnnealingLR),
        ("sgd", "plateau", torch.optim.SGD, torch.optim.lr_scheduler.ReduceLROnPlateau),
        ("adamw", "onecycle", torch.optim.AdamW, torch.optim.lr_scheduler.OneCycleLR),
    ],
)
def test_module_optimisers_and_schedules(optimizer, scheduler, opt_class, sched_class):
    from types import SimpleNamespace

    module = ClassifierModule(
        {"hidden": [4]}, n_inputs=3, n_classes=2, optimizer=optimizer, scheduler=scheduler
    )
    # what configure_optimizers reads of the Lightning trainer
    module._trainer = SimpleNamespace(max_epochs=7, estimated_stepping_batches=70)
    out = module.configure_optimizers()
    assert isinstance(out["optimizer"], opt_class)
    sched = out["lr_scheduler"]["scheduler"]
    assert isinstance(sched, sched_class)
    if scheduler == "cosine":
        assert sched.T_max == 7 and out["lr_scheduler"]["interval"] == "epoch"
    if scheduler == "onecycle":
        assert sched.total_steps == 70 and out["lr_scheduler"]["interval"] == "step"
    if scheduler == "plateau":
        assert out["lr_scheduler"]["monitor"] == "val_loss"
        assert out["optimizer"].defaults["momentum"] == 0.9
    with pytest.raises(ConfigError, match="train.scheduler must be one of"):
        ClassifierModule({}, n_inputs=3, n_classes=2, scheduler="step")


def test_auc_score_binary_and_multiclass():
    y = np.array([0, 0, 1, 1])
    assert auc_score(y, np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])) == 0.75
    assert auc_score(np.zeros(3, int), np.full((3, 2), 0.5)) == 0.5
    y3 = np.array([0, 1, 2, 0, 1, 2])
    perfect = np.eye(3)[y3] * 0.8 + 0.2 / 3
    assert auc_score(y3, perfect) == 1.0


# --------------------------------------------------------------------------- models, loaders, control


def test_deepsets_trains_and_its_bundle_predicts_the_same(binary_file, tmp_path):
    from cmsmlkit.ml.bundle import Bundle

    result = quick(
        binary_file,
        tmp_path / "ds",
        model={"type": "deepsets", "hidden": [32], "object_hidden": [16, 16]},
        optimizer="adam",
        scheduler="cosine",
    ).fit()
    assert result.metrics["test_auc"] > 0.9
    # the cosine schedule lowered the learning rate epoch by epoch
    lr = result.history["lr"]
    assert lr[0] > lr[1] > lr[2]
    bundle = Bundle.load(result.bundle_path)
    info = json.loads((result.bundle_path / "bundle.json").read_text())
    assert info["model"]["type"] == "deepsets" and info["layout"]["masks"] == [["Jet", MAX_LEN]]
    assert bundle.n_inputs == 2 + 2 * MAX_LEN + MAX_LEN  # ht, met, Jet.eta, Jet.pt, Jet mask
    with h5py.File(binary_file, "r") as f:
        proba = bundle.predict_proba(f)
        labels = f["label"][:]
    assert auc_score(labels, proba) > 0.9


def test_custom_module_by_import_path(binary_file, tmp_path, monkeypatch):
    (tmp_path / "usernet.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, n_inputs, n_outputs, width=8):\n"
        "        super().__init__()\n"
        "        self.body = torch.nn.Sequential(torch.nn.Linear(n_inputs, width), torch.nn.ReLU(),\n"
        "                                        torch.nn.Linear(width, n_outputs))\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = quick(
        binary_file,
        tmp_path / "custom",
        model={"type": "custom", "import_path": "usernet:Net", "kwargs": {"width": 12}},
    ).fit()
    assert result.metrics["test_auc"] > 0.9
    state = torch.load(result.bundle_path / "model.pt", weights_only=True)
    assert state["body.0.weight"].shape == (12, 2 + 2 * MAX_LEN + MAX_LEN)
    with pytest.raises(ConfigError, match="cannot import 'nowhere'"):
        Trainer(inputs=["a.h5"], model={"type": "custom", "import_path": "nowhere:Net"})


def test_blocks_loader_trains_like_memory(tmp_path):
    labels = np.random.default_rng(1).integers(0, 2, 3000)
    path = write_h5(tmp_path / "toy.h5", labels, ["s", "b"], seed=2)
    # rewrite it chunked by 256 rows so that the loader streams 12 blocks
    chunked = tmp_path / "chunked.h5"
    with h5py.File(path, "r") as src, h5py.File(chunked, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value

        def copy(name, obj):
            if isinstance(obj, h5py.Dataset):
                ds = dst.create_dataset(name, data=obj[:], chunks=(256, *obj.shape[1:]))
                for k, v in obj.attrs.items():
                    ds.attrs[k] = v

        src.visititems(copy)
    result = quick(chunked, tmp_path / "m", loader="blocks", block_buffer=3).fit(write_bundle=False)
    assert result.metrics["test_auc"] > 0.9
    assert (result.metrics["n_train"], result.metrics["n_test"]) == (1800, 600)


def test_target_ends_training(binary_file, tmp_path):
    result = quick(binary_file, tmp_path / "m", max_epochs=20, target=0.6).fit(write_bundle=False)
    assert result.metrics["epochs_trained"] == 1
    assert result.metrics["stopped_by"] == "target"
    full = quick(binary_file, tmp_path / "m", max_epochs=2).fit(write_bundle=False)
    assert full.metrics["stopped_by"] == "max_epochs"


def test_gradient_clipping_and_monitor_reach_lightning(binary_file, tmp_path):
    seen = {}

    class Spy(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["clip"] = (trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
            seen["precision"] = trainer.precision
            seen["device"] = pl_module.device.type
            stops = [c for c in trainer.callbacks if type(c).__name__ == "EarlyStopping"]
            seen["monitor"] = (stops[0].monitor, stops[0].mode)

    quick(binary_file, tmp_path / "m", max_epochs=1, gradient_clip=0.5, monitor="val_loss").fit(
        callbacks=[Spy()], write_bundle=False
    )
    assert seen["clip"] == (0.5, "norm")
    assert seen["monitor"] == ("val_loss", "min")
    if not torch.cuda.is_available():
        # CPU by default: full precision, no GPU needed
        assert (seen["precision"], seen["device"]) == ("32-true", "cpu")


class Interrupt(Exception):
    """What an interrupted session looks like to fit(): an exception between two epochs."""


class InterruptAt(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise Interrupt(f"interrupted before epoch {self.epoch + 1}")


class CountEpochs(pl.Callback):
    def __init__(self) -> None:
        self.started: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.started.append(trainer.current_epoch)


@pytest.mark.slow
def test_interrupted_training_resumes_from_the_last_checkpoint(binary_file, tmp_path):
    output = tmp_path / "model"
    trainer = quick(binary_file, output, max_epochs=4, patience=10)
    with pytest.raises(Interrupt, match="before epoch 3"):
        trainer.fit(callbacks=[InterruptAt(2)])
    checkpoints = tmp_path / "model.checkpoints"
    assert (checkpoints / "last.ckpt").is_file() and not output.exists()

    counter = CountEpochs()
    resumed = quick(binary_file, output, max_epochs=4, patience=10).fit(callbacks=[counter])
    assert counter.started == [2, 3]  # epochs 1 and 2 were not trained again
    assert resumed.metrics["epochs_trained"] == 4
    assert {len(v) for v in resumed.history.values()} == {4}
    assert not checkpoints.exists()  # done: nothing left to resume
    # the same as an uninterrupted training of the same config and seed
    straight = quick(binary_file, tmp_path / "straight", max_epochs=4, patience=10).fit()
    assert straight.history["train_loss"] == pytest.approx(resumed.history["train_loss"], rel=1e-5)
    assert straight.metrics["test_auc"] == pytest.approx(resumed.metrics["test_auc"], rel=1e-5)


def test_checkpoints_of_another_config_are_not_resumed(binary_file, tmp_path, caplog):
    output = tmp_path / "model"
    with pytest.raises(Interrupt):
        quick(binary_file, output, max_epochs=3).fit(callbacks=[InterruptAt(1)])
    counter = CountEpochs()
    with caplog.at_level("WARNING", logger="cmsmlkit.ml.trainer"):
        quick(binary_file, output, max_epochs=2, learning_rate=1e-2).fit(
            callbacks=[counter], write_bundle=True
        )
    assert counter.started == [0, 1]
    assert "checkpoints of another configuration" in caplog.text


@pytest.mark.parametrize(
    ("labels", "fields", "error", "message"),
    [
        (
            np.zeros(200, int),
            {},
            DataError,
            "are class 'signal'; the classifier needs at least two",
        ),
        (
            None,
            {"features": ["ht", "Jet.ptt"]},
            ConfigError,
            r"'Jet.ptt' matches no feature .* Did you mean 'Jet.pt'",
        ),
        (None, {"test_fraction": 0.0001, "val_fraction": 0.5}, None, None),
    ],
)
def test_bad_input_fails_before_any_training(tmp_path, labels, fields, error, message):
    labels = np.repeat([0, 1], 100) if labels is None else labels
    path = write_h5(tmp_path / "in.h5", labels, ["signal", "background"])
    if error is None:
        # a tiny test fraction still puts one event of each class in the test split
        result = quick(path, tmp_path / "m", max_epochs=1, **fields).fit(write_bundle=False)
        assert result.metrics["n_test"] == 2
        return
    started = CountEpochs()
    with pytest.raises(error, match=message):
        quick(path, tmp_path / "m", **fields).fit(callbacks=[started])
    assert started.started == []
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.checkpoints").exists()


def test_empty_split_and_missing_label_fail_before_training(tmp_path):
    from cmsmlkit.errors import InputFileError

    good = write_h5(tmp_path / "good.h5", np.repeat([0, 1], 50), ["s", "b"])
    empty = write_h5(tmp_path / "empty.h5", np.zeros(0, int), ["s", "b"])
    with pytest.raises(DataError, match="the val split is empty"):
        quick(good, tmp_path / "m", val_inputs=[str(empty)], test_inputs=[str(good)]).fit()
    with h5py.File(tmp_path / "nolabel.h5", "w") as f:
        f.attrs["cmsmlkit_version"] = "0.1.0"
        f["scalars/ht"] = np.ones(3, np.float32)
        f["weight"] = np.ones(3, np.float32)
        f["event_id"] = np.zeros((3, 3), np.int64)
    with pytest.raises(InputFileError, match="the dataset '/label' is missing"):
        quick(tmp_path / "nolabel.h5", tmp_path / "m").fit()
    assert not (tmp_path / "m.checkpoints").exists()


def test_nan_value_lets_training_run(tmp_path):
    labels = np.repeat([0, 1], 300)
    path = write_h5(tmp_path / "nan.h5", labels, ["s", "b"])
    with h5py.File(path, "r+") as f:
        met = f["scalars/met"][:]
        met[::10] = np.nan
        f["scalars/met"][:] = met
    with pytest.raises(
        DataError, match=r"'met' in 60 events.*set train.nan_value|'met' in 60 events"
    ):
        quick(path, tmp_path / "m").fit()
    result = quick(path, tmp_path / "m", nan_value=0.0, max_epochs=2).fit(write_bundle=False)
    assert result.metrics["test_auc"] > 0.9


# --------------------------------------------------------------------------- MLflow server

from mlflow_server import mlflow_server  # noqa: E402,F401


@pytest.mark.slow
def test_tracking_to_a_real_mlflow_server(binary_file, tmp_path, mlflow_server):  # noqa: F811
    import mlflow

    result = quick(
        binary_file,
        tmp_path / "model",
        max_epochs=2,
        tracking={"uri": mlflow_server.uri, "experiment": "served"},
    ).fit()
    client = mlflow.MlflowClient(mlflow_server.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer"] == "adamw"
    assert run.data.metrics["test_auc"] == pytest.approx(result.metrics["test_auc"])
    per_epoch = client.get_metric_history(result.run_id, "val_auc")
    assert [m.value for m in per_epoch] == pytest.approx(result.history["val_auc"])
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "bundle")}
    assert {"bundle/bundle.json", "bundle/model.onnx", "bundle/model.ts"} <= artifacts
    # the artifacts went through the server into its store, not into the working directory
    stored = list((mlflow_server.directory / "artifacts").rglob("bundle.json"))
    assert len(stored) == 1
    assert not (tmp_path / "mlflow.db").exists()
