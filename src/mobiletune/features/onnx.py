"""The frozen pass on ONNX Runtime: the extractor exported to ONNX once per base, size and cut, and run one
image per core."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import keras
import numpy as np

from mobiletune import internals, quiet


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
            with internals.tf2onnx_passes_uncopied():
                _tf2onnx_export(model, path)
        except Exception:  # noqa: BLE001 - tf2onnx raises anything; Keras' own path decides
            model.export(str(path), format="onnx", verbose=False)


def _tf2onnx_export(model: keras.Model, path: Path) -> None:
    """What `model.export(format="onnx")` does on TensorFlow, without its SavedModel resource tracking."""
    import tensorflow as tf
    import tf2onnx

    internals.patch_tf2onnx()
    spec = [tf.TensorSpec((None, *x.shape[1:]), x.dtype, name=x.name) for x in model.inputs]
    forward = tf.function(lambda *x: model(x[0] if len(x) == 1 else list(x), training=False), input_signature=spec,
                          autograph=False)
    tf2onnx.convert.from_function(forward, input_signature=spec, output_path=str(path))


class OnnxRunner:
    """The extractor exported to ONNX and run by ONNX Runtime: about 1.9x TensorFlow's speed on
    this CPU for MobileNetV2's forward pass, the same numbers to ~1e-5 (benchmarks/).

    `model`: the exported file's bytes; `threads`: images run side by side (default: one per core). Every
    image runs alone on one thread, so a Ray actor with the same file gives the same numbers to the bit.
    """

    def __init__(self, model: bytes, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # parallel over images instead (__call__)
        self.model = model  # what a Ray actor loads the same session from
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.threads = threads or os.cpu_count() or 1

    @classmethod
    def for_extractor(cls, extract: keras.Model, path: Path) -> OnnxRunner:
        """A runner of `extract`, exported once to `path` (~1.3 s) and loaded from there after: a new data set,
        augmentation or seed with the same base, size and boundaries reuses it; a damaged file is exported again."""
        if path.exists():
            try:
                return cls(path.read_bytes())
            except Exception:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
                path.unlink()
        extract(np.zeros((1, *extract.input_shape[1:]), np.float32))  # Keras exports only a called model
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmp:
            export_onnx(extract, Path(tmp) / path.name)
            os.replace(Path(tmp) / path.name, path)  # whole or absent, even with workers racing
        return cls(path.read_bytes())

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        # One image per call (its activations stay in the core's caches), one call per core side by
        # side, each on one thread, so no call waits on another core. The 7,000 image views of the
        # cats-vs-dogs feature pass on the 2-core box, alternating in one process: 13.2-14.3 s vs
        # 16.8 s for one call at a time on 2 ORT threads (benchmarks/ort_threads.py: the calls alone).
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.threads) as pool:
            per_image = list(pool.map(lambda i: self.session.run(None, {self.input: x[i : i + 1]}), range(len(x))))
        return [np.concatenate(outputs) for outputs in zip(*per_image, strict=True)]

