"""The seed's recipe end to end: `train_and_evaluate(config, data_dir, workdir)`.

Phase 1 trains a new head on the frozen base; phase 2 unfreezes the base from `fine_tune_at`
and trains on at a tenth of the learning rate. Both go through `train_phase()`. The test set is
scored after each phase ("before" and "after fine-tuning") and everything lands in the run folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from mobiletune import data, evaluate, features, report, runfolder
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


def train_and_evaluate(config: Config, data_dir: str | Path, workdir: str | Path, *, overwrite: bool = False,
                       console=None) -> RunResult:
    """Run the whole recipe on DATA_DIR and leave a complete run folder in `workdir`."""
    started = time.perf_counter()
    runfolder.check_out(workdir, overwrite=overwrite)  # refuse before minutes of decoding
    say = console.print if console is not None else (lambda *a, **k: None)

    images = data.load_images(data_dir, config.data)
    loaded = time.perf_counter()
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
    say(f"number of layers in the base model: {len(base.layers)}; fine-tuning from layer "
        f"{config.phase2.fine_tune_at} ({base.layers[config.phase2.fine_tune_at].name})")

    batch, seed = config.data.batch_size, config.data.seed
    test_ds = data.tf_dataset(images, "test", batch, shuffle=False, seed=seed)
    feats = None
    t_features = time.perf_counter()
    if config.features.cache:
        feats = features.compute_features(model, images, config)
        say(f"feature cache: {feats.hits} hit(s), {feats.misses} miss(es), "
            f"{time.perf_counter() - t_features:.1f} s ({config.features.views} views per training image)")

    p1, p2 = config.phase1, config.phase2
    t0 = time.perf_counter()
    model_lib.set_trainable(model, phase=1, config=config)
    trainee, train_data, val_data = _phase_data(1, model, images, feats, config)
    history = train_phase(trainee, train_data, val_data, phase=1, epochs=p1.epochs, initial_epoch=0,
                          optimizer=p1.optimizer, lr=p1.lr, steps=len(train_data), console=console)
    before = evaluate.evaluate(model, test_ds)  # the full model on test pixels: the real numbers
    t1 = time.perf_counter()
    _write_history(out, history)
    report.plot_curves(history, out / "before_fine_tuning.png", "Before fine-tuning (phase 1)")

    model_lib.set_trainable(model, phase=2, config=config)
    trainable = sum(layer.trainable for layer in base.layers)
    say(f"fine-tuning {trainable} base layers at lr {p1.lr * p2.lr_ratio:g}")
    trainee, train_data, val_data = _phase_data(2, model, images, feats, config)
    history += train_phase(trainee, train_data, val_data, phase=2, epochs=p2.epochs, initial_epoch=p1.epochs,
                           optimizer=p2.optimizer, lr=p1.lr * p2.lr_ratio, steps=len(train_data), console=console)
    after = evaluate.evaluate(model, test_ds)
    t2 = time.perf_counter()
    _write_history(out, history)
    report.plot_curves(history, out / "after_fine_tuning.png", "After fine-tuning (phases 1 and 2)",
                       fine_tune_from=p1.epochs + 1)

    runfolder.save_model(out / "model.keras", model)
    metrics = {
        "before_fine_tuning": {"test": before},
        "after_fine_tuning": {"test": after},
        "classes": images.classes,
        "n_images": counts,
        "n_skipped": len(images.skipped),
        "base_layers": len(base.layers),
        "fine_tune_at": p2.fine_tune_at,
        "seconds": {"load_images": round(loaded - started, 2), "features": round(t0 - t_features, 2),
                    "phase1": round(t1 - t0, 2), "phase2": round(t2 - t1, 2),
                    "total": round(time.perf_counter() - started, 2)},
    }
    runfolder.write_json(out / "metrics.json", metrics)
    report.write_summary(out / "summary.md", config, metrics)
    if console is not None:
        report.print_results(console, metrics)
        say(f"run folder: {out}")
    return RunResult(out, metrics, history)


def _phase_data(phase: int, model: keras.Model, images: data.ImageSet, feats: features.Features | None,
                config: Config):
    """What trains in `phase` and on what: the full model on pixels, or its upper part on cached features."""
    batch, seed = config.data.batch_size, config.data.seed
    if feats is None:
        return (model, data.tf_dataset(images, "train", batch, shuffle=True, seed=seed),
                data.tf_dataset(images, "validation", batch, shuffle=False, seed=seed))
    if phase == 1:
        trainee, train_arrays, val_arrays = features.head_model(model), feats.train[:1], feats.validation[:1]
    else:
        cut = config.phase2.fine_tune_at
        trainee, train_arrays, val_arrays = features.top_model(model, cut), feats.train[1:], feats.validation[1:]
    labels = {s: images.labels[images.indices(s)] for s in ("train", "validation")}
    return (trainee,
            features.FeatureBatches(train_arrays, labels["train"], batch, shuffle=True, seed=seed),
            features.FeatureBatches(val_arrays, labels["validation"], batch, shuffle=False, seed=seed))


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    runfolder.write_csv(out / "history.csv", HISTORY_COLUMNS, [[r[c] for c in HISTORY_COLUMNS] for r in history])
