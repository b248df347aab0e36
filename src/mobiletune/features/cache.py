"""The cache folder: where it is, what is in it (per store and per data set), and clearing it.

`ROOT/features/<extractor key>/` holds the per-image stores (`store`), `ROOT/onnx/` the exported
extractors, `ROOT/datasets/` a record per data set and store of its last use, and
`ROOT/files.sqlite` the digests of scanned files (`scan`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mobiletune import runfolder
from mobiletune.config import Config
from mobiletune.data.scan import INDEX_NAME
from mobiletune.features import store as store_lib

if TYPE_CHECKING:
    from mobiletune.data.images import ImageSet


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mobiletune"


def cache_root(config: Config) -> Path:
    """The cache folder this config uses: `features.cache_dir`, or the default."""
    return Path(config.features.cache_dir or default_cache_dir())


def record_use(cache_dir: Path, images: ImageSet, cache_bytes: int, store_key: str) -> None:
    """Note which data set used which store, how much of it, and when: what `cache ls` shows."""
    folder = cache_dir / "datasets"
    folder.mkdir(parents=True, exist_ok=True)
    root = str(images.root.resolve())
    name = hashlib.sha256(f"{root}:{store_key}".encode()).hexdigest()[:16]
    record = {"data_dir": root, "store": store_key, "images": len(images.paths),
              "megabytes": cache_bytes / 2**20, "last_used": time.time()}
    runfolder.atomic_write_bytes(folder / f"{name}.json", json.dumps(record).encode())


@dataclass(frozen=True)
class StoreInfo:
    key: str
    image_size: int
    fine_tune_at: str  # the boundaries stored, e.g. "100" or "100,120,140"
    items: int  # image views
    shards: int
    megabytes: float
    last_used: float


def list_cache(cache_dir: Path | None = None) -> tuple[list[StoreInfo], list[dict[str, Any]]]:
    """Every feature store, most recently used first, and the data sets that used them."""
    root = Path(cache_dir or default_cache_dir())
    stores = []
    for meta_path in (root / "features").glob("*/meta.json"):
        shards = [p for p in (meta_path.parent / "shards").glob("[!.]*") if p.is_dir()]
        items = size = 0
        for shard in shards:
            try:
                items += len(np.load(shard / "keys.npy", mmap_mode="r"))
                size += sum(f.stat().st_size for f in shard.iterdir())
            except (OSError, ValueError):
                continue  # damaged or just removed: the next run that needs it computes it again
        key = meta_path.parent.name
        info = _key_info(root, key)
        stores.append(StoreInfo(key, info.get("image_size", 0), ",".join(map(str, info.get("fine_tune_at", []))),
                                items, len(shards), size / 2**20,
                                max([meta_path.stat().st_mtime, *(s.stat().st_mtime for s in shards)])))
    used = []
    for path in (root / "datasets").glob("*.json"):
        try:
            used.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(stores, key=lambda e: -e.last_used), sorted(used, key=lambda d: -d["last_used"])


def _key_info(root: Path, key: str) -> dict[str, Any]:
    try:
        return json.loads((root / "features" / key / "key.json").read_text())
    except (OSError, ValueError):
        return {}


def list_extractors(cache_dir: Path | None = None) -> list[Path]:
    """The cached ONNX exports of the frozen base (one per base, image size and boundary set)."""
    return sorted((Path(cache_dir or default_cache_dir()) / "onnx").glob("*.onnx"))


def clear_cache(cache_dir: Path | None = None, older_than: float | None = None) -> tuple[int, float]:
    """Delete cached features and extractors: all, or only what was last used more than `older_than`
    seconds ago (shard by shard). Returns (files and folders removed, megabytes freed)."""
    root = Path(cache_dir or default_cache_dir())
    cutoff = None if older_than is None else time.time() - older_than
    removed, freed = 0, 0
    candidates = [*(root / "features").glob("*/shards/*"), *(root / "onnx").glob("*"),
                  *(root / "datasets").glob("*.json")]
    if cutoff is None:
        candidates += [*(root / "features").glob("*/claims/*"), *root.glob(f"{INDEX_NAME}*")]
    for path in candidates:
        try:
            if cutoff is not None and path.stat().st_mtime >= cutoff:
                continue
            files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
            size = sum(f.stat().st_size for f in files)
        except OSError:
            continue
        store_lib.remove_tree(path) if path.is_dir() else path.unlink(missing_ok=True)
        removed, freed = removed + 1, freed + size
    for store in (root / "features").glob("*"):
        if store.is_dir() and not any((store / "shards").glob("[!.]*")):
            shutil.rmtree(store, ignore_errors=True)  # no shards left: the store itself goes
    return removed, freed / 2**20
