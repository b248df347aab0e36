"""Data audit: exact and near duplicates, copies across splits (leaks), likely label errors, off-topic images.

Everything works on what mobiletune already has: the sha256 of every file and the unaugmented
pooled ImageNet features of every image (from the feature store, so an audit after a run costs
seconds). Near duplicates are pairs whose features have a cosine similarity of at least
`NEAR_DUPLICATE_COSINE`; label errors are ranked by cleanlab's confident learning on out-of-fold
probabilities of a head trained k-fold on those features; outliers by cleanlab's
OutOfDistribution score (mean distance to the nearest neighbours in feature space).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mobiletune.data.images import ImageSet
from mobiletune.model import convention

ISSUES = ("exact_duplicate", "near_duplicate", "label_error", "outlier")
COLUMNS = ["path", "split", "class", "issue", "score", "suggested_class", "other_path"]
# Resized, recompressed (JPEG 30) and 5%-cropped copies of cats-vs-dogs photos score 0.97-0.99 against their
# originals at 160 px; distinct photos of the same class stay below ~0.93 (tests/test_audit.py plants both).
NEAR_DUPLICATE_COSINE = 0.90
NEIGHBOURS = 10  # how many nearest neighbours each image is compared with for near duplicates
FOLDS = 5  # out-of-fold probabilities for label errors: each image scored by a head that never saw it
# An outlier's OutOfDistribution score lies this many robust deviations (MAD) below the median score.
OUTLIER_MADS = 4.0


@dataclass(frozen=True)
class Finding:
    path: str
    split: str
    cls: str
    issue: str  # one of ISSUES
    score: float  # higher is more suspicious, in [0, 1]
    suggested_class: str = ""
    other_path: str = ""  # the duplicate's partner

    def row(self) -> list[Any]:
        d = asdict(self)
        return [d["path"], d["split"], d["cls"], d["issue"], round(d["score"], 6), d["suggested_class"],
                d["other_path"]]


def _finding(images: ImageSet, i: int, issue: str, score: float, **kw: str) -> Finding:
    return Finding(images.paths[i], str(images.splits[i]), images.classes[images.labels[i]], issue, float(score), **kw)


def nearest(pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each image's NEIGHBOURS nearest images by cosine (itself included): (similarities, indices).

    The costly part of the duplicate search (brute force: ~50 s for 50,000 images on 2 cores), so a
    run computes it once and hands it to every check that needs it.
    """
    from sklearn.neighbors import NearestNeighbors

    k = min(NEIGHBOURS + 1, len(pooled))
    distances, indices = NearestNeighbors(n_neighbors=k, metric="cosine").fit(pooled).kneighbors(pooled)
    return 1.0 - distances, indices


def duplicates(images: ImageSet, near: tuple[np.ndarray, np.ndarray],
               threshold: float = NEAR_DUPLICATE_COSINE) -> list[Finding]:
    """Each image with an earlier identical file (sha256), or a near copy (cosine >= threshold, among the
    `nearest` neighbours), once per pair."""
    found: list[Finding] = []
    first: dict[str, int] = {}
    for i, digest in enumerate(images.hashes):
        if digest in first:
            found.append(_finding(images, i, "exact_duplicate", 1.0, other_path=images.paths[first[digest]]))
        else:
            first[digest] = i
    similarities, neighbours = near
    pairs: dict[tuple[int, int], float] = {}  # from either side: a's neighbours may hold b while b's do not hold a
    for i in range(len(neighbours)):
        for similarity, j in zip(similarities[i], neighbours[i], strict=True):
            a, b = min(i, int(j)), max(i, int(j))
            if a != b and similarity >= threshold and images.hashes[a] != images.hashes[b]:  # exact: reported above
                pairs[(a, b)] = float(similarity)
    found += [_finding(images, b, "near_duplicate", sim, other_path=images.paths[a]) for (a, b), sim in pairs.items()]
    return found


def duplicate_groups(images: ImageSet, findings: list[Finding]) -> dict[str, str]:
    """{image digest: its group's digest} for images with a copy (exact or near), the group named by its smallest
    digest: what a group-aware split keeps together (data.dedupe). Union-find over the duplicate pairs."""
    parent: dict[str, str] = {}

    def root(h: str) -> str:
        while parent.get(h, h) != h:
            h = parent[h]
        return h

    digest = dict(zip(images.paths, images.hashes, strict=True))
    for f in findings:
        if f.issue in ISSUES[:2]:
            a, b = root(digest[f.path]), root(digest[f.other_path])
            parent[max(a, b)] = min(a, b)
    return {h: root(h) for h in {*parent, *parent.values()}}


def leaks(images: ImageSet, findings: list[Finding]) -> list[Finding]:
    """The duplicate pairs that cross train and a held-out split: a held-out image the model has as good as seen."""
    in_train = {p: s == "train" for p, s in zip(images.paths, images.splits, strict=True)}
    return [f for f in findings if f.issue in ISSUES[:2] and in_train[f.path] != in_train[f.other_path]]


def label_errors(images: ImageSet, pooled: np.ndarray, folds: int = FOLDS) -> list[Finding]:
    """Likely wrong labels, most suspicious first, with the class the out-of-fold head prefers."""
    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    labels = images.labels
    folds = min(folds, int(np.bincount(labels).min()))
    if folds < 2:
        return []  # a class with a single image cannot be held out of its own fold
    probs = cross_val_predict(LogisticRegression(max_iter=1000, C=1.0), convention.unit_rows(pooled), labels,
                              cv=StratifiedKFold(folds, shuffle=True, random_state=0), method="predict_proba")
    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    return [_finding(images, int(i), "label_error", 1.0 - probs[i, labels[i]],
                     suggested_class=images.classes[int(probs[i].argmax())]) for i in ranked]


def outlier_scores(pooled: np.ndarray) -> np.ndarray:
    """Each image's cleanlab OutOfDistribution score (its mean distance to its nearest neighbours, mapped to
    (0, 1]): lower is more unlike the rest of the set."""
    from cleanlab.outlier import OutOfDistribution

    return OutOfDistribution(params={"k": min(10, len(pooled) - 1)}).fit_score(features=convention.unit_rows(pooled),
                                                                               verbose=False)


def outliers(images: ImageSet, pooled: np.ndarray) -> list[Finding]:
    """Images far from every other in feature space (`outlier_scores`), most suspicious first."""
    if len(pooled) < 3:
        return []
    scores = outlier_scores(pooled)
    median = float(np.median(scores))
    mad = float(np.median(np.abs(scores - median))) or 1e-12
    flagged = np.flatnonzero(scores < median - OUTLIER_MADS * mad)
    return [_finding(images, int(i), "outlier", 1.0 - float(scores[i])) for i in flagged[np.argsort(scores[flagged])]]


def run_audit(images: ImageSet, pooled: np.ndarray, *, full: bool = True,
              near: tuple[np.ndarray, np.ndarray] | None = None) -> list[Finding]:
    """Every finding, sorted by issue (as ISSUES) and then most suspicious first. Without `full`: duplicates only.

    `near`: `nearest(pooled)`, when the caller has it already.
    """
    found = duplicates(images, near if near is not None else nearest(pooled))
    if full:
        found += label_errors(images, pooled) + outliers(images, pooled)
    return sorted(found, key=lambda f: (ISSUES.index(f.issue), -f.score, f.path))


def summary(images: ImageSet, findings: list[Finding]) -> dict[str, Any]:
    """Counts per issue and the cross-split copies, for the console, metrics.json and report.html."""
    crossing = leaks(images, findings)
    return {
        **{issue: sum(f.issue == issue for f in findings) for issue in ISSUES},
        "leaks": len(crossing),
        "leaked_held_out": sorted({f.path if f.split != "train" else f.other_path for f in crossing}),
    }


def write_csv(findings: list[Finding], path: Path) -> None:
    from mobiletune.runfolder import write_csv as write

    write(path, COLUMNS, [f.row() for f in findings])


def read_exclusions(path: Path) -> dict[str, str]:
    """{path relative to DATA_DIR: reason} from an audit.csv (its issue column) or a plain list of paths."""
    from mobiletune.errors import UsageError

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--exclude {path}: cannot read it ({exc})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and lines[0].split(",")[:4] == COLUMNS[:4]:
        from mobiletune.runfolder import read_csv

        return {r["path"]: f"excluded ({r['issue']}, {path.name})" for r in read_csv(path)}
    return {line.strip(): f"excluded (listed in {path.name})" for line in lines if not line.startswith("#")}
