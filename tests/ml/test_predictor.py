"""The Predictor: a bundle applied to new NanoAOD, HDF5 and arrays with the identical preprocessing."""

from __future__ import annotations

import json
import logging
import shutil

import awkward as ak
import h5py
import numpy as np
import pytest
import uproot
from slurm_cluster import slurm_cluster  # noqa: F401  (the fixture: a real one-node SLURM)

from cmsmlkit import HDF5Writer, NanoAODSource, Predictor, Skimmer
from cmsmlkit.errors import BundleError, ConfigError, DataError, InputFileError
from cmsmlkit.ml.predictor import add_scores, align_events, export_cmssw


def _h5_columns(path):
    from cmsmlkit.data.hdf5 import open_hdf5

    with open_hdf5(path) as f:
        out = {}
        f.visititems(
            lambda name, obj: out.__setitem__(name, obj[:]) if hasattr(obj, "shape") else None
        )
    return out


def test_scores_are_probabilities_for_each_class(demo_chain):
    predictor = Predictor.from_bundle(demo_chain.bundle)
    scores = predictor.predict(demo_chain.files["new"])
    assert predictor.class_names == ["signal", "background"]
    assert predictor.score_names == ["score_signal", "score_background"]
    assert scores.ndim == 2 and scores.shape[1] == 2 and len(scores) > 100
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)
    assert scores.dtype == np.float32


def test_nanoaod_and_hdf5_of_the_same_events_score_identically(demo_chain, tmp_path):
    """The bundle's selection and padding reproduce the training preprocessing exactly."""
    new = demo_chain.files["new"]
    skim = Skimmer(demo_chain.skim_config).run(
        {
            "new": {
                "files": {str(new[0]): "Events"},
                "metadata": {"dataset": "new", "label": "signal", "is_mc": True},
            }
        }
    )
    padding = {
        "GoodJet": {"max_len": 5},
        "GoodMuon": {"max_len": 2},
        "GoodElectron": {"max_len": 2},
    }
    h5 = HDF5Writer(output=str(tmp_path / "new.h5"), collections=padding, shuffle=False).write(skim)
    predictor = Predictor.from_bundle(demo_chain.bundle)
    from_root = predictor.predict(new)
    from_h5 = predictor.predict(str(h5))
    from_awkward = predictor.predict(skim.arrays["new"])
    assert from_root.shape == from_h5.shape == from_awkward.shape
    np.testing.assert_allclose(from_root, from_h5, atol=1e-6)
    np.testing.assert_allclose(from_root, from_awkward, atol=1e-6)


def test_numpy_arrays_named_by_feature(demo_chain):
    """A notebook's dict of numpy arrays (``ht``, ``GoodJet.pt`` [N, L], masks) scores like the file."""
    cols = _h5_columns(demo_chain.h5)
    named = {}
    for path, values in cols.items():
        parts = path.split("/")
        if parts[0] == "scalars":
            named[parts[1]] = values
        elif parts[0] == "objects":
            named[f"{parts[1]}.{parts[2]}"] = values
    predictor = Predictor.from_bundle(demo_chain.bundle)
    np.testing.assert_allclose(
        predictor.predict(named), predictor.predict(str(demo_chain.h5)), atol=1e-6
    )


def test_inputs_without_the_bundles_features_are_refused(demo_chain):
    predictor = Predictor.from_bundle(demo_chain.bundle)
    cols = _h5_columns(demo_chain.h5)
    del cols["scalars/ht"], cols["objects/GoodMuon/eta"]
    with pytest.raises(DataError, match=r"lacks 2 feature\(s\).*ht \(scalars/ht\).*GoodMuon\.eta"):
        predictor.predict(cols)
    events = demo_chain.skim.arrays["ttbar"]
    with pytest.raises(DataError, match=r"lacks 1 feature\(s\).*: met\."):
        predictor.predict(events[[f for f in events.fields if f != "met"]])


def test_predict_files_writes_scores_with_event_ids(demo_chain, tmp_path):
    predictor = Predictor.from_bundle(demo_chain.bundle)
    paths = predictor.predict_files(
        [str(demo_chain.h5), str(demo_chain.files["new"][0])], tmp_path / "out"
    )
    assert [p.name for p in paths] == ["demo.h5", "new.h5"]
    assert paths.scored == [str(demo_chain.h5), str(demo_chain.files["new"][0])]
    assert not list((tmp_path / "out").glob("*.tmp"))
    with h5py.File(paths[0]) as f, h5py.File(demo_chain.h5) as src:
        assert f["scores"].shape == (len(src["label"]), 2)
        assert list(f["scores"].attrs["class_names"]) == ["signal", "background"]
        np.testing.assert_array_equal(f["event_id"][:], src["event_id"][:])
        np.testing.assert_array_equal(f["label"][:], src["label"][:])
    with h5py.File(paths[1]) as f:
        ids = f["event_id"][:]
        assert ids.shape == (len(f["scores"]), 3) and (ids >= 0).all()
        assert len(np.unique(ids[:, 2])) == len(ids)
        # the toy numbers events 1, 2, ... in file order: entry = event - 1
        np.testing.assert_array_equal(f["entry"][:], ids[:, 2] - 1)


def test_friend_tree_has_one_entry_per_input_event(demo_chain, tmp_path):
    """ROOT's AddFriend needs the same entries in the same order: scores or the default."""
    new = str(demo_chain.files["new"][0])
    predictor = Predictor.from_bundle(demo_chain.bundle, formats=["friend"], default=-2.0)
    (path,) = predictor.predict_files([new], tmp_path)
    assert path.name == "new.friend.root"
    selected_scores = predictor.predict(new)
    with uproot.open(new) as src, uproot.open(path) as friend:
        events, tree = src["Events"], friend["Friends"]
        assert tree.num_entries == events.num_entries == 1500
        mine = tree.arrays(library="np")
        theirs = events.arrays(["run", "luminosityBlock", "event"], library="np")
    for key in ("run", "luminosityBlock", "event"):
        np.testing.assert_array_equal(mine[key], theirs[key])
        assert mine[key].dtype == theirs[key].dtype
    with uproot.open(path) as friend:  # predict.compression: lz4 by default
        assert type(friend.file.compression).__name__ == "LZ4"
    chosen = mine["score_selected"]
    assert chosen.sum() == len(selected_scores) and 0 < chosen.sum() < 1500
    np.testing.assert_allclose(mine["score_signal"][chosen], selected_scores[:, 0], atol=1e-7)
    np.testing.assert_allclose(mine["score_background"][chosen], selected_scores[:, 1], atol=1e-7)
    assert (mine["score_signal"][~chosen] == -2.0).all()
    aligned = predictor.predict(new, aligned=True)
    np.testing.assert_array_equal(aligned[:, 0], mine["score_signal"])
    # read as a friend: the input's branches and the scores zip event by event
    joined = ak.zip(
        {
            "met": uproot.open(new)["Events"]["MET_pt"].array(),
            "score": uproot.open(path)["Friends"]["score_signal"].array(),
        }
    )
    assert len(joined) == 1500


def _skimmed_real_nanoaod(source, target):
    """A skimmed copy of a real NanoAOD file, as nanoAOD-tools would keep it: fewer branches.

    (uproot's writer takes minutes for the ~1500 branches of full NanoAOD.)
    """
    keep = ["run", "luminosityBlock", "event", "genWeight", "MET_*", "Jet_*", "Muon_*"]
    keep += ["Electron_*", "nJet", "nMuon", "nElectron"]
    with uproot.open(source) as f:
        events = f["Events"].arrays(filter_name=keep, how="zip")
        runs = f["Runs"].arrays(how=dict)
    with uproot.recreate(target) as out:
        kinds = {
            k: events[k].type
            if events[k].fields or events[k].ndim > 1
            else ak.to_numpy(events[k]).dtype
            for k in events.fields
        }
        out.mktree("Events", kinds).extend({k: events[k] for k in events.fields})
        out.mktree("Runs", {k: v.type for k, v in runs.items()}).extend(runs)
    return target


@pytest.mark.slow
def test_copy_of_real_nanoaod_with_score_branches(demo_chain, nanoaod_dir, tmp_path):
    """Every branch of a (skimmed) real NanoAOD file survives the copy; the scores are added."""
    source = _skimmed_real_nanoaod(nanoaod_dir / "nano_dy.root", tmp_path / "nano_dy.root")
    predictor = Predictor.from_bundle(demo_chain.bundle, formats=["nanoaod", "friend"])
    copy, friend = predictor.predict_files([str(source)], tmp_path / "out")
    assert copy.name == "nano_dy.root" and copy.parent == tmp_path / "out"
    with uproot.open(source) as src, uproot.open(copy) as out, uproot.open(friend) as fr:
        assert set(out.keys(cycle=False)) == {"Events", "Runs"}
        before, after = src["Events"], out["Events"]
        assert after.num_entries == before.num_entries == 40
        names = set(before.keys())
        assert len(names) > 100 and {"nJet", "Jet_pt", "MET_pt"} <= names
        assert names - set(after.keys()) == set()
        assert set(after.keys()) - names == {"score_signal", "score_background", "score_selected"}
        for name in sorted(names):
            a, b = before[name].array(), after[name].array()
            assert ak.all(ak.ravel((a == b) | (a != a))), name
        np.testing.assert_array_equal(
            after["score_signal"].array(library="np"),
            fr["Friends"]["score_signal"].array(library="np"),
        )
        assert out["Runs"].keys() == src["Runs"].keys()  # genEventSumw_ etc. for normalising
        for name in src["Runs"].keys():  # noqa: SIM118
            assert ak.all(ak.ravel(out["Runs"][name].array() == src["Runs"][name].array()))
    # scoring the copy again into NanoAOD would add branches that are there already
    again = Predictor.from_bundle(demo_chain.bundle, formats=["nanoaod"])
    with pytest.raises(ConfigError, match="already has the branch.*score_signal.*predict.name"):
        again.predict_files([str(copy)], tmp_path / "again")
    assert not (tmp_path / "again" / "nano_dy.root").exists()
    assert not list((tmp_path / "again").glob("*.tmp"))


def test_parquet_holds_the_hdf5_scores(demo_chain, tmp_path):
    import pyarrow.parquet as pq

    new = str(demo_chain.files["new"][0])
    predictor = Predictor.from_bundle(demo_chain.bundle, formats=["hdf5", "parquet"], name="nn")
    h5_path, pq_path = predictor.predict_files([new], tmp_path)
    table = pq.read_table(pq_path)
    assert table.column_names[:6] == [
        "run",
        "luminosityBlock",
        "event",
        "entry",
        "nn_signal",
        "nn_background",
    ]
    assert json.loads(table.schema.metadata[b"class_names"]) == ["signal", "background"]
    with h5py.File(h5_path) as f:
        np.testing.assert_array_equal(table["nn_signal"].to_numpy(), f["scores"][:, 0])
        np.testing.assert_array_equal(table["event"].to_numpy(), f["event_id"][:, 2])
        assert table.num_rows == len(f["scores"]) > 100


def test_fileset_histograms_for_combine(demo_chain, tmp_path):
    """Per dataset: genWeight applied, scaled to xsec * lumi / sumw; data summed into data_obs."""
    files = demo_chain.files
    source = NanoAODSource(
        datasets={
            "ttbar": {"files": [str(files["ttbar"][0])], "label": "signal", "xsec": 833.9},
            "wjets": {"files": [str(files["wjets"][0])], "label": "background"},
            "dy": {"files": [str(files["dy"][0])], "label": "background", "xsec": 6077.2},
            "data": {"files": [str(files["new"][0])], "label": "background", "is_mc": False},
        }
    )
    predictor = Predictor.from_bundle(
        demo_chain.bundle, formats=["friend"], lumi=1000.0, channel="sr", hist_bins=10
    )
    report = predictor.predict_fileset(source, tmp_path)
    assert report.hist_file == tmp_path / "histograms.root"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in report) == [
        "data/new.friend.root",
        "dy/dy.friend.root",
        "ttbar/ttbar.friend.root",
        "wjets/wjets.friend.root",
    ]
    assert list(report.histograms) == ["ttbar", "wjets", "dy", "data_obs"]
    with uproot.open(report.hist_file) as f:
        assert sorted(f.keys(cycle=False)) == [
            "sr",
            "sr/data_obs",
            "sr/dy",
            "sr/ttbar",
            "sr/wjets",
        ]
        th1 = {k: f[f"sr/{k}"] for k in ("ttbar", "wjets", "dy", "data_obs")}
        assert all(h.classname == "TH1D" for h in th1.values())
        np.testing.assert_allclose(th1["ttbar"].axis().edges(), np.linspace(0, 1, 11))
    for name, xsec in (("ttbar", 833.9), ("wjets", None), ("dy", 6077.2)):
        scored = predictor.score_file(str(files[name][0]))
        expected, _ = np.histogram(
            scored.scores[:, 0], bins=10, range=(0, 1), weights=scored.weight
        )
        if xsec is not None:
            expected = expected * xsec * 1000.0 / scored.sumw
        np.testing.assert_allclose(th1[name].values(), expected, rtol=1e-5)
        # the toy's weights are not all equal, so genWeight really entered
        assert len(np.unique(scored.weight)) > 1 or name == "dy"
    data = predictor.predict(str(files["new"][0]))
    assert th1["data_obs"].values().sum() == len(data)
    np.testing.assert_allclose(th1["data_obs"].variances(), th1["data_obs"].values())


def test_onnx_backend_gives_the_same_scores(demo_chain):
    new = demo_chain.files["new"]
    torch_scores = Predictor.from_bundle(demo_chain.bundle).predict(new)
    onnx_scores = Predictor.from_bundle(demo_chain.bundle, backend="onnx").predict(new)
    assert onnx_scores.shape == torch_scores.shape
    np.testing.assert_allclose(onnx_scores, torch_scores, atol=1e-5)


def test_add_scores_inside_a_coffea_processor(demo_chain):
    """A user's own processor gets the bundle's scores on its events, chunk by chunk."""
    from coffea import processor
    from coffea.nanoevents import NanoAODSchema

    bundle = str(demo_chain.bundle)

    class MyAnalysis(processor.ProcessorABC):
        def process(self, events):
            events = add_scores(events, bundle)
            tight = events[events.score_selected & (events.score_signal > 0.5)]
            return {
                "entries": [(events.metadata["entrystart"], ak.to_numpy(events.score_signal))],
                "n_tight": len(tight),
                "ht_tight": float(ak.sum(tight.Jet.pt)),
            }

        def postprocess(self, accumulator):
            return accumulator

    new = str(demo_chain.files["new"][0])
    runner = processor.Runner(
        processor.IterativeExecutor(), schema=NanoAODSchema, chunksize=400, savemetrics=False
    )
    out = runner({"new": {"files": {new: "Events"}}}, processor_instance=MyAnalysis())
    chunks = sorted(out["entries"], key=lambda c: c[0])
    assert [c[0] for c in chunks] == [0, 375, 750, 1125]  # coffea splits 1500 evenly
    in_coffea = np.concatenate([c[1] for c in chunks])
    expected = Predictor.from_bundle(demo_chain.bundle).predict(new, aligned=True)[:, 0]
    np.testing.assert_allclose(in_coffea, expected, atol=1e-6)
    assert out["n_tight"] == int((expected > 0.5).sum()) > 0


def test_align_events_matches_selected_rows_in_order():
    ids = np.array([[1, 1, 10], [1, 1, 11], [1, 2, 5], [2, 1, 1], [2, 1, 3]])
    assert align_events(ids, ids[[1, 3, 4]]).tolist() == [1, 3, 4]
    assert align_events(ids, ids[:0]).tolist() == []
    huge = ids.copy()
    huge[:, 2] += 2**60  # keys too wide to pack: the general path
    huge[0, 0] = 2**31
    assert align_events(huge, huge[[0, 2]]).tolist() == [0, 2]
    twice = np.array([[1, 1, 7], [1, 1, 7], [1, 1, 8]])
    assert align_events(twice, twice[[1, 2]]).tolist() == [0, 2]
    with pytest.raises(DataError, match=r"1 selected event\(s\) are not among.*\(1, 9, 9\)"):
        align_events(ids, np.array([[1, 9, 9]]))


def test_rerun_skips_finished_files(demo_chain, tmp_path):
    new = str(tmp_path / "new.root")
    shutil.copy(demo_chain.files["new"][0], new)
    predictor = Predictor.from_bundle(demo_chain.bundle, formats=["hdf5", "friend"])
    first = predictor.predict_files([new, str(demo_chain.h5)], tmp_path / "out")
    stamps = {p: p.stat().st_mtime_ns for p in first}
    again = predictor.predict_files([new, str(demo_chain.h5)], tmp_path / "out")
    assert again.scored == [] and again.reused == [new, str(demo_chain.h5)]
    assert list(again) == list(first)
    assert {p: p.stat().st_mtime_ns for p in again} == stamps
    # another output setting, a changed input or rerun: true score again
    renamed = Predictor.from_bundle(demo_chain.bundle, formats=["hdf5", "friend"], name="nn")
    assert renamed.predict_files([new], tmp_path / "out").scored == [new]
    with open(new, "ab") as handle:  # same file, touched: its size and time changed
        handle.write(b"\0")
    assert predictor.predict_files([new], tmp_path / "out").scored == [new]
    forced = Predictor.from_bundle(demo_chain.bundle, formats=["hdf5", "friend"], rerun=True)
    assert forced.predict_files([new], tmp_path / "out").scored == [new]


def test_bad_file_is_retried_then_skipped_with_a_report(demo_chain, tmp_path, caplog):
    bad = tmp_path / "broken.root"
    bad.write_bytes(b"root\0this is not a ROOT file" * 10)
    good = str(demo_chain.files["new"][0])
    strict = Predictor.from_bundle(demo_chain.bundle, retries=0)
    with pytest.raises(InputFileError, match="broken.root"):
        strict.predict_files([str(bad), good], tmp_path / "strict")
    assert not list((tmp_path / "strict").glob("broken*"))
    lenient = Predictor.from_bundle(demo_chain.bundle, retries=1, skip_bad_files=True)
    with caplog.at_level(logging.WARNING, logger="cmsmlkit.ml.predictor"):
        report = lenient.predict_files([str(bad), good], tmp_path / "out")
    assert [p.name for p in report] == ["new.h5"]
    assert list(report.skipped) == [str(bad)]
    assert "broken.root" in report.skipped[str(bad)]
    assert "1 skipped: " in repr(report)
    messages = [r.getMessage() for r in caplog.records]
    assert any("failed (attempt 1 of 2), retrying" in m for m in messages)
    assert any("skipped after 1 retries" in m for m in messages)


def test_newer_or_corrupted_bundle_gives_a_clear_error(demo_chain, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(demo_chain.bundle, newer)
    info = json.loads((newer / "bundle.json").read_text())
    info["format_version"] = 99
    (newer / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(BundleError, match="newer cmsmlkit.*pip install -U cmsmlkit"):
        Predictor.from_bundle(newer)

    broken = tmp_path / "broken"
    shutil.copytree(demo_chain.bundle, broken)
    weights = bytearray((broken / "model.pt").read_bytes())
    weights[len(weights) // 2] ^= 0xFF
    (broken / "model.pt").write_bytes(bytes(weights))
    with pytest.raises(BundleError, match="model.pt.*corrupted"):
        Predictor.from_bundle(broken)

    bad_onnx = tmp_path / "bad_onnx"
    shutil.copytree(demo_chain.bundle, bad_onnx)
    (bad_onnx / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(BundleError, match="model.onnx does not match the sha256"):
        Predictor.from_bundle(bad_onnx, backend="onnx")
    with pytest.raises(BundleError, match="model.onnx does not match the sha256"):
        export_cmssw(bad_onnx, tmp_path / "cmssw")


def test_missing_input_and_missing_bundle_errors(demo_chain, tmp_path):
    predictor = Predictor.from_bundle(demo_chain.bundle)
    with pytest.raises(InputFileError, match="nowhere.root"):
        predictor.predict_files([str(tmp_path / "nowhere.root")], tmp_path)
    with pytest.raises(InputFileError, match="matches no file"):
        predictor.predict_files([str(tmp_path / "*.root")], tmp_path)
    with pytest.raises(BundleError, match="no-model"):
        Predictor.from_bundle(tmp_path / "no-model")
    with pytest.raises(ConfigError, match="'nanoaod'.*demo.h5 is HDF5"):
        Predictor.from_bundle(demo_chain.bundle, formats="nanoaod").predict_files(
            [str(demo_chain.h5)], tmp_path
        )
    with pytest.raises(ConfigError, match="hist_class 'signl'.*Did you mean 'signal'"):
        Predictor.from_bundle(demo_chain.bundle, hist_class="signl").predict_fileset(
            {"new": [str(demo_chain.files["new"][0])]}, tmp_path
        )


def test_real_nanoaod_and_the_empty_file(demo_chain, nanoaod_dir, tmp_path):
    predictor = Predictor.from_bundle(demo_chain.bundle, formats=["hdf5", "friend"])
    paths = predictor.predict_files(
        [str(nanoaod_dir / "nano_dy.root"), str(nanoaod_dir / "nano_dy_empty.root")], tmp_path
    )
    assert [p.name for p in paths] == [
        "nano_dy.h5",
        "nano_dy.friend.root",
        "nano_dy_empty.h5",
        "nano_dy_empty.friend.root",
    ]
    with h5py.File(paths[0]) as f:
        n = len(f["scores"])
        assert f["scores"].shape == (n, 2) and f["event_id"].shape == (n, 3)
    with uproot.open(paths[1]) as f:
        assert f["Friends"].num_entries == 40
        assert f["Friends"]["score_selected"].array(library="np").sum() == n
    with h5py.File(paths[2]) as f:
        assert f["scores"].shape == (0, 2)
        assert f.attrs["n_events"] == 0
    with uproot.open(paths[3]) as f:
        assert f["Friends"].num_entries == 0


def test_export_cmssw_is_enough_to_reproduce_the_scores(demo_chain, tmp_path):
    """What a CMSSW producer does with the JSON alone (numpy here) gives the Predictor's scores."""
    import onnxruntime

    out = Predictor.from_bundle(demo_chain.bundle).export_cmssw(tmp_path / "cmssw")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "preprocessing.json"]
    spec = json.loads((out / "preprocessing.json").read_text())
    assert spec["input_name"] == "features" and spec["output_name"] == "probabilities"
    assert spec["class_names"] == ["signal", "background"]
    assert spec["padding"]["GoodJet"] == {
        "max_len": 5,
        "sort_by": "pt",
        "descending": True,
        "pad_value": 0.0,
    }
    assert len(spec["input_layout"]) == spec["n_inputs"]
    assert spec["input_layout"][:1] + [
        x for x in spec["input_layout"] if x.startswith("GoodJet.pt")
    ] == [
        spec["features"][0]["name"],
        *(f"GoodJet.pt[{i}]" for i in range(5)),
    ]

    cols = _h5_columns(demo_chain.h5)
    rows = np.zeros((len(cols["label"]), spec["n_inputs"]), np.float32)
    for feat in spec["features"]:
        lo, hi = feat["offset"], feat["offset"] + feat["length"]
        if feat["kind"] == "scalar":
            x = cols[f"scalars/{feat['name']}"][:, None]
            real = np.ones_like(x, bool)
        else:
            x = cols[f"objects/{feat['collection']}/{feat['field']}"]
            real = cols[f"objects/{feat['collection']}/mask"]
        rows[:, lo:hi] = np.where(real, (x - feat["mean"]) / feat["std"], spec["empty_slot_value"])
    session = onnxruntime.InferenceSession(str(out / spec["model"]))
    (probabilities,) = session.run([spec["output_name"]], {spec["input_name"]: rows})
    expected = Predictor.from_bundle(demo_chain.bundle).predict(str(demo_chain.h5))
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


@pytest.mark.slow
def test_files_mapped_over_a_local_cluster_of_two_workers(demo_chain, tmp_path):
    files = [str(demo_chain.files[n][0]) for n in ("ttbar", "wjets", "dy", "new")]
    here = Predictor.from_bundle(demo_chain.bundle, formats=["friend"]).predict_files(
        files, tmp_path / "here"
    )
    there = Predictor.from_bundle(
        demo_chain.bundle, formats=["friend"], cluster={"type": "local", "workers": 2}
    ).predict_files(files, tmp_path / "there")
    assert there.scored == files and [p.name for p in there] == [p.name for p in here]
    for a, b in zip(here, there, strict=True):
        with uproot.open(a) as fa, uproot.open(b) as fb:
            np.testing.assert_array_equal(
                fa["Friends"]["score_signal"].array(library="np"),
                fb["Friends"]["score_signal"].array(library="np"),
            )


@pytest.mark.slurm
@pytest.mark.slow
def test_files_mapped_over_slurm(demo_chain, slurm_cluster, tmp_path):  # noqa: F811
    files = [str(demo_chain.files[n][0]) for n in ("ttbar", "new")]
    script = tmp_path / "job.py"
    script.write_text(
        f"""
from cmsmlkit import Predictor
report = Predictor.from_bundle(
    {str(demo_chain.bundle)!r},
    formats=["friend"],
    cluster={{"type": "slurm", "partition": {slurm_cluster.partition!r}, "interface": "lo",
             "workers": 1}},
).predict_files({files!r}, {str(tmp_path / "out")!r})
print("SCORED", len(report.scored))
"""
    )
    done = slurm_cluster.python(script, cwd=tmp_path)
    assert done.stdout.strip().splitlines()[-1] == "SCORED 2"
    expected = Predictor.from_bundle(demo_chain.bundle).predict(files[1], aligned=True)
    with uproot.open(tmp_path / "out" / "new.friend.root") as f:
        np.testing.assert_allclose(
            f["Friends"]["score_signal"].array(library="np"), expected[:, 0], atol=1e-7
        )


def test_repr_names_the_bundle(demo_chain):
    predictor = Predictor(bundle=str(demo_chain.bundle))
    assert "not loaded yet" in repr(predictor)
    _ = predictor.bundle
    assert "signal" in repr(predictor) and "backend='torch'" in repr(predictor)


def test_friend_tree_compression_is_configurable(demo_chain, tmp_path):
    new = str(demo_chain.files["new"][0])
    predictor = Predictor.from_bundle(demo_chain.bundle, formats=["friend"], compression="zlib")
    (path,) = predictor.predict_files([new], tmp_path)
    with uproot.open(path) as friend:
        assert type(friend.file.compression).__name__ == "ZLIB"
        assert friend["Friends"].num_entries == 1500


def test_scores_do_not_depend_on_the_chunk_size(demo_chain, tmp_path):
    """predict.chunksize only changes how the file is read: the same scores in the same entries."""
    new = str(demo_chain.files["new"][0])
    whole = Predictor.from_bundle(demo_chain.bundle, formats=["friend"])
    (one,) = whole.predict_files([new], tmp_path / "one")
    pieces = Predictor.from_bundle(demo_chain.bundle, formats=["friend"], chunksize=400)
    assert pieces.skimmer.config.chunksize == 400
    (many,) = pieces.predict_files([new], tmp_path / "many")
    with uproot.open(one) as a, uproot.open(many) as b:
        first, second = a["Friends"].arrays(library="np"), b["Friends"].arrays(library="np")
    assert len(first["event"]) == 1500 and 0 < first["score_selected"].sum() < 1500
    for key, values in first.items():
        np.testing.assert_array_equal(second[key], values)
