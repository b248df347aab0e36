"""The seed's recipe end to end: `train_and_evaluate(config, data_dir, workdir)`.

The images as a run sees them (`scan_images`, `run_features`: exclusions, failed decodes, near
copies kept in one split), both phases (`loop.fit_recipe`), the test set scored after each
("before" and "after fine-tuning"), and everything in the run folder; `resume_run` continues one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from mobiletune import runfolder
from mobiletune.config import Config
from mobiletune.data import manifest, pixels
from mobiletune.data.images import ImageSet
from mobiletune.data.manifest import read_manifest
from mobiletune.errors import DataError, Interrupted, UsageError
from mobiletune.evaluation import statistics as evaluate
from mobiletune.evaluation import unknown
from mobiletune.features import cache
from mobiletune.features.compute import Features
from mobiletune.model.cut import weights_digest
from mobiletune.model.network import Classifier, create_model
from mobiletune.report import html as report_html
from mobiletune.report import model_card
from mobiletune.report import summary as report
from mobiletune.tracking import tracker as tracking_lib
from mobiletune.training import checkpoint, inputs, parent, schedule
from mobiletune.training.loop import Fit, fit_recipe, seed_everything
from mobiletune.training.state import HISTORY_COLUMNS, RunState

# The seed's recipe gives the head ~630 steps (2000 images, batch 32, 10 epochs). On 160 images
# (flowers_mini) it gets 50 and ends at 25% test accuracy, 55% with lr 1e-3: below this, say so.
FEW_HEAD_STEPS = 200


@dataclass
class RunResult:
    workdir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


@dataclass(frozen=True)
class Trained:
    """A sweep trial's finished model: its weights after phase 1 and at the end, its history and TensorBoard
    folder. `fit_recipe` reaches these same weights again for the same config, split and seed (op
    determinism), so a run given them tests and saves them instead of training again."""

    trial: int
    config: Config
    images: ImageSet  # the split it trained and validated on
    after_phase1: list[np.ndarray]
    final: list[np.ndarray]
    history: list[dict[str, Any]]
    logs: Path

    def fits(self, config: Config, images: ImageSet) -> bool:
        """Whether training `config` on `images` would give these weights: the same config, on cached features
        as trials train (features.cache), and the same images, classes, labels and split."""
        mine, theirs = self.images, images
        return (self.config == config and config.features.cache and mine.paths == theirs.paths
                and mine.classes == theirs.classes and mine.digest() == theirs.digest())


def train_and_evaluate(config: Config, data_dir: str | Path, workdir: str | Path, *, overwrite: bool = False,
                       console=None, fine_tune_ats: list[int] | None = None,
                       mlflow: tracking_lib.Mlflow | None = None, trained: Trained | None = None) -> RunResult:
    """Run the whole recipe on DATA_DIR and leave a complete run folder in `workdir`.

    `fine_tune_ats`: the fine_tune_at values whose boundary activations the feature pass provides
    (a sweep's, to reuse its cache). `mlflow`: also log the run there (TensorBoard files are always written).
    `trained`: a sweep trial of this config; its weights are used instead of training again when the run's
    split is the trial's.
    """
    runfolder.check_out(workdir, overwrite=overwrite)  # refuse before minutes of decoding
    runfolder.check_apart(workdir, data_dir)
    if config.data.parent and Path(config.data.parent).resolve() == Path(workdir).resolve():
        raise UsageError(f"--out {workdir}: the run --from retrains; give the new run a folder of its own")
    return _run(config, data_dir, Path(workdir), resuming=False, overwrite=overwrite, console=console,
                fine_tune_ats=fine_tune_ats, mlflow=mlflow, trained=trained)


def resume_run(run: str | Path, console=None, mlflow: tracking_lib.Mlflow | None = None) -> RunResult:
    """Continue an interrupted or killed run from its folder alone (its own config and data folder)."""
    from mobiletune.config import load_config

    run = Path(run)
    info = runfolder.read_resumable(run)
    return _run(load_config(run / runfolder.CONFIG), info["data_dir"], run, resuming=True, console=console,
                mlflow=mlflow)


class _PhaseEnd:
    """What follows each phase: the full model on the test pixels (the real numbers), the history and curves,
    and after phase 1 the model before fine-tuning. The test predictions go into the run state, which the
    checkpoints carry, so a resumed run does not evaluate a finished phase again."""

    def __init__(self, classifier: Classifier, images: ImageSet, config: Config, out: Path,
                 seconds: dict[str, float]):
        self.classifier, self.images, self.config, self.out = classifier, images, config, out
        self.seconds, self.clock = seconds, time.perf_counter()

    def __call__(self, phase: int, state: RunState) -> None:
        config, out, history = self.config, self.out, state.phase_history(phase)
        state.test_probs[phase] = self._test_probabilities(phase == 1 and bool(config.data.parent))
        self.seconds[f"phase{phase}"] = time.perf_counter() - self.clock
        runfolder.write_csv(out / runfolder.HISTORY, HISTORY_COLUMNS,
                            [[row[c] for c in HISTORY_COLUMNS] for row in history])
        if phase == 1:
            runfolder.save_model(out / runfolder.MODEL_BEFORE, self.classifier.model)  # for `evaluate` on new data
            report.plot_curves(history, out / runfolder.CURVES_BEFORE, "Before fine-tuning (phase 1)")
        else:
            report.plot_curves(history, out / runfolder.CURVES_AFTER, "After fine-tuning (phases 1 and 2)",
                               fine_tune_from=config.phase1.epochs + 1)
        self.clock = time.perf_counter()

    def _test_probabilities(self, from_parent: bool) -> np.ndarray:
        """The classifier's on the test pixels; with `from_parent`, where the parent run tested the same content,
        its own test predictions (`parent.known_probabilities`), and the rest from pixels."""
        images, config = self.images, self.config
        test = images.indices("test")
        probs = np.full((len(test), len(images.classes)), np.nan)
        if from_parent:
            probs = parent.known_probabilities(config, [images.hashes[i] for i in test], images.classes)
        missing = np.flatnonzero(np.isnan(probs).any(axis=1))
        if len(missing):
            batches = pixels.eval_batches(images, config.data.image_size, config.data.batch_size, "test", missing)
            probs[missing] = evaluate.probabilities(evaluate.predict_logits(self.classifier.model, batches)[0])
        return probs


@dataclass
class _Inputs:
    """What a run trains on, found before training starts."""

    images: ImageSet
    classifier: Classifier
    feats: Features | None
    audited: dict[str, Any] | None  # the audit's findings (`inputs.audit_run`)
    weights_sha256: str  # of the base weights as loaded, before any training
    seconds: dict[str, float]
    parent: dict[str, Any] | None = None  # the run whose weights this one started from (`--from`)


def _run(config: Config, data_dir: str | Path, out: Path, *, resuming: bool, overwrite: bool = False, console=None,
         fine_tune_ats: list[int] | None = None, mlflow: tracking_lib.Mlflow | None = None,
         trained: Trained | None = None) -> RunResult:
    """train_and_evaluate and resume_run: data, model and features; both phases; the run folder."""
    started = time.perf_counter()
    say = console.print if console is not None else (lambda *a, **k: None)
    run, out = _prepare(config, data_dir, out, resuming, overwrite, console, fine_tune_ats)
    saved = checkpoint.load(out) if resuming else None
    tracking = tracking_lib.Tracking.for_run(out, mlflow, config.flat(), {
        "mobiletune.data_sha256": run.images.digest(), "mobiletune.base_weights_sha256": run.weights_sha256,
        "mobiletune.run_folder": str(out.resolve())}, say, resuming)
    with tracking.failing():
        phase_end = _PhaseEnd(run.classifier, run.images, config, out, run.seconds)
        state = _restored(saved, run.classifier, config, phase_end, say)
        from_trial = trained.trial if trained is not None and trained.fits(config, run.images) else None
        if from_trial is not None:
            _from_trial(run.classifier, config, trained, state, phase_end, tracking, say)
        else:
            _fit_interruptibly(Fit(run.classifier, run.images, config, run.feats, console, after_phase=phase_end,
                                   save_to=out, tracking=tracking), state)
        if 2 not in state.test_probs:  # killed after the last epoch's checkpoint, before its evaluation
            phase_end(2, state)
        metrics = _finish(run, state, config, out, started, data_dir=str(Path(data_dir).resolve()),
                          resumed=saved is not None, weights_from_trial=from_trial)
        tracking.finish(metrics, (config.phase1.epochs, config.phase2.epochs), out)
    if console is not None:
        report.print_results(console, metrics)
        say(f"run folder: {out}" + (f"; MLflow: {tracking.link}" if tracking.link else ""))
    return RunResult(out, metrics, state.history)


def _prepare(config: Config, data_dir: str | Path, out: Path, resuming: bool, overwrite: bool, console,
             fine_tune_ats: list[int] | None) -> tuple[_Inputs, Path]:
    """The images, the classifier and the features; the run folder started (or checked, when resuming)."""
    started = time.perf_counter()
    if config.features.cache:
        runfolder.make_folder(cache.cache_root(config), "features.cache_dir")  # before minutes of decoding
    say = console.print if console is not None else (lambda *a, **k: None)
    index = inputs.file_index(config)
    images = inputs.scan_images(data_dir, config, index, console)
    seconds = {"load_images": time.perf_counter() - started}
    seed_everything(config.data.seed)
    classifier = create_model(config, len(images.classes))
    base = classifier.base
    weights_sha256 = weights_digest(base)
    if config.data.parent:  # before the feature pass: minutes on a large folder
        parent.check_data(config, images.classes, weights_sha256)
    say(f"number of layers in the base model: {len(base.layers)}; fine-tuning from layer "
        f"{config.phase2.fine_tune_at} ({base.layers[config.phase2.fine_tune_at].name})")
    clock = time.perf_counter()
    feats, images, near = inputs.features_or_checked_images(classifier, images, config, index, console,
                                                           fine_tune_ats, seconds)
    seconds["features"] = time.perf_counter() - clock  # the two steps timed inside it included
    if resuming:
        _check_same_data(out, images)
    else:
        out = _start_folder(out, overwrite, config, data_dir, images)
    say(f"images: {images.counts()} in {len(images.classes)} classes {images.classes}; {len(images.skipped)} "
        "skipped" + (" (see skipped.csv)" if images.skipped else ""))
    if note := images.balance_note(config.data.class_weight == "auto"):
        say(f"note: {note}")
    clock = time.perf_counter()
    audited = inputs.audit_run(images, feats, near, config, classifier, out, say, index)
    seconds["audit"] = time.perf_counter() - clock
    # after the features: the parent's frozen layers are the base's, but its weights would be a new cache key
    started_from = parent.start_from_parent(classifier, config, say) if config.data.parent else None
    _note_schedule(images, config, say)
    return _Inputs(images, classifier, feats, audited, weights_sha256, seconds, started_from), out


def _restored(saved: tuple[RunState, dict] | None, classifier: Classifier, config: Config, phase_end: _PhaseEnd,
              say) -> RunState:
    """A new run's empty state, or a checkpoint's, with its weights back in the classifier."""
    if saved is None:
        return RunState()
    state, variables = saved
    checkpoint.restore(checkpoint.variable_paths(classifier.model), variables, "model")
    say(f"resuming after epoch {state.epoch} of {config.phase1.epochs + config.phase2.epochs}")
    if state.epoch >= config.phase1.epochs and 1 not in state.test_probs:
        phase_end(1, state)  # killed between phase 1's last checkpoint and its evaluation
    return state


# What an earlier run in the folder made (--overwrite): gone before this run starts, so a folder stopped midway is
# no finished run of the old model (metrics.json marks one), and no file of it is read with the new one
EARLIER_RUN = (runfolder.METRICS, runfolder.CHECKPOINT, runfolder.MODEL, runfolder.MODEL_BEFORE, runfolder.UNKNOWN,
               runfolder.PREDICTIONS, runfolder.HISTORY, runfolder.REPORT, runfolder.SUMMARY, runfolder.MODEL_CARD,
               runfolder.AUDIT, runfolder.AUDIT_PAGE, runfolder.CURVES_BEFORE, runfolder.CURVES_AFTER)


def _clear_earlier_run(out: Path) -> None:
    """An earlier run's files in `out` (`EARLIER_RUN`, its TensorBoard curves, the export and evaluations made
    from its model: an export left there would serve the old model under the new labels); a user's own files,
    in those folders too, stay."""
    for name in EARLIER_RUN:
        (out / name).unlink(missing_ok=True)
    for events in (out / runfolder.LOGS).rglob("events.out.tfevents.*"):
        events.unlink()
    record = runfolder.read_export_record(out / runfolder.EXPORT)
    if record is not None:
        runfolder.remove_export(out / runfolder.EXPORT, record)
    runfolder.remove_evaluations(out)


def _start_folder(workdir: Path, overwrite: bool, config: Config, data_dir: str | Path,
                  images: ImageSet) -> Path:
    """A fresh run folder: the config, where the data is, the split and what was skipped."""
    out = runfolder.prepare(workdir, overwrite=overwrite)
    _clear_earlier_run(out)
    runfolder.write_text(out / runfolder.CONFIG, config.to_yaml())
    runfolder.write_json(out / runfolder.RUN_INFO, {"data_dir": str(Path(data_dir).resolve()),
                                                    **({"parent": config.data.parent} if config.data.parent else {})})
    manifest.write_manifest(images, out / runfolder.SPLIT)
    manifest.write_skipped(images, out / runfolder.SKIPPED)
    return out


def _note_schedule(images: ImageSet, config: Config, say) -> None:
    """Say when phase 1's epochs pass over the training images more than once (`phase1.min_steps`), or when it
    takes few steps on the seed's exact recipe."""
    passes = config.passes_per_epoch(1, schedule.steps_per_pass(images, config))
    steps = schedule.steps_per_epoch(images, config, 1)
    if passes > 1:
        say(f"phase 1: each epoch passes over the training images {passes} times ({steps} optimizer steps an epoch, "
            f"{config.phase1.epochs} epoch{'s' if config.phase1.epochs != 1 else ''}), for at least "
            f"phase1.min_steps={config.phase1.min_steps} steps (0: one pass an epoch)")
    elif 0 < steps * config.phase1.epochs < FEW_HEAD_STEPS:
        say(f"note: phase 1 is only {steps * config.phase1.epochs} optimizer steps ({images.counts()['train']} "
            f"training images, batch {config.data.batch_size}, {config.phase1.epochs} epochs); the new head may "
            "underfit: raise phase1.epochs, phase1.min_steps or phase1.lr, or let `mobiletune sweep` choose")


def _from_trial(classifier: Classifier, config: Config, trained: Trained, state: RunState, phase_end: _PhaseEnd,
                tracking: tracking_lib.Tracking, say) -> None:
    """Each phase's end as `fit_recipe` would leave it, from the trial's weights: tested, saved and plotted."""
    say(f"phases 1 and 2: the weights of sweep trial {trained.trial} (the same config, split and seed), "
        "not trained again")
    state.history = list(trained.history)
    for phase, weights in ((1, trained.after_phase1), (2, trained.final)):
        classifier.set_trainable(phase, config)
        classifier.model.set_weights(weights)
        phase_end(phase, state)
    lrs = {phase: float(np.float32(config.phase_lr(phase))) for phase in (1, 2)}  # as the optimizer holds it
    tracking.replay(trained.logs, trained.history, lrs)


def _fit_interruptibly(fit: Fit, state: RunState) -> None:
    """fit_recipe with a checkpoint every epoch; Ctrl-C stops after the batch and says how to resume."""
    with fit.interrupt.handling():
        try:
            fit_recipe(fit, state)
        except Interrupted:
            last = checkpoint.load(fit.save_to)
            saved = "no epoch had finished" if last is None else f"the checkpoint of epoch {last[0].epoch} is saved"
            raise Interrupted(f"interrupted: {saved}; continue with: mobiletune train --resume {fit.save_to}") from None


def _finish(run: _Inputs, state: RunState, config: Config, out: Path, started: float,
            **provenance: Any) -> dict[str, Any]:
    """The final model, its unknown-input detector, the metrics (with `provenance`: where the data was, whether
    resumed or from a sweep trial), and every file that reads them; then the checkpoint goes: the run is
    complete. Returns the metrics."""
    images, classifier, seconds, feats = run.images, run.classifier, run.seconds, run.feats
    runfolder.save_model(out / runfolder.MODEL, classifier.model)
    clock = time.perf_counter()
    detector, unknown_scores = unknown.fit_run(classifier, images, config, feats)
    detector.save(out / runfolder.UNKNOWN)
    seconds["unknown"] = time.perf_counter() - clock
    seconds["total"] = time.perf_counter() - started
    before, after, test = state.test_probs[1], state.test_probs[2], images.indices("test")
    metrics = {
        **evaluate.compare_stages(before, after, images.labels[test], images.classes),
        "classes": images.classes, "n_images": images.counts(), "n_skipped": len(images.skipped),
        "balance_note": images.balance_note(config.data.class_weight == "auto"),
        "audit": inputs.audit_metrics(run.audited, images, before, after),
        "base_layers": len(classifier.base.layers), "fine_tune_at": config.phase2.fine_tune_at,
        "unknown": detector.summary(unknown_scores),
        "class_weight": {images.classes[c]: w for c, w in (schedule.class_weights(images, config) or {}).items()},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "features": None if feats is None else {"images_cached": feats.cached, "images_computed": feats.computed,
                                                "cache_bytes": feats.cache_bytes()},
        "files_hashed": images.files_read, "peak_rss_mb": peak_rss_mb(), "data_sha256": images.digest(),
        "environment": environment(run.weights_sha256), "schedule": _schedule(images, config), "parent": run.parent,
        **provenance,
    }
    evaluate.write_predictions(out / runfolder.PREDICTIONS, [images.paths[i] for i in test], images.labels[test],
                               images.classes, before, after, unknown_scores)
    runfolder.write_json(out / runfolder.METRICS, metrics)
    report.write_summary(out / runfolder.SUMMARY, config, metrics)
    model_card.write_model_card(out)
    report_html.build_report(out)
    (out / runfolder.CHECKPOINT).unlink(missing_ok=True)  # model.keras is what counts now
    return metrics


def _schedule(images: ImageSet, config: Config) -> dict[str, int]:
    return {"passes_per_epoch": config.passes_per_epoch(1, schedule.steps_per_pass(images, config)),
            "phase1_steps_per_epoch": schedule.steps_per_epoch(images, config, phase=1),
            "phase2_steps_per_epoch": schedule.steps_per_epoch(images, config, phase=2)}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss: KiB on Linux)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _check_same_data(out: Path, images: ImageSet) -> None:
    saved = read_manifest(out / runfolder.SPLIT)
    now = [{"path": p, "class": images.classes[c], "split": s, "sha256": h}
           for p, c, s, h in zip(images.paths, images.labels, images.splits, images.hashes, strict=True)]
    if saved != now:
        raise DataError(f"--resume {out}: the images changed since the run started (split.csv differs); "
                        "start a new run instead")


def environment(base_weights_sha256: str) -> dict[str, str]:
    """What produced a run: versions, the base weights' digest, the machine."""
    import platform
    from importlib.metadata import version

    import tensorflow as tf

    from mobiletune.version import __version__

    return {
        "mobiletune": __version__, "python": platform.python_version(), "tensorflow": tf.__version__,
        "keras": keras.__version__, "numpy": version("numpy"), "scikit-learn": version("scikit-learn"),
        "platform": platform.platform(), "cpus": str(os.cpu_count()),
        "base_weights_sha256": base_weights_sha256,
    }
