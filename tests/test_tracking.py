"""MLflow tracking: runs, params, metrics, figures, nesting and failure in a real SQLite store,
and the same against a real ``mlflow server`` on loopback (tests/mlflow_server.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cmsmlkit.config import TrackingConfig
from cmsmlkit.errors import ConfigError
from cmsmlkit.plots import loss_figure
from cmsmlkit.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    RunHandle,
    default_uri,
    flatten_params,
    mask_uri,
    start_run,
)

# --------------------------------------------------------------------------- without MLflow


def test_default_uri_is_an_absolute_sqlite_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_uri("runs") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert default_uri("/data/x") == "sqlite:////data/x/mlflow.db"


def test_mask_uri_hides_the_password():
    assert mask_uri("https://alice:s3cret@mlflow.cern.ch/") == "https://alice:***@mlflow.cern.ch/"
    assert (
        mask_uri("postgresql://bob:p%40ss@db:5432/mlflow") == "postgresql://bob:***@db:5432/mlflow"
    )
    assert mask_uri("https://token@host/") == "https://token@host/"
    assert mask_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert mask_uri(None) is None
    handle = RunHandle("abc", "https://alice:s3cret@mlflow.cern.ch/", "exp")
    assert (
        repr(handle)
        == "RunHandle(run_id='abc', experiment='exp', uri='https://alice:***@mlflow.cern.ch/')"
    )


def test_flatten_params():
    flat = flatten_params(
        {
            "model": {"hidden": [64, 64], "activation": "relu"},
            "tracking": {},
            "seed": 42,
            "uri": None,
            "features": ["Jet.*"],
            "long": "x" * 10_000,
            "weird:key[0]": 1.5,
        }
    )
    assert flat["model.hidden"] == "[64, 64]"
    assert flat["model.activation"] == "relu"
    assert flat["tracking"] == "{}"
    assert flat["seed"] == "42"
    assert flat["uri"] == "None"
    assert flat["features"] == "['Jet.*']"
    assert len(flat["long"]) == MAX_PARAM_VALUE_LENGTH and flat["long"].endswith("...")
    assert flat["weird_key_0_"] == "1.5"


def test_disabled_tracking_is_a_no_op(tmp_path):
    with start_run(
        TrackingConfig(enabled=False), directory=tmp_path, run_name="x", params={"a": 1}
    ) as run:
        assert run.run_id is None
        assert not run.enabled
        run.log_params({"b": 2})
        run.log_metrics({"auc": 0.9}, step=1)
        run.log_figures({"loss": loss_figure({"train_loss": [1.0]})})
        run.log_artifacts(tmp_path)
        assert run.lightning_logger() is False
        assert repr(run) == "RunHandle(disabled)"
    assert list(tmp_path.iterdir()) == []


def test_import_does_not_load_mlflow():
    code = (
        "import sys, cmsmlkit.tracking as t\n"
        "from cmsmlkit.config import TrackingConfig\n"
        "with t.start_run(TrackingConfig(enabled=False), directory='.', run_name='x') as run:\n"
        "    run.log_metrics({'a': 1.0})\n"
        "print('mlflow' in sys.modules, 'lightning' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


# --------------------------------------------------------------------------- a real store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating its tables takes seconds): a parent run with a
    nested child, and a run that failed."""
    directory = tmp_path_factory.mktemp("tracking")
    cwd = tmp_path_factory.mktemp("cwd")
    old_cwd = os.getcwd()
    os.chdir(cwd)
    try:
        ids = _make_runs(directory)
    finally:
        os.chdir(old_cwd)
    import mlflow

    return {
        "directory": directory,
        "ids": ids,
        "client": mlflow.MlflowClient(default_uri(directory)),
        "cwd_files": sorted(p.name for p in cwd.iterdir()),
    }


def _make_runs(directory: Path, uri: str | None = None) -> dict[str, str]:
    config = TrackingConfig(experiment="test-exp", uri=uri)
    bundle = directory / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text("{}")
    params = {"model": {"hidden": [8, 8], "dropout": 0.1}, "max_epochs": 3}
    with start_run(config, directory=directory, run_name="train", params=params) as run:
        run.log_params({"max_epochs": 3, "extra": "yes"})  # the same value again is fine
        for epoch, (loss, auc) in enumerate([(0.7, 0.8), (0.5, float("nan")), (0.4, 0.9)]):
            run.log_metrics({"val_loss": loss, "val_auc": auc, "note": "text"}, step=epoch)
        run.log_figures({"loss": loss_figure({"train_loss": [0.7, 0.5, 0.4]})})
        run.log_artifacts(bundle, artifact_path="model")
        with start_run(config, directory=directory, run_name="trial-0", nested=True) as child:
            child.log_metrics({"val_auc": 0.75})
        logger = run.lightning_logger()
        logger.log_metrics({"lightning_metric": 2.5}, step=0)
        ids = {"parent": run.run_id, "child": child.run_id, "logger": logger.run_id}
    with (
        pytest.raises(RuntimeError, match="training exploded"),
        start_run(config, directory=directory, run_name="broken") as failing,
    ):
        ids["failed"] = failing.run_id
        raise RuntimeError("training exploded")
    return ids


@pytest.mark.slow
def test_store_is_sqlite_beside_the_artifacts(store):
    directory = store["directory"]
    assert (directory / "mlflow.db").is_file()
    experiment = store["client"].get_experiment_by_name("test-exp")
    assert experiment.artifact_location == (directory / "mlartifacts").as_uri()
    assert store["cwd_files"] == []  # nothing (mlruns/, mlartifacts/) in the working directory


@pytest.mark.slow
def test_run_has_params_metrics_and_artifacts(store):
    client, ids = store["client"], store["ids"]
    run = client.get_run(ids["parent"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "train"
    assert run.data.params == {
        "model.hidden": "[8, 8]",
        "model.dropout": "0.1",
        "max_epochs": "3",
        "extra": "yes",
    }
    history = client.get_metric_history(ids["parent"], "val_auc")
    assert [(m.step, m.value) for m in history] == [(0, 0.8), (2, 0.9)]  # NaN skipped
    assert [m.value for m in client.get_metric_history(ids["parent"], "val_loss")] == [
        0.7,
        0.5,
        0.4,
    ]
    assert "note" not in run.data.metrics
    assert (
        run.data.metrics["lightning_metric"] == 2.5
    )  # the Lightning logger writes to the same run
    assert ids["logger"] == ids["parent"]
    figures = [a.path for a in client.list_artifacts(ids["parent"], "figures")]
    assert figures == ["figures/loss.png"]
    local = Path(
        client.download_artifacts(ids["parent"], "figures/loss.png", str(store["directory"]))
    )
    assert local.read_bytes()[:4] == b"\x89PNG"
    assert [a.path for a in client.list_artifacts(ids["parent"], "model")] == ["model/bundle.json"]


@pytest.mark.slow
def test_nested_run_points_to_its_parent(store):
    client, ids = store["client"], store["ids"]
    child = client.get_run(ids["child"])
    assert child.data.tags["mlflow.parentRunId"] == ids["parent"]
    assert child.info.status == "FINISHED"
    assert child.data.metrics == {"val_auc": 0.75}
    assert "mlflow.parentRunId" not in client.get_run(ids["parent"]).data.tags


@pytest.mark.slow
def test_failed_block_marks_the_run_failed(store):
    run = store["client"].get_run(store["ids"]["failed"])
    assert run.info.status == "FAILED"
    assert run.info.run_name == "broken"
    import mlflow

    assert mlflow.active_run() is None


@pytest.mark.slow
def test_changed_param_is_skipped_with_a_warning(store, caplog):
    config = TrackingConfig(experiment="test-exp")
    with (
        caplog.at_level(logging.WARNING, logger="cmsmlkit.tracking"),
        start_run(
            config, directory=store["directory"], run_name="again", params={"lr": 0.1}
        ) as run,
    ):
        run.log_params({"lr": 0.2})
    assert store["client"].get_run(run.run_id).data.params == {"lr": "0.1"}
    assert "parameter 'lr' is already '0.1'; the new value '0.2' is not logged" in caplog.text


@pytest.mark.slow
def test_bad_store_error_masks_the_password(tmp_path, caplog):
    config = TrackingConfig(uri="postgresql://alice:s3cret@127.0.0.1:1/mlflow")
    with (
        caplog.at_level(logging.DEBUG),
        pytest.raises(ConfigError) as info,
        start_run(config, directory=tmp_path, run_name="x"),
    ):
        pass  # pragma: no cover - the store cannot be reached
    message = str(info.value)
    assert "cannot use the MLflow store postgresql://alice:***@127.0.0.1:1/mlflow" in message
    assert "tracking.enabled: false" in message
    assert "s3cret" not in message
    assert "s3cret" not in caplog.text


# --------------------------------------------------------------------------- a real server

from mlflow_server import mlflow_server  # noqa: E402,F401


@pytest.mark.slow
def test_the_same_runs_on_a_real_mlflow_server(tmp_path, mlflow_server):  # noqa: F811
    import mlflow

    ids = _make_runs(tmp_path, uri=mlflow_server.uri)
    client = mlflow.MlflowClient(mlflow_server.uri)
    run = client.get_run(ids["parent"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.hidden"] == "[8, 8]"
    assert [(m.step, m.value) for m in client.get_metric_history(ids["parent"], "val_auc")] == [
        (0, 0.8),
        (2, 0.9),
    ]
    assert run.data.metrics["lightning_metric"] == 2.5
    assert [a.path for a in client.list_artifacts(ids["parent"], "figures")] == ["figures/loss.png"]
    assert [a.path for a in client.list_artifacts(ids["parent"], "model")] == ["model/bundle.json"]
    child = client.get_run(ids["child"])
    assert child.data.tags["mlflow.parentRunId"] == ids["parent"]
    assert client.get_run(ids["failed"]).info.status == "FAILED"
    # nothing was written locally: no SQLite file beside the runs, the server stored the artifacts
    assert not (tmp_path / "mlflow.db").exists()
    assert list((mlflow_server.directory / "artifacts").rglob("loss.png"))
