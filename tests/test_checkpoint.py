"""The checkpoint keeps every variable under its path of layer names: the same paths in any process, a
round trip to the bit, and a checkpoint of another model refused by name (resume end to end:
tests/test_reliability.py)."""

import numpy as np
import pytest

from conftest import TINY
from mobiletune.config import load_config
from mobiletune.errors import MobiletuneError
from mobiletune.model import network
from mobiletune.model.network import create_model
from mobiletune.training import checkpoint
from mobiletune.training.state import RunState


def _classifier(*overrides: str, classes: int = 2):
    return create_model(load_config(overrides=[*TINY, *overrides]), classes)


def test_paths_do_not_depend_on_what_the_process_built_before():
    """Keras numbers random generators and optimizers in creation order ("seed_generator_3"): a resumed process
    builds in another order. The paths here are layer names only."""
    first, second = _classifier(), _classifier()
    assert [v.path for v in first.model.variables] != [v.path for v in second.model.variables]
    paths = list(checkpoint.variable_paths(first.model))
    assert paths == list(checkpoint.variable_paths(second.model))
    assert {"augment/flip/seed_generator_state", "dropout/seed_generator_state", "logits/kernel",
            "mobilenetv2/Conv1/kernel"} <= set(paths)
    assert len(paths) == len(first.model.variables)
    network.compile_fresh(first.model, "rmsprop", 1e-3)
    network.compile_fresh(second.model, "rmsprop", 1e-3)
    assert list(checkpoint.optimizer_paths(first.model.optimizer)) == list(
        checkpoint.optimizer_paths(second.model.optimizer))


def test_a_checkpoint_restores_every_variable_and_the_state(tmp_path):
    saved = _classifier()
    network.compile_fresh(saved.model, "rmsprop", 1e-3)
    rng = np.random.default_rng(0)
    for variable in saved.model.variables[-6:]:
        variable.assign(rng.normal(size=variable.shape).astype(variable.dtype))
    state = RunState([{"epoch": 1, "phase": 1, "loss": 0.5}], {1: np.array([[0.25, 0.75]])})
    checkpoint.save(tmp_path, state, saved.model, saved.model.optimizer)
    loaded, values = checkpoint.load(tmp_path)
    assert loaded.epoch == 1 and loaded.history == state.history and set(loaded.optimizer) >= {"iteration"}
    np.testing.assert_array_equal(loaded.test_probs[1], state.test_probs[1])
    fresh = _classifier()
    checkpoint.restore(checkpoint.variable_paths(fresh.model), values, "model")
    for a, b in zip(saved.model.variables, fresh.model.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(("overrides", "classes"), [(["augment.flip=none"], 2), ([], 3)],
                         ids=["another-augmentation", "another-head"])
def test_a_checkpoint_of_another_model_is_refused_by_name(tmp_path, overrides, classes):
    saved = _classifier()
    network.compile_fresh(saved.model, "rmsprop", 1e-3)
    checkpoint.save(tmp_path, RunState(), saved.model, saved.model.optimizer)
    _, values = checkpoint.load(tmp_path)
    other = _classifier(*overrides, classes=classes)
    with pytest.raises(MobiletuneError, match="variables differ from this model's .*delete it to restart"):
        checkpoint.restore(checkpoint.variable_paths(other.model), values, "model")


def test_a_damaged_or_foreign_checkpoint_says_how_to_go_on(tmp_path):
    (tmp_path / "checkpoint.npz").write_bytes(b"not a zip")
    with pytest.raises(MobiletuneError, match="damaged checkpoint.*delete it to restart the run"):
        checkpoint.load(tmp_path)
    np.savez(tmp_path / "checkpoint.npz", m0=np.zeros(2), state=np.frombuffer(b'{"history": []}', np.uint8))
    with pytest.raises(MobiletuneError, match="made by another version of mobiletune; delete it to restart"):
        checkpoint.load(tmp_path)
    assert checkpoint.load(tmp_path / "none") is None
