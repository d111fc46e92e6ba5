"""`cmsml init` (cmsmlkit/starter.py): the starter YAML loads, keeps its comments, and runs."""

from __future__ import annotations

import re

import h5py
import pytest

from cmsmlkit import load_config
from cmsmlkit.cli import main
from cmsmlkit.config import PipelineConfig, load_yaml, validate
from cmsmlkit.errors import ConfigError
from cmsmlkit.starter import DatasetSpec, parse_dataset, starter_yaml, write_starter

DATASETS = [
    "ttbar=signal:data/ttbar_*.root,data/ttbar_ext.root",
    "wjets=background:root://eosuser.cern.ch//eos/user/j/jdoe/wjets.root",
    "dy=background:dy_files.txt",
]


def test_written_file_loads_with_the_datasets(tmp_path):
    path = write_starter(tmp_path / "pipeline.yaml", DATASETS)
    cfg = load_config(path)
    assert list(cfg.source.datasets) == ["ttbar", "wjets", "dy"]
    assert cfg.source.datasets["ttbar"].files == ["data/ttbar_*.root", "data/ttbar_ext.root"]
    assert cfg.source.datasets["ttbar"].label == "signal"
    # the URL keeps its colons: only the first ':' ends the label
    assert cfg.source.datasets["wjets"].files == [
        "root://eosuser.cern.ch//eos/user/j/jdoe/wjets.root"
    ]
    assert cfg.source.datasets["dy"].label == "background"
    assert cfg.cluster.type == "local" and cfg.cluster.workers == 1
    assert cfg.skim.selection.cuts == ["num(GoodJet) >= 2"]
    assert cfg.skim.selection.objects["GoodJet"].from_ == "Jet"
    assert cfg.convert.collections["GoodJet"].max_len == 6
    assert cfg.train.output == "model" and cfg.train.features == ["*"]
    # tune and predict are there as comments only
    assert cfg.tune is None and cfg.predict is None


def test_comments_are_in_the_file(tmp_path):
    text = write_starter(tmp_path / "p.yaml", DATASETS).read_text()
    assert text.startswith("# cmsmlkit pipeline, written by `cmsml init`.")
    assert "  type: local          # local | htcondor | slurm\n" in text
    assert "# event cuts, applied in order" in text
    assert text.count("# xsec: 1.0") == 3
    assert sum(line.lstrip().startswith("#") for line in text.splitlines()) == 18


def test_round_trip(tmp_path):
    path = write_starter(tmp_path / "p.yaml", DATASETS)
    cfg = load_config(path)
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    assert load_config(again).to_dict() == cfg.to_dict()
    assert load_yaml(again) == load_yaml(path)


def test_commented_sections_are_valid_once_uncommented(tmp_path):
    text = starter_yaml(DATASETS)
    lines = text.splitlines()
    start = lines.index("# tune:")
    uncommented = lines[:start] + [re.sub(r"^# ?", "", line) for line in lines[start:]]
    uncommented = [line for line in uncommented if not line.startswith(("Uncomment", "per trial"))]
    (tmp_path / "full.yaml").write_text("\n".join(uncommented))
    cfg = load_config(tmp_path / "full.yaml")
    assert cfg.tune.n_trials == 10 and cfg.tune.output == "tune"
    assert cfg.predict.inputs == ["new/*.root"] and cfg.predict.bundle == "model"


def test_without_datasets_two_placeholders():
    data = validate(PipelineConfig, __import__("yaml").safe_load(starter_yaml()))
    assert {n: d.label for n, d in data.source.datasets.items()} == {
        "signal_sample": "signal",
        "background_sample": "background",
    }


@pytest.mark.parametrize(
    ("cluster", "key", "value"),
    [("htcondor", "job_flavour", "longlunch"), ("slurm", "walltime", "01:00:00")],
)
def test_cluster_blocks(tmp_path, cluster, key, value):
    cfg = load_config(write_starter(tmp_path / "p.yaml", DATASETS, cluster=cluster))
    assert cfg.cluster.type == cluster
    assert getattr(cfg.cluster, key) == value


def test_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("train: {}\n")
    with pytest.raises(ConfigError, match=r"pipeline.yaml exists; .*--force"):
        write_starter(path, DATASETS)
    assert path.read_text() == "train: {}\n"
    write_starter(path, DATASETS, force=True)
    assert load_config(path).source is not None
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline.yaml"]  # no temp file left


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ttbar", "write NAME=LABEL:FILES"),
        ("ttbar=signal", "write NAME=LABEL:FILES"),
        ("ttbar=signal:", "write NAME=LABEL:FILES"),
        ("=signal:a.root", "write NAME=LABEL:FILES"),
        ("2tt=signal:a.root", "the dataset name '2tt'"),
        ("tt=sig nal:a.root", "the label 'sig nal'"),
    ],
)
def test_malformed_dataset(spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_dataset(spec)


def test_parse_dataset():
    assert parse_dataset(" tt = signal : a.root , b/*.root ") == DatasetSpec(
        "tt", "signal", ("a.root", "b/*.root")
    )


def test_one_class_or_duplicate_names_refused(tmp_path):
    with pytest.raises(ConfigError, match="at least two classes"):
        starter_yaml(["a=signal:a.root", "b=signal:b.root"])
    with pytest.raises(ConfigError, match="dataset name.s. a given more than once"):
        starter_yaml(["a=signal:a.root", "a=background:b.root"])
    with pytest.raises(ConfigError, match="--cluster 'address'"):
        starter_yaml(DATASETS, cluster="address")


def test_cli_init(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    argv = ["init", str(path), "--dataset", DATASETS[0], "--dataset", DATASETS[1]]
    assert main(argv) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    assert list(load_config(path).source.datasets) == ["ttbar", "wjets"]
    assert main(argv) == 2
    assert "exists; choose another name or pass --force" in capsys.readouterr().err
    assert main([*argv, "--force", "--cluster", "htcondor"]) == 0
    assert load_config(path).cluster.type == "htcondor"


def test_starter_converts_real_files(tmp_path):
    """The starter's selection runs as written on NanoAOD-like files (skim + convert)."""
    from cmsmlkit.data import toy
    from cmsmlkit.pipeline import Pipeline

    toy.write_nanoaod(tmp_path / "data" / "ttbar.root", "ttbar", 1500)
    toy.write_nanoaod(tmp_path / "data" / "wjets.root", "wjets", 1500)
    path = write_starter(
        tmp_path / "pipeline.yaml",
        ["ttbar=signal:data/ttbar.root", "wjets=background:data/w*.root"],
    )
    result = Pipeline(path).run(["convert"])
    assert result.outputs["convert"] == [tmp_path / "data.h5"]
    with h5py.File(tmp_path / "data.h5") as f:
        n = len(f["label"])
        assert 0 < n < 3000
        assert f["objects/GoodJet/pt"].shape == (n, 6)
        assert f["objects/GoodMuon/pt"].shape == (n, 2)
        assert {"ht", "n_jets", "met"} <= set(f["scalars"])
        assert (f["scalars/n_jets"][:] >= 2).all()
        assert set(f["label"][:]) == {0, 1}


def test_help_explains_init(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["init", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: cmsml init" in out and "NAME=LABEL:FILES" in out and "--force" in out
