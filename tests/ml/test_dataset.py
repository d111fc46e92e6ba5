"""Tests of cmsmlkit/ml/dataset.py: features, standardisation, splits, reading HDF5 inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cmsmlkit.errors import ConfigError, DataError, InputFileError
from cmsmlkit.ml.dataset import (
    FeatureSpec,
    HDF5DataModule,
    InputData,
    InputLayout,
    Standardiser,
    available_features,
    check_finite,
    feature_matrix,
    load_inputs,
    resolve_features,
    split_indices,
)

MAX_LEN = 4


def toy_columns(labels: np.ndarray, seed: int = 0, max_len: int = MAX_LEN) -> dict[str, np.ndarray]:
    """Columns of a separable toy problem: ht, met and a padded Jet collection shift with the label."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    y = labels.astype(np.float32)
    n_jets = rng.integers(0, max_len + 1, size=n)
    mask = np.arange(max_len)[None, :] < n_jets[:, None]
    jet_pt = np.where(mask, 40 + 25 * y[:, None] + rng.exponential(20, (n, max_len)), 0.0)
    jet_eta = np.where(mask, rng.uniform(-2.4, 2.4, (n, max_len)), 0.0)
    return {
        "scalars/ht": (150 + 80 * y + rng.normal(0, 30, n)).astype(np.float32),
        "scalars/met": (40 + 30 * y + rng.normal(0, 15, n)).astype(np.float32),
        "objects/Jet/pt": jet_pt.astype(np.float32),
        "objects/Jet/eta": jet_eta.astype(np.float32),
        "objects/Jet/mask": mask,
    }


def write_h5(
    path: Path,
    labels: np.ndarray,
    class_names: list[str],
    *,
    seed: int = 0,
    columns: dict[str, np.ndarray] | None = None,
    chunk_rows: int | None = None,
    filters: dict | None = None,
) -> Path:
    """A file in the HDF5 contract of DESIGN.md, as HDF5Writer writes it.

    ``chunk_rows`` chunks every dataset by rows (as HDF5Writer does); ``filters`` are
    h5py compression arguments (e.g. hdf5plugin.Blosc2()).
    """
    labels = np.asarray(labels, dtype=np.int64)
    cols = toy_columns(labels, seed) if columns is None else columns
    n = len(labels)

    def create(f, key, data):
        kwargs = {}
        if chunk_rows and n:
            kwargs["chunks"] = (min(chunk_rows, n), *np.shape(data)[1:])
            kwargs.update(filters or {})
        return f.create_dataset(key, data=data, **kwargs)

    with h5py.File(path, "w") as f:
        for key, array in cols.items():
            create(f, key, array)
        create(f, "label", labels).attrs["class_names"] = json.dumps(class_names)
        create(f, "weight", np.full(n, 0.5, dtype=np.float32))
        f.create_dataset(
            "event_id", data=np.stack([np.ones(n), np.ones(n), np.arange(n)], 1).astype(np.int64)
        )
        f.create_dataset("dataset", data=labels)
        f.attrs["cmsmlkit_version"] = "0.1.0"
        f.attrs["config"] = "output: data.h5\nlumi: 1.0\n"
        f.attrs["skim_config"] = ""
        f.attrs["padding"] = json.dumps(
            {
                "Jet": {
                    "max_len": MAX_LEN,
                    "sort_by": "pt",
                    "pad_value": 0.0,
                    "fields": ["pt", "eta"],
                    "n_truncated": 0,
                }
            }
        )
        f.attrs["class_names"] = json.dumps(class_names)
        f.attrs["datasets"] = json.dumps([{"name": c, "label": c} for c in class_names])
        f.attrs["cutflow"] = json.dumps({})
        f.attrs["input_files"] = json.dumps([])
        f.attrs["sumw"] = json.dumps({})
        f.attrs["n_events"] = n
        f.attrs["created"] = "2025-01-01T00:00:00+00:00"
    return path


# --------------------------------------------------------------------------- features


def test_available_features_lists_scalars_then_object_fields():
    cols = toy_columns(np.zeros(3, dtype=np.int64))
    found = available_features(cols)
    assert list(found) == ["ht", "met", "Jet.pt", "Jet.eta"]
    assert found["Jet.pt"] == FeatureSpec("Jet.pt", "objects/Jet/pt", MAX_LEN, "Jet")
    assert found["ht"].length == 1 and found["ht"].collection is None


def test_resolve_features_wildcards_and_order(tmp_path):
    path = write_h5(tmp_path / "a.h5", np.array([0, 1, 0, 1]), ["signal", "background"])
    # h5py lists a group's members alphabetically
    with h5py.File(path, "r") as f:
        assert [s.name for s in resolve_features(["Jet.*"], f)] == ["Jet.eta", "Jet.pt"]
        names = [s.name for s in resolve_features(["met", "*"], f)]
        assert names == ["met", "ht", "Jet.eta", "Jet.pt"]
        assert [s.length for s in resolve_features(["*"], f)] == [1, 1, MAX_LEN, MAX_LEN]


def test_resolve_features_misspelt_name_suggests_the_closest():
    cols = toy_columns(np.zeros(3, dtype=np.int64))
    with pytest.raises(ConfigError) as err:
        resolve_features(["Jet.ptt"], cols, source="data.h5")
    text = str(err.value)
    assert "'Jet.ptt' matches no feature of data.h5" in text
    assert "Did you mean 'Jet.pt'" in text
    assert "Features there: ht, met, Jet.pt, Jet.eta" in text


def test_resolve_features_on_a_file_without_features():
    with pytest.raises(DataError, match="holds no /scalars or /objects"):
        resolve_features(["*"], {"label": np.zeros(3)})


def test_feature_matrix_shapes_and_valid():
    cols = toy_columns(np.array([0, 1, 1, 0, 1]), seed=3)
    feats = resolve_features(["ht", "Jet.pt"], cols)
    X, valid = feature_matrix(cols, feats)
    assert X.shape == (5, 1 + MAX_LEN) and X.dtype == np.float32
    assert valid.shape == X.shape and valid.dtype == bool
    np.testing.assert_array_equal(X[:, 0], cols["scalars/ht"])
    np.testing.assert_array_equal(X[:, 1:], cols["objects/Jet/pt"])
    assert valid[:, 0].all()
    np.testing.assert_array_equal(valid[:, 1:], cols["objects/Jet/mask"])
    X2, _ = feature_matrix(cols, feats, rows=slice(1, 3))
    np.testing.assert_array_equal(X2, X[1:3])


def test_standardiser_uses_real_entries_only_and_zeroes_padding():
    cols = {
        "scalars/ht": np.array([1.0, 3.0], np.float32),
        "objects/Jet/pt": np.array([[10.0, 30.0], [20.0, -999.0]], np.float32),
        "objects/Jet/mask": np.array([[True, True], [True, False]]),
    }
    feats = resolve_features(["*"], cols)
    X, valid = feature_matrix(cols, feats)
    s = Standardiser.fit(X, valid, feats)
    # Jet.pt over the three real jets only: mean 20, std sqrt(200/3); the -999 pad is ignored
    assert s.mean.tolist() == pytest.approx([2.0, 20.0])
    assert s.std.tolist() == pytest.approx([1.0, np.sqrt(200 / 3)])
    out = s.transform(X, valid)
    assert out.dtype == np.float32
    assert out[1, 2] == 0.0
    assert out[:, 0].tolist() == [-1.0, 1.0]
    assert out[0, 1] == pytest.approx(-10 / np.sqrt(200 / 3))
    assert Standardiser.from_dict(s.to_dict()).mean.tolist() == s.mean.tolist()
    assert repr(s) == "Standardiser(2 features, 3 inputs)"


def test_check_finite_names_the_feature():
    cols = toy_columns(np.zeros(6, dtype=np.int64))
    cols["scalars/met"][[1, 4]] = np.nan
    cols["objects/Jet/pt"][:, :] = np.where(
        cols["objects/Jet/mask"], cols["objects/Jet/pt"], np.inf
    )
    feats = resolve_features(["*"], cols)
    X, valid = feature_matrix(cols, feats)
    # infinities in padded slots are no problem; NaN in a real entry is
    with pytest.raises(DataError) as err:
        check_finite(X, valid, feats, source="sig.h5")
    assert str(err.value).startswith("sig.h5 has NaN or infinite values: 'met' in 2 events.")
    assert "drop the feature from train.features" in str(err.value)


# --------------------------------------------------------------------------- splits


def test_split_indices_stratified_disjoint_and_seeded():
    labels = np.array([0] * 700 + [1] * 300)
    parts = split_indices(labels, 0.2, 0.1, seed=5)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [700, 200, 100]
    everything = np.concatenate(list(parts.values()))
    assert len(np.unique(everything)) == 1000
    for key, fraction in (("val", 0.2), ("test", 0.1)):
        assert np.all(np.diff(parts[key]) > 0)
        assert np.bincount(labels[parts[key]]).tolist() == [
            int(700 * fraction),
            int(300 * fraction),
        ]
    again = split_indices(labels, 0.2, 0.1, seed=5)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    other = split_indices(labels, 0.2, 0.1, seed=6)
    assert not np.array_equal(parts["val"], other["val"])


def test_split_indices_too_few_events_of_a_class():
    labels = np.array([0] * 50 + [2] * 2)
    with pytest.raises(DataError) as err:
        split_indices(labels, 0.2, 0.2, seed=1)
    assert str(err.value).startswith("class 2 has only 2 events")
    smallest = split_indices(np.array([0] * 50 + [1] * 3), 0.2, 0.2, seed=1)
    assert [int((np.array([0] * 50 + [1] * 3)[smallest[k]] == 1).sum()) for k in smallest] == [
        1,
        1,
        1,
    ]


# --------------------------------------------------------------------------- load_inputs


def test_load_inputs_two_files_and_glob(tmp_path):
    names = ["signal", "background"]
    a = write_h5(tmp_path / "a.h5", np.array([0] * 30 + [1] * 10), names, seed=1)
    b = write_h5(tmp_path / "b.h5", np.array([1] * 20), names, seed=2)
    data = load_inputs([str(tmp_path / "*.h5")], ["ht", "Jet.*"])
    assert isinstance(data, InputData)
    assert data.X.shape == (60, 1 + 2 * MAX_LEN) and data.valid.shape == (60, 9)
    assert data.class_counts() == {"signal": 30, "background": 30}
    assert data.class_names == names
    assert [f.name for f in data.features] == ["ht", "Jet.eta", "Jet.pt"]
    with h5py.File(b, "r") as f:
        np.testing.assert_array_equal(data.X[40:, 0], f["scalars/ht"][:])
        np.testing.assert_array_equal(data.valid[40:, 1:5], f["objects/Jet/mask"][:])
    assert data.weights.tolist() == [0.5] * 60
    assert data.event_id.shape == (60, 3) and data.event_id[41].tolist() == [1, 1, 1]
    assert data.padding["Jet"]["max_len"] == MAX_LEN
    assert data.skim_config is None
    assert data.convert_config == {"output": "data.h5", "lumi": 1.0}
    inputs = data.provenance["inputs"]
    assert [Path(i["path"]) for i in inputs] == [a.resolve(), b.resolve()]
    assert [i["n_events"] for i in inputs] == [40, 20]
    assert inputs[0]["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()
    assert (
        repr(data)
        == "InputData(60 events, 2 classes ['signal', 'background'], 9 inputs from 2 files)"
    )


def test_load_inputs_class_names_differ(tmp_path):
    a = write_h5(tmp_path / "a.h5", np.array([0, 1] * 5), ["signal", "background"])
    b = write_h5(tmp_path / "b.h5", np.array([0, 1] * 5), ["background", "signal"])
    with pytest.raises(DataError) as err:
        load_inputs([a, b], ["*"])
    text = str(err.value)
    assert f"{a} has classes ['signal', 'background'] but {b} has ['background', 'signal']" in text


def test_load_inputs_single_class(tmp_path):
    a = write_h5(tmp_path / "sig.h5", np.zeros(25, dtype=np.int64), ["signal", "background"])
    with pytest.raises(DataError) as err:
        load_inputs([a], ["*"])
    assert str(err.value) == (
        f"all 25 events of {a} are class 'signal'; the classifier needs at least two classes: "
        "add a dataset with another label to source.datasets."
    )


def test_load_inputs_nan_names_the_feature(tmp_path):
    labels = np.array([0, 1] * 10)
    cols = toy_columns(labels)
    cols["scalars/ht"][3] = np.nan
    a = write_h5(tmp_path / "a.h5", labels, ["s", "b"], columns=cols)
    with pytest.raises(DataError, match=r"has NaN or infinite values: 'ht' in 1 events"):
        load_inputs([a], ["*"])


def test_load_inputs_missing_and_foreign_files(tmp_path):
    with pytest.raises(InputFileError, match=r"input file .*nothere\.h5 does not exist"):
        load_inputs([tmp_path / "nothere.h5"], ["*"])
    with pytest.raises(InputFileError, match=r"the pattern '.*\*\.hdf5' matches no file"):
        load_inputs([str(tmp_path / "*.hdf5")], ["*"])
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(InputFileError, match="not a readable HDF5 file"):
        load_inputs([text], ["*"])
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(InputFileError, match="was not written by cmsmlkit"):
        load_inputs([foreign], ["*"])


def test_load_inputs_feature_missing_in_second_file(tmp_path):
    labels = np.array([0, 1] * 5)
    a = write_h5(tmp_path / "a.h5", labels, ["s", "b"])
    cols = toy_columns(labels)
    del cols["scalars/met"]
    b = write_h5(tmp_path / "b.h5", labels, ["s", "b"], columns=cols)
    with pytest.raises(DataError) as err:
        load_inputs([a, b], ["ht", "met"])
    assert str(err.value).startswith(f"{b} has no feature 'met' (scalars/met) although {a} has it")


# --------------------------------------------------------------------------- the DataModule


def indexed_file(path: Path, n: int = 1000, chunk_rows: int = 64, **kwargs) -> Path:
    """The toy problem plus a scalar 'idx' = event number, chunked by ``chunk_rows`` rows."""
    labels = np.random.default_rng(5).integers(0, 2, n)
    cols = toy_columns(labels, seed=6)
    cols["scalars/idx"] = np.arange(n, dtype=np.float32)
    return write_h5(path, labels, ["s", "b"], columns=cols, chunk_rows=chunk_rows, **kwargs)


def served(dm: HDF5DataModule, loader) -> tuple[np.ndarray, list[int]]:
    """Event numbers of every batch of ``loader`` (undoing the standardisation of 'idx')."""
    col = dm.layout.offsets()["idx"]
    mean, std = dm.standardiser.mean[0], dm.standardiser.std[0]
    events, sizes = [], []
    for x, y, w in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and w.dtype == torch.float32
        events.append(np.rint(x[:, col].double().numpy() * std + mean).astype(int))
        sizes.append(len(y))
    return np.concatenate(events), sizes


def test_datamodule_blocks_serve_what_memory_serves(tmp_path):
    path = indexed_file(tmp_path / "idx.h5")
    kwargs = {"features": ["idx", "ht", "Jet.*"], "batch_size": 32, "seed": 3}
    memory = HDF5DataModule([path], loader="memory", **kwargs)
    blocks = HDF5DataModule([path], loader="blocks", block_buffer=2, **kwargs)
    memory.setup()
    blocks.setup()
    assert (memory.mode, blocks.mode) == ("memory", "blocks")
    assert memory.n_events == blocks.n_events == {"train": 600, "val": 200, "test": 200}
    assert repr(blocks) == (
        "HDF5DataModule(blocks, 1000 events: train 600, val 200, test 200, 2 classes, 10 inputs)"
    )
    # the standardisation of the streaming pass is the in-memory one, training split only
    np.testing.assert_allclose(blocks.standardiser.mean, memory.standardiser.mean, rtol=1e-6)
    np.testing.assert_allclose(blocks.standardiser.std, memory.standardiser.std, rtol=1e-5)
    train_idx = np.flatnonzero(blocks._assign == 0)
    assert memory.standardiser.mean[0] == pytest.approx(train_idx.mean())

    blocks.set_epoch(0)
    first, sizes = served(blocks, blocks.train_dataloader())
    assert sorted(first.tolist()) == train_idx.tolist()  # every training event once
    assert sizes[:-1] == [32] * (len(sizes) - 1) and len(sizes) == len(blocks.train_dataloader())
    # the first batch comes from a buffer of 2 blocks of 64 rows
    assert len(np.unique(first[:32] // 64)) <= 2
    again, _ = served(blocks, blocks.train_dataloader())
    blocks.set_epoch(1)
    other, _ = served(blocks, blocks.train_dataloader())
    assert again.tolist() == first.tolist()  # the same epoch, the same order
    assert other.tolist() != first.tolist() and sorted(other) == sorted(first)
    # validation: file order, the same events as in memory
    val_blocks, _ = served(blocks, blocks.val_dataloader())
    val_memory, _ = served(memory, memory.val_dataloader())
    assert (
        val_blocks.tolist() == val_memory.tolist() == np.flatnonzero(blocks._assign == 1).tolist()
    )
    # memory mode shuffles by epoch too
    memory.set_epoch(0)
    m0, _ = served(memory, memory.train_dataloader())
    assert sorted(m0.tolist()) == train_idx.tolist()
    assert served(memory, memory.train_dataloader())[0].tolist() == m0.tolist()


@pytest.mark.slow
def test_datamodule_blocks_with_two_workers(tmp_path):
    path = indexed_file(tmp_path / "idx.h5")
    dm = HDF5DataModule(
        [path], ["idx", "met"], loader="blocks", num_workers=2, batch_size=50, seed=1
    )
    dm.setup()
    loader = dm.train_dataloader()
    events, sizes = served(dm, loader)
    assert sorted(events.tolist()) == np.flatnonzero(dm._assign == 0).tolist()
    assert len(sizes) == len(loader)


def test_datamodule_reads_blosc2_compressed_files(tmp_path):
    hdf5plugin = pytest.importorskip("hdf5plugin")
    filters = dict(hdf5plugin.Blosc2(cname="zstd", clevel=5))
    path = indexed_file(tmp_path / "blosc.h5", n=300, chunk_rows=50, filters=filters)
    with h5py.File(path, "r") as f:
        # Blosc2's registered HDF5 filter id: a plugin filter, not one h5py knows by name
        assert str(hdf5plugin.BLOSC2_ID) in f["scalars/ht"]._filters
    dm = HDF5DataModule([path], ["idx"], loader="blocks", batch_size=64)
    dm.setup()
    events, _ = served(dm, dm.split_loader("test"))
    assert events.tolist() == np.flatnonzero(dm._assign == 2).tolist()


def test_datamodule_split_by_file(tmp_path):
    files = {}
    for name, seed in (("train", 1), ("val", 2), ("test", 3)):
        labels = np.random.default_rng(seed).integers(0, 2, 100 * seed)
        files[name] = write_h5(tmp_path / f"{name}.h5", labels, ["s", "b"], seed=seed)
    dm = HDF5DataModule(
        [files["train"]], ["ht"], val_inputs=[files["val"]], test_inputs=[files["test"]]
    )
    dm.setup()
    assert dm.n_events == {"train": 100, "val": 200, "test": 300}
    with h5py.File(files["train"]) as f:
        assert dm.standardiser.mean[0] == pytest.approx(float(f["scalars/ht"][:].mean()), rel=1e-6)
    assert [e["n_events"] for e in dm.provenance["inputs"]] == [100, 200, 300]
    with pytest.raises(ConfigError, match="needs both train.val_inputs and train.test_inputs"):
        HDF5DataModule([files["train"]], val_inputs=[files["val"]])


def test_datamodule_nan_is_an_error_or_replaced(tmp_path):
    labels = np.repeat([0, 1], 100)
    cols = toy_columns(labels)
    cols["scalars/met"][[3, 50, 77]] = [np.nan, np.inf, -np.inf]
    cols["objects/Jet/pt"][5, 0] = np.nan
    cols["objects/Jet/mask"][5, 0] = True
    cols["objects/Jet/pt"][6, 3] = np.nan  # a padded slot: not a problem
    cols["objects/Jet/mask"][6, 3] = False
    path = write_h5(tmp_path / "nan.h5", labels, ["s", "b"], columns=cols, chunk_rows=40)
    for loader in ("memory", "blocks"):
        with pytest.raises(DataError, match=r"'met' in 3 events, 'Jet.pt' in 1 events"):
            HDF5DataModule([path], loader=loader).setup()
    dm = HDF5DataModule([path], ["met"], loader="blocks", nan_value=-1.0, batch_size=1000)
    dm.setup()
    finite = np.delete(cols["scalars/met"], [3, 50, 77])
    train = dm._assign == 0
    met = np.where(np.isfinite(cols["scalars/met"]), cols["scalars/met"], -1.0)[train]
    assert dm.standardiser.mean[0] == pytest.approx(met.mean(), rel=1e-5)
    assert np.isfinite(finite).all()
    x, _, _ = next(iter(dm.split_loader("train")))
    assert torch.isfinite(x).all()


def test_datamodule_bad_inputs(tmp_path):
    labels = np.random.default_rng(0).integers(0, 2, 60)
    good = write_h5(tmp_path / "good.h5", labels, ["s", "b"])
    empty = write_h5(tmp_path / "empty.h5", np.zeros(0, int), ["s", "b"])
    with pytest.raises(
        DataError, match=r"the test split is empty \(.*empty.h5 give it no events\)"
    ):
        HDF5DataModule([good], val_inputs=[good], test_inputs=[empty]).setup()
    single = write_h5(tmp_path / "single.h5", np.zeros(50, int), ["s", "b"])
    with pytest.raises(DataError, match=r"all 50 events of the training split of .* are class 's'"):
        HDF5DataModule([single], val_inputs=[good], test_inputs=[good]).setup()
    with h5py.File(tmp_path / "nolabel.h5", "w") as f:
        f.attrs["cmsmlkit_version"] = "0.1.0"
        f["scalars/ht"] = np.ones(3, np.float32)
        f["weight"] = np.ones(3, np.float32)
        f["event_id"] = np.zeros((3, 3), np.int64)
    with pytest.raises(InputFileError, match=r"nolabel.h5: the dataset '/label' is missing"):
        HDF5DataModule([tmp_path / "nolabel.h5"]).setup()
    with pytest.raises(ConfigError, match=r"'Jet.phi' matches no feature .* Did you mean 'Jet.pt'"):
        HDF5DataModule([good], ["ht", "Jet.phi"]).setup()
    with pytest.raises(ConfigError, match="train.loader must be auto, memory or blocks"):
        HDF5DataModule([good], loader="disk")


def test_datamodule_auto_loader_follows_the_memory_limit(tmp_path):
    path = indexed_file(tmp_path / "idx.h5", n=200)
    small = HDF5DataModule([path], memory_limit_gb=1.0)
    tiny = HDF5DataModule([path], memory_limit_gb=1e-6)  # 1 kB: the rows do not fit
    small.setup()
    tiny.setup()
    assert (small.mode, tiny.mode) == ("memory", "blocks")


def test_layout_rows_append_masks(tmp_path):
    labels = np.repeat([0, 1], 10)
    cols = toy_columns(labels)
    feats = resolve_features(["ht", "Jet.pt"], cols)
    X, valid = feature_matrix(cols, feats)
    std = Standardiser.fit(X, valid, feats)
    plain = InputLayout(feats).rows(X, valid, std)
    with_masks = InputLayout(feats, with_masks=True).rows(X, valid, std)
    assert plain.shape == (20, 1 + MAX_LEN) and with_masks.shape == (20, 1 + 2 * MAX_LEN)
    np.testing.assert_array_equal(with_masks[:, : 1 + MAX_LEN], plain)
    np.testing.assert_array_equal(with_masks[:, 1 + MAX_LEN :], cols["objects/Jet/mask"])
    assert repr(InputLayout(feats, with_masks=True)) == (
        "InputLayout(2 features, 9 inputs, masks of ['Jet'])"
    )
