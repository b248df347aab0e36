"""The seed's recipe end to end: `train_and_evaluate(config, data_dir, workdir)`.

Phase 1 trains a new head on the frozen base; phase 2 unfreezes the base from `fine_tune_at`
and trains on at a tenth of the learning rate. Both go through `train_phase()`. The test set is
scored after each phase ("before" and "after fine-tuning") and everything lands in the run folder.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from mobiletune import data, evaluate, features, report, report_html, runfolder
from mobiletune import model as model_lib
from mobiletune.config import Config

HISTORY_COLUMNS = ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"]


class _EpochLog(keras.callbacks.Callback):
    """Times each epoch and shows progress: a bar per epoch, a line when it ends."""

    def __init__(self, phase: int, last_epoch: int, steps: int, console=None):
        super().__init__()
        self.phase, self.last_epoch, self.steps, self.console = phase, last_epoch, steps, console
        self.seconds: dict[int, float] = {}
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
        self.seconds[epoch] = time.perf_counter() - self._start
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.console is not None:
            logs = logs or {}
            self.console.print(
                f"phase {self.phase} epoch {epoch + 1:>2}/{self.last_epoch}  "
                f"loss {logs.get('loss', float('nan')):.4f}  accuracy {logs.get('accuracy', float('nan')):.4f}  "
                f"val_loss {logs.get('val_loss', float('nan')):.4f}  "
                f"val_accuracy {logs.get('val_accuracy', float('nan')):.4f}  {self.seconds[epoch]:.1f} s"
            )


def train_phase(model: keras.Model, train_data, val_data, *, phase: int, epochs: int, initial_epoch: int,
                optimizer: str, lr: float, steps: int | None = None, console=None,
                callbacks: list[keras.callbacks.Callback] | None = None) -> list[dict[str, Any]]:
    """Compile `model` with a fresh optimizer and fit it; one history row per epoch.

    Serves phase 1, phase 2 and the sweep: `model` is whatever trains (the full classifier, or
    the part above a feature cache), `initial_epoch` continues the epoch count.
    """
    loss, metric = model_lib.loss_and_metric(model_lib.is_binary(model))
    model.compile(optimizer=model_lib.make_optimizer(optimizer, lr), loss=loss, metrics=[metric])
    if epochs == 0:
        return []
    log = _EpochLog(phase, initial_epoch + epochs, steps or 0, console)
    history = model.fit(train_data, validation_data=val_data, initial_epoch=initial_epoch,
                        epochs=initial_epoch + epochs, verbose=0, shuffle=False, callbacks=[log, *(callbacks or [])])
    rows = []
    for i, epoch in enumerate(history.epoch):
        rows.append({"epoch": epoch + 1, "phase": phase, **{k: float(history.history[k][i]) for k in
                     ("loss", "accuracy", "val_loss", "val_accuracy")}, "seconds": round(log.seconds[epoch], 3)})
    return rows


@dataclass
class RunResult:
    workdir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


def _seed_everything(seed: int) -> None:
    import tensorflow as tf

    keras.utils.set_random_seed(seed)  # Python, NumPy and TensorFlow
    tf.config.experimental.enable_op_determinism()  # same seed -> same numbers, not just close


def fit_recipe(model: keras.Model, images: data.ImageSet, feats: features.Features | None, config: Config, *,
               console=None, callbacks: list[keras.callbacks.Callback] | None = None,
               after_phase=None) -> list[dict[str, Any]]:
    """Phase 1 then phase 2 on `model`, through `train_phase`; the history of both.

    `feats` None runs the plain recipe on pixels. `after_phase(phase, history)` runs after each
    phase (train evaluates the test set there; the sweep never does).
    """
    p1, p2 = config.phase1, config.phase2
    plan = {1: (p1.epochs, 0, p1.optimizer, p1.lr), 2: (p2.epochs, p1.epochs, p2.optimizer, p1.lr * p2.lr_ratio)}
    history: list[dict[str, Any]] = []
    for phase, (epochs, initial_epoch, optimizer, lr) in plan.items():
        model_lib.set_trainable(model, phase=phase, config=config)
        if phase == 2 and console is not None:
            base = model_lib.base_of(model)
            console.print(f"fine-tuning {sum(layer.trainable for layer in base.layers)} base layers from layer "
                          f"{p2.fine_tune_at} at lr {lr:g}")
        trainee, train_data, val_data = _phase_data(phase, model, images, feats, config)
        history += train_phase(trainee, train_data, val_data, phase=phase, epochs=epochs,
                               initial_epoch=initial_epoch, optimizer=optimizer, lr=lr, steps=len(train_data),
                               console=console, callbacks=callbacks)
        if after_phase is not None:
            after_phase(phase, history)
    return history


def train_and_evaluate(config: Config, data_dir: str | Path, workdir: str | Path, *, overwrite: bool = False,
                       console=None, feature_cuts: list[int] | None = None) -> RunResult:
    """Run the whole recipe on DATA_DIR and leave a complete run folder in `workdir`.

    `feature_cuts`: the boundaries the feature cache entry holds (a sweep's, to reuse its cache).
    """
    started = time.perf_counter()
    runfolder.check_out(workdir, overwrite=overwrite)  # refuse before minutes of decoding
    say = console.print if console is not None else (lambda *a, **k: None)

    images = data.load_images(data_dir, config.data)
    seconds = {"load_images": time.perf_counter() - started}
    out = runfolder.prepare(workdir, overwrite=overwrite)
    runfolder.write_text(out / "config.yaml", config.to_yaml())
    data.write_manifest(images, out / "split.csv")
    data.write_skipped(images, out / "skipped.csv")
    counts = images.counts()
    say(f"images: {counts} in {len(images.classes)} classes {images.classes}; {len(images.skipped)} skipped"
        + (" (see skipped.csv)" if images.skipped else ""))

    _seed_everything(config.data.seed)
    model = model_lib.build_model(config, len(images.classes))
    base = model_lib.base_of(model)
    weights_sha256 = features.weights_digest(base)  # of the weights as loaded, before any training
    say(f"number of layers in the base model: {len(base.layers)}; fine-tuning from layer "
        f"{config.phase2.fine_tune_at} ({base.layers[config.phase2.fine_tune_at].name})")

    feats = None
    clock = time.perf_counter()
    if config.features.cache:
        feats = features.compute_features(model, images, config, fine_tune_ats=feature_cuts)
        say(f"feature cache: {feats.hits} hit(s), {feats.misses} miss(es), "
            f"{time.perf_counter() - clock:.1f} s ({config.features.views} views per training image)")
    seconds["features"] = time.perf_counter() - clock
    clock = time.perf_counter()

    test_ds = data.tf_dataset(images, "test", config.data.batch_size, shuffle=False, seed=config.data.seed)
    test_probs: dict[int, Any] = {}

    def after_phase(phase: int, history: list[dict[str, Any]]) -> None:
        nonlocal clock
        logits, _ = evaluate.predict_logits(model, test_ds)  # the full model on test pixels: the real numbers
        test_probs[phase] = evaluate.probabilities(logits)
        seconds[f"phase{phase}"] = time.perf_counter() - clock
        _write_history(out, history)
        if phase == 1:
            runfolder.save_model(out / "before_fine_tuning.keras", model)  # for `evaluate` on new data
            report.plot_curves(history, out / "before_fine_tuning.png", "Before fine-tuning (phase 1)")
        else:
            report.plot_curves(history, out / "after_fine_tuning.png", "After fine-tuning (phases 1 and 2)",
                               fine_tune_from=config.phase1.epochs + 1)
        clock = time.perf_counter()

    history = fit_recipe(model, images, feats, config, console=console, after_phase=after_phase)
    runfolder.save_model(out / "model.keras", model)
    seconds["total"] = time.perf_counter() - started
    test = images.indices("test")
    evaluate.write_predictions(out / "test_predictions.csv", [images.paths[i] for i in test], images.labels[test],
                               images.classes, test_probs[1], test_probs[2])
    metrics = {
        **evaluate.compare_stages(test_probs[1], test_probs[2], images.labels[test], images.classes),
        "classes": images.classes,
        "n_images": counts,
        "n_skipped": len(images.skipped),
        "base_layers": len(base.layers),
        "fine_tune_at": config.phase2.fine_tune_at,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "data_dir": str(Path(data_dir).resolve()),
        "environment": environment(weights_sha256),
    }
    runfolder.write_json(out / "metrics.json", metrics)
    report.write_summary(out / "summary.md", config, metrics)
    report_html.build_report(out)
    if console is not None:
        report.print_results(console, metrics)
        say(f"run folder: {out}")
    return RunResult(out, metrics, history)


def environment(base_weights_sha256: str) -> dict[str, str]:
    """What produced a run: versions, the base weights' digest, the machine."""
    import platform
    from importlib.metadata import version

    import tensorflow as tf

    from mobiletune import __version__

    return {
        "mobiletune": __version__, "python": platform.python_version(), "tensorflow": tf.__version__,
        "keras": keras.__version__, "numpy": version("numpy"), "scikit-learn": version("scikit-learn"),
        "platform": platform.platform(), "cpus": str(os.cpu_count()),
        "base_weights_sha256": base_weights_sha256,
    }


def _phase_data(phase: int, model: keras.Model, images: data.ImageSet, feats: features.Features | None,
                config: Config):
    """What trains in `phase` and on what: the full model on pixels, or its upper part on cached features."""
    batch, seed = config.data.batch_size, config.data.seed
    if feats is None:
        return (model, data.tf_dataset(images, "train", batch, shuffle=True, seed=seed),
                data.tf_dataset(images, "validation", batch, shuffle=False, seed=seed))
    if phase == 1:
        trainee, train_arrays, val_arrays = features.head_model(model), feats.pooled("train"), feats.pooled(
            "validation")
    else:
        cut = config.phase2.fine_tune_at
        trainee = features.top_model(model, cut)
        train_arrays, val_arrays = feats.boundary("train", cut), feats.boundary("validation", cut)
    labels = {s: images.labels[images.indices(s)] for s in ("train", "validation")}
    return (trainee,
            features.FeatureBatches(train_arrays, labels["train"], batch, shuffle=True, seed=seed),
            features.FeatureBatches(val_arrays, labels["validation"], batch, shuffle=False, seed=seed))


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    runfolder.write_csv(out / "history.csv", HISTORY_COLUMNS, [[r[c] for c in HISTORY_COLUMNS] for r in history])
