"""Where a run's numbers go besides its folder: TensorBoard event files (always) and an MLflow run
(with `--mlflow URI` or MLFLOW_TRACKING_URI).

TensorBoard: RUN/logs/train and RUN/logs/validation as Keras' own TensorBoard callback writes them
(per-epoch loss, accuracy, learning rate, and the phase, so the start of fine-tuning shows), plus
RUN/logs/test with the test loss and accuracy at the last epoch of each phase.

MLflow: one run per mobiletune run (a sweep: a parent run, one nested run per trial, and the best
and default runs): the resolved config as params, per-epoch metrics with the epoch of
history.csv as step, the before/after test metrics, the run folder as artifacts, and the data and
weights digests as tags. Tracking is never worth a run: if the server cannot be reached, or fails
mid-run, the run goes on and finishes, and says once that tracking stopped.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from mobiletune.errors import Interrupted, UsageError

EXPERIMENT = "mobiletune"  # the MLflow experiment when MLFLOW_EXPERIMENT_NAME does not name one
INSTALL = "pip install 'mobiletune[mlflow]'"
# A server that is down should cost seconds, not the minutes of MLflow's default retries (7, with
# backoff) and timeout (120 s); and the run's link is ours to print, once, after the results (MLflow
# prints one for every run it ends, trials included). A user's own settings win, and these hold only
# during our own calls (`_our_settings`): a notebook's other MLflow code keeps MLflow's defaults.
MLFLOW_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


# ---------------------------------------------------------------------------------------------
# TensorBoard


class _TensorBoard(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback, per-epoch scalars only (no graph, no profiling: cheap), with the phase
    among them, flushed after every epoch: a pruned trial or a killed run keeps the epochs it finished
    (Keras closes its writers only when a fit ends normally)."""

    def __init__(self, log_dir: Path, phase: int):
        super().__init__(log_dir=str(log_dir), write_graph=False, profile_batch=0)
        self.phase = phase

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, {**(logs or {}), "phase": self.phase})
        for writer in self._writers.values():
            writer.flush()


def write_test_scalars(log_dir: Path, points: dict[int, dict[str, float]]) -> None:
    """{epoch index: {"loss": .., "accuracy": ..}} into log_dir/test, beside train/ and validation/, under
    the same tags, so TensorBoard draws the test points on the training curves."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(str(log_dir / "test"))
    with writer.as_default():
        for step, values in points.items():
            for name, value in values.items():
                tf.summary.scalar(f"epoch_{name}", value, step=step)
    writer.close()


# ---------------------------------------------------------------------------------------------
# MLflow


@dataclass(frozen=True)
class Mlflow:
    """Where to log: a tracking URI, and the parent run for nested runs (a sweep's trials, best and default runs)."""

    uri: str
    parent_run_id: str | None = None


def mlflow_target(uri: str | None) -> Mlflow | None:
    """`--mlflow URI`, else MLFLOW_TRACKING_URI, else no MLflow; a usage error when mlflow is missing."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        return None
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UsageError(f"MLflow tracking ({uri}) needs the mlflow package: {INSTALL}") from None
    return Mlflow(uri)


class MlflowRun:
    """One MLflow run, logged to as the recipe goes. The first failure switches it off with one line."""

    def __init__(self, client, run_id: str | None, say: Callable[[str], None], uri: str):
        self.client, self.run_id, self.say, self.uri = client, run_id, say, uri
        self.link = ""  # where to see the run, once it has started
        self.failed = False  # tracking stopped on an error (said once); the run itself went on

    @classmethod
    def start(cls, target: Mlflow, name: str, say: Callable[[str], None], *, params: dict[str, Any] | None = None,
              tags: dict[str, str] | None = None, run_id: str | None = None) -> MlflowRun:
        """A new run (nested under `target.parent_run_id`), or `run_id` continued (a resumed run)."""
        from mlflow import MlflowClient

        run = cls(None, None, say, target.uri)
        with run._guard():
            run.client = MlflowClient(tracking_uri=target.uri)  # opens the store: a bad URI fails here
            if run_id is not None:
                run.client.update_run(run_id, status="RUNNING")
                run.run_id, experiment_id = run_id, run.client.get_run(run_id).info.experiment_id
            else:
                experiment_id = _experiment_id(run.client, os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
                nested = {"mlflow.parentRunId": target.parent_run_id} if target.parent_run_id else {}
                created = run.client.create_run(experiment_id, run_name=name, tags={**(tags or {}), **nested})
                run.run_id = created.info.run_id
                run.log_params(params or {})
            web = target.uri.startswith(("http://", "https://"))
            if run.active:  # log_params may have switched it off
                run.link = (f"{target.uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run.run_id}" if web
                            else f"run {run.run_id} in {target.uri}")
        return run

    @property
    def active(self) -> bool:
        return self.run_id is not None

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            with _our_settings():
                yield
        except Exception as exc:  # noqa: BLE001 - a tracking server fails in many ways; none may stop a run
            if not self.failed:
                first = _reason(exc)
                self.say(f"MLflow tracking at {self.uri} stopped ({first}); the run goes on, and everything is in "
                         "its folder")
            self.run_id, self.client, self.link, self.failed = None, None, "", True

    def _log_batch(self, **batch) -> None:
        # synchronous even with MLflow's async logging on (a notebook's setting): its errors then reach
        # `_guard`, and our retry settings (`_our_settings`) hold while it talks to the server
        self._call(lambda: self.client.log_batch(self.run_id, synchronous=True, **batch))

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per request
            self._log_batch(params=items[i:i + 100])

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
        self._log_batch(metrics=metrics)

    def log_folder(self, folder: Path) -> None:
        self._call(lambda: self.client.log_artifacts(self.run_id, str(folder)))

    def log_files(self, paths: list[Path]) -> None:
        for path in paths:
            self._call(lambda path=path: self.client.log_artifact(self.run_id, str(path)))

    def end(self, status: str = "FINISHED") -> None:
        self._call(lambda: self.client.set_terminated(self.run_id, status=status))
        self.run_id = None

    def _call(self, fn: Callable[[], Any]) -> None:
        if not self.active:
            return
        with self._guard():
            fn()

    @contextmanager
    def failing(self, stopped: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
        """Around work that is tracked: an error ends the run as FAILED, a stop on purpose (Ctrl-C, or a
        `stopped` exception: a pruned trial) as KILLED, instead of leaving it RUNNING for ever."""
        try:
            yield
        except BaseException as exc:
            self.end("KILLED" if isinstance(exc, (KeyboardInterrupt, Interrupted, *stopped)) else "FAILED")
            raise

    def epoch_callback(self, phase: int) -> keras.callbacks.Callback:
        return _EpochsToMlflow(self, phase)


@contextmanager
def _our_settings() -> Iterator[None]:
    """MLFLOW_DEFAULTS in the environment, where the user set none, for the duration of one of our calls."""
    added = [key for key in MLFLOW_DEFAULTS if key not in os.environ]
    os.environ.update({key: MLFLOW_DEFAULTS[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _experiment_id(client, name: str) -> str:
    """The experiment's id, made if missing; another process making it at the same moment is no error."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        return client.get_experiment_by_name(name).experiment_id


class _EpochsToMlflow(keras.callbacks.Callback):
    """Each epoch's loss, accuracy, validation figures, learning rate and phase, stepped by the epoch
    number of history.csv (1-based)."""

    def __init__(self, run: MlflowRun, phase: int):
        super().__init__()
        self.run, self.phase = run, phase

    def on_epoch_end(self, epoch, logs=None):
        values = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        values.update(phase=self.phase,
                      learning_rate=float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
        self.run.log_metrics(values, step=epoch + 1)


# ---------------------------------------------------------------------------------------------
# One run's tracking


class Tracking:
    """A run's tracking: TensorBoard events in `log_dir`, and an MLflow run when one is asked for."""

    def __init__(self, log_dir: Path, mlflow: MlflowRun | None = None):
        self.log_dir, self.mlflow = log_dir, mlflow

    @classmethod
    def for_run(cls, out: Path, target: Mlflow | None, params: dict[str, Any], tags: dict[str, str],
                say: Callable[[str], None], resuming: bool) -> Tracking:
        """A run folder's tracking. Its MLflow run id is kept in run.json, so `--resume` logs on to the same run."""
        from mobiletune import runfolder

        info = runfolder.read_json(out / runfolder.RUN_INFO)
        earlier = info.get("mlflow") or {}
        if target is None and resuming and earlier.get("uri"):
            target = mlflow_target(earlier["uri"])  # the interrupted run was tracked: so is the rest of it
        if target is None:
            return cls(out / runfolder.LOGS)
        same = resuming and earlier.get("uri") == target.uri
        run = MlflowRun.start(target, out.name, say, params=params, tags=tags,
                              run_id=earlier.get("run_id") if same else None)
        if run.active and not same:
            runfolder.write_json(out / runfolder.RUN_INFO, {**info, "mlflow": {"uri": target.uri,
                                                                               "run_id": run.run_id}})
        return cls(out / runfolder.LOGS, run)

    def callbacks(self, phase: int) -> list[keras.callbacks.Callback]:
        """What a phase's fit reports to. TensorBoard's callback is made per fit: it closes its writers at the end."""
        found: list[keras.callbacks.Callback] = [_TensorBoard(self.log_dir, phase)]
        if self.mlflow is not None and self.mlflow.active:
            found.append(self.mlflow.epoch_callback(phase))
        return found

    def replay(self, logs: Path, history: list[dict[str, Any]], lrs: dict[int, float]) -> None:
        """Epochs trained elsewhere (a sweep trial, tracked in `logs`) as if trained here: its TensorBoard
        events copied, and each epoch to MLflow as `_EpochsToMlflow` sends it (`lrs`: each phase's rate)."""
        if logs.is_dir():
            shutil.copytree(logs, self.log_dir, dirs_exist_ok=True)
        if self.mlflow is not None and self.mlflow.active:
            for row in history:
                values = {k: float(row[k]) for k in ("loss", "accuracy", "val_loss", "val_accuracy")}
                self.mlflow.log_metrics({**values, "phase": row["phase"], "learning_rate": lrs[row["phase"]]},
                                        step=row["epoch"])

    def finish(self, metrics: dict[str, Any], epochs: tuple[int, int], folder: Path) -> None:
        """The test metrics before and after fine-tuning (TensorBoard at the last epoch of each phase) and,
        for MLflow, the run folder as artifacts; then the MLflow run ends."""
        stages = {"before": metrics["before_fine_tuning"]["test"], "after": metrics["after_fine_tuning"]["test"]}
        points = {epochs[0] - 1: _loss_accuracy(stages["before"]), sum(epochs) - 1: _loss_accuracy(stages["after"])}
        write_test_scalars(self.log_dir, {step: p for step, p in points.items() if step >= 0})
        if self.mlflow is not None:
            self.mlflow.log_metrics({f"test_{k}_{stage}": v for stage, m in stages.items()
                                     for k, v in _loss_accuracy(m).items()})
            self.mlflow.log_folder(folder)
            self.mlflow.end()

    @property
    def link(self) -> str:
        """Where the MLflow run can be seen ("" without one, or once tracking stopped)."""
        return self.mlflow.link if self.mlflow is not None else ""

    def failing(self, stopped: tuple[type[BaseException], ...] = ()):
        """Around the training: `MlflowRun.failing` for the MLflow run, if there is one."""
        return self.mlflow.failing(stopped) if self.mlflow is not None else nullcontext()


def _reason(exc: Exception) -> str:
    """An MLflow error in a few words: its messages quote whole requests."""
    text = str(exc).strip()
    if any(sign in text for sign in ("Max retries exceeded", "Connection refused", "Failed to establish")):
        return "cannot reach the server"
    return text.splitlines()[0][:160] if text else type(exc).__name__


def _loss_accuracy(test: dict[str, Any]) -> dict[str, float]:
    return {"loss": float(test["loss"]), "accuracy": float(test["accuracy"])}
