"""The unknown-input scores and detector: synthetic features where the answer is known, then a real run."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import CATS_DOGS
from mobiletune import runfolder
from mobiletune.cli import app
from mobiletune.evaluation import unknown

runner = CliRunner()


def test_confident_logits_score_lower_than_flat_ones_and_binary_is_the_pair_0_z():
    confident, flat = np.array([[8.0, -3.0, -2.0]]), np.array([[0.1, 0.0, 0.05]])
    for name in ("msp", "energy"):
        assert unknown.scores(name, None, confident) < unknown.scores(name, None, flat)
    z = np.array([[2.5], [-1.0]])
    pair = np.concatenate([np.zeros_like(z), z], axis=1)
    for name in ("msp", "energy"):
        assert np.allclose(unknown.scores(name, None, z), unknown.scores(name, None, pair))


def test_knn_is_cosine_distance_to_the_kth_nearest_training_image():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(50, 8)) + 5  # one cluster away from the origin
    reference = unknown.fit("knn", train, train[:5], np.zeros((5, 1)), keep=0.9, k=1).reference
    assert unknown.knn(train[:3] * 7.0, reference, 1) == pytest.approx(0, abs=1e-3)  # scale does not matter
    far = -train[:3]  # pointing the other way: cosine distance near 2
    assert (unknown.knn(far, reference, 1) > 1.5).all()
    k3 = unknown.knn(train[:3], reference, 3)
    assert (k3 >= unknown.knn(train[:3], reference, 1)).all()


def test_threshold_keeps_the_asked_share_of_validation_and_survives_a_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    train, val = rng.normal(size=(200, 16)), rng.normal(size=(97, 16))
    logits = rng.normal(size=(97, 3))
    for name in ("knn", "energy", "msp"):
        detector = unknown.fit(name, train, val, logits, keep=0.9, k=5)
        kept = np.mean(detector.scores(val, logits) <= detector.threshold)
        # knn's threshold also counts the training images left out in turn, drawn from the same distribution
        assert kept == pytest.approx(detector.validation_kept) and 0.9 <= kept < (0.92 if name != "knn" else 0.97)
        detector.save(tmp_path / f"{name}.npz")
        again = unknown.load(tmp_path / f"{name}.npz")
        scores = detector.scores(val, logits)
        assert again.summary(scores) == detector.summary(scores)
        assert np.allclose(again.scores(val, logits), scores)
    assert unknown.load(tmp_path / "none.npz") is None


def test_a_run_carries_its_detector_and_predict_says_unknown(tiny_run, tmp_path):
    run = tiny_run.workdir
    found = json.loads((run / "metrics.json").read_text())["unknown"]
    assert found["score"] == "knn" and found["validation_kept"] >= 0.95 and 0 <= found["test_kept"] <= 1
    image = CATS_DOGS / "train" / "cats" / "cat.10.jpg"
    scored = json.loads(runner.invoke(app, ["predict", str(run), str(image), "--format", "json"]).stdout)
    assert np.isfinite(scored["unknown_score"]) and scored["unknown"] == (scored["unknown_score"] > found["threshold"])
    plain = json.loads(runner.invoke(app, ["predict", str(run), str(image), "--format", "json",
                                           "--no-unknown"]).stdout)
    assert "unknown" not in plain and plain["top"] == scored["top"]

    # with a threshold nothing passes, every image is unknown, with its score and nearest class
    strict = tmp_path / "run"
    shutil.copytree(run, strict)
    detector = unknown.load(strict / runfolder.UNKNOWN)
    dataclasses.replace(detector, threshold=-1000.0, validation_kept=0.0).save(strict / runfolder.UNKNOWN)
    table = runner.invoke(app, ["predict", str(strict), str(image)])
    assert table.exit_code == 0 and "\tunknown (score " in table.stdout
    assert "> -1000.000; nearest: cats" in table.stdout or "> -1000.000; nearest: dogs" in table.stdout
    csv = runner.invoke(app, ["predict", str(strict), str(image), "--format", "csv"]).stdout.splitlines()
    assert csv[0].startswith("path,unknown,unknown_score,class1") and csv[1].split(",")[1] == "True"


def test_a_cats_and_dogs_model_flags_flowers_and_keeps_its_own_test_photos(learned_run):
    """Real unknown inputs: all 200 flowers_mini photos against a model trained on cats and dogs. Its 40
    validation images put the threshold below their largest score, so keeping 95% is a real cut."""
    import mobiletune as mt
    from conftest import FLOWERS

    run, metrics = learned_run.workdir, learned_run.metrics
    detector = unknown.load(run / runfolder.UNKNOWN)
    found = metrics["unknown"]
    # the threshold keeps 95% of validation and training-left-out scores together: validation alone is near it
    assert found["threshold"] == pytest.approx(detector.threshold) and 0.85 <= found["validation_kept"] < 1
    own = mt.load(run).predict(sorted((run.parent / "data" / "test").rglob("*.jpg")))
    kept = np.mean([not p.unknown for p in own])
    assert len(own) == 40 and kept >= 0.9 and kept == pytest.approx(found["test_kept"])  # 97.5% measured
    flowers = mt.load(run).predict(FLOWERS)
    assert len(flowers) == 200 and all(p.error == "" for p in flowers)
    # 98% measured (k = 3, unaugmented reference, threshold over validation and training left out in turn);
    # the old detector (k = 5, augmented reference, validation only) flagged 88%
    assert np.mean([p.unknown for p in flowers]) >= 0.93
    assert all(p.unknown == (p.unknown_score > detector.threshold) for p in flowers + own)


def _reference_is_plain(run: Path) -> None:
    """The stored reference (from the feature cache, through the layers above the cut) is each layer's features of
    the training images as a test image's are computed from pixels (no flip, no rotation)."""
    from mobiletune.config import load_config
    from mobiletune.data import folders
    from mobiletune.data.pixels import eval_batches
    from mobiletune.model import convention
    from mobiletune.model.network import Classifier, load_model

    config = load_config(run / "config.yaml")
    classifier = Classifier(load_model(run / runfolder.MODEL))
    images = folders.load_images(run.parent / "data", config.data)
    detector = unknown.load(run / runfolder.UNKNOWN)
    scoring = classifier.scoring_model(detector.layers)
    plain = np.concatenate([np.asarray(scoring.predict_on_batch(x)[0]) for x, _ in
                            eval_batches(images, config.data.image_size, 32, "train")])
    assert detector.reference.shape == plain.shape
    for reference, layer in zip(unknown.split_layers(detector.reference, detector.widths),
                                unknown.split_layers(plain, detector.widths), strict=True):
        cosine = np.sum(reference * convention.unit_rows(layer), axis=1)
        assert cosine.min() > 0.999  # the augmented views' own cosines to these are ~0.9


def test_a_run_references_its_training_images_unaugmented(learned_run):
    """An augmented view sits farther from any unseen photo and blurs the score: the reference is plain."""
    detector = unknown.load(learned_run.workdir / runfolder.UNKNOWN)
    assert detector.layers == () and detector.widths == ()  # at 128 px the pooled base output alone (4x4 maps)
    _reference_is_plain(learned_run.workdir)


def test_a_large_run_embeds_only_the_reference_sample(learned_run, monkeypatch):
    """Above REFERENCE_LIMIT training images, only the sampled ones are embedded, and the detector is the one
    fitted on all of them and sampled after."""

    from mobiletune.config import load_config
    from mobiletune.data import folders
    from mobiletune.data.pixels import eval_batches
    from mobiletune.model.network import Classifier, load_model

    run = learned_run.workdir
    config = load_config(run / "config.yaml")
    classifier = Classifier(load_model(run / runfolder.MODEL))
    images = folders.load_images(run.parent / "data", config.data)
    whole = classifier.scoring_model()  # at 128 px the pooled base output alone
    embedded = {split: [np.concatenate(a) for a in zip(*((np.asarray(p), np.asarray(z)) for p, z in (
        whole.predict_on_batch(x) for x, _ in eval_batches(images, config.data.image_size, 32, split))), strict=True)]
        for split in ("train", "validation")}
    monkeypatch.setattr(unknown, "REFERENCE_LIMIT", 17)
    fit, given = unknown.fit, []
    monkeypatch.setattr(unknown, "fit", lambda score, train, *a, **kw: given.append(len(train)) or fit(score, train,
                                                                                                         *a, **kw))
    detector, _ = unknown.fit_run(classifier, images, config)
    assert given == [17]
    p = config.predict
    expected = fit(p.unknown_score, embedded["train"][0], *embedded["validation"], keep=p.keep, k=p.knn_k,
                   seed=config.data.seed, layers=detector.layers, widths=detector.widths)
    assert len(detector.reference) == 17 and len(embedded["train"][0]) == len(images.indices("train")) > 17
    assert np.allclose(detector.reference, expected.reference, atol=2e-3)
    assert detector.threshold == pytest.approx(expected.threshold, abs=2e-3)


# ---------------------------------------------------------------------------------------------
# At 96 px: the second layer


@pytest.fixture(scope="module")
def run_at_96(tmp_path_factory):
    """The learned run's recipe and photos at 96 px, where the base's last map is 3x3."""
    from conftest import LEARNED, _finished_run

    overrides = [o for o in LEARNED if not o.startswith("data.image_size")] + ["data.image_size=96"]
    return _finished_run(tmp_path_factory, "run_at_96", {"train": ("train", 30, 0), "validation": ("validation", 20, 0),
                                                         "test": ("validation", 20, 100)}, overrides).workdir


def _unknowns(predictor, paths) -> tuple[np.ndarray, np.ndarray]:
    from mobiletune.ship.predict import predict_paths

    got = {p.path: p for p in predict_paths(predictor, [str(p) for p in paths])}
    return (np.array([got[str(p)].unknown for p in paths]), np.array([got[str(p)].unknown_score for p in paths]))


def test_at_96_px_the_score_reads_block_14_and_calls_flowers_unknown(run_at_96):
    """The pooled 3x3 maps let half of the flowers through as cats or dogs (measured: 50-57%); with block 14's layer
    beside them the run calls most flowers unknown and keeps most of its own test images."""
    from conftest import FLOWERS
    from mobiletune.ship.predict import load_predictor

    detector = unknown.load(run_at_96 / runfolder.UNKNOWN)
    assert detector.layers == unknown.LAYERS and detector.widths == (960, 1280)
    assert len(detector.centre) == len(detector.spread) == 2
    predictor = load_predictor(run_at_96)
    flowers = [p for d in sorted(FLOWERS.iterdir()) for p in sorted(d.iterdir())[:8]]
    test = sorted((run_at_96.parent / "data" / "test").rglob("*.jpg"))
    assert np.mean(_unknowns(predictor, flowers)[0]) >= 0.85
    assert np.mean(~_unknowns(predictor, test)[0]) >= 0.8
    _reference_is_plain(run_at_96)  # block 14 from the cache's boundary activations, as from pixels


def test_a_middle_layer_below_the_cut_comes_from_pixels():
    """Block 14 lies above the default cut (100), where the cached boundary activations reach it; a cut above it
    (fine_tune_at 130) makes `embed` compute the features from pixels."""
    import keras

    from mobiletune.model import cut

    base = keras.applications.MobileNetV2(input_shape=(96, 96, 3), include_top=False, weights=None)
    assert cut.above_cut(base, 100, unknown.LAYERS) and cut.above_cut(base, 100, ())
    assert not cut.above_cut(base, 130, unknown.LAYERS) and cut.above_cut(base, 130, ())


def test_at_96_px_the_tflite_heads_score_as_the_run(run_at_96, tmp_path):
    """The exported graphs compute both layers, their deviations and the larger, as `predict RUN` does; the int8
    file too, whose stranger inputs must not be clamped to the least typical training image's score."""
    from conftest import FLOWERS
    from mobiletune.ship.export import FILE_NAMES, export_run
    from mobiletune.ship.predict import load_predictor

    result = export_run(run_at_96, ["tflite", "tflite-int8"], tmp_path / "export", max_drop=10)
    images = sorted((run_at_96.parent / "data" / "test").rglob("*.jpg"))[::2] + [
        p for d in sorted(FLOWERS.iterdir()) for p in sorted(d.iterdir())[:4]]
    run_flags, run_scores = _unknowns(load_predictor(run_at_96), images)
    assert run_flags.any() and not run_flags.all()
    file_flags, file_scores = _unknowns(load_predictor(Path(result["out"]) / FILE_NAMES["tflite"]), images)
    assert np.allclose(file_scores, run_scores, atol=0.05, rtol=1e-3)
    assert np.mean(file_flags == run_flags) >= 0.97
    int8_flags, int8_scores = _unknowns(load_predictor(Path(result["out"]) / FILE_NAMES["tflite-int8"]), images)
    assert np.mean(int8_flags == run_flags) >= 0.85  # the floor test_clients sets for int8
    assert int8_scores.max() > 2 * float(unknown.load(run_at_96 / runfolder.UNKNOWN).threshold)
    # and MediaPipe's ImageClassifier, from the metadata alone, lists "unknown" where the run says unknown
    from test_clients import _mediapipe_results

    seen = [u for _, u in _mediapipe_results(Path(result["out"]) / FILE_NAMES["tflite"], images, 96)]
    assert np.mean(np.array(seen) == run_flags) >= 0.97
