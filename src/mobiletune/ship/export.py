"""Ship it: export a run's model to .keras, SavedModel, TFLite (float, fp16, int8) and ONNX, and
re-test every export with its own runtime on the run's test set.

Every export takes raw RGB pixels 0-255 at the trained size, [n, size, size, 3], and returns
class probabilities [n, classes]; `labels.txt` beside it names the classes. An export whose
accuracy falls more than `max_drop` points below the Keras model's fails the command, after
the table in `export/report.md` has been written.
"""

from __future__ import annotations

import hashlib
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
from mobiletune.evaluation.unknown import UnknownDetector
from mobiletune.evaluation.unknown import load as load_detector
from mobiletune.features.onnx import export_onnx
from mobiletune.model import network as model_lib
from mobiletune.model.network import Classifier
from mobiletune.report.model_card import write_model_card
from mobiletune.ship.predict import KerasPredictor, load_predictor, scored_all
from mobiletune.ship.tflite_metadata import ModelInfo, add_metadata
from mobiletune.ship.unknown_head import shipped_model
from mobiletune.ship.web import tasks_vision_files, write_web
from mobiletune.version import __version__

FORMATS = ("keras", "savedmodel", "tflite", "tflite-fp16", "tflite-int8", "onnx")  # "all": every one of these
WEB = "web"  # a folder with a page running the float .tflite in the browser (`ship.web`); asked for by name
FILE_NAMES = runfolder.EXPORT_FILES  # each format's file or folder in the export folder
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


def export_formats(classifier: Classifier, formats: list[str], out: Path, info: ModelInfo,
                   representative: np.ndarray | None, int8_io: bool = False,
                   detector: UnknownDetector | None = None) -> dict[str, Path]:
    """Write each format into `out`; returns format -> path. The SavedModel and TFLite files name their outputs,
    and with `detector` also output its score ("unknown", `ship.unknown_head`); every .tflite carries `info` as
    its metadata."""
    with quiet.native_output_muted(), quiet.tensorflow_info_muted():  # the converters' log lines
        return _export_formats(classifier, formats, out, info, representative, int8_io, detector)


def _export_formats(classifier: Classifier, formats: list[str], out: Path, info: ModelInfo,
                    representative: np.ndarray | None, int8_io: bool,
                    detector: UnknownDetector | None) -> dict[str, Path]:
    serving = classifier.serving_model()
    shipped = shipped_model(classifier, detector)  # SavedModel and TFLite: named outputs, the unknown head
    for model in (serving, shipped):  # exports need a model that has run
        model(np.zeros((1, *serving.input_shape[1:]), np.float32))
    paths: dict[str, Path] = {}
    scratch = Path(tempfile.mkdtemp(prefix="mobiletune-export-"))
    try:
        savedmodel = out / FILE_NAMES["savedmodel"] if "savedmodel" in formats else scratch / "savedmodel"
        if any(f == "savedmodel" or f.startswith("tflite") for f in formats):
            shutil.rmtree(savedmodel, ignore_errors=True)
            shipped.export(str(savedmodel), format="tf_saved_model", verbose=False)
        for fmt in formats:
            path = out / FILE_NAMES[fmt]
            try:
                if fmt == "keras":
                    runfolder.save_model(path, serving)
                elif fmt.startswith("tflite"):
                    converted = _tflite(savedmodel, fmt, representative, int8_io)
                    runfolder.atomic_write_bytes(path, add_metadata(converted, info))
                elif fmt == "onnx":
                    _onnx_with_labels(serving, path, info.classes)
            except Exception as exc:  # noqa: BLE001 - converters raise anything; name the format
                raise ExportError(f"export {fmt}: conversion failed ({first_line(exc)})") from None
            paths[fmt] = path
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    runfolder.write_text(out / runfolder.LABELS, "\n".join(info.classes) + "\n")
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
    unknown_agreement: float | None = None  # share of images the export calls unknown as the run does, if it can


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
                  unknown: np.ndarray | None = None, batch: int = 32) -> list[Check]:
    """Load each export in its own runtime and score it against the labels and the Keras model; where both the
    export and the run say "unknown" (`unknown`: the run's flags), how often they agree."""
    checks = []
    for fmt, path in paths.items():
        predictor = load_predictor(path)
        probs, scores = scored_all(predictor, images, batch)
        agree = None if scores is None or unknown is None else (scores > predictor.unknown_threshold) == unknown
        checks.append(Check(
            format=fmt,
            accuracy=float((probs.argmax(1) == images.labels).mean()),
            agreement=float((probs.argmax(1) == reference.argmax(1)).mean()),
            max_abs_diff=float(np.abs(probs - reference).max()),
            megabytes=_size_mb(path),
            ms_per_image=latency_of(predictor, next(pixels.eval_batches(images, predictor.size, 1))[0][0]),
            unknown_agreement=None if agree is None else float(agree.mean()),
        ))
    return checks


def report_markdown(checks: list[Check], keras_accuracy: float, n: int, max_drop: float, missing: int = 0) -> str:
    lines = [
        f"# Exports, re-tested on the run's test set ({n} images)",
        "",
        *([f"{missing} of the run's test images could not be read, and are left out.", ""] if missing else []),
        f"Keras model: accuracy {keras_accuracy:.2%}. An export fails when its accuracy is more than "
        f"{max_drop:g} point(s) lower.",
        "",
        "| format | accuracy | agreement with Keras | unknown flags as the run's | max abs prob diff | size MB | "
        "ms/image (batch 1) | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        ok = "yes" if 100 * (keras_accuracy - c.accuracy) <= max_drop else "NO"
        unknown = "-" if c.unknown_agreement is None else f"{c.unknown_agreement:.2%}"
        lines.append(f"| {c.format} | {c.accuracy:.2%} | {c.agreement:.2%} | {unknown} | {c.max_abs_diff:.2e} | "
                     f"{c.megabytes:.2f} | {c.ms_per_image:.2f} | {ok} |")
    return "\n".join(lines) + "\n"


def model_info(run: Path, metrics: dict[str, Any], digest: str, detector: UnknownDetector | None,
               about: dict[str, str] | None = None) -> ModelInfo:
    """The metadata of the run's exports: `about`'s name, version, license and author where given, else the run
    folder's name and the model file's digest (what a client can match against export.json)."""
    about = {k: v for k, v in (about or {}).items() if v}
    test = metrics["after_fine_tuning"]["test"]
    description = (f"MobileNetV2 fine-tuned by mobiletune {__version__} to tell {', '.join(metrics['classes'])}; "
                   f"test accuracy {test['accuracy']:.2%} on {test['n']} images")
    return ModelInfo(name=about.get("name", run.resolve().name), description=description,
                     version=about.get("version", digest[:12]), license=about.get("license", ""),
                     author=about.get("author", ""), classes=list(metrics["classes"]),
                     unknown_threshold=None if detector is None else detector.threshold)


def export_run(run: str | Path, formats: list[str], out: str | Path | None = None, *, max_drop: float = 1.0,
               int8_io: bool = False, about: dict[str, str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Export a finished run, re-test every format, write the report; raise if one lost accuracy. `about`: the
    name, version, license and author every .tflite's metadata carries (`model_info`). `out` (default RUN/export)
    is refused where it holds files but no export, unless `overwrite` (`_claimed`)."""
    run = Path(run)
    if not 0 <= max_drop <= 100:
        raise UsageError(f"--max-drop {max_drop:g}: give accuracy points between 0 and 100 (default 1)")
    unknown = [f for f in formats if f not in (*FORMATS, WEB, "all")]
    if unknown:
        raise UsageError(f"--format {', '.join(unknown)}: unknown; choose from {', '.join(FORMATS)}, {WEB} or all")
    web = WEB in formats
    formats = [*FORMATS] if "all" in formats else [f for f in dict.fromkeys(formats) if f != WEB]
    if web and "tflite" not in formats:
        formats.append("tflite")  # the page runs the float file
    web_files = tasks_vision_files() if web else None  # before the slow conversions: a failed download is quick
    metrics = runfolder.read_metrics(run)
    config = load_config(run / runfolder.CONFIG)
    if out and Path(out).resolve() == run.resolve():
        raise UsageError(f"--out {out}: the run folder itself (its model.keras and model card would be replaced); "
                         f"give another folder, or none for {run / runfolder.EXPORT}")
    digest = hashlib.sha256((run / runfolder.MODEL).read_bytes()).hexdigest()
    out, earlier = _claimed(Path(out) if out else run / runfolder.EXPORT, digest, overwrite=overwrite or not out)
    classifier = Classifier(model_lib.load_model(run / runfolder.MODEL))
    images = data.load_test_images(run, None, config.data, missing_ok=True)
    train = _representative(run, metrics, config) if "tflite-int8" in formats else None
    detector = load_detector(run / runfolder.UNKNOWN)
    info = model_info(run, metrics, digest, detector, about)
    paths = export_formats(classifier, formats, out, info, train, int8_io, detector)
    if web:
        write_web(out / FILE_NAMES[WEB], paths["tflite"], info, config.data.image_size, web_files)

    reference, scores = scored_all(KerasPredictor(classifier.model, metrics["classes"], detector), images)
    keras_accuracy = float((reference.argmax(1) == images.labels).mean())
    flags = None if scores is None else scores > detector.threshold
    checks = check_exports(paths, images, reference, flags)
    failed = [c for c in checks if 100 * (keras_accuracy - c.accuracy) > max_drop]
    checks = _earlier_checks(out, earlier, exclude=formats) + checks
    runfolder.write_text(out / runfolder.EXPORT_REPORT,
                         report_markdown(checks, keras_accuracy, len(images.labels), max_drop, len(images.skipped)))
    result = {"out": str(out), "keras_accuracy": keras_accuracy, "model_sha256": digest,
              **({WEB: str(out / FILE_NAMES[WEB])} if web else {}),
              "metadata": {k: v for k, v in info.__dict__.items() if k != "classes"},
              "checks": [c.__dict__ for c in checks]}
    runfolder.write_json(out / runfolder.EXPORT_RECORD, result)
    write_model_card(run, out, result)
    if (run / runfolder.REPORT).exists():
        from mobiletune.report.html import build_report

        build_report(run)
    if failed:
        worst = max(failed, key=lambda c: keras_accuracy - c.accuracy)
        raise ExportError(f"export {worst.format}: accuracy {worst.accuracy:.2%} is "
                          f"{100 * (keras_accuracy - worst.accuracy):.1f} points below the Keras model's "
                          f"{keras_accuracy:.2%} (allowed: {max_drop:g}); see {out / runfolder.EXPORT_REPORT}")
    return result


def _claimed(out: Path, model_sha256: str, overwrite: bool) -> tuple[Path, dict[str, Any] | None]:
    """`out`, made ready for this model's files, and the record of an earlier export of this model there (None:
    none). An earlier export of another model (its export.json names another digest) has its files removed: its
    formats would stay beside this model's labels and be read with them. A non-empty folder that holds no export is
    someone's own: refused unless `overwrite`."""
    earlier = runfolder.read_export_record(out)
    runfolder.check_out(out, overwrite=overwrite or earlier is not None)
    if earlier is not None and earlier["model_sha256"] != model_sha256:
        runfolder.remove_export(out, earlier)
        earlier = None
    return runfolder.make_folder(out), earlier


def _earlier_checks(out: Path, earlier: dict[str, Any] | None, exclude: list[str]) -> list[Check]:
    """The re-tests of formats an earlier `export` of the same model (`earlier`, its record) left in `out` (their
    files still there), so export.json, report.md and the model card list every file in the folder."""
    checks = []
    for c in earlier["checks"] if earlier is not None else []:
        fmt = c.get("format") if isinstance(c, dict) else None
        if fmt in FORMATS and fmt not in exclude and (out / FILE_NAMES[fmt]).exists():
            try:
                checks.append(Check(**c))
            except TypeError:  # a record of another mobiletune version: re-test that format to list it again
                continue
    return checks


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
