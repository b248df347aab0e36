"""Trials: a worker's trials share one MobileNetV2 base per input size, and each starts as a new model would."""

import random

import numpy as np

from conftest import TINY
from mobiletune.config import from_flat, load_config
from mobiletune.data import folders as data
from mobiletune.data import scan
from mobiletune.data.manifest import read_manifest
from mobiletune.features import cache
from mobiletune.model.network import create_model
from mobiletune.training.loop import seed_everything
from mobiletune.tuning import objectives, trials


def _weights(classifier) -> list[np.ndarray]:
    return [np.asarray(w) for w in classifier.model.get_weights()]


def test_trial_models_share_a_base_and_start_as_a_new_model_would(cats_dogs_tiny, tmp_path):
    config = load_config(overrides=TINY)
    images = data.load_images(cats_dogs_tiny, config.data)
    shared = trials.Shared(config, images, [config.phase2.fine_tune_at], scan.FileIndex(None), tmp_path,
                           objectives.Objectives())
    imagenet = shared.extractor(config.data.image_size).base.get_weights()

    seed_everything(config.data.seed)
    first = shared.trial_model(config)
    first.base.set_weights([w + 1 for w in imagenet])  # what a trial's fine-tuning does to it
    seed_everything(config.data.seed)
    second = shared.trial_model(config)
    state_after_reuse = random.getstate()

    seed_everything(config.data.seed)  # the same trial built from scratch, as before bases were shared
    fresh = create_model(from_flat({**config.flat(), "model.weights": "none"}), len(images.classes))
    fresh.base.set_weights(imagenet)

    assert second.base is first.base  # built once
    assert random.getstate() == state_after_reuse  # the generator left where building the base leaves it
    for reused, new in zip(_weights(second), _weights(fresh), strict=True):
        np.testing.assert_array_equal(reused, new)  # ImageNet base again, and the same initial head


def test_a_trial_trains_on_the_split_its_run_makes(flowers_tiny, tmp_path):
    """The sweep's trials see the images a `train` run of their config would: data.exclude left out, and near
    copies regrouped into one split (data.dedupe). So the trial chosen is retrained on the images it was
    validated on, and no trial is scored on near copies of its training images."""
    from PIL import Image

    from mobiletune.training.run import train_and_evaluate
    from mobiletune.tuning import search

    originals = [sorted((flowers_tiny / c).iterdir())[i] for i, c in enumerate(["daisy", "roses", "tulips"])]
    for f in originals:  # 80%-size copies: near duplicates at 128 px (tests/test_audit.py)
        image = Image.open(f)
        image.resize((image.width * 4 // 5, image.height * 4 // 5)).save(f.with_name(f"copy_{f.name}"), quality=75)
    left_out = sorted((flowers_tiny / "sunflowers").iterdir())[0].relative_to(flowers_tiny).as_posix()
    (tmp_path / "exclude.txt").write_text(left_out + "\n")
    config = load_config(overrides=[*TINY, "data.image_size=128", f"data.exclude={tmp_path / 'exclude.txt'}"])

    cache.cache_root(config).mkdir(parents=True, exist_ok=True)  # as run_sweep makes it
    index, images, cuts = search.inputs(config, flowers_tiny, {})
    shared = trials.Shared(config, images, cuts, index, tmp_path / "logs", objectives.Objectives())
    trial = shared.features_for(config).images
    train_and_evaluate(config, flowers_tiny, tmp_path / "run")
    run = {r["path"]: r["split"] for r in read_manifest(tmp_path / "run" / "split.csv")}

    assert left_out not in run and left_out not in images.paths
    assert dict(zip(trial.paths, trial.splits, strict=True)) == run
    assert dict(zip(images.paths, images.splits, strict=True)) != run  # the scan alone splits a pair apart


def test_a_worker_keeps_the_models_of_the_choice_and_of_the_base_recipe_only(tmp_path):
    """`Shared.keep_chosen` after each trial: the study's choice so far and the first base-recipe trial stay,
    and nothing is chosen while no trial is within the latency budget."""
    import optuna

    from mobiletune.training.run import Trained

    base = load_config(overrides=TINY)
    other = load_config(overrides=[*TINY, "phase1.lr=0.01"])
    study = optuna.create_study(directions=["maximize", "minimize"])
    shared = trials.Shared(base, None, [100], scan.FileIndex(None), tmp_path, objectives.Objectives(
        ("accuracy", "latency"), "tflite", max_latency_ms=1.0))
    for number, (config, accuracy, ms) in enumerate([(base, 0.7, 1.5), (other, 0.9, 2.0), (base, 0.6, 0.5),
                                                     (other, 0.8, 0.9), (other, 0.75, 0.4)]):
        study.add_trial(optuna.trial.create_trial(values=[accuracy, ms], user_attrs={"latency_ms_tflite": ms}))
        shared.trained[number] = Trained(number, config, None, [], [], [], tmp_path)
        shared.keep_chosen(study, study.trials[-1])
        kept = sorted(shared.trained)
        assert kept == {0: [0], 1: [0], 2: [0, 2], 3: [0, 3], 4: [0, 3]}[number], (number, kept)
