import csv
import json

import numpy as np
import pytest
import yaml

from mobiletune.data import folders as data
from mobiletune.data import pixels
from mobiletune.data.manifest import read_manifest
from mobiletune.model import network as model_lib
from mobiletune.model.network import Classifier
from mobiletune.training.run import train_and_evaluate

RUN_FILES = {"config.yaml", "split.csv", "audit.csv", "skipped.csv", "history.csv", "metrics.json",
             "before_fine_tuning.png", "after_fine_tuning.png", "summary.md", "model.keras", "before_fine_tuning.keras",
             "test_predictions.csv", "report.html", "run.json", "unknown.npz", "model_card.md", "logs"}


def _history(run):
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def test_end_to_end_run_folder(tiny_run, tiny_config):
    run, result = tiny_run.workdir, tiny_run
    assert {p.name for p in run.iterdir()} == RUN_FILES  # and no temporary files left behind

    history = _history(run)
    assert [(r["epoch"], r["phase"]) for r in history] == [("1", "1"), ("2", "2")]
    for row in history:
        for key in ("accuracy", "val_accuracy"):
            assert 0.0 <= float(row[key]) <= 1.0
        assert float(row["loss"]) > 0 and float(row["seconds"]) > 0

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classes"] == ["cats", "dogs"]
    assert metrics["n_images"] == {"train": 12, "validation": 8, "test": 2}
    assert metrics["base_layers"] == 154 and metrics["fine_tune_at"] == 100
    for stage in ("before_fine_tuning", "after_fine_tuning"):
        assert 0.0 <= metrics[stage]["test"]["accuracy"] <= 1.0 and metrics[stage]["test"]["loss"] > 0
    assert metrics["seconds"]["total"] >= metrics["seconds"]["phase1"] + metrics["seconds"]["phase2"]

    assert yaml.safe_load((run / "config.yaml").read_text()) == tiny_config.to_dict()
    manifest = read_manifest(run / "split.csv")
    assert len({r["path"] for r in manifest}) == len(manifest) == 22  # no file in two splits
    summary = (run / "summary.md").read_text()
    assert "| before fine-tuning |" in summary and "`phase2.fine_tune_at` | 100" in summary
    card = (run / "model_card.md").read_text()
    for section in ("## Intended use", "## Data", "## Test results", "## Unknown inputs", "## Known limits",
                    "## Provenance", metrics["environment"]["base_weights_sha256"], "| cats | 6 |"):
        assert section in card, section

    # model.keras reloads and gives the trained model's own test predictions (recorded before saving)
    images = data.load_test_images(run, None, tiny_config.data)  # the run's own test split, from its manifest
    test = images.indices("test")
    with open(run / "test_predictions.csv") as f:
        recorded = {r["path"]: float(r["p_after_dogs"]) for r in csv.DictReader(f)}
    reloaded = model_lib.load_model(run / "model.keras")
    decoded = np.concatenate([p for _, p, _ in pixels.iter_pixels(images, test, tiny_config.data.image_size, 8)])
    logits = reloaded.predict(decoded.astype("float32"), verbose=0)[:, 0]
    for i, logit in zip(test, logits, strict=True):
        assert 1 / (1 + np.exp(-logit)) == pytest.approx(recorded[images.paths[i]], abs=1e-5)
    assert result.metrics == metrics


def test_same_seed_same_result(cats_dogs_tiny, tiny_config, tmp_path):
    a = train_and_evaluate(tiny_config, cats_dogs_tiny, tmp_path / "a")
    b = train_and_evaluate(tiny_config, cats_dogs_tiny, tmp_path / "b")
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in a.history]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in b.history]
    assert a.metrics["after_fine_tuning"] == b.metrics["after_fine_tuning"]
    x = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    ma, mb = (model_lib.load_model(r / "model.keras") for r in (tmp_path / "a", tmp_path / "b"))
    assert np.array_equal(ma.predict(x, verbose=0), mb.predict(x, verbose=0))


def test_a_phase_of_zero_epochs_is_still_tested(cats_dogs_tiny, tmp_path):
    """phase1.epochs=0 (the head as initialised, then fine-tuning): "before" is the untrained head, not a crash."""
    from conftest import TINY
    from mobiletune.config import load_config

    result = train_and_evaluate(load_config(overrides=[*TINY, "phase1.epochs=0"]), cats_dogs_tiny, tmp_path / "run")
    assert [row["phase"] for row in result.history] == [2]
    assert (tmp_path / "run" / "before_fine_tuning.keras").exists()
    assert 0 <= result.metrics["before_fine_tuning"]["test"]["accuracy"] <= 1


def test_class_weight_auto_balances_an_imbalanced_split(tmp_path):
    from conftest import CATS_DOGS, TINY, copy_images
    from mobiletune.config import load_config

    root = tmp_path / "data"
    (root / "train" / "cats").mkdir(parents=True)
    for name in sorted((CATS_DOGS / "train" / "cats").iterdir())[:12]:
        (root / "train" / "cats" / name.name).write_bytes(name.read_bytes())
    (root / "train" / "dogs").mkdir(parents=True)
    for name in sorted((CATS_DOGS / "train" / "dogs").iterdir())[:4]:
        (root / "train" / "dogs" / name.name).write_bytes(name.read_bytes())
    copy_images(CATS_DOGS / "validation", root / "validation", 3)
    config = load_config(overrides=[*TINY, "data.class_weight=auto"])
    result = train_and_evaluate(config, root, tmp_path / "run")
    assert result.metrics["class_weight"] == pytest.approx({"cats": 16 / 24, "dogs": 16 / 8})
    assert "auto: balanced" in (tmp_path / "run" / "summary.md").read_text()
    assert result.metrics["balance_note"].startswith("the classes are imbalanced in train (cats 12, dogs 4)")
    assert "class_weight=auto" not in result.metrics["balance_note"]  # it is on already
    plain = train_and_evaluate(load_config(overrides=TINY), root, tmp_path / "plain")
    assert plain.metrics["class_weight"] == {}
    summary = (tmp_path / "plain" / "summary.md").read_text()  # with balanced accuracy beside accuracy
    assert "Note: the classes are imbalanced" in summary and "--set data.class_weight=auto weights" in summary
    assert "| stage | accuracy | 95% interval | loss | balanced accuracy |" in summary
    assert plain.history[0]["loss"] != result.history[0]["loss"]  # the weights reached the loss


def test_an_image_broken_past_its_header_is_skipped_and_the_split_is_what_a_rerun_makes(flowers_tiny, tiny_config,
                                                                                         tmp_path):
    """The scan's header probe passes a truncated JPEG; the feature pass finds it. The run leaves it out,
    lists it in skipped.csv, and splits the rest exactly as a later scan (a --resume) will."""
    from mobiletune import runfolder
    from mobiletune.config import from_flat
    from mobiletune.data import scan
    from mobiletune.features import cache

    tiny_config = from_flat({**tiny_config.flat(), "features.cache_dir": str(tmp_path / "cache")})  # a cold cache
    victim = sorted((flowers_tiny / "roses").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # the header parses; the pixels end
    metrics = train_and_evaluate(tiny_config, flowers_tiny, tmp_path / "run").metrics
    # the feature pass ran again after the scan learnt of the broken file: its first pass's work is "computed"
    assert metrics["features"]["images_cached"] == 0 and metrics["features"]["images_computed"] > 0
    skipped = runfolder.read_csv(tmp_path / "run" / "skipped.csv")
    assert [r["path"] for r in skipped] == [f"roses/{victim.name}"] and "cannot decode" in skipped[0]["reason"]
    assert "truncated" in skipped[0]["reason"]  # found by decoding it, in the feature pass, not by the header probe
    manifest = read_manifest(tmp_path / "run" / "split.csv")
    index = scan.FileIndex(cache.cache_root(tiny_config) / scan.INDEX_NAME)
    again = data.load_images(flowers_tiny, tiny_config.data, index)
    assert [(r["path"], r["split"]) for r in manifest] == list(zip(again.paths, again.splits, strict=True))
    assert again.skipped[0].reason == skipped[0]["reason"]


def test_a_trials_model_fits_only_the_same_config_on_the_same_images(flowers_tiny, tiny_config):
    """`Trained.fits`: otherwise the run trains (a pixel run, another split, other labels, another config)."""
    from dataclasses import replace

    from conftest import TINY
    from mobiletune.config import load_config
    from mobiletune.training.run import Trained

    images = data.load_images(flowers_tiny, tiny_config.data)
    trained = Trained(0, tiny_config, images, [], [], [], flowers_tiny / "logs")
    assert trained.fits(tiny_config, images)
    # trials train on cached features, a pixel run would not
    assert not trained.fits(load_config(overrides=[*TINY, "features.cache=false"]), images)
    assert not trained.fits(load_config(overrides=[*TINY, "phase1.lr=0.5"]), images)
    splits = images.splits.copy()
    splits[0] = "test" if splits[0] != "test" else "train"
    assert not trained.fits(tiny_config, replace(images, splits=splits))
    labels = images.labels.copy()
    labels[0] = (labels[0] + 1) % len(images.classes)
    assert not trained.fits(tiny_config, replace(images, labels=labels))


def _test_set(run):
    """The run's test images decoded from disk, each labelled by the class folder it lies in (not by the run)."""
    from conftest import LEARNED
    from mobiletune.config import load_config

    size = load_config(overrides=LEARNED).data.image_size
    rows = [r for r in read_manifest(run / "split.csv") if r["split"] == "test"]
    root = run.parent / "data"
    x = np.stack([pixels.decode_image((root / r["path"]).read_bytes(), size) for r in rows]).astype("float32")
    y = np.array([r["path"].split("/")[1] == "dogs" for r in rows])
    return x, y


def test_a_run_on_real_photos_learns_and_reports_what_its_model_does(learned_run):
    """Better than chance by a margin a broken pipeline cannot reach (shuffled labels, a head that never trains,
    features of the wrong images), and the reported figures are what the saved models do on the test files."""
    run, metrics = learned_run.workdir, learned_run.metrics
    x, y = _test_set(run)
    assert len(y) == 40 and y.sum() == 20
    for stage, file in (("before_fine_tuning", "before_fine_tuning.keras"), ("after_fine_tuning", "model.keras")):
        test = metrics[stage]["test"]
        assert test["n"] == 40 and test["accuracy"] >= 0.8 and test["loss"] < 0.4, (stage, test)  # chance: 0.5, 0.69
        p = 1 / (1 + np.exp(-model_lib.load_model(run / file).predict(x, verbose=0)[:, 0].astype("float64")))
        assert test["accuracy"] == np.mean((p > 0.5) == y), stage
        loss = -np.mean(np.where(y, np.log(p), np.log(1 - p)))
        assert test["loss"] == pytest.approx(loss, rel=1e-3, abs=1e-4), stage
    history = learned_run.history
    assert history[9]["loss"] < history[0]["loss"] / 2  # phase 1 fits the training set
    assert max(r["val_accuracy"] for r in history) >= 0.8


def test_fine_tuning_trains_the_layers_from_fine_tune_at_and_nothing_below(learned_run):
    """Between before_fine_tuning.keras and model.keras: every kernel of the base from `fine_tune_at` on moved,
    every weight below it is equal, BatchNorm (inference mode, `model.bn_mode`) is equal everywhere."""
    import keras

    run, metrics = learned_run.workdir, learned_run.metrics
    before, after = (Classifier(model_lib.load_model(run / f)) for f in ("before_fine_tuning.keras", "model.keras"))
    heads = [c.logits.get_weights()[0] for c in (before, after)]
    before, after = before.base, after.base
    cut = metrics["fine_tune_at"]
    assert cut == 100 and len(before.layers) == metrics["base_layers"]
    moved = frozen = 0
    for i, (a, b) in enumerate(zip(before.layers, after.layers, strict=True)):
        if not a.weights:
            continue
        same = [np.array_equal(u, v) for u, v in zip(a.get_weights(), b.get_weights(), strict=True)]
        if i < cut or isinstance(a, keras.layers.BatchNormalization):
            assert all(same), (i, a.name)
            frozen += 1
        else:
            assert not any(same), (i, a.name)  # a convolution's kernel (and bias, if any) trained
            moved += 1
    assert moved >= 15 and frozen >= 80  # 18 and 86 in Keras 3.12
    assert not np.array_equal(*heads)  # the head trains on in phase 2
