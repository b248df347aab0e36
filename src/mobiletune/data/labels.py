"""Labels from a CSV file: `path,label[,split]`, the way Kaggle-style data sets and labelling tools
hand data over, as an alternative to class folders.

Paths are relative to the CSV's folder. Rows that cannot be used are counted skips that name their
line (an empty path or label, a repeated row); rows that contradict each other (one path, two
labels) or a split name that is not one of ours are errors, since guessing would train on the
wrong answer. Which files exist and decode is checked later, with the folder layout's images.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from mobiletune.errors import DataError

REQUIRED = ("path", "label")
# The split column's accepted names for each split: the split folder names a DATA_DIR accepts.
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}


@dataclass(frozen=True)
class Row:
    path: str  # relative to the CSV's folder, normalised
    label: str
    split: str | None  # None: the CSV has no split column, so the split is ours to make
    line: int  # in the file, for messages


def is_labels_file(source: Path) -> bool:
    """Whether a DATA_DIR argument names a labels CSV rather than a folder."""
    return source.suffix.lower() == ".csv" and not source.is_dir()


def read_labels(path: Path) -> tuple[list[Row], list[tuple[str, str]]]:
    """The usable rows of a labels CSV, and `(path, reason)` for each row skipped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
            return _parse(path, csv.reader(f))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read it as a UTF-8 CSV ({exc})") from None


def _parse(path: Path, reader) -> tuple[list[Row], list[tuple[str, str]]]:
    header = [h.strip().lower() for h in next(reader, [])]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise DataError(f"{path}: needs a header row with columns path,label (and optionally split); "
                        f"found {header or 'an empty file'}")
    col = {name: header.index(name) for name in (*REQUIRED, "split") if name in header}
    splits = {alias: split for split, aliases in SPLIT_NAMES.items() for alias in aliases}
    rows: dict[str, Row] = {}
    skipped: list[tuple[str, str]] = []
    end = reader.line_num  # the last physical line read so far: a quoted field may span several
    for fields in reader:
        line, end = end + 1, reader.line_num  # where this row starts
        if not any(f.strip() for f in fields):
            continue  # a blank line
        value = {name: fields[i].strip() if i < len(fields) else "" for name, i in col.items()}
        where = f"{path.name} line {line}"
        if not value["path"]:
            skipped.append((f"({where})", f"{where}: empty path"))
            continue
        rel = os.path.normpath(value["path"])
        if not value["label"]:
            skipped.append((rel, f"{where}: empty label"))
            continue
        split = None
        if "split" in col:
            split = splits.get(value["split"].lower())
            if split is None:
                raise DataError(f"{where}: split {value['split']!r} is not one of train, validation (or val), test; "
                                "fix the row, or drop the split column to let mobiletune split")
        row = Row(rel, value["label"], split, line)
        first = rows.get(rel)
        if first is None:
            rows[rel] = row
        elif (first.label, first.split) == (row.label, row.split):
            skipped.append((rel, f"{where}: repeats line {first.line}"))
        else:
            raise DataError(f"{path.name} lines {first.line} and {line} both list {rel}, as "
                            f"{first.label!r} ({first.split or 'no split'}) and {row.label!r} "
                            f"({row.split or 'no split'}); keep one")
    return list(rows.values()), skipped
