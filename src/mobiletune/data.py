"""Find the images, split them by content, and decode them as they are needed.

A DATA_DIR holds class folders directly, or `train/` and `validation/` (and optionally `test/`),
each with the same class folders: the `image_dataset_from_directory` convention. A labels CSV
(`labels.py`) may stand in for the folders. Each file is
named by the sha256 of its bytes (hashed once, `scan`); a file that cannot be used is skipped
with a reason (or, with `data.strict`, is an error). The split is drawn from each image's hash,
seeded and stratified, so adding images does not move the others, and saved as a manifest so
later commands see exactly the same images. Pixels are decoded in parallel, a batch at a time,
and never all held in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mobiletune import labels, runfolder
from mobiletune.config import DataConfig
from mobiletune.errors import DataError
from mobiletune.pixels import iter_pixels, probe_image
from mobiletune.scan import FileIndex, hash_files

SPLITS = ("train", "validation", "test")
# Accepted folder (and labels CSV split column) names for each split; the first is the canonical one.
SPLIT_FOLDERS = labels.SPLIT_NAMES


@dataclass(frozen=True)
class Skipped:
    path: str  # relative to DATA_DIR (or a labels CSV's folder), as users see it
    reason: str


@dataclass
class ImageSet:
    """The images of one run: where they are, their labels, split and content digests. No pixels:
    those are decoded when needed (`iter_pixels`, `pixel_dataset`), so memory does not grow with N."""

    root: Path  # DATA_DIR, or a labels CSV's folder; `paths` are relative to it
    classes: list[str]
    paths: list[str]  # relative to root
    labels: np.ndarray  # int32 class index per image
    splits: np.ndarray  # split name per image
    hashes: list[str]  # sha256 of each file's bytes
    skipped: list[Skipped] = field(default_factory=list)
    files_read: int = 0  # how many files the scan had to read (new or changed); the rest came from the index
    source: Path | None = None  # what was given: DATA_DIR or a labels CSV (None: `root`); scanned again from it

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

    def digest(self) -> str:
        """One sha256 for the run's data: every image's content, class and split, not where it lies."""
        lines = sorted(f"{h} {self.classes[c]} {s}\n" for h, c, s in zip(self.hashes, self.labels, self.splits,
                                                                     strict=True))
        return hashlib.sha256("".join(lines).encode()).hexdigest()

    def without(self, failed: dict[int, str]) -> ImageSet:
        """This set less the images at the `failed` positions, each recorded as skipped with its reason."""
        if not failed:
            return self
        keep = np.array([i for i in range(len(self.paths)) if i not in failed], dtype=np.int64)
        skipped = sorted([*self.skipped, *(Skipped(_display(self.paths[i]), r) for i, r in failed.items())],
                         key=lambda s: s.path)
        return replace(self, paths=[self.paths[i] for i in keep], labels=self.labels[keep], splits=self.splits[keep],
                       hashes=[self.hashes[i] for i in keep], skipped=skipped)


# ---------------------------------------------------------------------------------------------
# Finding the files


def _display(path: str) -> str:
    """A path as text that can always be printed and written to UTF-8 files."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# What archives and operating systems leave beside photos: a Mac archive's resource forks (__MACOSX/, and
# ._name files, hidden like every dot file), thumbnails of Synology NAS units, Windows' recycle bin, system
# folder and thumbnail cache, Python's byte code. Never a class or an image: passed over, and listed in
# skipped.csv once a folder.
JUNK_FOLDERS = frozenset({"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information", "__pycache__"})
JUNK_FILES = frozenset({"Thumbs.db", "ehthumbs.db", "desktop.ini", "Icon\r"})
JUNK_REASON = "archive or system folder, not images: passed over"


def _is_shown(name: str, junk: frozenset[str]) -> bool:
    return not name.startswith(".") and name not in junk


def _list_class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and _is_shown(e.name, JUNK_FOLDERS))


def _junk_in(folder: Path) -> list[Path]:
    """The archive and system folders directly in `folder`."""
    return [Path(e.path) for e in os.scandir(folder) if e.is_dir() and e.name in JUNK_FOLDERS]


def _files_under(folder: Path, junk: list[Path]) -> list[Path]:
    """Every file below `folder` but hidden files and archive or system junk, in a stable order; symlinked
    folders are not followed. The junk folders passed over are added to `junk`."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        junk.extend(Path(root, d) for d in dirs if d in JUNK_FOLDERS)
        dirs[:] = sorted(d for d in dirs if _is_shown(d, JUNK_FOLDERS))
        found.extend(Path(root, f) for f in sorted(files) if _is_shown(f, JUNK_FILES))
    return found


@dataclass
class Listing:
    """What a DATA_DIR (or labels CSV) lists, before any file is read."""

    root: Path  # the paths below are relative to it: DATA_DIR, or the CSV's folder
    classes: list[str]
    files: list[tuple[str, str, str | None]]  # (path, class, split), split None where it is ours to make
    skipped: list[Skipped] = field(default_factory=list)  # CSV rows that name no usable file
    where: list[str] | None = None  # per file, the CSV line that listed it ("labels.csv line 7"), for messages


def image_root(source: str | Path) -> Path:
    """The folder a run's image paths are relative to: DATA_DIR itself, or a labels CSV's folder."""
    source = Path(source)
    return source.parent if labels.is_labels_file(source) else source


def check_source(data_dir: str | Path) -> None:
    """A DATA_DIR that cannot be one (missing, a plain file) is refused at once, before minutes of start-up."""
    data_dir = Path(data_dir)
    if labels.is_labels_file(data_dir):
        if not data_dir.is_file():
            raise DataError(f"{data_dir}: no such file")
        return
    if not data_dir.exists():
        raise DataError(f"DATA_DIR {_display(str(data_dir))}: no such folder")
    if not data_dir.is_dir():
        raise DataError(f"DATA_DIR {_display(str(data_dir))}: is a file; give the folder that holds the class "
                        "folders, or a .csv with path,label columns")


def discover(data_dir: Path) -> Listing:
    """Classes and `(path, class, split or None)` for every image file under DATA_DIR or in a labels CSV.

    `split` is None when the folders (or the CSV) give no split and the split is ours to make.
    """
    if labels.is_labels_file(data_dir):
        return _discover_csv(data_dir)
    check_source(data_dir)
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
    _check_class_count(classes, f"{_display(str(data_dir))}" + ("" if None in folders else "/train"), "class folder")
    files, junk = [], _junk_in(data_dir) + [j for s, f in folders.items() if s is not None for j in _junk_in(f)]
    for split, folder in folders.items():
        for name in classes:
            members = _files_under(folder / name, junk)
            if not members:
                raise DataError(
                    f"class folder {_display(str(folder / name))} is empty; add images or remove the folder"
                )
            files.extend((str(p.relative_to(data_dir)), name, split) for p in members)
    passed_over = [Skipped(_display(str(j.relative_to(data_dir))), JUNK_REASON) for j in sorted(junk)]
    return Listing(data_dir, classes, files, passed_over)


def _walk_order(path: str) -> tuple:
    """A sort key that lists paths as `_files_under` walks folders: a folder's files, then its subfolders."""
    *folders, name = Path(path).parts
    return (*((1, f) for f in folders), (0, name))


def _check_class_count(classes: list[str], where: str, what: str) -> None:
    if len(classes) < 2:
        raise DataError(f"{where}: found {len(classes)} {what}(s) {classes}; a classifier needs at least 2")


def _discover_csv(path: Path) -> Listing:
    """A labels CSV as a listing. Rows are put in the order class folders would give (split, class,
    path), so a CSV lists the same run as the folders it describes, whatever its row order."""
    rows, skipped = labels.read_labels(path)
    if not rows:
        raise DataError(f"{path}: no usable rows ({len(skipped)} skipped: empty paths or labels, repeats)")
    classes = sorted({r.label for r in rows})
    _check_class_count(classes, _display(str(path)), "label")
    order = {s: i for i, s in enumerate((None, *SPLITS))}
    rows.sort(key=lambda r: (order[r.split], classes.index(r.label), _walk_order(r.path)))
    return Listing(path.parent, classes, [(r.path, r.label, r.split) for r in rows],
                   [Skipped(_display(p), reason) for p, reason in skipped],
                   [f"{path.name} line {r.line}" for r in rows])


# ---------------------------------------------------------------------------------------------
# The split

# Below this many images a class is split by exact quotas (ranks of the seeded hash); from it on,
# by thresholds on the hash, which never move an image when others are added. Near this size the
# two agree except for a few images at the quota's edge, and a binomial count is within ~10% of
# its quota.
EXACT_SPLIT_BELOW = 1000


def split_unit(seed: int, sha256: str) -> float:
    """A number in [0, 1) drawn from the image's content and the seed alone: its place in the split.

    It does not depend on the image's position or on the other images, so adding images, or
    renaming them, leaves every other image's draw unchanged; copies of one file share a split.
    """
    return int(hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()[:15], 16) / 16**15


def _split_counts(n: int, fraction: float) -> int:
    """How many of a class's n images go to a held-out split: at least 1, leaving at least 1."""
    return min(max(1, round(n * fraction)), n - 1)


def _held_out(members: np.ndarray, hashes: np.ndarray, seed: int, fraction: float, parts: int) -> list[np.ndarray]:
    """`parts` held-out slices of `members` (each `fraction` of them), lowest hash draws first.

    Copies of one file (equal sha256) are one unit: they land in the same split, never across two.
    """
    unique, inverse = np.unique(hashes[members], return_inverse=True)
    units = np.array([split_unit(seed, h) for h in unique])
    order = np.argsort(units, kind="stable")
    if len(unique) < EXACT_SPLIT_BELOW:
        k = _split_counts(len(unique), fraction)
        chosen = [order[p * k : (p + 1) * k] for p in range(parts)]
    else:
        chosen = [np.flatnonzero((units >= p * fraction) & (units < (p + 1) * fraction)) for p in range(parts)]
    return [members[np.isin(inverse, c)] for c in chosen]


def assign_splits(labels: np.ndarray, given: list[str | None], hashes: list[str], config: DataConfig,
                  classes: list[str], groups: dict[str, str] | None = None) -> np.ndarray:
    """A split name per image: kept where the folders say, drawn from each image's hash where not.

    With class folders only, each class is divided into test, validation and train by the seeded
    hash draw (`split_unit`); with train/ and validation/ but no test/, a fraction of each class
    of validation/ becomes the test set the same way. Stratified: exact per-class quotas for
    classes under EXACT_SPLIT_BELOW images, hash thresholds above (stable as the folder grows).
    `groups` maps an image's digest to its group's (near copies, `audit.duplicate_groups`).
    """
    splits = np.array([s or "" for s in given], dtype=object)
    # an image in a group of near copies is split as the group: all of them land in one split
    digests = np.array([groups.get(h, h) for h in hashes] if groups else hashes)
    has_test = "test" in given
    for cls in np.unique(labels):
        if given[0] is None:
            members = np.flatnonzero(labels == cls)
            _check_splittable(classes[cls], members, digests, 3, "", "to split into train/validation/test (or give "
                              "train/ and validation/ folders)")
            test, validation = _held_out(members, digests, config.seed, config.holdout_fraction, 2)
            splits[members] = "train"
            splits[validation] = "validation"
            splits[test] = "test"
        elif not has_test:
            members = np.flatnonzero((labels == cls) & (splits == "validation"))
            _check_splittable(classes[cls], members, digests, 2, " in validation/", "to hold some out as test (or "
                              "add a test/ folder, or test rows)")
            splits[_held_out(members, digests, config.seed, config.test_fraction, 1)[0]] = "test"
    return splits.astype(str)


def _check_splittable(name: str, members: np.ndarray, digests: np.ndarray, needed: int, where: str,
                      purpose: str) -> None:
    """A class needs `needed` distinct units (copies of one photo, near copies too, count once) to split."""
    units = len(np.unique(digests[members]))
    if units >= needed:
        return
    if units < len(members):
        raise DataError(
            f"class {name!r} has {len(members)} usable image(s){where} but only {units} distinct one(s) once near "
            f"copies are kept together; at least {needed} are needed {purpose}; add different photos of it, or "
            "--set data.dedupe=false to split copies apart (its test images then include copies of training images)")
    raise DataError(f"class {name!r} has {len(members)} usable image(s){where}; at least {needed} are needed {purpose}")


# ---------------------------------------------------------------------------------------------
# Putting it together


def load_images(data_dir: str | Path, config: DataConfig, index: FileIndex | None = None,
                progress: Callable[[int, int], None] | None = None, exclude: dict[str, str] | None = None,
                groups: dict[str, str] | None = None) -> ImageSet:
    """Find every file, hash the new or changed ones (`index` remembers the rest), skip what cannot be
    used, and split. Nothing is decoded here: pixels are read when the features or a test need them.

    `progress(done, total)` is called as new files are hashed. `exclude`: {path relative to DATA_DIR:
    reason} of files to leave out (an audit's findings); they are listed as skipped with that reason.
    """
    data_dir = Path(data_dir)
    listing = discover(data_dir)
    root, classes, files, exclude = listing.root, listing.classes, listing.files, exclude or {}
    given = {split for _, _, split in files}
    if given != {None} and not {"train", "validation"} <= given:  # folders are checked in discover(); a CSV here
        raise DataError(f"{data_dir}: its split column names {sorted(s for s in given if s)} but a run needs both "
                        "train and validation rows (test is optional); add them, or drop the split column")
    left_out = [Skipped(_display(p), exclude[p]) for p, _, _ in files if p in exclude]
    where = [w for w, (p, _, _) in zip(listing.where or [None] * len(files), files, strict=True) if p not in exclude]
    files = [f for f in files if f[0] not in exclude]
    hashed, files_read = hash_files([root / f[0] for f in files], index or FileIndex(None), probe_image, progress)
    unusable = sorted([*listing.skipped, *(Skipped(_display(files[i][0]), f"{where[i]}: {h.reason}" if where[i]
                                                   else h.reason) for i, h in enumerate(hashed) if h.reason)],
                      key=lambda s: s.path)
    if unusable and config.strict:
        first = unusable[0]
        raise DataError(
            f"{len(unusable)} file(s) cannot be used, first {first.path}: {first.reason}; "
            "remove them, or drop --strict to skip them"
        )
    skipped = sorted([*unusable, *left_out], key=lambda s: s.path)
    keep = [i for i, h in enumerate(hashed) if not h.reason]
    labels_ = np.array([classes.index(files[i][1]) for i in keep], np.int32)
    for i, cls in enumerate(classes):
        if not (labels_ == i).any():
            raise DataError(f"class {cls!r} has no usable images (all {len(skipped)} skipped files: see skipped.csv)")
    hashes = [hashed[i].sha256 for i in keep]
    splits = assign_splits(labels_, [files[i][2] for i in keep], hashes, config, classes, groups)  # type: ignore[arg-type]
    return ImageSet(
        root=root,
        classes=classes,
        # as the OS names them (non-UTF-8 bytes as surrogates): the manifest round-trips to the file
        paths=[files[i][0] for i in keep],
        labels=labels_,
        splits=splits,
        hashes=hashes,  # type: ignore[arg-type]
        skipped=skipped,
        files_read=files_read,
        source=data_dir,
    )


def check_decodable(images: ImageSet, size: int, batch: int,
                    progress: Callable[[int, int], None] | None = None) -> ImageSet:
    """`images` less those that fail to decode (each skipped with its reason): for paths that
    train on pixels (--no-cache) and so meet every file in the middle of an epoch otherwise."""
    failed: dict[int, str] = {}
    done = 0
    for rows, _, bad in iter_pixels(images, np.arange(len(images.paths)), size, batch):
        failed.update(bad)
        done += len(rows) + len(bad)
        if progress:
            progress(done, len(images.paths))
    return images.without(failed)


def load_test_images(run_dir: Path, data_dir: str | Path | None, config: DataConfig) -> ImageSet:
    """The images to evaluate a finished run on.

    Without `data_dir`: the run's own test split, from its manifest, each file checked against
    its recorded sha256 (read, not decoded: those files decoded when the run made them). With
    `data_dir`: every image under it (class folders in any layout, or every row of a labels CSV) is test,
    each decoded once up
    front so that one that cannot be used is skipped with a reason instead of failing mid-way.
    """

    metrics = runfolder.read_metrics(run_dir)
    classes = metrics["classes"]
    if data_dir is not None:
        listing = discover(Path(data_dir))
        unknown = sorted(set(listing.classes) - set(classes))
        if unknown:
            raise DataError(f"--data {data_dir}: classes {unknown} are not the model's {classes}")
        root = listing.root
        hashed, _ = hash_files([root / p for p, _, _ in listing.files], FileIndex(None), probe_image)
        rows = [(p, c, h.sha256, h.reason) for (p, c, _), h in zip(listing.files, hashed, strict=True)]
        rows += [(s.path, None, None, s.reason) for s in listing.skipped]
    else:
        root = image_root(metrics["data_dir"])
        manifest = [r for r in read_manifest(run_dir / runfolder.SPLIT) if r["split"] == "test"]
        hashed, _ = hash_files([root / r["path"] for r in manifest], FileIndex(None))
        for r, h in zip(manifest, hashed, strict=True):
            if h.sha256 is not None and h.sha256 != r["sha256"]:
                raise DataError(f"{root / r['path']}: changed since the run (sha256 differs); evaluate on --data "
                                "DIR instead")
        rows = [(r["path"], r["class"], r["sha256"], h.reason) for r, h in zip(manifest, hashed, strict=True)]
    images = ImageSet(root=root, classes=classes, paths=[r[0] for r in rows if not r[3]],
                      labels=np.array([classes.index(r[1]) for r in rows if not r[3]], np.int32),
                      splits=np.array(["test"] * sum(not r[3] for r in rows)), hashes=[r[2] for r in rows if not r[3]],
                      skipped=[Skipped(_display(r[0]), r[3]) for r in rows if r[3]])
    if data_dir is not None:
        images = check_decodable(images, config.image_size, config.batch_size)
    if not images.paths:
        raise DataError(f"no usable test images under {root}" + (" (see the skipped files)" if images.skipped else ""))
    return images


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


# ---------------------------------------------------------------------------------------------
# The tutorial's data set, for the demo on machines with internet

CATS_AND_DOGS_URL = "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip"
# sha256 over "relative/path <sha256 of file>" lines of train/ and validation/, sorted by path.
CATS_AND_DOGS_TREE_SHA256 = "7d0418bfcd35ecb61c47f2189e318bb9851a76193526948928970d4522c0960e"


def tree_digest(folder: Path) -> str:
    """One sha256 for the image files of train/ and validation/ under `folder`."""
    lines = []
    for split in ("train", "validation"):
        for path in _files_under(folder / split, []):
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
