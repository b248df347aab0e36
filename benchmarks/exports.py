"""The .tflite exports in their clients, measured: MediaPipe Tasks (Python) and the web page in Chromium against
`mobiletune predict` on the run folder, and what the unknown head costs in size and batch-1 latency.

    .venv/bin/python benchmarks/exports.py [--per-class 200] [--px 160] [--root /tmp/exports] [--set KEY=VALUE ...]

Trains the default recipe on N cats-vs-dogs training images a class (symlinks into ../shared; validation and
test: 100 + 100 a class of the shared validation images), exports tflite, tflite-fp16, tflite-int8 and web, and
for each file reports:
- top-1 agreement with `predict RUN` on the test images, through MediaPipe's ImageClassifier (fed the pixels
  predict decodes) and, for the float file, through the page in Chromium (the browser decodes and scales);
- "unknown" as the run says it: agreement on test + all of flowers_mini, the share of flowers flagged, and the
  share of test images kept;
- size and batch-1 latency (XNNPACK, fastest of 5 medians of 20, with and without the unknown head, alternated).
Prints the host first. The web page needs @mediapipe/tasks-vision (the npm registry or MOBILETUNE_TASKS_VISION)
and Debian's chromium.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from scaling import host_line  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "data"
TFLITES = {"tflite": "model.tflite", "tflite-fp16": "model_fp16.tflite", "tflite-int8": "model_int8.tflite"}


def make_data(root: Path, per_class: int) -> Path:
    """train/ N a class, validation/ and test/ 100 a class, as symlinks to the shared cats-vs-dogs images."""
    data = root / "data"
    shutil.rmtree(data, ignore_errors=True)
    source = SHARED / "cats_and_dogs_filtered"
    for cls in ("cats", "dogs"):
        train = sorted((source / "train" / cls).iterdir())[:per_class]
        held = sorted((source / "validation" / cls).iterdir())
        for split, files in (("train", train), ("validation", held[:100]), ("test", held[100:200])):
            (data / split / cls).mkdir(parents=True, exist_ok=True)
            for f in files:
                (data / split / cls / f.name).symlink_to(f)
    return data


def mediapipe_rows(model: Path, images: list[Path], size: int) -> list[tuple[str, bool]]:
    """(top class, unknown?) of each image from MediaPipe's ImageClassifier, fed the pixels predict decodes."""
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    from mobiletune.data.pixels import decode_image

    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(model)), max_results=-1)
    rows = []
    with vision.ImageClassifier.create_from_options(options) as classifier:
        for path in images:
            heads = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB,
                                                 data=decode_image(path.read_bytes(), size))).classifications
            by_name = {h.head_name: h.categories for h in heads}
            rows.append((max(by_name["probabilities"], key=lambda c: c.score).category_name,
                         bool(by_name.get("unknown"))))
    return rows


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def page_rows(folder: Path, images: list[Path]) -> list[tuple[str, bool]]:
    """(top class, unknown?) of each image through the exported page, served on 127.0.0.1, in Chromium."""
    from playwright.sync_api import sync_playwright

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
            page.wait_for_function("window.mobiletune.ready", timeout=120_000)
            page.set_input_files("#pick", [str(x) for x in images])
            page.wait_for_function(f"window.mobiletune.done === {len(images)}", timeout=600_000)
            rows = page.evaluate("window.mobiletune.results")
            browser.close()
    finally:
        server.shutdown()
    return [(r["label"], bool(r["unknown"])) for r in rows]


def latencies(with_head: Path, without: Path, size: int) -> tuple[float, float]:
    """Batch-1 ms of the two files, the fastest of 5 medians of 20 each, measured alternately."""
    import numpy as np

    from mobiletune.ship.export import latency_of
    from mobiletune.ship.predict import TFLitePredictor

    image = np.random.default_rng(0).uniform(0, 255, (size, size, 3)).astype(np.float32)
    a, b = TFLitePredictor(with_head, ["cats", "dogs"]), TFLitePredictor(without, ["cats", "dogs"])
    times: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(5):
        times["with"].append(latency_of(a, image))
        times["without"].append(latency_of(b, image))
    return min(times["with"]), min(times["without"])


def compare(rows: list[tuple[str, bool]], want: list[tuple[str, bool]], n_test: int) -> dict[str, float]:
    import numpy as np

    return {"top1": float(np.mean([r[0] == w[0] for r, w in zip(rows[:n_test], want, strict=False)])),
            "unknown_agree": float(np.mean([r[1] == w[1] for r, w in zip(rows, want, strict=True)])),
            "flowers_flagged": float(np.mean([r[1] for r in rows[n_test:]])),
            "test_kept": float(np.mean([not r[1] for r in rows[:n_test]]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--px", type=int, default=160)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "mobiletune-exports")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    print(f"host: {host_line()}", flush=True)

    import numpy as np

    from mobiletune.config import load_config
    from mobiletune.data.pixels import decode_image
    from mobiletune.evaluation.unknown import load as load_detector
    from mobiletune.model.network import Classifier, load_model
    from mobiletune.ship.export import FILE_NAMES, export_formats, export_run, model_info
    from mobiletune.ship.predict import load_predictor, predict_paths
    from mobiletune.training.run import train_and_evaluate

    data = make_data(args.root, args.per_class)
    run = args.root / "run"
    shutil.rmtree(run, ignore_errors=True)
    train_and_evaluate(load_config(overrides=[f"data.image_size={args.px}", *args.overrides]), data, run)
    result = export_run(run, [*TFLITES, "web"], max_drop=100)
    out = Path(result["out"])
    # the same three files without the unknown head, for its size and latency
    plain = args.root / "plain"
    shutil.rmtree(plain, ignore_errors=True)
    plain.mkdir()
    metrics = json.loads((run / "metrics.json").read_text())
    info = model_info(run, metrics, result["model_sha256"], None)
    representative = np.stack([decode_image(p.read_bytes(), args.px)  # as export calibrates: 200 training images
                               for p in sorted((data / "train").rglob("*.jpg"))[::max(1, args.per_class // 100)]])
    export_formats(Classifier(load_model(run / "model.keras")), list(TFLITES), plain, info, representative)

    test = sorted((data / "test").rglob("*.jpg"))
    flowers = sorted((SHARED / "flowers_mini").rglob("*.jpg"))
    images = test + flowers
    expected = {p.path: p for p in predict_paths(load_predictor(run), [str(p) for p in images])}
    want = [(expected[str(p)].top[0][0], expected[str(p)].unknown) for p in images]
    detector = load_detector(run / "unknown.npz")
    print(f"run: {args.per_class}/class at {args.px} px, test accuracy "
          f"{metrics['after_fine_tuning']['test']['accuracy']:.2%}, unknown threshold {detector.threshold:.4f}, "
          f"reference {len(detector.reference)} x {detector.reference.shape[1]}; "
          f"the run itself: {compare(want, want, len(test))}", flush=True)
    print("| client | file | top-1 = predict | unknown = run's | flowers flagged | test kept | MB (no head) | "
          "ms batch 1 (no head) |")
    print("|---|---|---|---|---|---|---|---|")
    for fmt, name in TFLITES.items():
        c = compare(mediapipe_rows(out / name, images, args.px), want, len(test))
        ms, ms_plain = latencies(out / name, plain / name, args.px)
        mb, mb_plain = ((d / name).stat().st_size / 2**20 for d in (out, plain))
        print(f"| MediaPipe (Python) | {fmt} | {c['top1']:.1%} | {c['unknown_agree']:.1%} | "
              f"{c['flowers_flagged']:.1%} | {c['test_kept']:.1%} | {mb:.2f} ({mb_plain:.2f}) | "
              f"{ms:.2f} ({ms_plain:.2f}) |", flush=True)
    if shutil.which("chromium"):
        c = compare(page_rows(out / FILE_NAMES["web"], images), want, len(test))
        print(f"| web page (Chromium) | tflite | {c['top1']:.1%} | {c['unknown_agree']:.1%} | "
              f"{c['flowers_flagged']:.1%} | {c['test_kept']:.1%} | | |", flush=True)


if __name__ == "__main__":
    main()
