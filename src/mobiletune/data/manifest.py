"""split.csv and skipped.csv: which image went to which split, and what was passed over."""

from __future__ import annotations

from pathlib import Path

from mobiletune.data.images import ImageSet


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
