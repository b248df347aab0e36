"""What bounds label-swap detection on small folders: the features the audit's probe reads, or the probe?

    .venv/bin/python benchmarks/label_probe.py [--seeds 0 1 2] [--json results.json]

The audit finds swapped labels from a logistic-regression probe's out-of-fold probabilities
(`audit.scores.out_of_fold_probabilities`, `label_issue_mask`). Its recall on flowers is far below its recall on
cats vs dogs at the same size (docs/audit.md), and the probe is only as right as the features let it be. This
measures, side by side on the same images, the probe's out-of-fold accuracy and swaps found with the features
the audit uses (MobileNetV2's pooled ImageNet features at 160 px) and with richer ones it could use:
- `160 + mirror`: the mean of the image's and its mirror's features (a second feature pass);
- `224`: the size the ImageNet weights were trained at (about twice the feature pass);
- `160 + block 14`: block 14's pooled output beside the last layer's (both unit length);
- `160, square root`: the features square-rooted (power normalisation) before the probe.
Sets: flowers_mini at 20 and 40 a class, cats_and_dogs_filtered at 60 and 200 a class (drawn per seed from its
train/ folders). Per seed, 3% of the labels (at least 3) are moved to another class in memory, as the
data_checks benchmark moves files, and the clean labels are scored too. Every variant reads the same pixels
(PIL, bilinear resize to the size, scaled to [-1, 1]).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
SETS = {"flowers": (SHARED / "flowers_mini", [20, 40]), "cats": (SHARED / "cats_and_dogs_filtered", [60, 200])}
POOL = 300  # cats and dogs drawn from the first 300 training images a class (every seed's subsets lie in them)
SWAPS = 0.03  # share of labels moved, as benchmarks/data_checks.py
VARIANTS = ("160 (the audit's)", "160 + mirror", "224", "160 + block 14", "160, square root")
sys.path.insert(0, str(HERE))


def images_of(name: str) -> tuple[list[Path], np.ndarray]:
    root, _ = SETS[name]
    tops = [root / "train"] if (root / "train").is_dir() else [root]
    paths, labels = [], []
    for top in tops:
        for label, folder in enumerate(sorted(p for p in top.iterdir() if p.is_dir())):
            files = sorted(folder.glob("*.jpg"))[:POOL]
            paths += files
            labels += [label] * len(files)
    return paths, np.array(labels)


def pixels(paths: list[Path], size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR), np.float32)
                     for p in paths]) / 127.5 - 1.0


def features(paths: list[Path]) -> dict[str, np.ndarray]:
    """Every variant's features of `paths`."""
    import keras

    out = {}
    for size in (160, 224):
        base = keras.applications.MobileNetV2(input_shape=(size, size, 3), include_top=False, weights="imagenet")
        pool = keras.layers.GlobalAveragePooling2D()
        both = keras.Model(base.input, [pool(base.output), pool(base.get_layer("block_14_add").output)])
        x = pixels(paths, size)
        last, block14 = both.predict(x, batch_size=32, verbose=0)
        if size == 224:
            out["224"] = last
            continue
        mirrored, _ = both.predict(x[:, :, ::-1], batch_size=32, verbose=0)
        unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
        out |= {VARIANTS[0]: last, VARIANTS[1]: (last + mirrored) / 2,
                VARIANTS[3]: np.concatenate([unit(last), unit(block14)], axis=1), VARIANTS[4]: np.sqrt(last)}
    return out


def swapped(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The labels with SWAPS of them moved to another class, and which were moved."""
    classes = labels.max() + 1
    moved = rng.choice(len(labels), max(3, round(SWAPS * len(labels))), replace=False)
    out = labels.copy()
    out[moved] = (labels[moved] + rng.integers(1, classes, len(moved))) % classes
    return out, np.isin(np.arange(len(labels)), moved)


def scored(feats: np.ndarray, labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    from mobiletune.audit import scores

    probs, _ = scores.out_of_fold_probabilities(feats, labels)
    flagged = scores.label_issue_mask(labels, probs)
    return {"accuracy": float((probs.argmax(1) == labels)[~truth].mean()), "found": int((flagged & truth).sum()),
            "swaps": int(truth.sum()), "flagged": int(flagged.sum())}


def run(seeds: list[int]) -> list[dict]:
    rows = []
    for name, (_, sizes) in SETS.items():
        paths, labels = images_of(name)
        feats = features(paths)
        for size in sizes:
            for seed in seeds:
                rng = np.random.default_rng(seed)
                chosen = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), size, replace=False)
                                                 for c in np.unique(labels)]))
                moved, truth = swapped(labels[chosen], rng)
                for variant, f in feats.items():
                    clean = scored(f[chosen], labels[chosen], np.zeros(len(chosen), bool))
                    planted = scored(f[chosen], moved, truth)
                    rows.append({"set": name, "per_class": size, "seed": seed, "variant": variant,
                                 "accuracy": clean["accuracy"], "clean_flagged": clean["flagged"],
                                 "images": len(chosen), **{k: planted[k] for k in ("found", "swaps", "flagged")}})
            print(f"{name} at {size} a class: done", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| set | per class | features | probe accuracy (clean labels) | swaps found | precision | "
             "clean images flagged |", "|---|---|---|---|---|---|---|"]
    keys = dict.fromkeys((r["set"], r["per_class"], r["variant"]) for r in rows)
    for name, size, variant in keys:
        group = [r for r in rows if (r["set"], r["per_class"], r["variant"]) == (name, size, variant)]
        found, swaps, flagged = (sum(r[k] for r in group) for k in ("found", "swaps", "flagged"))
        clean, images = sum(r["clean_flagged"] for r in group), sum(r["images"] for r in group)
        accuracy = np.mean([r["accuracy"] for r in group])
        lines.append(f"| {name} | {size} | {variant} | {accuracy:.1%} | {found}/{swaps} ({found / swaps:.0%}) | "
                     f"{found}/{flagged} ({found / max(flagged, 1):.0%}) | {clean}/{images} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from scaling import host_line
    from tutorial_vs_mobiletune import gemm_peak_gflops

    warnings.filterwarnings("ignore")
    print(f"host: {host_line()}; fp32 4096^2 GEMM ceiling {gemm_peak_gflops():.0f} GFLOP/s", flush=True)
    started = time.perf_counter()
    rows = run(args.seeds)
    print(f"\n{table(rows)}\n\nwall time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
