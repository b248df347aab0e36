"""`mobiletune train DATA --from RUN`: retraining a folder that grew, from an earlier run's weights."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import CATS_DOGS, FLOWERS, copy_images
from mobiletune import runfolder
from mobiletune.cli import app
from mobiletune.data.manifest import read_manifest

SMALL = ["data.image_size=32", "data.batch_size=4", "phase1.min_steps=0", "phase1.epochs=2", "phase2.epochs=1"]
runner = CliRunner()


def _sets(items: list[str]) -> list[str]:
    return [a for kv in items for a in ("--set", kv)]


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A parent run on 10 cats and 10 dogs (class folders: mobiletune draws the split), and the folder grown by
    3 new photos a class."""
    root = tmp_path_factory.mktemp("retrain")
    data = root / "data"
    copy_images(CATS_DOGS / "train", data, 10)
    parent = root / "parent"
    result = runner.invoke(app, ["train", str(data), "--out", str(parent), *_sets(SMALL)])
    assert result.exit_code == 0, result.output
    copy_images(CATS_DOGS / "train", data, 3, offset=10)
    return data, parent


def test_a_run_from_a_parent_starts_from_its_weights_and_keeps_its_training_images(grown, tmp_path):
    data, parent = grown
    child = tmp_path / "child"
    result = runner.invoke(app, ["train", str(data), "--from", str(parent), "--out", str(child),
                                 "--set", "data.batch_size=4"])
    assert result.exit_code == 0, result.output
    assert f"starting from {parent}" in result.output
    metrics = json.loads((child / runfolder.METRICS).read_text())
    assert metrics["parent"]["run"] == str(parent.resolve())
    assert json.loads((child / runfolder.RUN_INFO).read_text())["parent"] == str(parent.resolve())
    assert "Retrained from the run" in (child / runfolder.MODEL_CARD).read_text()
    history = runfolder.read_csv(child / runfolder.HISTORY)
    assert [int(r["phase"]) for r in history] == [2]  # the retraining schedule: no head-only phase, 1 epoch
    # no training image of the parent is held out by the child
    trained = {r["sha256"] for r in read_manifest(parent / runfolder.SPLIT) if r["split"] == "train"}
    rows = read_manifest(child / runfolder.SPLIT)
    assert all(r["split"] == "train" for r in rows if r["sha256"] in trained) and len(rows) == 26
    # "before fine-tuning" is the parent's model on the child's test images: it started from those weights
    from mobiletune.ship.predict import load_predictor, predict_paths

    test = [r["path"] for r in rows if r["split"] == "test"]
    predictor = load_predictor(parent)
    theirs = {p.path: p.top for p in predict_paths(predictor, [str(data / t) for t in test], top_k=2)}
    before = {r["path"]: r for r in runfolder.read_csv(child / runfolder.PREDICTIONS)}
    for t in test:
        parent_p = dict(theirs[str(data / t)])
        assert all(abs(float(before[t][f"p_before_{c}"]) - parent_p[c]) < 1e-4 for c in ("cats", "dogs")), t


def test_before_is_the_parents_own_test_predictions_where_it_tested_the_same_content(tmp_path, monkeypatch):
    """A --from run's model before fine-tuning is the parent's: on the images the parent tested, its predictions
    are taken from the parent's test_predictions.csv; only the others pass through the network."""
    from mobiletune.training import run as training

    data, parent = tmp_path / "data", tmp_path / "parent"  # split folders: the parent's test images stay in test
    copy_images(CATS_DOGS / "train", data / "train", 8)
    copy_images(CATS_DOGS / "validation", data / "validation", 3)
    copy_images(CATS_DOGS / "validation", data / "test", 3, offset=3)
    assert runner.invoke(app, ["train", str(data), "--out", str(parent), *_sets(SMALL)]).exit_code == 0
    copy_images(CATS_DOGS / "validation", data / "test", 2, offset=6)
    tested, evaluate = [], training.pixels.eval_batches

    def counting(images, size, batch, split="test", rows=None):
        tested.append(len(images.indices(split)) if rows is None else len(rows))
        return evaluate(images, size, batch, split, rows)

    monkeypatch.setattr(training.pixels, "eval_batches", counting)
    child = tmp_path / "child"
    result = runner.invoke(app, ["train", str(data), "--from", str(parent), "--out", str(child),
                                 "--set", "data.batch_size=4"])
    assert result.exit_code == 0, result.output
    digests = {r["path"]: r["sha256"] for r in read_manifest(parent / runfolder.SPLIT)}
    theirs = {digests[r["path"]]: r for r in runfolder.read_csv(parent / runfolder.PREDICTIONS)}
    rows = {r["path"]: r["sha256"] for r in read_manifest(child / runfolder.SPLIT) if r["split"] == "test"}
    ours = runfolder.read_csv(child / runfolder.PREDICTIONS)
    reused = [r for r in ours if rows[r["path"]] in theirs]
    assert len(reused) >= 3 and len(ours) == len(rows) > len(reused)  # (a copy of a training image goes to train)
    for r in reused:
        parents = theirs[rows[r["path"]]]
        assert all(float(r[f"p_before_{c}"]) == float(parents[f"p_after_{c}"]) for c in ("cats", "dogs"))
    assert tested == [len(ours) - len(reused), len(ours)]  # before: the rest only; after: every test image


@pytest.mark.parametrize(("change", "says"), [
    (["--set", "data.image_size=48"], "its data.image_size is 32, this run's 48"),
    (["--set", "phase2.fine_tune_at=120"], "its phase2.fine_tune_at is 100, this run's 120"),
])
def test_a_different_model_is_one_line_that_says_to_train_from_scratch(grown, tmp_path, change, says):
    data, parent = grown
    result = runner.invoke(app, ["train", str(data), "--from", str(parent), "--out", str(tmp_path / "c"), *change])
    assert result.exit_code == 2 and says in result.output and "drop --from" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_new_class_or_a_folder_that_is_no_run_is_refused(grown, tmp_path):
    data, parent = grown
    more = tmp_path / "more"
    copy_images(CATS_DOGS / "train", more, 4)
    (more / "daisy").mkdir()
    for f in sorted((FLOWERS / "daisy").iterdir())[:4]:
        (more / "daisy" / f.name).write_bytes(f.read_bytes())
    result = runner.invoke(app, ["train", str(more), "--from", str(parent), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "its classes ['cats', 'dogs'] are not this data's" in result.output
    assert "drop --from" in result.output
    result = runner.invoke(app, ["train", str(data), "--from", str(data), "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "not a finished run folder" in result.output


def test_a_sweep_refuses_a_parent(grown):
    """Trials train from the base weights: a parent would pin the split but not start them, so it is refused."""
    import mobiletune as mt
    from mobiletune.errors import UsageError

    data, parent = grown
    with pytest.raises(UsageError, match="a sweep's trials train from the base weights"):
        mt.sweep(data, overrides={"data.parent": str(parent)}, trials=1, verbose=False)


def test_a_parent_that_has_gone_stops_only_training(grown, tmp_path):
    """A run's config names its parent: loading it (evaluate, export) still works once the parent is deleted;
    scanning a folder for training says what is missing in one line."""
    from mobiletune.config import load_config
    from mobiletune.data.folders import load_images
    from mobiletune.errors import DataError

    data, _ = grown
    config = load_config(overrides=[f"data.parent={tmp_path / 'gone'}"])
    assert config.data.parent.endswith("gone")
    with pytest.raises(DataError, match=r"data.parent=.*gone.*: no split.csv there"):
        load_images(data, config.data)
