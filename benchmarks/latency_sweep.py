"""The accuracy-against-latency sweep, measured: a cold multi-objective sweep (features, latency
measurements and retrains included) beside one tutorial-style run of the seed's recipe on the same host.

    .venv/bin/python benchmarks/latency_sweep.py [DATA_DIR] [--trials 24] [--no-tutorial] [--sampler nsga2]
        [--workers 2]

The budget is the 160-px float TFLite latency x 1.5 (measured first, inside the timed part). Prints
the host, the front (its input sizes), the point chosen within the budget and its test accuracy
after fine-tuning, the default recipe's, and the sweep's wall time against the tutorial run's.
`--sampler nsga2` swaps the study's multi-objective TPE for NSGA-II (population 8, so 24 trials make
3 generations; its default of 50 would make them all random), to compare how far each gets: the
front's hypervolume (validation accuracy x ms saved, against 0.5 accuracy and the slowest trial).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mobiletune.data.manifest import read_manifest
from tutorial_vs_mobiletune import DEFAULT_DATA, link_split, run_arm  # noqa: E402

BUDGET_FACTOR = 1.5  # the budget: 1.5x the seed's 160-px model's latency


def tutorial_seconds(data_dir: str) -> float:
    """One tutorial-style run (10 + 10 epochs) on mobiletune's split, in its own process."""
    from mobiletune.config import DataConfig
    from mobiletune.data import folders as data
    from mobiletune.data import manifest

    with tempfile.TemporaryDirectory(prefix="mt-tutorial-") as tmp:
        images = data.load_images(data_dir, DataConfig())
        manifest.write_manifest(images, Path(tmp) / "split.csv")
        roots = link_split(Path(data_dir), read_manifest(Path(tmp) / "split.csv"), Path(tmp) / "links")
        result = run_arm(["--arm", "tutorial", data_dir, "--payload",
                          json.dumps({"roots": {k: str(v) for k, v in roots.items()}, "seed": 0})])
    return result["wall"]


def use_nsga2() -> None:
    """In this process only: the study's sampler is NSGA-II instead of TPE (same seed)."""
    import optuna

    optuna.samplers.TPESampler = lambda seed=None, **_: optuna.samplers.NSGAIISampler(seed=seed, population_size=8)


def hypervolume(front: list[dict], reference_ms: float) -> float:
    """Area the front dominates in (accuracy above 0.5) x (ms below `reference_ms`): larger is better. Each
    point dominates [its ms, reference] x [0.5, its accuracy]; going from fastest to slowest, each adds
    only the accuracy it gains over the faster points."""
    area, covered = 0.0, 0.5
    for ms, acc in sorted((p["latency_ms_tflite"], p["val_accuracy"]) for p in front):
        if acc > covered and ms < reference_ms:
            area += (reference_ms - ms) * (acc - covered)
            covered = acc
    return area


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", nargs="?", default=str(DEFAULT_DATA))
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--no-tutorial", action="store_true", help="skip the tutorial-style run")
    parser.add_argument("--out", default=None, help="keep the sweep folder here (default: a temporary one)")
    parser.add_argument("--sampler", choices=["tpe", "nsga2"], default="tpe")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (mobiletune sweep --workers)")
    args = parser.parse_args()
    if args.sampler == "nsga2":
        use_nsga2()

    import mobiletune as mt
    from mobiletune.config import load_config
    from mobiletune.data import folders as data
    from mobiletune.quiet import import_tensorflow
    from mobiletune.ship import latency


    with tempfile.TemporaryDirectory(prefix="mt-latency-sweep-") as tmp:
        cache = Path(tmp) / "cache"  # cold: features, ONNX exports and latencies all measured inside the clock
        out = Path(args.out or Path(tmp) / "sweep")
        started = time.perf_counter()
        import_tensorflow()  # inside the clock, as a cold `mobiletune sweep` pays it; muted, as the commands do
        config = load_config(overrides=[f"features.cache_dir={cache}"])
        classes = len(data.discover(Path(args.data_dir)).classes)
        budget = BUDGET_FACTOR * latency.latency_ms(config, classes, "tflite", cache)
        results = mt.sweep(args.data_dir, out, trials=args.trials, objectives="accuracy,latency",
                           max_latency_ms=budget, overrides={"features.cache_dir": str(cache)}, workers=args.workers,
                           verbose=True)
        sweep_seconds = time.perf_counter() - started
        # the largest size's latency: one reference for every sampler's hypervolume
        reference = latency.latency_ms(load_config(overrides=[f"features.cache_dir={cache}", "data.image_size=224"]),
                                       classes, "tflite", cache)
    tutorial = None if args.no_tutorial else tutorial_seconds(args.data_dir)

    front_sizes = sorted({p["params"].get("data.image_size", 160) for p in results["front"]})
    chosen = results["chosen"]
    print(f"\nhost: {results['host']}")
    print(f"front: {len(results['front'])} points, input sizes {front_sizes}")
    for p in results["front"]:
        print(f"  trial {p['trial']:>3}  {p['params'].get('data.image_size', 160)} px  val {p['val_accuracy']:.4f}  "
              f"{p['latency_ms_tflite']:.2f} ms float, {p['latency_ms_tflite_int8']:.2f} ms int8")
    print(f"budget: {budget:.2f} ms (160-px float x {BUDGET_FACTOR}); chosen trial {chosen['trial']} at "
          f"{chosen['params'].get('data.image_size', 160)} px, {chosen['latency_ms_tflite']:.2f} ms")
    for name in ("best", "default"):
        before, after = (results[name][f"{s}_fine_tuning"]["test"] for s in ("before", "after"))
        print(f"{name}: test accuracy after fine-tuning {after['accuracy']:.2%} (loss {after['loss']:.4f}), "
              f"before {before['accuracy']:.2%}")
    print(f"front hypervolume ({args.sampler}): {hypervolume(results['front'], reference):.4f} "
          f"(accuracy above 0.5 x ms under the 224-px model's {reference:.2f})")
    print(f"sweep, everything included: {sweep_seconds:.0f} s ({results['counts']})")
    if tutorial is not None:
        print(f"tutorial-style run: {tutorial:.0f} s; sweep / tutorial = {sweep_seconds / tutorial:.2f}")


if __name__ == "__main__":
    main()
