"""Find the image files under DATA_DIR and the sha256 of each, reading only new or changed files.

The sha256 of a file's bytes names the image everywhere: in the split, the feature cache and the
manifest. Hashing 10^6 files means reading them all, so digests are kept in a small SQLite index
in the cache folder, keyed by the file's absolute path, size, mtime and ctime: a re-run over
unchanged files reads none of them. Files that turned out not to decode are remembered there by
content, so later runs skip them without trying again, and so are the audit's keypoint matches of
two images (a pair of digests), so a run on a grown folder matches only its new pairs. SQLite
serialises writers, so several processes can share one index.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# every format PIL decodes that cameras, phones, scanners and the web save photos in
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
INDEX_NAME = "files.sqlite"

# (size, mtime_ns, ctime_ns): what says a file is unchanged without reading it, as git's index does
Stamp = tuple[int, int, int]


@dataclass(frozen=True)
class Hashed:
    """A file's digest, or why it cannot be used."""

    sha256: str | None
    reason: str | None = None  # set when sha256 is None


def stamp(path: Path) -> Stamp:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


class FileIndex:
    """(path, stamp) -> sha256, sha256 -> why it does not decode, and (sha256, sha256, how) -> how many keypoints
    of the two matched. `None` path: kept in memory only."""

    def __init__(self, path: Path | None):
        self.path = path
        self.db = self._open(path)

    @staticmethod
    def _open(path: Path | None) -> sqlite3.Connection:
        target = ":memory:" if path is None else str(path)
        for attempt in (1, 2):
            try:
                db = sqlite3.connect(target, timeout=60, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("CREATE TABLE IF NOT EXISTS files (path BLOB PRIMARY KEY, size INT, mtime_ns INT, "
                           "ctime_ns INT, sha256 TEXT)")
                db.execute("CREATE TABLE IF NOT EXISTS bad (sha256 TEXT PRIMARY KEY, reason TEXT)")
                db.execute("CREATE TABLE IF NOT EXISTS matched (pair TEXT PRIMARY KEY, keypoints INT)")
                return db
            except sqlite3.DatabaseError:
                if path is None or attempt == 2:
                    raise
                path.unlink(missing_ok=True)  # damaged: it is only a cache of digests, start it again
        raise AssertionError("unreachable")

    def known(self, folder: Path) -> dict[bytes, tuple[Stamp, str]]:
        """Every indexed file below `folder`: one range query, not one per file."""
        low = os.fsencode(str(folder)) + b"/"
        high = low[:-1] + b"0"  # the byte after "/"
        rows = self.db.execute("SELECT path, size, mtime_ns, ctime_ns, sha256 FROM files WHERE path >= ? AND "
                               "path < ?", (low, high))
        return {bytes(p): ((s, m, c), h) for p, s, m, c, h in rows}

    def record(self, rows: Iterable[tuple[bytes, Stamp, str]]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                                [(p, *st, h) for p, st, h in rows])

    def forget(self, path: Path) -> None:
        """Drop a file's digest: it changed under us, so the next scan reads it again."""
        with self.db:
            self.db.execute("DELETE FROM files WHERE path = ?", (os.fsencode(str(path)),))

    def bad_reasons(self, digests: Iterable[str]) -> dict[str, str]:
        return self._lookup("SELECT sha256, reason FROM bad WHERE sha256 IN ({marks})", digests)

    def mark_bad(self, sha256: str, reason: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO bad VALUES (?, ?)", (sha256, reason))

    def matched(self, pairs: Iterable[str]) -> dict[str, int]:
        """{pair: keypoints matched} of those `pairs` (keys made by the caller from two digests and its settings)
        that were recorded."""
        return self._lookup("SELECT pair, keypoints FROM matched WHERE pair IN ({marks})", pairs)

    def record_matched(self, rows: Iterable[tuple[str, int]]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO matched VALUES (?, ?)", list(rows))

    def _lookup(self, query: str, keys: Iterable[str]) -> dict:
        keys = list(keys)
        found: dict = {}
        for start in range(0, len(keys), 500):  # SQLite caps the number of bound parameters
            part = keys[start : start + 500]
            found.update(self.db.execute(query.format(marks=",".join("?" * len(part))), part))
        return found

    def close(self) -> None:
        self.db.close()


def _sha256(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks (hashlib.file_digest is Python 3.11+)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


NOT_AN_IMAGE = "not an image file extension"  # a readme.txt beside the photos: no image, so never a failed one


def _hash_file(path: Path, check: Callable[[Path], str | None] | None) -> tuple[Hashed, Stamp | None]:
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return Hashed(None, f"{NOT_AN_IMAGE} (expected one of {', '.join(IMAGE_EXTENSIONS)})"), None
    try:
        before = stamp(path)
        digest = _sha256(path)
        if stamp(path) != before:
            return Hashed(None, "changed while it was being read; run again to include it"), None
    except OSError as exc:
        return Hashed(None, f"cannot read ({exc.strerror or exc})"), None
    return Hashed(digest, check(path) if check else None), before


RECORD_EVERY = 512  # digests written to the index at a time while hashing (one transaction each)


def hash_files(paths: list[Path], index: FileIndex, check: Callable[[Path], str | None] | None = None,
               progress: Callable[[int, int], None] | None = None) -> tuple[list[Hashed], int]:
    """The sha256 of each file and why it cannot be used (None: usable), and how many files had to be read.

    Only new or changed files are read; `check(path)` (a cheap header probe) runs on those alone,
    and what it refuses is remembered by content.
    """
    known: dict[bytes, tuple[Stamp, str]] = {}
    for folder in {p.parent.parent for p in paths}:  # class folders' parents: one query each
        known.update(index.known(folder))
    results: list[Hashed | None] = [None] * len(paths)
    todo: list[int] = []
    for i, path in enumerate(paths):
        entry = known.get(os.fsencode(str(path)))
        try:
            current = stamp(path)
        except OSError as exc:
            results[i] = Hashed(None, f"cannot read ({exc.strerror or exc})")
            continue
        if entry is not None and entry[0] == current and not _racy(current):
            results[i] = Hashed(entry[1])
        else:
            todo.append(i)
    bad = index.bad_reasons({r.sha256 for r in results if r is not None and r.sha256})
    for i, r in enumerate(results):
        if r is not None and r.sha256 in bad:
            results[i] = Hashed(r.sha256, bad[r.sha256])
    fresh: list[tuple[bytes, Stamp, str]] = []
    pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))  # hashlib releases the GIL
    try:
        hashed_all = pool.map(lambda p: _hash_file(p, check), [paths[i] for i in todo])
        for done, (i, (hashed, st)) in enumerate(zip(todo, hashed_all, strict=True), 1):
            results[i] = hashed
            if hashed.sha256 is not None and st is not None:
                fresh.append((os.fsencode(str(paths[i])), st, hashed.sha256))
                if hashed.reason:
                    index.mark_bad(hashed.sha256, hashed.reason)
            if len(fresh) >= RECORD_EVERY:  # a first scan of a large folder stopped midway keeps what it read
                index.record(fresh)
                fresh.clear()
            if progress:
                progress(done, len(todo))
    finally:  # Ctrl-C: what was read is recorded, and the files not yet started are not read
        index.record(fresh)
        pool.shutdown(cancel_futures=True)
    return results, len(todo)  # type: ignore[return-value]


def _racy(st: Stamp) -> bool:
    """Modified within the last 2 s: a write in the same timestamp tick could go unseen (git's 'racy' case)."""
    return time.time_ns() - st[1] < 2_000_000_000
