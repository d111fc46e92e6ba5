"""Tests of cmsmlkit.data.toy: NanoAOD layout, reproducibility, physics, separability."""

from __future__ import annotations

import awkward as ak
import numpy as np
import pytest
import uproot

from cmsmlkit.data import toy
from cmsmlkit.errors import ConfigError

JET = ["pt", "eta", "phi", "mass", "btagDeepFlavB", "jetId", "hadronFlavour"]
MUON = ["pt", "eta", "phi", "mass", "charge", "tightId", "pfRelIso04_all"]
ELECTRON = ["pt", "eta", "phi", "mass", "charge", "cutBased"]

#: CMSSW's types of the NanoAOD branches (uproot's typename spelling).
CMSSW_TYPES = {
    "run": "uint32_t",
    "luminosityBlock": "uint32_t",
    "event": "uint64_t",
    "genWeight": "float",
    "MET_pt": "float",
    "MET_phi": "float",
    **{f"Jet_{f}": "float[]" for f in ["pt", "eta", "phi", "mass", "btagDeepFlavB"]},
    "Jet_jetId": "int32_t[]",
    "Jet_hadronFlavour": "int32_t[]",
    **{f"Muon_{f}": "float[]" for f in ["pt", "eta", "phi", "mass", "pfRelIso04_all"]},
    "Muon_charge": "int32_t[]",
    "Muon_tightId": "bool[]",
    **{f"Electron_{f}": "float[]" for f in ["pt", "eta", "phi", "mass"]},
    "Electron_charge": "int32_t[]",
    "Electron_cutBased": "int32_t[]",
}


@pytest.fixture(scope="module")
def ttbar_file(tmp_path_factory):
    return toy.write_nanoaod(tmp_path_factory.mktemp("toy") / "ttbar.root", "ttbar", 1000, seed=5)


def read(path) -> ak.Array:
    with uproot.open(path) as f:
        return f["Events"].arrays()


def test_layout_is_cmssw_nanoaod(ttbar_file):
    with uproot.open(ttbar_file) as f:
        assert f.classnames() == {"Events;1": "TTree", "Runs;1": "TTree"}
        events = f["Events"]
        assert events.num_entries == 1000
        names = set(events.keys())
        expected = {f"Jet_{x}" for x in JET} | {f"Muon_{x}" for x in MUON}
        expected |= {f"Electron_{x}" for x in ELECTRON} | {"nJet", "nMuon", "nElectron"}
        expected |= {"run", "luminosityBlock", "event", "genWeight", "MET_pt", "MET_phi"}
        assert names == expected
        for name, typename in CMSSW_TYPES.items():
            assert events[name].typename == typename, name
        # one counter per collection, shared by all of its fields, as CMSSW writes them
        for coll, fields in (("Jet", JET), ("Muon", MUON), ("Electron", ELECTRON)):
            assert events[f"n{coll}"].typename == "int32_t"
            assert {events[f"{coll}_{x}"].count_branch.name for x in fields} == {f"n{coll}"}
        runs = f["Runs"].arrays()
        assert runs.fields == ["run", "genEventCount", "genEventSumw", "genEventSumw2"]
        arrays = events.arrays(["genWeight", "event", "run", "luminosityBlock"])
        assert runs.genEventCount.tolist() == [1000]
        assert runs.genEventSumw[0] == pytest.approx(
            float(np.sum(arrays.genWeight.to_numpy().astype(float)))
        )
        assert arrays.event.tolist() == list(range(1, 1001))
        assert set(arrays.run.tolist()) == {1}
        assert arrays.luminosityBlock[[0, 499, 500, 999]].tolist() == [1, 1, 2, 2]


def test_values_are_in_nanoaod_ranges(ttbar_file):
    a = read(ttbar_file)
    assert ak.all(a.Jet_pt > 15) and ak.all(abs(a.Jet_eta) < 4.7)
    assert ak.all(abs(a.Jet_phi) <= np.pi)
    assert set(np.unique(ak.flatten(a.Jet_jetId)).tolist()) == {0, 2, 6}
    assert set(np.unique(ak.flatten(a.Jet_hadronFlavour)).tolist()) == {0, 4, 5}
    assert ak.all((a.Jet_btagDeepFlavB >= 0) & (a.Jet_btagDeepFlavB <= 1))
    # jets, muons and electrons are ordered by pt, as in NanoAOD
    for coll in ("Jet", "Muon", "Electron"):
        pt = a[f"{coll}_pt"]
        assert ak.all(pt[:, 1:] <= pt[:, :-1])
    assert ak.all(a.Muon_pt > 3) and ak.all(abs(a.Muon_eta) < 2.4)
    assert ak.all(a.Electron_pt > 5) and ak.all(abs(a.Electron_eta) < 2.5)
    assert set(np.unique(ak.flatten(a.Electron_cutBased)).tolist()) <= {0, 1, 2, 3, 4}
    assert set(np.unique(ak.flatten(a.Muon_charge)).tolist()) == {-1, 1}
    # NLO-like weights: mostly positive, a few per cent negative
    negative = float(np.mean(a.genWeight < 0))
    assert 0.005 < negative < 0.06
    assert ak.all(a.MET_pt >= 0)


def test_same_seed_same_file_other_seed_other_file(tmp_path):
    one = toy.write_nanoaod(tmp_path / "a.root", "wjets", 300, seed=3)
    two = toy.write_nanoaod(tmp_path / "b.root", "wjets", 300, seed=3)
    three = toy.write_nanoaod(tmp_path / "c.root", "wjets", 300, seed=4)
    a, b, c = read(one), read(two), read(three)
    assert ak.to_list(a) == ak.to_list(b)
    assert not np.array_equal(a.MET_pt.to_numpy(), c.MET_pt.to_numpy())
    assert ak.sum(a.nJet) != ak.sum(c.nJet) or not ak.all(ak.flatten(a.Jet_pt == c.Jet_pt))


@pytest.mark.parametrize("n", [0, 1, 7, 250])
def test_exact_number_of_events_in_chunks(tmp_path, n):
    path = toy.write_nanoaod(tmp_path / "dy.root", "dy", n, seed=1, chunk_size=100)
    with uproot.open(path) as f:
        assert f["Events"].num_entries == n
        assert f["Runs"]["genEventCount"].array().tolist() == [n]
        assert f["Events"]["event"].array().tolist() == list(range(1, n + 1))
    assert not (tmp_path / "dy.root.tmp").exists()


def test_unknown_process_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown toy process 'ttbr'.*ttbar, wjets, dy.*'ttbar'"):
        toy.write_nanoaod(tmp_path / "x.root", "ttbr", 10)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="n_events must be a non-negative integer, not -1"):
        toy.write_nanoaod(tmp_path / "x.root", "dy", -1)


def test_coffea_reads_the_files(ttbar_file):
    from coffea.nanoevents import NanoAODSchema, NanoEventsFactory

    events = NanoEventsFactory.from_root(
        {str(ttbar_file): "Events"}, schemaclass=NanoAODSchema, mode="virtual"
    ).events()
    assert len(events) == 1000
    raw = read(ttbar_file)
    assert ak.to_list(events.Jet.pt) == ak.to_list(raw.Jet_pt)
    assert ak.to_list(ak.num(events.Muon)) == raw.nMuon.tolist()
    assert ak.to_list(events.Electron.cutBased) == ak.to_list(raw.Electron_cutBased)
    assert np.allclose(events.MET.pt.to_numpy(), raw.MET_pt.to_numpy())
    good = events.Jet[(events.Jet.pt > 25) & (events.Jet.jetId >= 2)]
    assert ak.sum(ak.num(good)) == ak.sum((raw.Jet_pt > 25) & (raw.Jet_jetId >= 2))


def demo_features(path) -> tuple[np.ndarray, float]:
    """Per-event features after the demo selection, and the fraction of events it keeps."""
    a = read(path)
    good_jet = (a.Jet_pt > 25) & (abs(a.Jet_eta) < 2.4) & (a.Jet_jetId >= 2)
    jet_pt, jet_b = a.Jet_pt[good_jet], a.Jet_btagDeepFlavB[good_jet]
    mu = a.Muon_pt[(a.Muon_pt > 20) & (abs(a.Muon_eta) < 2.4) & a.Muon_tightId]
    el = a.Electron_pt[
        (a.Electron_pt > 20) & (abs(a.Electron_eta) < 2.5) & (a.Electron_cutBased >= 3)
    ]
    n_lep = ak.num(mu) + ak.num(el)
    keep = ((ak.num(jet_pt) >= 2) & (n_lep >= 1)).to_numpy()
    lep_pt = ak.max(ak.concatenate([mu, el], axis=1), axis=1)
    columns = [
        ak.num(jet_pt),
        ak.sum(jet_b > 0.3, axis=1),
        ak.sum(jet_pt, axis=1),
        a.MET_pt,
        n_lep,
        ak.fill_none(ak.firsts(jet_pt), 0.0),
        ak.fill_none(ak.pad_none(jet_pt, 2)[:, 1], 0.0),
        ak.fill_none(lep_pt, 0.0),
    ]
    features = np.stack([np.asarray(ak.to_numpy(c), dtype=np.float64) for c in columns], axis=1)
    return features[keep], float(keep.mean())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return toy.make_demo(tmp_path_factory.mktemp("demo"), n_events=8000, seed=11)


def test_make_demo_writes_four_files(demo):
    assert sorted(demo) == ["dy", "new", "ttbar", "wjets"]
    for name, paths in demo.items():
        assert [p.name for p in paths] == [f"{name}.root"]
        with uproot.open(paths[0]) as f:
            assert f["Events"].num_entries == 8000
    new = read(demo["new"][0])
    # the pseudo-data mixes all processes: its genWeights come from each, and its share of
    # events with two b tags lies between that of ttbar and of Drell-Yan
    assert 0.005 < float(np.mean(new.genWeight < 0)) < 0.06
    assert set(np.unique(np.abs(new.genWeight.to_numpy()).round(1))) >= {1.5, 2.5}

    def two_btags(a):
        tagged = (a.Jet_pt > 25) & (abs(a.Jet_eta) < 2.4) & (a.Jet_btagDeepFlavB > 0.3)
        return float(np.mean(ak.sum(tagged, axis=1) >= 2))

    fractions = {p: two_btags(read(demo[p][0])) for p in toy.PROCESSES}
    assert fractions["dy"] + 0.1 < two_btags(new) < fractions["ttbar"] - 0.1


def test_physics_sanity(demo):
    stats = {}
    for process in toy.PROCESSES:
        a = read(demo[process][0])
        good = (a.Jet_pt > 25) & (abs(a.Jet_eta) < 2.4)
        stats[process] = {
            "jets": float(ak.mean(ak.sum(good, axis=1))),
            "btags": float(ak.mean(ak.sum(good & (a.Jet_btagDeepFlavB > 0.3), axis=1))),
            "met": float(ak.mean(a.MET_pt)),
        }
    for background in ("wjets", "dy"):
        assert stats["ttbar"]["jets"] > stats[background]["jets"] + 1.0
        assert stats["ttbar"]["btags"] > stats[background]["btags"] + 0.8
    assert 1.2 < stats["ttbar"]["btags"] < 2.0
    # neutrinos: W+jets and ttbar have real MET, Drell-Yan only resolution
    assert stats["dy"]["met"] < 30 < stats["wjets"]["met"]


def test_dy_dilepton_mass_peaks_at_the_z(demo):
    a = read(demo["dy"][0])
    mu = ak.zip(
        {
            "pt": a.Muon_pt,
            "eta": a.Muon_eta,
            "phi": a.Muon_phi,
            "mass": a.Muon_mass,
            "q": a.Muon_charge,
        }
    )
    mu = mu[(mu.pt > 20) & a.Muon_tightId]
    pairs = mu[ak.num(mu) == 2]
    l1, l2 = pairs[:, 0], pairs[:, 1]
    assert len(pairs) > 1000
    assert float(np.mean((l1.q * l2.q).to_numpy() < 0)) > 0.99
    m2 = 2 * l1.pt * l2.pt * (np.cosh(l1.eta - l2.eta) - np.cos(l1.phi - l2.phi))
    mass = np.sqrt(m2.to_numpy())
    counts, edges = np.histogram(mass, bins=np.arange(60.0, 122.0, 2.0))
    peak = edges[np.argmax(counts)] + 1.0
    assert 88 <= peak <= 94
    assert 89 < np.median(mass) < 93
    assert np.mean(np.abs(mass - 91.19) < 10) > 0.8


def test_selection_keeps_a_healthy_fraction(demo):
    fractions = {p: demo_features(demo[p][0])[1] for p in toy.PROCESSES}
    assert 0.5 < fractions["ttbar"] < 0.95
    assert 0.05 < fractions["wjets"] < 0.5
    assert 0.03 < fractions["dy"] < 0.5


def test_signal_is_separable_but_not_perfectly(demo):
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from threadpoolctl import threadpool_limits

    signal = demo_features(demo["ttbar"][0])[0]
    background = np.concatenate([demo_features(demo[p][0])[0] for p in ("wjets", "dy")])
    x = np.concatenate([signal, background])
    y = np.r_[np.ones(len(signal)), np.zeros(len(background))]
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    half = len(y) // 2
    # one OpenMP thread: on a busy machine more threads make the fit ~50x slower
    with threadpool_limits(1):
        model = HistGradientBoostingClassifier(max_iter=100, random_state=0)
        model.fit(x[:half], y[:half])
        auc = roc_auc_score(y[half:], model.predict_proba(x[half:])[:, 1])
    # The floor: these eight features (b-tags, jet multiplicity, HT, MET) separate ttbar from
    # W/Z+jets well (~0.93 measured); below 0.75 the demo could not show a classifier learning.
    # The ceiling: the processes overlap (W+heavy flavour, mistags, ttbar jets out of
    # acceptance), so a near-perfect AUC would mean an unphysical give-away in the toy.
    assert 0.75 < auc < 0.995
