"""Predict with any export or a run folder, streaming over files, folders and globs.

Every predictor takes uint8-range RGB pixels [n, size, size, 3] and returns probabilities
[n, classes]. Images are decoded in batches as the paths stream by, so a folder of 100k
images runs in bounded memory; a file that cannot be read is reported on its own and the
rest go on.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobiletune import runfolder
from mobiletune.data.images import ImageSet
from mobiletune.data.pixels import BadImage, decode_image, eval_batches
from mobiletune.data.scan import IMAGE_EXTENSIONS
from mobiletune.errors import ModelError, UsageError
from mobiletune.evaluation.unknown import UnknownDetector
from mobiletune.evaluation.unknown import load as load_detector
from mobiletune.ship.tflite_metadata import PROBABILITIES


class Predictor:
    """Base: `classes`, `size`, `predict(pixels) -> probabilities` and, where the model has an
    unknown-input detector (a run folder's), `scored(pixels) -> (probabilities, scores)`."""

    classes: list[str]
    size: int
    detector: UnknownDetector | None = None
    unknown_threshold: float | None = None  # scores above it are "unknown"; None: the model has no detector

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def scored(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self.predict(pixels), None


class KerasPredictor(Predictor):
    def __init__(self, model, classes: list[str], detector: UnknownDetector | None = None):
        from mobiletune.model.network import Classifier

        # a training model (run folder) outputs logits: serve probabilities like every export
        served = model.output_shape[-1] == len(classes) and model.layers[-1].name == "probabilities"
        self.model = model if served else Classifier(model).serving_model()
        self.classes, self.size = classes, model.input_shape[1]
        self.detector = None if served else detector  # a served export has no features output
        if self.detector is not None:  # one pass also gives what the detector scores
            self.scoring = Classifier(model).serving_model(scoring=True, layers=self.detector.layers)
            self.unknown_threshold = self.detector.threshold

    def predict(self, pixels):
        return np.asarray(self.model.predict_on_batch(pixels.astype(np.float32)))

    def scored(self, pixels):
        if self.detector is None:
            return self.predict(pixels), None
        probs, logits, features = (np.asarray(t) for t in self.scoring.predict_on_batch(pixels.astype(np.float32)))
        return probs, self.detector.scores(features, logits)


class SavedModelPredictor(Predictor):
    def __init__(self, path: Path, classes: list[str]):
        import tensorflow as tf

        self.model = tf.saved_model.load(str(path))
        self.serve = self.model.signatures["serving_default"]
        spec = next(iter(self.serve.structured_input_signature[1].values()))
        self.input_name = next(iter(self.serve.structured_input_signature[1]))
        self.classes, self.size = classes, int(spec.shape[1])

    def predict(self, pixels):
        out = self.serve(**{self.input_name: pixels.astype(np.float32)})
        return np.asarray(out[PROBABILITIES] if PROBABILITIES in out else next(iter(out.values())))


class TFLitePredictor(Predictor):
    """A .tflite export; with metadata (`ship.tflite_metadata`) it names its classes itself, and one with an
    unknown head scores each input in the same pass."""

    def __init__(self, path: Path, classes: list[str] | None = None):
        from ai_edge_litert.interpreter import Interpreter

        from mobiletune.ship.tflite_metadata import UNKNOWN, read_metadata

        self.interpreter = Interpreter(model_path=str(path), num_threads=os.cpu_count() or 1)
        self.input = self.interpreter.get_input_details()[0]
        outputs = self.interpreter.get_output_details()
        metadata = read_metadata(path.read_bytes()) or {"classes": None, "outputs": [], "unknown_threshold": None}
        self.output, self.unknown = outputs[0], None
        if UNKNOWN in metadata["outputs"]:  # the metadata lists the outputs in the model's order
            self.unknown = outputs[metadata["outputs"].index(UNKNOWN)]
            self.unknown_threshold = metadata["unknown_threshold"]
        self.classes = metadata["classes"] or classes or _labels_for(path)  # the file's own names first
        _check_width(path, self.classes, int(self.output["shape"][-1]))
        self.size = int(self.input["shape"][1])
        self._batch = 0

    def scored(self, pixels):
        probs = self.predict(pixels)
        return probs, None if self.unknown is None else self._read(self.unknown)[:, 0].astype(np.float64)

    def predict(self, pixels):
        n = len(pixels)
        if n != self._batch:  # resize once per batch size, not per call
            from mobiletune.quiet import native_output_muted

            with native_output_muted():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
                self.interpreter.resize_tensor_input(self.input["index"], [n, self.size, self.size, 3])
                self.interpreter.allocate_tensors()
            self._batch = n
        x = pixels.astype(np.float32)
        if self.input["dtype"] != np.float32:  # integer input: quantize with the model's own scale
            scale, zero = self.input["quantization"]
            x = np.clip(np.round(x / scale + zero), *_int_range(self.input["dtype"])).astype(self.input["dtype"])
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        return self._read(self.output)

    def _read(self, output) -> np.ndarray:
        y = self.interpreter.get_tensor(output["index"])
        if output["dtype"] != np.float32:
            scale, zero = output["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y


def _int_range(dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return info.min, info.max


class OnnxPredictor(Predictor):
    """A .onnx export: it names its classes itself (the "classes" metadata property mobiletune writes), else
    labels.txt beside it names them."""

    def __init__(self, path: Path, classes: list[str] | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        named = self.session.get_modelmeta().custom_metadata_map.get("classes")
        self.classes = named.split("\n") if named else classes or _labels_for(path)  # the file's own names first
        width = self.session.get_outputs()[0].shape[-1]
        if isinstance(width, int):
            _check_width(path, self.classes, width)
        self.size = int(self.input.shape[1])

    def predict(self, pixels):
        return self.session.run(None, {self.input.name: pixels.astype(np.float32)})[0]


def _check_width(path: Path, classes: list[str], width: int) -> None:
    """Class names that do not fit the model's output (labels.txt of another model beside it) are an error:
    every prediction would carry a wrong name."""
    if len(classes) != width:
        raise ModelError(f"{path}: the model gives {width} class probabilities but its labels name {len(classes)} "
                         f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}); the labels.txt beside "
                         "it belongs to another model: export again into this folder, or predict with the run folder")


def _labels_for(path: Path) -> list[str]:
    """labels.txt beside the model, or the run folder's classes."""
    for candidate in (path.parent / runfolder.LABELS, path / runfolder.LABELS, path.parent.parent / runfolder.LABELS):
        if candidate.is_file():
            return [line for line in candidate.read_text(encoding="utf-8").splitlines() if line]
    for metrics in (path / runfolder.METRICS, path.parent / runfolder.METRICS):
        if metrics.is_file():
            return json.loads(metrics.read_text())["classes"]
    raise ModelError(f"{path}: no labels.txt beside it and no run folder around it; cannot name the classes")


def model_path(path: str | Path) -> Path:
    """The model file a path names (a run folder names its model.keras); a missing one is a usage error."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such model or run folder")
    if path.is_dir() and (path / runfolder.MODEL).is_file() and (path / runfolder.METRICS).is_file():
        return path / runfolder.MODEL  # a run folder
    if path.is_dir() and runfolder.is_unfinished(path):
        raise UsageError(f"{path}: a run that did not finish, so it has no model yet; continue it with mobiletune "
                         f"train --resume {path}")
    if path.is_dir() and (path / runfolder.SWEEP_REQUEST).is_file():
        best = path / runfolder.SWEEP_BEST
        raise UsageError(f"{path}: a sweep folder; " + (f"the model it chose is {best}" if best.is_dir() else
                                                          "it has chosen no model yet: run the sweep again to finish"))
    return path


def needs_tensorflow(path: Path) -> bool:
    """Whether the model at `path` (from `model_path`) runs on TensorFlow: TFLite and ONNX files have their
    own runtimes, so predicting with them skips TensorFlow's start-up (~4 s)."""
    return path.suffix.lower() not in (".tflite", ".onnx")


def load_predictor(path: str | Path) -> Predictor:
    """A run folder, .keras, SavedModel folder, .tflite or .onnx file."""
    path = model_path(path)
    try:
        return _load(path)
    except (ModelError, UsageError):
        raise
    except Exception as exc:  # noqa: BLE001 - each runtime raises its own types for a damaged file
        raise ModelError(f"{path}: cannot load ({str(exc).splitlines()[0][:200]})") from None


def _load(path: Path) -> Predictor:
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        raise UsageError(f"{path}: an image, not a model; the model comes first: mobiletune predict MODEL IMAGES...")
    if suffix == ".tflite":  # names its classes itself, where it has metadata
        return TFLitePredictor(path)
    if suffix == ".onnx":  # so does this
        return OnnxPredictor(path)
    classes = _labels_for(path)
    if path.is_dir() and (path / "saved_model.pb").exists():
        predictor = SavedModelPredictor(path, classes)
        outputs = predictor.serve.structured_outputs
        _check_width(path, classes, int(outputs.get(PROBABILITIES, next(iter(outputs.values()))).shape[-1]))
        return predictor
    if suffix == ".keras":
        from mobiletune.model.network import load_model

        model = load_model(path)
        _check_width(path, classes, max(2, int(model.output_shape[-1])))  # a binary training model: one logit
        # the run's detector was fitted to its trained model's outputs: before_fine_tuning.keras has none
        detector = load_detector(path.parent / runfolder.UNKNOWN) if path.name == runfolder.MODEL else None
        return KerasPredictor(model, classes, detector)
    raise UsageError(f"{path}: not a model: give a run folder, .keras, SavedModel folder, .tflite or .onnx")


# ---------------------------------------------------------------------------------------------
# Streaming predictions


def expand_paths(items: Iterable[str]) -> Iterator[Path]:
    """Files as given, folders walked for image files (a folder without any: itself, which is reported), globs
    expanded; lazily, in a stable order."""
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = False
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                        found = True
                        yield Path(root, name)
            if not found:
                yield path  # reported as a folder without images, on its own line
        elif path.exists() or path.is_symlink():
            yield path
        else:
            matches = sorted(glob.iglob(item, recursive=True))
            if not matches:
                yield path  # reported as missing, on its own line
            for match in matches:
                if Path(match).is_file():
                    yield Path(match)


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class, probability), most likely first; empty on error
    error: str = ""
    unknown_score: float | None = None  # with a detector: how unlike the training images (higher: less)
    unknown: bool = False  # the score is beyond the detector's threshold: none of the classes


def _check_counts(batch: object, top_k: object) -> None:
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (batch, top_k)):
        raise UsageError(f"batch (--batch) {batch!r}, top_k (--top-k) {top_k!r}: give whole numbers of at least 1")


def predict_paths(predictor: Predictor, items: Iterable[str], *, batch: int = 32,
                  top_k: int = 1, unknown: bool = True) -> Iterator[Prediction]:
    """Predictions in input order, one batch decoded at a time; with `unknown` and a predictor that
    has a detector, each scored and flagged unknown beyond its threshold."""
    _check_counts(batch, top_k)
    top_k = min(top_k, len(predictor.classes))
    pending: list[tuple[Path, np.ndarray | None, str]] = []

    def flush() -> Iterator[Prediction]:
        good = [p[1] for p in pending if p[1] is not None]
        rows = iter(_predict_batch(predictor, np.stack(good), top_k, unknown) if good else [])
        for path, pixels, error in pending:
            name = os.fsencode(path).decode("utf-8", "backslashreplace")
            yield Prediction(name, [], error) if pixels is None else Prediction(name, *next(rows))
        pending.clear()

    for path in expand_paths(items):
        if path.is_dir():
            pending.append((path, None, f"a folder with no image files ({', '.join(IMAGE_EXTENSIONS)})"))
            continue
        try:
            pending.append((path, decode_image(path.read_bytes(), predictor.size), ""))
        except BadImage as exc:
            pending.append((path, None, str(exc)))
        except OSError as exc:
            pattern = not path.exists() and any(c in str(path) for c in "*?[")  # a glob that matched nothing
            pending.append((path, None, "no file matches" if pattern else f"cannot read ({exc.strerror or exc})"))
        if len(pending) >= batch:
            yield from flush()
    yield from flush()


def _predict_batch(predictor: Predictor, pixels: np.ndarray, top_k: int, unknown: bool) -> list[tuple]:
    """(top classes, unknown score, unknown?) per image; the score only with a detector and `unknown`."""
    probs, scores = predictor.scored(pixels) if unknown else (predictor.predict(pixels), None)
    rows = []
    for i, p in enumerate(probs):
        top = [(predictor.classes[c], float(p[c])) for c in np.argsort(-p)[:top_k]]
        score = None if scores is None else float(scores[i])
        rows.append((top, "", score, score is not None and score > predictor.unknown_threshold))
    return rows


def predict_array(predictor: Predictor, images: np.ndarray, *, batch: int = 32, top_k: int = 1,
                  unknown: bool = True) -> list[Prediction]:
    """Predictions for RGB images as an array [n, height, width, 3] (or one [height, width, 3]), values
    0-255; images of another size are resized as JPEG files are (`pixels.resized_like_a_jpeg`)."""
    from mobiletune.data.pixels import resized_like_a_jpeg

    given = np.asarray(images)
    images = given[None] if given.ndim == 3 else given
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype.kind not in "uif":
        raise UsageError(f"images of shape {given.shape} ({given.dtype}): give RGB pixels 0-255 as [n, height, "
                         "width, 3] or one [height, width, 3]")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise UsageError("images: some pixels are NaN or infinite; give RGB pixels 0-255")
    if images.dtype.kind == "f" and images.size and images.max() <= 1.0:
        raise UsageError("images: every value is within 0-1; mobiletune takes pixels 0-255 (multiply by 255)")
    _check_counts(batch, top_k)
    size = predictor.size
    if images.shape[1:3] != (size, size):
        images = np.stack([resized_like_a_jpeg(x, size) for x in images])
    top_k = min(top_k, len(predictor.classes))
    out = []
    for start in range(0, len(images), batch):
        rows = _predict_batch(predictor, images[start:start + batch], top_k, unknown)
        out += [Prediction(f"array[{start + i}]", *row) for i, row in enumerate(rows)]
    return out


def scored_all(predictor: Predictor, images: ImageSet, batch: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities and unknown-input scores (None without a detector) of every test image, decoded and
    predicted `batch` at a time."""
    probs, scores = zip(*(predictor.scored(x) for x, _ in eval_batches(images, predictor.size, batch)), strict=True)
    return np.concatenate(probs), None if scores[0] is None else np.concatenate(scores)
