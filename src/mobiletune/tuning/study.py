"""Tune the recipe: an Optuna study over input size, learning rates, epochs, `fine_tune_at`, dropout
and augmentation, for validation accuracy alone or for accuracy against measured latency.

Trials (`trials.py`) train on cached features (one extraction pass per input size serves every
`fine_tune_at` in the space), report validation accuracy each epoch for pruning, and never see
the test set. The study lives in any Optuna storage: an SQLite file in the sweep folder by
default, or a shared RDB URL (PostgreSQL) so workers on many machines share one study; `--workers N` adds
worker processes on this machine (`mobiletune.tuning.worker`). A worker
killed mid-trial costs only that trial: its heartbeat stops and the trial is failed; the others,
or a restarted worker, carry on. At the end the chosen config (`objectives.choose`: the most
accurate, within the latency budget if one is given) goes into `best/`, a full run folder tested
once: the trial's own model when this worker trained it (training the config again gives the same
weights: same split, seed and op determinism), retrained otherwise. The summary and, with latency,
the Pareto front are written.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from mobiletune import runfolder
from mobiletune.config import Config, from_flat, load_config
from mobiletune.data import scan
from mobiletune.data.images import ImageSet
from mobiletune.errors import MobiletuneError, UsageError
from mobiletune.features import cache
from mobiletune.tracking import tracker as tracking
from mobiletune.training.inputs import scan_images
from mobiletune.training.loop import seed_everything
from mobiletune.training.run import Trained, train_and_evaluate
from mobiletune.tuning import objectives as objectives_lib
from mobiletune.tuning import setup as sweep_setup
from mobiletune.tuning.space import in_space
from mobiletune.tuning.trials import Shared, measure_sizes, objective

# ---------------------------------------------------------------------------------------------
# The study


def open_study(out: Path, storage: str | None, study_name: str, seed: int, grace_period: int,
               directions: list[str] | None = None):
    """The study and whether this call created it. `directions`: ["maximize"] (accuracy) by default, or
    ["maximize", "minimize"] (accuracy, latency); a study made with others is a usage error."""
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
    def settings(sampler_seed: int) -> dict:
        return {"sampler": optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=4, constant_liar=True),
                "pruner": optuna.pruners.MedianPruner(n_startup_trials=objectives_lib.PRUNE_AFTER_TRIALS,
                                                      n_warmup_steps=objectives_lib.PRUNE_AFTER_STEP)}

    # Workers sharing a study must not draw the same startup points: one seed per worker process, but the
    # seed itself for a study a lone worker makes in its own folder, so that it can be reproduced. A worker
    # joining a study in the folder got the seed too, and drew the first one's trials again (measured).
    per_process = (seed * 1_000_003 + os.getpid()) % 2**31
    # Creating a study is atomic in the storage: exactly one of the workers starting together
    # creates it, and only that one enqueues the base recipe.
    directions = directions or ["maximize"]
    try:
        return optuna.create_study(study_name=study_name, storage=rdb, directions=directions,
                                   **settings(seed if storage is None else per_process)), True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=rdb, **settings(per_process))
    if [d.name.lower() for d in study.directions] != directions:
        raise UsageError(f"study {study_name!r} in {url} was made with {len(study.directions)} objective(s), not "
                         f"{len(directions)}; give a new --out (or --study) to change --objectives")
    return study, False


def _counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def run_sweep(base: Config, data_dir: str | Path, out: str | Path, *, n_trials: int = 16,
              space_path: str | Path | None = None, storage: str | None = None, study_name: str = "mobiletune",
              timeout: float | None = None, grace_period: int = 60, baseline: str | Path | None = None,
              console=None, mlflow: tracking.Mlflow | None = None,
              objectives: objectives_lib.Objectives | None = None, workers: int = 1) -> dict[str, Any]:
    """Run (or join) a study until it holds `n_trials` finished trials; then report, and test the chosen one.

    `objectives`: accuracy alone (default), or accuracy and latency, and an optional latency budget.
    `workers`: worker processes on this machine, this one included (`_helpers`).
    """
    import warnings

    with warnings.catch_warnings():  # optuna imports tqdm.auto, which warns in a notebook without ipywidgets
        warnings.filterwarnings("ignore", "IProgress not found")
        import optuna

    started = time.perf_counter()
    wanted, out = objectives or objectives_lib.Objectives(), Path(out)
    space, baseline_metrics = sweep_setup.check(out, n_trials, grace_period, workers, space_path, wanted, baseline,
                                                tracked=mlflow is not None)
    sweep_setup.prepare_folder(out, base, space, n_trials, study_name, wanted)
    say = console.print if console is not None else (lambda *a, **k: None)
    # Our own line per trial; Optuna's warning for a failed trial carries a traceback (Ctrl-C printed one),
    # and the error reaches the user once, as our one-line message
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    index, images, fine_tune_ats = _inputs(base, data_dir, space)
    study, created = open_study(out, storage, study_name, base.data.seed, grace_period, wanted.directions)
    _check_objectives(study, created, wanted)
    parent = _sweep_mlflow(mlflow, study, created, out, base, images, say)
    with parent.failing() if parent is not None else nullcontext():
        shared = Shared(base, images, fine_tune_ats, index, out / runfolder.LOGS, wanted, parent)
        if wanted.measures_latency:
            measure_sizes(study, shared, space, say)  # before the helpers start: timed on a quiet machine
        task = {"data_dir": str(data_dir), "out": str(out), "storage": storage, "study": study_name,
                "trials": n_trials, "grace_period": grace_period, "base": base.flat(), "space": space,
                "objectives": [list(wanted.names), wanted.latency_format, wanted.max_latency_ms],
                "deadline": None if timeout is None else time.time() + timeout, "parent": os.getpid()}
        counts = _counts(study)
        left = n_trials - counts.get("COMPLETE", 0) - counts.get("PRUNED", 0)
        with _helpers(min(workers - 1, left - 1), task, out, say):  # none for a study already done
            _search(study, created, shared, space, n_trials, timeout, say)
        results = _choose_and_run(study, space, base, data_dir, out, fine_tune_ats, baseline_metrics, console,
                                  parent, wanted, (started, time.perf_counter() - started), shared.trained)
    return results


def _inputs(base: Config, data_dir, space: dict[str, Any]) -> tuple[scan.FileIndex, ImageSet, list[int]]:
    """What every worker of a sweep starts from: the file index, the images, and the cut points whose
    boundaries one feature pass provides (the base recipe's and the space's). Seeds everything."""
    index = scan.FileIndex(cache.cache_root(base) / scan.INDEX_NAME)
    images = scan_images(data_dir, base, index)  # data.exclude left out, as a run does
    seed_everything(base.data.seed)
    return index, images, sorted({base.phase2.fine_tune_at, *space.get("phase2.fine_tune_at", {}).get("choices", [])})


@contextmanager
def _helpers(count: int, task: dict[str, Any], out: Path, say) -> Iterator[None]:
    """`count` more workers on this machine (`mobiletune.tuning.worker`), each running trials of the study until it
    holds its trials; choosing and making best/ stay here. A trial on a small data set is mostly Python
    (tracing, one core busy), so on flowers_mini a second worker sped a 2-core sweep up (docs/benchmarks.md).
    Their output goes to logs/worker-N.log; they are waited for, and stopped if this worker fails."""
    import subprocess
    import sys

    if count < 1:
        yield
        return
    # the task stays out of `ps` (it may hold a storage URL with a password); the package's folder goes on the
    # path, for a notebook that found mobiletune by editing sys.path
    here = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, sweep_setup.WORKER_TASK: json.dumps(task),
           "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    (out / runfolder.LOGS).mkdir(parents=True, exist_ok=True)
    started = []
    try:
        for n in range(1, count + 1):
            log = out / runfolder.LOGS / f"worker-{n}.log"
            with open(log, "w") as f:
                started.append((log, subprocess.Popen([sys.executable, "-m", "mobiletune.tuning.worker"], stdout=f,
                                                      stderr=subprocess.STDOUT, env=env)))
        say(f"{count} more worker(s) on this machine; their output: {out / runfolder.LOGS}/worker-N.log")
        yield
        for log, process in started:
            if process.wait() != 0:  # its trials are failed by heartbeat; the study was finished here regardless
                say(f"a worker stopped with exit code {process.returncode}; see {log}")
    finally:
        for _, process in started:  # this worker failed or was interrupted: the others stop too
            if process.poll() is None:
                process.terminate()
                process.wait()


def run_helper(task: dict[str, Any], say=print) -> None:
    """One helper worker (`_helpers`): trials of the study in `task` until it holds its trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # as the first worker (run_sweep)
    out, base = Path(task["out"]), from_flat(task["base"])
    names, latency_format, max_latency_ms = task["objectives"]
    wanted = objectives_lib.Objectives(tuple(names), latency_format, max_latency_ms)
    space = task["space"]
    index, images, fine_tune_ats = _inputs(base, task["data_dir"], space)
    study, _ = open_study(out, task["storage"], task["study"], base.data.seed, task["grace_period"], wanted.directions)
    shared = Shared(base, images, fine_tune_ats, index, out / runfolder.LOGS, wanted, keeps_models=False)
    timeout = None if task["deadline"] is None else max(0.0, task["deadline"] - time.time())  # the first one's clock

    def orphaned(study, trial) -> None:  # the first worker died without stopping us (SIGKILL, out of memory)
        if os.getppid() != task["parent"]:
            study.stop()

    _search(study, False, shared, space, task["trials"], timeout, say, callbacks=(orphaned,))


def _check_objectives(study, created: bool, wanted: objectives_lib.Objectives) -> None:
    """A study keeps what it optimises: its latency figures are of one format, or none were measured."""
    made = {"names": list(wanted.names), "latency_format": wanted.latency_format,
            "measures_latency": wanted.measures_latency}
    if created:
        study.set_user_attr("objectives", made)
        return
    earlier = study.user_attrs.get("objectives")
    if earlier is None:
        return  # a study from before mobiletune recorded this
    if wanted.multi and earlier["latency_format"] != wanted.latency_format:
        raise UsageError(f"--format {wanted.latency_format}: study {study.study_name!r} trades accuracy against "
                         f"{earlier['latency_format']} latency; give a new --out (or --study) to change it")
    if wanted.measures_latency and not earlier["measures_latency"]:
        raise UsageError(f"--max-latency-ms: study {study.study_name!r} measured no latency; give a new --out "
                         "(or --study) with --objectives accuracy,latency or --max-latency-ms from the start")


def _search(study, created: bool, shared: Shared, space: dict[str, Any], n_trials: int, timeout: float | None,
            say, callbacks: tuple = ()) -> None:
    """Trials until the study holds `n_trials` finished ones; the base recipe first, when it is in the space.
    `callbacks`: Optuna's, after each trial."""
    import optuna

    defaults = {k: shared.base.flat()[k] for k in space}
    if created and all(in_space(defaults[k], space[k]) for k in space):
        study.enqueue_trial(defaults, user_attrs={"note": "the base recipe"})
    say(f"study {study.study_name!r}: {len(study.trials)} trials so far; running until {n_trials} have finished")
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    if sum(t.state in finished for t in study.trials) < n_trials:
        with _heap_frozen():
            study.optimize(objective(shared, space), timeout=timeout, gc_after_trial=False,
                           callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=finished),
                                      lambda study, trial: say(_trial_line(study, trial, shared.objectives)),
                                      shared.keep_chosen, *callbacks])
    optuna.storages.fail_stale_trials(study)


@contextmanager
def _heap_frozen() -> Iterator[None]:
    """What is alive before the trials (TensorFlow, Keras, the bases, the features) left out of Python's
    garbage collections during them. A full collection scans that whole heap: Optuna's one after every
    trial took 0.4-0.5 s, more as the sweep grew (24 s of a 98-s, 48-trial flowers_mini sweep). Without
    those, and with this, the collections Python makes itself cost 3.6 s there, the sweep took 78 s, the
    trials were the same and peak RSS too (1683-1734 MB against 1718-1722)."""
    if gc.get_freeze_count():  # frozen already (by the caller, a notebook, a nested sweep): left as it is
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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
    results = {"search_seconds": round(clock[1], 1), "counts": _counts(study), "best_trial": best.number,
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

    results["best"] = run(best_config, out / "best", "best config")
    if results["best"].get("n_skipped"):  # the trials saw the same images: said once, here
        say(f"{results['best']['n_skipped']} file(s) skipped, unreadable or not images: see "
            f"{out / 'best' / runfolder.SKIPPED}")
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


def _trial_line(study, trial, wanted: objectives_lib.Objectives) -> str:
    """A finished trial on the console, with the best so far."""
    value = "-" if trial.values is None else f"{trial.values[0]:.4f}"
    line = f"trial {trial.number:>3} {trial.state.name:<8} val_accuracy {value}"
    ms = objectives_lib.latency(trial, wanted.latency_format)
    if ms is not None:
        line += f"  {ms:.2f} ms"
    if trial.duration:
        line += f"  {trial.duration.total_seconds():.0f} s"
    try:
        best = objectives_lib.choose(study, wanted)
    except UsageError:  # nothing within the latency budget yet
        best = None
    if best is not None:
        line += f"  | best {objectives_lib.accuracy(best):.4f} (trial {best.number})"
    return line + "  " + ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())


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


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
        return f"{value:.2e}"
    if isinstance(value, float):
        return f"{value:.3g}" if not math.isclose(value, round(value, 3)) else f"{round(value, 3):g}"
    return str(value)
