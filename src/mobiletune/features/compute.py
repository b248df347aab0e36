"""Cached frozen features: the same recipe without pushing the same images through the same
frozen layers every epoch.

Below `fine_tune_at` the base is frozen and in inference mode in both phases, so its output for
a given input is fixed. One forward pass per image view gives both
  - the pooled base output, all phase 1 trains on (the head), and
  - the activations that cross the `fine_tune_at` boundary, all phase 2 trains on (the top).
Training images get `features.views` augmented views, each drawn from (seed, image hash, view);
each epoch draws one view per image. Validation and test are computed once, unaugmented. Every
view of every image is an item of the per-image store (`store`), so later runs, sweep trials,
grown folders and new splits compute only the items that are not there yet.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from mobiletune import runfolder
from mobiletune.config import Config
from mobiletune.data import pixels as pixels_lib
from mobiletune.data.images import ImageSet
from mobiletune.errors import MobiletuneError, UsageError
from mobiletune.features import cache
from mobiletune.features import cluster as cluster_lib
from mobiletune.features import store as store_lib
from mobiletune.features.onnx import OnnxRunner
from mobiletune.features.store import RowReader
from mobiletune.features.views import ShardRows, ViewPass, store_dtype
from mobiletune.model.cut import extractor, weights_digest
from mobiletune.model.network import Classifier

FORMAT_VERSION = 2  # bump when what is stored changes: old entries are then never matched


def _key(**parts: Any) -> str:
    text = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _runner(extract: keras.Model, engine: str, onnx_path: Path):
    """`run(scaled pixels) -> [outputs]` on the chosen engine; built once per extractor."""
    import tensorflow as tf

    if engine == "onnxruntime":
        return OnnxRunner.for_extractor(extract, onnx_path)
    forward = tf.function(lambda x: extract(x, training=False))
    return lambda x: [np.asarray(o) for o in forward(x)]


def view_tag(config: Config, view: int | None) -> str:
    """What names a view in the store: "plain", or the augmentation settings, seed and view number."""
    if view is None:
        return "plain"
    a = config.augment
    return f"aug:{config.data.seed}:{a.flip}:{a.rotation!r}:{view}"


def plain_keys(hashes: list[str], config: Config) -> list[bytes]:
    """The store's keys of these images' unaugmented (plain) view."""
    return [store_lib.item_key(h, view_tag(config, None)) for h in hashes]


@dataclass
class Features:
    """Where each split's cached features are: one reader per split over [views x images] rows
    (row v*n + i is view v of image i; validation and test have the one plain view).

    `images` is the run's image set less any file that failed to decode during the pass.
    """

    images: ImageSet
    readers: dict[str, RowReader]
    views: dict[str, int]
    boundaries: dict[int, list[int]]  # fine_tune_at -> indices of its outputs; output 0 is pooled
    computed: int  # item (image view) counts of this run
    cached: int
    failed: int
    # [n images, channels]: every image unaugmented (compute_features plain), read from the store as it is used
    pooled_plain: store_lib.StoredRows | None = None

    def cache_bytes(self) -> int:
        return sum(r.nbytes() for r in self.readers.values())


def _needed(images: ImageSet, config: Config, augmenting: bool) -> dict[str, list[tuple[int, int | None]]]:
    """(image position, view or None for plain) per split, view-major, in reading order."""
    out = {}
    for split in ("train", "validation", "test"):
        idx = images.indices(split).tolist()
        # with nothing to augment, every training view is the plain image (one item, read `views` times)
        views = [v if augmenting else None for v in range(config.features.views)] if split == "train" else [None]
        out[split] = [(i, v) for v in views for i in idx]
    return out


def compute_features(classifier: Classifier, images: ImageSet, config: Config, cache_dir: Path | None = None,
                     fine_tune_ats: list[int] | None = None, progress=None, file_index=None,
                     plain: bool = False) -> Features:
    """Look up every split's features in the per-image store and compute only the missing items.

    `fine_tune_ats`: the boundaries to provide (default: the config's); a sweep asks for all of
    its choices at once, so every trial reuses one pass. `progress(done, total)` follows the
    computation. A file that fails to decode is left out (and remembered in `file_index`).
    `plain`: also the unaugmented view of the training images, in the same pass (each image is
    decoded once), so `Features.pooled_plain` holds every image's pooled features for the audit.
    """
    augmenting = classifier.augmenting
    needed = _needed(images, config, augmenting)
    items = [iv for split in needed.values() for iv in split]
    if plain:
        items += [(i, None) for i in images.indices("train").tolist()]
    store, where, computed, failed = _fill(classifier, images, config, items, cache_dir, fine_tune_ats, progress,
                                           file_index)
    kept = images.without(failed)
    readers, views, used = {}, {}, set()
    for split, wanted in _needed(kept, config, augmenting).items():
        keys = [store_lib.item_key(kept.hashes[i], view_tag(config, v)) for i, v in wanted]
        readers[split], views[split] = store.reader(keys), config.features.views if split == "train" else 1
        used.update(keys)
    feats = Features(kept, readers, views, where, computed=computed, cached=0, failed=len(failed))
    if plain:
        feats.pooled_plain = _pooled_plain(store, kept, config)
        used.update(plain_keys(kept.hashes, config))
    feats.cached = len(used) - computed
    try:
        cache.record_use(store.folder.parent.parent, kept, feats.cache_bytes(), store.folder.name)
    except OSError:
        pass  # only bookkeeping for `cache ls`
    return feats


def plain_pooled(classifier: Classifier, images: ImageSet, config: Config, cache_dir: Path | None = None,
                 progress=None, file_index=None) -> tuple[np.ndarray, ImageSet]:
    """The unaugmented pooled base output of every image, [n, channels] float32, in image order, and the
    images that decoded: what the audit compares. Items come from (and go to) the run's own store."""
    store, _, _, failed = _fill(classifier, images, config, [(i, None) for i in range(len(images.paths))], cache_dir,
                                None, progress, file_index)
    kept = images.without(failed)
    return np.asarray(_pooled_plain(store, kept, config)), kept


def _pooled_plain(store: store_lib.FeatureStore, images: ImageSet, config: Config) -> store_lib.StoredRows:
    """The pooled output (output 0) of every image's plain view, in image order, as float32."""
    return store_lib.StoredRows(store.reader(plain_keys(images.hashes, config)), 0)


def _fill(classifier: Classifier, images: ImageSet, config: Config, items: list[tuple[int, int | None]],
          cache_dir: Path | None, fine_tune_ats: list[int] | None, progress, file_index
          ) -> tuple[store_lib.FeatureStore, dict[int, list[int]], int, dict[int, str]]:
    """Compute the (image position, view) `items` missing from the store of this extractor.

    Returns the store, which outputs each boundary is, how many items were computed, and
    {position: reason} of the images that failed to decode.
    """
    cache_dir = Path(cache_dir or cache.cache_root(config))
    fine_tune_ats = sorted(set(fine_tune_ats or [config.phase2.fine_tune_at]))
    extract, where = extractor(classifier, fine_tune_ats)
    common = {
        "weights": weights_digest(classifier.base),
        "image_size": config.data.image_size,
        "alpha": config.model.alpha,
        "fine_tune_at": fine_tune_ats,
        "engine": config.features.engine,  # engines agree to ~1e-5, not bit for bit
    }
    outputs = [(tuple(o.shape[1:]), store_dtype(k)) for k, o in enumerate(extract.outputs)]
    item_of = {store_lib.item_key(images.hashes[i], view_tag(config, v)): (i, v) for i, v in items}
    failed: dict[int, str] = {}
    try:
        store = store_lib.FeatureStore(cache_dir / "features" / _key(**common), outputs)
        if not (store.folder / "key.json").exists():
            runfolder.atomic_write_bytes(store.folder / "key.json", json.dumps(common).encode())
        # image-major, so a shard holds all the views of its images and each image is decoded once
        todo = sorted(store.missing(list(item_of)),
                      key=lambda k: (item_of[k][0], -1 if item_of[k][1] is None else item_of[k][1]))
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            if progress:
                progress(done[0], len(todo))

        onnx_path = cache_dir / "onnx" / f"{_key(**common, keras=keras.__version__)}.onnx"
        with _computer(extract, config, images, item_of, failed, onnx_path, bool(todo)) as compute:
            computed, _ = store.fill(todo, compute, advance)
    except OSError as exc:  # a full disk; a read-only cache_dir, or one that is a file
        raise MobiletuneError(
            f"features.cache_dir {cache_dir}: cannot write the feature cache ({exc.strerror or exc}); free "
            "space there, set features.cache_dir to a writable folder, or run with --no-cache") from None
    if file_index is not None:
        for i, reason in failed.items():
            if reason == pixels_lib.CHANGED:
                file_index.forget(images.root / images.paths[i])  # hashed again, with its new content, next scan
            else:
                file_index.mark_bad(images.hashes[i], reason)  # later scans skip it without decoding
    return store, where, computed, failed


@contextmanager
def _computer(extract, config: Config, images: ImageSet, item_of: dict, failed: dict[int, str], onnx_path: Path,
              missing: bool) -> Iterator[Callable]:
    """What computes the missing items: this process, or the Ray cluster connected (`cluster.connected`), whose
    actors are stopped after the pass."""
    cluster = cluster_lib.active()
    if cluster is None or not missing:
        yield _Computer(extract, config, images, item_of, failed, onnx_path)
        return
    if config.features.engine != "onnxruntime":
        raise UsageError(f"features.engine={config.features.engine}: --ray runs the frozen pass on ONNX Runtime; "
                         "drop the setting (onnxruntime is the default)")
    model = OnnxRunner.for_extractor(extract, onnx_path).model
    compute = cluster_lib.ClusterComputer(cluster, extract, config, images, item_of, failed, model)
    try:
        yield compute
    finally:
        compute.close()


class _Computer:
    """Computes a chunk of store items in this process: decode (threads), augment (per-image draws), extract,
    write. With a Ray cluster connected, `cluster.ClusterComputer` does the same on the cluster's actors."""

    def __init__(self, extract, config: Config, images: ImageSet, item_of: dict, failed: dict[int, str],
                 onnx_path: Path):
        self.extract, self.config, self.images, self.item_of = extract, config, images, item_of
        self.failed, self.onnx_path = failed, onnx_path
        self.views = None  # built on the first miss only: a warm cache never converts the model

    def __call__(self, chunk: list[bytes], folder: Path, heartbeat) -> set[bytes]:
        if self.views is None:
            self.views = ViewPass(_runner(self.extract, self.config.features.engine, self.onnx_path), self.config)
        shard = ShardRows(folder, self.extract, chunk, self.item_of, self.failed)
        batches = pixels_lib.iter_pixels(self.images, np.array(list(shard.wanted)), self.config.data.image_size,
                                         self.config.data.batch_size)
        for done, pixels, broken in batches:
            for i, reason in broken.items():
                shard.fail(i, reason)
            done = done.tolist()
            views = [[v for v, _ in shard.wanted[i]] for i in done]
            shard.write(done, self.views(pixels, [self.images.hashes[i] for i in done], views))
            heartbeat()
        return shard.close()
