"""Tests of cmsmlkit.data.hdf5: the HDF5 file contract, columns(), read_info()."""

from __future__ import annotations

import types
from pathlib import Path

import awkward as ak
import h5py
import numpy as np
import pytest

import cmsmlkit
from cmsmlkit.config import ConvertConfig, SkimConfig
from cmsmlkit.data import hdf5
from cmsmlkit.data.hdf5 import HDF5Writer, columns, read_info
from cmsmlkit.data.pad import choose_max_len
from cmsmlkit.errors import ConfigError, DataError, InputFileError

DATASETS = {
    # name: (n events, label, is_mc, xsec, sumw, seed)
    "ttbar": (60, "signal", True, 800.0, 120.0, 1),
    "dy": (40, "background", True, 6000.0, 25.0, 2),
    "data": (30, "background", False, None, None, 3),
}


def make_events(n: int, seed: int, is_mc: bool = True, run: int = 1) -> ak.Array:
    """A skimmed dataset: jagged GoodJet(pt, eta), scalar ht, event ids and genWeight."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 7, n)
    total = int(counts.sum())
    pt = ak.unflatten(rng.exponential(40.0, total).astype(np.float32) + 20, counts)
    eta = ak.unflatten(rng.uniform(-2.4, 2.4, total).astype(np.float32), counts)
    genweight = rng.normal(1.0, 0.2, n) if is_mc else np.ones(n)
    return ak.zip(
        {
            "GoodJet": ak.zip({"pt": pt, "eta": eta}),
            "ht": ak.sum(pt, axis=1),
            "run": np.full(n, run, dtype=np.int64),
            "luminosityBlock": np.arange(n, dtype=np.int64) // 10 + 1,
            "event": np.arange(n, dtype=np.int64) + 1000 * seed,
            "genWeight": genweight,
        },
        depth_limit=1,
    )


def make_skim(datasets=DATASETS) -> types.SimpleNamespace:
    arrays, metadata, cutflow = {}, {}, {}
    for name, (n, label, is_mc, xsec, sumw, seed) in datasets.items():
        arrays[name] = make_events(n, seed, is_mc)
        metadata[name] = {
            "dataset": name,
            "label": label,
            "is_mc": is_mc,
            "xsec": xsec,
            "sumw": sumw if sumw is not None else float(n),
            "files": [f"/store/{name}_{i}.root" for i in range(2)],
        }
        cutflow[name] = {"all": {"events": 2 * n, "sumw": sumw}, "num(GoodJet) >= 0": {"events": n}}
    return types.SimpleNamespace(
        arrays=arrays, metadata=metadata, cutflow=cutflow, class_names=["signal", "background"]
    )


def read_all(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return out


@pytest.fixture
def skim():
    return make_skim()


def test_file_layout_dtypes_shapes_and_values(tmp_path, skim):
    path = HDF5Writer(output=str(tmp_path / "out" / "data.h5"), shuffle=False).write(skim)
    assert path == tmp_path / "out" / "data.h5"
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.h5"]
    cols = read_all(path)
    n = 60 + 40 + 30
    counts = np.concatenate([ak.to_numpy(ak.num(skim.arrays[d].GoodJet)) for d in DATASETS])
    max_len = int(np.quantile(counts, 0.95, method="inverted_cdf"))
    expected = {
        "scalars/ht": ((n,), np.float32),
        "objects/GoodJet/pt": ((n, max_len), np.float32),
        "objects/GoodJet/eta": ((n, max_len), np.float32),
        "objects/GoodJet/mask": ((n, max_len), np.bool_),
        "label": ((n,), np.int64),
        "weight": ((n,), np.float32),
        "event_id": ((n, 3), np.int64),
        "dataset": ((n,), np.int64),
    }
    assert set(cols) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert cols[key].shape == shape, key
        assert cols[key].dtype == dtype, key
    mask = cols["objects/GoodJet/mask"]
    np.testing.assert_array_equal(mask.sum(axis=1), np.minimum(counts, max_len))
    # real slots first, in descending pt; padded slots hold 0
    pt = cols["objects/GoodJet/pt"]
    assert np.all(pt[~mask] == 0) and np.all(pt[mask] >= 20)
    assert np.all((pt[:, :-1] >= pt[:, 1:])[mask[:, 1:]])
    assert np.all(mask[:, :-1] >= mask[:, 1:])  # no hole before a real object
    # leading jet pt equals the per-event maximum
    has = counts > 0
    allpt = ak.concatenate([skim.arrays[d].GoodJet.pt for d in DATASETS])
    np.testing.assert_allclose(pt[has, 0], ak.to_numpy(ak.max(allpt, axis=1))[has])
    np.testing.assert_allclose(cols["scalars/ht"], ak.to_numpy(ak.sum(allpt, axis=1)), rtol=1e-6)
    np.testing.assert_array_equal(cols["label"], [0] * 60 + [1] * 70)
    np.testing.assert_array_equal(cols["dataset"], [0] * 60 + [1] * 40 + [2] * 30)
    np.testing.assert_array_equal(cols["event_id"][:60, 0], np.ones(60))
    np.testing.assert_array_equal(
        cols["event_id"][60:, 2], np.r_[np.arange(40) + 2000, np.arange(30) + 3000]
    )
    np.testing.assert_array_equal(cols["event_id"][:12, 1], [1] * 10 + [2] * 2)
    with h5py.File(path) as f:
        assert list(f["label"].attrs["class_names"]) == ["signal", "background"]
        assert "32026" in f["objects/GoodJet/pt"]._filters  # blosc2 (hdf5plugin), the default
        assert f["objects/GoodJet/pt"].chunks == (n, max_len)
        assert f["weight"].chunks == (n,)


def test_weights_are_normalised_to_xsec_times_lumi(tmp_path, skim):
    path = HDF5Writer(output=str(tmp_path / "w.h5"), lumi=2.5, shuffle=False).write(skim)
    weight = read_all(path)["weight"]
    gw = {d: ak.to_numpy(skim.arrays[d].genWeight) for d in DATASETS}
    np.testing.assert_allclose(weight[:60], gw["ttbar"] * 800.0 * 2.5 / 120.0, rtol=1e-6)
    np.testing.assert_allclose(weight[60:100], gw["dy"] * 6000.0 * 2.5 / 25.0, rtol=1e-6)
    np.testing.assert_array_equal(weight[100:], np.ones(30, np.float32))  # collision data
    # summed weight of a dataset = xsec * lumi * (sum of selected genWeight / sumw)
    assert weight[:60].sum() == pytest.approx(800.0 * 2.5 * gw["ttbar"].sum() / 120.0, rel=1e-5)


def test_mc_without_xsec_keeps_genweight_and_missing_sumw_is_an_error(tmp_path, skim):
    skim.metadata["dy"]["xsec"] = None
    path = HDF5Writer(output=str(tmp_path / "w.h5"), shuffle=False).write(skim)
    np.testing.assert_allclose(
        read_all(path)["weight"][60:100], ak.to_numpy(skim.arrays["dy"].genWeight), rtol=1e-6
    )
    del skim.metadata["ttbar"]["sumw"]
    with pytest.raises(DataError, match="dataset 'ttbar' has a cross-section but no 'sumw'"):
        HDF5Writer(output=str(tmp_path / "x.h5")).write(skim)
    skim.metadata["ttbar"]["sumw"] = 0.0
    with pytest.raises(DataError, match="dataset 'ttbar': the sum of genWeight before cuts is 0.0"):
        HDF5Writer(output=str(tmp_path / "x.h5")).write(skim)
    assert not (tmp_path / "x.h5").exists()


def test_root_attrs_decoded_by_read_info(tmp_path, skim):
    skim_cfg = SkimConfig(collections={"GoodJet": ["pt", "eta"]})
    path = HDF5Writer(
        output=str(tmp_path / "d.h5"), collections={"GoodJet": {"max_len": 4, "pad_value": -1}}
    ).write(skim, skim_config=skim_cfg)
    info = read_info(path)
    assert info["file"] == str(path)
    assert info["cmsmlkit_version"] == cmsmlkit.__version__
    assert info["n_events"] == 130
    assert info["class_names"] == ["signal", "background"]
    assert info["padding"]["GoodJet"]["max_len"] == 4
    assert info["padding"]["GoodJet"]["sort_by"] == "pt"
    assert info["padding"]["GoodJet"]["pad_value"] == -1.0
    assert info["padding"]["GoodJet"]["fields"] == ["pt", "eta"]
    counts = np.concatenate([ak.to_numpy(ak.num(skim.arrays[d].GoodJet)) for d in DATASETS])
    assert info["padding"]["GoodJet"]["n_truncated"] == int(np.sum(counts > 4))
    assert info["config"]["collections"]["GoodJet"]["max_len"] == 4
    assert info["config"]["compression"] == "blosc2-lz4"  # the full config, defaults included
    assert ConvertConfig.model_validate(info["config"]).collections["GoodJet"].pad_value == -1.0
    assert info["skim_config"]["collections"] == {"GoodJet": ["pt", "eta"]}
    assert info["input_files"][:3] == [
        "/store/ttbar_0.root",
        "/store/ttbar_1.root",
        "/store/dy_0.root",
    ]
    assert len(info["input_files"]) == 6
    assert info["cutflow"]["dy"]["all"] == {"events": 80, "sumw": 25.0}
    assert info["sumw"] == {"ttbar": 120.0, "dy": 25.0, "data": 30.0}
    assert info["datasets"] == [
        {"name": "ttbar", "label": "signal", "n_events": 60, "xsec": 800.0, "is_mc": True},
        {"name": "dy", "label": "background", "n_events": 40, "xsec": 6000.0, "is_mc": True},
        {"name": "data", "label": "background", "n_events": 30, "xsec": None, "is_mc": False},
    ]
    assert info["created"].endswith("+00:00")
    assert info["paths"]["objects/GoodJet/mask"] == ((130, 4), "bool")
    assert info["paths"]["event_id"] == ((130, 3), "int64")
    assert set(info["paths"]) == {
        "scalars/ht", "objects/GoodJet/pt", "objects/GoodJet/eta", "objects/GoodJet/mask",
        "label", "weight", "event_id", "dataset",
    }  # fmt: skip
    with h5py.File(path) as f:
        pt, mask = f["objects/GoodJet/pt"][()], f["objects/GoodJet/mask"][()]
    assert np.all(pt[~mask] == -1.0)
    assert read_info(path)["skim_config"] is not None
    plain = HDF5Writer(output=str(tmp_path / "plain.h5")).write(skim)
    assert read_info(plain)["skim_config"] is None


def test_shuffle_is_reproducible_and_mixes_datasets(tmp_path, skim):
    a = read_all(HDF5Writer(output=str(tmp_path / "a.h5"), seed=3).write(skim))
    b = read_all(HDF5Writer(output=str(tmp_path / "b.h5"), seed=3).write(skim))
    c = read_all(HDF5Writer(output=str(tmp_path / "c.h5"), seed=4).write(skim))
    ordered = read_all(HDF5Writer(output=str(tmp_path / "o.h5"), shuffle=False).write(skim))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["dataset"], c["dataset"])
    # the first 30 rows hold events of every dataset
    assert set(a["dataset"][:30].tolist()) == {0, 1, 2}
    assert np.all(np.diff(ordered["dataset"]) >= 0)
    # the same rows, permuted together: sort both by (dataset, event) and compare
    for cols in (a, ordered):
        order = np.lexsort((cols["event_id"][:, 2], cols["dataset"]))
        for key in cols:
            cols[key] = cols[key][order]
    for key in a:
        np.testing.assert_array_equal(a[key], ordered[key])


def test_max_len_chosen_once_over_all_datasets(tmp_path):
    skim = make_skim()
    # one dataset with many jets: L follows the union, with quantile 1 the overall maximum
    skim.arrays["dy"] = ak.zip(
        {**{k: skim.arrays["dy"][k] for k in ak.fields(skim.arrays["dy"]) if k != "GoodJet"},
         "GoodJet": ak.zip({"pt": ak.Array([[50.0] * 11] + [[]] * 39), "eta": ak.Array([[0.0] * 11] + [[]] * 39)})},
        depth_limit=1,
    )  # fmt: skip
    path = HDF5Writer(
        output=str(tmp_path / "q.h5"), collections={"GoodJet": {"quantile": 1.0}}
    ).write(skim)
    info = read_info(path)
    assert info["padding"]["GoodJet"]["max_len"] == 11
    assert info["padding"]["GoodJet"]["n_truncated"] == 0
    assert info["paths"]["objects/GoodJet/pt"] == ((130, 11), "float32")


def test_failed_write_leaves_no_tmp_and_old_file_untouched(tmp_path, skim, monkeypatch):
    out = tmp_path / "data.h5"
    out.write_bytes(b"previous content")
    calls = []
    real_create = hdf5._create

    def failing_create(group, key, array, compression):
        calls.append(key)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        real_create(group, key, array, compression)

    monkeypatch.setattr(hdf5, "_create", failing_create)
    with pytest.raises(OSError, match="disk full"):
        HDF5Writer(output=str(out)).write(skim)
    assert len(calls) == 3
    assert out.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]
    monkeypatch.setattr(hdf5, "_create", real_create)
    HDF5Writer(output=str(out)).write(skim)
    assert read_info(out)["n_events"] == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]


def test_unknown_collection_names_the_present_ones(tmp_path, skim):
    writer = HDF5Writer(output=str(tmp_path / "u.h5"), collections={"GoodJets": {"max_len": 4}})
    with pytest.raises(ConfigError) as info:
        writer.write(skim)
    text = str(info.value)
    assert "dataset 'ttbar': convert.collections names 'GoodJets'" in text
    assert "collections present: GoodJet" in text
    assert "Did you mean 'GoodJet'?" in text
    assert not (tmp_path / "u.h5").exists()


def test_unknown_scalar_or_field_is_a_config_error(skim):
    events = skim.arrays["ttbar"]
    with pytest.raises(
        ConfigError,
        match="convert.scalars entry 'htt' is not in the data \\(available: ht\\). Did you mean 'ht'",
    ):
        columns(events, ConvertConfig(scalars=["htt"]))
    with pytest.raises(
        ConfigError,
        match="convert.collections.GoodJet.fields entry 'phi' is not in the data \\(available: pt, eta\\)",
    ):
        columns(events, ConvertConfig(collections={"GoodJet": {"fields": ["phi"]}}))
    with pytest.raises(ConfigError, match="cannot sort objects by 'mass'"):
        columns(events, ConvertConfig(collections={"GoodJet": {"sort_by": "mass"}}))


def test_nan_scalar_is_a_data_error(tmp_path, skim):
    ht = ak.to_numpy(skim.arrays["dy"].ht).copy()
    ht[[3, 7]] = np.nan
    ht[9] = np.inf
    skim.arrays["dy"] = ak.with_field(skim.arrays["dy"], ht, "ht")
    with pytest.raises(DataError) as info:
        HDF5Writer(output=str(tmp_path / "n.h5")).write(skim)
    text = str(info.value)
    assert "dataset 'dy': scalar 'ht' has 3 non-finite values out of 40 events" in text
    assert "2 NaN or missing, 1 inf; first at event 3" in text
    assert not (tmp_path / "n.h5").exists()
    # dropping the scalar from convert.scalars writes the file
    path = HDF5Writer(output=str(tmp_path / "n.h5"), scalars=[]).write(skim)
    assert "scalars/ht" not in read_info(path)["paths"]


def test_zero_events_still_a_valid_file(tmp_path, caplog):
    skim = make_skim(
        {"ttbar": (0, "signal", True, 800.0, 10.0, 1), "dy": (0, "background", True, 1.0, 5.0, 2)}
    )
    path = HDF5Writer(output=str(tmp_path / "z.h5"), collections={"GoodJet": {"max_len": 5}}).write(
        skim
    )
    assert "no events to write" in caplog.text
    info = read_info(path)
    assert info["n_events"] == 0
    assert info["paths"]["objects/GoodJet/pt"] == ((0, 5), "float32")
    assert info["paths"]["objects/GoodJet/mask"] == ((0, 5), "bool")
    assert info["paths"]["event_id"] == ((0, 3), "int64")
    assert info["paths"]["scalars/ht"] == ((0,), "float32")
    default = read_info(HDF5Writer(output=str(tmp_path / "z1.h5")).write(skim))
    assert default["padding"]["GoodJet"]["max_len"] == 1
    assert default["paths"]["objects/GoodJet/eta"] == ((0, 1), "float32")


def test_columns_with_max_lens_pads_like_the_bundle(skim):
    events = skim.arrays["ttbar"]
    cols, padding = columns(events, ConvertConfig(), max_lens={"GoodJet": 2})
    assert sorted(cols) == [
        "objects/GoodJet/eta",
        "objects/GoodJet/mask",
        "objects/GoodJet/pt",
        "scalars/ht",
    ]
    assert cols["objects/GoodJet/pt"].shape == (60, 2)
    assert cols["objects/GoodJet/mask"].dtype == np.bool_
    assert cols["scalars/ht"].dtype == np.float32
    counts = ak.to_numpy(ak.num(events.GoodJet))
    assert padding == {
        "GoodJet": {
            "max_len": 2, "sort_by": "pt", "pad_value": 0.0, "fields": ["pt", "eta"],
            "n_truncated": int(np.sum(counts > 2)),
        }
    }  # fmt: skip
    # max_lens wins over the config's max_len; unnamed collections keep the config's
    cols, padding = columns(
        events, ConvertConfig(collections={"GoodJet": {"max_len": 5}}), {"GoodJet": 3}
    )
    assert cols["objects/GoodJet/eta"].shape == (60, 3)
    cols, _ = columns(
        events, ConvertConfig(collections={"GoodJet": {"max_len": 5, "fields": ["e*"]}})
    )
    assert sorted(cols) == ["objects/GoodJet/eta", "objects/GoodJet/mask", "scalars/ht"]
    assert cols["objects/GoodJet/eta"].shape == (60, 5)
    # bookkeeping fields never become scalars
    assert not any(k.startswith("scalars/") and k != "scalars/ht" for k in cols)


@pytest.mark.parametrize(
    ("compression", "filter_name", "opts"),
    [("gzip", "gzip", 4), ("none", None, None), ("lzf", "lzf", None)],
)
def test_compression_choices(tmp_path, skim, compression, filter_name, opts):
    path = HDF5Writer(output=str(tmp_path / "c.h5"), compression=compression).write(skim)
    with h5py.File(path) as f:
        assert f["objects/GoodJet/pt"].compression == filter_name
        assert f["objects/GoodJet/pt"].compression_opts == opts
        assert f["scalars/ht"].chunks == (130,)


def test_chunks_hold_many_contiguous_rows(tmp_path):
    skim = make_skim(
        {
            "big": (40_000, "signal", True, 1.0, 4e4, 5),
            "small": (10, "background", False, None, None, 6),
        }
    )
    path = HDF5Writer(
        output=str(tmp_path / "big.h5"), collections={"GoodJet": {"max_len": 4}}
    ).write(skim)
    with h5py.File(path) as f:
        assert f["objects/GoodJet/pt"].chunks == (32768, 4)
        assert f["event_id"].chunks == (32768, 3)
        assert f["label"].shape == (40_010,)
        assert f["label"][()].sum() == 10


def test_labels_missing_and_unknown(tmp_path, skim):
    skim.metadata["dy"]["label"] = "backgorund"
    with pytest.raises(
        DataError,
        match="dataset 'dy' has label 'backgorund', which is not among the class names \\['signal', 'background'\\]. Did you mean 'background'",
    ):
        HDF5Writer(output=str(tmp_path / "l.h5")).write(skim)
    del skim.metadata["dy"]["label"]
    with pytest.raises(DataError, match="dataset 'dy' has no 'label' in its metadata"):
        HDF5Writer(output=str(tmp_path / "l.h5")).write(skim)
    # without class_names, classes are numbered in order of first appearance
    skim = make_skim()
    skim.class_names = []
    skim.metadata["ttbar"]["label"] = "tt"
    info = read_info(HDF5Writer(output=str(tmp_path / "l.h5")).write(skim))
    assert info["class_names"] == ["tt", "background"]


def test_constructor_and_repr(tmp_path):
    writer = HDF5Writer(
        {"output": "x.h5", "collections": {"GoodJet": {"max_len": 6}}}, compression="gzip"
    )
    assert writer.config.compression == "gzip"
    assert repr(writer) == (
        "HDF5Writer(output='x.h5', collections={'GoodJet': 6}, scalars=['*'], "
        "compression='gzip', shuffle=True, seed=42)"
    )
    assert HDF5Writer(compression="blosc2-zstd").config.compression == "blosc2-zstd"
    assert repr(HDF5Writer(collections={"Muon": {}})).startswith(
        "HDF5Writer(output='data.h5', collections={'Muon': 'q0.95'}"
    )
    with pytest.raises(ConfigError, match="unknown key 'compresion'. Did you mean 'compression'"):
        HDF5Writer(compresion="gzip")
    with pytest.raises(ConfigError, match="'compression' must be one of"):
        HDF5Writer(compression="zstd")
    with pytest.raises(ConfigError, match="takes a SkimResult .* not a list"):
        HDF5Writer(output=str(tmp_path / "y.h5")).write([1, 2])


def test_read_info_errors(tmp_path):
    with pytest.raises(InputFileError, match=f"HDF5 file {tmp_path / 'nope.h5'} does not exist"):
        read_info(tmp_path / "nope.h5")
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5 at all")
    with pytest.raises(InputFileError, match=f"{bad} is not a readable HDF5 file"):
        read_info(bad)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(InputFileError, match="was not written by cmsmlkit's HDF5Writer"):
        read_info(other)
    partial = tmp_path / "partial.h5"
    with h5py.File(partial, "w") as f:
        f.attrs["cmsmlkit_version"] = "0.1.0"
        f["weight"] = np.ones(3, np.float32)
    with pytest.raises(InputFileError, match="the dataset '/label' is missing"):
        read_info(partial)


def test_fileset_is_skimmed_first(tmp_path, monkeypatch, skim):
    """A fileset dict goes through Skimmer (stubbed here) with the default SkimConfig."""
    seen = {}

    class FakeSkimmer:
        def __init__(self, config, cluster=None):
            seen["config"] = config

        def run(self, fileset):
            seen["fileset"] = fileset
            return skim

    import sys

    fake = types.ModuleType("cmsmlkit.data.skim")
    fake.Skimmer = FakeSkimmer
    monkeypatch.setitem(sys.modules, "cmsmlkit.data.skim", fake)
    fileset = {"ttbar": {"files": {"a.root": "Events"}, "metadata": {"label": "signal"}}}
    path = HDF5Writer(output=str(tmp_path / "f.h5"), collections={"GoodJet": {"max_len": 3}}).write(
        fileset
    )
    assert seen["fileset"] is fileset
    assert seen["config"].collections == {"GoodJet": ["*"]}
    info = read_info(path)
    assert info["n_events"] == 130
    assert info["skim_config"]["collections"] == {"GoodJet": ["*"]}


def test_real_nanoaod_through_skimmer(tmp_path, nanoaod_dir):
    from cmsmlkit.data.skim import Skimmer

    skim_cfg = SkimConfig(
        selection={
            "objects": {"GoodJet": {"from": "Jet", "where": "pt > 20"}},
            "variables": {"met": "MET.pt"},
        },
        collections={"GoodJet": ["pt", "eta", "phi"]},
    )
    fileset = {
        "dy": {
            "files": {str(nanoaod_dir / "nano_dy.root"): "Events"},
            "metadata": {"dataset": "dy", "label": "background", "is_mc": True, "xsec": 6077.2},
        }
    }
    result = Skimmer(skim_cfg).run(fileset)
    path = HDF5Writer(
        output=str(tmp_path / "dy.h5"), collections={"GoodJet": {"max_len": 4}}
    ).write(result, skim_config=skim_cfg)
    info = read_info(path)
    assert info["n_events"] == 40
    assert info["class_names"] == ["background"]
    assert info["paths"]["objects/GoodJet/pt"] == ((40, 4), "float32")
    assert info["paths"]["scalars/met"] == ((40,), "float32")
    assert info["input_files"] == [str(nanoaod_dir / "nano_dy.root")]
    cols = read_all(path)
    import uproot

    with uproot.open(nanoaod_dir / "nano_dy.root") as f:
        raw = f["Events"].arrays(["Jet_pt", "MET_pt", "event", "genWeight"])
    order = np.argsort(cols["event_id"][:, 2])
    assert np.array_equal(np.sort(cols["event_id"][:, 2]), np.sort(ak.to_numpy(raw.event)))
    raw_order = np.argsort(ak.to_numpy(raw.event))
    np.testing.assert_allclose(
        cols["scalars/met"][order], ak.to_numpy(raw.MET_pt)[raw_order], rtol=1e-6
    )
    n_good = ak.to_numpy(ak.sum(raw.Jet_pt > 20, axis=1))[raw_order]
    np.testing.assert_array_equal(
        cols["objects/GoodJet/mask"][order].sum(axis=1), np.minimum(n_good, 4)
    )
    lead = ak.to_numpy(ak.fill_none(ak.max(raw.Jet_pt[raw.Jet_pt > 20], axis=1), 0.0))[raw_order]
    np.testing.assert_allclose(cols["objects/GoodJet/pt"][order][:, 0], lead, rtol=1e-6)
    sumw = float(np.sum(ak.to_numpy(raw.genWeight)))
    assert info["sumw"]["dy"] == pytest.approx(sumw, rel=1e-6)
    gw = ak.to_numpy(raw.genWeight)[raw_order]
    np.testing.assert_allclose(cols["weight"][order], gw * 6077.2 / sumw, rtol=1e-5)


# --------------------------------------------------------------------------- HDF5Writer.convert


def write_root(path: Path, process: str, n: int, seed: int, compression=None, drop=()) -> Path:
    """A small NanoAOD-like file written by uproot (toy events), in the given compression."""
    import uproot

    from cmsmlkit.data import toy

    chunk = toy.generate(process, n, seed=seed)
    for name in drop:  # e.g. ("Muon", "pfRelIso04_all")
        coll, fname = name
        chunk[coll] = ak.zip({f: chunk[coll][f] for f in chunk[coll].fields if f != fname})
    chunk = {
        "run": np.ones(n, np.uint32),
        "luminosityBlock": (np.arange(n) // 100 + 1).astype(np.uint32),
        "event": np.arange(1, n + 1, dtype=np.uint64) + 10_000 * seed,
        **chunk,
    }
    kwargs = {} if compression is None else {"compression": compression}
    with uproot.recreate(path, **kwargs) as f:
        types_ = {k: v.dtype if isinstance(v, np.ndarray) else v.type for k, v in chunk.items()}
        tree = f.mktree("Events", types_)
        tree.extend(chunk)
    return path


def reference_padding(path: Path, coll: str, field: str, max_len: int, pad_value=0.0):
    """Leading objects by pt with awkward (the slow, obvious way)."""
    import uproot

    with uproot.open(path) as f:
        arr = f["Events"].arrays([f"{coll}_pt", f"{coll}_{field}"])
    order = ak.argsort(arr[f"{coll}_pt"], axis=1, ascending=False, stable=True)
    values = arr[f"{coll}_{field}"][order][:, :max_len]
    padded = ak.fill_none(ak.pad_none(values, max_len, clip=True), pad_value)
    return ak.to_numpy(padded).astype(np.float32)


@pytest.fixture
def root_files(tmp_path):
    return {
        "tt": [write_root(tmp_path / "tt_0.root", "ttbar", 300, 1)],
        "wj": [
            write_root(tmp_path / "wj_0.root", "wjets", 200, 2),
            write_root(tmp_path / "wj_1.root", "wjets", 150, 3),
        ],
    }


@pytest.mark.parametrize(
    "codec", ["ZLIB", "LZMA", "LZ4", "ZSTD"], ids=["zlib", "lzma", "lz4", "zstd"]
)
def test_convert_reads_every_root_compression(tmp_path, codec):
    import uproot

    src = write_root(tmp_path / "in.root", "ttbar", 250, 7, compression=getattr(uproot, codec)(1))
    with uproot.open(src) as f:
        assert type(f.file.compression).__name__ == codec
    result = HDF5Writer(
        output=str(tmp_path / "out.h5"),
        objects=["Jet", "Muon"],
        collections={"Jet": {"max_len": 5, "pad_value": -1.0}},
        step_size=64,  # several chunks
    ).convert([str(src)])
    assert result.outputs == [tmp_path / "out.h5"]
    assert (result.n_events, result.converted, result.reused, result.skipped) == (250, 1, 0, {})
    cols = read_all(tmp_path / "out.h5")
    for field in ("pt", "eta", "jetId"):
        np.testing.assert_array_equal(
            cols[f"objects/Jet/{field}"], reference_padding(src, "Jet", field, 5, -1.0)
        )
    with uproot.open(src) as f:
        raw = f["Events"].arrays(["nJet", "MET_pt", "event", "genWeight"], library="np")
    np.testing.assert_array_equal(cols["objects/Jet/mask"].sum(axis=1), np.minimum(raw["nJet"], 5))
    np.testing.assert_array_equal(cols["scalars/MET_pt"], raw["MET_pt"])
    np.testing.assert_array_equal(cols["event_id"][:, 2], raw["event"].astype(np.int64))
    np.testing.assert_array_equal(cols["weight"], raw["genWeight"])  # no xsec: genWeight
    assert set(cols) == {
        "scalars/MET_pt", "scalars/MET_phi", "label", "weight", "event_id", "dataset",
        *(f"objects/Jet/{f}" for f in ("pt", "eta", "phi", "mass", "btagDeepFlavB", "jetId",
                                        "hadronFlavour", "mask")),
        *(f"objects/Muon/{f}" for f in ("pt", "eta", "phi", "mass", "charge", "tightId",
                                         "pfRelIso04_all", "mask")),
    }  # fmt: skip
    info = read_info(tmp_path / "out.h5")
    assert info["class_names"] == ["events"]
    assert info["padding"]["Jet"]["n_truncated"] == int(np.sum(raw["nJet"] > 5))
    assert info["features"]["Jet.pt"] == (5,) and info["features"]["MET_pt"] == ()
    assert info["input_files"] == [str(src)]
    assert info["cutflow"]["events"]["all"]["events"] == 250


def test_convert_max_len_from_counter_pass_over_all_files(tmp_path, root_files):
    import uproot

    path = tmp_path / "q.h5"
    HDF5Writer(output=str(path), objects=["Jet"], collections={"Jet": {"quantile": 0.9}}).convert(
        {k: [str(p) for p in v] for k, v in root_files.items()}
    )
    counts = []
    for files in root_files.values():
        for p in files:
            with uproot.open(p) as f:
                counts.append(f["Events"]["nJet"].array(library="np"))
    counts = np.concatenate(counts)
    want = choose_max_len(counts, 0.9)
    info = read_info(path)
    assert (
        info["padding"]["Jet"]["max_len"]
        == want
        == int(np.quantile(counts, 0.9, method="inverted_cdf"))
    )
    assert info["padding"]["Jet"]["n_truncated"] == int(np.sum(counts > want))
    assert info["paths"]["objects/Jet/pt"] == ((650, want), "float32")
    assert list(info["padding"]) == ["Jet"]


def test_convert_selects_by_name_wildcard_and_all(tmp_path, root_files):
    files = [str(root_files["tt"][0])]
    info = read_info(
        HDF5Writer(
            output=str(tmp_path / "a.h5"),
            objects=["*on"],
            scalars=["MET_p?"],
            collections={"Electron": {"fields": ["pt", "e*"], "max_len": 2}},
        )
        .convert(files)
        .outputs[0]
    )
    assert list(info["padding"]) == ["Muon", "Electron"]
    assert info["padding"]["Electron"]["fields"] == ["pt", "eta"]
    assert sorted(n for n in info["features"] if "." not in n) == ["MET_pt"]
    everything = read_info(
        HDF5Writer(output=str(tmp_path / "b.h5"), objects=["all"], scalars=["all"])
        .convert(files)
        .outputs[0]
    )
    assert list(everything["padding"]) == ["Jet", "Muon", "Electron"]
    assert sorted(n for n in everything["features"] if "." not in n) == ["MET_phi", "MET_pt"]
    with pytest.raises(ConfigError, match="convert.objects entry 'Jets' is not in the data.*'Jet'"):
        HDF5Writer(output=str(tmp_path / "c.h5"), objects=["Jets"]).convert(files)
    with pytest.raises(ConfigError, match="convert.collections names 'Photon', which is not a"):
        HDF5Writer(output=str(tmp_path / "c.h5"), collections={"Photon": {}}).convert(files)
    with pytest.raises(ConfigError, match="cannot sort Jet by 'ptt'.*Did you mean 'pt'"):
        HDF5Writer(output=str(tmp_path / "c.h5"), collections={"Jet": {"sort_by": "ptt"}}).convert(
            files
        )
    assert not (tmp_path / "c.h5").exists()


def test_convert_merged_and_shuffled_reproducibly(tmp_path, root_files):
    inputs = {k: [str(p) for p in v] for k, v in root_files.items()}
    kwargs = {"objects": ["Jet"], "collections": {"Jet": {"max_len": 4}}, "step_size": 100}
    a = HDF5Writer(output=str(tmp_path / "a.h5"), seed=1, **kwargs).convert(inputs)
    b = HDF5Writer(output=str(tmp_path / "b.h5"), seed=1, **kwargs).convert(inputs)
    c = HDF5Writer(output=str(tmp_path / "c.h5"), seed=2, **kwargs).convert(inputs)
    plain = HDF5Writer(output=str(tmp_path / "p.h5"), shuffle=False, **kwargs).convert(inputs)
    assert a.n_events == 650 and a.outputs == [tmp_path / "a.h5"]
    assert not (tmp_path / "a.h5.parts").exists()  # the per-input parts are removed
    A, B, C, P = (read_all(r.outputs[0]) for r in (a, b, c, plain))
    for key in A:
        np.testing.assert_array_equal(A[key], B[key])
    assert not np.array_equal(A["event_id"], C["event_id"])
    # unshuffled: the inputs in order; shuffled: the same rows permuted together
    np.testing.assert_array_equal(P["label"], [0] * 300 + [1] * 350)
    np.testing.assert_array_equal(P["dataset"], [0] * 300 + [1] * 350)
    order_a = np.lexsort((A["event_id"][:, 2], A["dataset"]))
    for key in A:
        np.testing.assert_array_equal(A[key][order_a], P[key])
    # every block of 100 rows mixes both classes
    assert all(0 < A["label"][i : i + 100].sum() < 100 for i in range(0, 600, 100))
    info = read_info(tmp_path / "a.h5")
    assert info["class_names"] == ["tt", "wj"]
    assert info["input_files"] == [str(p) for v in root_files.values() for p in v]
    assert info["cutflow"]["wj"]["all"]["events"] == 350
    assert [d["n_events"] for d in info["datasets"]] == [300, 350]


def test_convert_one_output_per_input_on_a_local_cluster(tmp_path, root_files):
    from cmsmlkit.config import ClusterConfig

    inputs = {k: [str(p) for p in v] for k, v in root_files.items()}
    result = HDF5Writer(
        output=str(tmp_path / "out.h5"),
        merge=False,
        objects=["Muon"],
        cluster=ClusterConfig(workers=2),
    ).convert(inputs)
    assert result.outputs == [
        tmp_path / "out" / "tt_tt_0.h5",
        tmp_path / "out" / "wj_wj_0.h5",
        tmp_path / "out" / "wj_wj_1.h5",
    ]
    assert [read_info(p)["n_events"] for p in result.outputs] == [300, 200, 150]
    in_process = HDF5Writer(output=str(tmp_path / "seq.h5"), merge=False, objects=["Muon"])
    for p, q in zip(result.outputs, in_process.convert(inputs).outputs, strict=True):
        x, y = read_all(p), read_all(q)
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    # the max_len is chosen over all inputs, so the files can be trained on together
    assert {read_info(p)["padding"]["Muon"]["max_len"] for p in result.outputs} == {
        read_info(result.outputs[0])["padding"]["Muon"]["max_len"]
    }
    assert read_all(result.outputs[2])["label"].tolist() == [1] * 150


def test_convert_rerun_skips_finished_outputs(tmp_path, root_files):
    inputs = {k: [str(p) for p in v] for k, v in root_files.items()}
    writer = HDF5Writer(output=str(tmp_path / "o.h5"), merge=False, objects=["Jet"])
    first = writer.convert(inputs)
    assert (first.converted, first.reused) == (3, 0)
    stamps = [p.stat().st_mtime_ns for p in first.outputs]
    again = writer.convert(inputs)
    assert (again.converted, again.reused, again.n_events) == (0, 3, 650)
    assert [p.stat().st_mtime_ns for p in again.outputs] == stamps
    # a changed input file is converted again; so are the others, whose attributes record
    # every dataset's events and sum of weights
    write_root(root_files["wj"][1], "wjets", 120, 9)
    third = writer.convert(inputs)
    assert (third.converted, third.reused, third.n_events) == (3, 0, 620)
    assert writer.convert(inputs).reused == 3
    # an interrupted run resumes: only the missing output is written
    third.outputs[1].unlink()
    resumed = writer.convert(inputs)
    assert (resumed.converted, resumed.reused, resumed.n_events) == (1, 2, 620)
    # a changed config converts everything again
    fourth = HDF5Writer(writer.config, compression="gzip").convert(inputs)
    assert (fourth.converted, fourth.reused) == (3, 0)
    # a merged output is skipped as a whole
    merged = HDF5Writer(output=str(tmp_path / "m.h5"), objects=["Jet"])
    assert merged.convert(inputs).converted == 1
    stamp = (tmp_path / "m.h5").stat().st_mtime_ns
    assert (merged.convert(inputs).converted, merged.convert(inputs).reused) == (0, 1)
    assert (tmp_path / "m.h5").stat().st_mtime_ns == stamp
    assert read_info(tmp_path / "m.h5")["config_hash"]


def test_convert_corrupt_or_truncated_input_is_named_or_skipped(tmp_path, root_files):
    good = str(root_files["tt"][0])
    truncated = tmp_path / "truncated.root"
    data = Path(root_files["wj"][0]).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.root"
    garbage.write_bytes(b"this is not ROOT" * 100)
    for bad in (truncated, garbage):
        with pytest.raises(InputFileError) as info:
            HDF5Writer(output=str(tmp_path / "x.h5")).convert([good, str(bad)])
        assert f"cannot read {bad} as a ROOT file" in str(info.value)
        assert "convert.skip_bad_files: true" in str(info.value)
    assert sorted(p.name for p in tmp_path.glob("x.h5*")) == []
    result = HDF5Writer(output=str(tmp_path / "x.h5"), skip_bad_files=True).convert(
        [good, str(truncated), str(garbage)]
    )
    assert result.n_events == 300
    assert sorted(result.skipped) == sorted([str(truncated), str(garbage)])
    assert read_info(result.outputs[0])["skipped_files"].keys() == result.skipped.keys()
    with pytest.raises(InputFileError, match="input file .*nope.root does not exist"):
        HDF5Writer(output=str(tmp_path / "y.h5")).convert([str(tmp_path / "nope.root")])
    with pytest.raises(InputFileError, match="the pattern .*zz_\\*.root matches no file"):
        HDF5Writer(output=str(tmp_path / "y.h5")).convert([str(tmp_path / "zz_*.root")])


def test_convert_corrupt_basket_found_while_reading(tmp_path):
    """A file whose header reads but whose data baskets are damaged: named with the entry."""
    import uproot

    src = write_root(tmp_path / "in.root", "ttbar", 400, 4)
    with uproot.open(src) as f:
        branch = f["Events"]["Jet_eta"]
        start = int(branch.member("fBasketSeek")[0])
    data = bytearray(src.read_bytes())
    data[start + 60 : start + 400] = b"\x00" * 340  # inside the compressed basket
    src.write_bytes(bytes(data))
    with pytest.raises(InputFileError, match=f"cannot read {src}:Events after entry 0"):
        HDF5Writer(output=str(tmp_path / "o.h5"), step_size=100).convert([str(src)])
    assert not list(tmp_path.glob("o.h5*"))
    other = write_root(tmp_path / "ok.root", "ttbar", 50, 5)
    result = HDF5Writer(output=str(tmp_path / "o.h5"), skip_bad_files=True).convert(
        [str(other), str(src)]
    )
    assert result.n_events == 50 and list(result.skipped) == [str(src)]
    assert read_info(tmp_path / "o.h5")["skipped_files"] == result.skipped


def test_convert_missing_branch_names_the_file_and_branch(tmp_path):
    from cmsmlkit.errors import MissingBranchError

    a = write_root(tmp_path / "a.root", "dy", 50, 1)
    b = write_root(tmp_path / "b.root", "dy", 50, 2, drop=[("Muon", "pfRelIso04_all")])
    with pytest.raises(MissingBranchError) as info:
        HDF5Writer(output=str(tmp_path / "o.h5")).convert([str(a), str(b)])
    text = str(info.value)
    assert f"{b}:Events has no branch 'Muon_pfRelIso04_all'" in text
    assert "drop the branch from convert.scalars / convert.objects" in text
    # dropping the field from the collection converts both files
    result = HDF5Writer(
        output=str(tmp_path / "o.h5"),
        objects=["Muon"],
        collections={"Muon": {"fields": ["pt", "eta"]}},
    ).convert([str(a), str(b)])
    assert result.n_events == 100


def test_convert_fileset_normalises_weights_to_xsec(tmp_path, root_files):
    import uproot

    from cmsmlkit.data.source import NanoAODSource

    source = NanoAODSource(
        {
            "datasets": {
                "ttbar": {"files": [str(root_files["tt"][0])], "label": "signal", "xsec": 800.0},
                "wjets": {
                    "files": [str(p) for p in root_files["wj"]],
                    "label": "background",
                    "xsec": 5000.0,
                },
            }
        }
    )
    path = tmp_path / "w.h5"
    HDF5Writer(output=str(path), lumi=2.0, shuffle=False, objects=[]).convert(source)
    cols, info = read_all(path), read_info(path)
    gw = []
    for p in [root_files["tt"][0], *root_files["wj"]]:
        with uproot.open(p) as f:
            gw.append(f["Events"]["genWeight"].array(library="np").astype(np.float64))
    sum_tt, sum_wj = gw[0].sum(), gw[1].sum() + gw[2].sum()
    np.testing.assert_allclose(cols["weight"][:300], gw[0] * 800.0 * 2.0 / sum_tt, rtol=1e-6)
    np.testing.assert_allclose(
        cols["weight"][300:], np.r_[gw[1], gw[2]] * 5000.0 * 2.0 / sum_wj, rtol=1e-6
    )
    assert info["sumw"]["wjets"] == pytest.approx(sum_wj)
    assert info["class_names"] == ["signal", "background"]
    assert info["datasets"][1] == {
        "name": "wjets", "label": "background", "n_events": 350, "xsec": 5000.0, "is_mc": True,
    }  # fmt: skip
    assert "objects/Jet/pt" not in info["paths"]


@pytest.mark.parametrize("compression", ["none", "lzf", "gzip", "blosc2-lz4", "blosc2-zstd"])
def test_convert_codecs_read_back_with_plain_h5py(tmp_path, root_files, compression):
    import subprocess
    import sys

    src = str(root_files["tt"][0])
    path = tmp_path / f"{compression}.h5"
    HDF5Writer(output=str(path), compression=compression, objects=["Jet"]).convert([src])
    reference = read_all(
        HDF5Writer(output=str(tmp_path / "ref.h5"), compression="none", objects=["Jet"])
        .convert([src])
        .outputs[0]
    )
    # a fresh interpreter with nothing but h5py + hdf5plugin reads the file
    code = (
        "import sys, h5py, hdf5plugin, numpy as np\n"
        "f = h5py.File(sys.argv[1], 'r')\n"
        "print(f['objects/Jet/pt'].chunks, float(np.asarray(f['objects/Jet/pt']).sum()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    ).stdout.split(")")
    assert out[0] + ")" == str((32768, reference["objects/Jet/pt"].shape[1]))
    assert float(out[1]) == pytest.approx(float(reference["objects/Jet/pt"].sum()), rel=1e-6)
    got = read_all(path)
    for key in reference:
        np.testing.assert_array_equal(got[key], reference[key])


def test_open_hdf5_and_convert_result_repr(tmp_path, root_files):
    from cmsmlkit.data.hdf5 import ConvertResult, open_hdf5

    result = HDF5Writer(output=str(tmp_path / "r.h5"), objects=["Jet"]).convert(
        str(root_files["tt"][0])
    )
    assert repr(result) == (
        f"ConvertResult(outputs=['{tmp_path / 'r.h5'}'], n_events=300, converted=1, reused=0, "
        "skipped=0)"
    )
    assert isinstance(result, ConvertResult)
    with open_hdf5(result.outputs[0]) as f:
        assert f["label"].shape == (300,)
        assert f.attrs["n_events"] == 300
    with pytest.raises(ConfigError, match="nothing to convert"):
        HDF5Writer().convert({})


def test_convert_writes_whole_hdf5_chunks_whatever_the_step(tmp_path, monkeypatch):
    src = write_root(tmp_path / "in.root", "ttbar", 250, 4)
    monkeypatch.setattr(hdf5, "CHUNK_ROWS", 64)
    stored = []
    real = hdf5._Appender._store

    def spy(self, cols):  # the real write, recording the rows of every HDF5 write
        stored.append(len(cols["label"]))
        real(self, cols)

    monkeypatch.setattr(hdf5._Appender, "_store", spy)
    kwargs = {"objects": ["Jet"], "collections": {"Jet": {"max_len": 4}}}
    HDF5Writer(output=str(tmp_path / "a.h5"), step_size=50, **kwargs).convert([str(src)])
    # 50-event steps, 64-row chunks: each write holds whole chunks, the rest waits for the next
    assert stored == [64, 64, 64, 58]
    stored.clear()
    HDF5Writer(output=str(tmp_path / "b.h5"), step_size=128, **kwargs).convert([str(src)])
    assert stored == [128, 64, 58]
    a, b = read_all(tmp_path / "a.h5"), read_all(tmp_path / "b.h5")
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["objects/Jet/pt"].shape == (250, 4)
    with h5py.File(tmp_path / "a.h5") as f:
        assert f["objects/Jet/pt"].chunks == (64, 4) and f["label"].chunks == (64,)


def test_scan_reads_counters_and_genweight_in_steps(tmp_path, monkeypatch):
    import uproot

    src = str(write_root(tmp_path / "in.root", "wjets", 300, 5))
    whole = hdf5._scan_file((src, "Events"))
    monkeypatch.setattr(hdf5, "SCAN_STEP", 7)
    stepped = hdf5._scan_file((src, "Events"))
    with uproot.open(src) as f:
        raw = f["Events"].arrays(["nJet", "nMuon", "genWeight"], library="np")
    assert stepped["hists"] == whole["hists"]
    assert stepped["hists"]["Jet"] == np.bincount(raw["nJet"]).tolist()
    assert stepped["hists"]["Muon"] == np.bincount(raw["nMuon"]).tolist()
    assert stepped["n_events"] == whole["n_events"] == 300
    # no Runs tree: the sum of the events' genWeight, in float64
    want = float(np.sum(raw["genWeight"], dtype=np.float64))
    assert stepped["sumw"] == pytest.approx(want, rel=1e-12)
    assert whole["sumw"] == pytest.approx(want, rel=1e-12)


def test_blosc2_default_is_bitshuffled_lz4_on_one_thread(tmp_path, root_files, monkeypatch):
    import os

    monkeypatch.setenv("BLOSC_NTHREADS", "0")  # recorded, so that the test leaves it as it was
    monkeypatch.delenv("BLOSC_NTHREADS")
    src = str(root_files["tt"][0])
    path = HDF5Writer(output=str(tmp_path / "d.h5"), objects=["Jet"]).convert([src]).outputs[0]
    assert os.environ["BLOSC_NTHREADS"] == "1"
    with h5py.File(path) as f:
        opts = f["objects/Jet/pt"]._filters["32026"]
        # (..., clevel, filter, codec): level 5, bit shuffle (2), lz4 (1)
        assert tuple(opts[4:7]) == (5, 2, 1)
        assert tuple(f["label"]._filters["32026"][4:7]) == (5, 2, 1)
    monkeypatch.setenv("BLOSC_NTHREADS", "3")  # the user's choice is kept
    HDF5Writer(output=str(tmp_path / "e.h5"), objects=["Jet"]).convert([src])
    assert os.environ["BLOSC_NTHREADS"] == "3"


def test_convert_memory_follows_the_step_not_the_input(tmp_path, monkeypatch):
    """Peak traced memory (numpy arrays included) of 8x the events stays that of 1x.

    Memory holds a step (and rows waiting to fill an HDF5 chunk), never the whole input.
    """
    import tracemalloc

    monkeypatch.setattr(hdf5, "CHUNK_ROWS", 256)
    monkeypatch.setattr(hdf5, "SCAN_STEP", 500)
    small = str(write_root(tmp_path / "small.root", "ttbar", 3000, 6))
    big = tmp_path / "big.root"
    import uproot

    from cmsmlkit.data import toy

    with uproot.recreate(big) as f:  # 8 x 3000 events, appended like a real file's baskets
        tree = None
        for i in range(8):
            chunk = toy.generate("ttbar", 3000, seed=10 + i)
            chunk = {"event": np.arange(3000, dtype=np.uint64) + 3000 * i, **chunk}
            if tree is None:
                types_ = {
                    k: v.dtype if isinstance(v, np.ndarray) else v.type for k, v in chunk.items()
                }
                tree = f.mktree("Events", types_)
            tree.extend(chunk)
    peaks = []
    for src in (small, small, str(big)):  # the first run imports what the conversion needs
        writer = HDF5Writer(
            output=str(tmp_path / f"{len(peaks)}.h5"), objects=["Jet"], step_size=500
        )
        tracemalloc.start()
        result = writer.convert([src])
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert result.n_events == (3000 if src == small else 24000)
    # what differs is the raw baskets uproot holds at the moment of the peak (< 1 MB here);
    # the big input's jet fields alone, held whole, would add 3 MB
    assert peaks[2] < peaks[1] + 1_000_000, peaks
