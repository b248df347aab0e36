"""Ship it: export a run's model to .keras, SavedModel, TFLite (float, fp16, int8) and ONNX, and
re-test every export with its own runtime on the run's test set.

Every export takes raw RGB pixels 0-255 at the trained size, [n, size, size, 3], and returns
class probabilities [n, classes]; `labels.txt` beside it names the classes. An export whose
accuracy falls more than `max_drop` points below the Keras model's fails the command, after
the table in `export/report.md` has been written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from mobiletune import quiet, runfolder
from mobiletune.config import load_config
from mobiletune.data import folders as data
from mobiletune.data import pixels
from mobiletune.data.images import ImageSet
from mobiletune.data.manifest import read_manifest
from mobiletune.errors import ExportError, UsageError
from mobiletune.features.onnx import export_onnx
from mobiletune.model import network as model_lib
from mobiletune.model.network import Classifier
from mobiletune.report.model_card import write_model_card
from mobiletune.ship.predict import KerasPredictor, load_predictor, predict_all

FORMATS = ("keras", "savedmodel", "tflite", "tflite-fp16", "tflite-int8", "onnx")
FILE_NAMES = {"keras": "model.keras", "savedmodel": "savedmodel", "tflite": "model.tflite",
              "tflite-fp16": "model_fp16.tflite", "tflite-int8": "model_int8.tflite", "onnx": "model.onnx"}
REPRESENTATIVE_IMAGES = 200  # int8 calibration: enough training images to pin activation ranges


# ---------------------------------------------------------------------------------------------
# Converters


def _tflite(savedmodel: Path, variant: str, representative: np.ndarray | None, int8_io: bool) -> bytes:
    import tensorflow as tf

    return _convert(tf.lite.TFLiteConverter.from_saved_model(str(savedmodel)), variant, representative, int8_io)


def serving_function(classifier: Classifier):
    """The serving model (`Classifier.serving_model`) traced for any batch size, for `tflite_for_timing`."""
    import tensorflow as tf

    serving = classifier.serving_model()
    return tf.function(serving).get_concrete_function(
        tf.TensorSpec([None, *serving.input_shape[1:]], tf.float32, name="pixels"))


def tflite_for_timing(function, variant: str, representative: np.ndarray | None) -> bytes:
    """The TFLite model `export_formats` writes for `variant` ("tflite" or "tflite-int8", without
    `int8_io`), op for op, without its signature: converted from `serving_function`'s graph frozen in
    memory, not from a SavedModel written to disk and read back: float 1.1 s and int8 1.6 s at 160 px
    against ~13 s for both the old way (docs/benchmarks.md), paid for each input size a sweep times.
    Timing depends on the ops alone (tests compare both models' ops); shipped files keep the SavedModel
    path, whose `serving_default` signature LiteRT's signature runners look up."""
    import tensorflow as tf

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # "providing without the trackable_obj argument is deprecated": on purpose
    try:
        with warnings.catch_warnings(), quiet.native_output_muted():
            warnings.simplefilter("ignore")  # "statistics for quantized inputs were expected": calibrated instead
            return _convert(tf.lite.TFLiteConverter.from_concrete_functions([function]), variant, representative,
                            int8_io=False)
    finally:
        absl.setLevel(level)


def first_line(exc: BaseException) -> str:
    """A converter's error in one line: its message's first line, or its type when it has none."""
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


def _convert(converter, variant: str, representative: np.ndarray | None, int8_io: bool) -> bytes:
    import tensorflow as tf

    if variant == "tflite-fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "tflite-int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x[None].astype(np.float32)] for x in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:  # uint8 pixels in, uint8 probabilities out: for integer-only accelerators
            converter.inference_input_type = tf.uint8
            converter.inference_output_type = tf.uint8
    return converter.convert()


def _onnx_with_labels(serving: keras.Model, path: Path, classes: list[str]) -> None:
    import onnx

    export_onnx(serving, path)
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"classes": "\n".join(classes), "producer": "mobiletune"})
    onnx.save(proto, str(path))


def export_formats(classifier: Classifier, formats: list[str], out: Path, classes: list[str],
                   representative: np.ndarray | None, int8_io: bool = False) -> dict[str, Path]:
    """Write each format into `out`; returns format -> path."""
    with quiet.native_output_muted(), quiet.tensorflow_info_muted():  # the converters' log lines
        return _export_formats(classifier, formats, out, classes, representative, int8_io)


def _export_formats(classifier: Classifier, formats: list[str], out: Path, classes: list[str],
                    representative: np.ndarray | None, int8_io: bool) -> dict[str, Path]:
    serving = classifier.serving_model()
    serving(np.zeros((1, *serving.input_shape[1:]), np.float32))  # exports need a model that has run
    paths: dict[str, Path] = {}
    scratch = Path(tempfile.mkdtemp(prefix="mobiletune-export-"))
    try:
        savedmodel = out / FILE_NAMES["savedmodel"] if "savedmodel" in formats else scratch / "savedmodel"
        if any(f == "savedmodel" or f.startswith("tflite") for f in formats):
            shutil.rmtree(savedmodel, ignore_errors=True)
            serving.export(str(savedmodel), format="tf_saved_model", verbose=False)
        for fmt in formats:
            path = out / FILE_NAMES[fmt]
            try:
                if fmt == "keras":
                    runfolder.save_model(path, serving)
                elif fmt.startswith("tflite"):
                    runfolder.atomic_write_bytes(path, _tflite(savedmodel, fmt, representative, int8_io))
                elif fmt == "onnx":
                    _onnx_with_labels(serving, path, classes)
            except Exception as exc:  # noqa: BLE001 - converters raise anything; name the format
                raise ExportError(f"export {fmt}: conversion failed ({first_line(exc)})") from None
            paths[fmt] = path
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    runfolder.write_text(out / runfolder.LABELS, "\n".join(classes) + "\n")
    return paths


# ---------------------------------------------------------------------------------------------
# Re-testing


@dataclass
class Check:
    format: str
    accuracy: float
    agreement: float  # share of images with the same top-1 class as the Keras model
    max_abs_diff: float  # largest probability difference from the Keras model
    megabytes: float
    ms_per_image: float  # batch 1, median


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def latency_of(predictor, image: np.ndarray, repeats: int = 20) -> float:
    """Median milliseconds of `predictor` on one image (batch 1), after a warm-up run."""
    predictor.predict(image[None])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        predictor.predict(image[None])
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def check_exports(paths: dict[str, Path], images: ImageSet, reference: np.ndarray,
                  batch: int = 32) -> list[Check]:
    """Load each export in its own runtime and score it against the labels and the Keras model."""
    checks = []
    for fmt, path in paths.items():
        predictor = load_predictor(path)
        probs = predict_all(predictor, images, batch)
        checks.append(Check(
            format=fmt,
            accuracy=float((probs.argmax(1) == images.labels).mean()),
            agreement=float((probs.argmax(1) == reference.argmax(1)).mean()),
            max_abs_diff=float(np.abs(probs - reference).max()),
            megabytes=_size_mb(path),
            ms_per_image=latency_of(predictor, next(pixels.eval_batches(images, predictor.size, 1))[0][0]),
        ))
    return checks


def report_markdown(checks: list[Check], keras_accuracy: float, n: int, max_drop: float) -> str:
    lines = [
        f"# Exports, re-tested on the run's test set ({n} images)",
        "",
        f"Keras model: accuracy {keras_accuracy:.2%}. An export fails when its accuracy is more than "
        f"{max_drop:g} point(s) lower.",
        "",
        "| format | accuracy | agreement with Keras | max abs prob diff | size MB | ms/image (batch 1) | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        ok = "yes" if 100 * (keras_accuracy - c.accuracy) <= max_drop else "NO"
        lines.append(f"| {c.format} | {c.accuracy:.2%} | {c.agreement:.2%} | {c.max_abs_diff:.2e} | "
                     f"{c.megabytes:.2f} | {c.ms_per_image:.2f} | {ok} |")
    return "\n".join(lines) + "\n"


def export_run(run: str | Path, formats: list[str], out: str | Path | None = None, *, max_drop: float = 1.0,
               int8_io: bool = False) -> dict[str, Any]:
    """Export a finished run, re-test every format, write the report; raise if one lost accuracy."""
    run = Path(run)
    if not 0 <= max_drop <= 100:
        raise UsageError(f"--max-drop {max_drop:g}: give accuracy points between 0 and 100 (default 1)")
    unknown = [f for f in formats if f not in FORMATS and f != "all"]
    if unknown:
        raise UsageError(f"--format {', '.join(unknown)}: unknown; choose from {', '.join(FORMATS)} or all")
    formats = list(FORMATS) if "all" in formats else list(dict.fromkeys(formats))
    metrics = runfolder.read_metrics(run)
    config = load_config(run / runfolder.CONFIG)
    out = runfolder.make_folder(Path(out) if out else run / "export")
    classifier = Classifier(model_lib.load_model(run / runfolder.MODEL))
    images = data.load_test_images(run, None, config.data)
    train = _representative(run, metrics, config) if "tflite-int8" in formats else None
    paths = export_formats(classifier, formats, out, metrics["classes"], train, int8_io)

    reference = predict_all(KerasPredictor(classifier.model, metrics["classes"]), images)
    keras_accuracy = float((reference.argmax(1) == images.labels).mean())
    checks = check_exports(paths, images, reference)
    failed = [c for c in checks if 100 * (keras_accuracy - c.accuracy) > max_drop]
    digest = hashlib.sha256((run / runfolder.MODEL).read_bytes()).hexdigest()
    checks = _earlier_checks(out, digest, exclude=formats) + checks
    runfolder.write_text(out / "report.md", report_markdown(checks, keras_accuracy, len(images.labels), max_drop))
    result = {"out": str(out), "keras_accuracy": keras_accuracy, "model_sha256": digest,
              "checks": [c.__dict__ for c in checks]}
    runfolder.write_json(out / "export.json", result)
    write_model_card(run, out, result)
    if (run / runfolder.REPORT).exists():
        from mobiletune.report.html import build_report

        build_report(run)
    if failed:
        worst = max(failed, key=lambda c: keras_accuracy - c.accuracy)
        raise ExportError(f"export {worst.format}: accuracy {worst.accuracy:.2%} is "
                          f"{100 * (keras_accuracy - worst.accuracy):.1f} points below the Keras model's "
                          f"{keras_accuracy:.2%} (allowed: {max_drop:g}); see {out / 'report.md'}")
    return result


def _earlier_checks(out: Path, model_sha256: str, exclude: list[str]) -> list[Check]:
    """The re-tests of formats an earlier `export` of the same model left in `out` (their files still
    there), so export.json, report.md and the model card list every file in the folder."""
    try:
        earlier = json.loads((out / "export.json").read_text())
    except (OSError, ValueError):
        return []
    if earlier.get("model_sha256") != model_sha256:
        return []  # another model, or an export from before the digest was recorded
    return [Check(**c) for c in earlier.get("checks", [])
            if c["format"] not in exclude and (out / FILE_NAMES[c["format"]]).exists()]


def _representative(run: Path, metrics: dict[str, Any], config) -> np.ndarray:
    """Up to REPRESENTATIVE_IMAGES training images, evenly spread over the manifest, for int8 calibration."""
    rows = [r for r in read_manifest(run / runfolder.SPLIT) if r["split"] == "train"]
    step = max(1, len(rows) // REPRESENTATIVE_IMAGES)
    root = data.image_root(metrics["data_dir"])
    decoded = []
    for r in rows[::step][:REPRESENTATIVE_IMAGES]:
        try:
            decoded.append(pixels.decode_image((root / r["path"]).read_bytes(), config.data.image_size))
        except (OSError, pixels.BadImage):
            continue
    if not decoded:
        raise UsageError(f"{root}: no training images found for int8 calibration; is the data folder still there?")
    return np.stack(decoded)
