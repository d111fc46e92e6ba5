"""Tests of cmsmlkit.data.skim: the Skimmer on generated and on real NanoAOD."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot

from cmsmlkit.config import SkimConfig
from cmsmlkit.data.skim import Skimmer, SkimResult
from cmsmlkit.errors import (
    ConfigError,
    EmptySelectionError,
    ExpressionError,
    InputFileError,
    MissingBranchError,
)

# --------------------------------------------------------------------------- generated NanoAOD


def make_events(n: int, seed: int) -> dict[str, np.ndarray]:
    """Flat NanoAOD-like columns: counters, per-object fields, MET, event id, genWeight."""
    rng = np.random.default_rng(seed)
    n_jet = rng.poisson(3.0, n)
    n_mu = rng.poisson(0.8, n)
    nj, nm = int(n_jet.sum()), int(n_mu.sum())
    return {
        "nJet": n_jet.astype(np.int32),
        "Jet_pt": rng.exponential(30.0, nj).astype(np.float32) + 15,
        "Jet_eta": rng.uniform(-3.0, 3.0, nj).astype(np.float32),
        "Jet_phi": rng.uniform(-np.pi, np.pi, nj).astype(np.float32),
        "Jet_mass": rng.uniform(2.0, 15.0, nj).astype(np.float32),
        "Jet_btagDeepFlavB": rng.uniform(0.0, 1.0, nj).astype(np.float32),
        "Jet_jetId": rng.choice([0, 2, 6], nj).astype(np.int32),
        "nMuon": n_mu.astype(np.int32),
        "Muon_pt": rng.exponential(20.0, nm).astype(np.float32) + 5,
        "Muon_eta": rng.uniform(-2.4, 2.4, nm).astype(np.float32),
        "Muon_phi": rng.uniform(-np.pi, np.pi, nm).astype(np.float32),
        "Muon_mass": np.full(nm, 0.1057, np.float32),
        "Muon_charge": rng.choice([-1, 1], nm).astype(np.int32),
        "Muon_tightId": rng.uniform(0, 1, nm) > 0.3,
        "MET_pt": rng.exponential(40.0, n).astype(np.float32),
        "MET_phi": rng.uniform(-np.pi, np.pi, n).astype(np.float32),
        "run": np.ones(n, np.uint32),
        "luminosityBlock": (np.arange(n) // 50 + 1).astype(np.uint32),
        "event": (np.arange(n) + 1000 * seed).astype(np.uint64),
        "genWeight": rng.choice([1.5, -0.5], n, p=[0.8, 0.2]).astype(np.float32),
    }


def write_nano(path: Path, columns: dict[str, np.ndarray], step: int = 120) -> Path:
    """Write ``columns`` as a TTree Events (counters nJet, nMuon) with uproot mktree + extend."""

    def records(prefix: str, counts: np.ndarray, start: int, stop: int) -> ak.Array:
        offsets = np.concatenate([[0], np.cumsum(counts)])
        lo, hi = offsets[start], offsets[stop]
        fields = {
            k[len(prefix) + 1 :]: v[lo:hi] for k, v in columns.items() if k.startswith(prefix + "_")
        }
        return ak.unflatten(ak.zip(fields, depth_limit=1), counts[start:stop])

    n = len(columns["run"])
    scalars = ["MET_pt", "MET_phi", "run", "luminosityBlock", "event", "genWeight"]
    with uproot.recreate(path) as file:
        tree = None
        for start in range(0, n, step):
            stop = min(start + step, n)
            chunk = {
                "Jet": records("Jet", columns["nJet"], start, stop),
                "Muon": records("Muon", columns["nMuon"], start, stop),
                **{k: columns[k][start:stop] for k in scalars},
            }
            if tree is None:
                tree = file.mktree(
                    "Events",
                    {k: v.type if isinstance(v, ak.Array) else v.dtype for k, v in chunk.items()},
                )
            tree.extend(chunk)
    return path


def jagged(columns: dict[str, np.ndarray], name: str) -> ak.Array:
    return ak.unflatten(columns[name], columns["n" + name.split("_")[0]])


SELECTION = {
    "objects": {
        "GoodJet": {"from": "Jet", "where": "pt > 25 & abs(eta) < 2.4 & jetId >= 2"},
        "BJet": {"from": "GoodJet", "where": "btagDeepFlavB > 0.5"},
        "GoodMuon": {"from": "Muon", "where": "pt > 10 & tightId"},
    },
    "cuts": ["num(GoodJet) >= 2", "MET.pt > 20"],
    "variables": {
        "ht": "sum(GoodJet.pt)",
        "lead_jet_pt": "GoodJet.pt[:, 0]",
        "n_b": "num(BJet)",
        "met": "MET.pt",
        "ht_plus_met": "ht + met",
    },
}
COLLECTIONS = {"GoodJet": ["pt", "eta", "btag*"], "GoodMuon": ["*"]}


def reference(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The selection of SELECTION computed with plain numpy/awkward, for exact comparison."""
    pt, eta = jagged(columns, "Jet_pt"), jagged(columns, "Jet_eta")
    good = (pt > 25) & (abs(eta) < 2.4) & (jagged(columns, "Jet_jetId") >= 2)
    n_good = ak.to_numpy(ak.sum(good, axis=1))
    cut1 = n_good >= 2
    cut2 = cut1 & (columns["MET_pt"] > 20)
    w = columns["genWeight"].astype(np.float64)
    btag = jagged(columns, "Jet_btagDeepFlavB")
    return {
        "cut1": cut1,
        "cut2": cut2,
        "w": w,
        "ht": ak.to_numpy(ak.sum(pt[good], axis=1))[cut2],
        "lead": ak.to_numpy(ak.firsts(pt[good]))[cut2],
        "n_b": ak.to_numpy(ak.sum(good & (btag > 0.5), axis=1))[cut2],
        "event": columns["event"][cut2],
    }


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, object]:
    """Two generated datasets: signal (300 events in two files) and background (200 events)."""
    d = tmp_path_factory.mktemp("skim_toy")
    sig_a, sig_b, bkg = make_events(180, 1), make_events(120, 2), make_events(200, 3)
    files = {
        "sig_a": write_nano(d / "sig_a.root", sig_a),
        "sig_b": write_nano(d / "sig_b.root", sig_b),
        "bkg": write_nano(d / "bkg.root", bkg),
    }
    fileset = {
        "sig": {
            "files": {str(files["sig_a"]): "Events", str(files["sig_b"]): "Events"},
            "metadata": {"dataset": "sig", "label": "signal", "is_mc": True, "xsec": 2.0},
        },
        "bkg": {
            "files": {str(files["bkg"]): "Events"},
            "metadata": {"dataset": "bkg", "label": "background", "is_mc": True},
        },
    }
    sig = {k: np.concatenate([sig_a[k], sig_b[k]]) for k in sig_a}
    return {"dir": d, "files": files, "fileset": fileset, "columns": {"sig": sig, "bkg": bkg}}


@pytest.fixture(scope="module")
def toy_result(toy) -> SkimResult:
    return Skimmer(selection=SELECTION, collections=COLLECTIONS).run(toy["fileset"])


# --------------------------------------------------------------------------- construction


def test_constructor_parses_everything_and_opens_nothing():
    skimmer = Skimmer(SkimConfig(selection=SELECTION), chunksize=50)
    assert skimmer.config.chunksize == 50
    assert repr(skimmer) == (
        "Skimmer(objects=['GoodJet', 'BJet', 'GoodMuon'], cuts=['num(GoodJet) >= 2', "
        "'MET.pt > 20'], variables=['ht', 'lead_jet_pt', 'n_b', 'met', 'ht_plus_met'], "
        "collections=['GoodJet', 'BJet', 'GoodMuon'], cluster='local')"
    )


def test_bad_expression_fails_at_construction():
    with pytest.raises(ExpressionError) as info:
        Skimmer(selection={"cuts": ["num(GoodJet) >= 2", "MET.pt > 30 &"]})
    assert str(info.value).startswith("expression in skim.selection.cuts[1]:\n    MET.pt > 30 &")
    with pytest.raises(ExpressionError, match=r"skim.selection.objects.J.where"):
        Skimmer(selection={"objects": {"J": {"from": "Jet", "where": "pt.__class__"}}})


def test_cut_on_a_variable_is_refused():
    with pytest.raises(ExpressionError) as info:
        Skimmer(selection={"cuts": ["ht > 100"], "variables": {"ht": "sum(Jet.pt)"}})
    assert str(info.value) == (
        "skim.selection.cuts[0] ('ht > 100') uses the variable(s) ht, but variables are "
        "computed after the cuts; write their expression into the cut instead."
    )


def test_object_from_a_later_object_is_refused():
    objects = {"B": {"from": "A", "where": "pt > 1"}, "A": {"from": "Jet", "where": "pt > 2"}}
    with pytest.raises(ConfigError, match="defined later; objects are built in order, so move 'A'"):
        Skimmer(selection={"objects": objects})


def test_variable_named_like_an_event_column_is_refused():
    with pytest.raises(ConfigError, match="skim.selection.variables.event: 'event' is already"):
        Skimmer(selection={"variables": {"event": "MET.pt"}})


def test_unknown_config_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="Did you mean 'chunksize'"):
        Skimmer(chunksze=10)


# --------------------------------------------------------------------------- values


def test_cutflow_equals_numpy_reference(toy, toy_result):
    for dataset in ("sig", "bkg"):
        cols = toy["columns"][dataset]
        ref = reference(cols)
        flow = toy_result.cutflow[dataset]
        assert list(flow) == ["all", "num(GoodJet) >= 2", "MET.pt > 20"]
        assert flow["all"]["events"] == len(cols["run"])
        assert flow["num(GoodJet) >= 2"]["events"] == int(ref["cut1"].sum())
        assert flow["MET.pt > 20"]["events"] == int(ref["cut2"].sum())
        assert flow["all"]["sumw"] == pytest.approx(ref["w"].sum())
        assert flow["num(GoodJet) >= 2"]["sumw"] == pytest.approx(ref["w"][ref["cut1"]].sum())
        assert flow["MET.pt > 20"]["sumw"] == pytest.approx(ref["w"][ref["cut2"]].sum())


def test_variables_equal_numpy_reference(toy, toy_result):
    for dataset in ("sig", "bkg"):
        ref = reference(toy["columns"][dataset])
        arr = toy_result.arrays[dataset]
        assert len(arr) == int(ref["cut2"].sum())
        np.testing.assert_allclose(ak.to_numpy(arr.ht), ref["ht"], rtol=1e-6)
        np.testing.assert_allclose(ak.to_numpy(arr.lead_jet_pt), ref["lead"], rtol=1e-6)
        np.testing.assert_array_equal(ak.to_numpy(arr.n_b), ref["n_b"])
        np.testing.assert_allclose(
            ak.to_numpy(arr.ht_plus_met), ak.to_numpy(arr.ht + arr.met), rtol=1e-12
        )
        np.testing.assert_array_equal(ak.to_numpy(arr.event), ref["event"])


def test_kept_fields_and_types(toy_result):
    arr = toy_result.arrays["sig"]
    assert arr.fields == [
        "ht",
        "lead_jet_pt",
        "n_b",
        "met",
        "ht_plus_met",
        "GoodJet",
        "GoodMuon",
        "run",
        "luminosityBlock",
        "event",
        "genWeight",
    ]
    assert arr.GoodJet.fields == ["pt", "eta", "btagDeepFlavB"]
    assert arr.GoodMuon.fields == ["pt", "eta", "phi", "mass", "charge", "tightId"]
    assert (
        str(arr.GoodJet.type.content) == "var * {pt: float32, eta: float32, btagDeepFlavB: float32}"
    )
    for name in ("ht", "lead_jet_pt", "n_b", "met", "genWeight"):
        assert ak.to_numpy(arr[name]).dtype == np.float64
    for name in ("run", "luminosityBlock", "event"):
        assert ak.to_numpy(arr[name]).dtype == np.int64
    # objects really are selected
    assert ak.all(arr.GoodJet.pt > 25) and ak.all(abs(arr.GoodJet.eta) < 2.4)
    assert ak.all(arr.GoodMuon.tightId) and ak.all(arr.GoodMuon.pt > 10)
    np.testing.assert_allclose(
        ak.to_numpy(ak.sum(arr.GoodJet.pt, axis=1)), ak.to_numpy(arr.ht), rtol=1e-6
    )


def test_metadata_and_class_names(toy, toy_result):
    meta = toy_result.metadata["sig"]
    cols = toy["columns"]["sig"]
    assert meta["label"] == "signal" and meta["xsec"] == 2.0 and meta["dataset"] == "sig"
    assert meta["sumw"] == pytest.approx(cols["genWeight"].astype(np.float64).sum())
    assert meta["files"] == [str(toy["files"]["sig_a"]), str(toy["files"]["sig_b"])]
    assert "skipped_files" not in meta
    assert toy_result.class_names == ["signal", "background"]
    assert toy_result.n_events == len(toy_result.arrays["sig"]) + len(toy_result.arrays["bkg"])


def test_chunked_run_equals_single_chunk_run(toy, toy_result):
    chunked = Skimmer(selection=SELECTION, collections=COLLECTIONS, chunksize=37).run(
        toy["fileset"]
    )
    for dataset in ("sig", "bkg"):
        assert ak.to_list(chunked.arrays[dataset]) == ak.to_list(toy_result.arrays[dataset])
        assert chunked.cutflow[dataset].keys() == toy_result.cutflow[dataset].keys()
        for step, values in toy_result.cutflow[dataset].items():
            assert chunked.cutflow[dataset][step]["events"] == values["events"]
            assert chunked.cutflow[dataset][step]["sumw"] == pytest.approx(values["sumw"])


def test_empty_collections_keep_every_object_with_all_branch_fields(toy):
    result = Skimmer(selection={"objects": {"GoodMuon": {"from": "Muon", "where": "tightId"}}}).run(
        {"bkg": [str(toy["files"]["bkg"])]}
    )
    arr = result.arrays["bkg"]
    assert arr.fields == ["GoodMuon", "run", "luminosityBlock", "event", "genWeight"]
    assert arr.GoodMuon.fields == ["pt", "eta", "phi", "mass", "charge", "tightId"]
    assert len(arr) == 200
    assert result.cutflow["bkg"] == {
        "all": {
            "events": 200,
            "sumw": pytest.approx(toy["columns"]["bkg"]["genWeight"].astype(np.float64).sum()),
        }
    }
    assert result.class_names == ["bkg"]


def test_cutflow_table_repr_and_html(toy_result):
    table = toy_result.cutflow_table()
    lines = table.splitlines()
    assert lines[0].split() == ["cut", "sig", "bkg"]
    assert lines[1].split()[0] == "all"
    assert lines[1].split()[1:] == ["300", "200"]
    assert lines[2].startswith("num(GoodJet) >= 2")
    assert "%" in lines[2]
    assert repr(toy_result).startswith(
        f"SkimResult(2 dataset(s), {toy_result.n_events} selected event(s), "
        "classes=['signal', 'background'])\ncut"
    )
    html = toy_result._repr_html_()
    assert "<table>" in html and "<code>MET.pt &gt; 20</code>" in html


def test_cutflow_table_by_hand():
    result = SkimResult(
        arrays={"a": ak.Array([{"x": 1.0}])},
        cutflow={"a": {"all": {"events": 4, "sumw": 4.0}, "x > 0": {"events": 1, "sumw": 1.0}}},
        metadata={"a": {}},
        class_names=["a"],
    )
    assert result.cutflow_table() == "cut            a\nall            4\nx > 0  1 (25.0%)"
    assert result.n_events == 1


# --------------------------------------------------------------------------- hooks and output


def test_function_hook_runs_before_the_selection(toy):
    def high_met(events):
        return events[events.MET.pt > 50]

    result = Skimmer(
        selection={"cuts": ["num(Jet) >= 1"], "variables": {"met": "MET.pt"}},
        collections={"Jet": ["pt"]},
        function=high_met,
    ).run({"bkg": [str(toy["files"]["bkg"])]})
    cols = toy["columns"]["bkg"]
    keep = (cols["MET_pt"] > 50) & (cols["nJet"] >= 1)
    flow = result.cutflow["bkg"]
    assert list(flow) == ["all", "function high_met", "num(Jet) >= 1"]
    assert flow["all"]["events"] == 200
    assert flow["function high_met"]["events"] == int((cols["MET_pt"] > 50).sum())
    assert flow["num(Jet) >= 1"]["events"] == int(keep.sum())
    np.testing.assert_allclose(ak.to_numpy(result.arrays["bkg"].met), cols["MET_pt"][keep])


def test_output_root_files_are_readable(toy, toy_result, tmp_path):
    out = tmp_path / "skims"
    result = Skimmer(selection=SELECTION, collections=COLLECTIONS, output=str(out)).run(
        toy["fileset"]
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "bkg.root",
        "cutflow.json",
        "sig.root",
        "skim.json",
    ]
    with uproot.open(out / "sig.root") as file:
        tree = file["Events"]
        assert tree.num_entries == len(toy_result.arrays["sig"])
        keys = tree.keys()
        assert {
            "nGoodJet",
            "GoodJet_pt",
            "GoodJet_btagDeepFlavB",
            "nGoodMuon",
            "GoodMuon_tightId",
        } <= set(keys)
        assert {"ht", "lead_jet_pt", "run", "luminosityBlock", "event", "genWeight"} <= set(keys)
        data = tree.arrays(["ht", "nGoodJet", "GoodJet_pt", "event"])
    arr = result.arrays["sig"]
    np.testing.assert_allclose(ak.to_numpy(data.ht), ak.to_numpy(arr.ht))
    np.testing.assert_array_equal(ak.to_numpy(data.nGoodJet), ak.to_numpy(ak.num(arr.GoodJet)))
    assert ak.to_list(data.GoodJet_pt) == ak.to_list(arr.GoodJet.pt)
    np.testing.assert_array_equal(ak.to_numpy(data.event), ak.to_numpy(arr.event))


# --------------------------------------------------------------------------- errors


def test_missing_field_names_file_expression_branch_and_suggestion(toy):
    path = str(toy["files"]["bkg"])
    skimmer = Skimmer(selection={"variables": {"x": "sum(Jet.ptt)"}})
    with pytest.raises(MissingBranchError) as info:
        skimmer.run({"bkg": [path]})
    assert str(info.value) == (
        "skim.selection.variables.x ('sum(Jet.ptt)') needs the branch 'Jet_ptt', which is not "
        f"in {path}. Did you mean 'Jet_pt'?"
    )


def test_missing_field_in_object_where(toy):
    path = str(toy["files"]["bkg"])
    skimmer = Skimmer(selection={"objects": {"J": {"from": "Jet", "where": "btagDeepFlav > 0.5"}}})
    with pytest.raises(MissingBranchError) as info:
        skimmer.run({"bkg": [path]})
    assert str(info.value) == (
        "skim.selection.objects.J.where ('btagDeepFlav > 0.5') needs the branch "
        f"'Jet_btagDeepFlav', which is not in {path}. Did you mean 'Jet_btagDeepFlavB'?"
    )


def test_missing_collection_suggests_a_close_one(toy):
    path = str(toy["files"]["bkg"])
    with pytest.raises(MissingBranchError) as info:
        Skimmer(selection={"cuts": ["num(Jets) >= 1"]}).run({"bkg": [path]})
    assert "skim.selection.cuts[0] ('num(Jets) >= 1') needs the branch 'Jets'" in str(info.value)
    assert "Did you mean 'Jet'?" in str(info.value)
    with pytest.raises(MissingBranchError) as info:
        Skimmer(selection={"objects": {"E": {"from": "Electron"}}}).run({"bkg": [path]})
    assert str(info.value).startswith(
        "skim.selection.objects.E.from: no collection 'Electron' (no branch nElectron or "
        f"Electron_*) in {path} (dataset 'bkg')."
    )


def test_missing_kept_field(toy):
    path = str(toy["files"]["bkg"])
    with pytest.raises(MissingBranchError) as info:
        Skimmer(collections={"Muon": ["pt", "isolation"]}).run({"bkg": [path]})
    assert str(info.value).startswith(
        f"skim.collections.Muon lists 'isolation' needs the branch 'Muon_isolation', which is not in {path}."
    )


def test_corrupt_file_is_an_input_file_error(tmp_path):
    bad = tmp_path / "garbage.root"
    bad.write_bytes(b"this is not a ROOT file at all" * 10)
    with pytest.raises(InputFileError) as info:
        Skimmer().run({"x": [str(bad)]})
    text = str(info.value)
    assert text.startswith(f"cannot read {bad} as a ROOT file (")
    assert "set skim.skip_bad_files: true" in text
    assert not isinstance(info.value, MissingBranchError)


def test_missing_file_is_an_input_file_error(tmp_path):
    with pytest.raises(InputFileError, match=r"input file .*nope\.root does not exist"):
        Skimmer().run({"x": [str(tmp_path / "nope.root")]})


def test_file_without_the_tree(tmp_path):
    path = tmp_path / "other.root"
    with uproot.recreate(path) as file:
        file.mktree("Event", {"x": np.float32}).extend({"x": np.zeros(2, np.float32)})
    with pytest.raises(InputFileError, match=r"has no tree 'Events'\. Did you mean 'Event'\?"):
        Skimmer().run({"x": [str(path)]})


def test_skip_bad_files_skips_and_records(toy, tmp_path, caplog):
    bad = tmp_path / "garbage.root"
    bad.write_bytes(b"\x00garbage" * 50)
    good = str(toy["files"]["bkg"])
    with caplog.at_level(logging.WARNING, logger="cmsmlkit.data.skim"):
        result = Skimmer(selection=SELECTION, collections=COLLECTIONS, skip_bad_files=True).run(
            {"bkg": {"files": {str(bad): "Events", good: "Events"}, "metadata": {"label": "b"}}}
        )
    assert result.metadata["bkg"]["skipped_files"] == [str(bad)]
    assert result.metadata["bkg"]["files"] == [good]
    assert result.cutflow["bkg"]["all"]["events"] == 200
    assert any(str(bad) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_empty_selection_names_the_cut(toy):
    skimmer = Skimmer(selection={"cuts": ["num(Jet) >= 1", "MET.pt > 1e9", "MET.pt > 2e9"]})
    with pytest.raises(EmptySelectionError) as info:
        skimmer.run({"bkg": [str(toy["files"]["bkg"])]})
    text = str(info.value)
    assert text.startswith(
        "no event of any dataset passes the selection: nothing is left after the cut "
        "'MET.pt > 1e9'. Loosen that cut"
    )
    assert "Cutflow:\ncut" in text
    assert "MET.pt > 1e9" in text.splitlines()[-2]


def test_jagged_index_error_during_the_run(toy):
    skimmer = Skimmer(selection={"variables": {"third": "Jet.pt[:, 2]"}})
    with pytest.raises(ExpressionError) as info:
        skimmer.run({"bkg": [str(toy["files"]["bkg"])]})
    cols = toy["columns"]["bkg"]
    short = int((cols["nJet"] < 3).sum())
    assert f"{short} of 200 events have fewer than 3 object(s) in Jet.pt" in str(info.value)
    assert 'e.g. "num(Jet) >= 3"' in str(info.value)
    assert str(info.value).startswith("expression in skim.selection.variables.third:")


def test_cut_giving_a_list_per_event_is_refused(toy):
    with pytest.raises(
        ExpressionError, match=r"a cut must give one number per event, but this gives a list"
    ):
        Skimmer(selection={"cuts": ["Jet.pt > 30"]}).run({"bkg": [str(toy["files"]["bkg"])]})


def test_config_from_a_yaml_path_and_a_source_object(toy, tmp_path):
    path = tmp_path / "skim.yaml"
    path.write_text("selection:\n  cuts: ['num(Jet) >= 1', 'num(Jet) >= 1']\nchunksize: 64\n")

    class Source:  # anything with .fileset(), like NanoAODSource
        def fileset(self):
            return {"bkg": {"files": {str(toy["files"]["bkg"]): "Events"}, "metadata": {}}}

    skimmer = Skimmer(path)
    assert skimmer.config.chunksize == 64
    result = skimmer.run(Source())
    n = int((toy["columns"]["bkg"]["nJet"] >= 1).sum())
    assert list(result.cutflow["bkg"]) == ["all", "num(Jet) >= 1", "num(Jet) >= 1 (cuts[1])"]
    assert (
        result.cutflow["bkg"]["num(Jet) >= 1 (cuts[1])"]["events"] == n == len(result.arrays["bkg"])
    )


@pytest.mark.slow
def test_dask_cluster_gives_the_same_result(toy, toy_result):
    result = Skimmer(
        selection=SELECTION, collections=COLLECTIONS, chunksize=64, cluster={"workers": 2}
    ).run(toy["fileset"])
    for dataset in ("sig", "bkg"):
        assert ak.to_list(result.arrays[dataset]) == ak.to_list(toy_result.arrays[dataset])
        assert result.cutflow[dataset]["MET.pt > 20"]["events"] == len(toy_result.arrays[dataset])


# --------------------------------------------------------------------------- demo (toy module)


def test_demo_files_with_the_demo_selection(demo_files):
    from importlib.resources import files

    import yaml

    skim = yaml.safe_load(files("cmsmlkit").joinpath("resources/demo.yaml").read_text())["skim"]
    fileset = {
        name: {"files": {str(p): "Events" for p in paths}, "metadata": {"label": name}}
        for name, paths in demo_files.items()
        if name in ("ttbar", "dy")
    }
    result = Skimmer(skim).run(fileset)
    assert set(result.arrays) == {"ttbar", "dy"}
    for name, arr in result.arrays.items():
        flow = result.cutflow[name]
        assert list(flow) == ["all", "num(GoodJet) >= 2", "num(GoodMuon) + num(GoodElectron) >= 1"]
        assert flow["all"]["events"] == 1500
        assert len(arr) == flow["num(GoodMuon) + num(GoodElectron) >= 1"]["events"] > 0
        assert ak.all(ak.num(arr.GoodJet) >= 2)
        assert arr.GoodJet.fields == ["pt", "eta", "phi", "mass", "btagDeepFlavB"]
        np.testing.assert_allclose(
            ak.to_numpy(arr.lead_jet_pt), ak.to_numpy(arr.GoodJet.pt[:, 0]), rtol=1e-6
        )
        np.testing.assert_allclose(
            ak.to_numpy(arr.ht), ak.to_numpy(ak.sum(arr.GoodJet.pt, axis=1)), rtol=1e-6
        )


# --------------------------------------------------------------------------- real NanoAOD


@pytest.fixture(scope="module")
def real_result(nanoaod_dir) -> SkimResult:
    selection = {
        "objects": {"GoodJet": {"from": "Jet", "where": "pt > 25 & abs(eta) < 2.4 & jetId >= 2"}},
        "cuts": ["num(GoodJet) >= 1"],
        "variables": {
            "ht": "sum(GoodJet.pt)",
            "lead_jet_pt": "GoodJet.pt[:, 0]",
            "met": "MET.pt",
            "puppimet": "PuppiMET.pt",
        },
    }
    fileset = {
        name: {"files": {str(nanoaod_dir / f"{name}.root"): "Events"}, "metadata": {"label": name}}
        for name in ("nano_dy", "nano_tt_v12", "nano_dy_empty")
    }
    return Skimmer(selection=selection, collections={"GoodJet": ["pt", "eta", "phi"]}).run(fileset)


@pytest.mark.slow
def test_real_nanoaod_values_equal_uproot(nanoaod_dir, real_result):
    for name in ("nano_dy", "nano_tt_v12"):
        with uproot.open(nanoaod_dir / f"{name}.root") as file:
            raw = file["Events"].arrays(
                ["Jet_pt", "Jet_eta", "Jet_jetId", "MET_pt", "PuppiMET_pt", "genWeight", "event"]
            )
        good = (raw.Jet_pt > 25) & (abs(raw.Jet_eta) < 2.4) & (raw.Jet_jetId >= 2)
        sel = ak.to_numpy(ak.sum(good, axis=1) >= 1)
        arr = real_result.arrays[name]
        flow = real_result.cutflow[name]
        assert flow["all"]["events"] == len(raw)
        assert flow["num(GoodJet) >= 1"]["events"] == int(sel.sum()) == len(arr)
        assert real_result.metadata[name]["sumw"] == pytest.approx(
            float(np.sum(ak.to_numpy(raw.genWeight).astype(np.float64)))
        )
        np.testing.assert_allclose(
            ak.to_numpy(arr.ht), ak.to_numpy(ak.sum(raw.Jet_pt[good], axis=1))[sel], rtol=1e-6
        )
        # MET and PuppiMET are different collections in the same file
        np.testing.assert_allclose(ak.to_numpy(arr.met), ak.to_numpy(raw.MET_pt)[sel], rtol=1e-6)
        np.testing.assert_allclose(
            ak.to_numpy(arr.puppimet), ak.to_numpy(raw.PuppiMET_pt)[sel], rtol=1e-6
        )
        np.testing.assert_array_equal(ak.to_numpy(arr.event), ak.to_numpy(raw.event)[sel])
    assert real_result.cutflow["nano_dy"]["all"]["events"] == 40
    assert real_result.cutflow["nano_tt_v12"]["all"]["events"] == 200


@pytest.mark.slow
def test_real_empty_file_gives_empty_arrays(real_result):
    arr = real_result.arrays["nano_dy_empty"]
    assert len(arr) == 0
    assert arr.fields == real_result.arrays["nano_dy"].fields
    assert arr.GoodJet.fields == ["pt", "eta", "phi"]
    assert real_result.cutflow["nano_dy_empty"] == {
        "all": {"events": 0, "sumw": 0.0},
        "num(GoodJet) >= 1": {"events": 0, "sumw": 0.0},
    }
    assert real_result.metadata["nano_dy_empty"]["sumw"] == 0.0
    assert real_result.class_names == ["nano_dy", "nano_tt_v12", "nano_dy_empty"]


@pytest.mark.slow
def test_real_missing_branch_lists_close_matches(nanoaod_dir):
    path = str(nanoaod_dir / "nano_dy.root")
    with pytest.raises(MissingBranchError) as info:
        Skimmer(selection={"variables": {"m": "PuppiMET.ptt"}}).run({"dy": [path]})
    assert str(info.value).startswith(
        "skim.selection.variables.m ('PuppiMET.ptt') needs the branch 'PuppiMET_ptt', which is "
        f"not in {path}. Did you mean 'PuppiMET_pt'"
    )


# --------------------------------------------------------------------------- the selection language


def test_dataset_cuts_and_golden_json_lumi_mask(toy, tmp_path):
    golden = tmp_path / "golden.json"
    golden.write_text('{"1": [[1, 2], [4, 4]]}')  # run 1: lumi blocks 1-2 and 4
    path = str(toy["files"]["bkg"])
    fileset = {
        "data": {
            "files": {path: "Events"},
            "metadata": {
                "label": "observed",
                "is_mc": False,
                "lumi_mask": str(golden),
                "cuts": ["MET.pt > 10", "num(GoodJet) >= 2"],
            },
        },
        "mc": {"files": {path: "Events"}, "metadata": {"label": "sim"}},
    }
    result = Skimmer(selection=SELECTION, collections=COLLECTIONS).run(fileset)
    cols = toy["columns"]["bkg"]
    ref = reference(cols)
    certified = np.isin(cols["luminosityBlock"], [1, 2, 4])
    met10 = certified & (cols["MET_pt"] > 10)
    dataset_cut = met10 & ref["cut1"]
    final = dataset_cut & ref["cut2"]
    flow = result.cutflow["data"]
    assert list(flow) == [
        "all",
        "lumi_mask",
        "MET.pt > 10",
        "num(GoodJet) >= 2 (source.datasets.data.cuts[1])",
        "num(GoodJet) >= 2",
        "MET.pt > 20",
    ]
    assert [v["events"] for v in flow.values()] == [
        200,
        int(certified.sum()),
        int(met10.sum()),
        int(dataset_cut.sum()),
        int(dataset_cut.sum()),
        int(final.sum()),
    ]
    assert flow["lumi_mask"]["sumw"] == pytest.approx(float(ref["w"][certified].sum()))
    np.testing.assert_array_equal(ak.to_numpy(result.arrays["data"].event), cols["event"][final])
    # the other dataset has no mask and no extra cuts
    assert list(result.cutflow["mc"]) == ["all", "num(GoodJet) >= 2", "MET.pt > 20"]
    # the table merges both: a dataset's own steps sit where they happen, '-' elsewhere
    rows = [line.split("  ")[0] for line in result.cutflow_table().splitlines()[1:]]
    assert rows == list(flow)
    n_mc = int(ref["cut1"].sum())
    mc_cells = [line.split()[-2:] for line in result.cutflow_table().splitlines()[1:]]
    assert mc_cells[1][-1] == "-" and mc_cells[4] == [str(n_mc), f"({100 * n_mc / 200:.1f}%)"]
    assert len(result.arrays["mc"]) == int(ref["cut2"].sum())


def test_lumi_mask_and_dataset_cut_errors(toy, tmp_path):
    path = str(toy["files"]["bkg"])
    skimmer = Skimmer(selection={"cuts": ["num(Jet) >= 1"], "variables": {"ht": "sum(Jet.pt)"}})

    def run(**meta):
        return skimmer.run({"data": {"files": {path: "Events"}, "metadata": meta}})

    with pytest.raises(InputFileError, match=r"source.datasets.data.lumi_mask: the golden JSON .*"):
        run(lumi_mask=str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"1": [1, 2]}')
    with pytest.raises(InputFileError) as info:
        run(lumi_mask=str(bad))
    assert f"source.datasets.data.lumi_mask: {bad} is not a golden JSON" in str(info.value)
    assert '{"315257": [[1, 88]]}' in str(info.value)
    with pytest.raises(ExpressionError, match=r"source.datasets.data.cuts\[0\] \('ht > 5'\) uses"):
        run(cuts=["ht > 5"])
    with pytest.raises(MissingBranchError) as info:
        run(cuts=["MET.ptt > 5"])
    assert str(info.value) == (
        "source.datasets.data.cuts[0] ('MET.ptt > 5') needs the branch 'MET_ptt', which is not "
        f"in {path}. Did you mean 'MET_pt'?"
    )


def test_pair_mass_delta_r_and_jagged_any_all_in_a_skim(toy):
    selection = {
        "objects": {
            "GoodMuon": {"from": "Muon", "where": "pt > 10"},
            "CleanJet": {"from": "Jet", "where": "pt > 25 & min_delta_r(Jet, GoodMuon) > 0.4"},
        },
        "cuts": ["num(GoodMuon) >= 2", "any(CleanJet.pt > 30) | all(abs(Jet.eta) < 3)"],
        "variables": {
            "m_mumu": "inv_mass(GoodMuon[:, 0], GoodMuon[:, 1])",
            "dr_mumu": "delta_r(GoodMuon[:, 0], GoodMuon[:, 1])",
            "n_clean": "num(CleanJet)",
        },
    }
    result = Skimmer(selection=selection, collections={"GoodMuon": ["pt"]}).run(
        {"sig": {"files": toy["fileset"]["sig"]["files"]}}
    )
    cols = toy["columns"]["sig"]
    mu = {f: jagged(cols, f"Muon_{f}") for f in ("pt", "eta", "phi", "mass")}
    good = mu["pt"] > 10
    two = ak.to_numpy(ak.sum(good, axis=1) >= 2)
    arr = result.arrays["sig"]
    assert result.cutflow["sig"]["num(GoodMuon) >= 2"]["events"] == int(two.sum())
    expected_m, expected_dr = [], []
    for i in np.flatnonzero(two):
        sel = ak.to_numpy(good[i])
        pt, eta, phi, mass = (ak.to_numpy(mu[f][i])[sel][:2].astype(float) for f in mu)
        px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
        e = np.sqrt(px**2 + py**2 + pz**2 + mass**2)
        expected_m.append(
            np.sqrt(max(e.sum() ** 2 - px.sum() ** 2 - py.sum() ** 2 - pz.sum() ** 2, 0))
        )
        dphi = (phi[0] - phi[1] + np.pi) % (2 * np.pi) - np.pi
        expected_dr.append(np.hypot(eta[0] - eta[1], dphi))
    jets = {f: jagged(cols, f"Jet_{f}") for f in ("pt", "eta")}
    passes = ak.to_numpy(ak.any(jets["pt"] > 30, axis=1) | ak.all(abs(jets["eta"]) < 3, axis=1))
    # the jagged any/all cut keeps every event here (|eta| < 3 by construction) or not: compare
    kept = passes[two]
    # float32 inputs: a pair near threshold agrees to 1e-4
    np.testing.assert_allclose(ak.to_numpy(arr.m_mumu), np.array(expected_m)[kept], rtol=1e-4)
    np.testing.assert_allclose(ak.to_numpy(arr.dr_mumu), np.array(expected_dr)[kept], rtol=1e-5)
    assert np.all(ak.to_numpy(arr.n_clean) <= ak.to_numpy(ak.num(jets["pt"]))[two][kept])


# --------------------------------------------------------------------------- outputs


def test_keep_and_drop_lists_with_wildcards(toy, toy_result):
    result = Skimmer(
        selection=SELECTION,
        collections=COLLECTIONS,
        keep=["MET_*"],
        drop=["lead_*", "GoodJet_eta", "GoodMuon_*"],
    ).run(toy["fileset"])
    arr = result.arrays["sig"]
    assert arr.fields == [
        "ht",
        "n_b",
        "met",
        "ht_plus_met",
        "GoodJet",
        "MET_pt",
        "MET_phi",
        "run",
        "luminosityBlock",
        "event",
        "genWeight",
    ]
    assert arr.GoodJet.fields == ["pt", "btagDeepFlavB"]
    sel = np.isin(toy["columns"]["sig"]["event"], ak.to_numpy(arr.event))
    np.testing.assert_array_equal(ak.to_numpy(arr.MET_phi), toy["columns"]["sig"]["MET_phi"][sel])
    # a dropped variable is still there for later variables: ht_plus_met used met
    assert ak.to_list(arr.ht_plus_met) == ak.to_list(toy_result.arrays["sig"].ht_plus_met)


def test_keep_and_drop_errors(toy):
    path = str(toy["files"]["bkg"])
    with pytest.raises(MissingBranchError, match=r"skim.keep\[0\]: 'MET_ptt' matches no per-event"):
        Skimmer(keep=["MET_ptt"]).run({"b": [path]})
    with pytest.raises(ConfigError, match=r"skim.keep\[0\] \('Jet_pt'\) names fields of the coll"):
        Skimmer(keep=["Jet_pt"]).run({"b": [path]})
    with pytest.raises(ConfigError, match=r"skim.drop\[0\]: 'htt' matches no output column. Did"):
        Skimmer(selection={"variables": {"ht": "sum(Jet.pt)"}}, drop=["htt"]).run({"b": [path]})
    with pytest.raises(ConfigError, match=r"skim.drop\[0\] names 'genWeight', which every skim"):
        Skimmer(drop=["genWeight"])


def test_root_output_has_label_cutflow_json_and_reads_back(toy, toy_result, tmp_path):
    out = tmp_path / "skims"
    result = Skimmer(selection=SELECTION, collections=COLLECTIONS, output=str(out)).run(
        toy["fileset"]
    )
    with uproot.open(out / "bkg.root") as file:
        labels = file["Events"]["label"].array(library="np")
    assert labels.dtype == np.int32 and len(labels) == len(result.arrays["bkg"])
    assert set(labels) == {1}  # background is the second class
    assert SkimResult.read_cutflow(out / "cutflow.json") == result.cutflow
    assert list(SkimResult.read_cutflow(out / "cutflow.json")["sig"]) == list(result.cutflow["sig"])
    loaded = SkimResult.load(out)
    assert loaded.class_names == ["signal", "background"]
    assert loaded.metadata == result.metadata
    for ds in ("sig", "bkg"):
        assert loaded.arrays[ds].fields == result.arrays[ds].fields
        assert ak.to_list(loaded.arrays[ds]) == ak.to_list(result.arrays[ds])
    saved = result.save_cutflow(tmp_path / "elsewhere" / "flow.json")
    assert saved.is_file() and not (tmp_path / "elsewhere" / "flow.json.tmp").exists()


def test_rerun_of_a_finished_skim_does_no_work(toy, tmp_path, monkeypatch):
    out = tmp_path / "skims"
    config = {"selection": SELECTION, "collections": COLLECTIONS, "output": str(out)}
    first = Skimmer(config).run(toy["fileset"])
    stamp = (out / "sig.root").stat().st_mtime_ns

    def no_work(*args, **kwargs):
        raise AssertionError("the skim ran again")

    monkeypatch.setattr(Skimmer, "_run_coffea", no_work)
    again = Skimmer(config).run(toy["fileset"])
    assert (out / "sig.root").stat().st_mtime_ns == stamp
    assert again.cutflow == first.cutflow
    assert ak.to_list(again.arrays["sig"]) == ak.to_list(first.arrays["sig"])
    # another selection, or an unfinished directory, runs again
    with pytest.raises(AssertionError, match="the skim ran again"):
        Skimmer({**config, "chunksize": 50}).run(toy["fileset"])
    (out / "skim.json").unlink()
    with pytest.raises(AssertionError, match="the skim ran again"):
        Skimmer(config).run(toy["fileset"])


def test_cutflow_figure(toy_result, tmp_path):
    from cmsmlkit.plots import save_figure

    fig = toy_result.cutflow_figure()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(toy_result.cutflow["sig"])
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"sig", "bkg"}
    np.testing.assert_array_equal(
        lines["sig"].get_ydata(), [v["events"] for v in toy_result.cutflow["sig"].values()]
    )
    assert ax.get_yscale() == "log"
    weighted = toy_result.cutflow_figure(weighted=True).axes[0]
    assert weighted.get_ylabel() == "sum of genWeight"
    paths = save_figure(fig, tmp_path, "cutflow")
    assert all(p.stat().st_size > 1000 for p in paths)


# --------------------------------------------------------------------------- faults


def corrupt_baskets(path: Path) -> Path:
    """Break the zlib header of the later half of the baskets: the file opens, reading fails."""
    with uproot.open(path) as file:
        seeks = sorted(
            int(s)
            for b in file["Events"].branches
            for s in b.member("fBasketSeek")[: b.num_baskets]
        )
    data = bytearray(path.read_bytes())
    for seek in seeks[len(seeks) // 2 :]:
        key_length = int.from_bytes(data[seek + 14 : seek + 16], "big")  # TKey fKeylen
        start = seek + key_length + 9  # after ROOT's 9-byte compression header
        data[start : start + 2] = b"\x55\x55"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def broken_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("broken")
    return corrupt_baskets(write_nano(d / "broken.root", make_events(240, 9)))


def test_unreadable_chunk_is_retried_then_stops_the_run_with_a_report(toy, broken_file):
    with pytest.raises(InputFileError) as info:
        Skimmer(selection=SELECTION, collections=COLLECTIONS, chunksize=80).run(
            {"bkg": [str(toy["files"]["bkg"]), str(broken_file)]}
        )
    text = str(info.value)
    assert text.startswith(f"cannot read {broken_file} (dataset 'bkg', entries ")
    assert "failed 3 time(s): error: Error -3 while decompressing data" in text
    assert text.endswith("set skim.skip_bad_files: true to skip unreadable files with a report.")


def test_unreadable_file_is_skipped_with_a_report(toy, toy_result, broken_file, caplog):
    with caplog.at_level(logging.WARNING, logger="cmsmlkit.data.skim"):
        result = Skimmer(
            selection=SELECTION,
            collections=COLLECTIONS,
            chunksize=80,
            skip_bad_files=True,
            retries=0,
        ).run({"bkg": [str(broken_file), str(toy["files"]["bkg"])]})
    assert list(result.skipped) == ["bkg"]
    assert list(result.skipped["bkg"]) == [str(broken_file)]
    assert "Error -3 while decompressing data" in result.skipped["bkg"][str(broken_file)]
    assert result.metadata["bkg"]["skipped_files"] == [str(broken_file)]
    # nothing of the broken file is left: not its readable chunks, not their cutflow
    assert result.cutflow["bkg"] == toy_result.cutflow["bkg"]
    assert ak.to_list(result.arrays["bkg"]) == ak.to_list(toy_result.arrays["bkg"])
    assert result.skipped_report().startswith(f"skipped {broken_file} (dataset 'bkg'): ")
    assert "failed 1 time(s)" in caplog.text


def test_a_transient_read_error_is_retried(toy, toy_result, tmp_path):
    marker = tmp_path / "failed_once"

    def flaky(events):
        # fails the first attempt at every chunk, as a dropped network connection would
        key = f"{events.metadata['filename']}:{events.metadata['entrystart']}".replace("/", "_")
        if not (marker / key).exists():
            (marker / key).mkdir(parents=True)
            raise OSError("XRootD: [ERROR] Socket timeout")
        return events

    result = Skimmer(selection=SELECTION, collections=COLLECTIONS, function=flaky, retries=1).run(
        toy["fileset"]
    )
    assert len(list(marker.iterdir())) == 3  # every chunk failed once, then worked
    for ds in ("sig", "bkg"):
        assert ak.to_list(result.arrays[ds]) == ak.to_list(toy_result.arrays[ds])


def test_progress_bar_counts_chunks(toy, monkeypatch, capsys):
    monkeypatch.setenv("CMSMLKIT_PROGRESS", "1")
    Skimmer(selection=SELECTION, collections=COLLECTIONS, chunksize=50).run(toy["fileset"])
    err = capsys.readouterr().err
    # 180 + 120 + 200 events in chunks of about 50 (coffea balances the sizes in a file)
    done = re.findall(r"skim: 100%\|\S+\| (\d+)/(\d+) \[", err)
    assert done and all(a == b for a, b in done) and 9 <= int(done[-1][0]) <= 12
    assert "chunk/s" in err
    monkeypatch.setenv("CMSMLKIT_PROGRESS", "0")
    Skimmer(selection=SELECTION, collections=COLLECTIONS, chunksize=50).run(toy["fileset"])
    assert "skim" not in capsys.readouterr().err


def test_progress_bar_is_tqdm_auto(toy, monkeypatch):
    import tqdm.auto

    from cmsmlkit.data import skim

    bars = []

    class Recorder(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(skim, "tqdm", Recorder)
    monkeypatch.setenv("CMSMLKIT_PROGRESS", "1")
    Skimmer(selection=SELECTION, collections=COLLECTIONS, chunksize=100).run(toy["fileset"])
    assert [(b.total, b.n, b.unit, b.desc) for b in bars] == [(5, 5, "chunk", "skim")]
    assert issubclass(Recorder, tqdm.auto.tqdm)


@pytest.mark.slow
def test_chunks_of_a_killed_worker_are_rerun(toy, toy_result, tmp_path):
    marker = tmp_path / "killed"

    def kill_once(events):
        # the first chunk to get here kills its worker process; dask runs it again elsewhere
        try:
            marker.mkdir()
        except FileExistsError:
            return events
        os._exit(1)

    result = Skimmer(
        selection=SELECTION,
        collections=COLLECTIONS,
        chunksize=64,
        function=kill_once,
        cluster={"workers": 2},
    ).run(toy["fileset"])
    assert marker.is_dir()
    for ds in ("sig", "bkg"):
        assert ak.to_list(result.arrays[ds]) == ak.to_list(toy_result.arrays[ds])


def test_chunks_join_like_ak_concatenate():
    from cmsmlkit.data.skim import _concatenate

    def chunk(n_events: int, counts: list[int], start: float) -> ak.Array:
        jets = ak.zip({"pt": np.arange(sum(counts)) + start}, depth_limit=1)
        return ak.zip(
            {"ht": np.arange(n_events) + start, "GoodJet": ak.unflatten(jets, counts)},
            depth_limit=1,
        )

    parts = [chunk(3, [2, 0, 3], 0.0), chunk(2, [1, 3], 10.0), chunk(1, [0], 20.0)]
    joined = _concatenate(parts)
    assert ak.to_list(joined) == ak.to_list(ak.concatenate(parts))
    assert ak.to_list(ak.num(joined.GoodJet)) == [2, 0, 3, 1, 3, 0]
    # a layout it does not know (a list view) goes to awkward, same answer
    view = parts[0][[True, False, True]]
    mixed = [ak.zip({"ht": view.ht, "GoodJet": view.GoodJet}, depth_limit=1), parts[1]]
    assert ak.to_list(_concatenate(mixed)) == ak.to_list(ak.concatenate(mixed))


def test_select_one_chunk_of_events_gives_what_run_gives(toy, toy_result):
    from coffea.nanoevents import NanoAODSchema, NanoEventsFactory

    path = toy["files"]["bkg"]
    events = NanoEventsFactory.from_root(
        {str(path): "Events"}, schemaclass=NanoAODSchema, mode="virtual"
    ).events()
    skimmer = Skimmer(selection=SELECTION, collections=COLLECTIONS)
    records, cutflow = skimmer.select(events)
    assert ak.to_list(records) == ak.to_list(toy_result.arrays["bkg"])
    assert cutflow == toy_result.cutflow["bkg"]
    # collections= keeps only what is asked for (a model's inputs, say)
    only, _ = skimmer.select(events, collections={"GoodJet": ["pt"]})
    assert ak.fields(only.GoodJet) == ["pt"] and "GoodMuon" not in only.fields
    assert ak.to_list(only.GoodJet.pt) == ak.to_list(toy_result.arrays["bkg"].GoodJet.pt)
    # entries=True: where each selected event sits among the chunk's events
    placed, _ = skimmer.select(events, entries=True)
    entry = ak.to_numpy(placed["_entry"])
    assert len(entry) == len(records) and (np.diff(entry) > 0).all()
    np.testing.assert_array_equal(ak.to_numpy(events.event)[entry], ak.to_numpy(records.event))


def test_iterate_reads_a_file_chunk_by_chunk_like_run(toy, toy_result):
    skimmer = Skimmer(selection=SELECTION, collections=COLLECTIONS, chunksize=64)
    path = str(toy["files"]["bkg"])
    assert skimmer.branches(path) == sorted(skimmer.branches(path))
    assert {"Jet_pt", "nJet", "MET_pt", "event", "genWeight"} <= set(skimmer.branches(path))
    chunks = list(skimmer.iterate(path))
    assert [len(events) for events, _, _ in chunks] == [64, 64, 64, 8]
    joined = ak.concatenate([records for _, records, _ in chunks])
    assert ak.to_list(joined) == ak.to_list(toy_result.arrays["bkg"])
    assert sum(flow["all"]["events"] for _, _, flow in chunks) == 200
