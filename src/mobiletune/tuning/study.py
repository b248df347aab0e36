"""Tune the recipe: an Optuna study over input size, learning rates, epochs, `fine_tune_at`, dropout
and augmentation, for validation accuracy alone or for accuracy against measured latency.

Trials (`trials.py`) train on cached features (one extraction pass per input size serves every
`fine_tune_at` in the space), report validation accuracy each epoch for pruning, and never see
the test set. The study lives in any Optuna storage: an SQLite file in the sweep folder by
default, or a shared RDB URL (PostgreSQL) so workers on many machines share one study; `--workers N` adds
worker processes on this machine, or with `--ray` runs N workers on a Ray cluster's nodes (`helpers`). A worker
killed mid-trial costs only that trial: its heartbeat stops and the trial is failed; the others,
or a restarted worker, carry on. At the end the chosen config (`objectives.choose`: the most
accurate, within the latency budget if one is given) goes into `best/`, a full run folder tested
once: the trial's own model when this worker trained it (training the config again gives the same
weights: same split, seed and op determinism), retrained otherwise. The summary and, with latency,
the Pareto front are written.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from mobiletune import runfolder
from mobiletune.config import Config, from_flat, load_config
from mobiletune.data.images import ImageSet
from mobiletune.errors import MobiletuneError, UsageError
from mobiletune.features import cache
from mobiletune.features import cluster as cluster_lib
from mobiletune.tracking import tracker as tracking
from mobiletune.training.run import Trained, train_and_evaluate
from mobiletune.tuning import helpers, search
from mobiletune.tuning import objectives as objectives_lib
from mobiletune.tuning import setup as sweep_setup
from mobiletune.tuning.trials import Shared, measure_sizes


def run_sweep(base: Config, data_dir: str | Path, out: str | Path, *, n_trials: int = 16,
              space_path: str | Path | None = None, storage: str | None = None, study_name: str = "mobiletune",
              timeout: float | None = None, grace_period: int = 60, baseline: str | Path | None = None,
              console=None, mlflow: tracking.Mlflow | None = None,
              objectives: objectives_lib.Objectives | None = None, workers: int = 1,
              ray: cluster_lib.RayCluster | str | None = None) -> dict[str, Any]:
    """Run (or join) a study until it holds `n_trials` finished trials; then report, and test the chosen one.

    `objectives`: accuracy alone (default), or accuracy and latency, and an optional latency budget.
    `workers`: worker processes on this machine, this one included (`helpers.local`); with `ray` (a Ray
    cluster's address), trial workers on its nodes (`helpers.on_ray`), and the feature passes of best/ and
    default/ on its actors.
    """
    import warnings

    with warnings.catch_warnings():  # optuna imports tqdm.auto, which warns in a notebook without ipywidgets
        warnings.filterwarnings("ignore", "IProgress not found")
        import optuna

    started = time.perf_counter()
    wanted, out = objectives or objectives_lib.Objectives(), Path(out)
    space, baseline_metrics = sweep_setup.check(out, n_trials, grace_period, workers, space_path, wanted, baseline,
                                                tracked=mlflow is not None, on_ray=ray is not None, timeout=timeout)
    runfolder.check_apart(out, data_dir)
    sweep_setup.prepare_folders(out, base)
    say = console.print if console is not None else (lambda *a, **k: None)
    # Our own line per trial; Optuna's warning for a failed trial carries a traceback (Ctrl-C printed one),
    # and the error reaches the user once, as our one-line message
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    index, images, fine_tune_ats = search.inputs(base, data_dir, space)
    sweep_setup.check_baseline(baseline, baseline_metrics, data_dir, images.classes)
    study, created = search.open_study(out, storage, study_name, base.data.seed, grace_period, wanted.directions)
    search.check_objectives(study, created, wanted)
    search.check_inputs(study, created, base, space, images)
    sweep_setup.record_request(out, base, space, n_trials, study_name, wanted)
    parent = _sweep_mlflow(mlflow, study, created, out, base, images, say)
    with cluster_lib.connected(ray) as on_cluster, parent.failing() if parent is not None else nullcontext():
        shared = Shared(base, images, fine_tune_ats, index, out / runfolder.LOGS, wanted, parent)
        if wanted.measures_latency:
            measure_sizes(study, shared, space, say)  # before the helpers start: timed on a quiet machine
        task = {"data_dir": str(Path(data_dir).resolve()), "out": str(out.resolve()), "storage": storage,
                "study": study_name, "trials": n_trials, "grace_period": grace_period, "space": space,
                # absolute, as the paths: a worker on a Ray node does not start in this folder
                "base": {**base.flat(), "features.cache_dir": str(cache.cache_root(base).resolve())},
                "objectives": [list(wanted.names), wanted.latency_format, wanted.max_latency_ms],
                "deadline": None if timeout is None else time.time() + timeout,
                "parent": None if on_cluster else os.getpid()}  # Ray stops the tasks of a driver that is gone
        _run_workers(study, created, shared, space, task, workers, on_cluster is not None, say)
        results = _choose_and_run(study, space, base, data_dir, out, fine_tune_ats, baseline_metrics, console,
                                  parent, wanted, (started, time.perf_counter() - started), shared.trained)
    return results


def _run_workers(study, created: bool, shared: Shared, space: dict[str, Any], task: dict[str, Any], workers: int,
                 on_ray: bool, say) -> None:
    """The search: here with `workers - 1` helper processes beside, or (`on_ray`) by `workers` trial workers on
    the Ray cluster while this process says how they do."""
    import optuna

    left = task["trials"] - search.finished(study)  # none to start for a study done
    timeout = None if task["deadline"] is None else task["deadline"] - time.time()
    if on_ray:
        search.begin(study, created, shared.base, space, task["trials"], say)
        helpers.on_ray(min(workers, left), task, study, shared.objectives, say)
        optuna.storages.fail_stale_trials(study)
        return
    with helpers.local(min(workers - 1, left - 1), task, Path(task["out"]), say):
        search.search(study, created, shared, space, task["trials"], timeout, say)


def _choose_and_run(study, space: dict[str, Any], base: Config, data_dir, out: Path, fine_tune_ats: list[int],
                    baseline_metrics: dict[str, Any] | None, console, parent: tracking.MlflowRun | None,
                    wanted: objectives_lib.Objectives, clock: tuple[float, float],
                    trained: dict[int, Trained]) -> dict[str, Any]:
    """The plots and trials.csv; the chosen trial into best/ (and the base recipe into default/), each tested
    once: the trial's own model where this worker `trained` it, else retrained; sweep.json and the summary;
    the parent MLflow run finished. `clock`: when the sweep started, and the seconds its search took."""
    from mobiletune.tuning import summary as sweep_report

    say = console.print if console is not None else (lambda *a, **k: None)
    sweep_report.write_trials_csv(study, space, out / runfolder.TRIALS)
    sweep_report.plot_sweep(study, space, out, wanted)
    if not any(t.state.name == "COMPLETE" for t in study.trials):
        raise UsageError(f"study {study.study_name!r}: no trial completed; see {out / 'trials.csv'}")
    best = objectives_lib.choose(study, wanted)
    best_config = from_flat({**base.flat(), **best.params})
    results = {"search_seconds": round(clock[1], 1), "counts": search.counts(study), "best_trial": best.number,
               "best_value": objectives_lib.accuracy(best), "best_params": best.params,
               "objectives": list(wanted.names), **_latency_results(study, wanted, best)}
    within = f" within {wanted.max_latency_ms:g} ms" if wanted.max_latency_ms is not None else ""
    say(f"best{within}: trial {best.number}, validation accuracy {objectives_lib.accuracy(best):.4f}")
    nested = tracking.Mlflow(parent.uri, parent.run_id) if parent is not None and parent.active else None

    def run(config: Config, folder: Path, what: str) -> dict[str, Any]:
        kept = next((t for t in trained.values() if t.config == config), None)  # any trial of this config
        earlier = _finished(folder, config)  # as _run_once decides
        metrics = _run_once(config, data_dir, folder, fine_tune_ats, console, nested, kept)
        source = metrics.get("weights_from_trial")
        how = ("kept from an earlier sweep run" if earlier else "trained and tested" if source is None
               else f"trial {source}'s model, tested")
        say(f"{what}: {folder}, {how}")
        return metrics

    results["best"] = run(best_config, out / runfolder.SWEEP_BEST, "best config")
    if results["best"].get("n_skipped"):  # the trials saw the same images: said once, here
        say(f"{results['best']['n_skipped']} file(s) skipped, unreadable or not images: see "
            f"{out / runfolder.SWEEP_BEST / runfolder.SKIPPED}")
    if baseline_metrics is None and best_config == base:
        baseline_metrics = results["best"]
    elif baseline_metrics is None:
        baseline_metrics = run(base, out / "default", "base recipe, for comparison")
    results["default"] = baseline_metrics
    results["total_seconds"] = round(time.perf_counter() - clock[0], 1)
    runfolder.write_json(out / "sweep.json", results)
    sweep_report.write_sweep_summary(out / runfolder.SUMMARY, study, space, base, best_config, results, wanted, best)
    if parent is not None:
        parent.log_metrics({"best_val_accuracy": objectives_lib.accuracy(best), "best_trial": best.number,
                            "test_accuracy_after_best": results["best"]["after_fine_tuning"]["test"]["accuracy"]})
        parent.log_files(sorted(p for p in out.iterdir() if p.is_file() and p.suffix in (".md", ".csv", ".json",
                                                                                          ".yaml", ".png")))
        parent.end()
    return results


def _latency_results(study, wanted: objectives_lib.Objectives, best) -> dict[str, Any]:
    """sweep.json's latency part: the host the figures hold for, the budget, the front, the choice."""
    if not wanted.measures_latency:
        return {}
    return {"latency_format": wanted.latency_format, "max_latency_ms": wanted.max_latency_ms,
            "host": objectives_lib.hosts(study), "chosen": objectives_lib.summary(best, wanted),
            "front": [objectives_lib.summary(t, wanted) for t in objectives_lib.front(study, wanted)]}


def _sweep_mlflow(target: tracking.Mlflow | None, study, created: bool, out: Path, base: Config,
                  images: ImageSet, say) -> tracking.MlflowRun | None:
    """The sweep's parent MLflow run. Workers sharing a study share it: its server and id are kept in the
    study (the first worker to make one wins), and a rerun against another server starts a new one there."""
    if target is None:
        return None
    key = "mlflow_parent"
    earlier = study.user_attrs.get(key) or {}
    known = earlier.get("run_id") if earlier.get("uri") == target.uri else None
    tags = {"mobiletune.study": study.study_name, "mobiletune.data_sha256": images.digest(),
            "mobiletune.sweep_folder": str(out.resolve())}
    parent = tracking.MlflowRun.start(target, out.name, say, params=base.flat(), tags=tags, run_id=known)
    if parent.active and known is None and (study.user_attrs.get(key) or {}).get("uri") != target.uri:
        study.set_user_attr(key, {"uri": target.uri, "run_id": parent.run_id})
    return parent


def _run_once(config: Config, data_dir, out: Path, fine_tune_ats: list[int], console,
              mlflow: tracking.Mlflow | None = None, trained: Trained | None = None) -> dict[str, Any]:
    """A full run folder for `config`, unless one of the same config is already there (a second worker, a
    rerun). A rerun whose trials found a better config retrains the folder for it. Workers sharing the
    sweep folder take turns: one trains, the next waits and then finds its folder."""
    def waiting() -> None:
        if console is not None:
            console.print(f"another worker is training {out}; waiting for it")

    with runfolder.exclusive_where_possible(out.parent / f".{out.name}.lock", waiting):
        if _finished(out, config):
            return runfolder.read_metrics(out)
        return train_and_evaluate(config, data_dir, out, overwrite=True, fine_tune_ats=fine_tune_ats,
                                  mlflow=mlflow, trained=trained).metrics


def _finished(run: Path, config: Config) -> bool:
    """Whether `run` is a finished run folder of `config`."""
    try:
        return (run / runfolder.METRICS).exists() and load_config(run / runfolder.CONFIG).flat() == config.flat()
    except (OSError, MobiletuneError):
        return False  # unreadable: made again


