"""The data sets benchmarks/unknown_inputs.py measures on, built under a scratch folder (never the repo).

    .venv/bin/python benchmarks/unknown_sets.py [--root /tmp/uk]

Known sets, N training images per class (N in SIZES), as train/ validation/ test/ folders of links to the
shared images (and generated files), so each size keeps the same test images:
- cats_dogs/N: train/ the first N of each class of cats_and_dogs_filtered/train (1000 is all of it),
  validation/ max(5, N // 4) of each class from its validation/ (a user's validation grows with the set),
  test/ 50 of each class (validation/ images 250-299);
- flowers/N: flowers_mini has 40 photos a class: 8 are test, 4 validation, the other 28 the pool for train/;
  N = 20 takes 20 of them, larger N all 28 plus seeded random crops, flips and colour jitter of them
  (a copy never crosses into validation or test).
Unknown sets: flowers_all (all 200 flower photos), cats_dogs_other (400 cats and dogs not used above), and
synthetic/{flat,text,noise}: 30 flat colours, 30 text screenshots, 30 noise images (uniform and smoothed).
Near-OOD: near/<class> is flowers_mini without that class (class folders, split by mobiletune).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SIZES = (20, 60, 200, 1000)
FLOWER_TEST, FLOWER_VAL = 8, 4


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        dst.symlink_to(src)


def sorted_jpgs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jpg"))


def cats_dogs(root: Path, n: int) -> None:
    for c in ("cats", "dogs"):
        train, val = sorted_jpgs(SHARED / "cats_and_dogs_filtered/train" / c), \
            sorted_jpgs(SHARED / "cats_and_dogs_filtered/validation" / c)
        for split, files in (("train", train[:n]), ("validation", val[:max(5, n // 4)]), ("test", val[250:300])):
            for f in files:
                link(f, root / f"cats_dogs/{n}" / split / c / f.name)


def jitter(image, rng: np.random.Generator):
    """One seeded variant: a random crop of 40-100% of the area, a flip half the time, +-25% brightness,
    contrast and saturation."""
    from PIL import ImageEnhance, ImageOps

    w, h = image.size
    area, aspect = rng.uniform(0.4, 1.0), np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = min(w, int(round(w * np.sqrt(area * aspect)))), min(h, int(round(h * np.sqrt(area / aspect))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = image.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhance(out).enhance(rng.uniform(0.75, 1.25))
    return out


def flowers(root: Path, n: int) -> None:
    from PIL import Image

    for c in sorted(p.name for p in (SHARED / "flowers_mini").iterdir() if p.is_dir()):
        files = sorted_jpgs(SHARED / "flowers_mini" / c)
        test, val, pool = files[:FLOWER_TEST], files[FLOWER_TEST:FLOWER_TEST + FLOWER_VAL], \
            files[FLOWER_TEST + FLOWER_VAL:]
        base = root / f"flowers/{n}"
        for split, chosen in (("test", test), ("validation", val), ("train", pool[:n])):
            for f in chosen:
                link(f, base / split / c / f.name)
        rng = np.random.default_rng([n, len(c), sum(map(ord, c))])
        for i in range(max(0, n - len(pool))):
            dst = base / "train" / c / f"gen_{i:04d}.jpg"
            if not dst.exists():
                with Image.open(pool[i % len(pool)]) as im:
                    jitter(im.convert("RGB"), rng).save(dst, quality=90)


def synthetic(root: Path, count: int = 30) -> None:
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(7)
    for kind in ("flat", "text", "noise"):
        (root / "synthetic" / kind).mkdir(parents=True, exist_ok=True)
    words = ("invoice total due", "def main():", "Settings > Privacy", "Meeting at 10:30", "ERROR 404",
             "lorem ipsum dolor", "print(hello)", "Q3 revenue +12%")
    for i in range(count):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        Image.new("RGB", (200, 200), colour).save(root / "synthetic/flat" / f"flat_{i:02d}.png")
        text = Image.new("RGB", (320, 240), (255, 255, 255) if i % 2 else (30, 30, 36))
        draw = ImageDraw.Draw(text)
        for line in range(8):
            draw.text((10, 8 + 28 * line), " ".join(rng.choice(words, 2)), fill=(0, 0, 0) if i % 2 else (220, 220, 220),
                      font_size=int(rng.integers(12, 22)))
        text.save(root / "synthetic/text" / f"text_{i:02d}.png")
        noise = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
        img = Image.fromarray(noise)
        if i % 2:  # smoothed noise: blobs rather than pixel grain
            img = img.filter(ImageFilter.GaussianBlur(int(rng.integers(2, 8))))
        img.save(root / "synthetic/noise" / f"noise_{i:02d}.png")


def build(root: Path) -> None:
    for n in SIZES:
        cats_dogs(root, n)
        flowers(root, n)
    for c in ("cats", "dogs"):
        for f in sorted_jpgs(SHARED / "cats_and_dogs_filtered/validation" / c)[300:500]:
            link(f, root / "cats_dogs_other" / c / f.name)
    for c_dir in sorted((SHARED / "flowers_mini").iterdir()):
        for f in sorted_jpgs(c_dir):
            link(f, root / "flowers_all" / c_dir.name / f.name)
            for held in (p.name for p in (SHARED / "flowers_mini").iterdir()):
                if held != c_dir.name:
                    link(f, root / "near" / held / c_dir.name / f.name)
    synthetic(root)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/uk"))
    build(parser.parse_args().root)
