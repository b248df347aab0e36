"""Labels from a CSV: the same images and split as the class folders they describe, and bad rows named by line."""

import csv
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY
from mobiletune import runfolder
from mobiletune.cli import app
from mobiletune.config import DataConfig, load_config
from mobiletune.data import folders as data
from mobiletune.data.images import ImageSet
from mobiletune.data.labels import read_labels
from mobiletune.data.manifest import read_manifest
from mobiletune.errors import DataError
from mobiletune.training.run import train_and_evaluate

CFG = DataConfig(image_size=32)


def _write_csv(path: Path, rows: list[list[str]], header=("path", "label", "split")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([list(header), *rows])
    return path


def _rows_of_folders(root: Path, with_split: bool) -> list[list[str]]:
    """One CSV row per image of a folder data set, listed in reverse so row order is shown not to matter."""
    listing = data.discover(root)
    rows = [[p, c, s] if with_split else [p, c] for p, c, s in listing.files]
    return rows[::-1]


def _manifest(images: ImageSet) -> list[tuple]:
    return list(zip(images.paths, images.labels.tolist(), images.splits.tolist(), images.hashes, strict=True))


@pytest.mark.parametrize("with_split", [True, False])
def test_a_csv_lists_the_same_images_and_split_as_its_folders(cats_dogs_tiny, flowers_tiny, with_split):
    root = cats_dogs_tiny if with_split else flowers_tiny  # given splits, and splits drawn by mobiletune
    class_dir = next(p for p in sorted((root / "train" if with_split else root).iterdir()) if p.is_dir())
    (class_dir / "sub").mkdir()  # a nested folder: walked after its parent's files, and a CSV lists it so too
    shutil.copy(next(class_dir.glob("*.jpg")), class_dir / "sub" / "a.jpg")
    header = ("path", "label", "split") if with_split else ("path", "label")
    labels = _write_csv(root / "labels.csv", _rows_of_folders(root, with_split), header)
    from_folders, from_csv = data.load_images(root, CFG), data.load_images(labels, CFG)
    assert from_csv.classes == from_folders.classes
    assert _manifest(from_csv) == _manifest(from_folders)
    assert from_csv.root == root and from_csv.source == labels


def test_a_csv_labelled_run_equals_the_folder_run(cats_dogs_tiny, tmp_path):
    config = load_config(overrides=TINY)
    labels = _write_csv(tmp_path / "labels.csv", [[f"cats_dogs/{p}", c, s] for p, c, s in
                                                  data.discover(cats_dogs_tiny).files])
    folder_run = train_and_evaluate(config, cats_dogs_tiny, tmp_path / "folders")
    csv_run = train_and_evaluate(config, labels, tmp_path / "csv")
    keep = ("before_fine_tuning", "after_fine_tuning", "classes", "n_images", "n_skipped", "unknown")
    assert {k: csv_run.metrics[k] for k in keep} == {k: folder_run.metrics[k] for k in keep}
    assert csv_run.history == [{**r, "seconds": c["seconds"]} for r, c in zip(folder_run.history, csv_run.history,
                                                                                strict=True)]
    split = [{**r, "path": f"cats_dogs/{r['path']}"} for r in read_manifest(tmp_path / "folders" / "split.csv")]
    assert read_manifest(tmp_path / "csv" / "split.csv") == split
    assert csv_run.metrics["data_dir"] == str(labels.resolve())
    # what reads images back finds them through the CSV's folder: evaluate, and evaluate --data CSV
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(tmp_path / "csv")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "csv"), "--data", str(labels)])
    assert result.exit_code == 0, result.output
    evaluation = runfolder.read_json(tmp_path / "csv" / "evaluations" / labels.stem / "evaluation.json")
    assert evaluation["n_images"] == {"test": 22}  # every row, whatever its split


def test_bad_rows_are_skipped_and_named_by_line(cats_dogs_tiny):
    rows = [[p, c, s] for p, c, s in data.discover(cats_dogs_tiny).files]
    first = rows[0]
    rows += [
        ["train/cats/missing.jpg", "cats", "train"],  # line 24: no such file
        ["", "cats", "train"],  # line 25: empty path
        ["train/cats/cat.9999.jpg", "  ", "train"],  # line 26: empty label
        list(first),  # line 27: the same row again
    ]
    labels = _write_csv(cats_dogs_tiny / "labels.csv", rows)
    images = data.load_images(labels, CFG)
    reasons = {s.path: s.reason for s in images.skipped}
    assert reasons["train/cats/missing.jpg"].startswith("labels.csv line 24: cannot read")
    assert reasons["(labels.csv line 25)"] == "labels.csv line 25: empty path"
    assert reasons["train/cats/cat.9999.jpg"] == "labels.csv line 26: empty label"
    assert reasons[first[0]] == "labels.csv line 27: repeats line 2"
    assert len(images.paths) == 22
    with pytest.raises(DataError, match=r"4 file\(s\) cannot be used, first \(labels.csv line 25\): "):  # --strict
        data.load_images(labels, DataConfig(image_size=32, strict=True))


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        ([["a.jpg", "cats", "dev"]], ("path", "label", "split"),
         r"labels.csv line 2: split 'dev' is not one of train, validation \(or val\), test"),
        ([["a.jpg", "cats", "train"], ["a.jpg", "dogs", "train"]], ("path", "label", "split"),
         r"labels.csv lines 2 and 3 both list a.jpg, as 'cats' \(train\) and 'dogs' \(train\); keep one"),
        ([["a.jpg", "cats"]], ("file", "label"), "needs a header row with columns path,label"),
        ([["a.jpg", "cats", "train"], ["b.jpg", "dogs", "train"]], ("path", "label", "split"),
         "needs both train and validation rows"),
        ([["a.jpg", "cats"], ["b.jpg", "cats"]], ("path", "label"), r"found 1 label\(s\) \['cats'\]"),
    ],
)
def test_contradictions_are_one_line_errors(tmp_path, rows, header, message):
    with pytest.raises(DataError, match=message):
        data.load_images(_write_csv(tmp_path / "labels.csv", rows, header), CFG)


def test_spreadsheet_csv_with_bom_and_val_alias(cats_dogs_tiny):
    rows = [[p, c, "VAL" if s == "validation" else s] for p, c, s in data.discover(cats_dogs_tiny).files]
    path = cats_dogs_tiny / "labels.csv"
    with open(path, "w", newline="", encoding="utf-8-sig") as f:  # Excel's "CSV UTF-8" starts with a BOM
        csv.writer(f).writerows([["Path", "Label", "Split"], *rows])
    assert data.load_images(path, CFG).counts() == data.load_images(cats_dogs_tiny, CFG).counts()


def test_cli_train_audit_and_errors_on_a_csv(cats_dogs_tiny, tmp_path):
    labels = _write_csv(cats_dogs_tiny / "labels.csv", [[p, c, s] for p, c, s in data.discover(cats_dogs_tiny).files])
    runner = CliRunner()
    result = runner.invoke(app, ["audit", str(labels), "--out", str(tmp_path / "audit"), "--set", "data.image_size=32"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "audit" / "audit.csv").exists(), result.output
    bad = _write_csv(tmp_path / "bad.csv", [["x.jpg", "cats", "holdout"]])
    result = runner.invoke(app, ["train", str(bad), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: bad.csv line 2: split 'holdout' is not one of train, validation (or val), test; fix the row, or drop "
        "the split column to let mobiletune split"]
    result = runner.invoke(app, ["train", str(tmp_path / "none.csv"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "none.csv: no such file" in result.output
    shutil.rmtree(tmp_path / "audit")


def test_cli_sweep_on_a_csv(cats_dogs_tiny, tmp_path):
    labels = _write_csv(tmp_path / "labels.csv", [[f"cats_dogs/{p}", c, s] for p, c, s in
                                                  data.discover(cats_dogs_tiny).files]
                        + [["cats_dogs/gone.jpg", "cats", "train"]])
    space = tmp_path / "space.yaml"
    space.write_text("phase1.lr: [0.001]\n")
    sets = [a for kv in TINY for a in ("--set", kv)]
    result = CliRunner().invoke(app, ["sweep", str(labels), "--out", str(tmp_path / "sweep"), "--trials", "1",
                                      "--space", str(space), *sets])
    assert result.exit_code == 0, result.output
    best = runfolder.read_metrics(tmp_path / "sweep" / "best")
    assert best["data_dir"] == str(labels.resolve()) and best["n_images"]["train"] == 12
    said = " ".join(result.output.split())  # a counted, reported skip, on the sweep's console too
    assert f"1 file(s) skipped, unreadable or not images: see {tmp_path / 'sweep' / 'best' / 'skipped.csv'}" in said


def test_line_numbers_count_rows_that_span_lines_and_empty_files_are_named(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text('path,label\n"a.jpg","cat\nwith a newline"\nb.jpg,\n', encoding="utf-8")
    _, skipped = read_labels(path)
    assert skipped == [("b.jpg", "labels.csv line 4: empty label")]  # the quoted label took lines 2 and 3
    path.write_text("path,label\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"labels.csv: no usable rows \(0 skipped"):
        data.load_images(path, CFG)


def test_evaluate_takes_a_csv_of_test_rows_only(tiny_run, cats_dogs_tiny, tmp_path):
    rows = [[f"{cats_dogs_tiny.name}/{p}", c, "test"] for p, c, _ in data.discover(cats_dogs_tiny).files]
    labels = _write_csv(tmp_path / "test.csv", rows)
    run = tmp_path / "run"
    shutil.copytree(tiny_run.workdir, run)
    result = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(labels)])
    assert result.exit_code == 0, result.output
    where = run / "evaluations" / "test" / "evaluation.json"
    assert result.output.count("McNemar") == 1 and f"results: {where}" in result.output.replace("\n", "")
    assert runfolder.read_json(where)["n_images"] == {"test": 22}
