"""The pipeline runner: stages in order, relative paths, skipping what is done for the same config."""

from __future__ import annotations

import shutil

import pytest
import yaml
from conftest import DEMO_PADDING, DEMO_SKIM

from cmsmlkit import Pipeline, load_config
from cmsmlkit.errors import ConfigError


@pytest.fixture
def pipeline_dir(tmp_path, demo_files):
    data = tmp_path / "data"
    data.mkdir()
    for name, paths in demo_files.items():
        shutil.copy(paths[0], data / f"{name}.root")
    config = {
        "source": {
            "datasets": {
                "ttbar": {"files": ["data/ttbar.root"], "label": "signal", "xsec": 833.9},
                "wjets": {"files": ["data/wjets.root"], "label": "background"},
                "dy": {"files": ["data/dy.root"], "label": "background"},
            }
        },
        "skim": DEMO_SKIM,
        "convert": {"output": "out/demo.h5", "collections": DEMO_PADDING},
        "train": {
            "output": "out/model",
            "max_epochs": 2,
            "batch_size": 256,
            "tracking": {"enabled": False},
        },
        "predict": {"bundle": "out/model", "inputs": ["data/new.root"], "output": "out/scores"},
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return tmp_path


@pytest.mark.slow
def test_runs_every_stage_then_skips_them(pipeline_dir):
    result = Pipeline(pipeline_dir / "pipeline.yaml").run()
    assert list(result.outputs) == [
        "convert",
        "train",
        "predict",
    ]  # skim without output feeds convert in memory
    assert result.outputs["convert"] == [pipeline_dir / "out" / "demo.h5"]
    assert result.outputs["predict"] == [pipeline_dir / "out" / "scores" / "new.h5"]
    assert 0.6 < result.test_auc < 1.0
    assert (pipeline_dir / ".cmsml" / "train.json").is_file()

    again = Pipeline(pipeline_dir / "pipeline.yaml").run()
    assert again.skipped == ["convert", "train", "predict"]
    assert again.test_auc == pytest.approx(result.test_auc)

    # A changed training config reruns training and everything downstream, not the conversion.
    config = load_config(pipeline_dir / "pipeline.yaml")
    config.train.max_epochs = 1
    changed = Pipeline(config, base_dir=pipeline_dir).run()
    assert changed.skipped == ["convert"]


def test_relative_paths_are_taken_from_the_yaml_directory(
    pipeline_dir, tmp_path_factory, monkeypatch
):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    pipeline = Pipeline(pipeline_dir / "pipeline.yaml")
    assert pipeline.base_dir == pipeline_dir
    assert pipeline._resolved("convert").output == str(pipeline_dir / "out" / "demo.h5")
    assert pipeline._resolved("source").datasets["ttbar"].files == [
        str(pipeline_dir / "data" / "ttbar.root")
    ]
    assert pipeline.stages() == ["convert", "train", "predict"]


def test_a_stage_without_its_section_is_an_error(tmp_path):
    (tmp_path / "p.yaml").write_text("train: {inputs: [x.h5]}\n")
    with pytest.raises(ConfigError, match="stage 'predict' needs the section"):
        Pipeline(tmp_path / "p.yaml").run(["predict"])
    with pytest.raises(ConfigError, match="unknown stage 'trian'"):
        Pipeline(tmp_path / "p.yaml").run(["trian"])


@pytest.mark.slow
def test_every_stage_on_real_nanoaod(tmp_path, nanoaod_dir):
    """Real CMS NanoAOD (ttbar against Drell-Yan, plus the 0-event file) through all six stages."""
    config = {
        "source": {
            "datasets": {
                "tt": {"files": [str(nanoaod_dir / "nano_tt_v12.root")], "label": "ttbar"},
                "dy": {
                    "files": [
                        str(nanoaod_dir / "nano_dy.root"),
                        str(nanoaod_dir / "nano_dy_empty.root"),
                    ],
                    "label": "dy",
                },
            }
        },
        "skim": {
            "selection": {
                "objects": {"GoodJet": {"from": "Jet", "where": "pt > 20 & abs(eta) < 2.5"}},
                "cuts": ["num(GoodJet) >= 1"],
                "variables": {"ht": "sum(GoodJet.pt)", "n_jets": "num(GoodJet)", "met": "MET.pt"},
            },
            "collections": {"GoodJet": ["pt", "eta"]},
        },
        "convert": {"output": "real.h5", "collections": {"GoodJet": {"max_len": 4}}},
        "train": {
            "output": "model",
            "max_epochs": 3,
            "batch_size": 32,
            "tracking": {"enabled": False},
        },
        "tune": {"output": "tune", "n_trials": 1, "max_epochs": 1},
        "predict": {
            "bundle": "model",
            "inputs": [str(nanoaod_dir / "nano_dy.root"), str(nanoaod_dir / "nano_dy_empty.root")],
            "output": "scores",
        },
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = Pipeline(tmp_path / "pipeline.yaml").run()
    assert list(result.outputs) == ["convert", "train", "tune", "predict"]

    import h5py

    with h5py.File(tmp_path / "real.h5") as f:
        n = len(f["label"])
        assert 0 < n <= 240  # 200 ttbar + 40 Drell-Yan events before the cut
        assert list(f["label"].attrs["class_names"]) == ["ttbar", "dy"]
        assert f["objects/GoodJet/pt"].shape == (n, 4)
        assert set(f["label"][:]) == {0, 1}
    # A handful of test events only: the AUC is a number between 0 and 1, nothing finer.
    assert 0.0 <= result.test_auc <= 1.0
    assert (tmp_path / "tune" / "best" / "bundle.json").is_file()
    with (
        h5py.File(tmp_path / "scores" / "nano_dy.h5") as f,
        h5py.File(tmp_path / "scores" / "nano_dy_empty.h5") as empty,
    ):
        assert 0 < len(f["scores"]) <= 40 and f["scores"].shape[1] == 2
        assert empty["scores"].shape == (0, 2)


def test_convert_without_a_skim_streams_nanoaod(pipeline_dir):
    """With no ``skim:`` section the convert stage reads the NanoAOD files directly."""
    import h5py

    config = load_config(pipeline_dir / "pipeline.yaml")
    config.skim = None
    config.convert.objects = ["Jet"]
    config.convert.scalars = ["MET_pt"]
    config.convert.collections = {"Jet": {"max_len": 4, "fields": ["pt", "eta"]}}
    result = Pipeline(config, base_dir=pipeline_dir).run(["convert"])
    (path,) = result.outputs["convert"]
    with h5py.File(path) as f:
        n = len(f["label"])
        assert n == 3 * 1500  # every event of ttbar, wjets and dy: no selection
        assert f["objects/Jet/pt"].shape == (n, 4)
        assert f["scalars/MET_pt"].shape == (n,)
        assert sorted(set(f["label"][:])) == [0, 1]


def test_relative_tune_storage_is_taken_from_the_yaml_directory(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "train: {inputs: [x.h5]}\ntune: {storage: 'sqlite:///tune/study.db'}\n"
    )
    assert Pipeline(tmp_path / "p.yaml")._resolved("tune").storage == (
        f"sqlite:///{tmp_path / 'tune' / 'study.db'}"
    )
    (tmp_path / "q.yaml").write_text("tune: {storage: 'journal://shared/study.log'}\n")
    assert Pipeline(tmp_path / "q.yaml")._resolved("tune").storage == (
        f"journal://{tmp_path / 'shared' / 'study.log'}"
    )
