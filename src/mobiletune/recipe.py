"""The seed's recipe end to end: `train_and_evaluate(config, data_dir, workdir)`.

The images as a run sees them (`scan_images`, `run_features`: exclusions, failed decodes, near
copies kept in one split), both phases (`training.fit_recipe`), the test set scored after each
("before" and "after fine-tuning"), and everything in the run folder; `resume_run` continues one.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from mobiletune import (
    audit,
    cache,
    checkpoint,
    data,
    evaluate,
    features,
    model_card,
    pixels,
    progress,
    report,
    report_html,
    runfolder,
    scan,
    unknown,
)
from mobiletune import model as model_lib
from mobiletune import tracking as tracking_lib
from mobiletune.config import Config
from mobiletune.errors import DataError
from mobiletune.training import class_weights, fit_recipe, seed_everything, steps_per_epoch, steps_per_pass

HISTORY_COLUMNS = ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"]
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
    images: data.ImageSet  # the split it trained and validated on
    after_phase1: list[np.ndarray]
    final: list[np.ndarray]
    history: list[dict[str, Any]]
    logs: Path

    def fits(self, config: Config, images: data.ImageSet) -> bool:
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
    """What follows each phase: the full model on the test pixels (the real numbers), the history
    and curves, and after phase 1 the model before fine-tuning. `test_probs[phase]` travels in the
    checkpoints, so a resumed run does not evaluate a finished phase again."""

    def __init__(self, model: keras.Model, images: data.ImageSet, config: Config, out: Path,
                 seconds: dict[str, float], test_probs: dict[str, Any]):
        self.model, self.images, self.config, self.out = model, images, config, out
        self.seconds, self.test_probs, self.clock = seconds, test_probs, time.perf_counter()

    def done(self, phase: int) -> bool:
        return f"test_probs_{phase}" in self.test_probs

    def __call__(self, phase: int, history: list[dict[str, Any]]) -> None:
        config, out = self.config, self.out
        test = pixels.eval_batches(self.images, config.data.image_size, config.data.batch_size)
        self.test_probs[f"test_probs_{phase}"] = evaluate.probabilities(evaluate.predict_logits(self.model, test)[0])
        self.seconds[f"phase{phase}"] = time.perf_counter() - self.clock
        _write_history(out, history)
        if phase == 1:
            runfolder.save_model(out / runfolder.MODEL_BEFORE, self.model)  # for `evaluate` on new data
            report.plot_curves(history, out / "before_fine_tuning.png", "Before fine-tuning (phase 1)")
        else:
            report.plot_curves(history, out / "after_fine_tuning.png", "After fine-tuning (phases 1 and 2)",
                               fine_tune_from=config.phase1.epochs + 1)
        self.clock = time.perf_counter()


def _run(config: Config, data_dir: str | Path, out: Path, *, resuming: bool, overwrite: bool = False, console=None,
         fine_tune_ats: list[int] | None = None, mlflow: tracking_lib.Mlflow | None = None,
         trained: Trained | None = None) -> RunResult:
    """train_and_evaluate and resume_run: data, model and features; both phases; the run folder."""
    started = time.perf_counter()
    if config.features.cache:
        runfolder.make_folder(cache.cache_root(config), "features.cache_dir")  # before minutes of decoding
    say = console.print if console is not None else (lambda *a, **k: None)
    index = _file_index(config)
    images = scan_images(data_dir, config, index, console)
    seconds = {"load_images": time.perf_counter() - started}
    seed_everything(config.data.seed)
    model = model_lib.build_model(config, len(images.classes))
    base = model_lib.base_of(model)
    weights_sha256 = features.weights_digest(base)  # of the weights as loaded, before any training
    say(f"number of layers in the base model: {len(base.layers)}; fine-tuning from layer "
        f"{config.phase2.fine_tune_at} ({base.layers[config.phase2.fine_tune_at].name})")
    clock = time.perf_counter()
    feats, images, near = _features_or_checked_images(model, images, config, index, console, fine_tune_ats)
    seconds["features"] = time.perf_counter() - clock
    if resuming:
        _check_same_data(out, images)
    else:
        out = _start_folder(out, overwrite, config, data_dir, images)
    counts = images.counts()
    say(f"images: {counts} in {len(images.classes)} classes {images.classes}; {len(images.skipped)} skipped"
        + (" (see skipped.csv)" if images.skipped else ""))
    audited = _audit(images, feats, near, config, out, say)
    _note_schedule(images, config, say)

    saved = checkpoint.load(out) if resuming else None
    tracking = tracking_lib.Tracking.for_run(out, mlflow, config.flat(), {
        "mobiletune.data_sha256": images.digest(), "mobiletune.base_weights_sha256": weights_sha256,
        "mobiletune.run_folder": str(out.resolve())}, say, resuming)
    with tracking.failing():
        phase_end = _PhaseEnd(model, images, config, out, seconds, dict(saved.test_probs) if saved else {})
        if saved is not None:
            checkpoint.restore_model(model, saved.model_variables)
            say(f"resuming after epoch {saved.epoch} of {config.phase1.epochs + config.phase2.epochs}")
            if saved.epoch >= config.phase1.epochs and not phase_end.done(1):
                phase_end(1, list(saved.history))  # killed between phase 1's last checkpoint and its evaluation
        from_trial = trained.trial if trained is not None and trained.fits(config, images) else None
        if from_trial is not None:
            history = _from_trial(model, config, trained, phase_end, tracking, say)
        else:
            history = _fit_interruptibly(model, images, feats, config, console, phase_end, saved, out, tracking)
        if not phase_end.done(2):  # killed after the last epoch's checkpoint, before its evaluation
            phase_end(2, history)
        runfolder.save_model(out / runfolder.MODEL, model)
        clock = time.perf_counter()
        detector, unknown_scores = unknown.fit_run(model, images, config, feats)
        detector.save(out / unknown.FILE_NAME)
        seconds["unknown"] = time.perf_counter() - clock
        seconds["total"] = time.perf_counter() - started
        probs = phase_end.test_probs
        metrics = _final_metrics(config, images, feats, audited, probs["test_probs_1"], probs["test_probs_2"],
                                 (detector, unknown_scores), seconds, base, weights_sha256, data_dir, saved is not None)
        metrics["weights_from_trial"] = from_trial  # a sweep's: not trained again (`Trained`)
        metrics["schedule"] = {"passes_per_epoch": config.passes_per_epoch(1, steps_per_pass(images, config)),
                               "phase1_steps_per_epoch": steps_per_epoch(images, config, phase=1),
                               "phase2_steps_per_epoch": steps_per_epoch(images, config, phase=2)}
        _finish_folder(out, config, images, metrics, probs["test_probs_1"], probs["test_probs_2"], unknown_scores)
        tracking.finish(metrics, (config.phase1.epochs, config.phase2.epochs), out)
    if console is not None:
        report.print_results(console, metrics)
        say(f"run folder: {out}" + (f"; MLflow: {tracking.link}" if tracking.link else ""))
    return RunResult(out, metrics, history)


def _start_folder(workdir: Path, overwrite: bool, config: Config, data_dir: str | Path,
                  images: data.ImageSet) -> Path:
    """A fresh run folder: the config, where the data is, the split and what was skipped."""
    out = runfolder.prepare(workdir, overwrite=overwrite)
    (out / checkpoint.FILE_NAME).unlink(missing_ok=True)
    shutil.rmtree(out / tracking_lib.LOGS, ignore_errors=True)  # --overwrite: an earlier run's curves would mix in
    runfolder.write_text(out / runfolder.CONFIG, config.to_yaml())
    runfolder.write_json(out / runfolder.RUN_INFO, {"data_dir": str(Path(data_dir).resolve())})
    data.write_manifest(images, out / runfolder.SPLIT)
    data.write_skipped(images, out / runfolder.SKIPPED)
    return out


def _note_schedule(images: data.ImageSet, config: Config, say) -> None:
    """Say when phase 1's epochs pass over the training images more than once (`phase1.min_steps`), or when it
    takes few steps on the seed's exact recipe."""
    passes, steps = config.passes_per_epoch(1, steps_per_pass(images, config)), steps_per_epoch(images, config, 1)
    if passes > 1:
        say(f"phase 1: {config.phase1.epochs} epochs of {passes} passes over the training images ({steps} steps "
            f"each), for at least phase1.min_steps={config.phase1.min_steps} optimizer steps (0: one pass an epoch)")
    elif 0 < steps * config.phase1.epochs < FEW_HEAD_STEPS:
        say(f"note: phase 1 is only {steps * config.phase1.epochs} optimizer steps ({images.counts()['train']} "
            f"training images, batch {config.data.batch_size}, {config.phase1.epochs} epochs); the new head may "
            "underfit: raise phase1.epochs, phase1.min_steps or phase1.lr, or let `mobiletune sweep` choose")


def _from_trial(model: keras.Model, config: Config, trained: Trained, phase_end: _PhaseEnd,
                tracking: tracking_lib.Tracking, say) -> list[dict[str, Any]]:
    """Each phase's end as `fit_recipe` would leave it, from the trial's weights: tested, saved and plotted."""
    say(f"phases 1 and 2: the weights of sweep trial {trained.trial} (the same config, split and seed), "
        "not trained again")
    for phase, weights in ((1, trained.after_phase1), (2, trained.final)):
        model_lib.set_trainable(model, phase=phase, config=config)
        model.set_weights(weights)
        phase_end(phase, [row for row in trained.history if row["phase"] <= phase])
    lrs = {phase: float(np.float32(config.phase_lr(phase))) for phase in (1, 2)}  # as the optimizer holds it
    tracking.replay(trained.logs, trained.history, lrs)
    return list(trained.history)


def _fit_interruptibly(model, images, feats, config: Config, console, phase_end: _PhaseEnd,
                       saved: checkpoint.Checkpoint | None, out: Path,
                       tracking: tracking_lib.Tracking) -> list[dict[str, Any]]:
    """fit_recipe with a checkpoint every epoch; Ctrl-C stops after the batch and says how to resume."""
    interrupt = checkpoint.Interrupt()
    with interrupt.handling():
        try:
            return fit_recipe(model, images, feats, config, console=console, after_phase=phase_end, resume=saved,
                              save_to=out, interrupt=interrupt, test_probs=phase_end.test_probs, tracking=tracking)
        except checkpoint.Interrupted:
            last = checkpoint.load(out)
            saved_what = "no epoch had finished" if last is None else f"the checkpoint of epoch {last.epoch} is saved"
            raise checkpoint.Interrupted(
                f"interrupted: {saved_what}; continue with: mobiletune train --resume {out}") from None


def _final_metrics(config: Config, images: data.ImageSet, feats, audited, probs_before: np.ndarray,
                   probs_after: np.ndarray, unknown_fit: tuple, seconds: dict[str, float], base: keras.Model,
                   weights_sha256: str, data_dir: str | Path, resumed: bool) -> dict[str, Any]:
    """metrics.json."""
    test = images.indices("test")
    detector, scores = unknown_fit
    return {
        **evaluate.compare_stages(probs_before, probs_after, images.labels[test], images.classes),
        "classes": images.classes,
        "n_images": images.counts(),
        "n_skipped": len(images.skipped),
        "audit": _audit_metrics(audited, images, probs_before, probs_after),
        "base_layers": len(base.layers),
        "fine_tune_at": config.phase2.fine_tune_at,
        "unknown": {**detector.summary(), "test_kept": float(np.mean(scores <= detector.threshold))},
        "class_weight": {images.classes[c]: w for c, w in (class_weights(images, config) or {}).items()},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "resumed": resumed,
        "features": None if feats is None else {"images_cached": feats.cached, "images_computed": feats.computed,
                                                "cache_bytes": feats.cache_bytes()},
        "files_hashed": images.files_read,
        "peak_rss_mb": peak_rss_mb(),
        "data_dir": str(Path(data_dir).resolve()),
        "data_sha256": images.digest(),
        "environment": environment(weights_sha256),
    }


def _finish_folder(out: Path, config: Config, images: data.ImageSet, metrics: dict[str, Any],
                   probs_before: np.ndarray, probs_after: np.ndarray, unknown_scores: np.ndarray) -> None:
    """Predictions, metrics, summary, model card and report; then the checkpoint goes: the run is complete."""
    test = images.indices("test")
    evaluate.write_predictions(out / runfolder.PREDICTIONS, [images.paths[i] for i in test], images.labels[test],
                               images.classes, probs_before, probs_after, unknown_scores)
    runfolder.write_json(out / runfolder.METRICS, metrics)
    report.write_summary(out / runfolder.SUMMARY, config, metrics)
    model_card.write_model_card(out)
    report_html.build_report(out)
    (out / checkpoint.FILE_NAME).unlink(missing_ok=True)  # model.keras is what counts now


def _features_or_checked_images(model: keras.Model, images: data.ImageSet, config: Config, index: scan.FileIndex,
                                console, fine_tune_ats: list[int] | None
                                ) -> tuple[features.Features | None, data.ImageSet, tuple | None]:
    """The cached features on the run's split (`run_features`), the images that decoded, and each image's nearest
    neighbours when data.dedupe looked for them; with --no-cache, no features, and every image decoded once up
    front so none fails mid-epoch."""
    clock = time.perf_counter()
    if not config.features.cache:
        with progress.bar(console, "checking images") as update:
            return None, data.check_decodable(images, config.data.image_size, config.data.batch_size, update), None
    with progress.bar(console, "features") as update:
        feats, near = run_features(model, images, config, index, fine_tune_ats, update)
    if console is not None:
        console.print(f"features: {feats.cached:,} cached, {feats.computed:,} computed"
                      + (f", {feats.failed} image(s) failed to decode" if feats.failed else "")
                      + f" ({config.features.views} views per training image; {feats.cache_bytes() / 2**20:,.0f} "
                      f"MB of cache, {time.perf_counter() - clock:.1f} s)")
    return feats, feats.images, near


def run_features(model: keras.Model, images: data.ImageSet, config: Config, index: scan.FileIndex,
                 fine_tune_ats: list[int] | None = None, update=None) -> tuple[features.Features, tuple | None]:
    """The cached features (computing what is missing) on the split a run of `config` trains on: scanned again
    without the images that failed to decode, and with data.dedupe, with near copies regrouped into one split.
    Also each image's nearest neighbours when dedupe looked for them (`audit.nearest`, for the audit to reuse).
    A sweep's trials come here too, so a trial validates on the split its run in best/ tests on."""
    plain = config.data.audit != "none"  # the audit compares every image unaugmented
    computed = 0  # over every pass below: a later pass finds an earlier one's work cached
    near = None

    def compute(images: data.ImageSet) -> features.Features:
        nonlocal computed
        feats = features.compute_features(model, images, config, fine_tune_ats=fine_tune_ats, progress=update,
                                          file_index=index, plain=plain)
        computed += feats.computed
        return feats

    feats = compute(images)
    if feats.failed:  # now known to the index: scan again, so the split is the one any later run (--resume) makes
        feats = compute(scan_images(images.source or images.root, config, index))
    if config.data.dedupe and feats.pooled_plain is not None:  # near copies into one split, where it is ours
        near, near_paths = audit.nearest(feats.pooled_plain), feats.images.paths
        groups = audit.duplicate_groups(feats.images, audit.duplicates(feats.images, near))
        regrouped = scan_images(images.source or images.root, config, index, groups=groups) if groups else feats.images
        if list(regrouped.splits) != list(feats.images.splits):
            feats = compute(regrouped)
        if feats.images.paths != near_paths:  # a file went or came mid-run: `near` no longer lines up
            near = None
    feats.cached, feats.computed = max(0, feats.cached - (computed - feats.computed)), computed
    return feats, near


def _audit(images: data.ImageSet, feats: features.Features | None, near: tuple | None, config: Config, out: Path,
           say) -> dict[str, Any] | None:
    """Duplicates and cross-split copies (and with data.audit=full, label errors and outliers): audit.csv and
    a line on the console. Needs the unaugmented features, so not with --no-cache."""
    if feats is None or feats.pooled_plain is None:
        return None
    clock = time.perf_counter()
    findings = audit.run_audit(images, feats.pooled_plain, full=config.data.audit == "full", near=near)
    audit.write_csv(findings, out / "audit.csv")
    found = audit.summary(images, findings)
    parts = [f"{found[i]} {i.replace('_', ' ')}(s)" for i in audit.ISSUES if found[i] or i in audit.ISSUES[:2]]
    say(f"audit: {', '.join(parts)}; {found['leaks']} cross train and validation/test" + (
        " (leaks: the test accuracy without them is reported too)" if found["leaks"] else "")
        + f" ({time.perf_counter() - clock:.1f} s; audit.csv)")
    return found


def _audit_metrics(found: dict[str, Any] | None, images: data.ImageSet, before, after) -> dict[str, Any] | None:
    """The audit's counts and, where test images have a copy in train, accuracy on the test images without one."""
    if found is None:
        return None
    test = images.indices("test")
    leaked, test_paths = set(found["leaked_held_out"]), {images.paths[i] for i in test}
    clean = np.array([images.paths[i] not in leaked for i in test])
    labels = images.labels[test]
    return {**{k: v for k, v in found.items() if k != "leaked_held_out"},
            "leaked_test_images": sorted(leaked & test_paths),
            "test_without_leaks": {"images": int(clean.sum()),
                                   **{stage: float((probs[clean].argmax(1) == labels[clean]).mean()) if clean.any()
                                      else None for stage, probs in (("before", before), ("after", after))}}}


def _file_index(config: Config) -> scan.FileIndex:
    """The digests index in the cache folder; with --no-cache nothing is written there, so in memory."""
    if not config.features.cache:
        return scan.FileIndex(None)
    root = cache.cache_root(config)
    return scan.FileIndex(root / scan.INDEX_NAME)


def scan_images(data_dir: str | Path, config: Config, index: scan.FileIndex, console=None,
                groups: dict[str, str] | None = None) -> data.ImageSet:
    """DATA_DIR's images as a run of `config` finds them: data.exclude left out, split by `groups` if given."""
    exclude = audit.read_exclusions(Path(config.data.exclude)) if config.data.exclude else None
    with progress.bar(console, "hashing new files") as update:
        images = data.load_images(data_dir, config.data, index, update, exclude, groups)
    if console is not None:
        files = len(images.paths) + sum(s.reason != data.JUNK_REASON for s in images.skipped)
        console.print(f"scanned {files:,} files: {images.files_read:,} new or changed (hashed), the rest known")
    return images


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss: KiB on Linux)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _check_same_data(out: Path, images: data.ImageSet) -> None:
    saved = data.read_manifest(out / runfolder.SPLIT)
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

    from mobiletune import __version__

    return {
        "mobiletune": __version__, "python": platform.python_version(), "tensorflow": tf.__version__,
        "keras": keras.__version__, "numpy": version("numpy"), "scikit-learn": version("scikit-learn"),
        "platform": platform.platform(), "cpus": str(os.cpu_count()),
        "base_weights_sha256": base_weights_sha256,
    }


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    runfolder.write_csv(out / runfolder.HISTORY, HISTORY_COLUMNS, [[r[c] for c in HISTORY_COLUMNS] for r in history])
