"""Tracking against the real things: TensorBoard's own event reader, and an `mlflow server` on 127.0.0.1
read back with MlflowClient."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import TINY
from mobiletune import runfolder
from mobiletune.cli import app
from mobiletune.config import load_config
from mobiletune.data import folders as data
from mobiletune.tracking.tracker import MLFLOW_DEFAULTS, Mlflow
from mobiletune.training.run import train_and_evaluate
from mobiletune.tuning.study import run_sweep

SETS = [a for kv in TINY for a in ("--set", kv)]


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard finds in one run folder (train/, validation/, test/): {tag: [(step, value)]}."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"tensors": 0}).Reload()
    return {tag: [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]
            for tag in events.Tags()["tensors"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # tracking needs no job runners (MLflow starts seven Python processes for them otherwise)
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server, uri
        except OSError:
            time.sleep(0.3)
        if server.poll() is not None:
            break
    os.killpg(server.pid, signal.SIGKILL)
    raise RuntimeError("mlflow server did not start")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server, uri = _start_server(tmp_path_factory.mktemp("mlflow"))
    yield uri
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def test_a_run_writes_tensorboard_curves_for_both_phases(cats_dogs_tiny, tmp_path):
    config = load_config(overrides=[*TINY, "phase1.epochs=2", "phase2.epochs=2"])
    result = train_and_evaluate(config, cats_dogs_tiny, tmp_path / "run")
    logs = tmp_path / "run" / "logs"
    train, validation, test = (_scalars(logs / name) for name in ("train", "validation", "test"))
    history = result.history
    # per-epoch loss and accuracy, both phases, stepped by Keras' epoch index (0-based)
    assert [s for s, _ in train["epoch_loss"]] == [0, 1, 2, 3]
    assert np.allclose([v for _, v in train["epoch_loss"]], [r["loss"] for r in history])
    assert np.allclose([v for _, v in validation["epoch_accuracy"]], [r["val_accuracy"] for r in history])
    # the start of fine-tuning: the phase steps from 1 to 2 and the learning rate falls by lr_ratio
    assert [v for _, v in train["epoch_phase"]] == [1, 1, 2, 2]
    rates = [v for _, v in train["epoch_learning_rate"]]
    assert np.allclose(rates, [1e-3, 1e-3, 1e-4, 1e-4])
    # the test set before (last epoch of phase 1) and after fine-tuning (last epoch)
    before, after = (result.metrics[s]["test"] for s in ("before_fine_tuning", "after_fine_tuning"))
    assert test["epoch_accuracy"] == [(1, pytest.approx(before["accuracy"])), (3, pytest.approx(after["accuracy"]))]
    assert test["epoch_loss"] == [(1, pytest.approx(before["loss"])), (3, pytest.approx(after["loss"]))]


def test_mlflow_server_gets_params_epochs_test_metrics_artifacts_and_digests(cats_dogs_tiny, tmp_path, mlflow_server):
    from mlflow import MlflowClient

    users = {k for k in MLFLOW_DEFAULTS if k in os.environ}
    result = CliRunner().invoke(app, ["train", str(cats_dogs_tiny), "--out", str(tmp_path / "run"), *SETS,
                                      "--mlflow", mlflow_server])
    assert result.exit_code == 0, result.output
    assert {k for k in MLFLOW_DEFAULTS if k in os.environ} == users  # our settings held for our calls only
    assert f"MLflow: {mlflow_server}/#/experiments/" in result.output
    assert "View run" not in result.output  # MLflow's own link, one per run it ends, is ours to print once
    metrics = runfolder.read_metrics(tmp_path / "run")
    run_id = runfolder.read_json(tmp_path / "run" / "run.json")["mlflow"]["run_id"]
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    config = load_config(tmp_path / "run" / "config.yaml")
    assert run.data.params == {k: str(v) for k, v in config.flat().items()}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_accuracy")] == [
        (int(r["epoch"]), pytest.approx(float(r["val_accuracy"]))) for r in runfolder.read_csv(tmp_path / "run" /
                                                                                        "history.csv")]
    assert [m.value for m in client.get_metric_history(run_id, "phase")] == [1, 2]
    for stage in ("before", "after"):
        test = metrics[f"{stage}_fine_tuning"]["test"]
        assert run.data.metrics[f"test_accuracy_{stage}"] == pytest.approx(test["accuracy"])
        assert run.data.metrics[f"test_loss_{stage}"] == pytest.approx(test["loss"])
    assert run.data.tags["mobiletune.data_sha256"] == metrics["data_sha256"]
    assert run.data.tags["mobiletune.base_weights_sha256"] == metrics["environment"]["base_weights_sha256"]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.md", "report.html", "model.keras", "after_fine_tuning.png", "metrics.json", "logs"} <= artifacts
    local = Path(client.download_artifacts(run_id, "model.keras", str(tmp_path)))
    assert local.read_bytes() == (tmp_path / "run" / "model.keras").read_bytes()


def test_a_sweep_is_a_parent_run_with_a_nested_run_per_trial(cats_dogs_tiny, tmp_path, mlflow_server):
    from mlflow import MlflowClient

    space = tmp_path / "space.yaml"
    space.write_text("phase1.lr: {type: float, low: 0.0001, high: 0.01, log: true}\n")
    out = tmp_path / "sweep"
    results = run_sweep(load_config(overrides=TINY), cats_dogs_tiny, out, n_trials=2, space_path=space,
                        mlflow=Mlflow(mlflow_server))
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["trial-0000", "trial-0001"]
    assert _scalars(out / "logs" / "trial-0001" / "validation")["epoch_accuracy"]  # one TensorBoard folder a trial
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("mobiletune")
    runs = client.search_runs([experiment.experiment_id], f"tags.mobiletune.sweep_folder = '{out.resolve()}'")
    assert len(runs) == 1
    parent = runs[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(results["best_value"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"summary.md", "trials.csv", "sweep.json"}
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = sorted(r.info.run_name for r in children)
    assert names == sorted(["trial-0000", "trial-0001", "best", *(["default"] if (out / "default").exists() else [])])
    trials = {r.info.run_name: r for r in children if r.info.run_name.startswith("trial-")}
    searched = runfolder.read_csv(out / "trials.csv")[1]["phase1.lr"]  # the trial's own config, as params
    assert float(trials["trial-0001"].data.params["phase1.lr"]) == pytest.approx(float(searched))
    assert all(r.info.status == "FINISHED" for r in children)
    assert client.get_metric_history(trials["trial-0000"].info.run_id, "val_accuracy")
    best = next(r for r in children if r.info.run_name == "best")  # its trial's epochs, not trained again
    assert [(m.step, m.value) for m in client.get_metric_history(best.info.run_id, "val_accuracy")] == [
        (int(r["epoch"]), pytest.approx(float(r["val_accuracy"]))) for r in runfolder.read_csv(out / "best" /
                                                                                        "history.csv")]
    lr = load_config(out / "best" / "config.yaml").phase1.lr
    assert [m.value for m in client.get_metric_history(best.info.run_id, "learning_rate")] == pytest.approx(
        [lr, lr * 0.1])


def test_a_server_that_cannot_be_reached_costs_one_line(cats_dogs_tiny, tmp_path):
    closed = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    result = CliRunner().invoke(app, ["train", str(cats_dogs_tiny), "--out", str(tmp_path / "run"), *SETS,
                                      "--mlflow", closed])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "MLflow" in line]
    assert lines == [f"MLflow tracking at {closed} stopped (cannot reach the server); the run goes on, and "
                     "everything is in its folder"]
    assert (tmp_path / "run" / "metrics.json").exists() and (tmp_path / "run" / "logs" / "train").is_dir()
    assert time.monotonic() - started < 120


def test_a_server_that_dies_mid_run_stops_tracking_not_the_run(cats_dogs_tiny, tmp_path):
    server, uri = _start_server(tmp_path / "mlflow")
    run = tmp_path / "run"

    def kill_after_phase_1():  # history.csv is first written when phase 1 ends
        deadline = time.monotonic() + 300
        while not (run / "history.csv").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(server.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_phase_1)
    killer.start()
    try:
        result = CliRunner().invoke(app, ["train", str(cats_dogs_tiny), "--out", str(run), *SETS,
                                          "--set", "phase2.epochs=3", "--mlflow", uri])
    finally:
        killer.join()
        server.wait()
    assert result.exit_code == 0, result.output
    assert sum("MLflow tracking at" in line and "stopped" in line for line in result.output.splitlines()) == 1
    assert "; MLflow:" not in result.output  # no link to a run that is incomplete
    assert len(runfolder.read_csv(run / "history.csv")) == 4  # every epoch, in the folder
    assert (run / "metrics.json").exists() and (run / "report.html").exists()


def test_mlflow_missing_is_a_one_line_error_with_the_fix(cats_dogs_tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: `import mlflow` raises ImportError
    result = CliRunner().invoke(app, ["train", str(cats_dogs_tiny), "--out", str(tmp_path / "run"),
                                      "--mlflow", "http://127.0.0.1:1"])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: MLflow tracking (http://127.0.0.1:1) needs the mlflow package: "
                                     "pip install 'mobiletune[mlflow]'")
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:2")
    result = CliRunner().invoke(app, ["train", str(cats_dogs_tiny), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "MLflow tracking (http://127.0.0.1:2) needs the mlflow package" in result.output


def test_the_data_digest_follows_content_not_place(cats_dogs_tiny, tmp_path):
    from mobiletune.config import DataConfig

    cfg = DataConfig(image_size=32)
    before = data.load_images(cats_dogs_tiny, cfg).digest()
    moved = tmp_path / "elsewhere"
    cats_dogs_tiny.rename(moved)
    assert data.load_images(moved, cfg).digest() == before
    next((moved / "train" / "cats").iterdir()).unlink()
    assert data.load_images(moved, cfg).digest() != before


def test_a_uri_mlflow_cannot_open_is_one_line_too():
    from mobiletune.tracking.tracker import MlflowRun

    said = []
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "7"  # a user's own setting
    try:
        run = MlflowRun.start(Mlflow("localhost:5000"), "run", said.append, params={"a": 1})
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    assert not run.active and run.failed and run.link == ""
    assert len(said) == 1 and said[0].startswith("MLflow tracking at localhost:5000 stopped (")
    run.log_metrics({"loss": 1.0}, step=1)  # switched off: nothing more is tried, nor said
    run.end()
    assert len(said) == 1
