"""How much of a planted mess `mobiletune audit` finds: near copies, label swaps and off-topic images.

    .venv/bin/python benchmarks/data_checks.py [--datasets cats flowers] [--sizes 20 60 200] [--seeds 0 1 2]
        [--recipes mild hard stretched] [--quick] [--json results.json]

Per data set, size (images a class) and seed: a subset of the shared set (../shared/data), cats_and_dogs_filtered at
20, 60, 200 a class, flowers_mini (40 a class) at 20, 40, 100, classes above 40 topped up with images made from its
photos (seeded crop of 70-90% of the area, flipped half the time, brightness and colour jittered by up to 20%).
From 100 a class the layout is train/ + validation/ (80/20), and near copies go to validation (leaks); below, class
folders. The subset is audited unmodified, then once per near-copy recipe with faults planted (truth recorded):
near copies (3%, at least 3) as new files of the same class, `mild` = 2-4% cropped a side, resized to 85%, JPEG 55,
`hard` = 8-10% a side, 50%, JPEG 30, `stretched` = 0-15% a side, 60%, the height stretched by up to 20%,
brightness and contrast by up to 20%, JPEG 40, plus 2 mirrored `mild` copies scored apart; label swaps (3%, at
least 3) moved to another class; off-topic photos from the other shared set (2%, at least 3) and synthetic images
(1%, at least 3: flat colour, text lines on white, noise). Every recipe shares a seed's subset, swaps and
off-topic draws.
Scoring reads OUT/audit.csv (`--all`; a finding is a row flagged true): a copy is found when a duplicate
row pairs it with its original (or with a crop made from that photo, in the topped-up sets), a swap or off-topic
image when a row names it. The full shared sets are audited
too, cats_and_dogs_filtered twice (the second time every feature is cached: the checks alone). Features go to a
fresh cache under /tmp/data_checks. --quick: seed 0, the smallest size, no full sets (a couple of minutes).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
SETS = {"cats": SHARED / "cats_and_dogs_filtered", "flowers": SHARED / "flowers_mini"}
OTHER = {"cats": "flowers", "flowers": "cats"}
SIZES = {"cats": [20, 60, 200], "flowers": [20, 40, 100]}
SPLIT_FOLDERS_FROM = 100  # images per class from which the set is laid out as train/ + validation/
RECIPES = {"mild": {"crop": (0.02, 0.04), "scale": 0.85, "quality": 55},
           "hard": {"crop": (0.08, 0.10), "scale": 0.50, "quality": 30},
           # added after the keypoint check's settings were chosen, to test it on a recipe it was not chosen on:
           # uneven crops, the height stretched by up to a fifth, brightness and contrast changed by up to 20%
           "stretched": {"crop": (0.0, 0.15), "scale": 0.60, "quality": 40, "stretch": 0.2, "jitter": 0.2}}
FLIPPED = 2  # mirrored mild copies per set: features of a flipped photo differ more, so they are scored apart
WORK = Path("/tmp/data_checks")
WORDS = "error warning file open save cancel network loading settings user password update the of and".split()
sys.path.insert(0, str(HERE))
from recipe_defaults import class_files  # noqa: E402  (every image of each class, across train/ and validation/)


def derived(source: Path, rng: random.Random):
    """A new photo from `source`: a crop of 70-90% of its area, mirrored half the time, colour jittered."""
    from PIL import Image, ImageEnhance, ImageOps

    image = Image.open(source).convert("RGB")
    w, h = image.size
    side = rng.uniform(0.70, 0.90) ** 0.5
    cw, ch = int(w * side), int(h * side)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((x, y, x + cw, y + ch))
    image = ImageOps.mirror(image) if rng.random() < 0.5 else image
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Color(image).enhance(rng.uniform(0.8, 1.2))


def near_copy(source: Path, recipe: dict, rng: random.Random, flip: bool = False):
    """`source` cropped by recipe's share on each side, resized (the height stretched by up to its `stretch`),
    brightness and contrast changed by up to its `jitter`, maybe mirrored (saved at its JPEG quality)."""
    from PIL import Image, ImageEnhance, ImageOps

    image = Image.open(source).convert("RGB")
    w, h = image.size
    left, right, top, bottom = (rng.uniform(*recipe["crop"]) for _ in range(4))
    image = image.crop((int(w * left), int(h * top), w - int(w * right), h - int(h * bottom)))
    stretch = 1 + rng.uniform(-1, 1) * recipe["stretch"] if "stretch" in recipe else 1  # no draw: mild, hard
    image = image.resize((max(8, int(image.width * recipe["scale"])),
                          max(8, int(image.height * recipe["scale"] * stretch))))
    for change in (ImageEnhance.Brightness, ImageEnhance.Contrast) if "jitter" in recipe else ():
        image = change(image).enhance(1 + rng.uniform(-1, 1) * recipe["jitter"])
    return ImageOps.mirror(image) if flip else image


def synthetic(kind: str, rng: random.Random):
    """An image no class should hold: a flat colour, text lines on white (a screenshot), or noise."""
    from PIL import Image, ImageDraw, ImageFont

    size = (rng.randint(300, 500), rng.randint(240, 400))
    if kind == "flat":
        return Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    if kind == "noise":
        pixels = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (size[1], size[0], 3), np.uint8)
        return Image.fromarray(pixels)
    image = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=rng.randint(12, 20))
    for y in range(10, size[1] - 20, 26):
        draw.text((10, y), " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))), fill="black", font=font)
    return image


def make_clean(name: str, size: int, seed: int, dst: Path) -> tuple[list[str], dict[str, str]]:
    """The unmodified subset in `dst`: (class names, {relative path: the original it was made from})."""
    rng = random.Random(f"subset:{name}:{size}:{seed}")
    files, origin = class_files(SETS[name]), {}
    for cls, pool in files.items():
        chosen, placed = rng.sample(pool, min(size, len(pool))), {}
        for k in range(size):
            source = chosen[k % len(chosen)]
            split = "" if size < SPLIT_FOLDERS_FROM else "train/" if k < 0.8 * size else "validation/"
            rel = f"{split}{cls}/{source.name if k < len(chosen) else f'derived_{k}_{source.name}'}"
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            if k < len(chosen):
                shutil.copy(source, dst / rel)
            else:
                derived(source, rng).save(dst / rel, quality=rng.randint(70, 95))
            origin[rel] = placed.setdefault(source, rel)  # a derived image's origin: where its photo went
    return list(files), origin


def plant(name: str, clean: Path, classes: list[str], origin: dict[str, str], recipe: str, seed: int,
          dst: Path) -> dict:
    """A copy of `clean` with faults planted in `dst`; returns the truth. Draws depend on the seed, not the
    recipe, so both recipes get the same swaps and off-topic images."""
    shutil.copytree(clean, dst)
    rng = random.Random(f"plant:{name}:{len(origin)}:{seed}")
    look = random.Random(f"copies:{name}:{len(origin)}:{recipe}:{seed}")
    n = len(origin)
    k_copy, k_swap = max(3, round(0.03 * n)), max(3, round(0.03 * n))
    k_photo, k_synth = max(3, round(0.02 * n)), max(3, round(0.01 * n))
    originals = sorted(r for r in origin if origin[r] == r and not r.startswith("validation/"))
    picked = rng.sample(originals, k_copy + FLIPPED + k_swap)
    truth: dict = {"copies": {}, "flipped": {}, "swaps": {}, "photo": [], "synthetic": []}
    train = "train/" if originals[0].startswith("train/") else ""
    for i, rel in enumerate(picked[:k_copy + FLIPPED]):
        flip, cls = i >= k_copy, rel.split("/")[-2]
        new = f"{'validation/' if train else ''}{cls}/{'flip' if flip else 'copy'}_{i}.jpg"
        image = near_copy(clean / rel, RECIPES["mild" if flip else recipe], look, flip)
        image.save(dst / new, quality=RECIPES["mild" if flip else recipe]["quality"])
        truth["flipped" if flip else "copies"][new] = rel
    for rel in picked[k_copy + FLIPPED:]:
        cls = rel.split("/")[-2]
        new = f"{train}{rng.choice([c for c in classes if c != cls])}/swap_{Path(rel).name}"
        shutil.move(dst / rel, dst / new)
        truth["swaps"][new] = rel
    others = sorted(p for ps in class_files(SETS[OTHER[name]]).values() for p in ps)
    for i, source in enumerate(rng.sample(others, k_photo)):
        truth["photo"].append(f"{train}{rng.choice(classes)}/offtopic_{i}.jpg")
        shutil.copy(source, dst / truth["photo"][-1])
    for i in range(k_synth):
        kind = ("flat", "text", "noise")[i % 3]
        truth["synthetic"].append(f"{train}{rng.choice(classes)}/{kind}_{i}.jpg")
        synthetic(kind, rng).save(dst / truth["synthetic"][-1], quality=90)
    return truth


def audit(data_dir: Path, out: Path, cache: Path) -> tuple[list[dict], float]:
    """The real audit (`mobiletune audit DATA_DIR --set data.image_size=160`): (audit.csv rows, seconds)."""
    from mobiletune.api import make_config
    from mobiletune.audit.run import audit_folder

    config = make_config(overrides={"data.image_size": 160, "features.cache_dir": str(cache)})
    started = time.perf_counter()
    audit_folder(config, data_dir, out, overwrite=True, listing="all")  # every image, so a miss has a rank
    seconds = time.perf_counter() - started
    with open(out / "audit.csv", newline="") as f:
        return list(csv.DictReader(f)), seconds


def is_flagged(row: dict) -> bool:
    return row["flagged"] == "true"


def named(row: dict) -> set[str]:
    return {row["path"], row["other_path"]} - {""} if "duplicate" in row["issue"] else {row["path"]}


def flagged_images(rows: list[dict], origin: dict[str, str]) -> dict[str, set[str]]:
    """{issue: images a flagged row of it names}, leaving out duplicate pairs of one origin (a derived image and
    the photo it was made from, a planted copy and its original)."""
    found: dict[str, set[str]] = {}
    for r in rows:
        if is_flagged(r) and not ("duplicate" in r["issue"]
                                  and origin.get(r["path"], r["path"]) == origin.get(r["other_path"])):
            found.setdefault(r["issue"], set()).update(named(r))
    return found


def unmodified(rows: list[dict], origin: dict[str, str], n: int, seconds: list[float]) -> dict:
    """What the audit flags in a set with nothing planted: every image counted once, and per issue."""
    by_issue = flagged_images(rows, origin)
    return {"n": n, "flagged": sorted(set().union(*by_issue.values())), "seconds": seconds,
            "issues": {issue: len(paths) for issue, paths in sorted(by_issue.items())}}


def rank(rows: list[dict], path: str, issue: str) -> str:
    """Where `path` stands among the `issue` rows (CSV order, most suspicious first), with its score."""
    listed = [r for r in rows if r["issue"] == issue]
    hits = [(i, r) for i, r in enumerate(listed, 1) if r["path"] == path]
    return f"{path}: {issue} rank {hits[0][0]}/{len(listed)} score {hits[0][1]['score']}" if hits else \
        f"{path}: not in the {len(listed)} {issue} rows"


def paired(pairs: set[frozenset], copy: str, origin: dict[str, str]) -> bool:
    """Whether a flagged duplicate pair joins `copy` to an image of its photo: the original, or (in sets topped up
    with crops) a crop made from it, which is as much a copy of that photo."""
    return any(copy in pair and origin.get(other, other) == origin[copy] for pair in pairs for other in pair - {copy})


def score(rows: list[dict], truth: dict, origin: dict[str, str]) -> dict:
    """Planted faults found, per kind, against the audit's rows."""
    pairs = {frozenset(named(r)) for r in rows if is_flagged(r) and "duplicate" in r["issue"]}
    flagged = set().union(*flagged_images(rows, origin).values())
    errors = {r["path"] for r in rows if is_flagged(r) and r["issue"] == "label_error"}
    planted = {*truth["copies"], *truth["copies"].values(), *truth["flipped"], *truth["flipped"].values(),
               *truth["swaps"], *truth["photo"], *truth["synthetic"]}
    result = {kind: sum(paired(pairs, c, origin) for c in truth[kind]) for kind in ("copies", "flipped")}
    result |= {"swaps": len(errors & set(truth["swaps"])), "label_error_rows": len(errors),
               "photo": len(flagged & set(truth["photo"])), "synthetic": len(flagged & set(truth["synthetic"])),
               "other_flagged": len(flagged - planted)}
    result["missed"] = [rank(rows, p, "label_error") for p in truth["swaps"] if p not in errors]
    result["missed"] += [rank(rows, p, "outlier") for p in truth["photo"] + truth["synthetic"] if p not in flagged]
    result["missed"] += [f"{kind} {c} ~ {o} not paired" for kind in ("copies", "flipped")
                         for c, o in truth[kind].items() if not paired(pairs, c, origin)]
    return result


def run_set(name: str, size: int, seed: int, recipes: list[str], cache: Path) -> list[dict]:
    """One clean subset audited as it is and with each recipe's faults planted: a record per recipe."""
    base = WORK / f"{name}-{size}-{seed}"
    shutil.rmtree(base, ignore_errors=True)
    classes, origin = make_clean(name, size, seed, base / "clean")
    rows, seconds = audit(base / "clean", base / "audit-clean", cache)
    clean = unmodified(rows, origin, len(origin), [seconds])
    records = []
    for recipe in recipes:
        truth = plant(name, base / "clean", classes, origin, recipe, seed, base / recipe)
        rows, seconds = audit(base / recipe, base / f"audit-{recipe}", cache)
        moved = {new: origin[old] for kind in ("copies", "flipped", "swaps") for new, old in truth[kind].items()}
        found = score(rows, truth, {**origin, **moved})
        planted = {k: len(v) for k, v in truth.items()}
        layout = "split folders" if size >= SPLIT_FOLDERS_FROM else "class folders"
        n = len(origin) + sum(planted[k] for k in ("copies", "flipped", "photo", "synthetic"))
        records.append({"set": name, "size": size, "seed": seed, "recipe": recipe, "layout": layout, "n_images": n,
                        "seconds": seconds, "planted": planted, "found": found, "truth": truth, "clean": clean})
        print(f"{name} {size}/class seed {seed} {recipe}: {json.dumps({k: v for k, v in found.items()})} "
              f"(clean: {len(clean['flagged'])}/{clean['n']} flagged; {seconds:.1f} s)", flush=True)
    shutil.rmtree(base)
    return records


def full_sets(names: list[str], cache: Path) -> list[dict]:
    """Each whole shared set audited as it is; cats_and_dogs_filtered a second time, its features cached."""
    records = []
    for name in names:
        times = []
        for _ in range(2 if name == "cats" else 1):
            rows, seconds = audit(SETS[name], WORK / f"audit-full-{name}", cache)
            times.append(seconds)
        n = sum(len(v) for v in class_files(SETS[name]).values())
        records.append({"set": name, **unmodified(rows, {}, n, times)})
        print(f"full {name}: {len(records[-1]['flagged'])}/{n} flagged {records[-1]['issues']}, seconds {times}",
              flush=True)
    return records


def cell(found: int, planted: int, spec: str = ".0%") -> str:
    return f"{found}/{planted} ({found / planted:{spec}})" if planted else "-"


def clean_cell(cleans: list[dict]) -> str:
    """Images flagged in unmodified sets, with how many each issue flagged (an image may be under several)."""
    issues = {i: sum(c["issues"].get(i, 0) for c in cleans) for i in ("near_duplicate", "exact_duplicate",
                                                                     "label_error", "outlier")}
    return (f"{cell(sum(len(c['flagged']) for c in cleans), sum(c['n'] for c in cleans), '.1%')}: "
            f"{issues['near_duplicate'] + issues['exact_duplicate']} dup, {issues['label_error']} label, "
            f"{issues['outlier']} outlier")


def print_tables(records: list[dict], full: list[dict]) -> None:
    print("\n| set | per class | layout | recipe | images a set | near copies found | flipped copies | swaps flagged | "
          "swap precision | off-topic photos | off-topic synthetic | other images flagged | unmodified set flagged "
          "(images; per issue) | audit s (median) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["set"], r["size"], r["recipe"]), []).append(r)
    groups[("all", "", "")] = records
    for (name, size, recipe), group in groups.items():
        tot = {k: sum(r["found"][k] for r in group) for k in ("copies", "flipped", "swaps", "label_error_rows",
                                                             "photo", "synthetic", "other_flagged")}
        planted = {k: sum(r["planted"][k] for r in group) for k in group[0]["planted"]}
        n = sum(r["n_images"] for r in group)
        shown = n if name == "all" else n // len(group)  # a set's images; all sets' on the totals row
        cleans = list({(r["set"], r["size"], r["seed"]): r["clean"] for r in group}.values())  # one per seed
        print(f"| **{name}** | {size} | {group[0]['layout'] if size else ''} | {recipe} | {shown} | "
              f"{cell(tot['copies'], planted['copies'])} | {cell(tot['flipped'], planted['flipped'])} | "
              f"{cell(tot['swaps'], planted['swaps'])} | {cell(tot['swaps'], tot['label_error_rows'])} | "
              f"{cell(tot['photo'], planted['photo'])} | {cell(tot['synthetic'], planted['synthetic'])} | "
              f"{tot['other_flagged']} ({tot['other_flagged'] / n:.1%}) | {clean_cell(cleans)} | "
              f"{statistics.median(r['seconds'] for r in group):.1f} |")
    if full:
        print("\n| unmodified set | images | flagged (images; per issue) | audit s | again, cached (checks only) |")
        print("|---|---|---|---|---|")
        for f in full:
            again = f"{f['seconds'][1]:.1f}" if len(f["seconds"]) > 1 else "-"
            print(f"| {f['set']} | {f['n']} | {clean_cell([f])} | {f['seconds'][0]:.1f} | {again} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--sizes", type=int, nargs="+", help="images per class (default: 20 60 200 for cats, "
                        "20 40 100 for flowers)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--quick", action="store_true", help="seed 0, the smallest size, no full-set audits")
    parser.add_argument("--json", type=Path, help="write every record (truth, findings, misses) here")
    args = parser.parse_args()
    from scaling import host_line
    from tutorial_vs_mobiletune import gemm_peak_gflops

    print(f"host: {host_line()}; fp32 4096^2 GEMM ceiling {gemm_peak_gflops():.0f} GFLOP/s", flush=True)
    started, cache = time.perf_counter(), WORK / "feature-cache"
    shutil.rmtree(cache, ignore_errors=True)  # cold: the first full-set audit times the feature pass too
    full = [] if args.quick else full_sets(args.datasets, cache)
    records = []
    for name in args.datasets:
        sizes = args.sizes or SIZES[name]
        for size in sizes[:1] if args.quick else sizes:
            for seed in args.seeds[:1] if args.quick else args.seeds:
                records += run_set(name, size, seed, args.recipes, cache)
    shutil.rmtree(cache, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"full": full, "records": records}, indent=1))
    print_tables(records, full)
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
