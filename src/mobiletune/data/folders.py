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

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mobiletune import runfolder
from mobiletune.config import DataConfig
from mobiletune.data import labels
from mobiletune.data.images import SPLITS, ImageSet, Skipped, display_path
from mobiletune.data.manifest import read_manifest
from mobiletune.data.pixels import iter_pixels, probe_image
from mobiletune.data.scan import NOT_AN_IMAGE, FileIndex, hash_files
from mobiletune.data.split import assign_splits
from mobiletune.errors import DataError

# Accepted folder (and labels CSV split column) names for each split; the first is the canonical one.
SPLIT_FOLDERS = labels.SPLIT_NAMES


# ---------------------------------------------------------------------------------------------
# Finding the files


# What archives and operating systems leave beside photos: a Mac archive's resource forks (__MACOSX/, and
# ._name files, hidden like every dot file), thumbnails of Synology NAS units, Windows' recycle bin, system
# folder and thumbnail cache, Python's byte code. Never a class or an image: passed over, and listed in
# skipped.csv once a folder.
JUNK_FOLDERS = frozenset({"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information", "__pycache__"})
JUNK_FILES = frozenset({"Thumbs.db", "ehthumbs.db", "desktop.ini", "Icon\r"})
JUNK_REASON = "archive or system folder, not images: passed over"
NO_SUCH_FILE = "listed in --exclude, but no such image here"  # a reported skip that is no file


def _is_shown(name: str, junk: frozenset[str]) -> bool:
    return not name.startswith(".") and name not in junk


def _list_class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and _is_shown(e.name, JUNK_FOLDERS))


def _junk_in(folder: Path) -> list[Path]:
    """The archive and system folders directly in `folder`."""
    return [Path(e.path) for e in os.scandir(folder) if e.is_dir() and e.name in JUNK_FOLDERS]


def files_under(folder: Path, junk: list[Path]) -> list[Path]:
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
        raise DataError(f"DATA_DIR {display_path(str(data_dir))}: no such folder")
    if not data_dir.is_dir():
        raise DataError(f"DATA_DIR {display_path(str(data_dir))}: is a file; give the folder that holds the class "
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
                f"DATA_DIR {display_path(str(data_dir))}: has {have}/ but not both train/ and validation/; "
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
    where = display_path(str(data_dir)) + ("" if None in folders else "/train")
    _check_class_count(classes, where, "class folder")
    files, junk = [], _junk_in(data_dir) + [j for s, f in folders.items() if s is not None for j in _junk_in(f)]
    for split, folder in folders.items():
        for name in classes:
            members = files_under(folder / name, junk)
            if not members:
                raise DataError(
                    f"class folder {display_path(str(folder / name))} is empty; add images or remove the folder"
                )
            files.extend((str(p.relative_to(data_dir)), name, split) for p in members)
    passed_over = [Skipped(display_path(str(j.relative_to(data_dir))), JUNK_REASON) for j in sorted(junk)]
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
    _check_class_count(classes, display_path(str(path)), "label")
    order = {s: i for i, s in enumerate((None, *SPLITS))}
    rows.sort(key=lambda r: (order[r.split], classes.index(r.label), _walk_order(r.path)))
    return Listing(path.parent, classes, [(r.path, r.label, r.split) for r in rows],
                   [Skipped(display_path(p), reason) for p, reason in skipped],
                   [f"{path.name} line {r.line}" for r in rows])


# ---------------------------------------------------------------------------------------------
# Putting it together


def parent_training_images(parent: str) -> frozenset[str]:
    """The digests of the training images of the run folder `parent` (`data.parent`, its split.csv); none without
    one. Checked here, where a run needs it, not in the config: a run trained from a parent that has since gone
    still evaluates and exports."""
    if not parent:
        return frozenset()
    split = Path(parent) / runfolder.SPLIT
    if not split.is_file():
        raise DataError(f"data.parent={parent!r}: no {runfolder.SPLIT} there; give the folder of a finished run, or "
                        "drop --from")
    return frozenset(r["sha256"] for r in read_manifest(split) if r["split"] == "train")


def _relative(exclude: dict[str, str], files: list[tuple[str, str, str | None]], root: Path) -> dict[str, str]:
    """--exclude's paths as the listing names files: as given where one matches, else absolute ones under the data
    folder made relative to it (links not followed: a linked image is excluded by its own path), and Windows
    separators read as "/"."""
    named, out = {p for p, _, _ in files}, {}
    for path, reason in exclude.items():
        if path not in named:
            path = path.replace("\\", "/")
            for base in {os.path.abspath(root), os.path.realpath(root)}:
                if os.path.isabs(path) and Path(os.path.abspath(path)).is_relative_to(base):
                    path = Path(os.path.abspath(path)).relative_to(base).as_posix()
            path = os.path.normpath(path) if path else path
        out[path] = reason
    return out


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
    exclude = _relative(exclude, files, root)
    left_out = [Skipped(display_path(p), exclude[p]) for p, _, _ in files if p in exclude]
    left_out += [Skipped(display_path(p), f"{NO_SUCH_FILE} ({exclude[p]})")
                 for p in sorted(set(exclude) - {p for p, _, _ in files})]
    where = [w for w, (p, _, _) in zip(listing.where or [None] * len(files), files, strict=True) if p not in exclude]
    files = [f for f in files if f[0] not in exclude]
    hashed, files_read = hash_files([root / f[0] for f in files], index or FileIndex(None), probe_image, progress)
    unusable = sorted([*listing.skipped, *(Skipped(display_path(files[i][0]), f"{where[i]}: {h.reason}" if where[i]
                                                   else h.reason) for i, h in enumerate(hashed) if h.reason)],
                      key=lambda s: s.path)
    # --strict stops on images that cannot be used; junk folders and files that are no image are passed over still
    failed = [s for s in unusable if s.reason != JUNK_REASON and not s.reason.startswith(NOT_AN_IMAGE)]
    if failed and config.strict:
        raise DataError(f"{len(failed)} file(s) cannot be used, first {failed[0].path}: {failed[0].reason}; "
                        "remove them, or drop --strict to skip them")
    skipped = sorted([*unusable, *left_out], key=lambda s: s.path)
    keep = [i for i, h in enumerate(hashed) if not h.reason]
    labels_ = np.array([classes.index(files[i][1]) for i in keep], np.int32)
    for i, cls in enumerate(classes):
        if not (labels_ == i).any():
            bad = [(files[j][0], h.reason) for j, h in enumerate(hashed) if h.reason and files[j][1] == cls]
            raise DataError(f"class {cls!r} has no usable images" + (
                f": its {len(bad)} file(s) cannot be used (first {display_path(bad[0][0])}: {bad[0][1]})" if bad
                else " (every one of its files is left out by --exclude)"))
    hashes = [hashed[i].sha256 for i in keep]
    splits = assign_splits(labels_, [files[i][2] for i in keep], hashes, config, classes, groups,  # type: ignore[arg-type]
                           parent_training_images(config.parent))
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


def _run_test_rows(run_dir: Path, root: Path, missing_ok: bool) -> list[tuple[str, str, str, str | None]]:
    """(path, class, sha256, why it cannot be used) of the run's test split, each file checked against its recorded
    sha256: one changed or gone is an error (the test set would quietly become another one), unless `missing_ok`."""
    manifest = [r for r in read_manifest(run_dir / runfolder.SPLIT) if r["split"] == "test"]
    hashed, _ = hash_files([root / r["path"] for r in manifest], FileIndex(None))
    reasons = [h.reason or ("changed since the run (sha256 differs)" if h.sha256 != r["sha256"] else None)
               for r, h in zip(manifest, hashed, strict=True)]
    if all(reasons) and manifest:
        raise DataError(f"none of the run's {len(manifest)} test images is under {root} any more: was the data "
                        "folder moved? Put it back there (--data DIR would test on every image under DIR, training "
                        "images too)")
    bad = [(r["path"], why) for r, why in zip(manifest, reasons, strict=True) if why]
    if bad and not missing_ok:
        raise DataError(f"{len(bad)} of the run's {len(manifest)} test images cannot be used under {root} (first: "
                        f"{bad[0][0]}: {bad[0][1]}); restore it, or evaluate on other images: mobiletune evaluate "
                        f"{run_dir} --data DIR")
    return [(r["path"], r["class"], r["sha256"], why) for r, why in zip(manifest, reasons, strict=True)]


def load_test_images(run_dir: Path, data_dir: str | Path | None, config: DataConfig, *,
                     missing_ok: bool = False) -> ImageSet:
    """The images to evaluate a finished run on (`missing_ok`: a test image gone is skipped, not an error: an
    export's re-test needs only some of them).

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
        rows = _run_test_rows(run_dir, root, missing_ok)
    images = ImageSet(root=root, classes=classes, paths=[r[0] for r in rows if not r[3]],
                      labels=np.array([classes.index(r[1]) for r in rows if not r[3]], np.int32),
                      splits=np.array(["test"] * sum(not r[3] for r in rows)), hashes=[r[2] for r in rows if not r[3]],
                      skipped=[Skipped(display_path(r[0]), r[3]) for r in rows if r[3]])
    if data_dir is not None:
        images = check_decodable(images, config.image_size, config.batch_size)
    if not images.paths:
        raise DataError(f"no usable test images under {root}" + (" (see the skipped files)" if images.skipped else ""))
    return images
# sha256 over "relative/path <sha256 of file>" lines of train/ and validation/, sorted by path.
