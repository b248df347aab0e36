"""Splitting by content: each image's split drawn from (seed, its sha256), so a split survives renames, new
files and re-scans; near copies share one split."""

from __future__ import annotations

import hashlib

import numpy as np

from mobiletune.config import DataConfig
from mobiletune.errors import DataError

# ---------------------------------------------------------------------------------------------
# The split

# Below this many images a class is split by exact quotas (ranks of the seeded hash); from it on,
# by thresholds on the hash, which never move an image when others are added. Near this size the
# two agree except for a few images at the quota's edge, and a binomial count is within ~10% of
# its quota.
EXACT_SPLIT_BELOW = 1000


def split_unit(seed: int, sha256: str) -> float:
    """A number in [0, 1) drawn from the image's content and the seed alone: its place in the split.

    It does not depend on the image's position or on the other images, so adding images, or
    renaming them, leaves every other image's draw unchanged; copies of one file share a split.
    """
    return int(hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()[:15], 16) / 16**15


def _split_counts(n: int, fraction: float) -> int:
    """How many of a class's n images go to a held-out split: at least 1, leaving at least 1."""
    return min(max(1, round(n * fraction)), n - 1)


def _held_out(members: np.ndarray, hashes: np.ndarray, seed: int, fraction: float, parts: int) -> list[np.ndarray]:
    """`parts` held-out slices of `members` (each `fraction` of them), lowest hash draws first.

    Copies of one file (equal sha256) are one unit: they land in the same split, never across two.
    """
    unique, inverse = np.unique(hashes[members], return_inverse=True)
    units = np.array([split_unit(seed, h) for h in unique])
    order = np.argsort(units, kind="stable")
    if len(unique) < EXACT_SPLIT_BELOW:
        k = _split_counts(len(unique), fraction)
        chosen = [order[p * k : (p + 1) * k] for p in range(parts)]
    else:
        chosen = [np.flatnonzero((units >= p * fraction) & (units < (p + 1) * fraction)) for p in range(parts)]
    return [members[np.isin(inverse, c)] for c in chosen]


def assign_splits(labels: np.ndarray, given: list[str | None], hashes: list[str], config: DataConfig,
                  classes: list[str], groups: dict[str, str] | None = None,
                  trained: frozenset[str] = frozenset()) -> np.ndarray:
    """A split name per image: kept where the folders say, drawn from each image's hash where not.

    With class folders only, each class is divided into test, validation and train by the seeded
    hash draw (`split_unit`); with train/ and validation/ but no test/, a fraction of each class
    of validation/ becomes the test set the same way. Stratified: exact per-class quotas for
    classes under EXACT_SPLIT_BELOW images, hash thresholds above (stable as the folder grows).
    `groups` maps an image's digest to its group's (near copies, `audit.duplicate_groups`). `trained`: the digests
    of an earlier model's training images (`data.parent`); they, and their near copies, stay in train: a model's
    training images never reach the test set of a model trained from it. Quotas can otherwise move the images at
    their edge as a small class grows.
    """
    splits = np.array([s or "" for s in given], dtype=object)
    # an image in a group of near copies is split as the group: all of them land in one split
    digests = np.array([groups.get(h, h) for h in hashes] if groups else hashes)
    has_test = "test" in given
    for cls in np.unique(labels):
        if given[0] is None:
            members = np.flatnonzero(labels == cls)
            _check_splittable(classes[cls], members, digests, 3, "", "to split into train/validation/test (or give "
                              "train/ and validation/ folders)")
            test, validation = _held_out(members, digests, config.seed, config.holdout_fraction, 2)
            splits[members] = "train"
            splits[validation] = "validation"
            splits[test] = "test"
        elif not has_test:
            members = np.flatnonzero((labels == cls) & (splits == "validation"))
            _check_splittable(classes[cls], members, digests, 2, " in validation/", "to hold some out as test (or "
                              "add a test/ folder, or test rows)")
            splits[_held_out(members, digests, config.seed, config.test_fraction, 1)[0]] = "test"
    if given[0] is None or not has_test:
        _one_split_each(splits, labels, np.array(hashes), np.array([s is None or s == "validation" for s in given]),
                        floor="train" if given[0] is None else "validation")
    if trained:
        pinned = {d for d, h in zip(digests, hashes, strict=True) if h in trained}
        splits[np.isin(digests, list(pinned))] = "train"
    return splits.astype(str)


def _one_split_each(splits: np.ndarray, labels: np.ndarray, digests: np.ndarray, drawn: np.ndarray,
                    floor: str) -> None:
    """One file filed under two classes is drawn class by class, so its copies can land in two splits: the `drawn`
    ones join the least held-out split of them, no less held out than `floor` (validation/ images stay held out),
    unless that would leave their class without a held-out split. Exact copies only: near copies across classes
    are mostly look-alikes, which the split needs not keep together."""
    names = ["train", "validation", "test"]
    least: dict[str, int] = {}
    for digest, split in zip(digests, splits, strict=True):
        least[digest] = min(least.get(digest, 2), names.index(split))
    moved = splits.copy()
    for i in np.flatnonzero(drawn):
        moved[i] = names[max(least[digests[i]], names.index(floor))]
    for i in np.flatnonzero(moved != splits):
        held = (labels == labels[i]) & (moved == splits[i])
        if splits[i] != "train" and not held.any():  # its class's last image there: it stays
            moved[i] = splits[i]
    splits[:] = moved


def _check_splittable(name: str, members: np.ndarray, digests: np.ndarray, needed: int, where: str,
                      purpose: str) -> None:
    """A class needs `needed` distinct units (copies of one photo, near copies too, count once) to split."""
    units = len(np.unique(digests[members]))
    if units >= needed:
        return
    if units < len(members):
        raise DataError(
            f"class {name!r} has {len(members)} usable image(s){where} but only {units} distinct one(s) once near "
            f"copies are kept together; at least {needed} are needed {purpose}; add different photos of it, or "
            "--set data.dedupe=false to split copies apart (its test images then include copies of training images)")
    raise DataError(f"class {name!r} has {len(members)} usable image(s){where}; at least {needed} are needed {purpose}")
