"""Never lose a run: a checkpoint after every epoch, resume after kill -9, a clean Ctrl-C.

The checkpoint is one file, `checkpoint.npz`, written whole and renamed into place, so a kill at any moment
leaves the previous checkpoint or the new one, never half of one. It holds the run state (`RunState`: the
history and the test predictions so far), every variable of the classifier (weights and the random-generator
states of dropout and augmentation) and the optimizer's, each under its path: a model that differs from the
one saved is refused by name instead of being filled by position. The data order of epoch e depends on
(seed, e) alone, so with deterministic ops a resumed run ends exactly where an unbroken one would.
"""

from __future__ import annotations

import io
import json
import signal
from contextlib import contextmanager
from pathlib import Path

import keras
import numpy as np

from mobiletune import runfolder
from mobiletune.errors import MobiletuneError
from mobiletune.training.state import RunState

MODEL, OPTIMIZER, TEST = "model/", "optimizer/", "test_probs/"  # the key prefixes in the file


def variable_paths(model: keras.Model) -> dict[str, keras.Variable]:
    """Every variable whose value shapes what comes next (weights, BatchNorm statistics, random-generator
    states) by its path of layer names: `augment/flip/seed_generator_state`, `mobilenetv2/Conv1/kernel`.
    Keras' own `Variable.path` numbers generators and optimizers in creation order, which differs between
    the process that saved and the one that resumes."""
    found: dict[str, keras.Variable] = {}

    def walk(layer: keras.layers.Layer, prefix: str) -> None:
        if isinstance(layer, keras.Model):
            for inner in layer.layers:
                walk(inner, f"{prefix}{inner.name}/")
            return
        for variable in layer.variables:
            assert prefix + variable.name not in found, prefix + variable.name
            found[prefix + variable.name] = variable

    walk(model, "")
    return found


def optimizer_paths(optimizer: keras.optimizers.Optimizer) -> dict[str, keras.Variable]:
    """The optimizer's variables by name (`iteration`, `logits_kernel_velocity`, ...)."""
    return {variable.name: variable for variable in optimizer.variables}


def save(run: Path, state: RunState, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
    arrays = {MODEL + k: keras.ops.convert_to_numpy(v) for k, v in variable_paths(model).items()}
    arrays.update({OPTIMIZER + k: keras.ops.convert_to_numpy(v) for k, v in optimizer_paths(optimizer).items()})
    arrays.update({f"{TEST}{phase}": np.asarray(p) for phase, p in state.test_probs.items()})
    arrays["state"] = np.frombuffer(json.dumps({"history": state.history}).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    runfolder.atomic_write_bytes(run / runfolder.CHECKPOINT, buf.getvalue())


def load(run: Path) -> tuple[RunState, dict[str, np.ndarray]] | None:
    """The saved state (its optimizer variables included) and the classifier's variables by path, or None."""
    path = run / runfolder.CHECKPOINT
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            saved = json.loads(bytes(f["state"]).decode())
            part = {prefix: {k[len(prefix):]: f[k] for k in f.files if k.startswith(prefix)}
                    for prefix in (MODEL, OPTIMIZER, TEST)}
    except (OSError, ValueError, KeyError) as exc:
        raise MobiletuneError(f"{path}: damaged checkpoint ({exc}); delete it to restart the run") from None
    if not part[MODEL]:
        raise MobiletuneError(f"{path}: made by another version of mobiletune; delete it to restart the run")
    test_probs = {int(phase): p for phase, p in part[TEST].items()}
    return RunState(saved["history"], test_probs, part[OPTIMIZER] or None), part[MODEL]


def restore(variables: dict[str, keras.Variable], values: dict[str, np.ndarray], what: str) -> None:
    """Assign each saved value to the variable of its path; a checkpoint of another model is refused."""
    differ = sorted(variables.keys() ^ values.keys()) or [
        k for k, v in variables.items() if tuple(v.shape) != values[k].shape]
    if differ:
        raise MobiletuneError(f"{runfolder.CHECKPOINT}: its {what} variables differ from this model's ({len(differ)}, "
                              f"e.g. {differ[0]}); delete it to restart the run")
    for path, variable in variables.items():
        variable.assign(values[path])


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
    """After every completed epoch: save the run state, the classifier and the optimizer of what trains."""

    def __init__(self, run: Path, classifier_model: keras.Model, state: RunState, interrupt: Interrupt):
        super().__init__()
        self.run, self.classifier_model, self.state, self.interrupt = run, classifier_model, state, interrupt

    def on_train_batch_end(self, batch, logs=None):
        if self.interrupt.requested:
            self.model.stop_training = True  # Keras finishes this batch, then leaves the epoch

    def on_epoch_end(self, epoch, logs=None):
        if not self.interrupt.requested:  # a partial epoch: keep the previous checkpoint
            save(self.run, self.state, self.classifier_model, self.model.optimizer)
