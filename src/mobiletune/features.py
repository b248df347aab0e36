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

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from mobiletune import cache, kernels, quiet
from mobiletune import model as model_lib
from mobiletune import pixels as pixels_lib
from mobiletune import store as store_lib
from mobiletune.config import Config
from mobiletune.data import ImageSet
from mobiletune.errors import MobiletuneError
from mobiletune.store import RowReader

FORMAT_VERSION = 2  # bump when what is stored changes: old entries are then never matched


# ---------------------------------------------------------------------------------------------
# Cutting the base at `fine_tune_at`


def boundary_tensors(base: keras.Model, fine_tune_at: int) -> list:
    """Tensors made by layers below `fine_tune_at` and used by layers at or above it.

    Usually one tensor, two where the cut falls inside a residual block (the skip path).
    """
    made_by = model_lib.producers(base)
    found: dict[int, Any] = {}
    for layer in base.layers[max(fine_tune_at, 1):]:
        for tensor in model_lib.inputs_of(layer):
            if made_by[id(tensor)] < fine_tune_at:
                found.setdefault(id(tensor), tensor)
    return list(found.values()) or list(base.inputs)


def extractor(model: keras.Model, fine_tune_ats: list[int]) -> tuple[keras.Model, dict[int, list[int]]]:
    """Scaled pixels -> [pooled base output, *boundary activations]: one pass for both phases.

    Serves several `fine_tune_at` values at once (a sweep); returns the model and, for each
    value, which outputs are its boundary. A tensor shared by two boundaries is output once.
    """
    base = model_lib.base_of(model)
    outputs = [keras.layers.GlobalAveragePooling2D()(base.output)]
    where: dict[int, list[int]] = {}
    for k in fine_tune_ats:
        where[k] = []
        for tensor in boundary_tensors(base, k):
            if not any(tensor is o for o in outputs):
                outputs.append(tensor)
            where[k].append(next(i for i, o in enumerate(outputs) if o is tensor))
    return keras.Model(base.input, outputs), where


def head_model(model: keras.Model) -> keras.Model:
    """Pooled features -> logits, sharing the classifier's own head layers (phase 1)."""
    pooled = keras.Input(model.get_layer("pool").output.shape[1:], name="pooled")
    logits = model.get_layer("logits")(model.get_layer("dropout")(pooled))
    return keras.Model(pooled, logits, name="head")


def top_model(model: keras.Model, fine_tune_at: int, *, fast: bool = True, pooled: bool = False,
              head=None) -> keras.Model:
    """Boundary activations -> logits through base layers >= fine_tune_at and the head (phase 2): the
    classifier's own layers and weights, computed by faster kernels (`kernels.fast_clone`; `fast=False`
    runs Keras' own layers, for benchmarks/phase2.py to compare). `pooled`: [pooled base output, logits].
    `head`: base output -> logits in place of the classifier's own head (a trainee's, `trainees`)."""
    base = model_lib.base_of(model)
    cut = boundary_tensors(base, fine_tune_at)
    inputs = [keras.Input(t.shape[1:], name=f"boundary_{i}") for i, t in enumerate(cut)]
    if len(cut) == 1:  # Keras wants a lone tensor, not a list of one
        cut, inputs = cut[0], inputs[0]
    upper = keras.Model(cut, base.output, name="upper_base")
    x = (kernels.fast_clone(upper) if fast else upper)(inputs)
    if head is not None:
        assert not pooled, "a trainee's head gives logits only"
        return keras.Model(inputs, head(x), name="top")
    features = model.get_layer("pool")(x)
    logits = model.get_layer("logits")(model.get_layer("dropout")(features))
    return keras.Model(inputs, [features, logits] if pooled else logits, name="top")


# ---------------------------------------------------------------------------------------------
# The cache


def weights_digest(base: keras.Model) -> str:
    """sha256 of the base's weights as loaded: one key whatever file or download they came from."""
    digest = hashlib.sha256()
    for w in base.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    return digest.hexdigest()


def _key(**parts: Any) -> str:
    text = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def export_onnx(model: keras.Model, path: Path) -> None:
    """`model` as ONNX, the file Keras' own `model.export(format="onnx")` writes (same graph, same
    outputs to the bit) in half its time: 1.2-1.5 s against 2.3-2.6 s for the 160-px extractor, paid
    once per input size by a cold run or sweep (docs/benchmarks.md). Keras' export tracks every resource
    of the model for a SavedModel first (~0.6 s), and tf2onnx copies the whole graph, weights and all,
    before each of its ~40 optimizer passes so that a failing one can be skipped (~0.7 s). A failing
    pass then fails the export: it is tried again the careful way, Keras' own. Neither the FutureWarning
    of Keras' tf2onnx shim nor grappler's C++ log lines reach the console."""
    import warnings

    with warnings.catch_warnings(), quiet.native_output_muted(), quiet.tensorflow_info_muted():
        warnings.filterwarnings("ignore", "In the future `np.object`", FutureWarning)
        try:
            with _tf2onnx_passes_uncopied():
                _tf2onnx_export(model, path)
        except Exception:  # noqa: BLE001 - tf2onnx raises anything; Keras' own path decides
            model.export(str(path), format="onnx", verbose=False)


def _tf2onnx_export(model: keras.Model, path: Path) -> None:
    """What `model.export(format="onnx")` does on TensorFlow, without its SavedModel resource tracking."""
    import tensorflow as tf
    import tf2onnx
    from keras.src.export.tf2onnx_lib import patch_tf2onnx  # Keras' NumPy 2 fixes for tf2onnx, as its export

    patch_tf2onnx()
    spec = [tf.TensorSpec((None, *x.shape[1:]), x.dtype, name=x.name) for x in model.inputs]
    forward = tf.function(lambda *x: model(x[0] if len(x) == 1 else list(x), training=False), input_signature=spec,
                          autograph=False)
    tf2onnx.convert.from_function(forward, input_signature=spec, output_path=str(path))


@contextlib.contextmanager
def _tf2onnx_passes_uncopied() -> Iterator[None]:
    """tf2onnx's optimizer passes run on the graph itself, not each on a deep copy (`catch_errors=False`,
    which tf2onnx offers only through an environment variable that setting from a running process would
    race with TensorFlow's threads reading the environment)."""
    from tf2onnx import optimizer

    careful = optimizer.optimize_graph
    optimizer.optimize_graph = lambda graph, catch_errors=True, optimizers=None: careful(graph, False, optimizers)
    try:
        yield
    finally:
        optimizer.optimize_graph = careful


class _OnnxRunner:
    """The extractor exported to ONNX and run by ONNX Runtime: about 1.9x TensorFlow's speed on
    this CPU for MobileNetV2's forward pass, the same numbers to ~1e-5 (benchmarks/).

    The export (~1.3 s) is cached at `path`, so a new data set, augmentation or seed with the same
    base, size and boundaries reuses it; a damaged file there is exported again.
    """

    def __init__(self, extract: keras.Model, path: Path):
        if path.exists():
            try:
                self.session = self._session(path)
            except Exception:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
                path.unlink()
        if not path.exists():
            self._export(extract, path)
            self.session = self._session(path)
        self.input = self.session.get_inputs()[0].name

    @staticmethod
    def _export(extract: keras.Model, path: Path) -> None:
        extract(np.zeros((1, *extract.input_shape[1:]), np.float32))  # Keras exports only a called model
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmp:
            export_onnx(extract, Path(tmp) / path.name)
            os.replace(Path(tmp) / path.name, path)  # whole or absent, even with workers racing

    @staticmethod
    def _session(path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # parallel over images instead (__call__)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        # One image per call (its activations stay in the core's caches), one call per core side by
        # side, each on one thread, so no call waits on another core. The 7,000 image views of the
        # cats-vs-dogs feature pass on the 2-core box, alternating in one process: 13.2-14.3 s vs
        # 16.8 s for one call at a time on 2 ORT threads (benchmarks/ort_threads.py: the calls alone).
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            per_image = list(pool.map(lambda i: self.session.run(None, {self.input: x[i : i + 1]}), range(len(x))))
        return [np.concatenate(outputs) for outputs in zip(*per_image, strict=True)]


def _runner(extract: keras.Model, engine: str, onnx_path: Path):
    """`run(scaled pixels) -> [outputs]` on the chosen engine; built once per extractor."""
    import tensorflow as tf

    if engine == "onnxruntime":
        return _OnnxRunner(extract, onnx_path)
    forward = tf.function(lambda x: extract(x, training=False))
    return lambda x: [np.asarray(o) for o in forward(x)]


def _store_dtype(output_index: int) -> str:
    # Pooled features are small: kept exact. Boundary activations are large: float16 halves the
    # cache and the page-cache traffic; the rounding (~1e-3 relative) is far below augmentation noise.
    return "float32" if output_index == 0 else "float16"


def view_tag(config: Config, view: int | None) -> str:
    """What names a view in the store: "plain", or the augmentation settings, seed and view number."""
    if view is None:
        return "plain"
    a = config.augment
    return f"aug:{config.data.seed}:{a.flip}:{a.rotation!r}:{view}"


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
    pooled_plain: np.ndarray | None = None  # [n images, channels]: every image unaugmented (compute_features plain)

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


def compute_features(model: keras.Model, images: ImageSet, config: Config, cache_dir: Path | None = None,
                     fine_tune_ats: list[int] | None = None, progress=None, file_index=None,
                     plain: bool = False) -> Features:
    """Look up every split's features in the per-image store and compute only the missing items.

    `fine_tune_ats`: the boundaries to provide (default: the config's); a sweep asks for all of
    its choices at once, so every trial reuses one pass. `progress(done, total)` follows the
    computation. A file that fails to decode is left out (and remembered in `file_index`).
    `plain`: also the unaugmented view of the training images, in the same pass (each image is
    decoded once), so `Features.pooled_plain` holds every image's pooled features for the audit.
    """
    augmenting = bool(model.get_layer("augment").layers)
    needed = _needed(images, config, augmenting)
    items = [iv for split in needed.values() for iv in split]
    if plain:
        items += [(i, None) for i in images.indices("train").tolist()]
    store, where, computed, failed = _fill(model, images, config, items, cache_dir, fine_tune_ats, progress,
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
        used.update(store_lib.item_key(h, view_tag(config, None)) for h in kept.hashes)
    feats.cached = len(used) - computed
    try:
        cache.record_use(store.folder.parent.parent, kept, feats.cache_bytes(), store.folder.name)
    except OSError:
        pass  # only bookkeeping for `cache ls`
    return feats


def plain_pooled(model: keras.Model, images: ImageSet, config: Config, cache_dir: Path | None = None,
                 progress=None, file_index=None) -> tuple[np.ndarray, ImageSet]:
    """The unaugmented pooled base output of every image, [n, channels] float32, in image order, and the
    images that decoded: what the audit compares. Items come from (and go to) the run's own store."""
    store, _, _, failed = _fill(model, images, config, [(i, None) for i in range(len(images.paths))], cache_dir,
                                None, progress, file_index)
    kept = images.without(failed)
    return _pooled_plain(store, kept, config), kept


def _pooled_plain(store: store_lib.FeatureStore, images: ImageSet, config: Config) -> np.ndarray:
    """The pooled output (output 0) of every image's plain view, in image order, as float32."""
    reader = store.reader([store_lib.item_key(h, view_tag(config, None)) for h in images.hashes])
    return reader.read(np.arange(len(reader)), [0], dtype="float32")[0]


def _fill(model: keras.Model, images: ImageSet, config: Config, items: list[tuple[int, int | None]],
          cache_dir: Path | None, fine_tune_ats: list[int] | None, progress, file_index
          ) -> tuple[store_lib.FeatureStore, dict[int, list[int]], int, dict[int, str]]:
    """Compute the (image position, view) `items` missing from the store of this extractor.

    Returns the store, which outputs each boundary is, how many items were computed, and
    {position: reason} of the images that failed to decode.
    """
    cache_dir = Path(cache_dir or cache.cache_root(config))
    fine_tune_ats = sorted(set(fine_tune_ats or [config.phase2.fine_tune_at]))
    extract, where = extractor(model, fine_tune_ats)
    common = {
        "weights": weights_digest(model_lib.base_of(model)),
        "image_size": config.data.image_size,
        "alpha": config.model.alpha,
        "fine_tune_at": fine_tune_ats,
        "engine": config.features.engine,  # engines agree to ~1e-5, not bit for bit
    }
    outputs = [(tuple(o.shape[1:]), _store_dtype(k)) for k, o in enumerate(extract.outputs)]
    item_of = {store_lib.item_key(images.hashes[i], view_tag(config, v)): (i, v) for i, v in items}
    failed: dict[int, str] = {}
    try:
        store = store_lib.FeatureStore(cache_dir / "features" / _key(**common), outputs)
        if not (store.folder / "key.json").exists():
            store_lib.write_atomic(store.folder / "key.json", json.dumps(common).encode())
        # image-major, so a shard holds all the views of its images and each image is decoded once
        todo = sorted(store.missing(list(item_of)),
                      key=lambda k: (item_of[k][0], -1 if item_of[k][1] is None else item_of[k][1]))
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            if progress:
                progress(done[0], len(todo))

        compute = _Computer(extract, config, images, item_of, failed,
                            cache_dir / "onnx" / f"{_key(**common, keras=keras.__version__)}.onnx")
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


class _Computer:
    """Computes a chunk of store items: decode (threads), augment (per-image draws), extract, write."""

    def __init__(self, extract, config: Config, images: ImageSet, item_of: dict, failed: dict[int, str],
                 onnx_path: Path):
        self.extract, self.config, self.images, self.item_of = extract, config, images, item_of
        self.failed, self.onnx_path = failed, onnx_path
        self.run = self.augment = None  # built on the first miss only: a warm cache never converts the model

    def __call__(self, chunk: list[bytes], folder: Path, heartbeat) -> set[bytes]:
        if self.run is None:
            self.run = _runner(self.extract, self.config.features.engine, self.onnx_path)
            self.augment = model_lib.view_augmenter(self.config.augment.flip, self.config.augment.rotation)
        rows = {k: r for r, k in enumerate(chunk)}
        files = [np.lib.format.open_memmap(folder / f"{k}.npy", mode="w+", dtype=_store_dtype(k),
                                           shape=(len(chunk), *o.shape[1:]))
                 for k, o in enumerate(self.extract.outputs)]
        wanted: dict[int, list[tuple[int | None, bytes]]] = {}  # image position -> its (view, key) in the chunk
        for k in chunk:
            position, view = self.item_of[k]
            wanted.setdefault(position, []).append((view, k))
        bad: set[bytes] = set()
        # each image decoded once, however many of its views the chunk holds (chunks are image-major)
        batches = pixels_lib.iter_pixels(self.images, np.array(sorted(wanted)), self.config.data.image_size,
                                         self.config.data.batch_size)
        for done, pixels, broken in batches:
            for i, reason in broken.items():
                self.failed[i] = reason
                bad.update(k for _, k in wanted[i])
            for view in sorted({v for i in done.tolist() for v, _ in wanted[i]}, key=lambda v: -1 if v is None else v):
                pick = [(j, k) for j, i in enumerate(done.tolist()) for v, k in wanted[i] if v == view]
                outs = self._extract(pixels[[j for j, _ in pick]], [self.images.hashes[done[j]] for j, _ in pick], view)
                at = [rows[k] for _, k in pick]
                for f, o in zip(files, outs, strict=True):
                    f[at] = o
            heartbeat()
        for f in files:
            f.flush()
        del files
        return bad

    def _extract(self, pixels: np.ndarray, digests: list[str], view: int | None) -> list[np.ndarray]:
        """Augment (the images' own draws for `view`; none for plain), scale as the model does, extract."""
        x = pixels.astype(np.float32)
        if view is not None:
            x = self.augment(x, *model_lib.view_draws(self.config, digests, view))
        return self.run(x / np.float32(127.5) - np.float32(1))  # the model's Rescaling: [0, 255] -> [-1, 1]


# ---------------------------------------------------------------------------------------------
# Feeding cached features to Keras


def feature_dataset(reader: RowReader, outputs: list[int], labels: np.ndarray, views: int, batch_size: int, *,
                    shuffle: bool, seed: int, initial_epoch: int = 0, epochs: int = 1):
    """A tf.data pipeline of cached features: (float32 features, label) batches, read from the store.

    `reader` holds [views x n] rows (view v of image i at v*n + i); `outputs` are the extractor
    outputs the trainee takes, in its input order. Shuffled: epochs `initial_epoch` .. `epochs - 1`
    back to back, epoch e in an order and with one view per image drawn from (seed, e) alone, so a
    resumed run sees exactly the batches an unbroken one would, whatever the store's layout.
    Batches are read with pread in parallel map calls, a few batches ahead: memory stays flat
    however large the store.
    """
    import tensorflow as tf

    n = len(labels)
    y = tf.constant(labels)
    seed64 = tf.constant(seed, tf.int64)

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=tf.stack([seed64, epoch]))
        view = tf.random.stateless_uniform([n], seed=tf.stack([seed64, -1 - epoch]), maxval=views, dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices((order, view)).batch(batch_size)

    if shuffle:
        batches = tf.data.Dataset.range(initial_epoch, epochs).flat_map(epoch_batches)
    else:
        batches = tf.data.Dataset.from_tensor_slices(
            (tf.range(n, dtype=tf.int64), tf.zeros(n, tf.int64))).batch(batch_size)
    def read(rows, view):
        return reader.read(view * n + rows, outputs)

    stored = [tf.as_dtype(reader.dtypes[k]) for k in outputs]

    def load(rows, view):
        xs = tf.numpy_function(read, [rows, view], stored, stateful=False)
        # float16 activations widen here, in the tf.data graph: 7x faster than NumPy's astype, which cost
        # ~8% of a 2-core phase-2 epoch. Cast first: any other op on a float16 tensor (ensure_shape
        # included) makes oneDNN log "supports DT_HALF only on ..." to the console
        xs = tuple(tf.ensure_shape(tf.cast(x, tf.float32), [None, *reader.shapes[k]])
                   for x, k in zip(xs, outputs, strict=True))
        return (xs if len(xs) > 1 else xs[0]), tf.gather(y, rows)

    return pixels_lib.prefetched(batches, load)
