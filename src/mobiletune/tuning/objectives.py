"""What a sweep optimises and how it picks: validation accuracy alone, or accuracy against the
measured latency of the shipped model, within an optional latency budget.

With two objectives the study is multi-objective (Optuna's TPE in its multi-objective mode) and
its result is a Pareto front: no point on it is both slower and less accurate than another.
Optuna cannot prune multi-objective trials (`Trial.report` is single-objective only), so they
are pruned here by the same rule as Optuna's MedianPruner, applied among trials of the same
input size: those share one latency, so the one that is less accurate is simply worse.

A study's latency figures are measured once per input size and format, by the first worker that
needs them, and kept in the study: workers on other machines use them too, so every trial of a
shared study is compared on one host, the one every report names.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from mobiletune.errors import UsageError
from mobiletune.ship import latency as latency_lib
from mobiletune.ship.latency import FORMATS

NAMES = ("accuracy", "latency")
# MedianPruner's settings in the study (open_study): no pruning before this many finished trials
# (here: of the same size) nor before this epoch index
PRUNE_AFTER_TRIALS = 3
PRUNE_AFTER_STEP = 2


@dataclass(frozen=True)
class Objectives:
    names: tuple[str, ...] = ("accuracy",)  # "accuracy" first; "latency" makes the study multi-objective
    latency_format: str = "tflite"  # the export whose batch-1 latency counts: tflite (float) or tflite-int8
    max_latency_ms: float | None = None  # the budget: pick the most accurate trial at or under it

    @property
    def multi(self) -> bool:
        return "latency" in self.names

    @property
    def measures_latency(self) -> bool:
        return self.multi or self.max_latency_ms is not None

    @property
    def directions(self) -> list[str]:
        return ["maximize", "minimize"] if self.multi else ["maximize"]


def parse(objectives: str = "accuracy", latency_format: str = "tflite",
          max_latency_ms: float | None = None) -> Objectives:
    """`--objectives accuracy[,latency]`, `--format`, `--max-latency-ms`, checked."""
    names = tuple(dict.fromkeys(n.strip() for n in objectives.split(",") if n.strip()))
    unknown = [n for n in names if n not in NAMES]
    if unknown or "accuracy" not in names:
        raise UsageError(f"--objectives {objectives}: give accuracy or accuracy,latency")
    if latency_format not in FORMATS:
        raise UsageError(f"--format {latency_format}: latency is measured for {' or '.join(FORMATS)}")
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise UsageError(f"--max-latency-ms {max_latency_ms:g}: give a positive number of milliseconds")
    return Objectives(tuple(sorted(names, key=NAMES.index)), latency_format, max_latency_ms)


def accuracy(trial) -> float:
    """A finished trial's validation accuracy, in single- and multi-objective studies alike."""
    return trial.values[0]


def latency(trial, fmt: str) -> float | None:
    return trial.user_attrs.get(attr(fmt))


def attr(fmt: str) -> str:
    """The trial attribute that holds its latency in `fmt`."""
    return f"latency_ms_{fmt.replace('-', '_')}"


def study_key(config, fmt: str) -> str:
    """The study attribute that holds the latency of `config`'s model (input size, width) in `fmt`:
    {"ms": ..., "host": ...}."""
    return f"latency:{config.data.image_size}px:alpha {config.model.alpha:g}:{fmt}"


def hosts(study) -> str:
    """The host(s) the study's latency figures were measured on, for every place that shows them: the
    study's figures, and its trials' own (a study begun before figures were kept in it)."""
    found = {v["host"] for k, v in study.user_attrs.items() if k.startswith("latency:")}
    found |= {t.user_attrs["latency_host"] for t in study.get_trials(deepcopy=False) if "latency_host" in t.user_attrs}
    return " and ".join(sorted(found)) if found else latency_lib.host()


def front(study, objectives: Objectives) -> list:
    """The Pareto front, fastest first (multi-objective); empty for an accuracy-only study."""
    if not objectives.multi:
        return []
    return sorted(study.best_trials, key=lambda t: (t.values[1], -t.values[0]))


def choose(study, objectives: Objectives):
    """The trial for best/: the most accurate within the budget, if there is one; on a tie the faster, then
    the earlier trial."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if objectives.max_latency_ms is not None:
        fmt, budget = objectives.latency_format, objectives.max_latency_ms
        within = [t for t in complete if latency(t, fmt) is not None and latency(t, fmt) <= budget]
        if not within:
            fastest = min(complete, key=lambda t: latency(t, fmt) or float("inf"), default=None)
            hint = (f"; the fastest finished trial ({fastest.number}) takes {latency(fastest, fmt):.2f} ms"
                    if fastest is not None and latency(fastest, fmt) is not None else "")
            raise UsageError(f"--max-latency-ms {budget:g}: no finished trial is within it ({fmt}){hint}; "
                             "raise the budget, or add smaller sizes to the space")
        complete = within
    if not complete:
        return None
    fmt = objectives.latency_format
    return max(complete, key=lambda t: (accuracy(t), -(latency(t, fmt) or 0.0)))


def below_same_size_median(study, trial, step: int, value: float, size: int) -> bool:
    """MedianPruner's rule, among finished trials of the same input size: prune when this trial's best
    validation accuracy so far is below the median of theirs at the same epoch."""
    if step < PRUNE_AFTER_STEP:
        return False
    peers = [t.user_attrs["val_curve"][step] for t in study.get_trials(deepcopy=False)
             if t.state.name == "COMPLETE" and t.number != trial.number
             and t.params.get("data.image_size", size) == size and len(t.user_attrs.get("val_curve", [])) > step]
    if len(peers) < PRUNE_AFTER_TRIALS:
        return False
    best_so_far = max([*trial.user_attrs.get("val_curve", [])[:step], value])
    return best_so_far < statistics.median(peers)


def summary(trial, objectives: Objectives) -> dict[str, Any]:
    """A trial as sweep.json lists the front and the choice."""
    return {"trial": trial.number, "val_accuracy": accuracy(trial),
            **{attr(f): latency(trial, f) for f in FORMATS if latency(trial, f) is not None},
            "params": trial.params}
