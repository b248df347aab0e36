import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CATS_DOGS
from mobiletune.config import DataConfig
from mobiletune.data import folders as data
from mobiletune.data import manifest, split
from mobiletune.data.manifest import read_manifest
from mobiletune.data.split import assign_splits
from mobiletune.errors import DataError
from test_pixels import _png_bytes

CFG = DataConfig(image_size=32)


def _write(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


def test_bad_files_are_skipped_counted_and_listed(cats_dogs_tiny, tmp_path):
    cats = cats_dogs_tiny / "train" / "cats"
    _write(cats / "zero.jpg", b"")
    _write(cats / "text.JPG", b"hello")
    _write(cats / "notes.txt", b"hello")
    os.symlink("loop_b.jpg", cats / "loop_a.jpg")
    os.symlink("loop_a.jpg", cats / "loop_b.jpg")
    os.symlink("gone.jpg", cats / "dangling.jpg")  # unreadable (root reads chmod 000 files, so not that)
    _write(cats / "odd.png", _png_bytes(Image.new("LA", (9, 9))))  # usable: converted
    Image.new("RGB", (9, 9)).save(cats / "scan.TIFF")  # a scanner's: usable
    weird = os.fsdecode(b"caf\xe9.jpg")  # not UTF-8
    _write(cats / weird, b"garbage")
    images = data.load_images(cats_dogs_tiny, CFG)
    reasons = {s.path: s.reason for s in images.skipped}
    assert len(reasons) == 7, reasons
    assert "cannot read" in reasons["train/cats/dangling.jpg"]
    assert "empty file" in reasons["train/cats/zero.jpg"]
    assert "not an image file extension" in reasons["train/cats/notes.txt"]
    assert "cannot read" in reasons["train/cats/loop_a.jpg"]
    assert "train/cats/caf\\xe9.jpg" in reasons
    assert "train/cats/odd.png" in images.paths and "train/cats/scan.TIFF" in images.paths
    out = tmp_path / "skipped.csv"
    manifest.write_skipped(images, out)
    assert len(out.read_text().splitlines()) == 8

    # --strict stops on the images that cannot be used (6): notes.txt is no image, so no failed one
    with pytest.raises(DataError, match="6 file.*--strict"):
        data.load_images(cats_dogs_tiny, DataConfig(image_size=32, strict=True))


def test_given_splits_carve_test_from_validation(cats_dogs_tiny):
    images = data.load_images(cats_dogs_tiny, CFG)
    counts = images.counts()
    assert counts == {"train": 12, "validation": 8, "test": 2}
    for i in range(len(images.classes)):  # stratified: each class held out
        assert ((images.splits == "test") & (images.labels == i)).sum() == 1
    assert all(p.startswith("validation/") for p in np.array(images.paths)[images.indices("test")])
    assert len(set(images.paths)) == len(images.paths)  # no file in two splits


def test_test_folder_is_kept(cats_dogs_tiny):
    from conftest import copy_images

    copy_images(CATS_DOGS / "validation", cats_dogs_tiny / "test", 3, offset=100)
    images = data.load_images(cats_dogs_tiny, CFG)
    assert images.counts() == {"train": 12, "validation": 10, "test": 6}


def test_class_folders_only_split_80_10_10_seeded(flowers_tiny):
    a = data.load_images(flowers_tiny, DataConfig(image_size=32, seed=1))
    b = data.load_images(flowers_tiny, DataConfig(image_size=32, seed=1))
    c = data.load_images(flowers_tiny, DataConfig(image_size=32, seed=2))
    assert a.counts() == {"train": 15, "validation": 5, "test": 5}
    assert list(a.splits) == list(b.splits)
    assert list(a.splits) != list(c.splits)
    assert a.hashes == b.hashes


def test_manifest_round_trip(cats_dogs_tiny, tmp_path):
    images = data.load_images(cats_dogs_tiny, CFG)
    manifest.write_manifest(images, tmp_path / "split.csv")
    rows = read_manifest(tmp_path / "split.csv")
    assert [r["path"] for r in rows] == images.paths
    assert {r["split"] for r in rows} == {"train", "validation", "test"}
    assert all(len(r["sha256"]) == 64 for r in rows)


@pytest.mark.parametrize(
    ("arrange", "message"),
    [
        (lambda root: root / "missing", "no such folder"),
        (lambda root: _file(root / "a_file"), "is a file"),
        (lambda root: _classes(root, ["only"]), "at least 2"),
        (lambda root: _classes(root, ["a", "b"], empty="b"), "is empty"),
        (lambda root: _classes(root / "train", ["a", "b"]) and _classes(root / "validation", ["a", "c"]) and root,
         "differ between splits"),
        (lambda root: _classes(root / "train", ["a", "b"]).parent, "not both train/ and validation/"),
        (lambda root: _classes(root, ["a", "b"], per_class=2), "at least 3"),
    ],
    ids=["missing", "file", "one-class", "empty-class", "differing-classes", "no-validation", "too-few"],
)
def test_unusable_data_dirs(tmp_path, arrange, message):
    with pytest.raises(DataError, match=message):
        data.load_images(arrange(tmp_path), CFG)


def test_class_with_only_bad_files(tmp_path):
    root = _classes(tmp_path, ["a", "b"], per_class=3)
    for f in (root / "b").iterdir():
        f.write_bytes(b"broken")
    with pytest.raises(DataError, match=r"'b' has no usable images: its 3 file\(s\) cannot be used \(first b/0.png: "
                                        "not an image PIL can read"):  # said here: no run folder, no skipped.csv
        data.load_images(root, CFG)


def _file(path: Path) -> Path:
    path.write_text("x")
    return path


def _classes(root: Path, names: list[str], per_class: int = 3, empty: str | None = None) -> Path:
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(0 if name == empty else per_class):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / name / f"{i}.png")
    return root


def test_non_utf8_names_are_used_and_round_trip(cats_dogs_tiny, tmp_path):
    name = os.fsdecode(b"chat_\xe9t\xe9.jpg")  # Latin-1 bytes: not valid UTF-8
    (cats_dogs_tiny / "train" / "cats" / name).write_bytes((CATS_DOGS / "train" / "cats" / "cat.50.jpg").read_bytes())
    images = data.load_images(cats_dogs_tiny, CFG)
    assert f"train/cats/{name}" in images.paths
    manifest.write_manifest(images, tmp_path / "split.csv")
    rows = read_manifest(tmp_path / "split.csv")
    assert all((cats_dogs_tiny / r["path"]).is_file() for r in rows)  # every manifest path opens its file


def _random_hashes(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(32).hex() for _ in range(n)]


@pytest.mark.parametrize("n", [3000, 200], ids=["thresholds", "exact-quotas"])
def test_adding_images_never_moves_a_training_image_into_test(n):
    """Splits are drawn from each image's hash: a grown folder keeps the old images where they were
    (above EXACT_SPLIT_BELOW exactly; below it, quotas may shift a held-out image by one split)."""
    config = DataConfig(seed=3)
    hashes = _random_hashes(n, 0)
    before = assign_splits(np.zeros(n, np.int32), [None] * n, hashes, config, ["a"])
    grown = hashes + _random_hashes(n // 10, 1)
    after = assign_splits(np.zeros(len(grown), np.int32), [None] * len(grown), grown, config, ["a"])[:n]
    assert not ((before == "train") & (after == "test")).any()
    moved = int((before != after).sum())
    if n >= split.EXACT_SPLIT_BELOW:
        assert moved == 0
        assert abs((before == "test").sum() - n * config.holdout_fraction) < 4 * (n * 0.1 * 0.9) ** 0.5
    else:
        assert moved <= 2 * (n // 10) * config.holdout_fraction + 4  # only images at a quota's edge
        assert (before == "test").sum() == (before == "validation").sum() == round(n * config.holdout_fraction)


def test_copies_of_one_file_share_a_split():
    hashes = _random_hashes(40, 2)
    hashes += hashes[:10]  # ten files twice
    splits = assign_splits(np.zeros(50, np.int32), [None] * 50, hashes, DataConfig(), ["a"])
    assert all(splits[i] == splits[40 + i] for i in range(10))


def test_the_split_does_not_depend_on_file_names_or_order(flowers_tiny):
    a = data.load_images(flowers_tiny, CFG)
    for f in sorted(flowers_tiny.rglob("*.jpg")):
        f.rename(f.with_name("renamed_" + f.name))
    b = data.load_images(flowers_tiny, CFG)
    assert dict(zip(a.hashes, a.splits, strict=True)) == dict(zip(b.hashes, b.splits, strict=True))


def test_a_runs_test_images_are_checked_against_the_manifest(cats_dogs_tiny, tmp_path):
    """Evaluating a run on its own test split: a file edited since the run is an error that says what to do;
    the others are read, not decoded, to check them."""
    from mobiletune import runfolder

    images = data.load_images(cats_dogs_tiny, CFG)
    run = tmp_path / "run"
    run.mkdir()
    runfolder.write_json(run / "metrics.json", {"classes": images.classes, "data_dir": str(cats_dogs_tiny)})
    manifest.write_manifest(images, run / "split.csv")
    test = data.load_test_images(run, None, CFG)
    assert test.paths == [images.paths[i] for i in images.indices("test")]
    victim = cats_dogs_tiny / test.paths[0]
    original = victim.read_bytes()
    victim.write_bytes(original + b"\0")
    with pytest.raises(DataError, match=f"1 of the run's {len(test.paths)} test images cannot be used under .*"
                                        f"first: {test.paths[0]}: changed since the run .sha256 differs..; restore it, "
                                        "or evaluate on other images: mobiletune evaluate .*run --data DIR"):
        data.load_test_images(run, None, CFG)
    victim.unlink()  # a test image gone: the test set would quietly be another one
    with pytest.raises(DataError, match=f"1 of the run's {len(test.paths)} test images cannot be used under .*"
                                        f"first: {test.paths[0]}: cannot read"):
        data.load_test_images(run, None, CFG)
    some = data.load_test_images(run, None, CFG, missing_ok=True)  # an export's re-test: the others, the gone listed
    assert some.paths == test.paths[1:] and [s.path for s in some.skipped] == [test.paths[0]]
    victim.write_bytes(original)
    assert data.load_test_images(run, None, CFG).paths == test.paths
    cats_dogs_tiny.rename(tmp_path / "moved")
    with pytest.raises(DataError, match="none of the run's .* test images is under .* any more: was the data folder "
                                        "moved"):
        data.load_test_images(run, None, CFG)


@pytest.mark.parametrize("layout", ["class folders", "split folders"])
def test_a_folder_unzipped_from_a_mac_or_copied_off_a_nas_trains_as_its_classes(tmp_path, layout):
    """__MACOSX/ beside the classes with ._name resource forks, ._name files beside the images, .DS_Store,
    Thumbs.db and desktop.ini, a NAS's @eaDir thumbnails: the classes are the real ones, the images the real
    ones, and each junk folder is one line of skipped.csv."""
    root = tmp_path / "unzipped"
    tops = [root] if layout == "class folders" else [root / "train", root / "validation"]
    for top in tops:
        _classes(top, ["cats", "dogs"], per_class=3)
        for cls in ("cats", "dogs"):
            for image in sorted((top / cls).iterdir()):
                _write(top / "__MACOSX" / cls / f"._{image.name}", b"\x00\x05\x16\x07 resource fork")
                _write(top / cls / f"._{image.name}", b"\x00\x05\x16\x07 resource fork")
            _write(top / cls / "@eaDir" / "0.png@SynoEAStream", b"thumbnail")
        for junk in (".DS_Store", "cats/Thumbs.db", "dogs/desktop.ini"):
            _write(top / junk, b"junk")
    images = data.load_images(root, CFG)
    assert images.classes == ["cats", "dogs"]
    assert len(images.paths) == 6 * len(tops) and all(p.endswith(".png") and "/._" not in p for p in images.paths)
    junk = sorted(s.path for s in images.skipped)
    prefix = [""] if layout == "class folders" else ["train/", "validation/"]
    assert junk == sorted([f"{p}__MACOSX" for p in prefix] + [f"{p}{c}/@eaDir" for p in prefix for c in ("cats",
                                                                                                          "dogs")])
    assert {s.reason for s in images.skipped} == {data.JUNK_REASON}
    strict = data.load_images(root, DataConfig(image_size=32, strict=True))  # junk is no failed image
    assert strict.paths == images.paths


def test_a_class_of_near_copies_too_few_to_split_is_one_line_naming_it():
    """Four crops of one photo are one unit once near copies are kept in one split (data.dedupe): too few for
    train, validation and test. The error names the class, the minimum and the way out, instead of a run
    whose test set is empty."""
    labels = np.array([0] * 4 + [1] * 4)
    hashes = [f"h{i}" for i in range(8)]
    groups = {f"h{i}": "h4" for i in range(4, 8)}  # dogs: one photo, four crops
    with pytest.raises(DataError, match=r"class 'dogs' has 4 usable image\(s\) but only 1 distinct one\(s\) once "
                                        r"near copies are kept together; at least 3 .*data.dedupe=false"):
        assign_splits(labels, [None] * 8, hashes, CFG, ["cats", "dogs"], groups)
    splits = assign_splits(labels, [None] * 8, hashes, CFG, ["cats", "dogs"])  # no groups: each photo counts
    assert sorted(splits[4:]) == ["test", "train", "train", "validation"]


def test_a_full_disk_names_the_file_it_was_writing(tmp_path, monkeypatch):
    import errno

    from mobiletune import runfolder

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfolder.os, "fsync", full)
    with pytest.raises(OSError, match="No space left on device") as caught:
        runfolder.write_text(tmp_path / "summary.md", "text")
    assert caught.value.filename == str(tmp_path / "summary.md") and caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
