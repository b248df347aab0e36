"""Cutting the base at `fine_tune_at`: the tensors that cross the cut, the extractor that computes everything
below it in one pass (pooled output and boundary activations), and the model above it that phase 2 trains."""

from __future__ import annotations

import hashlib
from typing import Any

import keras
import numpy as np

from mobiletune.model import kernels
from mobiletune.model import network as model_lib
from mobiletune.model.network import Classifier

# ---------------------------------------------------------------------------------------------
# Cutting the base at `fine_tune_at`


def boundary_tensors(base: keras.Model, fine_tune_at: int) -> list:
    """Tensors made by layers below `fine_tune_at` and used by layers at or above it.

    Usually one tensor, two where the cut falls inside a residual block (the skip path).
    """
    made_by = model_lib.producers(base)
    found: dict[int, Any] = {}
    for layer in base.layers[max(fine_tune_at, 1):]:
        for tensor in model_lib.inputs_of(layer):
            if made_by[id(tensor)] < fine_tune_at:
                found.setdefault(id(tensor), tensor)
    return list(found.values()) or list(base.inputs)


def extractor(classifier: Classifier, fine_tune_ats: list[int]) -> tuple[keras.Model, dict[int, list[int]]]:
    """Scaled pixels -> [pooled base output, *boundary activations]: one pass for both phases.

    Serves several `fine_tune_at` values at once (a sweep); returns the model and, for each
    value, which outputs are its boundary. A tensor shared by two boundaries is output once.
    """
    base = classifier.base
    outputs = [keras.layers.GlobalAveragePooling2D()(base.output)]
    where: dict[int, list[int]] = {}
    for k in fine_tune_ats:
        where[k] = []
        for tensor in boundary_tensors(base, k):
            if not any(tensor is o for o in outputs):
                outputs.append(tensor)
            where[k].append(next(i for i, o in enumerate(outputs) if o is tensor))
    return keras.Model(base.input, outputs), where


def top_model(classifier: Classifier, fine_tune_at: int, *, fast: bool = True, pooled: bool = False,
              layers: tuple[str, ...] = (), head=None) -> keras.Model:
    """Boundary activations -> logits through base layers >= fine_tune_at and the head (phase 2): the
    classifier's own layers and weights, computed by faster kernels (`kernels.fast_clone`; `fast=False`
    runs Keras' own layers, for benchmarks/phase2.py to compare). `pooled`: [pooled base output, logits], or
    with `layers` (base layers at or above the cut, `Classifier.pooled_layers`) [their pooled outputs and the
    pooled base output side by side, logits]. `head`: base output -> logits in place of the classifier's own head
    (a trainee's, `trainees`)."""
    base = classifier.base
    cut = boundary_tensors(base, fine_tune_at)
    inputs = [keras.Input(t.shape[1:], name=f"boundary_{i}") for i, t in enumerate(cut)]
    if len(cut) == 1:  # Keras wants a lone tensor, not a list of one
        cut, inputs = cut[0], inputs[0]
    upper = keras.Model(cut, [*(base.get_layer(v).output for v in layers), base.output], name="upper_base")
    maps = keras.tree.flatten((kernels.fast_clone(upper) if fast else upper)(inputs))
    if head is not None:
        assert not pooled, "a trainee's head gives logits only"
        return keras.Model(inputs, head(maps[-1]), name="top")
    parts = classifier.pooled_maps(maps)
    features = model_lib.side_by_side(parts)
    logits = classifier.head(parts[-1])
    return keras.Model(inputs, [features, logits] if pooled else logits, name="top")


def above_cut(base: keras.Model, fine_tune_at: int, layers: tuple[str, ...]) -> bool:
    """Whether every layer in `layers` is at or above the cut, where `top_model` can compute it."""
    names = [layer.name for layer in base.layers]
    return all(names.index(v) >= fine_tune_at for v in layers)


# ---------------------------------------------------------------------------------------------
# The cache


def weights_digest(base: keras.Model) -> str:
    """sha256 of the base's weights as loaded: one key whatever file or download they came from."""
    digest = hashlib.sha256()
    for w in base.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    return digest.hexdigest()
