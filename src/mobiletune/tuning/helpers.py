"""Trial workers besides the one `mobiletune sweep` started: processes on this machine (`--workers N`), or
tasks on a Ray cluster's nodes (`--ray ADDRESS --workers N`). All of them run `search.run_helper` on the same
study; choosing and making best/ stay with the sweep that started them.

On Ray the study stays the one Optuna storage every worker opens (SQLite in the sweep folder, or a shared
PostgreSQL URL), rather than Ray Tune's `OptunaSearch`: that searcher replaces the study's pruner with Tune's
schedulers, while the workers here keep MedianPruner, the heartbeats that fail a dead worker's trial, and a
study a rerun (with or without Ray) carries on. On more than one machine: DATA_DIR at the same path on every node,
and the study in a PostgreSQL `--storage` (an SQLite file must not be shared over a network file system); the
feature cache may be each node's own disk (each node computes the features its trials use once).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mobiletune import runfolder
from mobiletune.errors import MobiletuneError
from mobiletune.features import cluster as cluster_lib
from mobiletune.tuning import objectives as objectives_lib
from mobiletune.tuning import setup as sweep_setup
from mobiletune.tuning.search import finished, run_helper, trial_line

POLL_SECONDS = 2.0  # how often the sweep looks for finished trials and lost workers while the cluster works


@contextmanager
def local(count: int, task: dict[str, Any], out: Path, say) -> Iterator[None]:
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


def on_ray(count: int, task: dict[str, Any], study, wanted: objectives_lib.Objectives, say) -> None:
    """`count` trial workers as Ray tasks of one CPU each, spread over the cluster's nodes, until the study
    holds its trials; each finished trial said here as it lands in the study. A worker lost with its node costs
    its running trial (failed at once, not after the grace period); the others carry on. Every worker lost
    before the study is done is an error: rerunning the command carries on the study."""
    ray = cluster_lib.import_ray()
    if count < 1:
        return
    worker = ray.remote(_trial_worker).options(num_cpus=1, max_retries=0, scheduling_strategy="SPREAD")
    running = [worker.remote(task) for _ in range(count)]
    say(f"{count} trial worker(s) on the Ray cluster; their output: the cluster's logs (`ray logs`)")
    said = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    lost: list[str] = []
    try:
        while running:
            done, running = ray.wait(running, num_returns=len(running), timeout=POLL_SECONDS)
            for ref in done:
                reason = _stopped(ray, ref)
                if reason is not None:
                    lost.append(reason)
                    say(f"a trial worker stopped ({reason}); {len(running)} go on")
            if lost:
                _fail_dead_nodes(ray, study)
            for trial in study.get_trials(deepcopy=False):
                if trial.state.is_finished() and trial.number not in said:
                    said.add(trial.number)
                    say(trial_line(study, trial, wanted))
    finally:
        for ref in running:  # interrupted: the cluster's CPUs are freed now, not when Ray notices we left
            ray.cancel(ref, force=True)
    if lost:  # a task can end before Ray marks its node dead: its trial is failed once Ray has
        _await_dead_nodes(ray, study)
    if lost and finished(study) < task["trials"]:
        raise MobiletuneError(f"--ray: every trial worker stopped before the study had {task['trials']} trials "
                              f"(last: {lost[-1]}); run the same command again to carry on the study")


def _trial_worker(task: dict[str, Any]) -> None:
    """A Ray task: one trial worker (TensorFlow started quietly, as `mobiletune.tuning.worker` does)."""
    import ray

    from mobiletune.quiet import import_tensorflow

    import_tensorflow()
    run_helper(task, say=lambda *a, **k: print(*a, flush=True), node=ray.get_runtime_context().get_node_id())


def _stopped(ray, ref) -> str | None:
    """Why a trial worker's task ended, in one line; None: it ran until the study was done."""
    try:
        ray.get(ref)
    except ray.exceptions.RayTaskError as exc:  # raised inside the worker: our own errors keep their message
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        message = (str(cause).splitlines() or [""])[0][:200]
        return message if isinstance(cause, MobiletuneError) else f"{type(cause).__name__}: {message}"
    except ray.exceptions.RayError as exc:  # its node or process died
        return f"lost: {type(exc).__name__}"
    return None


def _fail_dead_nodes(ray, study) -> None:
    """Trials still running on a node the cluster has marked dead are failed now: their worker is gone."""
    import optuna

    dead = {node["NodeID"] for node in ray.nodes() if not node["Alive"]}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.user_attrs.get("node") in dead:
            try:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            except ValueError:  # finished meanwhile (failed by a worker's stale-trial check)
                pass


def _await_dead_nodes(ray, study, seconds: float = 60.0) -> None:
    """Trials still running on this cluster's nodes once every worker has stopped: failed as Ray marks their
    nodes dead (its health check takes up to ~30 s by default), waited for at most `seconds`."""
    import optuna

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        _fail_dead_nodes(ray, study)
        nodes = {node["NodeID"] for node in ray.nodes()}
        if not any(t.user_attrs.get("node") in nodes
                   for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))):
            return
        time.sleep(POLL_SECONDS / 4)
