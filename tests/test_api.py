"""The Python API (`import mobiletune as mt`): the CLI's results, from a notebook or script."""

import inspect
import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import mobiletune as mt
from conftest import CATS_DOGS, TINY, copy_images
from mobiletune.cli import app
from mobiletune.data.pixels import decode_image


def test_the_public_surface_is_named_and_documented():
    import mobiletune.training.run  # noqa: F401
    import mobiletune.tuning.study  # noqa: F401 - a submodule named like a function would replace it on the package

    for name in mt.__all__:
        assert hasattr(mt, name), name
    for fn in (mt.train, mt.sweep, mt.audit_folder, mt.load, mt.Run.predict, mt.Run.evaluate, mt.Run.export):
        assert "Args:" in inspect.getdoc(fn) and "Returns:" in inspect.getdoc(fn), fn.__qualname__


def test_overrides_as_a_dict_or_as_cli_strings_make_the_same_config():
    as_dict = mt.make_config(overrides={"phase1.epochs": 3, "augment.flip": "none", "phase1.lr": 3e-4})
    as_strings = mt.make_config(overrides=["phase1.epochs=3", "augment.flip=none", "phase1.lr=3e-4"])
    assert as_dict == as_strings and as_dict.phase1.epochs == 3
    assert mt.make_config(as_dict, {"phase1.epochs": 4}).augment.flip == "none"  # a Config as the base
    with pytest.raises(mt.ConfigError, match="unknown config key 'phase1.speed'"):
        mt.make_config(overrides={"phase1.speed": 9})
    with pytest.raises(mt.UsageError, match="give a dict"):
        mt.make_config(overrides="phase1.epochs=3")


def test_train_gives_what_the_cli_gives(tmp_path):
    data = tmp_path / "data"
    copy_images(CATS_DOGS / "train", data / "train", 6)
    copy_images(CATS_DOGS / "validation", data / "validation", 5)
    run = mt.train(data, tmp_path / "api", overrides=TINY, verbose=False)
    sets = [a for s in TINY for a in ("--set", s)]
    assert CliRunner().invoke(app, ["train", str(data), "--out", str(tmp_path / "cli"), *sets, "-q"]).exit_code == 0
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    for stage in ("before_fine_tuning", "after_fine_tuning"):
        assert run.metrics[stage]["test"]["accuracy"] == cli[stage]["test"]["accuracy"]
        assert run.metrics[stage]["test"]["loss"] == pytest.approx(cli[stage]["test"]["loss"], rel=1e-6)
    assert [r["val_loss"] for r in run.history] == [
        r["val_loss"] for r in mt.load(tmp_path / "cli").history]


def test_a_loaded_run_predicts_paths_and_arrays_alike_and_evaluates(tiny_run, tmp_path):
    shutil.copytree(tiny_run.workdir, tmp_path / "run")  # evaluate rewrites the folder: not the shared one
    run = mt.load(tmp_path / "run")
    assert run.metrics == tiny_run.metrics and "test accuracy after fine-tuning" in repr(run)
    image = CATS_DOGS / "validation" / "dogs" / "dog.2000.jpg"
    from_path = run.predict(image, top_k=2)
    from_array = run.predict(decode_image(image.read_bytes(), run.config.data.image_size)[None], top_k=2)
    assert len(from_path) == len(from_array) == 1 and from_array[0].path == "array[0]"
    assert [c for c, _ in from_path[0].top] == [c for c, _ in from_array[0].top]
    assert np.allclose([p for _, p in from_path[0].top], [p for _, p in from_array[0].top], atol=1e-6)
    assert from_path[0].unknown_score == pytest.approx(from_array[0].unknown_score, abs=1e-6)
    big = np.zeros((2, 50, 70, 3), np.uint8)  # other sizes are resized like files
    assert len(run.predict(big)) == 2
    from PIL import Image

    photo = np.asarray(Image.open(image).convert("RGB"))  # the photo at full size, as a camera hands it over
    whole = run.predict(photo, top_k=2)[0]
    assert dict(whole.top) == pytest.approx(dict(from_path[0].top), abs=0.03)  # resized as its JPEG file is
    two = run.predict([photo, photo[:200, :300]])  # arrays of different sizes, each its own
    assert len(two) == 2 and dict(two[0].top) == pytest.approx(dict(whole.top[:1]))
    with pytest.raises(mt.UsageError, match=r"shape \(50, 70\)"):
        run.predict(np.zeros((50, 70)))
    with pytest.raises(mt.UsageError, match="within 0-1; mobiletune takes pixels 0-255"):
        run.predict(photo / 255.0)
    with pytest.raises(mt.UsageError, match="NaN"):
        run.predict(np.full((1, 40, 40, 3), np.nan, np.float32))
    block = run.evaluate()
    assert block["after_fine_tuning"]["test"]["n"] == tiny_run.metrics["after_fine_tuning"]["test"]["n"]


def test_load_refuses_what_is_not_a_finished_run(tmp_path):
    with pytest.raises(mt.UsageError, match="not a finished mobiletune run folder"):
        mt.load(tmp_path)


def test_audit_gives_what_the_cli_gives(cats_dogs_tiny, tmp_path):
    from mobiletune import runfolder

    found = mt.audit_folder(cats_dogs_tiny, out=tmp_path / "audit", overrides=[*TINY, "data.image_size=64"],
                            verbose=False)
    assert {"exact_duplicate", "near_duplicate", "label_error", "outlier", "leaks", "across_classes", "kinds",
            "images", "skipped", "out"} <= set(found) and found["images"] == 22
    rows = runfolder.read_csv(tmp_path / "audit" / "audit.csv")
    assert sum(r["flagged"] == "true" and r["issue"] == "outlier" for r in rows) == found["outlier"]
    assert (tmp_path / "audit" / "audit.html").is_file() and (tmp_path / "audit" / "skipped.csv").is_file()
    with pytest.raises(mt.UsageError, match="--overwrite"):  # nothing a user made is replaced unasked
        mt.audit_folder(cats_dogs_tiny, out=tmp_path / "audit", overrides=TINY, verbose=False)


def test_wrong_argument_types_are_usage_errors_naming_the_argument(tiny_run, tmp_path):
    """An int where a path goes, or text where a count goes, reached Python's own TypeError before."""
    run = mt.load(tiny_run.workdir)
    image = CATS_DOGS / "validation" / "dogs" / "dog.2000.jpg"
    cases = [(lambda: mt.train(CATS_DOGS, out=5), r"out=5: give a path"),
             (lambda: mt.train(123, out=tmp_path / "r"), r"data_dir=123: give a path"),
             (lambda: mt.train(CATS_DOGS, out=tmp_path / "r", config=3), r"config=3: give a YAML file's path"),
             (lambda: mt.train(CATS_DOGS, out=tmp_path / "r", overrides=5), r"overrides=5: give a dict"),
             (lambda: mt.load(5), r"run=5: give a path"),
             (lambda: run.evaluate(5), r"data_dir=5: give a path"),
             (lambda: run.predict([image], top_k="2"), r"top_k \(--top-k\) '2': give whole numbers"),
             (lambda: mt.sweep(CATS_DOGS, out=tmp_path / "s", trials="2"), r"--trials '2': give a whole number"),
             (lambda: mt.audit_folder(CATS_DOGS, out=7), r"out=7: give a path")]
    for call, message in cases:
        with pytest.raises(mt.UsageError, match=message):
            call()
