"""The two phases, as the seed describes them and fastai's `fine_tune` reads: freeze the base, fit the new head;
unfreeze the base from `fine_tune_at`, fit again at a tenth of the rate. `fit_recipe(fit, state)` runs them on
cached features or on pixels; `train_phase` compiles and fits whatever trains in one phase. The run around
them (data, evaluation, the run folder) is `training.run`; a sweep's trials call `fit_recipe` directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from mobiletune.config import Config
from mobiletune.data.images import ImageSet
from mobiletune.errors import Interrupted
from mobiletune.features.compute import Features
from mobiletune.model import network as model_lib
from mobiletune.model.network import Classifier
from mobiletune.tracking.tracker import Tracking
from mobiletune.training import checkpoint, schedule
from mobiletune.training.state import RunState
from mobiletune.training.trainees import Trainees

__all__ = ["Fit", "Phase", "fit_recipe", "seed_everything", "train_phase"]


@dataclass(frozen=True)
class Phase:
    """One phase's fit: epochs `start` to `end` (counted from 0 over both phases; the phase's own epochs begin
    at `first`), its optimizer and rate, the optimizer steps of each epoch, and the class weights."""

    number: int
    first: int
    start: int
    end: int
    optimizer: str
    lr: float
    steps: int
    class_weight: dict[int, float] | None = None

    @classmethod
    def of(cls, number: int, images: ImageSet, config: Config, state: RunState) -> Phase:
        """Phase `number` of `config` on `images`, from where `state` stands."""
        first = 0 if number == 1 else config.phase1.epochs
        end = config.phase1.epochs if number == 1 else config.phase1.epochs + config.phase2.epochs
        return cls(number, first, max(first, state.epoch), end, config.phase_optimizer(number), config.phase_lr(number),
                   schedule.steps_per_epoch(images, config, number), schedule.class_weights(images, config))


@dataclass
class Fit:
    """What `fit_recipe` trains, on what, and what it reports to."""

    classifier: Classifier
    images: ImageSet  # the split it trains and validates on
    config: Config
    feats: Features | None = None  # None: the plain recipe on pixels
    console: Any = None  # a rich Console for the epoch lines, or None
    callbacks: list[keras.callbacks.Callback] = field(default_factory=list)  # last each epoch (a sweep's pruning)
    after_phase: Callable[[int, RunState], None] | None = None  # a run tests the phase's model here
    save_to: Path | None = None  # a run folder: a checkpoint after every epoch
    interrupt: checkpoint.Interrupt = field(default_factory=checkpoint.Interrupt)
    tracking: Tracking | None = None  # TensorBoard and MLflow get every epoch
    trainees: Trainees = field(default_factory=Trainees)  # a sweep worker's are reused across its trials


def fit_recipe(fit: Fit, state: RunState) -> list[dict[str, Any]]:
    """Phase 1 then phase 2 from where `state` stands (a resumed run's weights already restored); returns the
    history of both. A phase the state has finished is left out (its test, `after_phase`, is the caller's)."""
    config, classifier = fit.config, fit.classifier
    resumed_at = state.epoch  # 0 for a new run, which fits both phases whatever their epochs
    if not resumed_at or resumed_at < config.phase1.epochs:  # the new head on the frozen base
        classifier.freeze_base()
        _fit_phase(fit, state, Phase.of(1, fit.images, config, state))
    if not resumed_at or resumed_at < config.phase1.epochs + config.phase2.epochs:  # unfreeze from fine_tune_at
        classifier.unfreeze_from(config.phase2.fine_tune_at, config.model.bn_mode)
        if fit.console is not None and config.phase2.epochs:  # with none, phase 2 only tests the phase-1 model
            at, layers = config.phase2.fine_tune_at, classifier.base.layers
            kept = sum(not layer.trainable for layer in layers[at:])  # BatchNorm in inference mode
            frozen = f" ({kept} BatchNorm layers among them frozen)" if kept else ""
            fit.console.print(f"fine-tuning the {len(layers) - at} base layers from layer {at} at lr "
                              f"{config.phase_lr(2):g}{frozen}")
        _fit_phase(fit, state, Phase.of(2, fit.images, config, state))
    return state.history


def _fit_phase(fit: Fit, state: RunState, phase: Phase) -> None:
    """One phase: on cached features, the trainee above the cut (written back to the classifier every epoch);
    on pixels, the classifier itself. Then `after_phase`."""
    trainee = fit.trainees.get(phase.number, fit.classifier, fit.config) if fit.feats is not None else None
    if phase.start > phase.first:
        optimizer = state.optimizer  # resumed mid-phase: the saved optimizer goes on
    else:
        optimizer, state.optimizer = None, None
    # the classifier has each epoch's weights before anything saves, tracks or tests it; tracking before
    # `callbacks`: a sweep's pruning stops the fit, and the epoch is logged first
    callbacks = [*([trainee.syncing()] if trainee else []),
                 *([checkpoint.EpochCheckpoint(fit.save_to, fit.classifier.model, state, fit.interrupt)]
                   if fit.save_to else []),
                 *(fit.tracking.callbacks(phase.number) if fit.tracking else []), *fit.callbacks]
    data = schedule.phase_data(phase.number, fit.images, fit.feats, fit.config, phase.start, phase.end)
    train_phase(trainee.model if trainee else fit.classifier.model, *data, phase, state, console=fit.console,
                callbacks=callbacks, interrupt=fit.interrupt, compiled=trainee is not None, optimizer=optimizer)
    if fit.after_phase is not None:
        fit.after_phase(phase.number, state)


def train_phase(model: keras.Model, train_data, val_data, phase: Phase, state: RunState, *, console=None,
                callbacks: list[keras.callbacks.Callback] = (), interrupt: checkpoint.Interrupt | None = None,
                compiled: bool = False, optimizer: dict | None = None) -> list[dict[str, Any]]:
    """Compile `model` with a fresh optimizer (unless `compiled`) and fit epochs `phase.start` to `phase.end`;
    one history row per epoch, appended to `state.history` and returned.

    `model` is whatever trains: the full classifier, or the part above a feature cache. `compiled`: a trainee
    compiled before, whose fresh optimizer at the phase's rate is in place (`trainees.Trainee.load`), so its
    traced steps are kept. `optimizer`: saved optimizer variables by name, to resume a phase mid-way.
    """
    if not compiled:
        model_lib.compile_fresh(model, phase.optimizer, phase.lr)
    if optimizer is not None:
        model.optimizer.build(model.trainable_variables)
        checkpoint.restore(checkpoint.optimizer_paths(model.optimizer), optimizer, "optimizer")
    already = len(state.history)
    if phase.end > phase.start:
        log = _EpochLog(phase, state, console, interrupt)
        model.fit(train_data, validation_data=val_data, initial_epoch=phase.start, epochs=phase.end,
                  steps_per_epoch=phase.steps, verbose=0, shuffle=False, callbacks=[log, *callbacks],
                  class_weight=phase.class_weight)
    if interrupt is not None and interrupt.requested:
        raise Interrupted("interrupted")
    return state.history[already:]


def seed_everything(seed: int) -> None:
    import tensorflow as tf

    keras.utils.set_random_seed(seed)  # Python, NumPy and TensorFlow
    tf.config.experimental.enable_op_determinism()  # same seed -> same numbers, not just close


class _EpochLog(keras.callbacks.Callback):
    """Times each epoch, appends its history row to the state, and shows progress: a bar, then a line."""

    def __init__(self, phase: Phase, state: RunState, console=None, interrupt: checkpoint.Interrupt | None = None):
        super().__init__()
        self.phase, self.state, self.console, self.interrupt = phase, state, console, interrupt
        self._progress = self._task = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        if self.console is not None and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), console=self.console, transient=True)
            self._progress.start()
            self._label = f"phase {self.phase.number} epoch {epoch + 1}/{self.phase.end}"
            self._task = self._progress.add_task(self._label, total=self.phase.steps or None)

    def on_train_batch_end(self, batch, logs=None):
        if self._progress is not None:
            acc = float((logs or {}).get("accuracy", 0.0))
            self._progress.update(self._task, advance=1, description=f"{self._label} accuracy {acc:.3f}")

    def on_epoch_end(self, epoch, logs=None):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.interrupt is not None and self.interrupt.requested:
            return  # a partial epoch is no history
        logs = logs or {}
        row = {"epoch": epoch + 1, "phase": self.phase.number,
               **{k: float(logs.get(k, float("nan"))) for k in ("loss", "accuracy", "val_loss", "val_accuracy")},
               "seconds": round(time.perf_counter() - self._start, 3)}
        self.state.history.append(row)
        if self.console is not None:
            self.console.print(
                f"phase {self.phase.number} epoch {epoch + 1:>2}/{self.phase.end}  loss {row['loss']:.4f}  "
                f"accuracy {row['accuracy']:.4f}  val_loss {row['val_loss']:.4f}  "
                f"val_accuracy {row['val_accuracy']:.4f}  {row['seconds']:.1f} s")
