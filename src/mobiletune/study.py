"""Tune the recipe: an Optuna study over learning rates, epochs, `fine_tune_at`, dropout and augmentation.

Trials train on cached features (one extraction pass serves every `fine_tune_at` in the space),
report validation accuracy each epoch for pruning, and never see the test set. The study lives
in any Optuna storage: an SQLite file in the sweep folder by default, or a shared RDB URL
(PostgreSQL) so workers on many machines share one study. A worker killed mid-trial costs only
that trial: its heartbeat stops and the trial is failed; the others, or a restarted worker, carry on.
At the end the best config is retrained into `best/`, a full run folder, and the summary written.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import yaml

from mobiletune import cache, data, features, runfolder, scan, tracking
from mobiletune import model as model_lib
from mobiletune.config import Config, all_keys, from_flat
from mobiletune.errors import ConfigError, UsageError
from mobiletune.recipe import fit_recipe, seed_everything, train_and_evaluate

# Sensible MobileNetV2 ranges; the seed's recipe (trial 0) lies inside every one of them.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "phase1.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
    "phase2.lr_ratio": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
    # how many top layers to unfreeze: 54, 34, 14 or 4 of 154; 0 and 50 cost far more per epoch
    "phase2.fine_tune_at": {"type": "categorical", "choices": [100, 120, 140, 150]},
    "phase1.epochs": {"type": "int", "low": 2, "high": 10},
    "phase2.epochs": {"type": "int", "low": 2, "high": 10},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
    # each augmentation setting needs its own feature extraction pass: a few choices, not a range
    "augment.rotation": {"type": "categorical", "choices": [0.1, 0.2]},
}


# ---------------------------------------------------------------------------------------------
# The search space


def load_space(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """The default space, or one from YAML: `key: {type, low, high[, log]}` or `key: [choices]`."""
    if path is None:
        return DEFAULT_SPACE
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--space {path}: cannot read it ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"--space {path}: expected a mapping of config keys to ranges, e.g. 'phase1.lr: "
                          "{type: float, low: 1e-5, high: 1e-3, log: true}'")
    space = {}
    for key, spec in raw.items():
        if key not in all_keys():
            raise ConfigError(f"--space {path}: unknown config key {key!r}")
        if isinstance(spec, list):
            spec = {"type": "categorical", "choices": spec}
        if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
            raise ConfigError(f"--space {path}: {key}: give a list of choices or {{type: float|int, low, high}}")
        if spec["type"] == "categorical" and not spec.get("choices"):
            raise ConfigError(f"--space {path}: {key}: choices must be a non-empty list")
        if spec["type"] != "categorical":
            low, high = spec.get("low"), spec.get("high")
            if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high):
                raise ConfigError(f"--space {path}: {key}: needs numbers low < high, got low={low!r} high={high!r}")
            if spec.get("log") and low <= 0:
                raise ConfigError(f"--space {path}: {key}: a log range needs low > 0, got {low!r}")
        space[key] = spec
    return space


def suggest(trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    params = {}
    for key, spec in space.items():
        if spec["type"] == "float":
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
        elif spec["type"] == "int":
            params[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
        else:
            params[key] = trial.suggest_categorical(key, spec["choices"])
    return params


def _in_space(value: Any, spec: dict[str, Any]) -> bool:
    if spec["type"] == "categorical":
        return value in spec["choices"]
    return spec["low"] <= value <= spec["high"]


# ---------------------------------------------------------------------------------------------
# Trials


class _ReportToTrial(keras.callbacks.Callback):
    """Validation accuracy to Optuna after every epoch; stop the trial when the pruner says so.

    Never after the trial's last epoch (`epochs`): its work is done by then, and the pruner would
    compare its final value with other trials' mid-training values at the same step (trials
    differ in epochs), throwing away a finished result that may be the best.
    """

    def __init__(self, trial, epochs: int):
        super().__init__()
        self.trial, self.epochs = trial, epochs

    def on_epoch_end(self, epoch, logs=None):
        import optuna

        self.trial.report(float((logs or {})["val_accuracy"]), step=epoch)
        if epoch + 1 < self.epochs and self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_epoch", epoch + 1)
            raise optuna.TrialPruned()


@dataclass
class _Shared:
    """What every trial of this worker reuses: images, base weights, feature sets by augmentation, and
    where trials are tracked (TensorBoard under `logs`, MLflow runs nested under `mlflow`)."""

    images: data.ImageSet
    base_weights: list[np.ndarray]
    extractor_model: keras.Model
    fine_tune_ats: list[int]
    feature_sets: dict[tuple, features.Features]
    index: scan.FileIndex
    logs: Path
    mlflow: tracking.MlflowRun | None = None


def _features_for(shared: _Shared, config: Config) -> features.Features:
    key = (config.augment.flip, config.augment.rotation)
    if key not in shared.feature_sets:
        shared.feature_sets[key] = features.compute_features(
            shared.extractor_model, shared.images, config, fine_tune_ats=shared.fine_tune_ats, file_index=shared.index)
    return shared.feature_sets[key]


def _objective(shared: _Shared, base: Config, space: dict[str, dict[str, Any]]):
    def objective(trial) -> float:
        import optuna

        params = suggest(trial, space)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        config = from_flat({**base.flat(), **params})
        feats = _features_for(shared, config)
        keras.backend.clear_session()
        seed_everything(config.data.seed)
        model = model_lib.build_model(from_flat({**config.flat(), "model.weights": "none"}),
                                      len(shared.images.classes))
        model_lib.base_of(model).set_weights(shared.base_weights)  # no reload from disk per trial
        epochs = config.phase1.epochs + config.phase2.epochs
        tracked = _trial_tracking(shared, trial.number, config, params)
        with tracked.failing(stopped=(optuna.TrialPruned,)):
            history = fit_recipe(model, feats.images, feats, config, callbacks=[_ReportToTrial(trial, epochs)],
                                 tracking=tracked)
        value = history[-1]["val_accuracy"] if history else 0.0
        if tracked.mlflow is not None:
            tracked.mlflow.log_metrics({"val_accuracy_final": value}, step=epochs)
            tracked.mlflow.end()
        return value

    return objective


def _trial_tracking(shared: _Shared, number: int, config: Config, params: dict[str, Any]) -> tracking.Tracking:
    """A trial's TensorBoard folder (logs/trial-0007) and, under the sweep's MLflow run, its own nested run."""
    name = f"trial-{number:04d}"
    run = None
    if shared.mlflow is not None and shared.mlflow.active:
        target = tracking.Mlflow(shared.mlflow.uri, parent_run_id=shared.mlflow.run_id)
        run = tracking.MlflowRun.start(target, name, shared.mlflow.say, params=config.flat(),
                                       tags={"mobiletune.trial": str(number),
                                             **{f"mobiletune.searched.{k}": _fmt(v) for k, v in params.items()}})
        if not run.active:
            shared.mlflow.run_id = None  # the server is gone: said once, not once per trial
    return tracking.Tracking(shared.logs / name, run)


# ---------------------------------------------------------------------------------------------
# The study


def open_study(out: Path, storage: str | None, study_name: str, seed: int, grace_period: int):
    """The study and whether this call created it."""
    import warnings

    import optuna

    # heartbeats and fail_stale_trials are stable in practice; Optuna still labels them experimental
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    try:
        # A live trial beats 4 times per grace period, so only a dead worker's trial goes stale.
        rdb = optuna.storages.RDBStorage(url, heartbeat_interval=max(1, grace_period // 4), grace_period=grace_period,
                                         engine_kwargs={"pool_pre_ping": True})
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many types for a bad URL or server
        raise UsageError(f"--storage {url}: cannot open ({str(exc).splitlines()[0][:200]})") from None
    # Workers sharing a study must not draw the same startup points: one seed per worker process.
    sampler_seed = seed if storage is None else (seed * 1_000_003 + os.getpid()) % 2**31
    settings = {
        "sampler": optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=4, constant_liar=True),
        "pruner": optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
    }
    # Creating a study is atomic in the storage: exactly one of the workers starting together
    # creates it, and only that one enqueues the base recipe.
    try:
        return optuna.create_study(study_name=study_name, storage=rdb, direction="maximize", **settings), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=study_name, storage=rdb, **settings), False


def _counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def run_sweep(base: Config, data_dir: str | Path, out: str | Path, *, n_trials: int = 16,
              space_path: str | Path | None = None, storage: str | None = None, study_name: str = "mobiletune",
              timeout: float | None = None, grace_period: int = 60, baseline: str | Path | None = None,
              console=None, mlflow: tracking.Mlflow | None = None) -> dict[str, Any]:
    """Run (or join) a study until it holds `n_trials` finished trials; then report and retrain the best."""
    import warnings

    with warnings.catch_warnings():  # optuna imports tqdm.auto, which warns in a notebook without ipywidgets
        warnings.filterwarnings("ignore", "IProgress not found")
        import optuna

    from mobiletune import report

    if n_trials < 1:
        raise UsageError(f"--trials {n_trials}: give at least 1")
    if grace_period < 2:
        raise UsageError(f"--grace-period {grace_period}: give at least 2 seconds")
    started = time.perf_counter()
    out = Path(out)
    space = load_space(space_path)
    runfolder.make_folder(cache.cache_root(base), "features.cache_dir")  # before minutes of work
    baseline_metrics = None if baseline is None else _read_baseline(Path(baseline))  # checked before the search
    if out.exists() and any(out.iterdir()) and not (out / "sweep.yaml").exists():
        raise UsageError(f"--out {out}: folder exists and is not a sweep; pick a new --out")
    runfolder.make_folder(out)
    runfolder.write_text(out / "sweep.yaml", yaml.safe_dump(
        {"base_config": base.to_dict(), "space": space, "trials": n_trials, "study": study_name}, sort_keys=False))
    say = console.print if console is not None else (lambda *a, **k: None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    index = scan.FileIndex(cache.cache_root(base) / scan.INDEX_NAME)
    images = data.load_images(data_dir, base.data, index)
    seed_everything(base.data.seed)
    extractor_model = model_lib.build_model(base, len(images.classes))
    fine_tune_ats = sorted({base.phase2.fine_tune_at, *space.get("phase2.fine_tune_at", {}).get("choices", [])})
    study, created = open_study(out, storage, study_name, base.data.seed, grace_period)
    parent = _sweep_mlflow(mlflow, study, created, out, base, images, say)
    shared = _Shared(images, model_lib.base_of(extractor_model).get_weights(), extractor_model, fine_tune_ats, {},
                     index, out / tracking.LOGS, parent)
    defaults = {k: base.flat()[k] for k in space}
    if created and all(_in_space(defaults[k], space[k]) for k in space):
        study.enqueue_trial(defaults, user_attrs={"note": "the base recipe"})
    say(f"study {study_name!r}: {len(study.trials)} trials so far; running until {n_trials} have finished")

    def on_trial_end(study, trial) -> None:
        best = study.best_trial if any(t.state.name == "COMPLETE" for t in study.trials) else None
        value = "-" if trial.value is None else f"{trial.value:.4f}"
        line = f"trial {trial.number:>3} {trial.state.name:<8} val_accuracy {value}"
        if trial.duration:
            line += f"  {trial.duration.total_seconds():.0f} s"
        if best is not None:
            line += f"  | best {best.value:.4f} (trial {best.number})"
        say(line + "  " + ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items()))

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    if sum(t.state in finished for t in study.trials) < n_trials:
        study.optimize(_objective(shared, base, space), timeout=timeout, gc_after_trial=True,
                       callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=finished), on_trial_end])
    optuna.storages.fail_stale_trials(study)
    search_seconds = time.perf_counter() - started
    write_trials_csv(study, space, out / "trials.csv")
    report.plot_sweep(study, space, out)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        raise UsageError(f"study {study_name!r}: no trial completed; see {out / 'trials.csv'}")

    best = study.best_trial
    best_config = from_flat({**base.flat(), **best.params})
    results = {"search_seconds": round(search_seconds, 1), "counts": _counts(study), "best_trial": best.number,
               "best_value": best.value, "best_params": best.params}
    say(f"best: trial {best.number}, validation accuracy {best.value:.4f}; retraining it into {out / 'best'}")
    nested = tracking.Mlflow(parent.uri, parent.run_id) if parent is not None and parent.active else None
    best_run = _run_once(best_config, data_dir, out / "best", fine_tune_ats, console, nested)
    results["best"] = best_run
    if baseline_metrics is None and best_config == base:
        baseline_metrics = best_run
    elif baseline_metrics is None:
        say(f"training the base recipe into {out / 'default'} for comparison")
        baseline_metrics = _run_once(base, data_dir, out / "default", fine_tune_ats, console, nested)
    results["default"] = baseline_metrics
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    runfolder.write_json(out / "sweep.json", results)
    report.write_sweep_summary(out / runfolder.SUMMARY, study, space, base, best_config, results)
    if parent is not None:
        parent.log_metrics({"best_val_accuracy": best.value, "best_trial": best.number,
                            "test_accuracy_after_best": best_run["after_fine_tuning"]["test"]["accuracy"]})
        parent.log_files(sorted(p for p in out.iterdir() if p.is_file() and p.suffix in (".md", ".csv", ".json",
                                                                                          ".yaml", ".png")))
        parent.end()
    return results


def _sweep_mlflow(target: tracking.Mlflow | None, study, created: bool, out: Path, base: Config,
                  images: data.ImageSet, say) -> tracking.MlflowRun | None:
    """The sweep's parent MLflow run. Workers sharing a study share it: its id is kept in the study."""
    if target is None:
        return None
    key = "mlflow_parent_run_id"
    known = None if created else study.user_attrs.get(key)
    tags = {"mobiletune.study": study.study_name, "mobiletune.data_sha256": images.digest(),
            "mobiletune.sweep_folder": str(out.resolve())}
    parent = tracking.MlflowRun.start(target, out.name, say, params=base.flat(), tags=tags, run_id=known)
    if parent.active and known is None:
        study.set_user_attr(key, parent.run_id)
    return parent


def _run_once(config: Config, data_dir, out: Path, fine_tune_ats: list[int], console,
              mlflow: tracking.Mlflow | None = None) -> dict[str, Any]:
    """A full run folder for `config`, unless one is already there (a second worker, a rerun)."""
    if (out / runfolder.METRICS).exists():
        return _read_metrics(out)
    return train_and_evaluate(config, data_dir, out, overwrite=True, fine_tune_ats=fine_tune_ats,
                              mlflow=mlflow).metrics


def _read_baseline(run: Path) -> dict[str, Any]:
    try:
        return _read_metrics(run)
    except UsageError as exc:
        raise UsageError(f"--baseline: {exc}") from None


def _read_metrics(run: Path) -> dict[str, Any]:
    """metrics.json of a run folder (or the file itself); a missing or damaged one is a usage error."""
    return runfolder.read_json(run / runfolder.METRICS if run.is_dir() else run)


def write_trials_csv(study, space: dict[str, Any], path: Path) -> None:
    header = ["number", "state", "val_accuracy", *space, "seconds", "pruned_at_epoch", "worker"]
    rows = []
    for t in study.trials:
        seconds = t.duration.total_seconds() if t.duration else ""
        rows.append([t.number, t.state.name, "" if t.value is None else t.value,
                     *[t.params.get(k, "") for k in space], seconds, t.user_attrs.get("pruned_at_epoch", ""),
                     t.user_attrs.get("worker", "")])
    runfolder.write_csv(path, header, rows)


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
        return f"{value:.2e}"
    if isinstance(value, float):
        return f"{value:.3g}" if not math.isclose(value, round(value, 3)) else f"{round(value, 3):g}"
    return str(value)
