"""Cached frozen features: the same recipe without pushing the same images through the same
frozen layers every epoch.

Below `fine_tune_at` the base is frozen and in inference mode in both phases, so its output for
a given input is fixed. One forward pass per image view gives both
  - the pooled base output, all phase 1 trains on (the head), and
  - the activations that cross the `fine_tune_at` boundary, all phase 2 trains on (the top).
Training images get `features.views` seeded augmented views; each epoch draws one view per
image. Validation and test are computed once, unaugmented. Arrays live in a content-addressed
cache folder, memory-mapped, so later runs and sweep trials with the same key reuse them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from mobiletune import model as model_lib
from mobiletune.config import Config
from mobiletune.data import ImageSet
from mobiletune.errors import MobiletuneError

FORMAT_VERSION = 1  # bump when what is stored changes: old entries are then never matched


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mobiletune"


def cache_root(config: Config) -> Path:
    """The cache folder this config uses: `features.cache_dir`, or the default."""
    return Path(config.features.cache_dir or default_cache_dir())


# ---------------------------------------------------------------------------------------------
# Cutting the base at `fine_tune_at`


def boundary_tensors(base: keras.Model, fine_tune_at: int) -> list:
    """Tensors made by layers below `fine_tune_at` and used by layers at or above it.

    Usually one tensor, two where the cut falls inside a residual block (the skip path).
    """
    index = {id(layer): i for i, layer in enumerate(base.layers)}
    found: dict[int, Any] = {}
    for layer in base.layers[max(fine_tune_at, 1):]:
        # Node 0 is the base's own graph; later nodes come from sub-models built over it.
        for tensor in layer._inbound_nodes[0].arguments.keras_tensors:
            producer = tensor._keras_history.operation
            if index[id(producer)] < fine_tune_at:
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


def top_model(model: keras.Model, fine_tune_at: int) -> keras.Model:
    """Boundary activations -> logits through base layers >= fine_tune_at and the head (phase 2)."""
    base = model_lib.base_of(model)
    cut = boundary_tensors(base, fine_tune_at)
    inputs = [keras.Input(t.shape[1:], name=f"boundary_{i}") for i, t in enumerate(cut)]
    if len(cut) == 1:  # Keras wants a lone tensor, not a list of one
        cut, inputs = cut[0], inputs[0]
    x = keras.Model(cut, base.output, name="upper_base")(inputs)
    for name in ("pool", "dropout", "logits"):
        x = model.get_layer(name)(x)
    return keras.Model(inputs, x, name="top")


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


@dataclass
class CacheEntry:
    """One folder's arrays, memory-mapped: `views x images x feature` for each output of the extractor."""

    arrays: list[np.ndarray]
    hit: bool


def _load_arrays(path: Path) -> list[np.ndarray]:
    meta = json.loads((path / "meta.json").read_text())
    return [np.load(path / f"{i}.npy", mmap_mode="r") for i in range(meta["outputs"])]


def _compute_entry(folder: Path, key_parts: dict, compute) -> CacheEntry:
    """Return the cached entry for `key_parts`, or compute it and store it atomically."""
    path = folder / _key(**key_parts)
    if (path / "meta.json").exists():
        try:
            arrays = _load_arrays(path)
        except (OSError, ValueError, KeyError):
            shutil.rmtree(path, ignore_errors=True)  # damaged on disk or by hand: computed again below
        else:
            os.utime(path)  # last used, for `cache ls`
            return CacheEntry(arrays, hit=True)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-"))
    try:
        outputs = compute(tmp)
        meta = {**key_parts, "outputs": outputs, "created": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, path)
        except OSError:  # another process stored the same entry first: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CacheEntry(_load_arrays(path), hit=False)


def export_onnx(model: keras.Model, path: Path) -> None:
    """Keras' own ONNX export, without the FutureWarning its bundled tf2onnx shim prints."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "In the future `np.object`", FutureWarning)
        model.export(str(path), format="onnx", verbose=False)


class _OnnxRunner:
    """The extractor exported to ONNX and run by ONNX Runtime: about 1.9x TensorFlow's speed on
    this CPU for MobileNetV2's forward pass, the same numbers to ~1e-5 (benchmarks/).

    The export (~2.5 s) is cached at `path`, so a new data set, augmentation or seed with the same
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
        options.intra_op_num_threads = os.cpu_count() or 1
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        # One image per call: its activations stay in the CPU's caches. Measured on the 2-core
        # box: 924 img/s one at a time vs 682 img/s in batches of 32 (benchmarks/ notes).
        per_image = [self.session.run(None, {self.input: x[i : i + 1]}) for i in range(len(x))]
        return [np.concatenate(outputs) for outputs in zip(*per_image, strict=True)]


def _runner(extract: keras.Model, engine: str, onnx_path: Path):
    """`run(scaled pixels) -> [outputs]` on the chosen engine; built once per extractor."""
    import tensorflow as tf

    if engine == "onnxruntime":
        return _OnnxRunner(extract, onnx_path)
    forward = tf.function(lambda x: extract(x, training=False))
    return lambda x: [np.asarray(o) for o in forward(x)]


def _extract_views(run, augment, pixels: np.ndarray, views: int, batch: int, out: Path) -> int:
    """Run `extract` over `views` passes of `pixels`, through `augment` unless it is None.

    `augment` is a freshly built, seeded layer, so the draws depend only on the seed and this
    entry's own order. Writes one .npy per extractor output, [views, n, ...]; returns how many.
    """
    import tensorflow as tf

    @tf.function
    def prepare(x):  # augmentation in a graph, then the model's own Rescaling: [0, 255] -> [-1, 1]
        return (augment(x, training=True) if augment is not None else x) / 127.5 - 1

    files: list[np.ndarray] = []
    for view in range(views):
        for start in range(0, len(pixels), batch):
            x = prepare(tf.convert_to_tensor(pixels[start : start + batch], tf.float32)).numpy()
            outs = run(x)
            if not files:
                files = [
                    np.lib.format.open_memmap(out / f"{i}.npy", mode="w+", dtype=_store_dtype(i),
                                              shape=(views, len(pixels), *o.shape[1:]))
                    for i, o in enumerate(outs)
                ]
            for f, o in zip(files, outs, strict=True):
                f[view, start : start + len(o)] = o
    for f in files:
        f.flush()
    return len(files)


def _store_dtype(output_index: int) -> str:
    # Pooled features are small: kept exact. Boundary activations are large: float16 halves the
    # cache and the page-cache traffic; the rounding (~1e-3 relative) is far below augmentation noise.
    return "float32" if output_index == 0 else "float16"


@dataclass
class Features:
    """Cached arrays [views, n, ...] per split: the pooled base output and each boundary's activations."""

    splits: dict[str, list[np.ndarray]]  # split -> extractor outputs; output 0 is pooled
    boundaries: dict[int, list[int]]  # fine_tune_at -> indices of its outputs
    hits: int
    misses: int

    def pooled(self, split: str) -> list[np.ndarray]:
        return self.splits[split][:1]

    def boundary(self, split: str, fine_tune_at: int) -> list[np.ndarray]:
        return [self.splits[split][i] for i in self.boundaries[fine_tune_at]]


def compute_features(model: keras.Model, images: ImageSet, config: Config, cache_dir: Path | None = None,
                     fine_tune_ats: list[int] | None = None) -> Features:
    """Cached (or freshly computed) features of every split for the current recipe.

    `fine_tune_ats`: the boundaries to provide (default: the config's); a sweep asks for all of
    its choices at once, so every trial reuses one pass.
    """
    cache_dir = Path(cache_dir or cache_root(config))
    cuts = sorted(set(fine_tune_ats or [config.phase2.fine_tune_at]))
    extract, where = extractor(model, cuts)
    common = {
        "weights": weights_digest(model_lib.base_of(model)),
        "image_size": config.data.image_size,
        "alpha": config.model.alpha,
        "fine_tune_at": cuts,
        "engine": config.features.engine,  # engines agree to ~1e-5, not bit for bit
    }
    augmenting = bool(model.get_layer("augment").layers)
    runners: list = []  # built on the first miss only: a warm cache never converts the model

    def run(x: np.ndarray) -> list[np.ndarray]:
        if not runners:
            onnx_path = cache_dir / "onnx" / f"{_key(**common, keras=keras.__version__)}.onnx"
            runners.append(_runner(extract, config.features.engine, onnx_path))
        return runners[0](x)

    result: dict[str, list[np.ndarray]] = {}
    hits = misses = 0
    for split in ("train", "validation", "test"):
        idx = images.indices(split)
        train = split == "train"
        parts = {**common, "files": _digest_list([images.hashes[i] for i in idx])}
        if train:
            parts.update(views=config.features.views, seed=config.data.seed,
                         flip=config.augment.flip, rotation=config.augment.rotation)
        views = config.features.views if train else 1
        try:
            entry = _compute_entry(
                cache_dir / "features", parts,
                lambda tmp, idx=idx, views=views, train=train: _extract_views(
                    run, model_lib.build_augmentation(config) if train and augmenting else None,
                    images.pixels[idx], views, config.data.batch_size, tmp),
            )
        except OSError as exc:  # a full disk; a read-only cache_dir, or one that is a file
            raise MobiletuneError(
                f"features.cache_dir {cache_dir}: cannot write the feature cache ({exc.strerror or exc}); free "
                "space there, set features.cache_dir to a writable folder, or run with --no-cache") from None
        hits, misses = hits + entry.hit, misses + (not entry.hit)
        result[split] = entry.arrays
    return Features(result, where, hits, misses)


def _digest_list(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Feeding cached features to Keras


def feature_dataset(arrays: list[np.ndarray], labels: np.ndarray, batch_size: int, *, shuffle: bool, seed: int,
                    initial_epoch: int = 0, epochs: int = 1, in_memory: bool | None = None):
    """A tf.data pipeline of cached features: (float32 features, label) batches.

    `arrays` are [views, n, ...] each, in the order of the model's inputs. Shuffled: epochs
    `initial_epoch` .. `epochs - 1` back to back, epoch e in an order and with one view per image
    drawn from (seed, e) alone, so a resumed run sees exactly the batches an unbroken one would.
    `in_memory` (default: when they fit, see `fits_in_memory`) holds the arrays in RAM and gathers
    batches in the graph, ready while the previous step runs (a Python PyDataset cost ~1.3 s per
    phase-2 epoch); otherwise batches are read from the memory-mapped cache files, so features
    larger than memory still train, on the same batches.
    """
    import tensorflow as tf

    views, n = arrays[0].shape[:2]
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

    if fits_in_memory(arrays) if in_memory is None else in_memory:
        tensors = [tf.constant(np.asarray(a)) for a in arrays]

        def gather(rows, view):
            return [tf.gather_nd(t, tf.stack([view, rows], axis=1)) for t in tensors]
    else:
        def read(rows, view):
            return [np.asarray(a[view, rows]) for a in arrays]

        def gather(rows, view):
            xs = tf.numpy_function(read, [rows, view], [tf.as_dtype(a.dtype) for a in arrays], stateful=False)
            for x, a in zip(xs, arrays, strict=True):
                x.set_shape([None, *a.shape[2:]])
            return xs

    def load(rows, view):
        xs = tuple(tf.cast(x, tf.float32) for x in gather(rows, view))
        return (xs if len(xs) > 1 else xs[0]), tf.gather(y, rows)

    return batches.map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def fits_in_memory(arrays: list[np.ndarray], share: float = 0.5) -> bool:
    """Whether `arrays` take less than `share` of the memory the kernel says is available."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return True  # not Linux: no way to ask, keep the fast path
    return sum(a.nbytes for a in arrays) < share * available


# ---------------------------------------------------------------------------------------------
# Managing the cache


@dataclass(frozen=True)
class CacheInfo:
    key: str
    split_images: int
    views: int
    fine_tune_at: str  # the boundaries stored, e.g. "100" or "100,120,140"
    image_size: int
    megabytes: float
    last_used: float


def list_cache(cache_dir: Path | None = None) -> list[CacheInfo]:
    """Every complete entry of the feature cache, most recently used first."""
    folder = Path(cache_dir or default_cache_dir()) / "features"
    entries = []
    for meta_path in folder.glob("*/meta.json"):
        try:
            meta = json.loads(meta_path.read_text())
            first = np.load(meta_path.parent / "0.npy", mmap_mode="r")
        except (OSError, ValueError):
            continue  # damaged: the next run that needs it computes it again; `cache clear` removes it
        arrays = list(meta_path.parent.glob("*.npy"))
        entries.append(CacheInfo(
            key=meta_path.parent.name, split_images=first.shape[1], views=first.shape[0],
            fine_tune_at=",".join(map(str, meta["fine_tune_at"])), image_size=meta["image_size"],
            megabytes=sum(p.stat().st_size for p in arrays) / 2**20, last_used=meta_path.parent.stat().st_mtime))
    return sorted(entries, key=lambda e: -e.last_used)


def list_extractors(cache_dir: Path | None = None) -> list[Path]:
    """The cached ONNX exports of the frozen base (one per base, image size and boundary set)."""
    return sorted((Path(cache_dir or default_cache_dir()) / "onnx").glob("*.onnx"))


def clear_cache(cache_dir: Path | None = None) -> tuple[int, int]:
    """Delete every feature entry and exported extractor (and half-written leftovers); how many of each went."""
    root = Path(cache_dir or default_cache_dir())
    counts = len(list((root / "features").glob("*/meta.json"))), len(list_extractors(root))
    for folder in (root / "features", root / "onnx"):
        shutil.rmtree(folder, ignore_errors=True)
    return counts
