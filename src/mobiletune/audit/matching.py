"""Whether two images are one photo: ORB keypoints that match under one affine map (OpenCV).

The near-duplicate check's second opinion on pairs the pooled features leave in doubt. A copy cropped by a tenth a
side, halved and saved at JPEG 30 lies at 0.6-0.9 cosine from its original, where distinct photos of one breed or
species lie too. Its keypoints still land where the original's do under one affine map (crop, scale, stretch):
hundreds of them. Two photos of look-alike black cats share a couple of dozen at most.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from mobiletune.data.images import ImageSet
from mobiletune.data.pixels import BadImage, read_image
from mobiletune.data.scan import FileIndex

SIDE = 160  # pixels a side images are compared at (squared, as the features see them): 3 ms an image, 1 core
KEYPOINTS = 400  # ORB keypoints an image (13 KB of descriptors): halved copies of 500 x 375 photos keep 40-150
RATIO = 0.8  # Lowe's ratio test: a match counts only when clearly closer than the second-best candidate
TOLERANCE = 2.5  # pixels (at SIDE) a matched keypoint may land from where the fitted affine map puts it
# Matches under one map from which two images are one photo. Measured on each image's 2 nearest of both shared sets
# (5,063 pairs): distinct photos reached 15 (two tabbies, two black cats face-on: 12), the real copies 43-269. Of
# 150 copies a set, those cropped 8-10% a side, halved, JPEG 30 reached 20 in 97-100%; cropped up to 20% a side
# and stretched 99%; rotated up to 8 degrees 100%; cropped 12-18% a side to a third of the size at JPEG 20 77-82%.
SAME_PHOTO = 20
SETTINGS = f"orb{SIDE}/{KEYPOINTS}/{RATIO}/{TOLERANCE}/mirrored"  # what a recorded count was measured with
BLOCK = 4096  # images whose keypoints are held at once (~60 MB): memory does not grow with the folder

Keypoints = tuple[np.ndarray, np.ndarray]  # (positions float32 [k, 2], ORB descriptors uint8 [k, 32])


def same_photo(images: ImageSet, pairs: list[tuple[int, int]], progress: Callable[[int, int], None] | None = None,
               index: FileIndex | None = None) -> list[tuple[int, int, int]]:
    """Those of `pairs` (positions in `images`) that are one photo: (i, j, keypoints matched), in the order given.

    A pair that does not match as it is is tried again with one image mirrored (keypoints are not).
    Images that cannot be read match nothing. `progress(done, total)` counts images opened and pairs matched.
    `index`: where the counts of pairs matched before (by content) are read from and new ones recorded, so a grown
    folder matches only its new pairs.
    """
    ordered = {p: p if images.hashes[p[0]] <= images.hashes[p[1]] else (p[1], p[0]) for p in pairs}  # by content
    keys = {p: f"{images.hashes[a]}:{images.hashes[b]}:{SETTINGS}" for p, (a, b) in ordered.items()}
    counts = index.matched(keys.values()) if index is not None else {}
    todo = [p for p in pairs if keys[p] not in counts]
    computed = _counts(images, [ordered[p] for p in todo], progress)
    new = {keys[p]: n for p, n in zip(todo, computed, strict=True)}
    if index is not None and new:
        index.record_matched(new.items())
    counts.update(new)
    return [(i, j, counts[keys[(i, j)]]) for i, j in pairs if counts[keys[(i, j)]] >= SAME_PHOTO]


def _counts(images: ImageSet, pairs: list[tuple[int, int]], progress: Callable[[int, int], None] | None
            ) -> list[int]:
    """Keypoints matched of each pair, a block of images at a time."""
    blocks = _blocks(pairs)
    total, done = sum(len(b) + len(m) for b, m in blocks), 0
    counts: list[int] = []

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None and (done % 64 == 0 or done == total):
            progress(done, total)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:  # OpenCV and PIL work without the GIL
        for block, members in blocks:
            points: dict[int, Keypoints | None] = {}
            for i, keypoints in zip(members, pool.map(lambda i: _keypoints(images, i), members), strict=True):
                points[i] = keypoints
                step()
            for n in pool.map(partial(_count, points), block):
                step()
                counts.append(n)
    return counts


def _blocks(pairs: list[tuple[int, int]]) -> list[tuple[list[tuple[int, int]], list[int]]]:
    """`pairs` in runs of at most BLOCK images, each with its images (~j: j mirrored), so memory stays bounded."""
    blocks: list[tuple[list[tuple[int, int]], list[int]]] = []
    block: list[tuple[int, int]] = []
    members: set[int] = set()
    for i, j in pairs:
        needed = {i, j, ~j}
        if len(members) + len(needed - members) > BLOCK:
            blocks.append((block, sorted(members)))
            block, members = [], set()
        block.append((i, j))
        members |= needed
    return [*blocks, (block, sorted(members))] if block else blocks


def _count(points: dict[int, Keypoints | None], pair: tuple[int, int]) -> int:
    i, j = pair
    straight = _matches(points[i], points[j])
    return max(straight, _matches(points[i], points[~j])) if straight < SAME_PHOTO else straight


_local = threading.local()  # one ORB detector a thread: OpenCV's are not safe to share


def _keypoints(images: ImageSet, i: int) -> Keypoints | None:
    """Image i's keypoints; ~i (negative): image i mirrored."""
    import cv2

    try:
        pixels = read_image(images.root / images.paths[max(i, ~i)], SIDE, images.hashes[max(i, ~i)])
    except BadImage:
        return None
    if not hasattr(_local, "orb"):
        _local.orb = cv2.ORB_create(nfeatures=KEYPOINTS, fastThreshold=10)  # 10 (not 20): flat flower photos
    gray = cv2.cvtColor(pixels if i >= 0 else np.ascontiguousarray(pixels[:, ::-1]), cv2.COLOR_RGB2GRAY)
    found, descriptors = _local.orb.detectAndCompute(gray, None)
    if descriptors is None:
        return None
    return cv2.KeyPoint_convert(found).reshape(-1, 2), descriptors


def _matches(a: Keypoints | None, b: Keypoints | None) -> int:
    """How many of a's keypoints match one of b's (ratio test) where one affine map, fitted by RANSAC, puts them."""
    import cv2

    if a is None or b is None or min(len(a[1]), len(b[1])) < 2:
        return 0
    knn = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(a[1], b[1], k=2)
    good = [m[0] for m in knn if len(m) == 2 and m[0].distance < RATIO * m[1].distance]
    if len(good) < max(SAME_PHOTO, 3):
        return len(good)  # too few to be one photo, whatever the map
    cv2.setRNGSeed(0)  # this thread's RANSAC draws: the same pairs give the same counts on every run
    ours = a[0][[m.queryIdx for m in good]]
    theirs = b[0][[m.trainIdx for m in good]]
    _, inliers = cv2.estimateAffine2D(ours, theirs, method=cv2.RANSAC, ransacReprojThreshold=TOLERANCE)
    return 0 if inliers is None else int(inliers.sum())
