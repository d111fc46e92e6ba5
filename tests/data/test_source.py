"""Tests of cmsmlkit.data.source: file entries -> coffea fileset."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from proxies import write_proxy

from cmsmlkit.config import SourceConfig
from cmsmlkit.data.source import NanoAODSource, check_proxy, is_das_dataset
from cmsmlkit.errors import ConfigError, InputFileError, MissingDependencyError

DAS_NAME = "/TTToSemiLeptonic_TuneCP5_13TeV-powheg-pythia8/RunIISummer20UL18NanoAODv9-106X_v16-v1/NANOAODSIM"


def touch(directory: Path, *names: str) -> list[str]:
    """Empty files (the source opens nothing, so their content does not matter)."""
    paths = []
    for name in names:
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        paths.append(str(path))
    return paths


def source(files, label: str = "signal", **dataset) -> NanoAODSource:
    return NanoAODSource(datasets={"ds": {"files": files, "label": label, **dataset}})


def test_fileset_has_coffea_form_with_metadata(tmp_path):
    sig, bkg = touch(tmp_path, "tt.root", "wj.root")
    src = NanoAODSource(
        datasets={
            "ttbar": {"files": [sig], "label": "signal", "xsec": 833.9, "metadata": {"year": 2018}},
            "wjets": {"files": bkg, "label": "background", "is_mc": True},
        }
    )
    assert src.fileset() == {
        "ttbar": {
            "files": {sig: "Events"},
            "metadata": {
                "dataset": "ttbar",
                "label": "signal",
                "is_mc": True,
                "xsec": 833.9,
                "year": 2018,
            },
        },
        "wjets": {
            "files": {bkg: "Events"},
            "metadata": {"dataset": "wjets", "label": "background", "is_mc": True, "xsec": None},
        },
    }
    assert src.files("wjets") == [bkg]
    assert src.datasets == ["ttbar", "wjets"]


def test_class_names_in_order_of_first_appearance():
    src = NanoAODSource(
        datasets={
            "dy": {"files": ["a.root"], "label": "background"},
            "ttbar": {"files": ["b.root"], "label": "signal"},
            "wjets": {"files": ["c.root"], "label": "background"},
            "data": {"files": ["d.root"], "label": "observed", "is_mc": False},
        }
    )
    assert src.class_names == ["background", "signal", "observed"]


def test_construction_opens_nothing_and_repr_summarises(tmp_path):
    # the files do not exist: building the source only validates the configuration
    src = NanoAODSource(
        datasets={
            "ttbar": {"files": [str(tmp_path / "nope.root")], "label": "signal"},
            "dy": {"files": ["x.root", "y.root"], "label": "background"},
        },
        treename="Events",
    )
    assert repr(src) == (
        "NanoAODSource(2 datasets [ttbar: 1 entry, label 'signal'; dy: 2 entries, label "
        "'background'], classes=['signal', 'background'], treename='Events')"
    )
    with pytest.raises(
        InputFileError, match="dataset 'ttbar': the file .*nope.root does not exist"
    ):
        src.fileset()


def test_repr_counts_resolved_files(tmp_path):
    touch(tmp_path, "f1.root", "f2.root", "f3.root")
    src = source([str(tmp_path / "f*.root")])
    src.fileset()
    assert repr(src) == (
        "NanoAODSource(1 datasets [ds: 3 files, label 'signal'], classes=['signal'], "
        "treename='Events')"
    )


def test_config_object_dict_yaml_and_keyword_overrides(tmp_path):
    (path,) = touch(tmp_path, "a.root")
    config = SourceConfig(datasets={"a": {"files": [path], "label": "s"}}, treename="Friends")
    assert NanoAODSource(config).fileset()["a"]["files"] == {path: "Friends"}
    assert NanoAODSource(config, treename="Events").fileset()["a"]["files"] == {path: "Events"}
    yaml_file = tmp_path / "source.yaml"
    yaml_file.write_text(f"datasets:\n  a: {{files: [{path}], label: s}}\n")
    assert NanoAODSource(yaml_file).files("a") == [path]
    with pytest.raises(ConfigError, match="unknown key 'treenam'. Did you mean 'treename'"):
        NanoAODSource(config, treenam="Events")
    with pytest.raises(ConfigError, match="missing required key 'datasets.a.label'"):
        NanoAODSource(datasets={"a": {"files": [path]}})


def test_unknown_dataset_and_reserved_metadata_are_config_errors():
    src = NanoAODSource(datasets={"ttbar": {"files": ["a.root"], "label": "s"}})
    with pytest.raises(
        ConfigError, match=r"no dataset 'tbar' in the source; it has ttbar. Did you mean 'ttbar'\?"
    ):
        src.files("tbar")
    with pytest.raises(ConfigError, match=r"metadata sets 'label', which the source fills itself"):
        source(["a.root"], metadata={"label": "x"})
    with pytest.raises(ConfigError, match="source.datasets.ds.files holds an empty entry"):
        source(["a.root", "  "])


def test_globs_are_sorted_and_home_is_expanded(tmp_path, monkeypatch):
    touch(tmp_path, "data/b_2.root", "data/a_10.root", "data/b_1.root", "data/notes.md")
    (tmp_path / "data" / "sub.root").mkdir()  # a directory matching the pattern is skipped
    monkeypatch.setenv("HOME", str(tmp_path))
    src = source(["~/data/*.root"])
    assert src.files("ds") == [
        str(tmp_path / "data" / n) for n in ("a_10.root", "b_1.root", "b_2.root")
    ]
    # a directory entry means its .root files
    assert source([str(tmp_path / "data")]).files("ds") == src.files("ds")


def test_max_files_is_applied_after_sorting(tmp_path):
    touch(tmp_path, "c.root", "a.root", "b.root")
    src = source([str(tmp_path / "*.root")], max_files=2)
    assert src.files("ds") == [str(tmp_path / "a.root"), str(tmp_path / "b.root")]


def test_repeated_files_are_listed_once(tmp_path):
    (a,) = touch(tmp_path, "a.root")
    assert source([a, str(tmp_path / "*.root"), a]).files("ds") == [a]


def test_urls_pass_through_and_store_paths_get_the_redirector(tmp_path):
    url = "root://eosuser.cern.ch//eos/user/j/jdoe/nano_1.root"
    https = "https://example.org/files/nano_2.root"
    lfn = "/store/mc/RunIISummer20UL18NanoAODv9/TT/NANOAODSIM/106X/1234/ABCD.root"
    src = source([url, lfn, https])
    assert src.files("ds") == [url, "root://cms-xrd-global.cern.ch/" + lfn, https]
    other = NanoAODSource(
        datasets={"ds": {"files": [lfn], "label": "s"}}, redirector="root://xrootd-cms.infn.it"
    )
    assert other.files("ds") == ["root://xrootd-cms.infn.it/" + lfn]


def test_text_file_lists(tmp_path):
    files = touch(tmp_path, "lists/local/one.root", "lists/local/two.root", "elsewhere/three.root")
    listing = tmp_path / "lists" / "files.txt"
    listing.write_text(
        "# files of the ttbar sample\n"
        "\n"
        "local/one.root   # relative to this list\n"
        f"{files[2]}\n"
        "  /store/mc/X/Y/NANOAODSIM/file.root\n"
        "root://eos.cms//eos/cms/f.root\n"
        "local/t*.root\n"
    )
    assert source([str(listing)]).files("ds") == [
        files[0],
        files[2],
        "root://cms-xrd-global.cern.ch//store/mc/X/Y/NANOAODSIM/file.root",
        "root://eos.cms//eos/cms/f.root",
        files[1],
    ]


def test_missing_file_names_dataset_and_close_names(tmp_path):
    touch(tmp_path, "nano_ttbar_2018.root", "nano_wjets_2018.root")
    with pytest.raises(InputFileError) as info:
        source([str(tmp_path / "nano_tbar_2018.root")]).fileset()
    assert str(info.value) == (
        f"dataset 'ds': the file {tmp_path / 'nano_tbar_2018.root'} does not exist. "
        "Close names in that directory: nano_ttbar_2018.root, nano_wjets_2018.root."
    )
    with pytest.raises(InputFileError, match=r"The directory .*nowhere does not exist either"):
        source([str(tmp_path / "nowhere" / "f.root")]).fileset()


def test_missing_file_in_a_list_says_which_list(tmp_path):
    listing = tmp_path / "files.txt"
    listing.write_text("gone.root\n")
    with pytest.raises(
        InputFileError,
        match=r"dataset 'ds': the file .*gone.root does not exist \(entry 'gone.root' \(relative to "
        + str(tmp_path),
    ):
        source([str(listing)]).files("ds")


def test_empty_glob_and_empty_dataset(tmp_path):
    pattern = str(tmp_path / "*.root")
    with pytest.raises(InputFileError) as info:
        source([pattern]).fileset()
    assert str(info.value) == (
        f"dataset 'ds': the pattern '{pattern}' matches no file. Check the directory and the pattern."
    )
    listing = tmp_path / "empty.txt"
    listing.write_text("# nothing here yet\n\n")
    with pytest.raises(
        InputFileError, match=r"dataset 'ds' has no files: its entries \['.*empty.txt'\] list none"
    ):
        source([str(listing)]).fileset()


def test_das_name_needs_dasgoclient(tmp_path, monkeypatch):
    assert is_das_dataset(DAS_NAME)
    assert not is_das_dataset("/store/mc/A/B/NANOAODSIM")
    assert not is_das_dataset("/data/files/x.root")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingDependencyError) as info:
        source([DAS_NAME]).fileset()
    text = str(info.value)
    assert f"'{DAS_NAME}' is a DAS dataset name" in text
    assert "`dasgoclient`, which is not on PATH" in text
    assert "`cmsenv`" in text and "LXPLUS" in text
    assert "`voms-proxy-init -voms cms -rfc -valid 192:00`" in text


# DAS and VOMS cannot run here (no network, no CMS credentials): the DAS tests put a
# fake `dasgoclient` (and, where said, a fake `voms-proxy-info`) script on PATH.


def fake_dasgoclient(directory: Path, script: str, name: str = "dasgoclient") -> None:
    exe = directory / name
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def proxy(tmp_path, monkeypatch) -> Path:
    """A valid (unexpired) GRID proxy file named by X509_USER_PROXY."""
    path = write_proxy(tmp_path / "x509up_u1000", hours=100)
    monkeypatch.setenv("X509_USER_PROXY", str(path))
    return path


def test_das_lookup_with_dasgoclient(tmp_path, monkeypatch, proxy):
    calls = tmp_path / "calls.txt"
    fake_dasgoclient(
        tmp_path,
        f'echo "$@" >> {calls}\n'
        f'echo "proxy=$X509_USER_PROXY" >> {calls}\n'
        "echo /store/mc/RunIISummer20UL18NanoAODv9/TT/NANOAODSIM/v1/2/B.root\n"
        "echo /store/mc/RunIISummer20UL18NanoAODv9/TT/NANOAODSIM/v1/1/A.root\n",
    )
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    src = source([DAS_NAME], max_files=1)
    fileset = src.fileset()
    assert fileset["ds"]["files"] == {
        "root://cms-xrd-global.cern.ch//store/mc/RunIISummer20UL18NanoAODv9/TT/NANOAODSIM/v1/1/A.root": "Events"
    }
    src.fileset()  # answered from the cache: dasgoclient ran once
    assert calls.read_text() == f"-query file dataset={DAS_NAME}\nproxy={proxy}\n"


def test_das_failure_says_how_to_fix_it(tmp_path, monkeypatch, proxy):
    fake_dasgoclient(tmp_path, "echo 'Error: no valid proxy found' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(InputFileError) as info:
        source([DAS_NAME]).fileset()
    text = str(info.value)
    assert "failed (exit 1): Error: no valid proxy found." in text
    assert "`voms-proxy-init -voms cms -rfc -valid 192:00`" in text
    fake_dasgoclient(tmp_path, "exit 0\n")
    with pytest.raises(InputFileError, match=f"DAS knows no files of '{DAS_NAME}'"):
        source([DAS_NAME]).fileset()


def test_real_nanoaod_files(nanoaod_dir):
    src = NanoAODSource(
        datasets={
            "dy": {"files": [str(nanoaod_dir / "nano_dy*.root")], "label": "background"},
            "ttbar": {
                "files": [str(nanoaod_dir / "nano_tt_v12.root")],
                "label": "signal",
                "xsec": 833.9,
            },
        }
    )
    fileset = src.fileset()
    assert list(fileset["dy"]["files"]) == [
        str(nanoaod_dir / "nano_dy.root"),
        str(nanoaod_dir / "nano_dy_empty.root"),
    ]
    assert fileset["ttbar"]["metadata"]["xsec"] == 833.9
    assert src.check() == {
        "dy": {str(nanoaod_dir / "nano_dy.root"): 40, str(nanoaod_dir / "nano_dy_empty.root"): 0},
        "ttbar": {str(nanoaod_dir / "nano_tt_v12.root"): 200},
    }


def test_check_names_a_missing_tree_and_a_broken_file(nanoaod_dir, tmp_path):
    src = source([str(nanoaod_dir / "nano_dy.root")])
    src = NanoAODSource(src.config, treename="Event")
    with pytest.raises(InputFileError) as info:
        src.check()
    assert str(info.value) == (
        f"dataset 'ds': {nanoaod_dir / 'nano_dy.root'} has no tree 'Event'. Did you mean 'Events'? "
        "It holds: Events, Runs. Set source.treename if your events live in another tree."
    )
    (broken,) = touch(tmp_path, "broken.root")
    with pytest.raises(InputFileError, match=r"dataset 'ds': cannot read .*broken.root: "):
        source([broken]).check()


# --------------------------------------------------------------------------- GRID proxy


def test_missing_proxy_says_the_command_that_makes_one(tmp_path, monkeypatch):
    calls = tmp_path / "calls.txt"
    fake_dasgoclient(tmp_path, f"echo called >> {calls}\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("X509_USER_PROXY", str(tmp_path / "x509up_u1000"))
    with pytest.raises(InputFileError) as info:
        source([DAS_NAME]).fileset()
    assert str(info.value) == (
        f"no GRID proxy at {tmp_path / 'x509up_u1000'} (X509_USER_PROXY); reading CMS data needs "
        "one. Create it with `voms-proxy-init -voms cms -rfc -valid 192:00` (and `export "
        "X509_USER_PROXY=...` if you keep it elsewhere, e.g. on AFS for batch jobs)."
    )
    assert not calls.exists()  # DAS is not asked without a proxy
    # without X509_USER_PROXY the default location /tmp/x509up_u<uid> is looked at
    monkeypatch.delenv("X509_USER_PROXY")
    default = Path(f"/tmp/x509up_u{os.getuid()}")
    if not default.exists():
        with pytest.raises(InputFileError, match=f"no GRID proxy at {default} .the default"):
            check_proxy()


def test_expired_proxy_is_refused_and_its_content_never_shown(tmp_path, monkeypatch):
    path = write_proxy(tmp_path / "proxy.pem", hours=-1)
    fake_dasgoclient(tmp_path, "echo /store/a.root\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("X509_USER_PROXY", str(path))
    with pytest.raises(InputFileError) as info:
        source([DAS_NAME]).fileset()
    assert str(info.value) == (
        f"the GRID proxy at {path} has expired. Renew it with "
        "`voms-proxy-init -voms cms -rfc -valid 192:00`."
    )
    assert "BEGIN" not in str(info.value)
    # a valid one passes, and the lookup goes on
    write_proxy(path, hours=1)
    assert check_proxy() == path
    assert source([DAS_NAME]).files("ds") == ["root://cms-xrd-global.cern.ch//store/a.root"]


def test_voms_proxy_info_is_asked_first_when_installed(tmp_path, monkeypatch):
    # the certificate says valid, the (fake) voms-proxy-info says 0 s left: it wins
    path = write_proxy(tmp_path / "proxy.pem", hours=100)
    calls = tmp_path / "voms.txt"
    fake_dasgoclient(tmp_path, f'echo "$@" > {calls}\necho 0\n', name="voms-proxy-info")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(InputFileError, match="has expired"):
        check_proxy(path)
    assert calls.read_text() == f"--file {path} --timeleft\n"
    fake_dasgoclient(tmp_path, "echo 3600\n", name="voms-proxy-info")
    assert check_proxy(path) == path


def test_proxy_without_a_certificate_only_needs_to_exist(tmp_path):
    path = tmp_path / "proxy"
    path.write_text("not a PEM file")
    assert check_proxy(path) == path


# --------------------------------------------------------------------------- per-dataset options


def test_dataset_cuts_and_lumi_mask_go_into_the_metadata(tmp_path, monkeypatch):
    (data,) = touch(tmp_path, "data.root")
    monkeypatch.chdir(tmp_path)
    src = NanoAODSource(
        datasets={
            "data": {
                "files": [data],
                "label": "observed",
                "is_mc": False,
                "cuts": ["HLT_IsoMu24"],
                "lumi_mask": "golden.json",
            }
        }
    )
    assert src.metadata("data") == {
        "dataset": "data",
        "label": "observed",
        "is_mc": False,
        "xsec": None,
        "cuts": ["HLT_IsoMu24"],
        "lumi_mask": str(tmp_path / "golden.json"),
    }
    with pytest.raises(ConfigError, match="lumi_mask is set but the dataset is simulation"):
        source([data], lumi_mask="golden.json")
    with pytest.raises(ConfigError, match=r"metadata sets 'cuts', which the source fills itself"):
        source([data], metadata={"cuts": []})


# --------------------------------------------------------------------------- nevents, open_events


def test_nevents_reads_entry_counts_only(tmp_path, monkeypatch):
    import numpy as np
    import uproot

    paths = {}
    for name, n in (("dy_1", 7), ("dy_2", 0), ("tt", 5)):
        paths[name] = str(tmp_path / f"{name}.root")
        with uproot.recreate(paths[name]) as file:
            file.mktree("Events", {"MET_pt": np.float32}).extend(
                {"MET_pt": np.arange(n, dtype=np.float32)}
            )
    src = NanoAODSource(
        datasets={
            "dy": {"files": [str(tmp_path / "dy_*.root")], "label": "background"},
            "tt": {"files": [paths["tt"]], "label": "signal"},
        }
    )

    def no_event_data(*args, **kwargs):
        raise AssertionError("event data was read")

    monkeypatch.setattr(uproot.TBranch, "array", no_event_data)
    monkeypatch.setattr(uproot.TTree, "arrays", no_event_data)
    assert src.nevents("dy") == {"dy": {paths["dy_1"]: 7, paths["dy_2"]: 0}}
    assert src.nevents() == {**src.nevents("dy"), "tt": {paths["tt"]: 5}}
    with pytest.raises(ConfigError, match="no dataset 'ty' in the source"):
        src.nevents("ty")


@pytest.mark.slow
def test_open_events_gives_nanoevents_of_one_file(nanoaod_dir, tmp_path):
    import awkward as ak
    import uproot

    from cmsmlkit.data import toy

    toy.write_nanoaod(tmp_path / "dy_1.root", "dy", 30)
    toy.write_nanoaod(tmp_path / "dy_2.root", "dy", 0)
    src = NanoAODSource(
        datasets={
            "tt": {"files": [str(nanoaod_dir / "nano_tt_v12.root")], "label": "signal"},
            "dy": {"files": [str(tmp_path / "dy_*.root")], "label": "background"},
        }
    )
    events = src.open_events()  # real NanoAOD: the first file of the first dataset
    assert len(events) == 200
    assert events.metadata["dataset"] == "tt"
    with uproot.open(nanoaod_dir / "nano_tt_v12.root") as file:
        pt = file["Events"]["Muon_pt"].array()
    assert ak.to_list(events.Muon.pt) == ak.to_list(pt)
    # coffea's vector behaviour: a pair of muons has a mass
    two = events[ak.num(events.Muon) >= 2]
    assert len(two) > 0 and ak.all((two.Muon[:, 0] + two.Muon[:, 1]).mass >= 0)
    assert len(src.open_events("dy", file=1)) == 0
    assert len(src.open_events("dy", entry_stop=10)) == 10
    with pytest.raises(ConfigError, match=r"dataset 'dy' has 2 file\(s\); file=2 is out of range"):
        src.open_events("dy", file=2)
