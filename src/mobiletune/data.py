"""Find the images, decode each once, make a fixed split, and feed them to Keras.

A DATA_DIR holds class folders directly, or `train/` and `validation/` (and optionally `test/`),
each with the same class folders: the `image_dataset_from_directory` convention. Every file is
read once: its bytes are hashed and decoded, and a file that cannot be used is skipped with a
reason (or, with `data.strict`, is an error). The split is then made once, seeded and
stratified, and saved as a manifest so later commands see exactly the same images.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mobiletune.config import DataConfig
from mobiletune.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SPLITS = ("train", "validation", "test")
# Accepted folder names for each split; the first is the canonical one.
SPLIT_FOLDERS = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}


class BadImage(Exception):
    """A file that cannot be used as an image; the message is the reason users see."""


@dataclass(frozen=True)
class Skipped:
    path: str  # relative to DATA_DIR, as users see it
    reason: str


@dataclass
class ImageSet:
    """The decoded images of one run: pixels, labels and the manifest they came from."""

    classes: list[str]
    paths: list[str]  # relative to DATA_DIR
    labels: np.ndarray  # int32 class index per image
    splits: np.ndarray  # split name per image
    hashes: list[str]  # sha256 of each file's bytes
    pixels: np.ndarray  # uint8 [n, size, size, 3]
    skipped: list[Skipped] = field(default_factory=list)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

    def counts(self) -> dict[str, int]:
        return {s: int((self.splits == s).sum()) for s in SPLITS}

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class, for reports."""
        return {
            s: {c: int(((self.splits == s) & (self.labels == i)).sum()) for i, c in enumerate(self.classes)}
            for s in SPLITS
        }


# ---------------------------------------------------------------------------------------------
# Finding the files


def _display(path: str) -> str:
    """A path as text that can always be printed and written to UTF-8 files."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _list_class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _files_under(folder: Path) -> list[Path]:
    """Every non-hidden file below `folder`, in a stable order; symlinked folders are not followed."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root, f) for f in sorted(files) if not f.startswith("."))
    return found


def discover(data_dir: Path) -> tuple[list[str], list[tuple[Path, str, str | None]]]:
    """Classes and `(file, class, split or None)` for every file under DATA_DIR.

    `split` is None when DATA_DIR holds class folders directly and the split is ours to make.
    """
    if not data_dir.exists():
        raise DataError(f"DATA_DIR {_display(str(data_dir))}: no such folder")
    if not data_dir.is_dir():
        raise DataError(f"DATA_DIR {_display(str(data_dir))}: is a file; give the folder that holds the class folders")
    top = _list_class_folders(data_dir)
    present = {
        split: next((name for name in names if name in top), None) for split, names in SPLIT_FOLDERS.items()
    }
    if present["train"] or present["validation"]:
        if not (present["train"] and present["validation"]):
            have = present["train"] or present["validation"]
            raise DataError(
                f"DATA_DIR {_display(str(data_dir))}: has {have}/ but not both train/ and validation/; "
                "add the missing folder, or put the class folders directly in DATA_DIR"
            )
        folders = {s: data_dir / name for s, name in present.items() if name}
    else:
        folders = {None: data_dir}

    classes_by_split = {s: _list_class_folders(f) for s, f in folders.items()}
    classes = next(iter(classes_by_split.values()))
    for split, found in classes_by_split.items():
        if found != classes:
            raise DataError(
                f"class folders differ between splits: {split}/ has {found}, train/ has {classes}; "
                "every split needs the same class folders"
            )
    if len(classes) < 2:
        where = f"{_display(str(data_dir))}" + ("" if None in folders else "/train")
        raise DataError(
            f"{where}: found {len(classes)} class folder(s) {classes}; a classifier needs at least 2"
        )
    files = []
    for split, folder in folders.items():
        for name in classes:
            members = _files_under(folder / name)
            if not members:
                raise DataError(
                    f"class folder {_display(str(folder / name))} is empty; add images or remove the folder"
                )
            files.extend((p, name, split) for p in members)
    return classes, files


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Bytes of any common image file -> uint8 RGB [size, size, 3].

    Oddities that still hold a picture are converted, not refused: EXIF rotation, CMYK,
    grayscale, 16-bit, palette and alpha (dropped), animation (first frame). Raises BadImage.
    """
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("P", "PA") or "transparency" in image.info:
                image = image.convert("RGBA")  # palette transparency: alpha is then dropped below
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8))
            image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"too large to decode safely ({exc.__class__.__name__})") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadImage(f"cannot decode ({exc})") from None


def _read_one(path: Path, size: int) -> tuple[str, np.ndarray]:
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise BadImage(f"not an image file extension (expected one of {', '.join(IMAGE_EXTENSIONS)})")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadImage(f"cannot read ({exc.strerror or exc})") from None
    return hashlib.sha256(data).hexdigest(), decode_image(data, size)


# ---------------------------------------------------------------------------------------------
# The split


def _split_counts(n: int, fraction: float) -> int:
    """How many of a class's n images go to a held-out split: at least 1, leaving at least 1."""
    return min(max(1, round(n * fraction)), n - 1)


def assign_splits(
    labels: np.ndarray, given: list[str | None], config: DataConfig, classes: list[str]
) -> np.ndarray:
    """A split name per image: kept where the folders say, made stratified and seeded where not.

    With train/ and validation/ but no test/, a fraction of each class of validation/ becomes
    the test set. With class folders only, each class is divided train/validation/test.
    """
    splits = np.array([s or "" for s in given], dtype=object)
    rng = np.random.default_rng(config.seed)
    has_test = "test" in given
    for cls in np.unique(labels):
        if given[0] is None:
            members = rng.permutation(np.flatnonzero(labels == cls))
            n = len(members)
            if n < 3:
                raise DataError(
                    f"class {classes[cls]!r} has {n} usable image(s); at least 3 are needed to split into "
                    "train/validation/test (or give train/ and validation/ folders)"
                )
            k = _split_counts(n, config.holdout_fraction)
            splits[members[:k]] = "test"
            splits[members[k : 2 * k]] = "validation"
            splits[members[2 * k :]] = "train"
        elif not has_test:
            members = rng.permutation(np.flatnonzero((labels == cls) & (splits == "validation")))
            if len(members) < 2:
                raise DataError(
                    f"class {classes[cls]!r} has {len(members)} usable image(s) in validation/; at least 2 "
                    "are needed to hold some out as test (or add a test/ folder)"
                )
            splits[members[: _split_counts(len(members), config.test_fraction)]] = "test"
    return splits.astype(str)


# ---------------------------------------------------------------------------------------------
# Putting it together


def load_images(data_dir: str | Path, config: DataConfig, progress=None) -> ImageSet:
    """Discover, hash and decode every file once, skip what cannot be used, and split.

    `progress(done, total)` is called as files are decoded.
    """
    data_dir = Path(data_dir)
    classes, files = discover(data_dir)
    pixels = np.empty((len(files), config.image_size, config.image_size, 3), np.uint8)
    ok = np.zeros(len(files), bool)
    hashes = [""] * len(files)
    skipped: list[Skipped] = []

    def work(i: int) -> None:
        path = files[i][0]
        try:
            hashes[i], pixels[i] = _read_one(path, config.image_size)
            ok[i] = True
        except BadImage as exc:
            skipped.append(Skipped(_display(str(path.relative_to(data_dir))), str(exc)))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for done, _ in enumerate(pool.map(work, range(len(files))), 1):
            if progress:
                progress(done, len(files))
    skipped.sort(key=lambda s: s.path)
    if skipped and config.strict:
        first = skipped[0]
        raise DataError(
            f"{len(skipped)} file(s) cannot be used, first {first.path}: {first.reason}; "
            "remove them, or drop --strict to skip them"
        )
    keep = np.flatnonzero(ok)
    labels = np.array([classes.index(files[i][1]) for i in keep], np.int32)
    for i, cls in enumerate(classes):
        if not (labels == i).any():
            raise DataError(f"class {cls!r} has no usable images (all {len(skipped)} skipped files: see skipped.csv)")
    splits = assign_splits(labels, [files[i][2] for i in keep], config, classes)
    return ImageSet(
        classes=classes,
        # as the OS names them (non-UTF-8 bytes as surrogates): the manifest round-trips to the file
        paths=[str(files[i][0].relative_to(data_dir)) for i in keep],
        labels=labels,
        splits=splits,
        hashes=[hashes[i] for i in keep],
        pixels=pixels[keep] if len(keep) < len(files) else pixels,
        skipped=skipped,
    )


def load_test_images(run_dir: Path, data_dir: str | Path | None, config: DataConfig) -> ImageSet:
    """The images to evaluate a finished run on.

    Without `data_dir`: the run's own test split, from its manifest, each file checked against
    its recorded sha256. With `data_dir`: every image under it (class folders, any layout) is test.
    """
    from mobiletune.runfolder import read_json

    metrics = read_json(run_dir / "metrics.json")
    classes = metrics["classes"]
    if data_dir is not None:
        found, files = discover(Path(data_dir))
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"--data {data_dir}: classes {unknown} are not the model's {classes}")
        rows = [(str(p.relative_to(data_dir)), c) for p, c, _ in files]
        root = Path(data_dir)
    else:
        root = Path(metrics["data_dir"])
        manifest = [r for r in read_manifest(run_dir / "split.csv") if r["split"] == "test"]
        rows = [(r["path"], r["class"]) for r in manifest]
        expected = {r["path"]: r["sha256"] for r in manifest}
    pixels = np.empty((len(rows), config.image_size, config.image_size, 3), np.uint8)
    keep, skipped, hashes = [], [], []
    for i, (rel, _) in enumerate(rows):
        try:
            digest, pixels[i] = _read_one(root / rel, config.image_size)
        except BadImage as exc:
            skipped.append(Skipped(rel, str(exc)))
            continue
        if data_dir is None and digest != expected[rel]:
            raise DataError(f"{root / rel}: changed since the run (sha256 differs); evaluate on --data DIR instead")
        keep.append(i)
        hashes.append(digest)
    if not keep:
        raise DataError(f"no usable test images under {root}")
    return ImageSet(classes=classes, paths=[rows[i][0] for i in keep],
                    labels=np.array([classes.index(rows[i][1]) for i in keep], np.int32),
                    splits=np.array(["test"] * len(keep)), hashes=hashes, pixels=pixels[keep], skipped=skipped)


def write_manifest(images: ImageSet, path: Path) -> None:
    from mobiletune.runfolder import write_csv

    write_csv(
        path,
        ["path", "class", "split", "sha256"],
        [
            [p, images.classes[c], s, h]
            for p, c, s, h in zip(images.paths, images.labels, images.splits, images.hashes, strict=True)
        ],
    )


def write_skipped(images: ImageSet, path: Path) -> None:
    from mobiletune.runfolder import write_csv

    write_csv(path, ["path", "reason"], [[s.path, s.reason] for s in images.skipped])


def read_manifest(path: Path) -> list[dict[str, str]]:
    from mobiletune.runfolder import read_csv

    return read_csv(path)


def tf_dataset(images: ImageSet, split: str, batch_size: int, *, shuffle: bool, seed: int,
               initial_epoch: int = 0, epochs: int = 1):
    """A batched tf.data pipeline of (float32 pixels 0-255, int label) for one split.

    Shuffled: epochs `initial_epoch` .. `epochs - 1` back to back, epoch e in an order drawn
    from (seed, e) alone, so a resumed run sees exactly the batches an unbroken one would.
    Fit it with steps_per_epoch = ceil(n / batch_size).
    """
    import tensorflow as tf

    idx = images.indices(split)
    pixels, labels = tf.constant(images.pixels[idx]), tf.constant(images.labels[idx])
    if shuffle:
        def epoch_order(epoch):
            order = tf.random.experimental.stateless_shuffle(tf.range(len(idx)), seed=tf.stack([seed, epoch]))
            return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

        batches = tf.data.Dataset.range(initial_epoch, epochs).flat_map(epoch_order)
    else:
        batches = tf.data.Dataset.range(len(idx)).batch(batch_size)
    ds = batches.map(lambda i: (tf.cast(tf.gather(pixels, i), tf.float32), tf.gather(labels, i)),
                     num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------------------
# The tutorial's data set, for the demo on machines with internet

CATS_AND_DOGS_URL = "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip"
# sha256 over "relative/path <sha256 of file>" lines of train/ and validation/, sorted by path.
CATS_AND_DOGS_TREE_SHA256 = "7d0418bfcd35ecb61c47f2189e318bb9851a76193526948928970d4522c0960e"


def tree_digest(folder: Path) -> str:
    """One sha256 for the image files of train/ and validation/ under `folder`."""
    lines = []
    for split in ("train", "validation"):
        for path in _files_under(folder / split):
            lines.append(f"{path.relative_to(folder).as_posix()} {hashlib.sha256(path.read_bytes()).hexdigest()}\n")
    return hashlib.sha256("".join(sorted(lines, key=lambda s: s.encode())).encode()).hexdigest()


def fetch_cats_and_dogs() -> Path:
    """Download (once, via keras.utils.get_file) and verify the tutorial's cats-vs-dogs set."""
    import keras

    try:
        archive = keras.utils.get_file("cats_and_dogs_filtered.zip", origin=CATS_AND_DOGS_URL, extract=True)
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise DataError(f"cannot download {CATS_AND_DOGS_URL} ({exc}); give a local DATA_DIR instead") from None
    root = next(Path(archive).rglob("cats_and_dogs_filtered"), Path(archive))
    if tree_digest(root) != CATS_AND_DOGS_TREE_SHA256:
        raise DataError(f"{root}: the downloaded files do not match the expected checksum; delete it and retry")
    return root
