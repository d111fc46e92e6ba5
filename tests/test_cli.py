"""The `cmsml` command: help texts, errors, and the demo chain end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from cmsmlkit.cli import build_parser, main

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def test_the_chain_has_its_commands():
    assert {"demo", "run", "skim", "convert", "train", "tune", "predict"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: cmsml {command}" in out
    description = build_parser()._subparsers._group_actions[0].choices[command].description
    assert description.split()[0] in out and len(description) > 60


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


def test_console_script_is_installed():
    cmsml = Path(sys.executable).parent / "cmsml"  # the venv's script, whether or not it is on PATH
    out = subprocess.run([str(cmsml), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("cmsmlkit ")


def test_config_error_exits_2_with_the_key(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  max_epoch: 3\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.max_epoch'" in err and "Did you mean 'max_epochs'?" in err


def test_stage_without_its_section(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("train: {inputs: [x.h5]}\n")
    assert main(["predict", str(path)]) == 2
    assert "stage 'predict' needs the section(s) 'predict:'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_chain_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--events", "4000"]) == 0
    printed = capsys.readouterr().out
    # every stage reports its outputs, then the test AUC
    for stage in ("convert", "train", "tune", "predict"):
        assert f"{stage}:" in printed
    auc = float(printed.split("AUC = ")[1].split()[0])
    # The toy classes overlap by design; the demo MLP reaches ~0.9 on 20k events per
    # process. With 4k events and early stopping 0.8 leaves room for seed noise while
    # still failing for a broken chain (random = 0.5) or a leak (1.0).
    assert 0.8 < auc < 0.995
    bundle = json.loads((out / "model" / "bundle.json").read_text())
    assert bundle["class_names"] == ["signal", "background"]
    assert (out / "model" / "model.onnx").is_file()
    assert (out / "tune" / "best" / "bundle.json").is_file()
    with h5py.File(out / "demo.h5") as f:
        assert f["objects/GoodJet/pt"].shape[1] == 6
        assert set(f["label"][:]) == {0, 1}
    predictions = sorted((out / "predictions").glob("*.h5"))
    assert len(predictions) == 1
    with h5py.File(predictions[0]) as f:
        scores = f["scores"][:]
        assert scores.shape[1] == 2 and len(scores) > 0
        assert abs(scores.sum(axis=1) - 1).max() < 1e-5

    # a second run finds every stage done for the same config
    assert main(["run", str(out / "pipeline.yaml")]) == 0
    again = capsys.readouterr().out
    assert again.count("already done, skipped") >= 4
    assert f"AUC = {auc:.3f}" in again


def test_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "cmsmlkit.cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "cmsmlkit" in out.stdout
