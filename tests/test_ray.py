"""`--ray`: the feature pass and the sweep on a real Ray cluster started here on 127.0.0.1 (a head and a second
node, one CPU each, as separate processes), against the same work done in this process."""

from __future__ import annotations

import csv
import importlib.util
import json
import sqlite3
import time
from contextlib import closing

import numpy as np
import pytest

from conftest import TINY, require
from mobiletune.config import load_config
from mobiletune.data import folders as data
from mobiletune.errors import UsageError
from mobiletune.features import cluster as cluster_lib
from mobiletune.features import compute as features
from mobiletune.model.network import create_model

HAS_RAY = importlib.util.find_spec("ray") is not None


@pytest.fixture(scope="module")
def cluster():
    require("Ray", HAS_RAY, "pip install 'mobiletune[ray]'; .ci/run installs it")
    from ray_local import LocalCluster

    started = LocalCluster(nodes=2)
    yield started
    started.stop()


def _all_rows(feats: features.Features) -> dict[str, list[np.ndarray]]:
    outputs = range(len(feats.readers["train"].shapes))
    return {split: reader.read(np.arange(len(reader)), list(outputs)) for split, reader in feats.readers.items()}


def _stored_once(feats: features.Features) -> bool:
    """Every item of the store in one shard only: rows over all shards = distinct keys."""
    store = feats.readers["train"].store
    return sum(shard.rows for shard in store.shards) == len(store)


def _truncated_copy(folder) -> None:
    victim = sorted((folder / "train" / "cats").iterdir())[0]
    (folder / "train" / "cats" / "truncated.jpg").write_bytes(victim.read_bytes()[:2000])


def test_features_on_the_cluster_equal_a_local_pass(cluster, cats_dogs_tiny, tmp_path):
    _truncated_copy(cats_dogs_tiny)
    config = load_config(overrides=[*TINY, "data.image_size=64", "features.views=2"])
    model = create_model(config, 2)
    images = data.load_images(cats_dogs_tiny, config.data)
    local = features.compute_features(model, images, config, tmp_path / "here", plain=True)
    with cluster_lib.connected(cluster_lib.RayCluster(cluster.address, batch=3)):
        remote = features.compute_features(model, images, config, tmp_path / "ray", plain=True)
        again = features.compute_features(model, images, config, tmp_path / "ray", plain=True)
    # the truncated copy fails in both
    assert (remote.computed, remote.failed) == (local.computed, local.failed) == (12 * 2 + 10 + 12, 1)
    assert (again.computed, again.cached) == (0, remote.computed)  # a warm store: no actor starts
    assert remote.images.paths == local.images.paths
    ours, theirs = _all_rows(local), _all_rows(remote)
    for split in ours:
        for a, b in zip(ours[split], theirs[split], strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)  # float16 boundaries included, to the bit
    assert np.array_equal(np.asarray(local.pooled_plain), np.asarray(remote.pooled_plain))
    assert _stored_once(remote)


def test_a_sweep_runs_trials_on_both_nodes_and_a_lost_node_costs_one_trial(cluster, cats_dogs_tiny, tmp_path,
                                                                           capsys):
    """`sweep --ray --workers 2`: a trial worker on each node; node 1 killed inside a trial, after it finished
    one: that trial fails at once, the head's worker finishes the study, best/ is made as without Ray."""
    import threading

    import optuna
    import ray

    import mobiletune as mt
    from test_study import _space_file

    out, n_trials, killed = tmp_path / "sweep", 6, {}
    study_url = f"sqlite:///{out / 'study.db'}"

    def trials_on(node: str) -> list[tuple[str, int]]:
        """(state, number) of each trial on `node`, read-only: opening the study here would race its creation"""
        with closing(sqlite3.connect(f"file:{out / 'study.db'}?mode=ro", uri=True)) as db:
            return db.execute("SELECT t.state, t.number FROM trials t JOIN trial_user_attributes a ON a.trial_id = "
                              "t.trial_id WHERE a.key = 'node' AND a.value_json = ?", (json.dumps(node),)).fetchall()

    def kill_node_1_inside_its_second_trial() -> None:
        while not killed and not stop.is_set():
            try:
                node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in
                            n["Resources"])
                states = {state for state, _ in trials_on(node)}
            except (StopIteration, ray.exceptions.RayError, sqlite3.Error):
                states = set()  # the driver's connection or the study not made yet
            if states & {"COMPLETE", "PRUNED"} and "RUNNING" in states:
                killed["node"] = node
                cluster.kill(1)
                # the trials it was running when it died (a trial can finish between the read above and the kill)
                killed["running"] = [number for state, number in trials_on(node) if state == "RUNNING"]
            time.sleep(0.2)

    stop = threading.Event()
    watcher = threading.Thread(target=kill_node_1_inside_its_second_trial, daemon=True)
    watcher.start()
    try:
        results = mt.sweep(cats_dogs_tiny, out, trials=n_trials, space=_space_file(tmp_path), grace_period=600,
                           overrides=TINY, workers=2, ray=cluster.address, verbose=False)
    finally:
        stop.set()
        watcher.join()
        cluster.restart(1)  # for the tests after this one
    trials = optuna.load_study(study_name="mobiletune", storage=study_url).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert killed, "node 1 never ran a second trial"
    # the trial it was running is failed by the sweep when Ray marks the node dead (the grace period, 600 s, never
    # runs out), and no other: a lost node costs its running trial only
    assert [t.number for t in failed] == killed["running"], (killed, [(t.number, t.state.name) for t in trials])
    assert all(t.user_attrs["node"] == killed["node"] for t in failed)
    assert len(finished) >= n_trials and not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert len({t.user_attrs["node"] for t in trials}) == 2  # each node ran trials
    assert results["best_trial"] in {t.number for t in finished} and (out / "best" / "model.keras").exists()
    assert len(list(csv.DictReader((out / "trials.csv").open()))) == len(trials)
    assert "marked dead" not in capsys.readouterr().out  # the loss is ours to say, in one line, not Ray's advice


def test_a_node_lost_mid_pass_costs_only_its_batches(cluster, tmp_path, monkeypatch):
    from conftest import FLOWERS, copy_images

    copy_images(FLOWERS, tmp_path / "flowers", 12)
    config = load_config(overrides=[*TINY, "data.image_size=64", "features.views=2"])
    model = create_model(config, 5)
    images = data.load_images(tmp_path / "flowers", config.data)
    seen = {}
    original = cluster_lib.ClusterComputer.__call__

    def losing_a_node(self, chunk, folder, heartbeat):
        beats = [0]

        def beat():  # after the actors' first results, with batches in flight on both nodes
            beats[0] += 1
            if beats[0] == 2:
                seen["actors before"] = len(self.actors)
                cluster.kill(1)
            heartbeat()

        bad = original(self, chunk, folder, beat)
        seen["actors after"] = len(self.actors)
        return bad

    monkeypatch.setattr(cluster_lib.ClusterComputer, "__call__", losing_a_node)
    with cluster_lib.connected(cluster_lib.RayCluster(cluster.address, batch=2)):
        remote = features.compute_features(model, images, config, tmp_path / "ray")
    assert seen == {"actors before": 2, "actors after": 1}
    local = features.compute_features(model, images, config, tmp_path / "here")
    assert remote.computed == local.computed == 2 * len(images.indices("train")) + len(
        images.indices("validation")) + len(images.indices("test"))
    ours, theirs = _all_rows(local), _all_rows(remote)
    for split in ours:
        for a, b in zip(ours[split], theirs[split], strict=True):
            assert np.array_equal(a, b)
    assert _stored_once(remote)
    assert not list((tmp_path / "ray" / "features").glob("*/claims/*.json"))  # every claim released


def test_without_ray_nothing_imports_it(cats_dogs_tiny, tmp_path):
    """A train without `ray=`, and the sweep's modules, never import Ray, though it is installed (its import alone
    costs ~1 s)."""
    import subprocess
    import sys

    code = f"""
import sys
import mobiletune as mt
overrides = {TINY!r} + ["features.cache_dir={tmp_path / 'cache'}"]
mt.train({str(cats_dogs_tiny)!r}, {str(tmp_path / 'run')!r}, overrides=overrides, verbose=False)
import mobiletune.tuning.study, mobiletune.tuning.helpers, mobiletune.tuning.worker
print("ray imported:", "ray" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "ray imported: False"


def test_without_ray_installed_asking_for_it_is_one_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else object())
    with pytest.raises(UsageError, match=r"pip install 'mobiletune\[ray\]'"):
        with cluster_lib.connected("auto"):
            pass


def test_an_address_where_nothing_listens_is_one_line_at_once(cats_dogs_tiny, tmp_path):
    """Ray itself would retry a dead address for about a minute; the probe answers in well under PROBE_S."""
    import socket

    from typer.testing import CliRunner

    from mobiletune.cli import app

    require("Ray", HAS_RAY, "pip install 'mobiletune[ray]'; .ci/run installs it")
    with closing(socket.socket()) as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["audit", str(cats_dogs_tiny), "--out", str(tmp_path / "audit"),
                                          "--ray", f"127.0.0.1:{port}"])
    assert result.exit_code != 0 and time.perf_counter() - started < 10
    assert result.output.strip() == (f"error: --ray 127.0.0.1:{port}: nothing answers there (Connection refused); "
                                     "start a cluster with `ray start --head`, or give its address")
    for bad in ("127.0.0.1", "host:port", "host:0", "host:65536", "host:99999999999999999999", "host:\u00b2"):
        with pytest.raises(UsageError, match="give HOST:PORT"):
            cluster_lib.probe(bad)
    with socket.create_server(("127.0.0.1", 0)) as listening:  # what answers passes, in every form
        port = listening.getsockname()[1]
        for good in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", f"localhost:{port}", "auto"):
            cluster_lib.probe(good)


def test_bad_settings_are_one_line(tmp_path):
    from mobiletune.tracking.tracker import Mlflow
    from mobiletune.tuning.study import run_sweep

    with pytest.raises(UsageError, match=r"RayCluster\(batch=0\)"):
        cluster_lib.RayCluster("auto", batch=0)
    with pytest.raises(UsageError, match=r"RayCluster\(actors=-1\)"):
        cluster_lib.RayCluster("auto", actors=-1)
    with pytest.raises(UsageError, match="--ray with MLflow tracking"):  # before any image is read
        run_sweep(load_config(overrides=TINY), tmp_path / "no-data", tmp_path / "sweep", ray="auto",
                  mlflow=Mlflow("http://127.0.0.1:1"))


def test_train_on_the_cluster_gives_the_same_run(cluster, cats_dogs_tiny, tmp_path):
    import mobiletune as mt

    runs = {}
    for name, ray in (("here", None), ("ray", cluster.address)):
        run = mt.train(cats_dogs_tiny, tmp_path / name, overrides=[*TINY, f"features.cache_dir={tmp_path / name}-c"],
                       verbose=False, ray=ray)
        runs[name] = run.metrics
    for phase in ("before_fine_tuning", "after_fine_tuning"):
        ours, theirs = runs["here"][phase]["test"], runs["ray"][phase]["test"]
        # the features are equal to the bit (above); two trainings in one process agree to ~1e-6
        assert theirs["accuracy"] == ours["accuracy"] and theirs["loss"] == pytest.approx(ours["loss"], rel=1e-5)
    assert runs["ray"]["features"]["images_computed"] == runs["here"]["features"]["images_computed"] > 0
