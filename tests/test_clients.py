"""The exports in the clients users ship them to: MediaPipe Tasks' ImageClassifier (Python, as on a phone) and a
browser page on MediaPipe Tasks for the web, each compared with `mobiletune predict` on the run's test images
and, for "unknown", on images of another data set (flowers_mini)."""

from __future__ import annotations

import functools
import http.server
import io
import os
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import CHROMIUM, FLOWERS, IN_CI, require_chromium
from mobiletune.data.pixels import decode_image
from mobiletune.errors import ExportError
from mobiletune.ship.export import FILE_NAMES, export_run
from mobiletune.ship.predict import load_predictor, predict_paths
from mobiletune.ship.tflite_metadata import ModelInfo, add_metadata, read_metadata

TFLITES = ("tflite", "tflite-fp16", "tflite-int8")
FLOWER_IMAGES = 20  # images of another data set: the run should call most of them unknown


@pytest.fixture(scope="module")
def shipped(learned_run, tmp_path_factory):
    """The learned run's three .tflite files and its web folder, with the run's own predictions to compare."""
    run = tmp_path_factory.mktemp("clients") / "run"
    shutil.copytree(learned_run.workdir, run)
    shutil.copytree(learned_run.workdir.parent / "data", run.parent / "data")  # int8 calibrates on its images
    formats = [*TFLITES, "web"] if _tasks_vision_available() else list(TFLITES)
    result = export_run(run, formats, max_drop=5, about={"license": "Apache-2.0", "author": "mobiletune tests"})
    test = sorted((run.parent / "data" / "test").rglob("*.jpg"))
    flowers = sorted(p for d in sorted(FLOWERS.iterdir()) for p in sorted(d.iterdir())[:4])[:FLOWER_IMAGES]
    predictor = load_predictor(run)
    expected = {p.path: p for p in predict_paths(predictor, [str(p) for p in test + flowers])}
    return run, result, test, flowers, expected, predictor.size


def _tasks_vision_available() -> bool:
    """The npm package comes from MOBILETUNE_TASKS_VISION (.ci/run packs it) or the registry, as for a user."""
    return IN_CI or bool(os.environ.get("MOBILETUNE_TASKS_VISION")) or _registry_reachable()


@functools.cache
def _registry_reachable() -> bool:
    import urllib.request

    try:
        urllib.request.urlopen("https://registry.npmjs.org/", timeout=5).close()
        return True
    except OSError:
        return False


def _mediapipe_results(model: Path, images: list[Path], size: int) -> list[tuple[str, bool]]:
    """(top class, unknown?) from MediaPipe's ImageClassifier for each image, fed at the model's input size as
    predict decodes it (MediaPipe's own resize is another resampler)."""
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(model)), max_results=-1)
    out = []
    with vision.ImageClassifier.create_from_options(options) as classifier:
        for path in images:
            pixels = decode_image(path.read_bytes(), size)
            heads = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=pixels)).classifications
            by_name = {h.head_name: h.categories for h in heads}
            top = max(by_name["probabilities"], key=lambda c: c.score).category_name
            out.append((top, bool(by_name.get("unknown"))))
    return out


@pytest.mark.parametrize("fmt", TFLITES)
def test_mediapipe_opens_each_tflite_and_agrees_with_predict(shipped, fmt):
    """MediaPipe's ImageClassifier reads the class names and both heads from the metadata alone; its top-1 and its
    "unknown" (the second head, above the threshold in the metadata) agree with `predict` on the run folder."""
    run, result, test, flowers, expected, size = shipped
    path = Path(result["out"]) / FILE_NAMES[fmt]
    got = _mediapipe_results(path, test + flowers, size)
    want = [(expected[str(p)].top[0][0], expected[str(p)].unknown) for p in test + flowers]
    top_agree = np.mean([g[0] == w[0] for g, w in zip(got[:len(test)], want, strict=False)])
    unknown_agree = np.mean([g[1] == w[1] for g, w in zip(got, want, strict=True)])
    assert {g[0] for g in got} == {"cats", "dogs"}
    floor = {"tflite": (1.0, 1.0), "tflite-fp16": (0.99, 0.95), "tflite-int8": (0.9, 0.85)}[fmt]  # int8: measured
    assert top_agree >= floor[0] and unknown_agree >= floor[1], (fmt, top_agree, unknown_agree)
    check = next(c for c in result["checks"] if c["format"] == fmt)  # export's own re-test says the same
    assert check["unknown_agreement"] >= floor[1], check
    assert sum(w[1] for w in want[len(test):]) >= len(flowers) // 2  # the flowers really test "unknown"


def test_the_metadata_names_the_model_and_its_heads(shipped):
    run, result, *_ = shipped
    data = (Path(result["out"]) / FILE_NAMES["tflite"]).read_bytes()
    meta = read_metadata(data)
    assert meta["classes"] == ["cats", "dogs"] and meta["outputs"] == ["probabilities", "unknown"]
    assert meta["license"] == "Apache-2.0" and meta["name"] == "run" and meta["version"] == result["model_sha256"][:12]
    assert meta["unknown_threshold"] == pytest.approx(result["metadata"]["unknown_threshold"], rel=1e-6)
    with zipfile.ZipFile(io.BytesIO(data)) as files:
        assert sorted(files.namelist()) == ["labels.txt", "unknown.txt"]
    card = (Path(result["out"]) / "model_card.md").read_text()
    assert "What the .tflite files carry" in card and "Output `unknown`" in card and "Apache-2.0" in card


def test_predict_with_a_lone_tflite_names_classes_and_unknowns_from_its_metadata(shipped, tmp_path):
    """A .tflite copied away from labels.txt and the run folder still names its classes and says "unknown"."""
    run, result, test, flowers, expected, _ = shipped
    alone = tmp_path / "phone.tflite"
    shutil.copy(Path(result["out"]) / FILE_NAMES["tflite"], alone)
    predictor = load_predictor(alone)
    assert predictor.classes == ["cats", "dogs"] and predictor.unknown_threshold is not None
    got = {p.path: p for p in predict_paths(predictor, [str(p) for p in test + flowers])}
    assert all(got[k].unknown == expected[k].unknown for k in got)
    assert all(got[k].top[0][0] == expected[k].top[0][0] for k in got)


def test_metadata_refuses_a_model_that_already_carries_files(shipped):
    _, result, *_ = shipped
    data = (Path(result["out"]) / FILE_NAMES["tflite"]).read_bytes()
    info = ModelInfo("m", "d", "1", "", "", ["cats", "dogs"], 0.5)
    with pytest.raises(ExportError, match="already carries files"):
        add_metadata(data, info)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request log in the test output
        pass


def test_the_web_page_classifies_like_predict(shipped):
    """The page, served on 127.0.0.1, classifies the test images and flowers in Chromium through MediaPipe Tasks for
    the web as `predict` does; opened as a file it says to serve it instead."""
    run, result, test, flowers, expected, _ = shipped
    if "web" not in result:
        pytest.skip("needs @mediapipe/tasks-vision: the npm registry, or MOBILETUNE_TASKS_VISION (.ci/run sets it)")
    require_chromium()
    from playwright.sync_api import sync_playwright

    folder = Path(result["web"])
    assert sorted(p.name for p in folder.iterdir()) == ["index.html", "model.tflite", "tasks-vision"]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    problems: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
            page.wait_for_function("window.mobiletune.ready", timeout=60_000)
            page.set_input_files("#pick", [str(x) for x in test + flowers])
            page.wait_for_function(f"window.mobiletune.done === {len(test) + len(flowers)}", timeout=120_000)
            rows = page.evaluate("window.mobiletune.results")
            shown = page.locator("#results tbody tr").count()
            page.goto((folder / "index.html").as_uri())
            page.wait_for_function("document.getElementById('status').className === 'error'", timeout=30_000)
            refused = page.locator("#status").inner_text()
            browser.close()
    finally:
        server.shutdown()
    assert not problems and shown == len(rows) == len(test) + len(flowers) and not any("error" in r for r in rows)
    want = [expected[str(x)] for x in test + flowers]
    top = np.mean([r["label"] == w.top[0][0] for r, w in zip(rows[:len(test)], want, strict=False)])
    unknown = np.mean([r["unknown"] == w.unknown for r, w in zip(rows, want, strict=True)])
    # the browser decodes and scales the JPEGs itself (predict: PIL): a near tie may flip, so not 100%
    assert top >= 0.95 and unknown >= 0.9, (top, unknown)
    assert "web server" in refused and "python3 -m http.server" in refused


def test_metadata_refuses_labels_that_do_not_match_the_outputs(shipped, tmp_path):
    """MediaPipe finds a label count that differs from the outputs only when it classifies: export refuses it."""
    from mobiletune.model.network import Classifier, load_model
    from mobiletune.ship.export import _tflite
    from mobiletune.ship.unknown_head import shipped_model

    run = shipped[0]
    model = shipped_model(Classifier(load_model(run / "model.keras")), None)
    model.export(str(tmp_path / "sm"), format="tf_saved_model", verbose=False)
    plain = _tflite(tmp_path / "sm", "tflite", None, False)
    with pytest.raises(ExportError, match="3 class names for 2 outputs"):
        add_metadata(plain, ModelInfo("m", "d", "1", "", "", ["a", "b", "c"]))
    assert read_metadata(plain) is None  # a model without metadata reads as none
    assert read_metadata(add_metadata(plain, ModelInfo("m", "d", "1", "", "", ["a", "b"])))["outputs"] == [
        "probabilities"]
