"""The tutorial's cats-vs-dogs set, downloaded once and verified, for the demo on machines with internet."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mobiletune.data.folders import files_under
from mobiletune.errors import DataError

# ---------------------------------------------------------------------------------------------
# The tutorial's data set, for the demo on machines with internet

CATS_AND_DOGS_TREE_SHA256 = "7d0418bfcd35ecb61c47f2189e318bb9851a76193526948928970d4522c0960e"
CATS_AND_DOGS_URL = "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip"


def tree_digest(folder: Path) -> str:
    """One sha256 for the image files of train/ and validation/ under `folder`."""
    lines = []
    for split in ("train", "validation"):
        for path in files_under(folder / split, []):
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
