"""The Tuner: real Optuna studies (SQLite and journal-file storage) over real trainings.

Parallel trials run on a real dask LocalCluster, tracking goes to MLflow's real
SQLite store, and a dead worker is simulated by a trial that was started and
never finished (or by killing a real tuning process).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
import yaml
from slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

from cmsmlkit import Tuner
from cmsmlkit.config import ClusterConfig, TuneConfig, load_yaml
from cmsmlkit.errors import ConfigError, MissingDependencyError

#: A small space: trials of a few seconds each.
SMALL = {
    "depth": {"low": 1, "high": 2},
    "width": {"low": 8, "high": 32, "log": True},
    "learning_rate": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
}


def _train(demo_chain, **fields):
    return {
        "inputs": [str(demo_chain.h5)],
        "batch_size": 256,
        "tracking": {"enabled": False},
        **fields,
    }


def _tuner(demo_chain, out, train=None, **fields):
    fields.setdefault("space", SMALL)
    fields.setdefault("max_epochs", 1)
    fields.setdefault("figures", False)  # drawn and checked in two tests; they cost seconds
    return Tuner(output=str(out), train=train or _train(demo_chain), **fields)


def _study(out, name="cmsmlkit"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


# --------------------------------------------------------------------------- studies


def test_study_runs_trials_and_keeps_the_best_bundle(demo_chain, tmp_path):
    # the ranges of the default space, given the old way (tune.depth, tune.width)
    result = Tuner(
        output=str(tmp_path / "tune"),
        train=_train(demo_chain),
        n_trials=2,
        max_epochs=2,
        depth=[1, 2],
        width=[8, 32],
    ).run()
    assert result.n_trials == result.n_complete + result.n_pruned == 2
    assert (tmp_path / "tune" / "study.db").is_file()
    summary = json.loads(result.summary_path.read_text())
    assert len(summary["trials"]) == 2
    values = [t["value"] for t in summary["trials"] if t["value"] is not None]
    assert summary["best_value"] == max(values) == pytest.approx(result.best_value)
    assert 1 <= result.best_params["depth"] <= 2 and 8 <= result.best_params["width"] <= 32
    # the default space searches more than depth and width
    assert set(result.best_params) == {
        "depth",
        "width",
        "learning_rate",
        "model.dropout",
        "model.activation",
        "batch_size",
        "weight_decay",
    }
    best = json.loads((tmp_path / "tune" / "best" / "bundle.json").read_text())
    assert best["model"]["hidden"] == [result.best_params["width"]] * result.best_params["depth"]
    assert best["model"]["activation"] == result.best_params["model.activation"]
    assert best["train"]["batch_size"] == result.best_params["batch_size"]
    # the bundle is the best trial's training again: the same validation AUC
    assert summary["best_bundle_val_auc"] == pytest.approx(result.best_value, abs=1e-6)
    assert best["metrics"]["val_auc"] == pytest.approx(result.best_value, abs=1e-6)
    assert 0.5 < result.best_value < 1.0
    assert (
        summary["total_epochs"]
        == result.total_epochs
        == sum(t["epochs"] for t in summary["trials"])
    )
    assert {p.name for p in result.figures} >= {"history.png", "parallel_coordinates.png"}
    assert all(p.is_file() for p in result.figures)
    assert "best val AUC" in repr(result) and "2 pruned" not in repr(result)


def test_a_rerun_resumes_the_stored_study(demo_chain, tmp_path):
    first = _tuner(demo_chain, tmp_path / "tune", n_trials=1).run()
    bundle = (tmp_path / "tune" / "best" / "model.pt").stat().st_mtime_ns
    result = _tuner(demo_chain, tmp_path / "tune", n_trials=2).run()
    study = _study(tmp_path / "tune")
    assert len(study.trials) == 2 == result.n_trials
    assert study.trials[0].params == first.best_params
    if result.best_params == first.best_params:  # the same best trial: its bundle is kept
        assert (tmp_path / "tune" / "best" / "model.pt").stat().st_mtime_ns == bundle
    # nothing left to do: a third run trains nothing
    again = _tuner(demo_chain, tmp_path / "tune", n_trials=2).run()
    assert again.n_trials == 2 and again.best_value == result.best_value


def test_target_stops_the_study_early(demo_chain, tmp_path):
    result = _tuner(demo_chain, tmp_path / "tune", n_trials=5, target=0.5).run()
    assert result.n_trials == 1


def test_time_budget_starts_no_new_trial_but_always_one(demo_chain, tmp_path):
    result = _tuner(demo_chain, tmp_path / "tune", n_trials=5, timeout=0.01).run()
    assert result.n_trials == 1


def test_space_from_yaml_is_sampled_into_each_trial(demo_chain, tmp_path):
    (tmp_path / "tune.yaml").write_text(
        textwrap.dedent(
            """
            n_trials: 2
            max_epochs: 1
            pruner: none
            sampler: random
            threads_per_trial: 1
            space:
              learning_rate: {low: 1.0e-3, high: 1.0e-2, log: true}
              model.hidden: [[16], [32, 8]]
              model.activation: [gelu]
              model.dropout: 0.25
              batch_size: {low: 128, high: 512, step: 128}
            """
        )
    )
    config = TuneConfig.from_yaml(tmp_path / "tune.yaml")
    # the YAML reads back as written (a plain list stays choices, a number a fixed value)
    assert yaml.safe_load(config.to_yaml()) == load_yaml(tmp_path / "tune.yaml")
    tuner = Tuner(config, output=str(tmp_path / "tune"), train=_train(demo_chain))
    assert tuner.search_space()["model.dropout"] == {"value": 0.25}
    result = tuner.run()
    study = _study(tmp_path / "tune")
    for trial in study.trials:
        assert set(trial.params) == {
            "learning_rate",
            "model.hidden",
            "model.activation",
            "batch_size",
        }
        assert json.loads(trial.params["model.hidden"]) in ([16], [32, 8])
        assert trial.params["batch_size"] in (128, 256, 384, 512)
        assert trial.user_attrs["threads"] == 1
    best = json.loads((tmp_path / "tune" / "best" / "bundle.json").read_text())
    assert best["model"]["hidden"] == json.loads(result.best_params["model.hidden"])
    assert best["model"]["activation"] == "gelu"
    assert best["model"]["dropout"] == 0.25
    assert best["train"]["batch_size"] == result.best_params["batch_size"]
    assert best["train"]["learning_rate"] == pytest.approx(result.best_params["learning_rate"])


@pytest.mark.parametrize(
    "pruner, state",
    [("asha", "PRUNED"), ("median", "PRUNED"), ("percentile", "PRUNED"), ("none", "COMPLETE")],
)
def test_a_hopeless_trial_is_pruned_after_its_first_epoch(demo_chain, tmp_path, pruner, state):
    out = tmp_path / "tune"
    space = {"learning_rate": {"low": 1.0e-8, "high": 1.0e-1, "log": True}}
    tuner = _tuner(
        demo_chain,
        out,
        n_trials=3,
        max_epochs=3,
        space=space,
        pruner=pruner,
        pruner_startup_trials=2,
        pruner_warmup_epochs=0,
        train=_train(demo_chain, patience=5),
    )
    # the study's first trials, fixed: two that learn, then one that cannot (lr 1e-8)
    out.mkdir()
    study = optuna.create_study(
        study_name="cmsmlkit", storage=f"sqlite:///{out / 'study.db'}", direction="maximize"
    )
    for lr in (3e-2, 3e-2, 1e-8):
        study.enqueue_trial({"learning_rate": lr})
    result = tuner.run()
    trials = {t["number"]: t for t in result.trials}
    assert [trials[n]["state"] for n in (0, 1, 2)] == ["COMPLETE", "COMPLETE", state]
    assert trials[2]["epochs"] == (1 if state == "PRUNED" else 3)
    assert result.total_epochs == 6 + trials[2]["epochs"]
    assert result.n_pruned == (state == "PRUNED")


#: Four finished trials, each better than the one before (validation AUC per epoch).
FINISHED = [[0.70 + 0.02 * k + 0.01 * epoch for epoch in range(8)] for k in range(4)]
#: Hopeless from the first epoch; above the median after it, then falling behind; the best.
PROBES = ([0.5] * 8, [0.75] + [0.74] * 7, [0.80 + 0.01 * epoch for epoch in range(8)])


def _pruned_at(study: optuna.Study, curve: list[float]) -> int | None:
    """Report ``curve`` epoch by epoch as a trial of ``study``: the epoch it is pruned at, or None."""
    trial = study.ask()
    for epoch, value in enumerate(curve):
        trial.report(value, epoch)
        if trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return epoch
    study.tell(trial, curve[-1])
    return None


@pytest.mark.parametrize(
    "fields, pruned_at",
    [
        # the default: a median cut after the first epoch, then the best quarter goes on
        ({}, [0, 1, None]),
        ({"pruner": "asha", "pruner_warmup_epochs": 1}, [1, 1, None]),  # plain halving
        ({"pruner": "median"}, [0, 3, None]),
        ({"pruner": "percentile"}, [0, 1, None]),  # the best 25 %
        ({"pruner": "percentile", "pruner_percentile": 60.0}, [0, 3, None]),
        ({"pruner": "none"}, [None, None, None]),
    ],
)
def test_each_pruner_stops_trials_at_the_epochs_it_promises(tmp_path, fields, pruned_at):
    tuner = Tuner(output=str(tmp_path / "tune"), **fields)
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}",
        direction="maximize",
        pruner=tuner._pruner(),
    )
    assert [_pruned_at(study, curve) for curve in FINISHED] == [None] * 4
    assert [_pruned_at(study, curve) for curve in PROBES] == pruned_at


def test_pruner_settings_are_checked():
    assert TuneConfig().pruner == "asha" and TuneConfig().pruner_warmup_epochs == 0
    with pytest.raises(ConfigError, match=r"'pruner' must be one of 'asha', 'median', 'perc"):
        Tuner(pruner="ahsa")
    with pytest.raises(ConfigError, match="'pruner_percentile': Input should be less than or"):
        Tuner(pruner="percentile", pruner_percentile=150)
    with pytest.raises(ConfigError, match="'pruner_reduction_factor': Input should be greater"):
        Tuner(pruner_reduction_factor=1)


# --------------------------------------------------------------------------- crashes


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_a_trial_left_running_by_a_dead_worker_is_failed_and_retried(demo_chain, tmp_path, storage):
    out = tmp_path / "tune"
    url = None if storage == "sqlite" else f"journal:///{tmp_path / 'shared' / 'study.log'}"
    space = {"learning_rate": {"low": 1.0e-3, "high": 1.0e-2, "log": True}}
    tuner = _tuner(
        demo_chain, out, n_trials=1, max_epochs=1, space=space, storage=url, heartbeat=0.5
    )
    tuner.run()
    # a worker that asked for a trial, sampled its parameters, and died
    if storage == "sqlite":
        study = _study(out)
    else:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        backend = JournalFileBackend(str(tmp_path / "shared" / "study.log"))
        study = optuna.load_study(study_name="cmsmlkit", storage=JournalStorage(backend))
    trial = study.ask()
    lr = trial.suggest_float("learning_rate", 1.0e-3, 1.0e-2, log=True)
    assert study.trials[1].state.name == "RUNNING"
    time.sleep(2.0)  # more than 3 missed heartbeats of 0.5 s

    result = _tuner(
        demo_chain, out, n_trials=2, max_epochs=1, space=space, storage=url, heartbeat=0.5
    ).run()
    states = [t["state"] for t in result.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]
    retry = result.trials[2]
    assert retry["retry_of"] == 1
    assert retry["params"]["learning_rate"] == pytest.approx(lr)
    assert result.n_failed == 1 and result.n_complete == 2


@pytest.mark.slow
def test_a_killed_tuning_resumes_and_retries_the_interrupted_trial(demo_chain, tmp_path):
    out = tmp_path / "tune"
    script = tmp_path / "tune.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from cmsmlkit import Tuner
            Tuner(output={str(out)!r}, n_trials=2, max_epochs=30, heartbeat=0.5,
                  space={{"learning_rate": {{"low": 1.0e-3, "high": 1.0e-2, "log": True}}}},
                  train={{"inputs": [{str(demo_chain.h5)!r}], "batch_size": 64, "patience": 30,
                         "tracking": {{"enabled": False}}}}).run()
            """
        )
    )
    process = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # kill it while its first trial trains
            # read-only: loading the study with Optuna here would race its schema creation
            try:
                with contextlib.closing(
                    sqlite3.connect(f"file:{out / 'study.db'}?mode=ro", uri=True)
                ) as db:
                    epochs = db.execute("SELECT count(*) FROM trial_intermediate_values").fetchone()
                if epochs[0] >= 1:
                    break
            except sqlite3.OperationalError:  # no file or no tables yet
                pass
            assert process.poll() is None, "the tuning ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail("the first trial did not report an epoch within 240 s")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert _study(out).trials[0].state.name == "RUNNING"
    time.sleep(2.0)

    result = _tuner(
        demo_chain,
        out,
        n_trials=2,
        max_epochs=1,
        heartbeat=0.5,
        space={"learning_rate": {"low": 1.0e-3, "high": 1.0e-2, "log": True}},
    ).run()
    assert [t["state"] for t in result.trials][:1] == ["FAIL"]
    assert result.n_complete + result.n_pruned == 2
    retried = [t for t in result.trials if t["retry_of"] == 0]
    assert len(retried) == 1 and retried[0]["state"] in ("COMPLETE", "PRUNED")


# --------------------------------------------------------------------------- parallel


@pytest.mark.slow
def test_parallel_trials_on_two_workers_are_nested_mlflow_runs(demo_chain, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tuner = _tuner(
        demo_chain,
        tmp_path / "tune",
        n_trials=4,
        max_epochs=2,
        train=_train(demo_chain, tracking={"uri": uri, "experiment": "tuning"}),
        figures=True,
    )
    tuner.cluster = ClusterConfig(workers=2)
    result = tuner.run()

    study = _study(tmp_path / "tune")
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4 == len(study.trials)
    pids = {t.user_attrs["pid"] for t in finished}
    assert len(pids) == 2 and os.getpid() not in pids
    assert {t.user_attrs["threads"] for t in finished} == {1}  # the workers' threads

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("tuning")
    runs = client.search_runs([experiment.experiment_id])
    parent = client.get_run(result.run_id)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.run_id]
    assert sorted(r.info.run_name for r in children) == [f"trial_{n:04d}" for n in range(4)]
    for child in children:
        number = int(child.data.tags["optuna.trial"])
        trial = study.trials[number]
        assert float(child.data.params["learning_rate"]) == pytest.approx(
            trial.params["learning_rate"]
        )
        curve = client.get_metric_history(child.info.run_id, "val_auc")
        assert [m.step for m in curve] == sorted(trial.intermediate_values)
        # the pruner compares what the trial's run shows: the validation AUC of each epoch
        assert [m.value for m in curve] == pytest.approx(
            [trial.intermediate_values[m.step] for m in curve]
        )
        assert child.info.status == ("FINISHED" if trial.state.name == "COMPLETE" else "KILLED")
    assert parent.data.metrics["best_val_auc"] == pytest.approx(result.best_value)
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "figures")}
    assert {"figures/history.png", "figures/importances.png"} <= artifacts
    assert "best/bundle.json" in {a.path for a in client.list_artifacts(result.run_id, "best")}


SLURM_TUNE = """
import json, os, sys
from cmsmlkit import Tuner
from cmsmlkit.config import ClusterConfig

h5, partition = sys.argv[1], sys.argv[2]
cluster = ClusterConfig(
    type="slurm", partition=partition, workers=2, memory="1GB", interface="lo",
    walltime="00:10:00", log_directory="logs",
)
result = Tuner(
    output="tune", n_trials=3, max_epochs=1, figures=False,
    space={"learning_rate": {"low": 1.0e-3, "high": 1.0e-2, "log": True}},
    train={"inputs": [h5], "batch_size": 256, "tracking": {"enabled": False}},
    cluster=cluster,
).run()
print(json.dumps({"pid": os.getpid(), "best": result.best_value, "trials": result.trials}))
"""


@pytest.mark.slurm
@pytest.mark.slow
def test_trials_run_as_slurm_jobs_sharing_one_study(slurm_cluster, demo_chain, tmp_path):  # noqa: F811
    script = tmp_path / "tune_on_slurm.py"
    script.write_text(SLURM_TUNE)
    args = (str(demo_chain.h5), slurm_cluster.partition)
    done = slurm_cluster.python(script, *args, cwd=tmp_path, timeout=400)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [t["state"] for t in report["trials"]] == ["COMPLETE"] * 3
    pids = {int(t["worker"].rsplit(":", 1)[1]) for t in report["trials"]}
    assert report["pid"] not in pids and 1 <= len(pids) <= 2
    assert (tmp_path / "tune" / "best" / "bundle.json").is_file()
    # the trials ran in SLURM jobs: dask-jobqueue's worker logs are there, one per job
    logs = sorted((tmp_path / "logs").glob("*.err"))
    assert len(logs) == 2 and all("distributed.worker" in log.read_text() for log in logs)


# --------------------------------------------------------------------------- bad input


def test_bad_ranges_fail_at_construction():
    with pytest.raises(ConfigError, match=r"tune.depth must be \[min, max\] with 1 <= min <= max"):
        Tuner(depth=[0, 1])
    with pytest.raises(ConfigError, match=r"tune.width must be \[min, max\] with 0 < min <= max"):
        Tuner(width=[0, 10])
    with pytest.raises(ConfigError, match="tune.space.depth: depth must be a whole number >= 1"):
        Tuner(space={"depth": [0, 2]})
    with pytest.raises(ConfigError, match=r"low \(3\) is larger than high \(1\)"):
        Tuner(space={"depth": {"low": 3, "high": 1}})
    with pytest.raises(ConfigError, match="a log-scale range needs low > 0"):
        Tuner(space={"weight_decay": {"low": 0.0, "high": 0.1, "log": True}})


def test_unknown_space_path_suggests_the_closest_field():
    with pytest.raises(
        ConfigError,
        match=r"'model.dropuot'.*train.model has no field 'dropuot'. Did you mean 'dropout'",
    ):
        Tuner(space={"model.dropuot": {"low": 0.0, "high": 0.5}})
    with pytest.raises(ConfigError, match=r"'learning_rat'.*Did you mean 'learning_rate'"):
        Tuner(space={"learning_rat": [1e-3]})
    with pytest.raises(ConfigError, match="'output' cannot be searched"):
        Tuner(space={"output": ["a", "b"]})
    with pytest.raises(ConfigError, match="'model.dropout.x' goes into 'model.dropout'"):
        Tuner(space={"model.dropout.x": 1})


def test_space_values_are_checked_against_the_training_config():
    with pytest.raises(ConfigError, match=r"tune.space.model.dropout: the value 1.5 is not valid"):
        Tuner(space={"model.dropout": {"low": 0.0, "high": 1.5}})
    with pytest.raises(ConfigError, match=r"tune.space.model.activation: the value 'relux'"):
        Tuner(space={"model.activation": ["relu", "relux"]})
    with pytest.raises(ConfigError, match="train.model.activation' must be one of 'relu'"):
        Tuner(space={"model.activation": {"low": 1, "high": 2}})
    with pytest.raises(ConfigError, match="model.hidden and also depth/width"):
        Tuner(space={"model.hidden": [[8]], "depth": {"low": 1, "high": 2}})
    with pytest.raises(ConfigError, match="tune.depth sets a range of the default search space"):
        Tuner(depth=[1, 2], space={"learning_rate": [1e-3]})
    # YAML reads 1e-3 as text; the training config makes it a number
    tuner = Tuner(
        space={"learning_rate": ["1e-3", "1.0e-2"], "batch_size": {"low": 64, "high": 256}}
    )
    assert tuner.search_space() == {
        "learning_rate": [0.001, 0.01],
        "batch_size": {"low": 64, "high": 256},
    }
    assert repr(tuner) == (
        "Tuner(n_trials=10, space=[learning_rate, batch_size], sampler='tpe', pruner='asha', "
        "output='tune')"
    )


def test_bad_storage_and_missing_sampler_fail_at_construction():
    with pytest.raises(ConfigError, match=r"tune.storage 'study.db' is not a URL.*journal:///"):
        Tuner(storage="study.db")
    with pytest.raises(ConfigError, match="'journal://' names no file"):
        Tuner(storage="journal://")
    try:  # cmaes is not a dependency of cmsmlkit
        import cmaes  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="pip install cmaes"):
            Tuner(sampler="cmaes")
    else:
        assert Tuner(sampler="cmaes").config.sampler == "cmaes"
