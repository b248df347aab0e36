"""Per-image scores of the audit: how likely each label is wrong, and how off-topic each image is in its class.

Both work on the unit-length pooled ImageNet features, and both had to hold on small folders
(20-200 images a class) that nobody tuned them on (benchmarks/data_checks.py, docs/audit.md).
"""

from __future__ import annotations

import numpy as np

from mobiletune.model import convention
from mobiletune.model.imagenet import Hierarchy, hierarchy, imagenet_probabilities

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
OFFTOPIC_K = 5  # the k-th nearest other image of the folder: a few off-topic images alike do not vouch for each
# other (k = 3 ranked as well on the benchmark's sets, but three flowers among 40 photos would vouch); 10 ranked worse
FLATTEN = 0.5  # the class's ImageNet belief is raised to this power before the overlap: a cat that MobileNetV2 calls
# a lynx still overlaps a folder of tabbies; 0.3-1.0 ranked alike, 0.5 in the middle (benchmarks/data_checks.py)
KIND_SHARE = 0.8  # a class's kind is the deepest WordNet noun holding this share of its images' mean ImageNet
# belief: "cat", "dog"; for roses, which ImageNet has no class for, "whole", which tells nothing. At 0.5 the dogs'
# kind was "hunting dog", which many dogs are not, and 4% of clean images were flagged
KIND_BELIEF = 0.1  # below this belief in its class's kind, each tenfold less adds one robust deviation to an
# image's off-topic score, up to KIND_DECADES (examples in docs/audit.md)
KIND_DECADES = 4.0
VAGUE_DEPTH = 5  # a kind this near WordNet's root ("whole", "organism", "artifact") says nothing of what the class's
# images are: roses, tulips and dandelions. There an image is scored by `kind_contrast` instead of the deficit
CONTRAST_HELD = 0.5  # `kind_contrast` reads the nouns an image holds at least this share of its belief in ...
CONTRAST_FROM = 3.0  # ... and counts the tenfolds by which the rest of its class holds less of one, beyond this many:
# a cat among roses is a "tabby" at 0.6 where roses hold 1e-5. From 3 tenfolds, cats and dogs among flowers were
# found at 90-97% instead of 84-91% (sets of 60-100 a class; 95% instead of 76% at 20-40) for 0.1 points more
# clean flowers flagged; from 2, 92% at 60-100 for 0.7 more (benchmarks/data_checks.py, docs/audit.md)
OFFTOPIC_MADS = 3.3  # an off-topic image lies this many robust deviations (MAD) above the median score: on the
# unmodified sets of benchmarks/data_checks.py (7,280 images) 3.3 flagged 1% (docs/audit.md)
CHUNK = 2048  # rows of a similarity or belief matrix at once: 2,048 x 50,000 float32 is 400 MB


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
    equal (most images exact copies of one, all at distance 0) the MAD is 0: the mean absolute deviation, scaled
    to match the MAD of a normal distribution, stands in; all equal, all 0."""
    median = float(np.nanmedian(values))
    spread = float(np.nanmedian(np.abs(values - median)))
    if spread < 1e-9:
        spread = 0.8 * float(np.nanmean(np.abs(values - median)))  # MAD / mean deviation of a normal: 0.80
    return (values - median) / spread if spread > 1e-9 else np.where(np.isnan(values), np.nan, 0.0)


def _class_mean_distance(unit: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The cosine distance from each row to the mean direction of the other rows of its class; NaN alone."""
    out = np.full(len(unit), np.nan)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) > 1:
            rows = unit[members].astype(np.float64)
            total = rows.sum(axis=0)  # each member's classmates sum to total - row: no n x 1280 copy of them
            along, own = rows @ total, np.einsum("ij,ij->i", rows, rows)
            norms = np.sqrt(np.maximum(total @ total - 2.0 * along + own, 1e-24))
            out[members] = 1.0 - (along - own) / norms
    return out


def _surprise(probs: np.ndarray) -> np.ndarray:
    """-log of how much of each member's ImageNet belief falls where the rest of its class's belief lies: the
    dot product of its 1,000 class probabilities with the other members' mean belief, flattened (`FLATTEN`)."""
    total, out = probs.sum(axis=0, dtype=np.float64), np.empty(len(probs))
    for start in range(0, len(probs), CHUNK):  # a class of 50,000 would hold 400 MB a float64 copy
        rows = probs[start:start + CHUNK].astype(np.float64)
        profile = np.maximum(total - rows, 0.0) ** FLATTEN
        overlap = np.einsum("ij,ij->i", rows, profile) / np.maximum(profile.sum(axis=1), 1e-30)
        out[start:start + len(rows)] = -np.log(np.clip(overlap, 1e-30, None))
    return out


def _kind(probs: np.ndarray, nouns: Hierarchy) -> int:
    """A class's kind: the deepest WordNet noun over the classes that holds KIND_SHARE of its images' mean belief."""
    share = probs.mean(axis=0) @ nouns.members
    held = np.flatnonzero(share >= KIND_SHARE - 1e-6)  # "entity" holds all of it: never empty
    return int(held[np.lexsort((share[held], nouns.depths[held]))[-1]])  # the deepest; of equals, the larger share


def kind_deficit(probs: np.ndarray, nouns: Hierarchy, noun: int | None = None) -> tuple[np.ndarray, str]:
    """How many tenfolds below KIND_BELIEF each member's ImageNet belief in its class's kind (`_kind`, unless given
    as `noun`) lies (0 to KIND_DECADES), and the kind."""
    noun = _kind(probs, nouns) if noun is None else noun
    belief = probs @ nouns.members[:, noun]
    return np.clip(np.log10(KIND_BELIEF / np.clip(belief, 1e-30, None)), 0.0, KIND_DECADES), nouns.names[noun]


def kind_contrast(probs: np.ndarray, nouns: Hierarchy) -> np.ndarray:
    """How many tenfolds, beyond CONTRAST_FROM, the rest of the class believes less than each member in the noun
    the member believes in most against them, of those it holds CONTRAST_HELD of (0 to KIND_DECADES): what an image
    is that its class is not. `kind_deficit`'s dual, for classes whose kind is too vague to lack."""
    total, out = (probs.sum(axis=0, dtype=np.float64) @ nouns.members), np.empty(len(probs))
    for start in range(0, len(probs), CHUNK):
        own = probs[start:start + CHUNK].astype(np.float64) @ nouns.members  # [rows, nouns]
        rest = np.maximum(total - own, 0.0) / max(len(probs) - 1, 1)
        ratio = np.log10(np.clip(own, 1e-30, None) / np.clip(rest, 1e-6, None))
        out[start:start + len(own)] = np.where(own >= CONTRAST_HELD, ratio, 0.0).max(axis=1)
    return np.clip(out - CONTRAST_FROM, 0.0, KIND_DECADES)


def _kind_lack(probs: np.ndarray, nouns: Hierarchy) -> np.ndarray:
    """Each member's tenfolds short of being what its class is: `kind_deficit` where the class has a kind, else
    (a kind no deeper than VAGUE_DEPTH) the larger of it and `kind_contrast`."""
    noun = _kind(probs, nouns)
    deficit, _ = kind_deficit(probs, nouns, noun)
    if nouns.depths[noun] > VAGUE_DEPTH:
        return deficit
    return np.maximum(deficit, kind_contrast(probs, nouns))


def class_kinds(pooled: np.ndarray, labels: np.ndarray, top: tuple[np.ndarray, np.ndarray]) -> dict[int, str]:
    """{class: its kind (`kind_deficit`)} for every class of two images or more, for people to read."""
    probs = imagenet_probabilities(pooled, top)
    return {int(c): kind_deficit(probs[labels == c], hierarchy())[1] for c in np.unique(labels)
            if np.sum(labels == c) > 1}


def offtopic_scores(pooled: np.ndarray, labels: np.ndarray, top: tuple[np.ndarray, np.ndarray] | None = None,
                    kth_similarity: np.ndarray | None = None) -> np.ndarray:
    """How unlike the folder and its class each image is, in robust deviations above the typical image.

    The sum of three views, each in robust deviations (MAD) over all images, because each misses what the
    others see (docs/audit.md):
    - how far the image is from the OFFTOPIC_K-th nearest other image of the whole folder (a flower among
      cats and dogs has no close neighbour in either class); `kth_similarity`: that similarity, where the
      caller has the neighbours already (`checks.nearest`);
    - how far it is from the mean direction of the rest of its class;
    - with MobileNetV2's ImageNet `top` (`model.imagenet`): how little of the image's ImageNet belief falls
      where its class's lies (a "daisy" among "tabby cats").
    With the top, `kind_deficit` is added to the sum's deviations: how little the image is what WordNet calls
    its class's kind (or, where the kind is vague, `kind_contrast`). NaN for a class of a single image.
    """
    if np.bincount(labels).max(initial=0) < 2:
        return np.full(len(labels), np.nan)
    unit = convention.unit_rows(pooled).astype(np.float32)
    if kth_similarity is None:
        kth_similarity = _kth_other_similarity(unit, min(OFFTOPIC_K, len(unit) - 1))
    views = [_robust_z(1.0 - kth_similarity.astype(np.float64)), _robust_z(_class_mean_distance(unit, labels))]
    lack = np.zeros(len(labels))  # tenfolds short of the class's kind (`_kind_lack`)
    if top is not None:
        probs, surprise = imagenet_probabilities(pooled, top), np.full(len(labels), np.nan)
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            if len(members) > 1:
                beliefs = probs[members]
                surprise[members] = _surprise(beliefs)
                lack[members] = _kind_lack(beliefs, hierarchy())
        views.append(_robust_z(surprise))
    return _robust_z(np.sum(views, axis=0)) + lack

