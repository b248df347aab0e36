"""Never lose a run: a checkpoint after every epoch, resume after kill -9, a clean Ctrl-C.

The checkpoint is one file, `checkpoint.npz`, written whole and renamed into place, so a kill
at any moment leaves the previous checkpoint or the new one, never half of one. It holds every
variable of the model (weights and the random-generator states of dropout and augmentation),
the optimizer's variables, and the run's progress (completed epochs, history, the test
predictions before fine-tuning). The data order of epoch e depends on (seed, e) alone, so with
deterministic ops a resumed run ends exactly where an unbroken one would.
"""

from __future__ import annotations

import io
import json
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from mobiletune.errors import MobiletuneError
from mobiletune.runfolder import atomic_write_bytes

FILE_NAME = "checkpoint.npz"


class Interrupted(MobiletuneError):
    """Ctrl-C: training stopped after the current batch; the last epoch's checkpoint is kept."""

    exit_code = 130


@dataclass
class Checkpoint:
    epoch: int  # epochs completed, counted over both phases
    history: list[dict[str, Any]]
    model_variables: list[np.ndarray]
    optimizer_variables: list[np.ndarray]
    test_probs: dict[str, np.ndarray] = field(default_factory=dict)  # "test_probs_1": test probabilities after
    # phase 1, so a resumed run does not evaluate a finished phase again


def save(run: Path, checkpoint: Checkpoint) -> None:
    arrays = {f"m{i}": v for i, v in enumerate(checkpoint.model_variables)}
    arrays.update({f"o{i}": v for i, v in enumerate(checkpoint.optimizer_variables)})
    state = {"epoch": checkpoint.epoch, "history": checkpoint.history,
             "n_model": len(checkpoint.model_variables), "n_optimizer": len(checkpoint.optimizer_variables)}
    arrays.update({f"x_{k}": np.asarray(v) for k, v in checkpoint.test_probs.items()})
    arrays["state"] = np.frombuffer(json.dumps(state).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(run / FILE_NAME, buf.getvalue())


def load(run: Path) -> Checkpoint | None:
    path = run / FILE_NAME
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            state = json.loads(bytes(f["state"]).decode())
            test_probs = {k[2:]: f[k] for k in f.files if k.startswith("x_")}
            return Checkpoint(state["epoch"], state["history"], [f[f"m{i}"] for i in range(state["n_model"])],
                              [f[f"o{i}"] for i in range(state["n_optimizer"])], test_probs)
    except (OSError, ValueError, KeyError) as exc:
        raise MobiletuneError(f"{path}: damaged checkpoint ({exc}); delete it to restart the run") from None


def model_variables(model: keras.Model) -> list:
    """Every variable whose value shapes what comes next: weights, BN statistics, RNG states."""
    return list(model.variables)


def restore_model(model: keras.Model, values: list[np.ndarray]) -> None:
    variables = model_variables(model)
    assert len(variables) == len(values), (len(variables), len(values))
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)


def restore_optimizer(trainee: keras.Model, values: list[np.ndarray]) -> None:
    """Give a freshly compiled trainee's optimizer the saved slots (iterations, RMS averages)."""
    optimizer = trainee.optimizer
    optimizer.build(trainee.trainable_variables)
    assert len(optimizer.variables) == len(values), (len(optimizer.variables), len(values))
    for variable, value in zip(optimizer.variables, values, strict=True):
        variable.assign(value)


class Interrupt:
    """Ctrl-C sets a flag; training stops after the current batch instead of mid-step."""

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def handling(self):
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.requested:  # a second Ctrl-C: the user means it
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.requested = True

        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread (e.g. a test runner's worker): no handler, no harm
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


class EpochCheckpoint(keras.callbacks.Callback):
    """After every completed epoch: save the model, the trainee's optimizer and the progress."""

    def __init__(self, run: Path, model: keras.Model, rows: list[dict[str, Any]], test_probs: dict[str, np.ndarray],
                 interrupt: Interrupt):
        super().__init__()
        self.run, self.full_model, self.rows, self.interrupt = run, model, rows, interrupt
        self.test_probs = test_probs

    def on_train_batch_end(self, batch, logs=None):
        if self.interrupt.requested:
            self.model.stop_training = True  # Keras finishes this batch, then leaves the epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.interrupt.requested:
            return  # a partial epoch: keep the previous checkpoint
        save(self.run, Checkpoint(
            epoch=epoch + 1, history=list(self.rows),
            model_variables=[keras.ops.convert_to_numpy(v) for v in model_variables(self.full_model)],
            optimizer_variables=[keras.ops.convert_to_numpy(v) for v in self.model.optimizer.variables],
            test_probs=dict(self.test_probs)))
