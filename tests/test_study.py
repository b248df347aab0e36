import csv
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from conftest import IN_CI, TINY, choice_in_trials_csv, require
from mobiletune.config import load_config
from mobiletune.errors import ConfigError, UsageError
from mobiletune.tuning.space import DEFAULT_SPACE, load_space
from mobiletune.tuning.study import run_sweep
from mobiletune.tuning.trials import _ReportToTrial, objective

# Small and quick: two boundaries, short phases.
SPACE = {
    "phase1.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "phase2.fine_tune_at": [100, 140],
    "phase2.epochs": {"type": "int", "low": 1, "high": 2},
}


def _space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return path


def test_default_space_holds_the_seed_recipe():
    flat = load_config().flat()
    for key, spec in DEFAULT_SPACE.items():
        value = flat[key]
        assert value in spec["choices"] if spec["type"] == "categorical" else spec["low"] <= value <= spec["high"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("phase1.learning_rate: [1, 2]", "unknown config key"),
        ("phase1.lr: {type: float, low: 1, high: 0.1}", "low < high"),
        ("phase1.lr: {type: float, low: 0, high: 0.1, log: true}", "log range"),
        ("phase1.lr: {type: normal}", "list of choices"),
        ("[1, 2]", "expected a mapping"),
        ("data.seed: [0, 1]", "data.seed cannot be searched .*one split.*--set data.seed="),
        ("model.alpha: [0.5, 1.0]", "model.alpha cannot be searched"),
        ("data.image_size: [7, 96]", "data.image_size: 7 cannot be drawn .*data.image_size=7"),  # before any trial
        ("phase1.epochs: {type: int, low: -2, high: 3}", "phase1.epochs: -2 cannot be drawn"),
    ],
)
def test_bad_spaces(tmp_path, text, needle):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_space(path)


def test_sweep_end_to_end_and_rerun_continues(cats_dogs_tiny, tmp_path, monkeypatch):
    import gc

    from mobiletune.tuning import search

    frozen = []  # objects left out of collections while each trial ran: what was alive before the trials

    def watched(*args):
        run_trial = objective(*args)
        return lambda trial: (frozen.append(gc.get_freeze_count()), run_trial(trial))[1]

    monkeypatch.setattr(search, "objective", watched)
    config = load_config(overrides=TINY)
    out = tmp_path / "sweep"
    results = run_sweep(config, cats_dogs_tiny, out, n_trials=3, space_path=_space_file(tmp_path))
    assert len(frozen) == 3 and min(frozen) > 10_000 and gc.get_freeze_count() == 0  # the heap unfrozen after
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    assert rows[0]["phase2.fine_tune_at"] == "100" and float(rows[0]["phase1.lr"]) == 0.001  # trial 0: the recipe
    summary = (out / "summary.md").read_text()
    assert "Selection used validation accuracy only" in summary and "| default recipe |" in summary
    assert "`phase2.fine_tune_at`" in summary
    assert (out / "best" / "model.keras").exists() and (out / "optimization_history.png").exists()
    chosen = choice_in_trials_csv(out / "trials.csv")
    assert results["best_trial"] == results["best"]["weights_from_trial"] == chosen
    row = next(r for r in rows if int(r["number"]) == chosen)
    made = load_config(out / "best" / "config.yaml").flat()
    assert all(made[key] == pytest.approx(float(row[key])) for key in SPACE)  # best/ is that trial's config

    again = run_sweep(config, cats_dogs_tiny, out, n_trials=3, space_path=_space_file(tmp_path))
    assert again["counts"] == results["counts"]  # nothing left to run: the study was already complete

    # continued with other images or another recipe, the study would mix them in: refused, sweep.yaml kept
    request, best = (out / "sweep.yaml").read_text(), (out / "best" / "model.keras").read_bytes()
    fewer = tmp_path / "fewer"
    shutil.copytree(cats_dogs_tiny, fewer)
    next((fewer / "train" / "cats").iterdir()).unlink()
    with pytest.raises(UsageError, match=r"ran its trials on other images or another split of them "
                                         r"\(\d+ of 2 classes; these: \d+ of 2\)"):
        run_sweep(config, fewer, out, n_trials=4, space_path=_space_file(tmp_path))
    other = load_config(overrides=[*TINY, "phase1.min_steps=7"])
    with pytest.raises(UsageError, match="ran its trials with phase1.min_steps=.* \\(now 7\\)"):
        run_sweep(other, cats_dogs_tiny, out, n_trials=4, space_path=_space_file(tmp_path))
    smaller = tmp_path / "smaller.yaml"
    smaller.write_text(yaml.safe_dump({k: v for k, v in SPACE.items() if k != "phase1.lr"}))
    with pytest.raises(UsageError, match="searched another --space"):
        run_sweep(config, cats_dogs_tiny, out, n_trials=4, space_path=smaller)
    assert (out / "sweep.yaml").read_text() == request and (out / "best" / "model.keras").read_bytes() == best
    (tmp_path / "flowers_run").mkdir()
    (tmp_path / "flowers_run" / "metrics.json").write_text('{"classes": ["daisy", "roses"]}')
    with pytest.raises(UsageError, match="--baseline .*a run of other classes \\(daisy, roses; .* has cats, dogs\\)"):
        run_sweep(config, cats_dogs_tiny, out, n_trials=3, space_path=_space_file(tmp_path),
                  baseline=tmp_path / "flowers_run")


def test_a_heap_frozen_before_the_sweep_stays_frozen():
    """A notebook or a forking server may have frozen its heap itself: the sweep leaves that as it was."""
    import gc

    from mobiletune.tuning.search import heap_frozen

    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with heap_frozen():
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_workers_on_one_machine_share_the_trials(cats_dogs_tiny, tmp_path):
    """--workers 2: a helper process runs trials of the same study; this worker chooses and retrains once."""
    import optuna

    from mobiletune.tuning import objectives

    config = load_config(overrides=TINY)
    out = tmp_path / "sweep"
    results = run_sweep(config, cats_dogs_tiny, out, n_trials=8, space_path=_space_file(tmp_path), workers=2)
    trials = optuna.load_study(study_name="mobiletune", storage=f"sqlite:///{out / 'study.db'}").trials
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) >= 8 and not [t for t in trials if t.state.name in ("RUNNING", "FAIL")]
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both processes ran trials
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)  # no trial drawn twice
    log = (out / "logs" / "worker-1.log").read_text()
    assert "COMPLETE" in log and "Traceback" not in log and "[I " not in log  # our trial lines only
    assert (out / "best" / "model.keras").exists() and results["best_trial"] in {t.number for t in finished}
    (out / "logs" / "worker-1.log").unlink()
    run_sweep(config, cats_dogs_tiny, out, n_trials=8, space_path=_space_file(tmp_path), workers=2)
    assert not (out / "logs" / "worker-1.log").exists()  # a finished study starts no helper
    with pytest.raises(UsageError, match="--workers 0: give at least 1"):
        run_sweep(config, cats_dogs_tiny, tmp_path / "none", n_trials=1, workers=0)
    ranged = tmp_path / "ranged.yaml"
    ranged.write_text(yaml.safe_dump({"data.image_size": {"type": "int", "low": 32, "high": 64}}))
    with pytest.raises(UsageError, match="data.image_size range"):
        run_sweep(config, cats_dogs_tiny, tmp_path / "none", n_trials=1, space_path=ranged, workers=2,
                  objectives=objectives.Objectives(("accuracy", "latency")))


def test_a_trial_is_never_pruned_after_its_last_epoch():
    """Its result is complete by then; a trial with fewer epochs must not be judged on others' middles."""
    import optuna

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.99))
    trial = study.ask()  # every value below 0.99 is prunable
    report = _ReportToTrial(trial, epochs=3)
    with pytest.raises(optuna.TrialPruned):
        report.on_epoch_end(1, {"val_accuracy": 0.9})
    report.on_epoch_end(2, {"val_accuracy": 0.95})  # the last epoch: reported, not pruned
    assert study.trials[0].intermediate_values == {1: 0.9, 2: 0.95}


def test_sweep_refuses_a_foreign_folder(cats_dogs_tiny, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not a sweep"):
        run_sweep(load_config(overrides=TINY), cats_dogs_tiny, tmp_path, n_trials=1)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize(("damage", "message"), [("no folder", r"--baseline \S+/run: no such run folder"),
                                                 ("missing", "--baseline: .*metrics.json"),
                                                 ("not json", "--baseline: .*metrics.json")])
def test_sweep_checks_baseline_before_searching(cats_dogs_tiny, tmp_path, damage, message):
    run = tmp_path / "run"
    if damage != "no folder":
        run.mkdir()
    if damage == "not json":
        (run / "metrics.json").write_text("{half a file")
    with pytest.raises(UsageError, match=message):
        run_sweep(load_config(overrides=TINY), cats_dogs_tiny, tmp_path / "sweep", n_trials=1, baseline=run)
    assert not (tmp_path / "sweep").exists()  # refused before anything was made


def _postgres_url() -> str | None:
    url = os.environ.get("MOBILETUNE_TEST_POSTGRES", "postgresql://mobiletune:mobiletune@127.0.0.1:5432/mobiletune_test")
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(url).connect():
            return url
    except Exception:  # noqa: BLE001 - no server: skipped locally; in CI the connection's own error
        if IN_CI:
            raise
        return None


def test_two_workers_on_postgres_survive_a_kill(cats_dogs_tiny, tmp_path):
    """Two worker processes share a study; one is SIGKILLed mid-trial; the study still completes."""
    import optuna

    url = _postgres_url()
    require("PostgreSQL on 127.0.0.1", url is not None, "scripts/start-postgres starts one; .ci/run does")
    study_name = f"test-{uuid.uuid4().hex[:8]}"
    n_trials = 6

    def worker(name: str) -> subprocess.Popen:
        args = [sys.executable, "-m", "mobiletune", "sweep", str(cats_dogs_tiny), "--out", str(tmp_path / name),
                "--storage", url, "--study", study_name, "--trials", str(n_trials), "--grace-period", "4",
                "--space", str(_space_file(tmp_path)), *[a for s in TINY for a in ("--set", s)]]
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    victim, survivor = worker("a"), worker("b")
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until the victim is inside a trial
        try:
            trials = optuna.load_study(study_name=study_name, storage=url).get_trials(deepcopy=False)
        except KeyError:  # study not created yet
            trials = []
        if any(t.state.name == "RUNNING" and t.user_attrs.get("worker", "").endswith(f":{victim.pid}")
               for t in trials):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the victim never started a trial")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    output, _ = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, output[-3000:]

    restarted = worker("a")  # a restarted worker continues the study: here, finds it done and reports
    output, _ = restarted.communicate(timeout=600)
    assert restarted.returncode == 0, output[-3000:]

    trials = optuna.load_study(study_name=study_name, storage=url).get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states and "WAITING" not in states  # every trial accounted for
    assert sum(s in ("COMPLETE", "PRUNED") for s in states) >= n_trials
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 1, [(t.number, t.state.name, t.user_attrs, victim.pid) for t in trials]
    assert len(failed) == 1 and failed[0].user_attrs["worker"].endswith(f":{victim.pid}")  # only the killed trial
    assert len({t.number for t in trials}) == len(trials)  # no trial run twice
    assert sum(t.user_attrs.get("note") == "the base recipe" for t in trials) == 1  # enqueued once by two workers
    assert all(t.user_attrs.get("worker") for t in trials)  # each trial ran in exactly one named worker
    with open(tmp_path / "b" / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == len(trials)


def test_a_rerun_that_found_a_better_config_retrains_best(tmp_path, monkeypatch):
    import json

    from mobiletune.tuning import study

    made = load_config(overrides=["phase1.lr=0.001"])
    best = tmp_path / "best"
    best.mkdir()
    (best / "config.yaml").write_text(made.to_yaml())
    (best / "metrics.json").write_text(json.dumps({"from": "the earlier best"}))
    trained = []

    class Finished:
        metrics = {"from": "a retrain"}

    monkeypatch.setattr(study, "train_and_evaluate", lambda config, *a, **k: trained.append(config) or Finished)
    assert study._run_once(made, "data", best, [100], None) == {"from": "the earlier best"} and not trained
    better = load_config(overrides=["phase1.lr=0.0005"])
    assert study._run_once(better, "data", best, [100], None) == {"from": "a retrain"} and trained == [better]


def test_workers_sharing_a_sweep_folder_take_turns_to_retrain(tmp_path, monkeypatch):
    """Two workers that finish together both retrain best/: the second waits for the first (here: the
    lock held by the test, as that worker would) and reuses its folder instead of writing into it at once."""
    import json
    import threading

    from mobiletune import runfolder
    from mobiletune.tuning import study

    config, best = load_config(), tmp_path / "best"
    trained, got = [], []
    monkeypatch.setattr(study, "train_and_evaluate", lambda c, *a, **k: trained.append(c))
    with runfolder.exclusive(tmp_path / ".best.lock"):
        worker = threading.Thread(target=lambda: got.append(study._run_once(config, "data", best, [100], None)))
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and not trained  # waiting, not training into the same folder
        best.mkdir()
        (best / "config.yaml").write_text(config.to_yaml())
        (best / "metrics.json").write_text(json.dumps({"from": "the other worker"}))
    worker.join(timeout=10)
    assert got == [{"from": "the other worker"}] and not trained


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask() outside optimize(), for the draws alone
def test_a_worker_joining_a_study_in_the_folder_draws_its_own_trials(tmp_path):
    """Two workers sharing a sweep folder (and its SQLite study) once drew the same startup trials: the
    joining one had the same sampler seed. The lone worker that makes the study keeps the seed itself."""
    from mobiletune.tuning import search

    first, created = search.open_study(tmp_path, None, "s", 0, 60)
    joined, joined_created = search.open_study(tmp_path, None, "s", 0, 60)
    assert created and not joined_created
    drawn = [s.ask().suggest_float("lr", 0.0, 1.0) for s in (first, joined)]
    (tmp_path / "other").mkdir()
    again, _ = search.open_study(tmp_path / "other", None, "s", 0, 60)
    assert drawn[0] != drawn[1]
    assert again.ask().suggest_float("lr", 0.0, 1.0) == drawn[0]  # a new study from the seed: the same draw


def test_best_and_default_test_their_trials_models_which_training_again_reproduces(flowers_tiny, tmp_path,
                                                                                      monkeypatch):
    """best/ and default/ take the weights their trials trained instead of training them again, and those are
    what training the config again gives: the same history, weights and test predictions."""
    import numpy as np

    from mobiletune import runfolder
    from mobiletune.model import network as model_lib
    from mobiletune.training import run as recipe

    config = load_config(overrides=[*TINY, "data.image_size=64"])
    trainings = []
    real_fit = recipe._fit_interruptibly
    monkeypatch.setattr(recipe, "_fit_interruptibly",
                        lambda *a, **k: trainings.append(a[0].config) or real_fit(*a, **k))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"phase1.lr": [0.001, 0.01], "model.dropout": [0.2, 0.5]}))
    out = tmp_path / "sweep"
    results = run_sweep(config, flowers_tiny, out, n_trials=2, space_path=space)
    folders = [out / "best", *([out / "default"] if (out / "default").exists() else [])]
    assert not trainings  # tested, not trained again, and said so
    assert results["best"]["weights_from_trial"] == results["best_trial"]
    assert f"sweep trial {results['best_trial']}" in (out / "best" / "summary.md").read_text()

    monkeypatch.setattr(recipe, "_fit_interruptibly", real_fit)
    for folder in folders:
        again = recipe.train_and_evaluate(load_config(folder / "config.yaml"), flowers_tiny, tmp_path / folder.name)
        for name in ("history.csv", "test_predictions.csv", "split.csv"):
            ours, theirs = (runfolder.read_csv(f / name) for f in (folder, again.workdir))
            assert [{k: v for k, v in r.items() if k != "seconds"} for r in ours] == [
                {k: v for k, v in r.items() if k != "seconds"} for r in theirs], (folder.name, name)
        for name in ("model.keras", "before_fine_tuning.keras"):
            ours, theirs = (model_lib.load_model(f / name).get_weights() for f in (folder, again.workdir))
            assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True)), (folder.name, name)
        assert {p.name for p in (folder / "logs").iterdir()} >= {"train", "validation", "test"}


def test_a_searched_key_set_by_the_user_is_said_to_be_the_first_trials_only(tmp_path):
    import re

    import optuna

    from mobiletune.tuning import search

    said: list[str] = []
    space = load_space(_space_file(tmp_path))
    base = load_config(overrides=["phase1.lr=0.002", "model.dropout=0.3"])  # dropout: not searched here
    search.begin(optuna.create_study(), True, base, space, 3, said.append)
    assert said[0].startswith("note: the space searches phase1.lr: phase1.lr=0.002 (from --set or --config) is only "
                              "the first trial's")
    assert re.fullmatch(r"study '.*': 0 trial\(s\) finished so far; running until 3 have finished", said[1])
    said.clear()
    search.begin(optuna.create_study(), True, load_config(), space, 3, said.append)
    assert len(said) == 1 and not said[0].startswith("note")
