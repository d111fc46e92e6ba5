"""The Tuner: a real Optuna study (SQLite storage) over depth, width and learning rate."""

from __future__ import annotations

import json

import optuna
import pytest

from cmsmlkit import Tuner
from cmsmlkit.errors import ConfigError


def _tuner(demo_chain, out, **fields):
    train = {"inputs": [str(demo_chain.h5)], "batch_size": 256, "tracking": {"enabled": False}}
    return Tuner(output=str(out), train=train, max_epochs=2, depth=[1, 2], width=[8, 32], **fields)


def test_study_runs_trials_and_keeps_the_best_bundle(demo_chain, tmp_path):
    result = _tuner(demo_chain, tmp_path / "tune", n_trials=2).run()
    assert result.n_trials == 2
    assert (tmp_path / "tune" / "best" / "bundle.json").is_file()
    assert (tmp_path / "tune" / "study.db").is_file()
    summary = json.loads(result.summary_path.read_text())
    assert len(summary["trials"]) == 2
    values = [t["value"] for t in summary["trials"] if t["value"] is not None]
    assert summary["best_value"] == max(values) == pytest.approx(result.best_value)
    assert 1 <= result.best_params["depth"] <= 2 and 8 <= result.best_params["width"] <= 32
    best = json.loads((tmp_path / "tune" / "best" / "bundle.json").read_text())
    assert best["model"]["hidden"] == [result.best_params["width"]] * result.best_params["depth"]
    assert 0.5 < result.best_value < 1.0


def test_a_rerun_resumes_the_stored_study(demo_chain, tmp_path):
    _tuner(demo_chain, tmp_path / "tune", n_trials=1).run()
    result = _tuner(demo_chain, tmp_path / "tune", n_trials=2).run()
    study = optuna.load_study(
        study_name="cmsmlkit", storage=f"sqlite:///{tmp_path / 'tune' / 'study.db'}"
    )
    assert len(study.trials) == 2 == result.n_trials


def test_target_stops_the_study_early(demo_chain, tmp_path):
    result = _tuner(demo_chain, tmp_path / "tune", n_trials=5, target=0.5).run()
    assert result.n_trials == 1


def test_bad_ranges_fail_at_construction():
    with pytest.raises(ConfigError, match=r"tune.depth must be \[min, max\]"):
        Tuner(depth=[3, 1])
    with pytest.raises(ConfigError, match="tune.width"):
        Tuner(width=[0, 10])
