"""`ImageSet`: the images of a run, their labels, splits and digests, and what was skipped and why."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

SPLITS = ("train", "validation", "test")
IMBALANCED = 3.0  # the largest class this many times the smallest in train: accuracy can hide the small one (40
# cats and 8 dogs: 80% test accuracy from a model that called every test image a cat)
FEW_TEST = 5  # fewer test images of a class than this: its recall is a coin or two


@dataclass(frozen=True)
class Skipped:
    path: str  # relative to DATA_DIR (or a labels CSV's folder), as users see it
    reason: str


@dataclass
class ImageSet:
    """The images of one run: where they are, their labels, split and content digests. No pixels:
    those are decoded when needed (`iter_pixels`, `pixel_dataset`), so memory does not grow with N."""

    root: Path  # DATA_DIR, or a labels CSV's folder; `paths` are relative to it
    classes: list[str]
    paths: list[str]  # relative to root
    labels: np.ndarray  # int32 class index per image
    splits: np.ndarray  # split name per image
    hashes: list[str]  # sha256 of each file's bytes
    skipped: list[Skipped] = field(default_factory=list)
    files_read: int = 0  # how many files the scan had to read (new or changed); the rest came from the index
    source: Path | None = None  # what was given: DATA_DIR or a labels CSV (None: `root`); scanned again from it

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

    def balance_note(self, weighted: bool) -> str | None:
        """What to read the results with, where the classes are imbalanced in train or few in test; None if not.
        `weighted`: the run weights its classes (data.class_weight=auto)."""
        train, test = (np.bincount(self.labels[self.indices(split)], minlength=len(self.classes))
                       for split in ("train", "test"))
        notes = []
        if train.min() and train.max() >= IMBALANCED * train.min():
            notes.append("the classes are imbalanced in train (" + ", ".join(f"{c} {n}" for c, n in zip(
                self.classes, train, strict=True)) + "): accuracy can hide a class the model misses; read the "
                "balanced accuracy and each class's recall" + (
                "" if weighted else " (--set data.class_weight=auto weights the classes by their counts)"))
        few = [c for c, n in zip(self.classes, test, strict=True) if n < FEW_TEST]
        if few:
            notes.append(f"{', '.join(few)}: fewer than {FEW_TEST} test images each, so per-class figures say little")
        return "; ".join(notes) or None

    def counts(self) -> dict[str, int]:
        return {s: int((self.splits == s).sum()) for s in SPLITS}

    def digest(self) -> str:
        """One sha256 for the run's data: every image's content, class and split, not where it lies."""
        lines = sorted(f"{h} {self.classes[c]} {s}\n" for h, c, s in zip(self.hashes, self.labels, self.splits,
                                                                     strict=True))
        return hashlib.sha256("".join(lines).encode()).hexdigest()

    def without(self, failed: dict[int, str]) -> ImageSet:
        """This set less the images at the `failed` positions, each recorded as skipped with its reason."""
        if not failed:
            return self
        keep = np.array([i for i in range(len(self.paths)) if i not in failed], dtype=np.int64)
        skipped = sorted([*self.skipped, *(Skipped(display_path(self.paths[i]), r) for i, r in failed.items())],
                         key=lambda s: s.path)
        return replace(self, paths=[self.paths[i] for i in keep], labels=self.labels[keep], splits=self.splits[keep],
                       hashes=[self.hashes[i] for i in keep], skipped=skipped)


def display_path(path: str) -> str:
    """A path as text that can always be printed and written to UTF-8 files."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")

