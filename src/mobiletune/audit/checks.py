"""Data audit: exact and near duplicates, copies across splits (leaks), likely label errors, off-topic images.

The checks work on the sha256 of every file and the unaugmented pooled ImageNet features of every
image (from the feature store, so an audit after a run computes no features); only pairs the
features leave in doubt are opened again. Every image gets every score; a row is `flagged` where
the score passes its check:
- near duplicates: the cosine similarity of an image's features to its nearest other image,
  flagged from `NEAR_DUPLICATE_COSINE`, or below it where their keypoints match under one affine
  map (`matching`);
- label errors: 1 - the out-of-fold probability of the given label (`scores`), flagged by
  cleanlab's confident learning;
- outliers (off-topic images): how far the image lies from the folder, from its class and from
  its class's ImageNet belief and kind (`scores`), flagged far above the median.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mobiletune.audit import matching, scores
from mobiletune.data.images import ImageSet
from mobiletune.data.scan import FileIndex
from mobiletune.features import neighbours

ISSUES = ("exact_duplicate", "near_duplicate", "label_error", "outlier")
COLUMNS = ["path", "split", "class", "issue", "score", "suggested_class", "other_path", "flagged"]
# Resized, recompressed (JPEG 30) and 5%-cropped copies of cats-vs-dogs photos score 0.97-0.99 against their
# originals at 160 px; distinct photos of the same class stay below ~0.93 (tests/test_audit.py plants both).
NEAR_DUPLICATE_COSINE = 0.90
NEIGHBOURS = 10  # how many nearest neighbours each image is compared with for near duplicates; the off-topic
# score reads its k-th nearest from them too
assert NEIGHBOURS >= scores.OFFTOPIC_K
# Pairs the features leave in doubt go to keypoint matching (`matching`): each image with its CHECKED nearest
# images from CHECKED_COSINE. Copies cropped a tenth a side, halved and saved at JPEG 30 measured 0.54-0.92 against
# their originals, nearly all their original's nearest (or, where crops of one photo abound, a crop's); a copy in
# flowers_mini given a frame and a colour filter, 0.59 (on cats_and_dogs_filtered, 97% of images have their nearest
# above 0.60, so the floor saves little there; it spares folders of unrelated images). A pair is matched mirrored
# too: where a photo has several crops, some mirrored, a copy's nearest are often mirrored crops of its photo (in the
# benchmark's flowers at 300 a class, copies found 76-83% -> 98-100%).
CHECKED = 2
CHECKED_COSINE = 0.50
LISTINGS = ("review", "all")  # what audit.csv lists after the findings: the next to review, or everything
REVIEW_SHARE = 0.01  # after the findings, the next most suspicious 1% of the images under each check, to look at


@dataclass(frozen=True)
class Finding:
    path: str
    split: str
    cls: str
    issue: str  # one of ISSUES
    score: float  # higher is more suspicious; its scale is the check's own (module docstring)
    flagged: bool = True  # passes the check's threshold: a finding, not just a row to review
    suggested_class: str = ""
    other_path: str = ""  # the duplicate's (or nearest image's) partner

    def row(self) -> list[Any]:
        d = asdict(self)
        return [d["path"], d["split"], d["cls"], d["issue"], round(d["score"], 6), d["suggested_class"],
                d["other_path"], str(d["flagged"]).lower()]


def _finding(images: ImageSet, i: int, issue: str, score: float, **kw: Any) -> Finding:
    i = int(i)
    return Finding(images.paths[i], str(images.splits[i]), images.classes[images.labels[i]], issue, float(score), **kw)


def nearest(pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each image's NEIGHBOURS nearest images by cosine (itself included): (similarities, indices).

    The costly part of the duplicate search (exact, ~37 s for 50,000 images on 2 cores: `neighbours`), so a
    run computes it once and hands it to every check that needs it.
    """
    return neighbours.nearest(pooled, NEIGHBOURS + 1)


def duplicates(images: ImageSet, near: tuple[np.ndarray, np.ndarray], threshold: float = NEAR_DUPLICATE_COSINE,
               progress: Callable[[int, int], None] | None = None, index: FileIndex | None = None) -> list[Finding]:
    """Each image with an earlier identical file (sha256), or a near copy, once per pair: cosine >= threshold
    among the `nearest` neighbours, or one of an image's CHECKED nearest whose keypoints match
    (`matching.same_photo`, straight or mirrored; with `progress` shown, and the counts recorded in `index`)."""
    found: list[Finding] = []
    first: dict[str, int] = {}
    for i, digest in enumerate(images.hashes):
        if digest in first:
            found.append(_copy(images, i, first[digest], "exact_duplicate", 1.0))
        else:
            first[digest] = i
    similarities, neighbours = near
    pairs: dict[tuple[int, int], float] = {}  # from either side: a's neighbours may hold b while b's do not hold a
    for i in range(len(neighbours)):
        for similarity, j in zip(similarities[i], neighbours[i], strict=True):
            if similarity >= threshold:
                pairs[(min(i, int(j)), max(i, int(j)))] = float(similarity)
    ranked, partners = _others(near)
    doubtful = _doubtful(images, ranked, partners, pairs)
    for a, b, _ in matching.same_photo(images, sorted(doubtful), progress, index):
        pairs[(a, b)] = doubtful[(a, b)]
    found += [_copy(images, b, a, "near_duplicate", sim) for (a, b), sim in pairs.items()
              if a != b and images.hashes[a] != images.hashes[b]]  # exact copies: reported above
    return found


def _copy(images: ImageSet, i: int, original: int, issue: str, score: float) -> Finding:
    """Image i as a copy of `original`; filed under another class, the original's class is its suggested one."""
    other = images.labels[original]
    return _finding(images, i, issue, score, other_path=images.paths[original],
                    suggested_class=images.classes[other] if other != images.labels[i] else "")


def _others(near: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """`nearest`'s neighbours of each image without the image itself, most similar first: (similarities,
    indices), the image's own column last at -inf."""
    similarities, neighbours = near
    sims = np.where(neighbours != np.arange(len(neighbours))[:, None], similarities, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(neighbours, order, axis=1)


def _doubtful(images: ImageSet, ranked: np.ndarray, partners: np.ndarray,
              flagged: dict[tuple[int, int], float]) -> dict[tuple[int, int], float]:
    """{(a, b): cosine} of each image and its CHECKED nearest (`_others`) from CHECKED_COSINE, not yet flagged and
    not identical files: what keypoint matching decides."""
    doubtful = {}
    for i, k in zip(*np.nonzero(ranked[:, :CHECKED] >= CHECKED_COSINE), strict=True):
        a, b = sorted((int(i), int(partners[i, k])))
        if (a, b) not in flagged and images.hashes[a] != images.hashes[b]:
            doubtful[(a, b)] = float(ranked[i, k])
    return doubtful


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
        if f.flagged and f.issue in ISSUES[:2]:
            a, b = root(digest[f.path]), root(digest[f.other_path])
            parent[max(a, b)] = min(a, b)
    return {h: root(h) for h in {*parent, *parent.values()}}


def leaks(images: ImageSet, findings: list[Finding]) -> list[Finding]:
    """The duplicate pairs that cross train and a held-out split: a held-out image the model has as good as seen."""
    in_train = {p: s == "train" for p, s in zip(images.paths, images.splits, strict=True)}
    return [f for f in findings
            if f.flagged and f.issue in ISSUES[:2] and in_train[f.path] != in_train[f.other_path]]


def similarity_rows(images: ImageSet, near: tuple[np.ndarray, np.ndarray]) -> list[Finding]:
    """Every image with its nearest other image (unflagged "near_duplicate" rows), once per pair: the copies
    below the threshold, to review."""
    ranked, partners = _others(near)
    similarity, partner = np.where(np.isfinite(ranked[:, 0]), ranked[:, 0], 0.0), partners[:, 0]  # alone: itself
    seen: set[tuple[int, int]] = set()
    rows = []
    for i in np.argsort(-similarity, kind="stable"):
        pair = (min(int(i), int(partner[i])), max(int(i), int(partner[i])))
        if pair[0] != pair[1] and pair not in seen and images.hashes[pair[0]] != images.hashes[pair[1]]:
            seen.add(pair)
            rows.append(_finding(images, pair[1], "near_duplicate", similarity[i], flagged=False,
                                 other_path=images.paths[pair[0]]))
    return rows


def label_errors(images: ImageSet, pooled: np.ndarray) -> list[Finding]:
    """Every image's label-quality row (score 1 - the out-of-fold probability of its label, with the class the
    probe prefers where that is another), flagged where confident learning calls the label wrong. Images of a
    class with a single image have no row."""
    fitted = scores.out_of_fold_probabilities(pooled, images.labels)
    if fitted is None:
        return []
    probs, labels = fitted[0], images.labels
    wrong = scores.label_issue_mask(labels, probs)
    rows = []
    for i in np.flatnonzero(np.isfinite(probs).all(axis=1)):
        best = int(probs[i].argmax())
        rows.append(_finding(images, i, "label_error", 1.0 - probs[i, labels[i]], flagged=bool(wrong[i]),
                             suggested_class=images.classes[best] if best != labels[i] else ""))
    return rows


def outliers(images: ImageSet, pooled: np.ndarray, top: tuple[np.ndarray, np.ndarray] | None = None,
             near: tuple[np.ndarray, np.ndarray] | None = None) -> list[Finding]:
    """Every image's off-topic row (`scores.offtopic_scores`, with the ImageNet `top` where there is one),
    flagged above `scores.OFFTOPIC_MADS`. `near`: `nearest(pooled)`, whose neighbours give the score's k-th."""
    kth = None
    if near is not None:
        ranked = _others(near)[0]
        kth = ranked[:, min(scores.OFFTOPIC_K, len(pooled) - 1) - 1] if len(pooled) > 1 else None
    values = scores.offtopic_scores(pooled, images.labels, top, kth)
    return [_finding(images, i, "outlier", float(v), flagged=bool(v > scores.OFFTOPIC_MADS))
            for i, v in enumerate(values) if np.isfinite(v)]


def _listed(rows: list[Finding], n_images: int, listing: str) -> list[Finding]:
    """The rows audit.csv lists: flagged first, then the next most suspicious REVIEW_SHARE of the images for each
    issue ("review") or every row ("all"); each group by issue, most suspicious first."""
    order = sorted(rows, key=lambda f: (not f.flagged, ISSUES.index(f.issue), -f.score, f.path))
    if listing == "all":
        return order
    review = max(1, math.ceil(REVIEW_SHARE * n_images))
    taken = dict.fromkeys(ISSUES, 0)
    listed = []
    for f in order:
        if f.flagged or taken[f.issue] < review:
            listed.append(f)
            taken[f.issue] += not f.flagged
    return listed


def run_audit(images: ImageSet, pooled: np.ndarray, *, full: bool = True,
              near: tuple[np.ndarray, np.ndarray] | None = None, listing: str = "review",
              top: tuple[np.ndarray, np.ndarray] | None = None,
              progress: Callable[[int, int], None] | None = None, index: FileIndex | None = None) -> list[Finding]:
    """The audit's rows (`Finding.flagged` says which are findings): without `full`, duplicates only.

    `listing`: "review" (the findings, then the next most suspicious images of each check) or "all" (every
    image under every check). `near`: `nearest(pooled)`, when the caller has it already. `top`:
    MobileNetV2's ImageNet top (`model.imagenet.top_for`), which sharpens the off-topic score. `progress(done,
    total)`: the keypoint matching's, the one step that opens images again; `index`: the file index, whose
    recorded keypoint matches are reused.
    """
    assert listing in LISTINGS, listing
    near = near if near is not None else nearest(pooled)
    flagged = duplicates(images, near, progress=progress, index=index)
    pairs = {frozenset((f.path, f.other_path)) for f in flagged}
    rows = flagged + [f for f in similarity_rows(images, near) if frozenset((f.path, f.other_path)) not in pairs]
    if full:
        pooled = np.asarray(pooled)  # features.StoredRows too: every image's, read once
        rows += label_errors(images, pooled) + outliers(images, pooled, top, near)
    return _listed(rows, len(images.paths), listing)


def summary(images: ImageSet, findings: list[Finding]) -> dict[str, Any]:
    """Flagged images per issue and the cross-split copies, for the console, metrics.json and report.html."""
    crossing = leaks(images, findings)
    return {
        **{issue: sum(f.flagged and f.issue == issue for f in findings) for issue in ISSUES},
        "leaks": len(crossing),
        "across_classes": sum(f.flagged and f.issue in ISSUES[:2] and bool(f.suggested_class) for f in findings),
        "leaked_held_out": sorted({f.path if f.split != "train" else f.other_path for f in crossing}),
    }


def write_csv(findings: list[Finding], path: Path) -> None:
    from mobiletune.runfolder import write_csv as write

    write(path, COLUMNS, [f.row() for f in findings])


def read_exclusions(path: Path) -> dict[str, str]:
    """{path relative to DATA_DIR: reason} from an audit.csv (its flagged rows, with their issue) or a plain list
    of paths (one a line; lines starting with # are comments)."""
    from mobiletune.errors import UsageError

    try:  # an audit.csv names files as the OS does: non-UTF-8 names as surrogates, which `read_csv` reads back
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise UsageError(f"--exclude {path}: cannot read it ({exc})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and lines[0].split(",")[:4] == COLUMNS[:4]:
        from mobiletune.runfolder import read_csv

        return {r["path"]: f"excluded ({r['issue']}, {path.name})" for r in read_csv(path)
                if r.get("flagged", "true") == "true"}  # an audit.csv from before the column lists findings only
    return {line.strip(): f"excluded (listed in {path.name})" for line in lines if not line.startswith("#")}
