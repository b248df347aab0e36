import csv
import json
import shutil

from typer.testing import CliRunner

from conftest import CATS_DOGS
from mobiletune.cli import app
from mobiletune.ship.predict import load_predictor, predict_paths

runner = CliRunner()


def _folder_with_a_broken_file(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name in ("cat.10.jpg", "cat.11.jpg"):
        shutil.copy(CATS_DOGS / "train" / "cats" / name, folder / name)
    shutil.copy(CATS_DOGS / "train" / "dogs" / "dog.10.jpg", folder / "sub" / "dog.10.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "notes.txt").write_text("not an image, not picked up from a folder")
    return folder


def test_streaming_predictions_keep_order_and_report_bad_files(tiny_run, tmp_path):
    folder = _folder_with_a_broken_file(tmp_path)
    predictor = load_predictor(tiny_run.workdir)
    rows = list(predict_paths(predictor, [str(folder), str(tmp_path / "missing.jpg")], batch=2, top_k=2))
    assert [r.path.rsplit("/", 1)[-1] for r in rows] == ["broken.jpg", "cat.10.jpg", "cat.11.jpg", "dog.10.jpg",
                                                         "missing.jpg"]
    assert rows[0].error and not rows[0].top
    assert "cannot read" in rows[-1].error
    for r in rows[1:4]:
        assert not r.error and len(r.top) == 2 and abs(sum(p for _, p in r.top) - 1) < 1e-5


def test_predict_cli_formats(tiny_run, tmp_path):
    folder = _folder_with_a_broken_file(tmp_path)
    result = runner.invoke(app, ["predict", str(tiny_run.workdir), str(folder), "--format", "json"])
    assert result.exit_code == 1  # one file could not be read; the others were still predicted
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 4 and "error" in lines[0] and lines[1]["top"][0]["class"] in ("cats", "dogs")
    glob = runner.invoke(app, ["predict", str(tiny_run.workdir), str(folder / "*.jpg"), "--format", "csv",
                               "--top-k", "2"])
    assert glob.stdout.splitlines()[0] == "path,unknown,unknown_score,class1,p1,class2,p2,error"  # a run folder scores
    assert len(glob.stdout.splitlines()) == 4  # header + broken + two cats
    rows = list(csv.DictReader(glob.stdout.splitlines()))
    assert rows[0]["error"] and not rows[0]["class1"]  # the message under "error", not under a class
    assert not rows[1]["error"] and rows[1]["class2"] in ("cats", "dogs")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    empty = runner.invoke(app, ["predict", str(tiny_run.workdir), str(tmp_path / "empty")])
    assert empty.exit_code == 1 and "a folder with no image files" in empty.stdout
    nothing = runner.invoke(app, ["predict", str(tiny_run.workdir), str(folder / "*.gif"), str(folder / "gone.jpg"),
                                  "--format", "json"])
    errors = [json.loads(line)["error"] for line in nothing.stdout.splitlines()]
    assert nothing.exit_code == 1 and errors[0] == "no file matches" and errors[1].startswith("cannot read (No such")


def _image(folder):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(folder / "cat.jpg")
    return folder / "cat.jpg"


def test_predict_bad_model_is_one_line(tmp_path):
    bogus = tmp_path / "model.keras"
    bogus.write_bytes(b"PK\x03\x04 damaged")
    (tmp_path / "labels.txt").write_text("a\nb\n")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "run.json").write_text("{}")
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.yaml").write_text("trials: 3\n")
    (tmp_path / "sweep" / "best").mkdir()
    for args, needle in (([str(bogus), "x.jpg"], "not a loadable .keras model"),
                         ([str(tmp_path / "unfinished"), "x.jpg"], "did not finish, so it has no model yet; "
                                                                    "continue it with mobiletune train --resume"),
                         ([str(tmp_path / "sweep"), "x.jpg"], f"a sweep folder; the model it chose is "
                                                              f"{tmp_path / 'sweep' / 'best'}"),
                         ([str(tmp_path / "nothing.onnx"), "x.jpg"], "no such model"),
                         ([str(tmp_path / "labels.txt"), "x.jpg"], "not a model"),
                         ([str(_image(tmp_path)), str(tmp_path)], "an image, not a model; the model comes first")):
        result = runner.invoke(app, ["predict", *args])
        assert result.exit_code in (1, 2) and needle in result.output and "Traceback" not in result.output


def test_the_unknown_detector_goes_with_the_model_it_was_fitted_to(tiny_run):
    """The run's detector scores its trained model's outputs; the model before fine-tuning is another model."""
    assert load_predictor(tiny_run.workdir).detector is not None
    assert load_predictor(tiny_run.workdir / "before_fine_tuning.keras").detector is None
