"""NanoAODSource and Skimmer over ``root://``, against a real XRootD server on loopback.

The server (tests/xrootd_server.py) runs in a network namespace of its own, so
the client part of each test runs in a subprocess inside that namespace; it
writes its results (a skim output directory, JSON) where this process reads them.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import awkward as ak
import pytest
from xrootd_server import xrootd_server  # noqa: F401 - the fixture

from cmsmlkit.data.skim import Skimmer, SkimResult

pytestmark = [pytest.mark.xrootd, pytest.mark.slow]

SELECTION = {
    "objects": {
        "GoodJet": {"from": "Jet", "where": "pt > 25 & abs(eta) < 2.4 & jetId >= 2"},
        "GoodMuon": {"from": "Muon", "where": "pt > 5"},
    },
    "cuts": ["num(GoodJet) >= 1"],
    "variables": {
        "ht": "sum(GoodJet.pt)",
        "lead_jet_pt": "GoodJet.pt[:, 0]",
        "met": "MET.pt",
    },
}
COLLECTIONS = {"GoodJet": ["pt", "eta", "phi"], "GoodMuon": ["pt", "*Iso*"]}


@pytest.fixture(scope="module")
def served(xrootd_server, nanoaod_dir):  # noqa: F811 - the imported fixture
    """The real NanoAOD files on the server, under CMS-style /store paths."""
    pytest.importorskip("fsspec_xrootd", reason="pip install fsspec-xrootd (the xrootd extra)")
    lfns = {
        "dy": "/store/mc/Test/DY/NANOAODSIM/v1/nano_dy.root",
        "tt": "/store/mc/Test/TT/NANOAODSIM/v1/nano_tt_v12.root",
    }
    for name, lfn in lfns.items():
        source = nanoaod_dir / ("nano_dy.root" if name == "dy" else "nano_tt_v12.root")
        xrootd_server.put(source, lfn)
    return lfns


def run_client(server, tmp_path: Path, body: str) -> dict:
    """Run ``body`` with cmsmlkit in a Python inside the server's namespace; its JSON result."""
    script = tmp_path / "client.py"
    result_path = tmp_path / "client.json"
    script.write_text(
        "import json, sys\n"
        "from cmsmlkit import NanoAODSource, Skimmer\n"
        "from cmsmlkit.errors import InputFileError\n"
        f"SELECTION = {SELECTION!r}\n"
        f"COLLECTIONS = {COLLECTIONS!r}\n"
        "out = {}\n"
        + textwrap.dedent(body)
        + f"\njson.dump(out, open({str(result_path)!r}, 'w'))\n"
    )
    done = server.run(
        [sys.executable, str(script)],
        cwd=str(tmp_path),
        env={"PATH": "/usr/bin:/bin", "CMSMLKIT_PROGRESS": "0", "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(result_path.read_text())


@pytest.fixture(scope="module")
def remote(xrootd_server, served, tmp_path_factory):  # noqa: F811
    """One client run in the server's namespace: resolve, count, open, skim over root://."""
    tmp_path = tmp_path_factory.mktemp("xrootd_client")
    # the ttbar files are listed as /store paths in a text file, read through the redirector
    listing = tmp_path / "tt_files.txt"
    listing.write_text(f"# ttbar\n{served['tt']}\n")
    missing = xrootd_server.url_for("/store/mc/Test/DY/NANOAODSIM/v1/gone.root")
    out = run_client(
        xrootd_server,
        tmp_path,
        f"""
        source = NanoAODSource(
            datasets={{
                "dy": {{"files": ["{xrootd_server.url_for(served["dy"])}"], "label": "background"}},
                "tt": {{"files": ["{listing}"], "label": "signal", "xsec": 833.9}},
            }},
            redirector="{xrootd_server.url}",
        )
        out["files"] = {{d: source.files(d) for d in source.datasets}}
        out["nevents"] = source.nevents()
        events = source.open_events("tt")
        out["open_events"] = [len(events), float(events.Muon.pt[0][0])]
        Skimmer(
            selection=SELECTION, collections=COLLECTIONS, output="{tmp_path / "remote"}",
            chunksize=64,
        ).run(source)

        files = ["{xrootd_server.url_for(served["dy"])}", "{missing}"]
        try:
            Skimmer(selection=SELECTION, collections=COLLECTIONS).run({{"dy": files}})
        except InputFileError as exc:
            out["error"] = str(exc)
        result = Skimmer(
            selection=SELECTION, collections=COLLECTIONS, skip_bad_files=True, retries=0
        ).run({{"dy": files}})
        out["skipped"] = result.skipped
        out["events"] = result.cutflow["dy"]["all"]["events"]
        """,
    )
    return {"out": out, "skim": tmp_path / "remote", "missing": missing}


def test_skim_over_root_equals_the_local_skim(remote, served, nanoaod_dir):
    out = remote["out"]
    dy_url = f"root://127.0.0.1:1094//{served['dy'].lstrip('/')}"
    tt_url = f"root://127.0.0.1:1094//{served['tt'].lstrip('/')}"
    assert out["files"] == {"dy": [dy_url], "tt": [tt_url]}
    assert out["nevents"] == {"dy": {dy_url: 40}, "tt": {tt_url: 200}}
    import uproot

    with uproot.open(nanoaod_dir / "nano_tt_v12.root") as file:
        first_muon_pt = float(file["Events"]["Muon_pt"].array()[0][0])
    assert out["open_events"] == [200, pytest.approx(first_muon_pt)]
    skim = SkimResult.load(remote["skim"])
    local = Skimmer(selection=SELECTION, collections=COLLECTIONS, chunksize=64).run(
        {
            "dy": {
                "files": {str(nanoaod_dir / "nano_dy.root"): "Events"},
                "metadata": {"label": "background"},
            },
            "tt": {
                "files": {str(nanoaod_dir / "nano_tt_v12.root"): "Events"},
                "metadata": {"label": "signal"},
            },
        }
    )
    assert skim.metadata["tt"]["files"] == [tt_url]
    assert skim.metadata["tt"]["xsec"] == 833.9
    assert skim.cutflow == local.cutflow
    assert skim.cutflow["tt"]["all"]["events"] == 200
    for ds in ("dy", "tt"):
        assert len(skim.arrays[ds]) == len(local.arrays[ds]) > 0
        assert ak.to_list(skim.arrays[ds]) == ak.to_list(local.arrays[ds])


def test_missing_remote_file_is_reported_or_skipped(remote):
    out, missing = remote["out"], remote["missing"]
    assert out["error"].startswith(f"cannot read {missing} as a ROOT file (")
    assert "set skim.skip_bad_files: true" in out["error"]
    assert list(out["skipped"]["dy"]) == [missing]
    assert out["events"] == 40


def test_predictor_scores_a_file_over_root_as_it_scores_it_locally(
    xrootd_server,  # noqa: F811
    demo_chain,
    tmp_path,
):
    """Predictions on a root:// input: the friend tree equals the local one, entry by entry."""
    import numpy as np
    import uproot

    from cmsmlkit import Predictor

    new = demo_chain.files["new"][0]
    lfn = "/store/mc/Test/New/NANOAODSIM/v1/new.root"
    xrootd_server.put(new, lfn)
    url = xrootd_server.url_for(lfn)
    remote_dir = tmp_path / "remote"
    run_client(
        xrootd_server,
        tmp_path,
        f"""
        from cmsmlkit import Predictor
        report = Predictor.from_bundle({str(demo_chain.bundle)!r}, formats=["friend"]).predict_files(
            [{url!r}], {str(remote_dir)!r}
        )
        out["outputs"] = [str(p) for p in report]
        """,
    )
    local = Predictor.from_bundle(demo_chain.bundle, formats=["friend"])
    (local_path,) = local.predict_files([str(new)], tmp_path / "local")
    with uproot.open(remote_dir / "new.friend.root") as r, uproot.open(local_path) as lo:
        remote_scores = r["Friends"].arrays(library="np")
        local_scores = lo["Friends"].arrays(library="np")
    assert remote_scores.keys() == local_scores.keys()
    assert len(local_scores["event"]) == 1500 and local_scores["score_selected"].sum() > 0
    for key, values in local_scores.items():
        np.testing.assert_array_equal(remote_scores[key], values)
