"""Predict throughput of every export format, at batch 1 and 32, against this machine's FLOP ceiling.

    .venv/bin/python benchmarks/predict_throughput.py RUN [--seconds 5]

RUN is a run folder exported with `mobiletune export RUN --format all`. Each format runs on the
same random pixels, in this one process, one after another; the figure is the median of
repeated timed passes. MobileNetV2's forward pass costs about 0.306 GFLOP per 160-px image,
scaled by (size / 160)^2 for other sizes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tutorial_vs_mobiletune import GFLOP_FORWARD, gemm_peak_gflops  # noqa: E402


def images_per_second(predictor, pixels, seconds: float) -> float:
    predictor.predict(pixels)  # warm-up: allocation, graph tracing
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        t = time.perf_counter()
        predictor.predict(pixels)
        rates.append(len(pixels) / (time.perf_counter() - t))
    return statistics.median(rates)


def main() -> None:
    import numpy as np

    from mobiletune.ship.export import FILE_NAMES, FORMATS
    from mobiletune.ship.predict import load_predictor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per format and batch size")
    args = parser.parse_args()
    peak = gemm_peak_gflops()
    rows = []
    for fmt in FORMATS:
        path = args.run / "export" / FILE_NAMES[fmt]
        if not path.exists():
            print(f"{fmt}: not exported, skipped")
            continue
        predictor = load_predictor(path)
        gflop = GFLOP_FORWARD * (predictor.size / 160) ** 2
        rng = np.random.default_rng(0)
        for batch in (1, 32):
            pixels = rng.integers(0, 256, (batch, predictor.size, predictor.size, 3)).astype(np.uint8)
            rate = images_per_second(predictor, pixels, args.seconds)
            rows.append((fmt, batch, rate, rate * gflop / peak))
    print(f"\nfp32 GEMM ceiling {peak:.0f} GFLOP/s on {os.cpu_count()} cores; "
          f"{GFLOP_FORWARD} GFLOP per 160-px image\n")
    print("| format | batch | images/s | share of ceiling |")
    print("|---|---|---|---|")
    for fmt, batch, rate, share in rows:
        print(f"| {fmt} | {batch} | {rate:.0f} | {share:.0%} |")
    best = max(rows, key=lambda r: r[2])
    print(f"\nfastest: {best[0]} at batch {best[1]}, {best[2]:.0f} images/s = {best[3]:.0%} of the ceiling")


if __name__ == "__main__":
    main()
