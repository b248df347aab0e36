"""Test-set evaluation: predictions once, then honest statistics computed from them.

Accuracy on a couple of hundred images carries a wide interval, and accuracy alone hides which
class suffers, so besides loss and accuracy this reports a Wilson 95% interval, balanced
accuracy, per-class precision/recall/F1, the confusion matrix, ROC-AUC, calibration (reliability
curve and expected calibration error) and McNemar's paired test between two models on the same
images. The statistics are scikit-learn's and SciPy's.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def predict_logits(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Logits and true labels for every (pixels, label) batch of `dataset` (any iterable), in order."""
    logits, labels = [], []
    for x, y in dataset:
        logits.append(np.asarray(model.predict_on_batch(x)))  # compiled once, no augmentation
        labels.append(np.asarray(y))
    return np.concatenate(logits), np.concatenate(labels)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Class probabilities [n, classes]; one binary logit becomes [1 - p, p]."""
    import scipy.special

    if logits.shape[-1] == 1:
        p = scipy.special.expit(logits[:, 0].astype(np.float64))
        return np.stack([1 - p, p], axis=1)
    return scipy.special.softmax(logits.astype(np.float64), axis=1)


def loss_and_accuracy(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Cross-entropy (the training loss) and accuracy of class probabilities against integer labels."""
    from sklearn.metrics import accuracy_score, log_loss

    return {
        "loss": float(log_loss(labels, probs, labels=list(range(probs.shape[1])))),
        "accuracy": float(accuracy_score(labels, probs.argmax(axis=1))),
    }


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion: honest at small n and near 0 or 1."""
    from scipy.stats import binomtest

    ci = binomtest(correct, total).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Reliability curve of the top-class confidence and its expected calibration error (ECE).

    ECE = sum over equal-width confidence bins of (bin share) x |accuracy - mean confidence|.
    """
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    curve, ece = [], 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            acc, conf = float(correct[members].mean()), float(confidence[members].mean())
            curve.append({"confidence": conf, "accuracy": acc, "count": int(members.sum())})
            ece += members.mean() * abs(acc - conf)
    return {"ece": float(ece), "curve": curve, "bins": bins}


def roc(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """ROC-AUC (binary; one-vs-rest macro for more classes) and the curve points per class."""
    from sklearn.metrics import roc_auc_score, roc_curve

    n_classes = probs.shape[1]
    present = np.unique(labels)
    if len(present) < 2:
        return {"auc": None, "curves": {}, "note": "only one class in this set: ROC-AUC undefined"}
    if n_classes == 2:
        auc = roc_auc_score(labels, probs[:, 1])
        fpr, tpr, _ = roc_curve(labels, probs[:, 1])
        return {"auc": float(auc), "curves": {"1": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}}
    curves = {}
    for c in present:
        fpr, tpr, _ = roc_curve(labels == c, probs[:, c])
        curves[str(int(c))] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    if len(present) < n_classes:
        return {"auc": None, "curves": curves, "note": "a class is missing from this set: macro ROC-AUC undefined"}
    return {"auc": float(roc_auc_score(labels, probs, multi_class="ovr", average="macro")), "curves": curves}


def detailed(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Every statistic of one model on one labelled set, JSON-ready."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

    predicted = probs.argmax(axis=1)
    correct = int((predicted == labels).sum())
    everyone = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=everyone,
                                                                     zero_division=0)
    low, high = wilson_interval(correct, len(labels))
    return {
        **loss_and_accuracy(probs, labels),
        "accuracy_ci95": [low, high],
        "n": len(labels),
        "correct": correct,
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "per_class": {
            c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": confusion_matrix(labels, predicted, labels=everyone).tolist(),
        "roc": roc(probs, labels),
        "calibration": calibration(probs, labels),
    }


def mcnemar(labels: np.ndarray, predicted_before: np.ndarray, predicted_after: np.ndarray) -> dict[str, Any]:
    """McNemar's exact paired test: do the two models differ in accuracy on the same images?

    Only discordant images count: right before fine-tuning alone, or right after alone. Exact:
    a two-sided binomial test of one count against their sum at 0.5.
    """
    from scipy.stats import binomtest

    right_a, right_b = predicted_before == labels, predicted_after == labels
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_b, only_a + only_b, 0.5).pvalue)
    return {"only_before_right": only_a, "only_after_right": only_b, "p_value": p, "test": "McNemar exact"}


def compare_stages(before: np.ndarray, after: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """The before/after block of metrics.json from the two models' test probabilities."""
    return {
        "before_fine_tuning": {"test": detailed(before, labels, classes)},
        "after_fine_tuning": {"test": detailed(after, labels, classes)},
        "mcnemar": mcnemar(labels, before.argmax(axis=1), after.argmax(axis=1)),
    }


def write_predictions(path, paths: list[str], labels: np.ndarray, classes: list[str], before: np.ndarray,
                      after: np.ndarray, unknown_scores: np.ndarray | None = None) -> None:
    """test_predictions.csv: each test image, its class, both models' probabilities and, given, the
    final model's unknown-input score."""
    from mobiletune.runfolder import write_csv

    header = ["path", "true", "predicted_before", "predicted_after",
              *[f"p_before_{c}" for c in classes], *[f"p_after_{c}" for c in classes]]
    def digits(probs: np.ndarray) -> list[float]:  # 9 significant: a --from run reads them back as its "before"
        return [float(f"{p:.9g}") for p in probs]

    rows = [[p, classes[y], classes[b.argmax()], classes[a.argmax()], *digits(b), *digits(a)]
            for p, y, b, a in zip(paths, labels, before, after, strict=True)]
    if unknown_scores is not None:
        header.append("unknown_score")
        rows = [[*row, round(float(s), 6)] for row, s in zip(rows, unknown_scores, strict=True)]
    write_csv(path, header, rows)
