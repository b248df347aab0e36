"""`mobiletune audit DATA_DIR`: the audit of a folder on its own, without training: features from the
shared store, then audit.csv and audit.html (`write_findings`, which a run's audit writes too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mobiletune import runfolder
from mobiletune.audit.checks import read_exclusions, run_audit, summary, write_csv
from mobiletune.audit.scores import class_kinds
from mobiletune.data.manifest import write_skipped


def audit_folder(config, data_dir: str | Path, out: str | Path, *, overwrite: bool = False, console=None,
                 listing: str = "review", ray=None) -> dict[str, Any]:
    """`mobiletune audit`: every check on DATA_DIR, into OUT/audit.csv and OUT/audit.html; returns the summary.
    `listing`: which rows audit.csv holds besides the findings (`checks.run_audit`); `ray`: a Ray cluster's
    address (or `features.cluster.RayCluster`) to run the feature pass on.

    The features come from the feature store (computed once, shared with `train`), so an audit
    after a run, or a run after an audit, costs only the checks.
    """
    from mobiletune import progress
    from mobiletune.data import folders as data
    from mobiletune.data import scan
    from mobiletune.features import cache, cluster
    from mobiletune.features import compute as features
    from mobiletune.model.imagenet import top_for
    from mobiletune.model.network import create_model

    runfolder.check_out(out, overwrite=overwrite)
    runfolder.check_apart(out, data_dir)
    runfolder.make_folder(cache.cache_root(config), "features.cache_dir")
    index = scan.FileIndex(cache.cache_root(config) / scan.INDEX_NAME)
    exclude = read_exclusions(Path(config.data.exclude)) if config.data.exclude else None
    with progress.bar(console, "hashing new files") as update:
        images = data.load_images(data_dir, config.data, index, update, exclude)
    classifier = create_model(config, len(images.classes))
    with cluster.connected(ray), progress.bar(console, "features") as update:
        pooled, images = features.plain_pooled(classifier, images, config, progress=update, file_index=index)
    top = top_for(config, classifier.base)
    with progress.bar(console, "matching look-alike images") as update:
        findings = run_audit(images, pooled, listing=listing, top=top, progress=update, index=index)
    out = runfolder.prepare(out, overwrite=overwrite)
    found, kinds = write_findings(out, images, pooled, findings, top, page=True)
    write_skipped(images, out / runfolder.SKIPPED)  # with none, its header alone: no earlier audit's list stays
    return {**found, "kinds": kinds, "images": len(images.paths), "skipped": len(images.skipped), "out": str(out)}


def write_findings(out: Path, images, pooled, findings, top=None, *, page: bool) -> tuple[dict[str, Any], dict]:
    """OUT/audit.csv and, with `page`, OUT/audit.html (with each class's ImageNet kind, where `top` gives one);
    returns the summary and the kinds."""
    from mobiletune.audit.page import build_audit_page

    write_csv(findings, out / runfolder.AUDIT)
    found = summary(images, findings)
    kinds = {} if top is None else {images.classes[c]: kind.replace("_", " ")  # `pooled` may be StoredRows
                                    for c, kind in class_kinds(np.asarray(pooled), images.labels, top).items()}
    if page:
        build_audit_page(out, images.root, findings, found, kinds)
    return found, kinds
