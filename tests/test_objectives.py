"""Accuracy against latency: parsing the options, the choice within a budget, the same-size pruning rule,
and a real multi-objective sweep end to end (tiny sizes, real TFLite latency)."""

import json

import optuna
import pytest
from typer.testing import CliRunner

from conftest import TINY, choice_in_trials_csv
from mobiletune import runfolder
from mobiletune.cli import app
from mobiletune.config import load_config
from mobiletune.errors import UsageError
from mobiletune.ship import latency
from mobiletune.tuning import objectives


def _study(points, multi=True):
    """A real Optuna study holding finished trials: (val_accuracy, ms, size[, curve])."""
    study = optuna.create_study(directions=["maximize", "minimize"] if multi else ["maximize"])
    for acc, ms, size, *curve in points:
        study.add_trial(optuna.trial.create_trial(
            params={"data.image_size": size}, distributions={"data.image_size": optuna.distributions.
                                                             CategoricalDistribution([96, 128, 160, 192, 224])},
            values=[acc, ms] if multi else [acc],
            user_attrs={"latency_ms_tflite": ms, "latency_ms_tflite_int8": ms / 2,
                        **({"val_curve": curve[0]} if curve else {})}))
    return study


@pytest.mark.parametrize(("args", "message"), [
    (("accuracy,speed",), "--objectives accuracy,speed: give accuracy or accuracy,latency"),
    (("latency",), "give accuracy or accuracy,latency"),
    (("accuracy", "onnx"), "--format onnx: latency is measured for tflite or tflite-int8"),
    (("accuracy", "tflite", 0.0), "--max-latency-ms 0: give a positive number"),
])
def test_bad_options_are_usage_errors(args, message):
    with pytest.raises(UsageError, match=message):
        objectives.parse(*args)


def test_parse():
    wanted = objectives.parse("latency, accuracy", "tflite-int8", 3.0)
    assert wanted.names == ("accuracy", "latency") and wanted.multi and wanted.directions == ["maximize", "minimize"]
    only = objectives.parse()
    assert not only.multi and not only.measures_latency
    assert objectives.parse("accuracy", max_latency_ms=2).measures_latency  # a budget needs the measurement


def test_choose_within_a_budget_and_the_front():
    study = _study([(0.90, 1.0, 96), (0.95, 2.0, 160), (0.97, 3.0, 224), (0.93, 2.5, 192), (0.97, 2.9, 224)])
    assert [t.number for t in objectives.front(study, objectives.parse("accuracy,latency"))] == [0, 1, 4]
    assert objectives.choose(study, objectives.parse("accuracy,latency")).number == 4  # tie on accuracy: faster
    assert objectives.choose(study, objectives.parse("accuracy,latency", max_latency_ms=2.6)).number == 1
    assert objectives.choose(study, objectives.parse("accuracy", "tflite-int8", 1.0)).number == 1  # int8 is ms/2
    with pytest.raises(UsageError, match=r"--max-latency-ms 0.5: no finished trial is within it \(tflite\); the "
                                         r"fastest finished trial \(0\) takes 1.00 ms"):
        objectives.choose(study, objectives.parse("accuracy,latency", max_latency_ms=0.5))


def test_same_size_median_pruning():
    curves = [[0.5, 0.6, 0.7, 0.8], [0.5, 0.6, 0.8, 0.9], [0.5, 0.6, 0.9, 0.9]]
    study = _study([(c[-1], 2.0, 160, c) for c in curves] + [(0.99, 1.0, 96, [0.1, 0.1, 0.1, 0.99])] * 3)
    trial = study.ask()
    # at epoch index 2 the same-size median is 0.8; other sizes do not count
    assert objectives.below_same_size_median(study, trial, 2, 0.75, 160)
    assert not objectives.below_same_size_median(study, trial, 2, 0.85, 160)
    assert not objectives.below_same_size_median(study, trial, 1, 0.0, 160)  # warm-up: never before step 2
    assert not objectives.below_same_size_median(study, trial, 2, 0.05, 128)  # no peers of that size yet
    trial.set_user_attr("val_curve", [0.5, 0.95])  # its best so far counts, as in Optuna's MedianPruner
    assert not objectives.below_same_size_median(study, trial, 2, 0.7, 160)


def test_the_hosts_named_are_the_studys_and_its_trials():
    study = _study([(0.9, 1.0, 160)])
    study.add_trial(optuna.trial.create_trial(values=[0.8, 2.0], user_attrs={"latency_host": "Old CPU, 4 CPUs, AVX2"}))
    assert objectives.hosts(study) == "Old CPU, 4 CPUs, AVX2"
    study.set_user_attr(objectives.study_key(load_config(), "tflite"), {"ms": 0.9, "host": "New CPU, 8 CPUs, AVX-512"})
    assert objectives.hosts(study) == "New CPU, 8 CPUs, AVX-512 and Old CPU, 4 CPUs, AVX2"  # mixed: both said


def test_multi_objective_sweep_end_to_end(flowers_tiny, tmp_path, monkeypatch):
    space = tmp_path / "space.yaml"
    space.write_text("data.image_size: [32, 48]\nphase1.lr: {type: float, low: 0.0001, high: 0.01, log: true}\n")
    out = tmp_path / "sweep"
    sets = [a for kv in TINY for a in ("--set", kv)]
    args = ["sweep", str(flowers_tiny), "--out", str(out), "--trials", "3", "--space", str(space), *sets,
            "--objectives", "accuracy,latency"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "sweep.json").read_text())
    assert results["objectives"] == ["accuracy", "latency"] and results["host"].count(",") == 2
    front = results["front"]
    assert front and all(p["latency_ms_tflite"] > 0 and p["latency_ms_tflite_int8"] > 0 for p in front)
    assert [p["latency_ms_tflite"] for p in front] == sorted(p["latency_ms_tflite"] for p in front)
    chosen = results["chosen"]
    assert chosen["val_accuracy"] == max(p["val_accuracy"] for p in front) == results["best_value"]
    assert (out / "pareto_front.png").stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert "## Accuracy against latency" in summary and results["host"] in summary and "pareto_front.png" in summary
    header = (out / "trials.csv").read_text().splitlines()[0]
    assert "latency_ms_tflite,latency_ms_tflite_int8" in header
    # a budget of the fastest size's latency: the most accurate trial within it
    budget = min(float(r["latency_ms_tflite"]) for r in runfolder.read_csv(out / "trials.csv"))
    result = CliRunner().invoke(app, [*args, "--max-latency-ms", repr(budget)])
    assert result.exit_code == 0, result.output
    within = json.loads((out / "sweep.json").read_text())
    assert within["best_trial"] == choice_in_trials_csv(out / "trials.csv", "latency_ms_tflite", budget)
    # the same study, asked again with a budget below every trial: one line, and the fix
    fastest = min(p["latency_ms_tflite"] for p in front)
    result = CliRunner().invoke(app, [*args, "--max-latency-ms", f"{fastest / 10:.4f}"])
    assert result.exit_code == 2
    assert "no finished trial is within it (tflite)" in result.output and "raise the budget" in result.output
    # a worker on another machine continues the study with its figures: nothing timed there, one host named
    monkeypatch.setattr(latency, "host", lambda: "Other CPU, 64 CPUs, AVX2")
    monkeypatch.setattr(latency, "measure", lambda *a, **k: pytest.fail("the study's figures were measured again"))
    more = [*args[:5], "4", *args[6:]]
    result = CliRunner().invoke(app, more)
    assert result.exit_code == 0, result.output
    assert f"latency figures from the study, measured on {results['host']}" in result.output
    again = json.loads((out / "sweep.json").read_text())
    assert again["host"] == results["host"] and results["host"] in (out / "summary.md").read_text()
    study = optuna.load_study(study_name="mobiletune", storage=f"sqlite:///{out / 'study.db'}")
    newest = study.trials[-1]
    assert newest.number == 3 and newest.user_attrs["latency_host"] == results["host"]
    size = newest.params["data.image_size"]
    assert newest.user_attrs["latency_ms_tflite"] == study.user_attrs[f"latency:{size}px:alpha 1:tflite"]["ms"]
    assert again["best"] == json.loads((out / "best" / "metrics.json").read_text())  # best/ is the chosen config's
    assert again["best_trial"] == choice_in_trials_csv(out / "trials.csv", "latency_ms_tflite")
    trained = load_config(out / "best" / "config.yaml").flat()
    assert all(trained[k] == v for k, v in again["best_params"].items())
    monkeypatch.undo()
    # and a study made with one objective cannot be continued with two
    single = tmp_path / "single"
    assert CliRunner().invoke(app, [*args[:3], str(single), *args[4:-2]]).exit_code == 0
    result = CliRunner().invoke(app, [*args[:3], str(single), *args[4:]])
    assert result.exit_code == 2 and "made with 1 objective(s), not 2" in result.output
