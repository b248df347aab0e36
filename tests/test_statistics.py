"""The test-set statistics against answers worked out by hand or from their textbook formulas, not from the
libraries evaluation/statistics.py calls (pure: no model, no TensorFlow)."""

import math
import warnings
from itertools import product

import numpy as np
import pytest

from mobiletune.evaluation import statistics as evaluate


def _binary(p1):
    p1 = np.asarray(p1, float)
    return np.stack([1 - p1, p1], axis=1)


def _pair_auc(positive_scores, negative_scores):
    """ROC-AUC as the Mann-Whitney statistic: the share of (positive, negative) pairs ranked right, ties half."""
    pairs = list(product(positive_scores, negative_scores))
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def _area(curve):
    return float(np.trapezoid(curve["tpr"], curve["fpr"]) if hasattr(np, "trapezoid")
                 else np.trapz(curve["tpr"], curve["fpr"]))


def _wilson(k, n, z):
    """The Wilson score interval from its formula."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


# ---------------------------------------------------------------------------------------------
# probabilities


def test_one_binary_logit_becomes_the_pair_1_minus_p_and_p():
    logits = np.array([[0.0], [math.log(3)], [-math.log(3)]], np.float32)
    probs = evaluate.probabilities(logits)
    assert probs.shape == (3, 2) and probs.dtype == np.float64
    assert probs == pytest.approx(np.array([[0.5, 0.5], [0.25, 0.75], [0.75, 0.25]]), abs=1e-7)


def test_binary_probabilities_are_computed_in_float64():
    # in float32, sigmoid(20) rounds to 1 and the other class's probability to 0
    probs = evaluate.probabilities(np.array([[20.0], [-20.0]], np.float32))
    assert probs[0, 0] == pytest.approx(1 / (1 + math.exp(20)), rel=1e-6)
    assert probs[1, 1] == pytest.approx(1 / (1 + math.exp(20)), rel=1e-6)


def test_softmax_is_taken_per_row_in_float64():
    logits = np.array([[0.0, math.log(2), math.log(5)], [math.log(3), 0.0, 0.0]], np.float32)
    probs = evaluate.probabilities(logits)
    assert probs.dtype == np.float64
    assert probs == pytest.approx(np.array([[1 / 8, 2 / 8, 5 / 8], [3 / 5, 1 / 5, 1 / 5]]), abs=1e-7)
    # large logits: stable, and the small share survives in float64
    big = evaluate.probabilities(np.array([[100.0, 80.0]], np.float32))
    assert big[0, 1] == pytest.approx(math.exp(-20) / (1 + math.exp(-20)), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# loss and accuracy


def test_loss_is_the_mean_negative_log_probability_of_the_true_class():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]])
    labels = np.array([0, 1, 1, 0])  # class 2 never the answer: it still has its column
    result = evaluate.loss_and_accuracy(probs, labels)
    assert set(result) == {"loss", "accuracy"}
    assert result["loss"] == pytest.approx(-np.mean(np.log([0.7, 0.6, 0.4, 0.2])))
    assert result["accuracy"] == pytest.approx(2 / 4)  # rows 0 and 1 right
    assert isinstance(result["loss"], float) and isinstance(result["accuracy"], float)


def test_perfect_predictions_have_accuracy_1_and_loss_0():
    probs = np.eye(3)[[2, 0, 1]]
    result = evaluate.loss_and_accuracy(probs, np.array([2, 0, 1]))
    assert result["accuracy"] == 1.0 and result["loss"] == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Wilson interval


@pytest.mark.parametrize(("k", "n"), [(9, 10), (50, 100), (1, 3), (17, 200), (199, 200)])
def test_wilson_interval_from_its_formula(k, n):
    low, high = evaluate.wilson_interval(k, n)
    assert (low, high) == pytest.approx(_wilson(k, n, 1.959963984540054), abs=1e-9)
    low, high = evaluate.wilson_interval(k, n, confidence=0.90)
    assert (low, high) == pytest.approx(_wilson(k, n, 1.6448536269514722), abs=1e-9)


def test_wilson_interval_at_the_ends_stays_in_0_1():
    z = 1.959963984540054
    low, high = evaluate.wilson_interval(0, 20)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(z * z / (20 + z * z))
    low, high = evaluate.wilson_interval(20, 20)
    assert low == pytest.approx(20 / (20 + z * z)) and high == pytest.approx(1.0)
    assert isinstance(low, float) and isinstance(high, float)


# ---------------------------------------------------------------------------------------------
# calibration


def _rows(confidences, n_classes=8):
    """Probability rows whose top class is 0 with the given confidence, the rest spread evenly."""
    rows = []
    for c in confidences:
        rest = (1 - c) / (n_classes - 1)
        rows.append([c] + [rest] * (n_classes - 1))
    return np.array(rows)


def test_calibration_bins_are_equal_width_and_closed_on_the_left():
    # 4 bins: [0, .25) [.25, .5) [.5, .75) [.75, 1]; an edge belongs to the bin it opens, 1.0 to the last
    confidences = [0.2, 0.25, 0.4, 0.5, 0.74, 0.75, 1.0]
    labels = np.array([0, 1, 0, 0, 1, 1, 0])  # top class 0: right where the label is 0
    cal = evaluate.calibration(_rows(confidences), labels, bins=4)
    assert cal["bins"] == 4
    assert cal["curve"] == [
        {"confidence": pytest.approx(0.2), "accuracy": 1.0, "count": 1},
        {"confidence": pytest.approx(0.325), "accuracy": 0.5, "count": 2},
        {"confidence": pytest.approx(0.62), "accuracy": 0.5, "count": 2},
        {"confidence": pytest.approx(0.875), "accuracy": 0.5, "count": 2},
    ]
    ece = (1 * abs(1.0 - 0.2) + 2 * abs(0.5 - 0.325) + 2 * abs(0.5 - 0.62) + 2 * abs(0.5 - 0.875)) / 7
    assert cal["ece"] == pytest.approx(ece)
    assert isinstance(cal["ece"], float)


def test_calibration_skips_empty_bins_and_defaults_to_10():
    cal = evaluate.calibration(_rows([0.25, 0.35, 0.95, 0.96]), np.array([0, 1, 0, 0]))
    assert cal["bins"] == 10
    assert [b["count"] for b in cal["curve"]] == [1, 1, 2]
    assert [b["accuracy"] for b in cal["curve"]] == [1.0, 0.0, 1.0]
    assert cal["curve"][2]["confidence"] == pytest.approx(0.955)
    assert cal["ece"] == pytest.approx((0.75 + 0.35 + 2 * 0.045) / 4)


def test_a_perfectly_calibrated_set_has_zero_ece():
    # confidence 0.75 in every row and 3 in 4 right
    cal = evaluate.calibration(_binary([0.75, 0.75, 0.75, 0.75]), np.array([1, 1, 1, 0]))
    assert cal["ece"] == pytest.approx(0.0) and cal["curve"] == [
        {"confidence": pytest.approx(0.75), "accuracy": 0.75, "count": 4}]


# ---------------------------------------------------------------------------------------------
# ROC


def test_binary_roc_auc_is_the_share_of_pairs_ranked_right():
    p1 = [0.1, 0.4, 0.35, 0.8, 0.2, 0.7, 0.4]
    labels = np.array([0, 0, 1, 1, 0, 1, 1])
    result = evaluate.roc(_binary(p1), labels)
    positives = [p for p, y in zip(p1, labels, strict=True) if y == 1]
    negatives = [p for p, y in zip(p1, labels, strict=True) if y == 0]
    auc = _pair_auc(positives, negatives)
    assert auc == pytest.approx((2 + 3 + 3 + 2.5) / 12)  # 0.35 beats 0.1 and 0.2; 0.4 beats those, ties 0.4
    assert set(result) == {"auc", "curves"} and result["auc"] == pytest.approx(auc)
    curve = result["curves"]["1"]
    assert list(result["curves"]) == ["1"] and curve["fpr"][0] == 0 and curve["tpr"][0] == 0
    assert curve["fpr"][-1] == 1 and curve["tpr"][-1] == 1 and _area(curve) == pytest.approx(auc)
    assert curve["fpr"] == sorted(curve["fpr"]) and curve["tpr"] == sorted(curve["tpr"])
    assert isinstance(result["auc"], float) and isinstance(curve["fpr"], list)


def test_multiclass_roc_auc_is_the_macro_mean_of_one_vs_rest():
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.5, 0.1, 0.4], [0.1, 0.2, 0.7],
                      [0.3, 0.4, 0.3], [0.4, 0.35, 0.25]])
    labels = np.array([0, 1, 2, 2, 2, 0, 1])
    result = evaluate.roc(probs, labels)
    per_class = [_pair_auc(probs[labels == c, c], probs[labels != c, c]) for c in range(3)]
    assert result["auc"] == pytest.approx(np.mean(per_class))
    assert set(result) == {"auc", "curves"} and list(result["curves"]) == ["0", "1", "2"]
    for c in range(3):
        assert _area(result["curves"][str(c)]) == pytest.approx(per_class[c])


def test_roc_with_a_class_missing_gives_the_curves_present_and_no_auc():
    probs = np.array([[0.6, 0.2, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.3, 0.2, 0.4, 0.1], [0.5, 0.1, 0.3, 0.1],
                      [0.1, 0.2, 0.6, 0.1]])
    labels = np.array([0, 1, 2, 0, 2])  # class 3 absent
    result = evaluate.roc(probs, labels)
    assert result["auc"] is None and result["note"] == "a class is missing from this set: macro ROC-AUC undefined"
    assert list(result["curves"]) == ["0", "1", "2"]
    for c in range(3):
        assert _area(result["curves"][str(c)]) == pytest.approx(_pair_auc(probs[labels == c, c],
                                                                          probs[labels != c, c]))
    two_of_three = evaluate.roc(probs[:4, :3] / probs[:4, :3].sum(1, keepdims=True), np.array([0, 1, 1, 0]))
    assert two_of_three["auc"] is None and list(two_of_three["curves"]) == ["0", "1"]


def test_roc_of_one_class_is_undefined():
    for probs in (_binary([0.2, 0.9]), np.full((2, 3), 1 / 3)):
        assert evaluate.roc(probs, np.array([1, 1])) == {
            "auc": None, "curves": {}, "note": "only one class in this set: ROC-AUC undefined"}


# ---------------------------------------------------------------------------------------------
# detailed


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_detailed_by_hand_with_a_class_never_predicted_and_one_never_present():
    classes = ["ant", "bee", "cow", "dog"]
    probs = np.array([
        [0.7, 0.1, 0.1, 0.1],  # true ant, predicted ant
        [0.6, 0.2, 0.1, 0.1],  # true ant, predicted ant
        [0.1, 0.6, 0.2, 0.1],  # true ant, predicted bee
        [0.2, 0.5, 0.2, 0.1],  # true bee, predicted bee
        [0.5, 0.3, 0.1, 0.1],  # true bee, predicted ant
        [0.1, 0.2, 0.3, 0.4],  # true cow, predicted dog
    ])
    labels = np.array([0, 0, 0, 1, 1, 2])  # dog never present; cow never predicted
    d = evaluate.detailed(probs, labels, classes)
    assert set(d) == {"loss", "accuracy", "accuracy_ci95", "n", "correct", "balanced_accuracy", "per_class",
                      "confusion_matrix", "roc", "calibration"}
    assert d["n"] == 6 and d["correct"] == 3 and d["accuracy"] == pytest.approx(0.5)
    assert d["loss"] == pytest.approx(-np.mean(np.log([0.7, 0.6, 0.1, 0.5, 0.3, 0.3])))
    assert d["accuracy_ci95"] == pytest.approx(list(_wilson(3, 6, 1.959963984540054)))
    assert d["confusion_matrix"] == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    # balanced accuracy: mean recall over the classes present (ant 2/3, bee 1/2, cow 0)
    assert d["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert d["per_class"] == {
        "ant": {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3), "f1": pytest.approx(2 / 3),
                "support": 3},
        "bee": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
        "cow": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},  # never predicted: 0, not a warning
        "dog": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0},
    }
    assert all(type(v) is float for c in d["per_class"].values() for k, v in c.items() if k != "support")
    assert d["roc"]["auc"] is None and list(d["roc"]["curves"]) == ["0", "1", "2"]
    assert d["calibration"] == evaluate.calibration(probs, labels)
    assert isinstance(d["balanced_accuracy"], float)


def test_detailed_lists_a_class_neither_present_nor_predicted_and_warns_of_nothing():
    from sklearn.exceptions import UndefinedMetricWarning

    classes = ["a", "b", "c"]
    probs = _binary([0.2, 0.3, 0.4, 0.1])  # every image predicted a
    probs = np.hstack([probs, np.zeros((4, 1))])  # c: no image, no prediction
    labels = np.array([0, 0, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UndefinedMetricWarning)  # b is never predicted: precision 0, no warning
        d = evaluate.detailed(probs, labels, classes)
    assert d["confusion_matrix"] == [[2, 0, 0], [2, 0, 0], [0, 0, 0]]
    assert d["per_class"]["a"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 2}
    assert d["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert d["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


# ---------------------------------------------------------------------------------------------
# McNemar and the before/after block


def test_mcnemar_counts_only_the_discordant_images():
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    before = np.array([0, 1, 1, 0, 1, 0, 1, 0, 0, 0])  # right: 0, 1, 8
    after = np.array([0, 0, 0, 1, 0, 1, 0, 1, 1, 0])  # right: 0, 2, 3, 4, 5, 6, 7
    # only before: 1, 8; only after: 2..7 (6); both right: 0; both wrong: 9
    result = evaluate.mcnemar(labels, before, after)
    p = sum(math.comb(8, i) for i in (0, 1, 2, 6, 7, 8)) / 2**8  # two-sided: as or more extreme than 2 of 8
    assert result == {"only_before_right": 2, "only_after_right": 6, "p_value": pytest.approx(p),
                      "test": "McNemar exact"}
    swapped = evaluate.mcnemar(labels, after, before)
    assert (swapped["only_before_right"], swapped["only_after_right"]) == (6, 2)
    assert swapped["p_value"] == pytest.approx(p)


def test_mcnemar_with_one_or_no_discordant_image():
    labels = np.array([0, 1, 1])
    one = evaluate.mcnemar(labels, np.array([0, 1, 0]), np.array([0, 1, 1]))
    assert (one["only_before_right"], one["only_after_right"], one["p_value"]) == (0, 1, 1.0)
    same = evaluate.mcnemar(labels, np.array([1, 1, 0]), np.array([1, 1, 0]))
    assert (same["only_before_right"], same["only_after_right"], same["p_value"]) == (0, 0, 1.0)
    assert isinstance(same["p_value"], float)


def test_mcnemar_p_value_with_all_discordant_one_way():
    labels = np.zeros(7, int)
    result = evaluate.mcnemar(labels, np.ones(7, int), np.zeros(7, int))
    assert (result["only_before_right"], result["only_after_right"]) == (0, 7)
    assert result["p_value"] == pytest.approx(2 / 2**7)


def test_compare_stages_is_both_stages_detailed_and_mcnemar_on_their_top_classes():
    classes = ["a", "b"]
    labels = np.array([0, 0, 1, 1, 1])
    before = _binary([0.6, 0.2, 0.4, 0.3, 0.9])  # predicts b, a, a, a, b: right 1, 4
    after = _binary([0.3, 0.1, 0.8, 0.7, 0.45])  # predicts a, a, b, b, a: right 0, 1, 2, 3
    block = evaluate.compare_stages(before, after, labels, classes)
    assert set(block) == {"before_fine_tuning", "after_fine_tuning", "mcnemar"}
    assert block["before_fine_tuning"] == {"test": evaluate.detailed(before, labels, classes)}
    assert block["after_fine_tuning"] == {"test": evaluate.detailed(after, labels, classes)}
    assert block["before_fine_tuning"]["test"]["correct"] == 2 and block["after_fine_tuning"]["test"]["correct"] == 4
    assert block["mcnemar"] == {"only_before_right": 1, "only_after_right": 3, "p_value": pytest.approx(10 / 16),
                                "test": "McNemar exact"}  # 1 of 4 discordant: p = 2 x (1 + 4) / 16
