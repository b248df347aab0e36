"""One worker's part of a sweep: open (or join) the study, and run trials until it holds its count.

Every worker runs this: the one `mobiletune sweep` starts (`study.run_sweep`), the helper processes beside it
on this machine and the trial workers on a Ray cluster (`helpers`). What they share is the study in its
storage; what each needs besides (the images, the cut points) it works out from the same task.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mobiletune import runfolder
from mobiletune.config import Config, from_flat
from mobiletune.data import scan
from mobiletune.data.images import ImageSet
from mobiletune.errors import UsageError
from mobiletune.features import cache
from mobiletune.training.inputs import scan_images
from mobiletune.training.loop import seed_everything
from mobiletune.tuning import objectives as objectives_lib
from mobiletune.tuning.space import in_space
from mobiletune.tuning.trials import Shared, objective


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


def counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


# the trial states that count towards a study's total (`finished`, and where the sweep stops)
FINISHED = ("COMPLETE", "PRUNED")


def finished(study) -> int:
    """The trials that count towards a study's total: completed or pruned."""
    done = counts(study)
    return sum(done.get(state, 0) for state in FINISHED)


def inputs(base: Config, data_dir, space: dict[str, Any]) -> tuple[scan.FileIndex, ImageSet, list[int]]:
    """What every worker of a sweep starts from: the file index, the images, and the cut points whose
    boundaries one feature pass provides (the base recipe's and the space's). Seeds everything."""
    index = scan.FileIndex(cache.cache_root(base) / scan.INDEX_NAME)
    images = scan_images(data_dir, base, index)  # data.exclude left out, as a run does
    seed_everything(base.data.seed)
    return index, images, sorted({base.phase2.fine_tune_at, *space.get("phase2.fine_tune_at", {}).get("choices", [])})


def check_objectives(study, created: bool, wanted: objectives_lib.Objectives) -> None:
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


IRRELEVANT = ("features.cache_dir", "features.engine", "data.strict", "data.audit", "data.exclude", "predict.")  # keys
# (and prefixes) that change where or how a trial's numbers are computed, or what the chosen run says of unknown
# inputs afterwards, not the trials' numbers


def check_inputs(study, created: bool, base: Config, space: dict[str, Any], images: ImageSet) -> None:
    """A study's trials compare only on one set of images, one recipe around the space and one space: a study
    continued with another space, other settings or other images is refused, naming what differs, before a trial
    mixes them in. A study with no finished trial yet takes the new ones."""
    made = json.loads(json.dumps({  # as the storage hands it back: tuples as lists
        "data": images.digest(), "images": len(images.labels), "classes": len(images.classes), "space": space,
        "base": {k: v for k, v in base.flat().items() if not k.startswith(IRRELEVANT)}}))
    earlier = None if created else study.user_attrs.get("inputs")
    if earlier is None or not finished(study):  # new, from before mobiletune recorded this, or nothing to mix with
        study.set_user_attr("inputs", made)
        return
    again = "continue it with those, or give a new --out (or --study) for these"
    if earlier["space"] != made["space"]:
        raise UsageError(f"study {study.study_name!r} searched another --space; {again}")
    changed = [f"{k}={earlier['base'][k]!r} (now {v!r})" for k, v in made["base"].items()
               if k in earlier["base"] and k not in space and earlier["base"][k] != v]  # keys both versions know
    if changed:
        raise UsageError(f"study {study.study_name!r} ran its trials with {', '.join(changed[:3])}; {again}")
    if earlier["data"] != made["data"]:
        raise UsageError(f"study {study.study_name!r} ran its trials on other images or another split of them "
                         f"({earlier['images']} of {earlier['classes']} classes; these: {made['images']} of "
                         f"{made['classes']}); {again}")


def begin(study, created: bool, base: Config, space: dict[str, Any], n_trials: int, say) -> None:
    """The base recipe queued as the first trial of a study just made, when it is in the space; said how far
    the study is."""
    flat, plain = base.flat(), Config().flat()
    defaults = {k: flat[k] for k in space}
    if created and all(in_space(defaults[k], space[k]) for k in space):
        study.enqueue_trial(defaults, user_attrs={"note": "the base recipe"})
    mine = [f"{k}={v}" for k, v in defaults.items() if v != plain[k]]  # given by --set or --config
    if mine:
        say(f"note: the space searches {', '.join(k.partition('=')[0] for k in mine)}: {', '.join(mine)} (from "
            "--set or --config) is only the first trial's, the base recipe's; the other trials draw from the space")
    states = counts(study)
    others = states.get("FAIL", 0) + states.get("RUNNING", 0)  # failed, or a killed worker's (failed when stale)
    say(f"study {study.study_name!r}: {finished(study)} trial(s) finished so far" + (
        f" ({others} failed or left unfinished)" if others else "") + f"; running until {n_trials} have finished")


def search(study, created: bool, shared: Shared, space: dict[str, Any], n_trials: int, timeout: float | None,
           say, callbacks: tuple = ()) -> None:
    """Trials until the study holds `n_trials` finished ones; the base recipe first, when it is in the space.
    `callbacks`: Optuna's, after each trial."""
    import optuna

    begin(study, created, shared.base, space, n_trials, say)
    if finished(study) < n_trials:
        with heap_frozen():
            study.optimize(objective(shared, space), timeout=timeout, gc_after_trial=False,
                           callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=tuple(
                               optuna.trial.TrialState[state] for state in FINISHED)),
                                      lambda study, trial: say(trial_line(study, trial, shared.objectives)),
                                      shared.keep_chosen, *callbacks])
    optuna.storages.fail_stale_trials(study)


@contextmanager
def heap_frozen() -> Iterator[None]:
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


def trial_line(study, trial, wanted: objectives_lib.Objectives) -> str:
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


def run_helper(task: dict[str, Any], say=print, node: str | None = None) -> None:
    """One helper worker (`helpers`): trials of the study in `task` until it holds its trials. `node`: the Ray
    node it runs on, recorded with each trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # as the first worker (run_sweep)
    out, base = Path(task["out"]), from_flat(task["base"])
    names, latency_format, max_latency_ms = task["objectives"]
    wanted = objectives_lib.Objectives(tuple(names), latency_format, max_latency_ms)
    space = task["space"]
    # on a Ray node of its own, a cache folder of its own: made here, as the first worker made its own
    runfolder.make_folder(cache.cache_root(base), "features.cache_dir")
    index, images, fine_tune_ats = inputs(base, task["data_dir"], space)
    study, _ = open_study(out, task["storage"], task["study"], base.data.seed, task["grace_period"], wanted.directions)
    shared = Shared(base, images, fine_tune_ats, index, out / runfolder.LOGS, wanted, keeps_models=False,
                    node=node)
    timeout = None if task["deadline"] is None else max(0.0, task["deadline"] - time.time())  # the first one's clock

    def orphaned(study, trial) -> None:  # the first worker died without stopping us (SIGKILL, out of memory)
        if task["parent"] is not None and os.getppid() != task["parent"]:  # None: Ray stops a lost driver's tasks
            study.stop()

    search(study, False, shared, space, task["trials"], timeout, say, callbacks=(orphaned,))


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
        return f"{value:.2e}"
    if isinstance(value, float):
        return f"{value:.3g}" if not math.isclose(value, round(value, 3)) else f"{round(value, 3):g}"
    return str(value)
