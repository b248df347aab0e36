"""Training: `train_phase()` compiles and fits whatever trains, and `fit_recipe()` runs phase 1 then phase 2
through it, on cached features or on pixels. The run around it (data, evaluation, the run folder) is
`recipe.train_and_evaluate`; a sweep's trials call `fit_recipe` directly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from mobiletune import checkpoint, data, features, pixels
from mobiletune import model as model_lib
from mobiletune import tracking as tracking_lib
from mobiletune import trainees as trainees_lib
from mobiletune.config import Config

__all__ = ["class_weights", "fit_recipe", "seed_everything", "steps_per_epoch", "steps_per_pass", "train_phase"]


class _EpochLog(keras.callbacks.Callback):
    """Times each epoch, appends its history row, and shows progress: a bar, then a line."""

    def __init__(self, phase: int, last_epoch: int, steps: int, history: list[dict[str, Any]], console=None,
                 interrupt: checkpoint.Interrupt | None = None):
        super().__init__()
        self.phase, self.last_epoch, self.steps, self.console = phase, last_epoch, steps, console
        self.history, self.interrupt = history, interrupt
        self._progress = self._task = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        if self.console is not None and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), console=self.console, transient=True)
            self._progress.start()
            self._label = f"phase {self.phase} epoch {epoch + 1}/{self.last_epoch}"
            self._task = self._progress.add_task(self._label, total=self.steps or None)

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
        row = {"epoch": epoch + 1, "phase": self.phase,
               **{k: float(logs.get(k, float("nan"))) for k in ("loss", "accuracy", "val_loss", "val_accuracy")},
               "seconds": round(time.perf_counter() - self._start, 3)}
        self.history.append(row)
        if self.console is not None:
            self.console.print(
                f"phase {self.phase} epoch {epoch + 1:>2}/{self.last_epoch}  loss {row['loss']:.4f}  "
                f"accuracy {row['accuracy']:.4f}  val_loss {row['val_loss']:.4f}  "
                f"val_accuracy {row['val_accuracy']:.4f}  {row['seconds']:.1f} s")


def train_phase(model: keras.Model, train_data, val_data, *, phase: int, epochs: int, initial_epoch: int,
                optimizer: str, lr: float, steps: int, history: list[dict[str, Any]] | None = None,
                console=None, callbacks: list[keras.callbacks.Callback] | None = None,
                optimizer_state: list | None = None, interrupt: checkpoint.Interrupt | None = None,
                class_weight: dict[int, float] | None = None, compiled: bool = False) -> list[dict[str, Any]]:
    """Compile `model` with a fresh optimizer (unless `compiled`) and fit it; one history row per epoch,
    appended to `history`.

    Serves phase 1, phase 2 and the sweep: `model` is whatever trains (the full classifier, or
    the part above a feature cache), `initial_epoch` continues the epoch count, and
    `optimizer_state` resumes an optimizer saved mid-phase. `compiled`: `model` is a trainee compiled
    before, whose fresh `optimizer` at `lr` is in place (`trainees.Trainee.load`): it is not compiled
    again, so its traced steps are kept.
    """
    if not compiled:
        model_lib.compile_fresh(model, optimizer, lr)
    if optimizer_state is not None:
        checkpoint.restore_optimizer(model, optimizer_state)
    history = [] if history is None else history
    already = len(history)
    if epochs > 0:
        log = _EpochLog(phase, initial_epoch + epochs, steps, history, console, interrupt)
        model.fit(train_data, validation_data=val_data, initial_epoch=initial_epoch, epochs=initial_epoch + epochs,
                  steps_per_epoch=steps, verbose=0, shuffle=False, callbacks=[log, *(callbacks or [])],
                  class_weight=class_weight)
    if interrupt is not None and interrupt.requested:
        raise checkpoint.Interrupted("interrupted")
    return history[already:]


def seed_everything(seed: int) -> None:
    import tensorflow as tf

    keras.utils.set_random_seed(seed)  # Python, NumPy and TensorFlow
    tf.config.experimental.enable_op_determinism()  # same seed -> same numbers, not just close


def fit_recipe(model: keras.Model, images: data.ImageSet, feats: features.Features | None, config: Config, *,
               console=None, callbacks: list[keras.callbacks.Callback] | None = None, after_phase=None,
               resume: checkpoint.Checkpoint | None = None, save_to: Path | None = None,
               interrupt: checkpoint.Interrupt | None = None, test_probs: dict[str, np.ndarray] | None = None,
               tracking: tracking_lib.Tracking | None = None,
               trainees: trainees_lib.Trainees | None = None) -> list[dict[str, Any]]:
    """Phase 1 then phase 2 on `model`, through `train_phase`; the history of both.

    `feats` None runs the plain recipe on pixels. `after_phase(phase, history)` runs after each
    phase (train evaluates the test set there; the sweep never does). With `save_to`, a
    checkpoint is written after every epoch; `resume` continues from one (weights already
    restored by the caller). `test_probs` (what `after_phase` evaluated) travels in the checkpoint.
    `tracking` gets every epoch (TensorBoard, MLflow). `trainees`: a sweep worker's, reused across its
    trials (on cached features; a new trainee for each phase otherwise).
    """
    p1, p2 = config.phase1, config.phase2
    history: list[dict[str, Any]] = list(resume.history) if resume else []
    done = resume.epoch if resume else 0
    weights = class_weights(images, config)
    trainees = trainees or trainees_lib.Trainees()  # on cached features: one trainee per phase
    for phase, (epochs, first_epoch) in {1: (p1.epochs, 0), 2: (p2.epochs, p1.epochs)}.items():
        if resume is not None and done >= first_epoch + epochs:
            continue  # trained before the checkpoint; the caller sees to its evaluation
        start = max(first_epoch, done)
        model_lib.set_trainable(model, phase=phase, config=config)
        if phase == 2 and console is not None:
            base = model_lib.base_of(model)
            console.print(f"fine-tuning {sum(layer.trainable for layer in base.layers)} base layers from layer "
                          f"{p2.fine_tune_at} at lr {config.phase_lr(2):g}")
        trainee = trainees.get(phase, model, config) if feats is not None else None
        saving = [checkpoint.EpochCheckpoint(save_to, model, history, test_probs if test_probs is not None else {},
                                             interrupt or checkpoint.Interrupt())] if save_to else []
        train_phase(trainee.model if trainee else model, *_phase_data(phase, images, feats, config, start,
                                                                      first_epoch + epochs),
                    phase=phase, epochs=first_epoch + epochs - start, initial_epoch=start,
                    optimizer=config.phase_optimizer(phase), lr=config.phase_lr(phase),
                    steps=steps_per_epoch(images, config, phase), history=history, console=console,
                    # the classifier has each epoch's weights before anything saves, tracks or tests it; tracking
                    # before `callbacks`: a sweep's pruning stops the fit, and the epoch is logged first
                    callbacks=[*([trainee.syncing()] if trainee else []), *saving,
                               *(tracking.callbacks(phase) if tracking else []), *(callbacks or [])],
                    interrupt=interrupt, class_weight=weights, compiled=trainee is not None,
                    optimizer_state=resume.optimizer_variables if resume and first_epoch < start == done else None)
        if after_phase is not None:
            after_phase(phase, history)
    return history


def class_weights(images: data.ImageSet, config: Config) -> dict[int, float] | None:
    """With data.class_weight "auto": scikit-learn's 'balanced' weights from the training split."""
    if config.data.class_weight == "none":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    y = images.labels[images.indices("train")]
    classes = np.arange(len(images.classes))
    return {int(c): float(w) for c, w in zip(classes, compute_class_weight("balanced", classes=classes, y=y),
                                             strict=True)}


def steps_per_pass(images: data.ImageSet, config: Config) -> int:
    """Optimizer steps in one pass over the training images."""
    return -(-len(images.indices("train")) // config.data.batch_size)


def steps_per_epoch(images: data.ImageSet, config: Config, phase: int) -> int:
    """Optimizer steps in one epoch of `phase`: `Config.passes_per_epoch` passes."""
    steps = steps_per_pass(images, config)
    return config.passes_per_epoch(phase, steps) * steps


def _first_pass(epoch: int, images: data.ImageSet, config: Config) -> int:
    """The pass over the training images that `epoch` (counted from 0 over both phases) starts with: each of
    phase 1's epochs makes `Config.passes_per_epoch` passes, each of phase 2's one. Each pass has its own
    order and views, drawn from (seed, pass)."""
    per_epoch, phase1 = config.passes_per_epoch(1, steps_per_pass(images, config)), config.phase1.epochs
    return epoch * per_epoch if epoch <= phase1 else phase1 * per_epoch + epoch - phase1


def _phase_data(phase: int, images: data.ImageSet, feats: features.Features | None, config: Config,
                initial_epoch: int, end_epoch: int):
    """Training and validation batches for `phase`: pixels for the full model, or the cached features the
    part above them trains on (pooled in phase 1, the boundary activations in phase 2).

    Either way each pass's order depends on (seed, pass) alone (`_first_pass`), so resuming at `initial_epoch`
    is exact.
    """
    batch, seed = config.data.batch_size, config.data.seed
    initial_pass, end_pass = _first_pass(initial_epoch, images, config), _first_pass(end_epoch, images, config)
    if feats is None:
        size = config.data.image_size
        return (pixels.pixel_dataset(images, "train", size, batch, shuffle=True, seed=seed,
                                     initial_epoch=initial_pass, epochs=end_pass),
                pixels.pixel_dataset(images, "validation", size, batch, shuffle=False, seed=seed))
    outputs = [0] if phase == 1 else feats.boundaries[config.phase2.fine_tune_at]
    labels = {s: images.labels[images.indices(s)] for s in ("train", "validation")}
    return (features.feature_dataset(feats.readers["train"], outputs, labels["train"], feats.views["train"], batch,
                                     shuffle=True, seed=seed, initial_epoch=initial_pass, epochs=end_pass),
            features.feature_dataset(feats.readers["validation"], outputs, labels["validation"], 1, batch,
                                     shuffle=False, seed=seed))
