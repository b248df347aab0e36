"""Test-set evaluation: predictions once, then the scores computed from them."""

from __future__ import annotations

import numpy as np


def predict_logits(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Logits and true labels for every batch of a (pixels, label) dataset, in order."""
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


def loss_and_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Cross-entropy (the training loss) and accuracy of logits against integer labels."""
    from sklearn.metrics import accuracy_score, log_loss

    probs = probabilities(logits)
    n_classes = probs.shape[1]
    return {
        "loss": float(log_loss(labels, probs, labels=list(range(n_classes)))),
        "accuracy": float(accuracy_score(labels, probs.argmax(axis=1))),
    }


def evaluate(model, dataset) -> dict[str, float]:
    logits, labels = predict_logits(model, dataset)
    return loss_and_accuracy(logits, labels)
