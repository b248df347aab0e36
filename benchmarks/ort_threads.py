"""How the feature pass should drive ONNX Runtime on a small CPU: threads inside a call, or calls side by side.

    .venv/bin/python benchmarks/ort_threads.py [--images 256]

Exports the default recipe's extractor (MobileNetV2 at 160 px, pooled output plus the boundary
activations at fine_tune_at = 100) to ONNX as `mobiletune train` does, then runs the same random
images through it in several ways, each timed twice after a warm-up pass, best kept: one image per
call on a session with one thread per core (mobiletune before 2026-11-29), batches on that session,
and chunks of 1-8 images on a one-thread session called from one Python thread per core.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import host_line  # noqa: E402

GFLOP_FORWARD = 0.306  # MobileNetV2 forward at 160 px, per image


def export(path: Path) -> None:
    from mobiletune.config import load_config
    from mobiletune.features.onnx import OnnxRunner
    from mobiletune.model import cut
    from mobiletune.model.network import create_model

    config = load_config(overrides=[])
    extract, _ = cut.extractor(create_model(config, 2), [config.phase2.fine_tune_at])
    OnnxRunner.for_extractor(extract, path)  # exactly what a run exports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()

    import numpy as np
    import onnxruntime as ort

    print(f"{host_line()}; onnxruntime {ort.__version__}")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "extractor.onnx"
        export(path)

        def session(threads: int):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        wide, narrow = session(cores), session(1)
        name = wide.get_inputs()[0].name
        x = np.random.default_rng(0).uniform(-1, 1, (args.images, 160, 160, 3)).astype(np.float32)
        pool = ThreadPoolExecutor(cores)

        def in_calls(sess, n):
            return lambda: [sess.run(None, {name: x[i : i + n]}) for i in range(0, len(x), n)]

        def side_by_side(n):
            return lambda: list(pool.map(lambda i: narrow.run(None, {name: x[i : i + n]}), range(0, len(x), n)))

        ways = {f"{cores} threads per call, 1 image per call": in_calls(wide, 1),
                f"{cores} threads per call, 8 images per call": in_calls(wide, 8),
                f"{cores} threads per call, 32 images per call": in_calls(wide, 32)}
        ways.update({f"1 thread per call, {cores} calls side by side, {n} image(s) per call": side_by_side(n)
                     for n in (1, 2, 4, 8)})
        for label, run in ways.items():
            run()
            best = float("inf")
            for _ in range(2):
                started = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - started)
            print(f"{label:55s} {len(x) / best:5.0f} img/s ({len(x) * GFLOP_FORWARD / best:4.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
