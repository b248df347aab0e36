"""A content-addressed store of per-image features, in shards that many processes can fill at once.

One store per extractor (base weights, image size, cut points, engine): `ROOT/features/<key>/`.
An item is one view of one image, keyed by (image sha256, view tag), so a run's features are
look-ups: new images, a new split or a subset of the folder compute only what is not there yet.

    meta.json                    the extractor's outputs: shapes and dtypes
    shards/<id>/keys.npy         the item keys of this shard, one per row
    shards/<id>/<k>.npy          output k of every item, [rows, ...]
    shards/<id>/sizes.json       each file's byte size: a shard truncated by a crash is detected
    claims/<time>-<owner>-<n>.json  the items a process is computing now

A shard is written in a temporary folder and renamed into place whole. Before computing, a
process claims its items in a claim file, under an flock on the store so that claims never
overlap; other processes leave claimed items alone and wait for their shard (or take them over
once the claim goes stale), so two processes filling one store never compute an item twice.
Features are read back row by row with `os.pread`, through the page cache: a run's memory does
not grow with the store.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np

from mobiletune import runfolder

SHARD_BYTES = 64 * 2**20  # items per shard: ~64 MB of features, so 10^6 images make ~10^3 files, not 10^6
CLAIM_STALE_SECONDS = 300  # a claim not refreshed for this long belongs to a dead process
KEY_DTYPE = "S32"


def item_key(sha256: str, view: str) -> bytes:
    """The store's name for one view ("plain", or an augmentation tag) of one image."""
    return hashlib.blake2b(f"{sha256}:{view}".encode(), digest_size=16).hexdigest().encode()


class DamagedShard(Exception):
    pass


def _npy_layout(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(data offset, shape, dtype) of a .npy file, from its header."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        return f.tell(), shape, dtype


class Shard:
    """One complete shard, checked: its files have the sizes recorded when it was written."""

    def __init__(self, folder: Path):
        self.folder = folder
        try:
            sizes = json.loads((folder / "sizes.json").read_text())
            for name, size in sizes.items():
                if (folder / name).stat().st_size != size:
                    raise DamagedShard(f"{folder / name}: {(folder / name).stat().st_size} bytes, expected {size}")
            self.keys = np.load(folder / "keys.npy")
            self.layouts = [_npy_layout(folder / f"{k}.npy") for k in range(len(sizes) - 1)]
        except (OSError, ValueError, KeyError) as exc:
            raise DamagedShard(f"{folder}: {exc}") from None
        self.rows = len(self.keys)  # the keys themselves move into the store's index (see refresh)
        if any(shape[0] != self.rows for _, shape, _ in self.layouts):
            raise DamagedShard(f"{folder}: row counts differ between its files")


class FeatureStore:
    """The shards of one extractor, and a sorted index of their item keys: numpy arrays, 48 bytes an
    item (a dict of bytes would take ~200), so 10^6 images' views index in under 100 MB."""

    def __init__(self, folder: Path, outputs: Sequence[tuple[tuple[int, ...], str]]):
        self.folder, self.outputs = folder, [(tuple(s), str(d)) for s, d in outputs]
        (folder / "shards").mkdir(parents=True, exist_ok=True)
        (folder / "claims").mkdir(exist_ok=True)
        meta = folder / "meta.json"
        if not meta.exists():
            runfolder.atomic_write_bytes(meta, json.dumps({"outputs": self.outputs}).encode())
        self.shards: list[Shard] = []
        self.names: set[str] = set()
        self._keys = np.empty(0, KEY_DTYPE)  # sorted; _where[i] = (shard number, row) of _keys[i]
        self._where = np.empty((0, 2), np.int64)
        self.damaged = 0
        self.owner = uuid.uuid4().hex[:12]  # names this process's claims (a pid can repeat across machines)
        self.refresh()

    def row_bytes(self) -> int:
        return sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in self.outputs)

    def refresh(self) -> None:
        """Take in shards other processes (or earlier runs) completed; drop damaged ones, so their items
        count as missing and are computed again."""
        fresh: list[tuple[int, np.ndarray]] = []
        for entry in sorted(os.scandir(self.folder / "shards"), key=lambda e: e.name):
            if entry.name.startswith(".") or entry.name in self.names or not entry.is_dir():
                continue
            try:
                shard = Shard(Path(entry.path))
            except DamagedShard:
                self.damaged += 1
                remove_tree(Path(entry.path))
                continue
            self.names.add(entry.name)
            fresh.append((len(self.shards), shard.keys))
            del shard.keys  # held once, in the index
            self.shards.append(shard)
        if fresh:
            keys = np.concatenate([self._keys, *(k for _, k in fresh)])
            where = np.concatenate([self._where, *(np.stack([np.full(len(k), n), np.arange(len(k))], axis=1)
                                                   for n, k in fresh)])
            keys, first = np.unique(keys, return_index=True)  # sorted; an item in two shards: the earlier one
            self._keys, self._where = keys, where[first]

    def __len__(self) -> int:
        return len(self._keys)

    def _find(self, keys: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, position in the index) of each key."""
        wanted = np.asarray(keys, dtype=KEY_DTYPE)
        at = np.minimum(np.searchsorted(self._keys, wanted), max(len(self._keys) - 1, 0))
        found = (self._keys[at] == wanted) if len(self._keys) else np.zeros(len(wanted), bool)
        return found, at

    def missing(self, keys: Sequence[bytes]) -> list[bytes]:
        """The keys not in the store, each once, in their first order."""
        if not len(keys):
            return []
        found, _ = self._find(keys)
        return list(dict.fromkeys(k for k, f in zip(keys, found.tolist(), strict=True) if not f))

    # -----------------------------------------------------------------------------------------
    # Filling

    def fill(self, keys: Sequence[bytes], compute: Callable[[list[bytes], Path, Callable[[], None]], set[bytes]],
             progress: Callable[[int], None] | None = None) -> tuple[int, set[bytes]]:
        """Compute every item of `keys` not in the store, a shard at a time; (how many computed, keys that failed).

        `compute(chunk, folder, heartbeat)` writes `<k>.npy` files of [len(chunk), ...] for the chunk
        into `folder` and returns the keys it could not compute (their rows are left out).
        """
        todo, failed, computed = self.missing(keys), set(), 0
        per_shard = max(1, SHARD_BYTES // max(1, self.row_bytes()))
        while todo:
            with self._lock():  # one process at a time sees what is done and claimed, then claims
                self.refresh()  # shards are in place before their claim is released: nothing is missed
                todo = [k for k in self.missing(todo) if k not in failed]
                busy = self._claimed_by_others()
                chunk = [k for k in todo if k not in busy][:per_shard]
                claim = self._claim(chunk) if chunk else None
            if not todo:
                break
            if claim is None:
                time.sleep(0.5)  # the rest is another process's: wait for its shard, or for its claim to go stale
                continue
            try:
                bad = self._write_shard(chunk, compute, functools.partial(os.utime, claim))
                failed |= bad
                computed += len(chunk) - len(bad)
                if progress:
                    progress(len(chunk))
            finally:
                with self._lock():  # released only once its shard is in place (or given up): no gap to misread
                    claim.unlink(missing_ok=True)
            taken = set(chunk)
            todo = [k for k in todo if k not in taken]
        self.refresh()  # take in the shards just written
        return computed, failed

    def _write_shard(self, chunk: list[bytes], compute, heartbeat) -> set[bytes]:
        tmp = self.folder / "shards" / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            bad = compute(chunk, tmp, heartbeat)
            rows = [i for i, k in enumerate(chunk) if k not in bad]
            if rows:
                if len(rows) < len(chunk):
                    _keep_rows(tmp, len(self.outputs), rows)
                np.save(tmp / "keys.npy", np.array([chunk[i] for i in rows], dtype=KEY_DTYPE))
                sizes = {p.name: p.stat().st_size for p in tmp.glob("*.npy")}
                (tmp / "sizes.json").write_text(json.dumps(sizes))
                os.rename(tmp, self.folder / "shards" / uuid.uuid4().hex)
            return bad
        finally:
            remove_tree(tmp)

    def _lock(self) -> AbstractContextManager[None]:
        return runfolder.exclusive(self.folder / "claims" / ".lock")

    def _claim(self, chunk: list[bytes]) -> Path:
        path = self.folder / "claims" / f"{time.time_ns():020d}-{self.owner}-{uuid.uuid4().hex[:8]}.json"
        runfolder.atomic_write_bytes(path, json.dumps([k.decode() for k in chunk]).encode())
        return path

    def _claimed_by_others(self) -> set[bytes]:
        """Keys in the live claims of other processes."""
        busy: set[bytes] = set()
        for entry in os.scandir(self.folder / "claims"):
            if entry.name.startswith(".") or entry.name.split("-")[1] == self.owner:
                continue
            try:
                if time.time() - entry.stat().st_mtime > CLAIM_STALE_SECONDS:
                    os.unlink(entry.path)  # its process died: the items are anyone's again
                    continue
                busy.update(k.encode() for k in json.loads(Path(entry.path).read_text()))
            except (OSError, ValueError):
                continue  # released or rewritten while we looked
        return busy

    # -----------------------------------------------------------------------------------------
    # Reading

    def reader(self, keys: Sequence[bytes]) -> RowReader:
        """Rows of `keys` (all present) in this order, read on demand."""
        found, at = self._find(keys)
        assert found.all(), "reader() asked for items that are not in the store"
        where = self._where[at].reshape(-1, 2)
        for number in np.unique(where[:, 0]):
            os.utime(self.shards[number].folder)  # last used, for `cache clear --older-than`
        return RowReader(self, where)


class RowReader:
    """Reads rows (by position in the key list) of chosen outputs with os.pread: no memory map whose
    pages would count against the process, and safe from many tf.data threads at once. Files are
    opened per call, so a store of any number of shards never runs out of file descriptors."""

    def __init__(self, store: FeatureStore, where: np.ndarray):
        self.store, self.where = store, where
        self.shapes = [s for s, _ in store.outputs]
        self.dtypes = [np.dtype(d) for _, d in store.outputs]

    def __len__(self) -> int:
        return len(self.where)

    def subset(self, positions: np.ndarray) -> RowReader:
        """A reader of this one's rows at `positions`, in that order."""
        return RowReader(self.store, self.where[positions])

    def nbytes(self) -> int:
        return len(self.where) * self.store.row_bytes()

    def read(self, positions: np.ndarray, outputs: Sequence[int], dtype: str | None = None) -> list[np.ndarray]:
        """Outputs `outputs` of the rows at `positions`, each [len(positions), ...], as stored or as `dtype`."""
        out = [np.empty((len(positions), *self.shapes[k]), dtype or self.dtypes[k]) for k in outputs]
        where = self.where[positions]
        for number in np.unique(where[:, 0]):
            shard = self.store.shards[number]
            at = np.flatnonzero(where[:, 0] == number)
            for array, k in zip(out, outputs, strict=True):
                offset, _, stored = shard.layouts[k]
                size = int(np.prod(array.shape[1:])) * stored.itemsize
                fd = os.open(shard.folder / f"{k}.npy", os.O_RDONLY)
                try:
                    for j in at:
                        data = os.pread(fd, size, offset + int(where[j, 1]) * size)
                        if len(data) != size:
                            raise DamagedShard(f"{shard.folder}/{k}.npy: shorter than its header says; run again "
                                               "to recompute it")
                        array[j] = np.frombuffer(data, stored).reshape(array.shape[1:])
                finally:
                    os.close(fd)
        return out


def _keep_rows(folder: Path, outputs: int, rows: list[int]) -> None:
    """Rewrite each output file with only `rows` (the items that could be computed)."""
    for k in range(outputs):
        full = np.load(folder / f"{k}.npy", mmap_mode="r")
        kept = np.ascontiguousarray(full[rows])
        del full
        np.save(folder / f"{k}.npy", kept)


def remove_tree(path: Path) -> None:
    """Remove a folder so that no reader sees it half gone: renamed aside first, then deleted."""
    if not path.exists():
        return
    aside = path.with_name(f".gone-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except OSError:
        aside = path
    shutil.rmtree(aside, ignore_errors=True)


class StoredRows:
    """One output of a reader's rows as float32, read when used: a slice reads those rows, `np.asarray` all of them.
    What holds every image's pooled features for a run (1 GB at 200,000 images) without keeping them in memory: a
    search over them in chunks never reads them all at once."""

    def __init__(self, reader: RowReader, output: int):
        self.reader, self.output = reader, output

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.reader), *self.reader.shapes[self.output])

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.reader.read(np.arange(len(self.reader))[rows], [self.output], dtype="float32")[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype, copy=False)
