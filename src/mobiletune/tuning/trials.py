"""One sweep trial: its config from the space, its features (computed once per input size and
augmentation, on the split a run of its config makes, shared by every trial of the worker), its
training through `fit_recipe`, its measured latency, and where it is tracked. Trials never see the
test set.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import keras
import numpy as np

from mobiletune.config import Config, from_flat
from mobiletune.data import scan
from mobiletune.data.images import ImageSet
from mobiletune.errors import UsageError
from mobiletune.features import cache
from mobiletune.features import compute as features
from mobiletune.model.network import Classifier, build_base, create_model
from mobiletune.ship import latency
from mobiletune.tracking import tracker as tracking
from mobiletune.training.inputs import run_features
from mobiletune.training.loop import Fit, fit_recipe, seed_everything
from mobiletune.training.run import Trained
from mobiletune.training.state import RunState
from mobiletune.training.trainees import Trainees
from mobiletune.tuning import objectives
from mobiletune.tuning.space import suggest


class _ReportToTrial(keras.callbacks.Callback):
    """Validation accuracy to Optuna after every epoch; stop the trial when the pruner says so.

    Never after the trial's last epoch (`epochs`): its work is done by then, and the pruner would
    compare its final value with other trials' mid-training values at the same step (trials
    differ in epochs), throwing away a finished result that may be the best. In a multi-objective
    study the curve is kept on the trial and `objectives.below_same_size_median` decides.
    """

    def __init__(self, trial, epochs: int, multi: bool = False, size: int = 0):
        super().__init__()
        self.trial, self.epochs, self.multi, self.size = trial, epochs, multi, size

    def on_epoch_end(self, epoch, logs=None):
        import optuna

        value = float((logs or {})["val_accuracy"])
        last = epoch + 1 >= self.epochs
        if self.multi:
            prune = not last and objectives.below_same_size_median(self.trial.study, self.trial, epoch, value,
                                                                    self.size)
            self.trial.set_user_attr("val_curve", [*self.trial.user_attrs.get("val_curve", []), value])
        else:
            self.trial.report(value, step=epoch)
            prune = not last and self.trial.should_prune()
        if prune:
            self.trial.set_user_attr("pruned_at_epoch", epoch + 1)
            raise optuna.TrialPruned()


class TrialBase(NamedTuple):
    """A worker's MobileNetV2 base for one input size, and Python's `random` state before and after it was built."""

    base: keras.Model
    random_before: tuple
    random_after: tuple


@dataclass
class Shared:
    """What every trial of this worker reuses: images, one feature extractor (and its base weights) per
    input size, feature sets by their data, augmentation and feature settings, the models `best/` and
    `default/` may test (`keep_chosen`), and where trials are tracked (TensorBoard
    under `logs`, MLflow runs nested under `mlflow`)."""

    base: Config
    images: ImageSet
    fine_tune_ats: list[int]
    index: scan.FileIndex
    logs: Path
    objectives: objectives.Objectives
    mlflow: tracking.MlflowRun | None = None
    extractors: dict[int, Classifier] = field(default_factory=dict)
    base_weights: dict[int, list[np.ndarray]] = field(default_factory=dict)
    feature_sets: dict[tuple, features.Features] = field(default_factory=dict)
    trial_bases: dict[tuple[int, float], TrialBase] = field(default_factory=dict)  # by (size, alpha)
    # finished trials' models by number, while each is the study's choice or the base recipe (`keep_chosen`):
    # best/ and default/ test them instead of training them again. Helper workers choose nothing: they keep none
    keeps_models: bool = True
    trained: dict[int, Trained] = field(default_factory=dict)
    # compiled trainees with their traced steps: a trial of a size and cut seen before skips ~1 s of tracing
    trainees: Trainees = field(default_factory=Trainees)
    node: str | None = None  # the Ray node this worker runs on (`helpers.on_ray`), recorded with each trial

    def extractor(self, size: int) -> Classifier:
        """The classifier at `size` px with the base's ImageNet weights (Keras has a file per size), built once:
        every feature pass and latency measurement at that size uses it."""
        if size not in self.extractors:
            config = from_flat({**self.base.flat(), "data.image_size": size})
            self.extractors[size] = create_model(config, len(self.images.classes))
            self.base_weights[size] = self.extractors[size].base.get_weights()
        return self.extractors[size]

    def trial_model(self, config: Config) -> Classifier:
        """A new classifier for `config` around this worker's trial base for its size, reset to the ImageNet
        weights: building MobileNetV2 anew took 0.4 s a trial. Its construction drew from Python's `random`
        (each initializer's seed); a reused base leaves the generator where building it would have, so
        the head starts from the same weights and every trial's result is unchanged."""
        size, key, before = config.data.image_size, (config.data.image_size, config.model.alpha), random.getstate()
        self.extractor(size)  # its ImageNet weights
        known = self.trial_bases.get(key)
        if known is not None and known.random_before == before:  # built from this same state before
            random.setstate(known.random_after)
        else:
            known = self.trial_bases[key] = TrialBase(
                build_base(from_flat({**config.flat(), "model.weights": "none"})), before, random.getstate())
        classifier = create_model(config, len(self.images.classes), base=known.base)
        classifier.base.set_weights(self.base_weights[size])
        return classifier

    def keep_chosen(self, study, trial) -> None:
        """Optuna's callback after each trial: keep the models of the choice so far and of the first trial of
        the base recipe, forget the others. At most three trials' weights are held (each twice, after phase 1
        and at the end: ~2 x 9 MB at alpha 1), the newest until this runs."""
        try:
            chosen = objectives.choose(study, self.objectives)
        except UsageError:  # nothing within the latency budget yet
            chosen = None
        base = min((n for n, t in self.trained.items() if t.config == self.base), default=None)
        chosen_number = None if chosen is None else chosen.number
        self.trained = {n: t for n, t in self.trained.items() if n in (base, chosen_number)}

    def features_for(self, config: Config) -> features.Features:
        """`config`'s features on the split its run would train on (`inputs.run_features`: near copies regrouped
        by their features at its input size), so the run of the trial chosen tests it on the split it validated on."""
        # everything run_features reads: a space may search any key (the batch size too: it batches augmentation)
        key = (config.data, config.augment, config.features, config.model.alpha, config.model.weights)
        if key not in self.feature_sets:
            self.feature_sets[key] = run_features(self.extractor(config.data.image_size), self.images, config,
                                                  self.index, self.fine_tune_ats)[0]
        return self.feature_sets[key]


def objective(shared: Shared, space: dict[str, dict[str, Any]]):
    """Optuna's objective: validation accuracy after the trial's recipe (and its latency, multi-objective)."""

    def run_trial(trial) -> float | tuple[float, float]:
        import optuna

        params = suggest(trial, space)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if shared.node is not None:  # a trial running on a node the cluster lost is failed at once by that
            trial.set_user_attr("node", shared.node)
        config = from_flat({**shared.base.flat(), **params})
        wanted = shared.objectives
        if wanted.measures_latency:  # before training, so a pruned trial has it too; cached per size
            _measure_latency(trial, config, len(shared.images.classes), wanted.latency_format)
        feats = shared.features_for(config)
        # without its gc.collect (0.35 s a trial; Python's own collections suffice, `search.heap_frozen`): the
        # same results and peak memory over 12 trials
        keras.backend.clear_session(free_memory=False)
        seed_everything(config.data.seed)
        classifier = shared.trial_model(config)
        epochs = config.phase1.epochs + config.phase2.epochs
        tracked = _trial_tracking(shared, trial.number, config, params)
        report = _ReportToTrial(trial, epochs, wanted.multi, config.data.image_size)
        ends: dict[int, list[np.ndarray]] = {}  # each phase's weights, for `Trained`

        def keep(phase: int, _) -> None:
            ends[phase] = classifier.model.get_weights()

        with tracked.failing(stopped=(optuna.TrialPruned,)):
            history = fit_recipe(Fit(classifier, feats.images, config, feats, callbacks=[report],
                                     after_phase=keep if shared.keeps_models else None,
                                     tracking=tracked, trainees=shared.trainees), RunState())
        if ends:
            shared.trained[trial.number] = Trained(trial.number, config, feats.images, ends[1], ends[2], history,
                                                   tracked.log_dir)
        value = history[-1]["val_accuracy"] if history else 0.0
        if tracked.mlflow is not None:
            tracked.mlflow.log_metrics({"val_accuracy_final": value}, step=epochs)
            tracked.mlflow.end()
            if tracked.mlflow.failed and shared.mlflow is not None:
                shared.mlflow.run_id = None  # the server is gone: said once, not again for every trial
        return (value, trial.user_attrs[objectives.attr(wanted.latency_format)]) if wanted.multi else value

    return run_trial


def measure_sizes(study, shared: Shared, space: dict[str, dict[str, Any]], say) -> None:
    """Every input size the space offers, timed before any trial trains (unless the study has its figures
    from an earlier worker): a quiet machine gives steadier figures than the start of a trial, with the
    last one's data pipeline threads still winding down. A size range (not a list of choices) is timed
    per trial instead."""
    spec = space.get("data.image_size")
    sizes = spec["choices"] if spec and spec["type"] == "categorical" else [shared.base.data.image_size]
    configs = {size: from_flat({**shared.base.flat(), "data.image_size": size}) for size in sizes}
    attrs = study.user_attrs
    missing = [s for s in sizes if any(objectives.study_key(configs[s], f) not in attrs for f in latency.FORMATS)]
    if not missing:
        say(f"latency figures from the study, measured on {objectives.hosts(study)}")
        return
    say(f"timing the exported model at {', '.join(f'{s} px' for s in missing)} ({latency.host()})")
    for size in missing:
        try:
            classifier = shared.extractor(size)  # once, not once per format when it fails
        except Exception:  # noqa: BLE001 - the size's first trial builds it again and says why
            continue
        for fmt in latency.FORMATS:
            try:
                study_latency(study, configs[size], len(shared.images.classes), fmt, classifier)
            except Exception:  # noqa: BLE001 - remembered (`latency`): the trial that needs it says why
                continue


def study_latency(study, config: Config, num_classes: int, fmt: str, classifier: Classifier | None = None
                  ) -> tuple[float, str]:
    """The study's latency for `config`'s input size in `fmt`, and the host it holds for: recorded by the
    first worker that measures it (`latency.latency_ms`, converting `classifier` if given), then used by every
    worker of the study."""
    key = objectives.study_key(config, fmt)
    stored = study.user_attrs.get(key)  # one storage read when the figure is known
    if stored is None:
        ms = latency.latency_ms(config, num_classes, fmt, cache.cache_root(config), classifier)
        stored = study.user_attrs.get(key)  # workers that measured at the same time: the first to finish counts
        if stored is None:
            stored = {"ms": ms, "host": latency.host()}
            study.set_user_attr(key, stored)
    return stored["ms"], stored["host"]


def _measure_latency(trial, config: Config, num_classes: int, counted: str) -> None:
    """Both formats' latency on the trial, and the host they hold for. Only the counted format may fail
    the trial: the other one is shown when it can be had."""
    from mobiletune.errors import ExportError

    for fmt in latency.FORMATS:
        try:
            ms, host = study_latency(trial.study, config, num_classes, fmt)
        except ExportError:
            if fmt == counted:
                raise
            continue
        trial.set_user_attr(objectives.attr(fmt), ms)
        if fmt == counted:
            trial.set_user_attr("latency_host", host)


def _trial_tracking(shared: Shared, number: int, config: Config, params: dict[str, Any]) -> tracking.Tracking:
    """A trial's TensorBoard folder (logs/trial-0007) and, under the sweep's MLflow run, its own nested run."""
    name = f"trial-{number:04d}"
    run = None
    if shared.mlflow is not None and shared.mlflow.active:
        target = tracking.Mlflow(shared.mlflow.uri, parent_run_id=shared.mlflow.run_id)
        run = tracking.MlflowRun.start(target, name, shared.mlflow.say, params=config.flat(),
                                       tags={"mobiletune.trial": str(number),
                                             **{f"mobiletune.searched.{k}": str(v) for k, v in params.items()}})
        if not run.active:
            shared.mlflow.run_id = None  # the server is gone: said once, not once per trial
    return tracking.Tracking(shared.logs / name, run)
