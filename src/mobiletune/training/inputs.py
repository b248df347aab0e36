"""What a run trains on: the images as a run of its config finds them (exclusions, failed decodes, near
copies kept in one split), their cached features, and the audit of them. A sweep's trials start here too."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from mobiletune import progress
from mobiletune.audit import checks as audit
from mobiletune.audit.run import write_findings
from mobiletune.config import Config
from mobiletune.data import folders as data
from mobiletune.data import scan
from mobiletune.data.images import ImageSet
from mobiletune.features import cache
from mobiletune.features import compute as features
from mobiletune.model.imagenet import top_for
from mobiletune.model.network import Classifier


def features_or_checked_images(classifier: Classifier, images: ImageSet, config: Config, index: scan.FileIndex,
                                console, fine_tune_ats: list[int] | None, seconds: dict[str, float] | None = None
                                ) -> tuple[features.Features | None, ImageSet, tuple | None]:
    """The cached features on the run's split (`run_features`, which times its steps into `seconds`), the images
    that decoded, and each image's nearest neighbours when data.dedupe looked for them; with --no-cache, no
    features, and every image decoded once up front so none fails mid-epoch."""
    clock = time.perf_counter()
    if not config.features.cache:
        with progress.bar(console, "checking images") as update:
            return None, data.check_decodable(images, config.data.image_size, config.data.batch_size, update), None
    with progress.bar(console, "features") as update:
        feats, near = run_features(classifier, images, config, index, fine_tune_ats, update, seconds)
    if console is not None:
        console.print(f"features: {feats.cached:,} cached, {feats.computed:,} computed"
                      + (f", {feats.failed} image(s) failed to decode" if feats.failed else "")
                      + f" ({config.features.views} views per training image; {feats.cache_bytes() / 2**20:,.0f} "
                      f"MB of cache, {time.perf_counter() - clock:.1f} s)")
    return feats, feats.images, near


def run_features(classifier: Classifier, images: ImageSet, config: Config, index: scan.FileIndex,
                 fine_tune_ats: list[int] | None = None, update=None, seconds: dict[str, float] | None = None
                 ) -> tuple[features.Features, tuple | None]:
    """The cached features (computing what is missing) on the split a run of `config` trains on: scanned again
    without the images that failed to decode, and with data.dedupe, with near copies regrouped into one split.
    Also each image's nearest neighbours when dedupe looked for them (`audit.nearest`, for the audit to reuse).
    A sweep's trials come here too, so a trial validates on the split its run in best/ tests on. `seconds`, when
    given, gets the time of the neighbour search ("neighbours") and of the duplicate check after it ("duplicates"),
    the steps that grow faster than N."""
    plain = config.data.audit != "none"  # the audit compares every image unaugmented
    computed = 0  # over every pass below: a later pass finds an earlier one's work cached
    near = None

    def compute(images: ImageSet) -> features.Features:
        nonlocal computed
        feats = features.compute_features(classifier, images, config, fine_tune_ats=fine_tune_ats, progress=update,
                                          file_index=index, plain=plain)
        computed += feats.computed
        return feats

    feats = compute(images)
    if feats.failed:  # now known to the index: scan again, so the split is the one any later run (--resume) makes
        feats = compute(scan_images(images.source or images.root, config, index))
    if config.data.dedupe and feats.pooled_plain is not None:  # near copies into one split, where it is ours
        clock = time.perf_counter()
        near, near_paths = audit.nearest(feats.pooled_plain), feats.images.paths
        searched = time.perf_counter()
        groups = audit.duplicate_groups(feats.images, audit.duplicates(feats.images, near, index=index))
        if seconds is not None:
            seconds.update(neighbours=searched - clock, duplicates=time.perf_counter() - searched)
        regrouped = scan_images(images.source or images.root, config, index, groups=groups) if groups else feats.images
        if list(regrouped.splits) != list(feats.images.splits):
            feats = compute(regrouped)
        if feats.images.paths != near_paths:  # a file went or came mid-run: `near` no longer lines up
            near = None
    feats.cached, feats.computed = max(0, feats.cached - (computed - feats.computed)), computed
    return feats, near


def audit_run(images: ImageSet, feats: features.Features | None, near: tuple | None, config: Config,
              classifier: Classifier, out: Path, say, index: scan.FileIndex | None = None) -> dict[str, Any] | None:
    """Duplicates and cross-split copies (and with data.audit=full, label errors and outliers): audit.csv and
    a line on the console. Needs the unaugmented features, so not with --no-cache. `classifier`: the run's,
    before training, whose base's own ImageNet top sharpens the off-topic score. `index`: the run's file index, so
    pairs the split's duplicate check matched are not matched again."""
    if feats is None or feats.pooled_plain is None:
        return None
    clock = time.perf_counter()
    full = config.data.audit == "full"
    top = top_for(config, classifier.base) if full else None
    findings = audit.run_audit(images, feats.pooled_plain, full=full, near=near, top=top, index=index)
    found, _ = write_findings(out, images, feats.pooled_plain, findings, top, page=full)  # the page: with --audit
    parts = [f"{found[i]} {i.replace('_', ' ')}(s)" for i in audit.ISSUES if found[i] or i in audit.ISSUES[:2]]
    say(f"audit: {', '.join(parts)}; {found['leaks']} cross train and validation/test" + (
        " (leaks: the test accuracy without them is reported too)" if found["leaks"] else "")
        + (f"; {found['across_classes']} filed under two classes" if found["across_classes"] else "")
        + f" ({time.perf_counter() - clock:.1f} s; audit.csv{' and audit.html' if full else ''})")
    return found


def audit_metrics(found: dict[str, Any] | None, images: ImageSet, before, after) -> dict[str, Any] | None:
    """The audit's counts and, where test images have a copy in train, accuracy on the test images without one."""
    if found is None:
        return None
    test = images.indices("test")
    leaked, test_paths = set(found["leaked_held_out"]), {images.paths[i] for i in test}
    clean = np.array([images.paths[i] not in leaked for i in test])
    labels = images.labels[test]
    return {**{k: v for k, v in found.items() if k != "leaked_held_out"},
            "leaked_test_images": sorted(leaked & test_paths),
            "test_without_leaks": {"images": int(clean.sum()),
                                   **{stage: float((probs[clean].argmax(1) == labels[clean]).mean()) if clean.any()
                                      else None for stage, probs in (("before", before), ("after", after))}}}


def file_index(config: Config) -> scan.FileIndex:
    """The digests index in the cache folder; with --no-cache nothing is written there, so in memory."""
    if not config.features.cache:
        return scan.FileIndex(None)
    root = cache.cache_root(config)
    return scan.FileIndex(root / scan.INDEX_NAME)


def scan_images(data_dir: str | Path, config: Config, index: scan.FileIndex, console=None,
                groups: dict[str, str] | None = None) -> ImageSet:
    """DATA_DIR's images as a run of `config` finds them: data.exclude left out, split by `groups` if given."""
    exclude = audit.read_exclusions(Path(config.data.exclude)) if config.data.exclude else None
    with progress.bar(console, "hashing new files") as update:
        images = data.load_images(data_dir, config.data, index, update, exclude, groups)
    if console is not None:
        files = len(images.paths) + sum(s.reason != data.JUNK_REASON and not s.reason.startswith(data.NO_SUCH_FILE)
                                        for s in images.skipped)
        console.print(f"scanned {files:,} files: {images.files_read:,} new or changed (hashed), the rest known")
    return images
