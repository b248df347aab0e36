import json

from typer.testing import CliRunner

from conftest import TINY
from mobiletune import __version__
from mobiletune.cli import app

runner = CliRunner()


def _sets(*extra):
    return [arg for item in [*TINY, *extra] for arg in ("--set", item)]


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "400"})  # the whole path, however deep tmp_path is
    assert result.exit_code == 0
    for option in ("--out", "--config", "--set", "--overwrite", "--strict", "--quiet"):
        assert option in result.output
    # square brackets in help texts are text, not markup to drop
    assert "(needs mobiletune[ray])" in result.output and "[default: $MLFLOW_TRACKING_URI]" in result.output
    result = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "400"})
    assert "Folder [default: RUN/export]." in result.output


def test_train_multiclass_end_to_end(flowers_tiny, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(flowers_tiny), "--out", str(out), "--no-cache", *_sets()])
    assert result.exit_code == 0, result.output
    assert "feature cache" not in result.output  # the plain recipe
    assert "note: phase 1 is only" in result.output and "phase1.epochs, phase1.min_steps or phase1.lr" in result.output
    assert "before fine-tuning" in result.output and "after fine-tuning" in result.output
    assert "McNemar's exact test, before vs after on the same images: p = " in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    assert sum(metrics["n_images"].values()) == 25

    again = runner.invoke(app, ["train", str(flowers_tiny), "--out", str(out), *_sets()])
    assert again.exit_code == 2
    assert "not empty" in again.output and "--overwrite" in again.output
    assert (out / "model.keras").exists()  # nothing the user made was touched


def test_bad_input_is_one_line(tmp_path):
    cases = [
        (["train", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], 1, "no such folder"),
        (["train", str(tmp_path), "--set", "phase1.lr=-1"], 2, "phase1.lr=-1"),
        (["train", str(tmp_path), "--set", "phase9.x=1"], 2, "unknown config key"),
        (["train", str(tmp_path), "--set", "lr"], 2, "expected key=value"),
        (["train", str(tmp_path), "--config", str(tmp_path / "none.yaml")], 2, "no such file"),
    ]
    for args, code, needle in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == code, (args, result.output)
        assert needle in result.output and "Traceback" not in result.output
        assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1


def test_bad_input_is_refused_before_tensorflow_starts(tmp_path):
    """A typo costs a fraction of a second, not TensorFlow's start-up: every check that needs no model runs
    first. A fresh interpreter, since this one has long imported TensorFlow."""
    import subprocess
    import sys

    code = f"""
import os
import sys
from typer.testing import CliRunner
from mobiletune.cli import app
here = {str(tmp_path)!r}
cases = [["train", here + "/nope"], ["train", here, "--set", "phase9.x=1"], ["sweep", here + "/nope"],
         ["sweep", here, "--objectives", "speed"], ["audit", here + "/nope.csv"],
         ["evaluate", here], ["predict", here + "/m.keras", "x.jpg"], ["train", "--resume", here],
         ["sweep", here, "--trials", "0"], ["sweep", here, "--space", here + "/nope.yaml"],
         ["sweep", here, "--baseline", here + "/nope"], ["sweep", here, "--timeout", "0"]]
finished = here + "/run"  # a finished run's folder, as far as the first check reads it
os.makedirs(finished)
with open(finished + "/metrics.json", "w") as f:
    f.write("{{}}")
cases.append(["evaluate", finished, "--data", here + "/nope"])
cases.append(["evaluate", finished, "--out", here + "/elsewhere"])  # --out without --data
os.makedirs(here + "/data/a")
cases.append(["evaluate", finished, "--data", here + "/data", "--out", here])  # a non-empty folder of the user's
os.makedirs(here + "/data/b")
for command in ("train", "sweep", "audit"):  # its charts would be read as a class of images next time
    cases.append([command, here + "/data", "--out", here + "/data/runs/first"])
for args in cases:
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and result.output.startswith("error: "), (args, result.output)
print("tensorflow imported:", "tensorflow" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "tensorflow imported: False"


def test_cache_ls_and_clear(cats_dogs_tiny, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    args = ["train", str(cats_dogs_tiny), "--out", str(out), *_sets(f"features.cache_dir={cache}")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    # 12 training images x (2 views + the plain one the audit compares) + 8 validation + 2 test
    assert "features: 0 cached, 46 computed" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["features"]["images_computed"] == 46 and metrics["features"]["cache_bytes"] > 0
    assert metrics["peak_rss_mb"] > 100
    # what the earlier model left (an export, an evaluation, an --audit page) goes with it; a file of the user's
    # stays, in those folders too
    earlier_curves = sorted((out / "logs").rglob("events.out.tfevents.*"))
    assert earlier_curves
    for made in ("export/model.onnx", "export/labels.txt", "evaluations/new/evaluation.json", "audit.html",
                 "notes.txt", "logs/mine.txt", "export/mine.txt", "evaluations/mine.txt"):
        (out / made).parent.mkdir(parents=True, exist_ok=True)
        (out / made).write_text("earlier")
    (out / "export" / "export.json").write_text(json.dumps({"model_sha256": "earlier", "checks": [
        {"format": "onnx"}, "odd", None, {"format": ["odd"]}]}))
    again = runner.invoke(app, [*args, "--overwrite"])
    assert "features: 46 cached, 0 computed" in again.output
    assert sorted(p.name for p in (out / "export").iterdir()) == ["mine.txt"]
    assert sorted(p.name for p in (out / "evaluations").iterdir()) == ["mine.txt"] and not (out / "audit.html").exists()
    for mine in ("notes.txt", "logs/mine.txt", "export/mine.txt", "evaluations/mine.txt"):
        assert (out / mine).read_text() == "earlier"
    assert not any(p.exists() for p in earlier_curves)  # the earlier run's TensorBoard curves, not mixed in
    listing = runner.invoke(app, ["cache", "ls", "--cache-dir", str(cache)])
    assert listing.exit_code == 0 and "1 store(s)" in listing.output and "1 exported extractor(s)" in listing.output
    # the data set's whole path, wrapped in its table's last column however narrow the terminal
    assert str(cats_dogs_tiny.resolve()) in "".join(listing.output.split()).replace("│", "")
    assert "removed 0 " in runner.invoke(app, ["cache", "clear", "--cache-dir", str(cache), "--older-than",
                                               "30d"]).output
    bad_age = runner.invoke(app, ["cache", "clear", "--cache-dir", str(cache), "--older-than", "soon"])
    assert bad_age.exit_code == 2 and "--older-than 'soon': give an age like 30d" in bad_age.output
    cleared = runner.invoke(app, ["cache", "clear", "--cache-dir", str(cache)])
    assert cleared.exit_code == 0 and "MB freed" in cleared.output
    assert "0 store(s)" in runner.invoke(app, ["cache", "ls", "--cache-dir", str(cache)]).output


def test_a_full_disk_is_one_line(tiny_run, monkeypatch):
    import errno

    from mobiletune.report import html as report_html

    def no_space(run):
        raise OSError(errno.ENOSPC, "No space left on device", str(run / "report.html"))

    monkeypatch.setattr(report_html, "build_report", no_space)
    result = runner.invoke(app, ["report", str(tiny_run.workdir)])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {tiny_run.workdir / 'report.html'}: No space left on device"
