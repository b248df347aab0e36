"""Per-image scores of the audit: how likely each label is wrong, and how off-topic each image is in its class.

Both work on the unit-length pooled ImageNet features, and both had to hold on small folders
(20-200 images a class) that nobody tuned them on (benchmarks/data_checks.py, docs/audit.md).
"""

from __future__ import annotations

import numpy as np

from mobiletune.model import convention
from mobiletune.model.imagenet import imagenet_probabilities

# The probe's inverse regularisation strengths tried by cross-validation: a few hundred images want a stronger
# prior than thousands, so no single C served every size measured.
PROBE_CS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
# On flowers_mini, whose probe is right 85% of the time, confident learning alone flagged 4-5% of the clean
# images, each with its suggested class below 0.8; planted swaps of typical images mostly score 0.85-1.0.
SUGGESTED_CONFIDENCE = 0.8
MAX_FOLDS = 10  # out-of-fold probabilities: 10 folds leave 90% of a 20-image class to train each fold's probe
MIN_FOLDS = 5  # from MANY images in the smallest class: 80% of them trains each fold's probe well enough
MANY = 100
MAX_ITER = 300  # L-BFGS steps a fit: weakly regularised probes on small folders otherwise run to thousands for
# probabilities that no longer change where it matters (the ranking of the labels)
PROBE_DIMS = 256  # principal axes the probe reads (`_projected`)
SELECT_LIMIT = 1000  # C is chosen on at most this many images: 3,000 would cost ~10x the final fits
OFFTOPIC_K = 5  # the k-th nearest other image of the same class: a few off-topic images alike do not vouch for
# each other, while five neighbours still exist in a 20-image class folder
OFFTOPIC_MADS = 5.0  # an off-topic image lies this many robust deviations (MAD) above the median score: 4 flagged
# 2-3% of clean folders, 5 about 1% (benchmarks/data_checks.py)
CHUNK = 2048  # rows of the in-class similarity matrix at once: 2,048 x 50,000 float32 is 400 MB


def _probe_probabilities(unit: np.ndarray, labels: np.ndarray, c: float, folds: int) -> np.ndarray:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return cross_val_predict(LogisticRegression(max_iter=MAX_ITER, tol=1e-3, C=c), unit, labels,
                                 cv=StratifiedKFold(folds, shuffle=True, random_state=0), method="predict_proba")


def _projected(unit: np.ndarray) -> np.ndarray:
    """The rows on their first PROBE_DIMS principal axes: an L2-regularised probe's weights lie in the span of
    the rows anyway, so a folder of a few hundred images loses nothing, and each fit is several times faster."""
    from sklearn.decomposition import PCA

    dims = min(PROBE_DIMS, len(unit) - 1, unit.shape[1])
    return PCA(dims, svd_solver="randomized", random_state=0).fit_transform(unit) if dims > 1 else unit


def _folds(labels: np.ndarray) -> int:
    smallest = int(np.bincount(labels).min())
    return min(MAX_FOLDS, smallest) if smallest < MANY else MIN_FOLDS


def _selection(labels: np.ndarray) -> np.ndarray:
    """The images C is chosen on: about SELECT_LIMIT, drawn per class in proportion, but every image of a class
    smaller than MANY (a proportional share of a 4-image class could be none, and it needs two for its folds)."""
    rng, counts = np.random.default_rng(0), np.bincount(labels)
    share = min(1.0, SELECT_LIMIT / len(labels))
    return np.sort(np.concatenate([
        rng.choice(np.flatnonzero(labels == c), max(min(n, MANY), round(n * share)), replace=False)
        for c, n in enumerate(counts) if n]))


def _choose_c(unit: np.ndarray, labels: np.ndarray) -> float:
    """The C of PROBE_CS with the lowest out-of-fold log loss, on `_selection`'s images."""
    chosen = _selection(labels)
    unit, labels = unit[chosen], labels[chosen]
    rows, folds = np.arange(len(labels)), _folds(labels)
    best: tuple[float, float] | None = None
    for c in PROBE_CS:
        probs = _probe_probabilities(unit, labels, c, folds)
        loss = float(-np.log(np.clip(probs[rows, labels], 1e-12, 1.0)).mean())
        if best is not None and loss > best[0]:
            break  # the loss is convex enough in log C: past the minimum it only rises
        best = (loss, c)
    assert best is not None
    return best[1]


def out_of_fold_probabilities(pooled: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Each image's class probabilities from a logistic-regression probe that never saw it, and the probe's C
    (`_choose_c`): NaN rows for the images of a class with a single image (it cannot be held out of its own
    fold), which the probe leaves out. None when fewer than two classes have two images."""
    counts = np.bincount(labels)
    kept = np.flatnonzero(counts >= 2)
    if len(kept) < 2:
        return None
    rows = np.flatnonzero(counts[labels] >= 2)
    dense = np.searchsorted(kept, labels[rows])  # the kept classes numbered 0..len(kept)-1 for scikit-learn
    unit = _projected(convention.unit_rows(pooled[rows]))
    c = _choose_c(unit, dense)
    probs = np.full((len(labels), len(counts)), np.nan)
    probs[rows] = 0.0  # a class with a single image gets no probability from the probe
    probs[np.ix_(rows, kept)] = _probe_probabilities(unit, dense, c, _folds(dense))
    return probs, c


def label_issue_mask(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Which labels are likely wrong: cleanlab's confident learning on the out-of-fold probabilities, where the
    probe is also confident (SUGGESTED_CONFIDENCE) in another class."""
    from cleanlab.filter import find_label_issues

    rows = np.flatnonzero(np.isfinite(probs).all(axis=1))  # not the images of a one-image class
    kept = np.flatnonzero(np.bincount(labels[rows], minlength=probs.shape[1]))
    sub = probs[np.ix_(rows, kept)]
    wrong = np.zeros(len(labels), bool)
    wrong[rows] = (find_label_issues(np.searchsorted(kept, labels[rows]), sub, filter_by="prune_by_noise_rate")
                   & (sub.max(axis=1) >= SUGGESTED_CONFIDENCE) & (kept[sub.argmax(axis=1)] != labels[rows]))
    return wrong


def _kth_other_similarity(unit: np.ndarray, k: int) -> np.ndarray:
    """Cosine similarity of each row to its k-th most similar other row, chunked so memory stays bounded."""
    out = np.empty(len(unit), np.float32)
    for start in range(0, len(unit), CHUNK):
        sims = unit[start:start + CHUNK] @ unit.T
        rows = np.arange(len(sims))
        sims[rows, start + rows] = -np.inf  # not itself
        out[start:start + len(sims)] = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
    return out


def _robust_z(values: np.ndarray) -> np.ndarray:
    """How many robust deviations (MAD) each value lies above the median of all. Where over half the values are
    equal (classes of two images all score 1) the MAD is 0: the mean absolute deviation, scaled to match the
    MAD of a normal distribution, stands in; all equal, all 0."""
    median = float(np.nanmedian(values))
    spread = float(np.nanmedian(np.abs(values - median)))
    if spread < 1e-9:
        spread = 0.8 * float(np.nanmean(np.abs(values - median)))  # MAD / mean deviation of a normal: 0.80
    return (values - median) / spread if spread > 1e-9 else np.where(np.isnan(values), np.nan, 0.0)


def _relative_distance(unit: np.ndarray, members: np.ndarray) -> np.ndarray:
    """The cosine distance from each member to its k-th nearest other member, over the class's median of it."""
    distance = 1.0 - _kth_other_similarity(unit[members], min(OFFTOPIC_K, len(members) - 1)).astype(np.float64)
    return distance / max(float(np.median(distance)), 1e-12)


def _surprise(probs: np.ndarray) -> np.ndarray:
    """-log of how much of each member's ImageNet belief falls where the rest of its class's belief lies: the
    dot product of its 1,000 class probabilities with the mean of the other members'."""
    others = (probs @ probs.sum(axis=0) - (probs * probs).sum(axis=1)) / (len(probs) - 1)
    return -np.log(np.clip(others, 1e-30, None))


def offtopic_scores(pooled: np.ndarray, labels: np.ndarray, top: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> np.ndarray:
    """How unlike the rest of its class folder each image is, in robust deviations above the typical image.

    Two views, each in-class because a flower filed under cats is unlike its folder even when another folder
    is like it, and summed because each misses what the other sees (docs/audit.md):
    - the distance to the k-th nearest other image of the class, over the class's median distance (classes
      differ in spread: flowers of a kind vary more than cats);
    - with MobileNetV2's ImageNet `top` (`model.imagenet`): how little of the image's ImageNet belief falls
      where its class's lies (a "daisy" among "tabby cats").
    NaN for a class of a single image.
    """
    if np.bincount(labels).max(initial=0) < 2:
        return np.full(len(labels), np.nan)
    unit = convention.unit_rows(pooled).astype(np.float32)
    probs = None if top is None else imagenet_probabilities(pooled, top)
    distance, surprise = np.full(len(labels), np.nan), np.full(len(labels), np.nan)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) > 1:
            distance[members] = _relative_distance(unit, members)
            if probs is not None:
                surprise[members] = _surprise(probs[members])
    return _robust_z(_robust_z(distance) + (0.0 if probs is None else _robust_z(surprise)))

