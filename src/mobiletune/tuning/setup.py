"""A sweep's arguments and folder, checked before anything heavy starts: `api.sweep` calls `check` before
TensorFlow's start-up (~4 s), so a typo in --trials, --space, --baseline or --out is refused at once;
`run_sweep` checks again (it may be called on its own) and `record_request` records what was asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mobiletune import runfolder
from mobiletune.config import Config
from mobiletune.errors import UsageError
from mobiletune.features import cache
from mobiletune.tuning import objectives as objectives_lib
from mobiletune.tuning.space import load_space

WORKER_TASK = "MOBILETUNE_WORKER"  # the environment variable that hands a helper worker its task (`helpers.local`)


def check(out: str | Path, n_trials: int, grace_period: int, workers: int, space_path: str | Path | None,
          wanted: objectives_lib.Objectives, baseline: str | Path | None,
          tracked: bool = False, on_ray: bool = False, timeout: float | None = None,
          ) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """The search space and the baseline run's metrics (None: the base recipe is run), or a UsageError naming
    the argument. `tracked`: the sweep logs to MLflow; `on_ray`: its trials run on a Ray cluster."""
    for name, value in (("--trials", n_trials), ("--workers", workers), ("--grace-period", grace_period)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsageError(f"{name} {value!r}: give a whole number")
    if n_trials < 1:
        raise UsageError(f"--trials {n_trials}: give at least 1")
    if timeout is not None and timeout <= 0:
        raise UsageError(f"--timeout {timeout:g}: give seconds above 0, or leave it out to run every trial")
    if grace_period < 2:
        raise UsageError(f"--grace-period {grace_period}: give at least 2 seconds")
    if workers < 1:
        raise UsageError(f"--workers {workers}: give at least 1")
    if workers > 1 and tracked:
        raise UsageError(f"--workers {workers} with MLflow tracking (--mlflow or MLFLOW_TRACKING_URI): only one "
                         "worker per machine logs to MLflow; give --workers 1, or unset the tracking URI")
    if on_ray and tracked:
        raise UsageError("--ray with MLflow tracking (--mlflow or MLFLOW_TRACKING_URI): the trial workers on the "
                         "cluster log no runs; leave out --ray, or unset the tracking URI")
    space = load_space(space_path)
    if workers > 1 and wanted.measures_latency and space.get("data.image_size", {}).get("type") == "int":
        raise UsageError(f"--workers {workers} with a data.image_size range: each size would be timed while the "
                         "other workers train; give the sizes as a list of choices, or --workers 1")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / runfolder.SWEEP_REQUEST).exists():
        raise UsageError(f"--out {out}: folder exists and is not a sweep; pick a new --out")
    return space, None if baseline is None else _read_baseline(Path(baseline))


def check_baseline(baseline: str | Path | None, metrics: dict[str, Any] | None, data_dir: str | Path,
                   classes: list[str]) -> None:
    """A --baseline run is compared with the sweep's best: it must be a run on the sweep's classes."""
    if metrics is not None and metrics.get("classes") != classes:
        raise UsageError(f"--baseline {baseline}: a run of other classes ({', '.join(metrics.get('classes') or [])}; "
                         f"{data_dir} has {', '.join(classes)}); give a run of the default recipe on {data_dir}, "
                         "or leave --baseline out to train one")


def prepare_folders(out: Path, base: Config) -> None:
    """The cache and sweep folders."""
    runfolder.make_folder(cache.cache_root(base), "features.cache_dir")
    runfolder.make_folder(out)


def record_request(out: Path, base: Config, space: dict[str, Any], n_trials: int, study_name: str,
                   wanted: objectives_lib.Objectives) -> None:
    """sweep.yaml: what the sweep was asked for (written once the study has been found to hold this sweep's)."""
    runfolder.write_text(out / runfolder.SWEEP_REQUEST, yaml.safe_dump(
        {"base_config": base.to_dict(), "space": space, "trials": n_trials, "study": study_name,
         "objectives": list(wanted.names), "latency_format": wanted.latency_format,
         "max_latency_ms": wanted.max_latency_ms}, sort_keys=False))


def _read_baseline(run: Path) -> dict[str, Any]:
    if not run.exists():
        raise UsageError(f"--baseline {run}: no such run folder; give a finished run of the default recipe "
                         "(mobiletune train), or leave --baseline out to train one")
    try:  # a run folder, or its metrics.json
        return runfolder.read_json(run) if run.is_file() else runfolder.read_metrics(run)
    except UsageError as exc:
        raise UsageError(f"--baseline: {exc}") from None
