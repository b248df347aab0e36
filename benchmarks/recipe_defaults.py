"""The default recipe against the seed's exact one, side by side, on data of several sizes and kinds.

    .venv/bin/python benchmarks/recipe_defaults.py [--seeds 0 1 2] [--sets cats flowers] [--sizes full 20 60 200]
        [--out results.jsonl]

"old" is the seed's recipe as written (`phase1.min_steps=0`: 10 epochs of one pass over the training images);
"new" is mobiletune's default (phase 1 takes at least `phase1.min_steps` = 630 optimizer steps, the seed's count
on its own data). Both run in this process, one after the other for each seed (which arm goes first alternates),
each with a cold feature cache of its own, on:
- `full`: the shared set as it is (cats_and_dogs_filtered: 2,000 / 1,000; flowers_mini: 5 x 40);
- N per class: N images of each class, drawn with the seed from the set's images; where a class has fewer
  (flowers_mini has 40), the rest are made from its photos by seeded crops, flips and colour jitter, which
  `data.dedupe` then keeps in one split with their originals.

Prints one line per run and a table of means (test accuracy after fine-tuning and its loss, wall time, phase-1
steps) per set, size and arm, with the host and its measured fp32 GEMM ceiling. Each seed draws its own split,
initial weights and augmentation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
SETS = {"cats": SHARED / "cats_and_dogs_filtered", "flowers": SHARED / "flowers_mini"}
ARMS = {"old": ["phase1.min_steps=0"], "new": []}


def class_files(root: Path) -> dict[str, list[Path]]:
    """Every image of each class, across train/ and validation/ when the set has them."""
    tops = [root / s for s in ("train", "validation") if (root / s).is_dir()] or [root]
    found: dict[str, list[Path]] = {}
    for top in tops:
        for folder in sorted(p for p in top.iterdir() if p.is_dir()):
            found.setdefault(folder.name, []).extend(sorted(folder.glob("*.jpg")))
    return found


def derived(source: Path, dst: Path, rng: random.Random) -> None:
    """A new photo from `source`: a seeded crop of 70-95% of each side, maybe mirrored, brightness and colour
    jittered by up to 20%, saved at JPEG quality 70-95."""
    from PIL import Image, ImageEnhance, ImageOps

    image = Image.open(source).convert("RGB")
    w, h = image.size
    cw, ch = int(w * rng.uniform(0.7, 0.95)), int(h * rng.uniform(0.7, 0.95))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.8, 1.2))
    image.save(dst, quality=rng.randint(70, 95))


def make_subset(name: str, per_class: int, seed: int, dst: Path) -> Path:
    """`per_class` images of each class of set `name` as class folders (mobiletune makes the split)."""
    rng = random.Random(f"{name}:{per_class}:{seed}")
    for cls, files in class_files(SETS[name]).items():
        folder = dst / cls
        folder.mkdir(parents=True)
        chosen = rng.sample(files, min(per_class, len(files)))
        for f in chosen:
            shutil.copy(f, folder / f.name)
        for k in range(per_class - len(chosen)):
            derived(chosen[k % len(chosen)], folder / f"derived_{k}_{chosen[k % len(chosen)].name}", rng)
    return dst


def run_once(data_dir: Path, arm: str, seed: int, scratch: Path) -> dict:
    from mobiletune.config import load_config
    from mobiletune.training.run import train_and_evaluate

    cache = scratch / f"cache-{arm}-{seed}"
    overrides = [*ARMS[arm], f"data.seed={seed}", f"features.cache_dir={cache}"]
    started = time.perf_counter()
    result = train_and_evaluate(load_config(overrides=overrides), data_dir, scratch / f"run-{arm}-{seed}",
                                overwrite=True)
    seconds = time.perf_counter() - started
    shutil.rmtree(cache, ignore_errors=True)
    m = result.metrics
    return {"arm": arm, "seed": seed, "seconds": round(seconds, 1), "n_images": m["n_images"],
            "phase1_steps": m["schedule"]["phase1_steps_per_epoch"] * len([r for r in result.history
                                                                           if r["phase"] == 1]),
            **{f"{stage}_{k}": m[stage]["test"][k] for stage in ("before_fine_tuning", "after_fine_tuning")
               for k in ("accuracy", "loss")}}


def host_line() -> str:
    from mobiletune.ship.latency import host

    sys.path.insert(0, str(HERE))
    from tutorial_vs_mobiletune import gemm_peak_gflops

    return f"host: {host()}; fp32 4096^2 GEMM ceiling {gemm_peak_gflops():.0f} GFLOP/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--sizes", nargs="+", default=["full", "20", "60", "200"])
    parser.add_argument("--out", type=Path, help="also append each run as a JSON line here")
    args = parser.parse_args()
    print(host_line(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="recipe-defaults-") as tmp:
        scratch = Path(tmp)
        for name in args.sets:
            for size in args.sizes:
                for seed in args.seeds:
                    data_dir = SETS[name] if size == "full" else make_subset(name, int(size), seed,
                                                                             scratch / f"{name}-{size}-{seed}")
                    arms = list(ARMS) if seed % 2 == 0 else list(ARMS)[::-1]
                    for arm in arms:
                        row = {"set": name, "size": size, **run_once(data_dir, arm, seed, scratch)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        if args.out:
                            with open(args.out, "a") as f:
                                f.write(json.dumps(row) + "\n")
                    if size != "full":
                        shutil.rmtree(data_dir)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print("\n| set | images per class | recipe | test accuracy after (mean, per seed) | loss after | "
          "before fine-tuning | seconds (median) | phase-1 steps |")
    print("|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["set"], r["size"], r["arm"]) for r in rows}, key=lambda k: (k[0], k[1] != "full", k[1], k[2]))
    for name, size, arm in keys:
        group = [r for r in rows if (r["set"], r["size"], r["arm"]) == (name, size, arm)]
        acc = [r["after_fine_tuning_accuracy"] for r in group]
        print(f"| {name} | {size} | {arm} | {statistics.mean(acc):.1%} ({', '.join(f'{a:.1%}' for a in acc)}) | "
              f"{statistics.mean(r['after_fine_tuning_loss'] for r in group):.3f} | "
              f"{statistics.mean(r['before_fine_tuning_accuracy'] for r in group):.1%} | "
              f"{statistics.median(r['seconds'] for r in group):.0f} | {group[0]['phase1_steps']} |")


if __name__ == "__main__":
    main()
