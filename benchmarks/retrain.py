"""Retraining a folder that grew: `train DATA --from RUN` against training again from scratch, side by side.

    .venv/bin/python benchmarks/retrain.py [--per-class 1000] [--new 0.01] [--px 160] [--root /tmp/retrain]
        [--epochs 1 2 3] [--set KEY=VALUE ...]

The parent trains on cats-vs-dogs with a share of each class's training images held back (symlinks into
../shared; validation/ is the shared one, so every run tests on the same images). Those images are then added,
and the grown folder is trained three ways: cold (an empty feature cache, what a first run pays), again from
scratch with the parent's cache (what a rerun paid before `--from`), and `--from` the parent with each number of
phase-2 epochs. Prints the host, then wall time, its share of the cold run's, and test accuracy with its Wilson
95% interval for each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from scaling import host_line  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "data" / "cats_and_dogs_filtered"


def make_data(root: Path, per_class: int, new: float) -> tuple[Path, Path]:
    """Two folders of symlinks: the parent's (each class's training images but the last `new` share) and the
    grown one (all of them); both with the shared validation/."""
    folders = {"parent": root / "parent-data", "grown": root / "grown-data"}
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)
    held_back = max(1, round(per_class * new))
    for cls in ("cats", "dogs"):
        train = sorted((SHARED / "train" / cls).iterdir())[:per_class]
        for name, files in (("parent", train[:-held_back]), ("grown", train)):
            for split, chosen in (("train", files), ("validation", sorted((SHARED / "validation" / cls).iterdir()))):
                (folders[name] / split / cls).mkdir(parents=True, exist_ok=True)
                for f in chosen:
                    (folders[name] / split / cls / f.name).symlink_to(f)
    return folders["parent"], folders["grown"]


def timed_run(data: Path, out: Path, cache: Path, overrides: list[str], parent: Path | None = None) -> dict:
    from mobiletune import api

    shutil.rmtree(out, ignore_errors=True)
    clock = time.perf_counter()
    run = api.train(data, out, overrides=[f"features.cache_dir={cache}", *overrides], parent=parent, verbose=False)
    test = run.metrics["after_fine_tuning"]["test"]
    return {"seconds": time.perf_counter() - clock, "accuracy": test["accuracy"], "ci": test["accuracy_ci95"],
            "n": test["n"], "computed": run.metrics["features"]["images_computed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--new", type=float, default=0.01, help="share of each class's images added")
    parser.add_argument("--px", type=int, default=160)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 3], help="phase-2 epochs of --from")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "mobiletune-retrain")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    print(f"host: {host_line()}", flush=True)
    parent_data, grown = make_data(args.root, args.per_class, args.new)
    common = [f"data.image_size={args.px}", *args.overrides]
    warm, cold = args.root / "cache", args.root / "cold-cache"
    shutil.rmtree(warm, ignore_errors=True)
    rows = {"parent": timed_run(parent_data, args.root / "parent", warm, common)}
    shutil.rmtree(cold, ignore_errors=True)
    rows["cold (empty cache)"] = timed_run(grown, args.root / "cold", cold, common)
    rows["from scratch, parent's cache"] = timed_run(grown, args.root / "again", warm, common)
    for epochs in args.epochs:
        rows[f"--from, {epochs} epoch(s)"] = timed_run(grown, args.root / f"from-{epochs}", warm,
                                                       [*common, f"phase2.epochs={epochs}"], args.root / "parent")
    base = rows["cold (empty cache)"]["seconds"]
    print(f"{args.per_class} training images a class, {args.new:.0%} added, {args.px} px")
    print("| run | wall s | share of cold | features computed | test accuracy (Wilson 95%) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['seconds'] / base:.0%} | {r['computed']} | {r['accuracy']:.2%} "
              f"({r['ci'][0]:.2%}-{r['ci'][1]:.2%}), n {r['n']} |", flush=True)


if __name__ == "__main__":
    main()
