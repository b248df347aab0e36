"""Never a traceback, never lost work: kill -9 and resume, Ctrl-C, and random junk as input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import CATS_DOGS, TINY, copy_images
from mobiletune.cli import app
from mobiletune.config import from_flat, load_config
from mobiletune.data import pixels
from mobiletune.errors import ConfigError, MobiletuneError

runner = CliRunner()
# 40 training images at batch 4 = 10 steps an epoch: ~0.05 s in phase 1 and ~0.25 s in phase 2 at 32 px, so
# phase 1 gets 8 epochs for a kill to land inside it.
RESUMABLE = [*TINY, "phase1.epochs=8", "phase2.epochs=3"]
PHASE1_EPOCHS, EPOCHS = 8, 11


@pytest.fixture
def cats_dogs_small(tmp_path):
    root = tmp_path / "data"
    copy_images(CATS_DOGS / "train", root / "train", 20)
    copy_images(CATS_DOGS / "validation", root / "validation", 5)
    return root


def _train_process(data_dir, out, *extra):
    args = [sys.executable, "-m", "mobiletune", "train", str(data_dir), "--out", str(out),
            *[a for s in RESUMABLE for a in ("--set", s)], *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(out, epoch, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "checkpoint.npz").exists() and _checkpoint_epoch(out) >= epoch:
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.01)
    pytest.fail("no checkpoint appeared")


def _checkpoint_epoch(out) -> int:
    with np.load(out / "checkpoint.npz") as f:
        return len(json.loads(bytes(f["state"]).decode())["history"])  # one row per completed epoch


@pytest.mark.parametrize(("kill_after_epoch", "phase_end"), [(2, PHASE1_EPOCHS), (PHASE1_EPOCHS + 1, EPOCHS)],
                         ids=["in-phase-1", "in-phase-2"])
def test_kill_9_then_resume_equals_an_unbroken_run(cats_dogs_small, tmp_path, kill_after_epoch, phase_end):
    unbroken = _train_process(cats_dogs_small, tmp_path / "unbroken")
    assert unbroken.wait(timeout=600) == 0, unbroken.communicate()[0][-3000:]

    victim = _train_process(cats_dogs_small, tmp_path / "killed")
    _wait_for_checkpoint(tmp_path / "killed", kill_after_epoch, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "metrics.json").exists()  # it really died before the end
    landed = _checkpoint_epoch(tmp_path / "killed")
    # the kill landed inside the phase under test, so resume continues that phase, not a finished one
    assert kill_after_epoch <= landed < phase_end, landed

    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "killed")])
    assert result.exit_code == 0, result.output
    assert f"resuming after epoch {landed} of {EPOCHS}" in result.output
    a = json.loads((tmp_path / "unbroken" / "metrics.json").read_text())
    b = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    for stage in ("before_fine_tuning", "after_fine_tuning"):
        assert b[stage]["test"]["accuracy"] == a[stage]["test"]["accuracy"]
        assert b[stage]["test"]["loss"] == pytest.approx(a[stage]["test"]["loss"], rel=1e-6)
    assert b["resumed"] and not a["resumed"]
    history = lambda run: [{k: v for k, v in row.items() if k != "seconds"}  # noqa: E731
                           for row in json.loads(json.dumps(_rows(run)))]
    assert history(tmp_path / "killed") == history(tmp_path / "unbroken")
    assert not (tmp_path / "killed" / "checkpoint.npz").exists()  # complete: the checkpoint is gone


def _rows(run):
    import csv

    with open(run / "history.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(cats_dogs_small, tmp_path):
    out = tmp_path / "run"
    proc = _train_process(cats_dogs_small, out)
    _wait_for_checkpoint(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    assert f"mobiletune train --resume {out}" in output
    rerun = runner.invoke(app, ["train", str(cats_dogs_small), "--out", str(out)])  # the same command again
    assert rerun.exit_code == 2 and f"did not finish; continue it with mobiletune train --resume {out}" in rerun.output
    result = runner.invoke(app, ["train", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["train", "--resume", str(out)])
    assert again.exit_code == 2 and "already complete" in again.output


def test_resume_refuses_changed_data(cats_dogs_small, tmp_path):
    out = tmp_path / "run"
    proc = _train_process(cats_dogs_small, out)
    _wait_for_checkpoint(out, 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    victim = sorted((cats_dogs_small / "train" / "cats").iterdir())[0]
    victim.write_bytes((CATS_DOGS / "train" / "cats" / "cat.500.jpg").read_bytes())
    result = runner.invoke(app, ["train", "--resume", str(out)])
    assert result.exit_code == 1 and "images changed" in result.output


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_are_an_image_or_a_bad_image(payload):
    try:
        decoded = pixels.decode_image(payload, 16)
    except pixels.BadImage:
        return
    assert decoded.shape == (16, 16, 3)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=600).map(lambda tail: b"\x89PNG\r\n\x1a\n" + tail)
       | st.binary(min_size=1, max_size=600).map(lambda tail: b"\xff\xd8\xff\xe0" + tail)
       | st.binary(min_size=1, max_size=600).map(lambda tail: b"GIF89a" + tail))
def test_random_bytes_behind_real_magic_numbers(payload):
    try:
        pixels.decode_image(payload, 16)
    except pixels.BadImage:
        pass


KEYS = list(load_config().flat())
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                                                st.integers(),
                                                                                                max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=20)), VALUES, max_size=6))
def test_random_configs_give_a_config_or_a_config_error(values):
    try:
        config = from_flat(values)
    except ConfigError as exc:
        assert str(exc)
        return
    assert set(config.flat()) == set(KEYS)


@settings(max_examples=100, deadline=None)
@given(st.recursive(VALUES, lambda inner: st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10))
def test_random_yaml_documents_give_a_config_error_at_most(tmp_path_factory, document):
    import yaml

    path = tmp_path_factory.mktemp("yaml") / "recipe.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_config(path)
    except MobiletuneError:
        pass


def test_bad_input_catalogue_through_the_cli(tmp_path, cats_dogs_small):
    """One line, the right exit code, never a traceback: the cases of docs/reliability.md."""
    from conftest import TINY as tiny

    sets = [a for s in tiny for a in ("--set", s)]
    a_file = tmp_path / "file.jpg"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    broken_model = tmp_path / "broken" / "model.keras"
    broken_model.parent.mkdir()
    broken_model.write_bytes(b"PK\x03\x04")
    (broken_model.parent / "labels.txt").write_text("a\nb\n")
    cases = [
        (["train", str(tmp_path / "missing")], 1, "no such folder"),
        (["train", str(a_file)], 1, "is a file"),
        (["train", str(cats_dogs_small), "--out", str(full), *sets], 2, "not empty"),
        (["train", str(cats_dogs_small), "--set", "phase1.lr=-0.1"], 2, "phase1.lr=-0.1"),
        (["train", str(cats_dogs_small), "--set", "phase2.fine_tune_at=300"], 2, "MobileNetV2 has 154 layers"),
        (["train", str(cats_dogs_small), "--set", "phase1.epochs=many"], 2, "expected int"),
        (["train", str(cats_dogs_small), "--set", "phase1.speed=9"], 2, "unknown config key"),
        (["train"], 2, "missing DATA_DIR"),
        (["train", "--resume", str(tmp_path / "nothing")], 2, "nothing: not a mobiletune run folder (no run.json)"),
        (["evaluate", str(tmp_path / "nothing")], 2, "not a finished mobiletune run folder"),
        (["export", str(tmp_path / "nothing")], 2, "not a finished mobiletune run folder"),
        (["export", str(tmp_path / "nothing"), "--max-drop", "-1"], 2, "--max-drop -1: give accuracy points"),
        (["predict", str(broken_model), str(a_file)], 1, "not a loadable .keras model"),
        (["sweep", str(cats_dogs_small), "--out", str(full)], 2, "not a sweep"),
        (["sweep", str(cats_dogs_small), "--trials", "0", "--out", str(tmp_path / "s")], 2, "at least 1"),
        (["sweep", str(cats_dogs_small), "--out", str(a_file / "s"), *sets], 2, "cannot create it"),
        (["train", str(cats_dogs_small), "--quiet", "--out", str(tmp_path / "c"), *sets, "--set",
          f"features.cache_dir={a_file}"], 2, "features.cache_dir"),
    ]
    for args, code, needle in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == code, (args, result.output)
        assert needle in result.output, (args, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert (full / "keep.txt").read_text() == "mine"
    assert os.listdir(full) == ["keep.txt"]


def test_fewer_images_than_one_batch(tmp_path):
    root = tmp_path / "data"
    copy_images(CATS_DOGS / "train", root, 3)  # 6 images, 80/10/10 -> 2 train images, batch 32
    result = runner.invoke(app, ["train", str(root), "--out", str(tmp_path / "run"), "--set", "data.image_size=32",
                                 "--set", "phase1.epochs=1", "--set", "phase2.epochs=1"])
    assert result.exit_code == 0, result.output


def test_damaged_model_in_a_run_folder(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run.workdir, run)
    data_bytes = (run / "model.keras").read_bytes()
    (run / "model.keras").write_bytes(data_bytes[: len(data_bytes) // 2])  # truncated
    for command in (["evaluate", str(run)], ["export", str(run), "--format", "keras"], ["predict", str(run),
                                                                                      str(run / "x.jpg")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1, (command, result.output)
        assert "not a loadable .keras model" in result.output and "Traceback" not in result.output


def test_run_files_get_the_usual_mode(tmp_path):
    """Written whole (temp file, then rename), but readable as any new file is: mkstemp alone gives 0600."""
    from mobiletune import runfolder

    runfolder.write_text(tmp_path / "report.html", "<p>hi</p>")
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == runfolder.FILE_MODE == 0o666 & ~runfolder._umask()
