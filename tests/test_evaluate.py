"""The statistics against small cases computed by hand."""

import json
import shutil

import numpy as np
import pytest

from mobiletune.errors import UsageError
from mobiletune.evaluation import run as evaluation_run
from mobiletune.evaluation import statistics as evaluate


def test_wilson_interval_by_hand():
    # 9 of 10: p=0.9, z=1.95996; centre (p + z^2/2n)/(1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2)/(1 + z^2/n)
    z, n, p = 1.959964, 10, 0.9
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low, high = evaluate.wilson_interval(9, 10)
    assert low == pytest.approx(centre - half, abs=1e-6) and high == pytest.approx(centre + half, abs=1e-6)
    assert evaluate.wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_mcnemar_exact_by_hand():
    labels = np.zeros(12, int)
    before = np.array([0] * 4 + [1] * 8)  # right on the first 4
    after = np.array([0] * 10 + [1] * 2)  # right on the first 10: 6 right only after, 0 only before
    result = evaluate.mcnemar(labels, before, after)
    assert (result["only_before_right"], result["only_after_right"]) == (0, 6)
    assert result["p_value"] == pytest.approx(2 * 0.5**6)  # two-sided binomial, all 6 discordant one way
    assert evaluate.mcnemar(labels, before, before)["p_value"] == 1.0


def test_detailed_metrics_by_hand():
    classes = ["a", "b"]
    labels = np.array([0, 0, 0, 1, 1])
    p1 = np.array([0.2, 0.4, 0.7, 0.9, 0.3])  # P(class b); predictions a, a, b, b, a
    probs = np.stack([1 - p1, p1], axis=1)
    d = evaluate.detailed(probs, labels, classes)
    assert d["accuracy"] == pytest.approx(3 / 5) and d["correct"] == 3 and d["n"] == 5
    assert d["confusion_matrix"] == [[2, 1], [1, 1]]
    assert d["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert d["per_class"]["a"]["precision"] == pytest.approx(2 / 3) and d["per_class"]["b"]["recall"] == 0.5
    # AUC: pairs (neg, pos) with pos scored higher: 0.9 beats all 3, 0.3 beats 0.2 only -> 4/6
    assert d["roc"]["auc"] == pytest.approx(4 / 6)
    expected_loss = -np.mean(np.log([0.8, 0.6, 0.3, 0.9, 0.3]))
    assert d["loss"] == pytest.approx(expected_loss)


def test_calibration_ece_by_hand():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55], [0.55, 0.45]])
    cal = evaluate.calibration(probs, labels, bins=10)
    # bin 0.9-1.0: 2 images, confidence .95, accuracy 1 -> gap .05; bin 0.5-0.6: 2 images, conf .55, acc .5 -> .05
    assert cal["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.05)
    assert [b["count"] for b in cal["curve"]] == [2, 2]


def test_multiclass_auc_needs_every_class():
    probs = np.full((4, 3), 1 / 3)
    assert evaluate.roc(probs, np.array([0, 1, 0, 1]))["auc"] is None


def test_run_metrics_hold_the_statistics(tiny_run):
    metrics = json.loads((tiny_run.workdir / "metrics.json").read_text())
    after = metrics["after_fine_tuning"]["test"]
    assert after["accuracy_ci95"][0] <= after["accuracy"] <= after["accuracy_ci95"][1]
    assert set(after) >= {"balanced_accuracy", "per_class", "confusion_matrix", "roc", "calibration"}
    assert sum(map(sum, after["confusion_matrix"])) == after["n"] == 2
    assert 0 <= metrics["mcnemar"]["p_value"] <= 1
    assert len(metrics["environment"]["base_weights_sha256"]) == 64


def test_evaluate_run_again_and_on_new_data(tiny_run, tmp_path):
    from conftest import CATS_DOGS, copy_images

    run = tmp_path / "run"
    shutil.copytree(tiny_run.workdir, run)
    again = evaluation_run.evaluate_run(run)
    original = json.loads((tiny_run.workdir / "metrics.json").read_text())
    assert again["after_fine_tuning"]["test"]["accuracy"] == original["after_fine_tuning"]["test"]["accuracy"]
    assert again["after_fine_tuning"]["test"]["loss"] == pytest.approx(original["after_fine_tuning"]["test"]["loss"],
                                                                       rel=1e-5)
    new = tmp_path / "new"
    copy_images(CATS_DOGS / "validation", new, 4, offset=200)
    own = {name: (run / name).read_bytes() for name in ("metrics.json", "test_predictions.csv", "report.html")}
    block = evaluation_run.evaluate_run(run, new)
    assert block["after_fine_tuning"]["test"]["n"] == 8
    # the run's own files are untouched (its report and exports read its own test split); the new images'
    # results are in a folder of their own
    assert all((run / name).read_bytes() == content for name, content in own.items())
    saved = json.loads((run / "evaluations" / "new" / "evaluation.json").read_text())
    assert saved["n_images"] == {"test": 8} and saved["data_dir"] == str(new.resolve())
    assert saved["after_fine_tuning"] == block["after_fine_tuning"]
    assert len((run / "evaluations" / "new" / "test_predictions.csv").read_text().splitlines()) == 1 + 8
    assert evaluation_run.evaluate_run(run)["after_fine_tuning"]["test"]["n"] == original["after_fine_tuning"][
        "test"]["n"]  # the run's own test split, still
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        evaluation_run.evaluate_run(run, new, mine)
    assert (mine / "notes.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="the run folder itself"):
        evaluation_run.evaluate_run(run, new, run, overwrite=True)
    with pytest.raises(UsageError, match="only with --data"):
        evaluation_run.evaluate_run(run, None, mine)
    # another folder of the same name (setA/new, setB/new) does not replace the first one's evaluation unasked
    other = tmp_path / "elsewhere" / "new"
    copy_images(CATS_DOGS / "validation", other, 2, offset=300)
    with pytest.raises(UsageError, match="holds the evaluation of other images"):
        evaluation_run.evaluate_run(run, other)
    assert json.loads((run / "evaluations" / "new" / "evaluation.json").read_text()) == saved
    assert evaluation_run.evaluate_run(run, new)["after_fine_tuning"]["test"]["n"] == 8  # the same images: replaced
    with pytest.raises(UsageError, match="not a finished mobiletune run"):
        evaluation_run.evaluate_run(tmp_path / "new")
