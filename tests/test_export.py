import json
import shutil

import numpy as np
import pytest

from mobiletune.ship.export import FILE_NAMES, FORMATS, ExportError, export_run
from mobiletune.ship.predict import load_predictor

# How far each runtime may drift from Keras, in probability: float formats barely, quantized ones more
# (int8 most here: a 32-px model calibrated on 12 images; the full-size figures are in docs/benchmarks.md).
TOLERANCE = {"keras": 1e-5, "savedmodel": 1e-4, "onnx": 1e-4, "tflite": 1e-4, "tflite-fp16": 2e-2,
             "tflite-int8": 0.5}


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(tiny_run.workdir, run)
    return run, export_run(run, ["all"], max_drop=100)


def test_every_format_loads_in_its_runtime_and_agrees(exported):
    run, result = exported
    checks = {c["format"]: c for c in result["checks"]}
    assert set(checks) == set(FORMATS)
    for fmt, c in checks.items():
        assert c["max_abs_diff"] <= TOLERANCE[fmt], (fmt, c)
        assert c["megabytes"] > 0.1 and c["ms_per_image"] > 0
        if fmt != "tflite-int8":
            assert c["agreement"] == 1.0, (fmt, c)
    assert (run / "export" / "labels.txt").read_text().split() == ["cats", "dogs"]
    assert "| tflite-int8 |" in (run / "export" / "report.md").read_text()
    assert checks["tflite-int8"]["megabytes"] < checks["tflite"]["megabytes"] / 2  # int8 is smaller
    assert "Exports (Keras accuracy" in (run / "report.html").read_text()  # the table joins the report
    card = (run / "export" / "model_card.md").read_text()  # the run's card travels with the exports
    assert "## Exports, re-tested on the test set" in card and "| tflite-int8 |" in card and "## Known limits" in card


def test_exports_take_pixels_and_return_probabilities(exported):
    run, _ = exported
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    for fmt in FORMATS:
        predictor = load_predictor(run / "export" / FILE_NAMES[fmt])
        probs = predictor.predict(pixels)
        assert probs.shape == (3, 2) and predictor.classes == ["cats", "dogs"]
        assert np.allclose(probs.sum(axis=1), 1, atol=0.02), fmt


def test_onnx_carries_the_class_names(exported):
    import onnx

    run, _ = exported
    props = {p.key: p.value for p in onnx.load(str(run / "export" / "model.onnx")).metadata_props}
    assert props["classes"].split("\n") == ["cats", "dogs"]


def test_accuracy_drop_fails_with_the_format_named(exported, monkeypatch):
    import dataclasses

    from mobiletune.ship import export

    run, _ = exported
    checked = export.check_exports
    monkeypatch.setattr(export, "check_exports", lambda *a: [  # as if the export lost 5 points
        dataclasses.replace(c, accuracy=c.accuracy - 0.05) for c in checked(*a)])
    with pytest.raises(ExportError, match=r"export keras: accuracy .* is 5.0 points below .* \(allowed: 1\)"):
        export_run(run, ["keras"], run / "strict", max_drop=1)
    assert (run / "strict" / "report.md").exists()  # the table is written before failing
    assert json.loads((run / "strict" / "export.json").read_text())["checks"][0]["format"] == "keras"


def test_a_later_export_of_one_format_keeps_the_others_listed(exported):
    """export.json, report.md and the model card describe every file in the folder, not just the last call's."""
    run, first = exported
    again = export_run(run, ["keras"], max_drop=100)
    assert sorted(c["format"] for c in again["checks"]) == sorted(FORMATS)
    by_format = {c["format"]: c for c in again["checks"]}
    assert by_format["onnx"] == next(c for c in first["checks"] if c["format"] == "onnx")  # carried over as measured
    assert "| onnx |" in (run / "export" / "report.md").read_text()
    assert "| tflite-int8 |" in (run / "export" / "model_card.md").read_text()


def test_a_users_folder_is_refused_and_another_models_export_is_replaced(exported, tmp_path):
    """export --out never writes beside a user's own files unasked; an earlier export of another model in the
    folder is removed, so its formats are not left beside this model's labels."""
    from mobiletune.errors import UsageError

    run, _ = exported
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "labels.txt").write_text("old labels\n")
    with pytest.raises(UsageError, match="not empty"):
        export_run(run, ["keras"], mine, max_drop=100)
    assert (mine / "labels.txt").read_text() == "old labels\n" and len(list(mine.iterdir())) == 1
    other = tmp_path / "other"
    shutil.copytree(run / "export", other)
    record = json.loads((other / "export.json").read_text())
    (other / "export.json").write_text(json.dumps({**record, "model_sha256": "another model"}))
    (other / "notes.txt").write_text("mine")
    result = export_run(run, ["keras"], other, max_drop=100)
    assert [c["format"] for c in result["checks"]] == ["keras"]
    assert not any((other / FILE_NAMES[f]).exists() for f in FORMATS if f != "keras")
    assert (other / "notes.txt").read_text() == "mine"  # not an export's file
    # a file named export.json that is no export's record (another tool's, or damaged) makes no export folder
    for text in ('{"name": "another tool"}', "{damaged", '{"model_sha256": 1, "checks": []}'):
        theirs = tmp_path / f"theirs{len(text)}"
        (theirs / "web").mkdir(parents=True)
        (theirs / "export.json").write_text(text)
        (theirs / "labels.txt").write_text("theirs\n")
        with pytest.raises(UsageError, match="not empty"):
            export_run(run, ["keras"], theirs, max_drop=100)
        assert sorted(p.name for p in theirs.iterdir()) == ["export.json", "labels.txt", "web"]
    with pytest.raises(UsageError, match="the run folder itself"):
        export_run(run, ["keras"], run, max_drop=100)


def test_onnx_names_its_classes_itself_and_labels_of_another_model_are_an_error(exported, tmp_path):
    import onnx

    from mobiletune.errors import ModelError

    run, _ = exported
    shutil.copy(run / "export" / "model.onnx", tmp_path / "model.onnx")
    (tmp_path / "labels.txt").write_text("daisy\nroses\ntulips\n")  # another model's, left beside it
    assert load_predictor(tmp_path / "model.onnx").classes == ["cats", "dogs"]  # the file's own names
    proto = onnx.load(str(tmp_path / "model.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "model.onnx"))  # an ONNX file without names: labels.txt must fit it
    with pytest.raises(ModelError, match="gives 2 class probabilities but its labels name 3"):
        load_predictor(tmp_path / "model.onnx")
    shutil.copytree(run / "export" / "savedmodel", tmp_path / "savedmodel")  # labels.txt beside it: not its own
    with pytest.raises(ModelError, match="gives 2 class probabilities but its labels name 3"):
        load_predictor(tmp_path / "savedmodel")


def test_predict_says_once_when_a_model_cannot_say_unknown(exported, tiny_run):
    """The ONNX file has no unknown-input score: every image gets a class, and predict says so (once, on stderr)
    instead of leaving the user to think strange inputs would be flagged; the .tflite scores them."""
    from typer.testing import CliRunner

    from mobiletune.cli import app

    run, images = exported[0], tiny_run.workdir.parent / "data" / "validation"
    for fmt, noted in (("onnx", True), ("tflite", False)):
        result = CliRunner().invoke(app, ["predict", str(run / "export" / FILE_NAMES[fmt]), str(images)])
        assert result.exit_code == 0, result.output
        assert " ".join(result.output.split()).count("has no unknown-input score") == int(noted), (fmt, result.output)


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_predict_with_a_tflite_or_onnx_file_runs_without_tensorflow(exported, tiny_run, fmt):
    """Mobile developers' check of a shipped file: its own runtime only, no TensorFlow start-up. A fresh
    interpreter, since this one has long imported TensorFlow."""
    import subprocess
    import sys

    run, images = exported[0], tiny_run.workdir.parent / "data" / "validation"
    code = f"""
import sys
from typer.testing import CliRunner
from mobiletune.cli import app
model, images = {str(run / "export" / FILE_NAMES[fmt])!r}, {str(images)!r}
result = CliRunner().invoke(app, ["predict", model, images, "--format", "csv"])
assert result.exit_code == 0, result.output
print(len(result.output.splitlines()), "tensorflow" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows, tensorflow = done.stdout.split()
    assert int(rows) > 1 and tensorflow == "False"


@pytest.fixture(scope="module")
def learned_copy(learned_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("learned_export") / "run"
    shutil.copytree(learned_run.workdir, run)
    shutil.copytree(learned_run.workdir.parent / "data", run.parent / "data")  # int8 calibrates on its images
    return run


def test_int8_passes_a_real_gate_on_a_model_that_learnt(learned_copy):
    """The int8 export of a run at 80%+ on 40 test images, gated at 5 points (2 images), agrees with Keras."""
    result = export_run(learned_copy, ["tflite-int8"], max_drop=5)
    check = next(c for c in result["checks"] if c["format"] == "tflite-int8")
    assert result["keras_accuracy"] >= 0.8 and check["accuracy"] >= result["keras_accuracy"] - 0.05
    assert check["agreement"] >= 0.9 and check["max_abs_diff"] <= 0.5, check  # 0.95 and 0.34 measured


def test_int8_calibrated_on_blank_images_fails_the_gate(learned_copy, monkeypatch):
    """A damaged quantisation: activation ranges calibrated on blank images. The gate measures it and refuses."""
    from mobiletune.ship import export

    blank = lambda run, metrics, config: np.zeros((8, 128, 128, 3), np.uint8)  # noqa: E731
    monkeypatch.setattr(export, "_representative", blank)
    with pytest.raises(ExportError, match=r"export tflite-int8: accuracy .* points below the Keras model's"):
        export_run(learned_copy, ["tflite-int8"], learned_copy / "damaged", max_drop=5)


def test_int8_io_takes_and_gives_uint8(learned_copy):
    """--int8-io: uint8 pixels in, uint8 probabilities out, for integer-only accelerators; the predictor
    feeds it uint8 and reads back probabilities that agree with Keras."""
    from ai_edge_litert.interpreter import Interpreter

    result = export_run(learned_copy, ["tflite-int8"], learned_copy / "int8io", max_drop=5, int8_io=True)
    path = learned_copy / "int8io" / FILE_NAMES["tflite-int8"]
    interpreter = Interpreter(model_path=str(path))
    (given,), (returned, unknown) = interpreter.get_input_details(), interpreter.get_output_details()
    assert given["dtype"] == np.uint8 and returned["dtype"] == np.uint8 and unknown["dtype"] == np.uint8
    assert given["quantization"] == pytest.approx((1.0, 0), abs=1e-6)  # pixels pass as they are
    assert tuple(returned["shape"]) == (1, 2) and tuple(unknown["shape"]) == (1, 1)  # probabilities first
    check = next(c for c in result["checks"] if c["format"] == "tflite-int8")
    assert check["agreement"] >= 0.9 and check["accuracy"] >= 0.8, check
    assert check["unknown_agreement"] >= 0.85, check  # the score dequantized from uint8 still draws the line
