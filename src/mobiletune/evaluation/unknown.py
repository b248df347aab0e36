"""Saying "unknown": how unlike the training images an input is, and where to draw the line.

A classifier trained on cats and dogs still says "dog, 99%" for a photo of a car: softmax
shares all belief among the classes it knows. Three scores, each higher for stranger inputs:
- "msp": 1 - the top class probability (Hendrycks & Gimpel, 2017);
- "energy": -logsumexp(logits) (Liu et al., 2020); a binary model's one logit z is the pair (0, z);
- "knn": the cosine distance from an input's pooled base features to those of its k-th nearest
  training image (Sun et al., 2022). It needs the training features (`unknown.npz` in the run). At small
  image sizes it also reads the pooled output of a middle layer of the base (`LAYERS`), with its own reference;
  each layer's distance is then put in robust deviations from its in-distribution median, and the score is the
  larger.
The threshold is the `predict.keep` quantile of in-distribution scores, whatever the score's scale:
the validation images', and for knn also each training image's leave-one-out score (its distance to
the k-th nearest *other* training image). A small set's few validation images alone make a noisy
quantile (20 images: 0.95 is their maximum, which on flowers_mini let 30% of cats and dogs through);
the training images multiply the sample. Which score, k and threshold was measured across set sizes
and image sizes (benchmarks/unknown_inputs.py, docs/unknown-inputs.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mobiletune.config import UNKNOWN_SCORES
from mobiletune.features import neighbours
from mobiletune.model import convention

__all__ = ["UnknownDetector", "fit", "fit_run", "layers_for", "load", "scores"]

# The middle layer the knn score reads beside the pooled base output where the base's last map is at most
# SMALL_MAP a side (96 px and below): block 14's expansion (960 channels at alpha 1; 3x3 at 96 px like the last map,
# but two blocks and the 1x1 Conv_1 before the features the head was tuned on). At 96 px the pooled base output
# tells cats and dogs from flowers at AUROC 0.73-0.87 and lets text screenshots through; with block 14 beside it
# 0.98-0.99 and every synthetic image flagged. From 128 px the pooled base output alone flags 90-100% at 92-98%
# kept, and block 14 costs 4-10 points of kept test images (docs/unknown-inputs.md).
LAYERS = ("block_14_expand_relu",)
SMALL_MAP = 3
REFERENCE_LIMIT = 20_000  # training images kept for knn: distances to 20k rows stay a few ms per image
LOO_LIMIT = 2_000  # training images scored leave-one-out for the threshold: plenty for a 0.95 quantile


def energy(logits: np.ndarray) -> np.ndarray:
    import scipy.special

    logits = convention.two_logits(logits.astype(np.float64))
    return -scipy.special.logsumexp(logits, axis=1)


def msp(logits: np.ndarray) -> np.ndarray:
    from mobiletune.evaluation.statistics import probabilities

    return 1.0 - probabilities(logits).max(axis=1)


def knn(pooled: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Cosine distance to the k-th nearest row of `reference` (`neighbours.search`)."""
    similarity = neighbours.search(pooled, reference, k)[0][:, -1]
    return 1.0 - similarity.astype(np.float64)


def scores(name: str, pooled: np.ndarray, logits: np.ndarray, reference: np.ndarray | None = None,
           k: int = 5) -> np.ndarray:
    """Score `name` of each input (higher: less like the training images)."""
    assert name in UNKNOWN_SCORES, name
    if name == "msp":
        return msp(logits)
    if name == "energy":
        return energy(logits)
    assert reference is not None, "knn needs the training features"
    return knn(pooled, reference, k)


@dataclass(frozen=True)
class UnknownDetector:
    """A score and its threshold: inputs scoring above it are "unknown"."""

    score: str
    threshold: float
    validation_kept: float  # share of validation images at or under the threshold
    k: int
    reference: np.ndarray | None  # the training images' features [n, channels], each layer unit-length (knn only)
    layers: tuple[str, ...] = ()  # base layers whose pooled outputs precede the pooled base output in the features
    widths: tuple[int, ...] = ()  # channels of each layer, the pooled base output last; (): one layer, raw distances
    centre: tuple[float, ...] = ()  # each layer's median in-distribution knn distance ...
    spread: tuple[float, ...] = ()  # ... and its median absolute deviation: the layers' distances made comparable

    def scores(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Scores of inputs with these features (`Classifier.pooled_layers` of this detector's `layers`) and logits."""
        if self.score != "knn" or not self.widths:
            return scores(self.score, features, logits, self.reference, self.k)
        return self.combined(self.distances(features))

    def distances(self, features: np.ndarray) -> list[np.ndarray]:
        """Each layer's knn distances of inputs with these features (knn only)."""
        parts = zip(split_layers(features, self.widths), split_layers(self.reference, self.widths), strict=True)
        return [knn(f, r, self.k) for f, r in parts]

    def deviations(self, distances: list[np.ndarray]) -> np.ndarray:
        """[layers, n]: each layer's knn `distances` in robust deviations from its in-distribution median."""
        return np.stack([(d - c) / s for d, c, s in zip(distances, self.centre, self.spread, strict=True)])

    def combined(self, distances: list[np.ndarray]) -> np.ndarray:
        """The knn score of each layer's `distances`: the distance itself (one layer, no deviations: files made
        before the layers), else the largest deviation."""
        return distances[0] if not self.widths else np.max(self.deviations(distances), axis=0)

    def summary(self, test_scores: np.ndarray) -> dict[str, Any]:
        """metrics.json["unknown"]: the score, its threshold, and the share of validation and test images kept."""
        return {"score": self.score, "threshold": self.threshold, "validation_kept": self.validation_kept,
                **({"k": self.k} if self.score == "knn" else {}),
                **({"layers": list(self.layers)} if self.layers else {}),
                "test_kept": float(np.mean(test_scores <= self.threshold))}

    def save(self, path: Path) -> None:
        import io

        from mobiletune.runfolder import atomic_write_bytes

        reference = np.zeros((0, 0)) if self.reference is None else self.reference
        buffer = io.BytesIO()  # float16 rows: half the file, distances equal to ~1e-3
        np.savez(buffer, score=self.score, threshold=self.threshold, validation_kept=self.validation_kept, k=self.k,
                 reference=reference.astype(np.float16), layers=np.array(self.layers, dtype=str),
                 widths=np.array(self.widths, dtype=np.int64), centre=np.array(self.centre, dtype=np.float64),
                 spread=np.array(self.spread, dtype=np.float64))
        atomic_write_bytes(path, buffer.getvalue())


def reference_rows(n: int, seed: int) -> np.ndarray:
    """Which of n training images the knn score compares with: all, or REFERENCE_LIMIT of them drawn at random
    (so a caller can embed only those: at 160,000 training images, 820 MB and minutes saved)."""
    if n <= REFERENCE_LIMIT:
        return np.arange(n)
    return np.random.default_rng(seed).choice(n, REFERENCE_LIMIT, replace=False)


def leave_one_out(reference: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """knn scores of (at most LOO_LIMIT of) the reference rows themselves, each without itself: the distance
    to its k-th nearest *other* row. In-distribution scores as unseen images get them, one per training image."""
    if len(reference) < 2:
        return np.zeros(0)
    rows = reference
    if len(rows) > LOO_LIMIT:
        rows = rows[np.random.default_rng(seed).choice(len(rows), LOO_LIMIT, replace=False)]
    # each row finds itself first (distance 0, or 1e-3 after float16): the (k + 1)-th is the k-th other
    return knn(rows, reference, min(k, len(reference) - 1) + 1)


def _copies_inside(inside: np.ndarray, val: np.ndarray) -> bool:
    """Whether the training images' leave-one-out scores sit below the validation images' (one-sided
    Mann-Whitney, p < 0.01): then training images have near copies of each other (bursts, augmented copies),
    and a left-out image still finds its copy, which an unseen image does not. A set of 28 flowers a class
    grown to 200 by crops gave a threshold that kept 5% of its test images; on real photos p was 0.1-0.9."""
    if len(inside) < 2 or len(val) < 5:
        return False
    from scipy.stats import mannwhitneyu

    return bool(mannwhitneyu(inside, val, alternative="less").pvalue < 0.01)


def fit(score: str, train_features: np.ndarray, val_features: np.ndarray, val_logits: np.ndarray, *, keep: float,
        k: int, seed: int = 0, layers: tuple[str, ...] = (), widths: tuple[int, ...] = ()) -> UnknownDetector:
    """The detector whose threshold accepts `keep` of the in-distribution scores: the validation images', and
    for knn also the training images' leave-one-out scores (`train_features` should be unaugmented: a test image
    is, and augmented references sit farther from it, which blurred 96-160 px detectors: docs/unknown-inputs.md).
    knn with `layers` (the features hold their pooled outputs and the pooled base output, `widths` channels each;
    no `widths` without `layers`):
    each layer's distances are put in robust deviations from their in-distribution median, and the score is the
    largest."""
    if score != "knn":
        val = scores(score, val_features, val_logits)
        threshold = float(np.quantile(val, keep, method="higher"))
        return UnknownDetector(score, threshold, float(np.mean(val <= threshold)), k, None)
    assert len(widths) == (len(layers) + 1 if layers else 0), (layers, widths)  # each layer's and the pooled output's
    rows = train_features[reference_rows(len(train_features), seed)]
    # each layer unit-length, as saved (float16), so the threshold holds after load
    reference = np.concatenate([convention.unit_rows(r) for r in split_layers(rows, widths)], axis=1)
    reference = reference.astype(np.float16).astype(np.float32)
    detector = UnknownDetector(score, np.nan, np.nan, k, reference, layers, widths)
    val = detector.distances(val_features)
    inside = [leave_one_out(r, k, seed) for r in split_layers(reference, widths)]
    if any(_copies_inside(i, v) for i, v in zip(inside, val, strict=True)):
        inside = [np.zeros(0) for _ in inside]
    if layers:  # each layer's in-distribution distances give its centre and spread
        seen = [np.concatenate(pair) for pair in zip(inside, val, strict=True)]
        centre = tuple(float(np.median(d)) for d in seen)
        spread = tuple(max(float(np.median(np.abs(d - c))), 1e-6) for d, c in zip(seen, centre, strict=True))
        detector = replace(detector, centre=centre, spread=spread)
    inside, val = detector.combined(inside), detector.combined(val)
    threshold = float(np.quantile(np.concatenate([inside, val]), keep, method="higher"))
    return replace(detector, threshold=threshold, validation_kept=float(np.mean(val <= threshold)))


def split_layers(features: np.ndarray, widths: tuple[int, ...]) -> list[np.ndarray]:
    """`features` [n, sum(widths)] as one block per layer (one block where `widths` is empty)."""
    if not widths:
        return [features]
    assert features.shape[1] == sum(widths), (features.shape, widths)
    return np.split(features, np.cumsum(widths)[:-1], axis=1)


def load(path: Path) -> UnknownDetector | None:
    """The run's detector, or None where the run has none (made before mobiletune had one)."""
    if not path.is_file():
        return None
    with np.load(path) as f:
        reference = f["reference"].astype(np.float32)
        # files made before the layers hold one layer and no deviations: they score as they did
        layers, widths, centre, spread = (tuple(f[key].tolist()) if key in f else ()
                                         for key in ("layers", "widths", "centre", "spread"))
        return UnknownDetector(str(f["score"]), float(f["threshold"]), float(f["validation_kept"]), int(f["k"]),
                               reference if reference.size else None, layers, widths, centre, spread)


# ---------------------------------------------------------------------------------------------
# Fitting a run's detector


def embed(classifier, images, splits: tuple[str, ...], config, feats=None,
          rows: dict[str, np.ndarray] | None = None,
          layers: tuple[str, ...] = ()) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The unknown-input score's features (`Classifier.pooled_layers` of `layers`: the pooled base output alone where
    empty) and logits of each split's images (or of those at `rows[split]`, positions within the split) under the
    trained `classifier` (`network.Classifier`), unaugmented: from the cached boundary activations where there are
    some and the layers lie above the cut (the layers below stay frozen, so they still hold: 0.127 of 0.306 GFLOP
    an image), else from pixels."""
    from mobiletune.data import pixels
    from mobiletune.features.dataset import feature_dataset
    from mobiletune.model import cut

    batch, at = config.data.batch_size, config.phase2.fine_tune_at
    if feats is not None and not cut.above_cut(classifier.base, at, layers):
        feats = None
    top = None if feats is None else cut.top_model(classifier, at, pooled=True, layers=layers)
    whole = None  # from pixels, built once for the splits the cache lacks
    out = {}
    for split in splits:
        chosen = (rows or {}).get(split, np.arange(len(images.indices(split))))
        reader = None if feats is None else _plain_reader(feats, images, split, config, classifier.augmenting)
        if reader is not None:
            labels = images.labels[images.indices(split)[chosen]]
            batches, two = feature_dataset(reader.subset(chosen), feats.boundaries[at], labels, 1, batch,
                                           shuffle=False, seed=config.data.seed), top
        else:
            batches = pixels.eval_batches(images, config.data.image_size, batch, split, chosen)
            if whole is None:
                whole = classifier.scoring_model(layers)
            two = whole
        features, logits = zip(*((np.asarray(f), np.asarray(z)) for f, z in
                                 (two.predict_on_batch(x) for x, _ in batches)), strict=True)
        out[split] = np.concatenate(features), np.concatenate(logits)
    return out


def _plain_reader(feats, images, split: str, config, augmenting: bool):
    """The cached rows of `split`'s unaugmented images, or None where the cache lacks them (the training images'
    plain view is there when the run audits, the default; without it they come from pixels). Validation and
    test hold only the plain view; the training images' cached views are augmented ones, and as the knn
    reference they let through up to twice the unknowns (docs/unknown-inputs.md)."""
    from mobiletune.features.compute import plain_keys

    if split != "train" or not augmenting:
        return feats.readers[split]
    store = feats.readers[split].store
    keys = plain_keys([images.hashes[i] for i in images.indices(split)], config)
    return None if store.missing(keys) else store.reader(keys)


def layers_for(classifier, score: str) -> tuple[str, ...]:
    """The middle layers `score` reads beside the pooled base output of `classifier` (`network.Classifier`):
    `LAYERS` for knn where the base's last map is at most `SMALL_MAP` a side, else none."""
    return LAYERS if score == "knn" and classifier.base.output.shape[1] <= SMALL_MAP else ()


def fit_run(classifier, images, config, feats=None, layers: tuple[str, ...] | None = None
            ) -> tuple[UnknownDetector, np.ndarray]:
    """The detector of a trained run (`config.predict`) and its scores of the test images; `layers` (knn only)
    overrides `layers_for`, e.g. to measure one layer against two on the same run."""
    p = config.predict
    knn = p.unknown_score == "knn"  # only knn compares with training images
    splits = ("train", "validation", "test") if knn else ("validation", "test")
    layers = layers_for(classifier, p.unknown_score) if layers is None or not knn else layers
    widths = (*(int(classifier.base.get_layer(v).output.shape[-1]) for v in layers), classifier.pool_width
              ) if layers else ()
    rows = {"train": reference_rows(len(images.indices("train")), config.data.seed)}
    emb = embed(classifier, images, splits, config, feats, rows, layers)
    detector = fit(p.unknown_score, emb["train"][0] if knn else np.zeros((0, 0)), *emb["validation"], keep=p.keep,
                   k=p.knn_k, seed=config.data.seed, layers=layers, widths=widths)
    return detector, detector.scores(*emb["test"])
