"""The Python API: what the `mobiletune` commands do, for notebooks and scripts.

    import mobiletune as mt
    run = mt.train("data/", out="runs/a", overrides={"phase1.epochs": 5})
    run.metrics["after_fine_tuning"]["test"]["accuracy"]
    run = mt.load("runs/a")                  # any finished run folder
    preds = run.predict(["x.jpg", "dir/"])   # or an array of images
    run.evaluate("other_labelled_images/")
    run.export("tflite")
    study = mt.sweep("data/", out="runs/s", trials=16)

Each function takes the arguments of the command of the same name and gives the same results;
the CLI is a thin layer over them. Problems raise `MobiletuneError` subclasses with a one-line
message (the CLI prints it and exits); progress and results print through rich, which renders
in Jupyter as well as on a terminal (`verbose=False` for silence).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mobiletune import runfolder
from mobiletune.config import Config, load_config
from mobiletune.data import folders as data
from mobiletune.errors import UsageError
from mobiletune.quiet import import_tensorflow
from mobiletune.training import parent as retraining

__all__ = ["Run", "audit_folder", "load", "make_config", "sweep", "train"]

Overrides = Mapping[str, Any] | Iterable[str] | None


def _console(verbose: bool):
    if not verbose:
        return None
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _path(name: str, value: Any) -> Path:
    """An argument that names a file or folder, or a UsageError naming it (an int reached `Path` as a TypeError)."""
    if not isinstance(value, (str, os.PathLike)):
        raise UsageError(f"{name}={value!r}: give a path (a str or pathlib.Path)")
    return Path(value)


def make_config(config: str | Path | Config | None = None, overrides: Overrides = None) -> Config:
    """The defaults, then `config` (a YAML path, or a Config), then `overrides` ({"phase1.epochs": 5} or
    ["phase1.epochs=5"], as `--set` takes them); validated, like the CLI's."""
    from mobiletune.config import from_flat, parse_override

    if config is not None and not isinstance(config, (Config, str, os.PathLike)):
        raise UsageError(f"config={config!r}: give a YAML file's path or a Config")
    values = (config if isinstance(config, Config) else load_config(config)).flat()
    if isinstance(overrides, str) or not isinstance(overrides, (Mapping, Iterable, type(None))):
        raise UsageError(f"overrides={overrides!r}: give a dict like {{'phase1.epochs': 5}} or a list of 'key=value'")
    if isinstance(overrides, Mapping):
        values.update(overrides)
    else:
        values.update(parse_override(item) for item in overrides or [])
    return from_flat(values)


@dataclass
class Run:
    """A finished run folder: its metrics, config and history, and what can be done with its model."""

    workdir: Path
    metrics: dict[str, Any] = field(repr=False)
    config: Config = field(repr=False)
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)
    _predictor: Any = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        after = self.metrics["after_fine_tuning"]["test"]
        return (f"Run({str(self.workdir)!r}, classes={self.metrics['classes']}, "
                f"test accuracy after fine-tuning {after['accuracy']:.2%})")

    def predict(self, images: str | Path | Iterable[str | Path] | np.ndarray, *, top_k: int = 1, batch: int = 32,
                unknown: bool = True) -> list:
        """Classify images with the run's model, as `mobiletune predict RUN` does.

        Args:
            images: image files, folders (walked) or globs; or RGB pixels 0-255 as an array
                [n, height, width, 3] (resized to the model's size if needed).
            top_k: classes to return per image, most likely first.
            batch: images decoded and predicted at a time.
            unknown: score each image and flag those unlike the training images (docs/unknown-inputs.md).

        Returns:
            One `Prediction` per image, in input order: `.top` [(class, probability)], `.unknown`,
            `.unknown_score`, and `.error` for a file that could not be read.
        """
        from mobiletune.ship.predict import load_predictor, predict_array, predict_paths

        if self._predictor is None:
            import_tensorflow()  # before anything imports it: its start-up lines stay off the notebook
            self._predictor = load_predictor(self.workdir)
        if isinstance(images, np.ndarray):
            return predict_array(self._predictor, images, batch=batch, top_k=top_k, unknown=unknown)
        items = [images] if isinstance(images, (str, Path)) else list(images)
        if items and all(isinstance(i, np.ndarray) for i in items):  # arrays of different sizes: one at a time
            return [p for i in items for p in predict_array(self._predictor, i, batch=batch, top_k=top_k,
                                                            unknown=unknown)]
        if not all(isinstance(i, (str, Path)) for i in items):
            raise UsageError("images: give file paths, folders or globs, or arrays of RGB pixels, not a mix")
        return list(predict_paths(self._predictor, [str(i) for i in items], batch=batch, top_k=top_k,
                                  unknown=unknown))

    def evaluate(self, data_dir: str | Path | None = None, out: str | Path | None = None, *,
                 overwrite: bool = False) -> dict[str, Any]:
        """Re-evaluate both models (before and after fine-tuning), as `mobiletune evaluate`.

        Args:
            data_dir: class folders (or a labels CSV) of other labelled images; None re-evaluates the
                run's own test split.
            out: with `data_dir`, the folder for evaluation.json and test_predictions.csv (default
                RUN/evaluations/<data_dir's name>); the run's own files are left as they are.
            overwrite: reuse a non-empty `out`.

        Returns:
            The before/after block (without `data_dir` also written to metrics.json, with report.html rebuilt).
        """
        from mobiletune.evaluation.run import evaluate_run

        if data_dir is not None:
            data.check_source(_path("data_dir", data_dir))  # a missing folder is refused before TensorFlow starts
        import_tensorflow()
        block = evaluate_run(self.workdir, data_dir, out, overwrite)
        self.metrics = runfolder.read_metrics(self.workdir)
        return block

    def export(self, formats: str | Iterable[str] = "all", out: str | Path | None = None, *, max_drop: float = 1.0,
               int8_io: bool = False, about: dict[str, str] | None = None, overwrite: bool = False) -> dict[str, Any]:
        """Export the model and re-test every format with its own runtime, as `mobiletune export`.

        Args:
            formats: "keras", "savedmodel", "tflite", "tflite-fp16", "tflite-int8", "onnx", "all" (each of
                those) or "web" (a page running the .tflite in the browser), or a list.
            out: folder for the files; default RUN/export.
            max_drop: fail (ExportError) when a format's accuracy is more than this many points below Keras'.
            int8_io: tflite-int8 with uint8 input and output, for integer-only devices.
            about: "name", "version", "license" and "author" for the .tflite files' metadata; by default the run
                folder's name, the model file's digest, and no license or author.
            overwrite: write into a non-empty `out` that holds no export (one of another model is replaced).

        Returns:
            export.json: the folder, the Keras accuracy and one check per format.
        """
        import_tensorflow()
        from mobiletune.ship.export import export_run

        return export_run(self.workdir, [formats] if isinstance(formats, str) else list(formats), out,
                          max_drop=max_drop, int8_io=int8_io, about=about, overwrite=overwrite)

    def report(self) -> Path:
        """Rebuild report.html from the folder; returns its path."""
        from mobiletune.report.html import build_report

        return build_report(self.workdir)


def load(run: str | Path) -> Run:
    """Open a finished run folder (one `train` made).

    Args:
        run: the run folder.

    Returns:
        A `Run`. A folder that is not a finished run raises UsageError.
    """
    workdir = _path("run", run)
    metrics = runfolder.read_metrics(workdir)  # first: one clear error for a folder that is no finished run
    if not (workdir / runfolder.MODEL).is_file():
        raise UsageError(f"{workdir}: not a finished mobiletune run folder (no model.keras)")
    rows = runfolder.read_csv(workdir / runfolder.HISTORY) if (workdir / runfolder.HISTORY).is_file() else []
    history = [{k: int(v) if k in ("epoch", "phase") else float(v) for k, v in row.items()} for row in rows]
    return Run(workdir, metrics, load_config(workdir / runfolder.CONFIG), history)


def _run_options(strict: bool, cache: bool, audit: bool, exclude: str | Path | None) -> dict[str, Any]:
    """The config keys `train`'s flags stand for."""
    return {**({"data.strict": True} if strict else {}), **({} if cache else {"features.cache": False}),
            **({"data.audit": "full"} if audit else {}),
            **({"data.exclude": str(Path(exclude).resolve())} if exclude else {})}


def train(data_dir: str | Path | None = None, out: str | Path = "runs/latest", *,
          config: str | Path | Config | None = None, overrides: Overrides = None, overwrite: bool = False,
          strict: bool = False, cache: bool = True, audit: bool = False, exclude: str | Path | None = None,
          resume: str | Path | None = None, mlflow: str | None = None, verbose: bool = True,
          parent: str | Path | None = None, ray: str | Any | None = None) -> Run:
    """Run the recipe on a folder of images, as `mobiletune train`: a frozen-base head, fine-tuning,
    evaluation before and after; a complete run folder in `out`.

    Args:
        data_dir: class folders, or train/ validation/ [test/] of class folders, or a CSV with columns
            path,label[,split] (paths relative to the CSV's folder).
        out: the run folder to create.
        config: a YAML recipe path, or a Config; its keys override the defaults.
        overrides: keys on top, e.g. {"phase2.fine_tune_at": 80} (or ["phase2.fine_tune_at=80"]).
        overwrite: reuse a non-empty `out`.
        strict: stop on an unreadable image instead of skipping it.
        cache: train on cached frozen features (False: the plain recipe, every epoch through the network).
        audit: also look for likely label errors and off-topic images.
        exclude: an audit.csv or list of paths to leave out.
        resume: continue this run folder after a crash or interrupt (give nothing else).
        mlflow: an MLflow tracking URI to log the run to (default: MLFLOW_TRACKING_URI, if set);
            needs `pip install 'mobiletune[mlflow]'`. TensorBoard files are always written, in `out`/logs.
        verbose: print progress and results (rich: a terminal or Jupyter).
        parent: a finished run folder to retrain from (`--from`), for a folder that grew: its weights start the
            run, its training images stay in train, its config is the recipe (unless `config` is given) with a
            shorter schedule (`training.parent.RETRAIN_SCHEDULE`; `overrides` go on top). It needs the same
            classes, base weights, input size, width and cut.
        ray: run the feature pass on this Ray cluster ("auto", "HOST:PORT" or a `features.cluster.RayCluster`).

    Returns:
        The finished `Run`.
    """
    if resume is not None:
        if data_dir is not None or config is not None or overrides or audit or exclude or parent is not None:
            raise UsageError("--resume RUN takes the run's own data and config; drop DATA_DIR, --config, --set, "
                             "--audit, --exclude and --from")
        runfolder.read_resumable(_path("resume", resume))
    else:
        if data_dir is None:
            raise UsageError("missing DATA_DIR: mobiletune train DATA_DIR --out runs/NAME (or --resume RUN)")
        options = _run_options(strict, cache, audit, exclude)
        if parent is not None:  # the parent's recipe, or `config`, with the retraining schedule
            config = make_config(Path(parent) / runfolder.CONFIG if config is None else config,
                                 retraining.retrain_overrides(parent))
        cfg = make_config(make_config(config, overrides), options)
        if cfg.data.parent:  # a network the parent's weights do not fit is refused before any image is read
            retraining.check_config(cfg)
        data.check_source(_path("data_dir", data_dir))
        runfolder.check_apart(_path("out", out), data_dir)
    import_tensorflow()  # after the checks: a typo is refused at once, not after TensorFlow's start-up
    from mobiletune.features.cluster import connected
    from mobiletune.tracking.tracker import mlflow_target
    from mobiletune.training.run import resume_run, train_and_evaluate

    console, target = _console(verbose), mlflow_target(mlflow)
    with connected(ray):
        result = (resume_run(resume, console=console, mlflow=target) if resume is not None else
                  train_and_evaluate(cfg, data_dir, out, overwrite=overwrite, console=console, mlflow=target))
    return load(result.workdir)


def audit_folder(data_dir: str | Path, out: str | Path = "runs/audit", *, config: str | Path | Config | None = None,
                 overrides: Overrides = None, overwrite: bool = False, all_images: bool = False,
                 ray: str | Any | None = None, verbose: bool = True) -> dict[str, Any]:
    """Look for duplicates, copies across splits (leaks), likely label errors and off-topic images, as
    `mobiletune audit` (`mobiletune.audit` names the subpackage): audit.csv, audit.html (tick findings, download
    an exclude list) and skipped.csv in `out`.

    Args:
        data_dir: the same folder (or labels CSV) as for `train`.
        out: the folder for the audit's files.
        config, overrides: the recipe (its data.image_size is the size the features are computed at).
        overwrite: reuse a non-empty `out`.
        all_images: list every image under every check in audit.csv, ranked (default: the findings, then the
            next most suspicious 1% of each check, to review).
        ray: run the feature pass on this Ray cluster.
        verbose: show progress.

    Returns:
        Flagged images per issue ("exact_duplicate", "near_duplicate", "label_error", "outlier"), "leaks",
        "across_classes" (copies filed under two classes), "kinds" (what ImageNet takes each class for),
        "images", "skipped" and "out".
    """
    from mobiletune.audit import run as audit_run

    cfg = make_config(config, overrides)
    data.check_source(_path("data_dir", data_dir))
    runfolder.check_out(_path("out", out), overwrite=overwrite)
    runfolder.check_apart(out, data_dir)
    import_tensorflow()  # after the checks: a typo is refused at once, not after TensorFlow's start-up
    return audit_run.audit_folder(cfg, data_dir, out, overwrite=overwrite, console=_console(verbose),
                                  listing="all" if all_images else "review", ray=ray)


def sweep(data_dir: str | Path, out: str | Path = "runs/sweep", *, trials: int = 16, space: str | Path | None = None,
          storage: str | None = None, study: str = "mobiletune", timeout: float | None = None,
          grace_period: int = 60, baseline: str | Path | None = None, config: str | Path | Config | None = None,
          overrides: Overrides = None, mlflow: str | None = None, objectives: str = "accuracy",
          max_latency_ms: float | None = None, latency_format: str = "tflite", workers: int = 1,
          ray: str | Any | None = None, verbose: bool = True) -> dict[str, Any]:
    """Tune the recipe with Optuna, then test the best config once in `out`/best, as `mobiletune sweep`.

    Args:
        data_dir: the same folder as for `train`.
        out: the sweep folder; run again (or share it) to continue the study.
        trials: finished trials the study should hold.
        space: a YAML search space (default: learning rates, epochs, fine_tune_at, dropout, ...).
        storage: an Optuna RDB URL shared by workers, e.g. postgresql://user@host/db (default: SQLite in `out`).
        study: the study's name in `storage`.
        timeout: stop starting trials after this many seconds.
        grace_period: seconds without a heartbeat before a killed worker's trial is failed.
        baseline: a run folder of the default recipe to compare with, instead of training one.
        config, overrides: the base recipe, as for `train`.
        mlflow: an MLflow tracking URI (default: MLFLOW_TRACKING_URI): a parent run with a nested run per
            trial and for the best and default runs.
        objectives: "accuracy", or "accuracy,latency" for a Pareto front of validation accuracy against the
            measured batch-1 latency of the exported model on this machine.
        max_latency_ms: take the most accurate trial within this latency (measures latency either way).
        latency_format: whose latency counts: "tflite" (float) or "tflite-int8".
        workers: worker processes on this machine sharing the study; more than 1 pays where a trial leaves
            cores idle (small data sets, many cores). With `ray`: trial workers on the cluster's nodes.
        ray: run the trials on this Ray cluster ("auto", "HOST:PORT" or a `features.cluster.RayCluster`), `workers`
            of them side by side, one CPU each; on several machines DATA_DIR at the same path on each, and `storage`
            a PostgreSQL URL.
        verbose: print progress and results.

    Returns:
        The sweep's results (sweep.json): "best" and "default" metrics, "best_trial", "best_params", timings;
        with latency also "host", "front" and "chosen".
    """
    from mobiletune.tuning import objectives as objectives_lib
    from mobiletune.tuning import setup as sweep_setup

    wanted = objectives_lib.parse(objectives, latency_format, max_latency_ms)
    base = make_config(config, overrides)
    if base.data.parent:
        raise UsageError(f"data.parent={base.data.parent!r}: a sweep's trials train from the base weights; drop it, "
                         "and retrain the best config with `mobiletune train DATA --from RUN` later")
    data.check_source(_path("data_dir", data_dir))
    runfolder.check_apart(_path("out", out), data_dir)
    # MLflow with --workers is checked by run_sweep: whether MLflow is on is settled after TensorFlow starts
    sweep_setup.check(out, trials, grace_period, workers, space, wanted, baseline, timeout=timeout)
    import_tensorflow()  # after the checks: a typo is refused at once, not after TensorFlow's start-up
    from mobiletune.tracking.tracker import mlflow_target
    from mobiletune.tuning.study import run_sweep

    return run_sweep(base, data_dir, out, n_trials=trials, space_path=space,
                     storage=storage, study_name=study, timeout=timeout, grace_period=grace_period,
                     baseline=baseline, console=_console(verbose), mlflow=mlflow_target(mlflow), objectives=wanted,
                     workers=workers, ray=ray)
