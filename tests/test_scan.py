"""The incremental scan: unchanged files are never read twice; changed ones are; bad ones are remembered."""

import os
import time

from mobiletune.config import DataConfig
from mobiletune.data import folders as data
from mobiletune.data import scan

CFG = DataConfig(image_size=32)


def _age_all(root):
    """Files copied a moment ago are 'racy' (a write in the same tick could go unseen): age them."""
    old = time.time() - 3600
    for f in root.rglob("*"):
        if f.is_file():
            os.utime(f, (old, old))


def test_a_second_scan_reads_no_unchanged_file(cats_dogs_tiny, tmp_path):
    _age_all(cats_dogs_tiny)
    index = scan.FileIndex(tmp_path / scan.INDEX_NAME)
    first = data.load_images(cats_dogs_tiny, CFG, index)
    assert first.files_read == 22
    second = data.load_images(cats_dogs_tiny, CFG, scan.FileIndex(tmp_path / scan.INDEX_NAME))  # a new process
    assert second.files_read == 0 and second.hashes == first.hashes and list(second.splits) == list(first.splits)


def test_a_scan_interrupted_midway_keeps_what_it_read(cats_dogs_tiny, tmp_path, monkeypatch):
    """Ctrl-C while hashing a large folder the first time: the digests of the files read so far are in the index
    (written every RECORD_EVERY files, and the rest on the way out), so the next scan reads only the rest."""
    _age_all(cats_dogs_tiny)
    monkeypatch.setattr(scan, "RECORD_EVERY", 5)
    paths = sorted(p for p in cats_dogs_tiny.rglob("*.jpg"))
    seen = []

    def interrupt(done, total):
        seen.append(done)
        if done == 12:
            raise KeyboardInterrupt

    index = scan.FileIndex(tmp_path / scan.INDEX_NAME)
    try:
        scan.hash_files(paths, index, progress=interrupt)
    except KeyboardInterrupt:
        pass
    _, read = scan.hash_files(paths, scan.FileIndex(tmp_path / scan.INDEX_NAME))
    assert seen[-1] == 12 and read == len(paths) - 12  # every file read before the interrupt was recorded


def test_a_changed_file_is_hashed_again(cats_dogs_tiny, tmp_path):
    _age_all(cats_dogs_tiny)
    index = scan.FileIndex(tmp_path / scan.INDEX_NAME)
    first = data.load_images(cats_dogs_tiny, CFG, index)
    victim = cats_dogs_tiny / first.paths[0]
    victim.write_bytes((cats_dogs_tiny / first.paths[1]).read_bytes())
    second = data.load_images(cats_dogs_tiny, CFG, index)
    assert second.files_read == 1 and second.hashes[0] == first.hashes[1] != first.hashes[0]


def test_a_bad_file_is_remembered_by_content(cats_dogs_tiny, tmp_path):
    bad = cats_dogs_tiny / "train" / "cats" / "broken.jpg"
    bad.write_bytes(b"not a picture")
    _age_all(cats_dogs_tiny)
    index = scan.FileIndex(tmp_path / scan.INDEX_NAME)
    first = data.load_images(cats_dogs_tiny, CFG, index)
    assert [s.path for s in first.skipped] == ["train/cats/broken.jpg"]
    second = data.load_images(cats_dogs_tiny, CFG, index)
    assert second.files_read == 0 and second.skipped == first.skipped


def test_a_damaged_index_is_started_again(cats_dogs_tiny, tmp_path):
    path = tmp_path / scan.INDEX_NAME
    path.write_bytes(b"this is not sqlite" * 100)
    images = data.load_images(cats_dogs_tiny, CFG, scan.FileIndex(path))
    assert len(images.paths) == 22
