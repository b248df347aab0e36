"""The model's conventions against hand-worked answers (NumPy only, no TensorFlow): the input scale, one logit
for two classes, and unit rows."""

import numpy as np

from mobiletune.model import convention


def test_pixels_scale_to_minus_one_to_one_in_float32():
    x = np.array([[0.0, 127.5, 255.0, 51.0]], np.float32)
    unit = convention.to_unit(x)
    assert unit.dtype == np.float32
    np.testing.assert_array_equal(unit, np.array([[-1.0, 0.0, 1.0, -0.6]], np.float32))


def test_one_logit_stands_for_zero_and_itself():
    z = np.array([[2.0], [-0.5]])
    np.testing.assert_array_equal(convention.two_logits(z), [[0.0, 2.0], [0.0, -0.5]])
    np.testing.assert_array_equal(convention.two_logits(np.array([3.0])), [0.0, 3.0])  # a bias
    kernel = np.array([[1.0], [2.0], [3.0]])
    np.testing.assert_array_equal(convention.two_logits(kernel), [[0, 1], [0, 2], [0, 3]])
    many = np.array([[1.0, 2.0, 3.0]])
    assert convention.two_logits(many) is many  # more than one logit: as it is
    probs = np.exp(convention.two_logits(z)) / np.exp(convention.two_logits(z)).sum(1, keepdims=True)
    np.testing.assert_allclose(probs[:, 1], 1 / (1 + np.exp(-z[:, 0])))  # softmax of (0, z) is sigmoid(z)


def test_unit_rows_have_length_one_and_zero_rows_stay_zero():
    rows = convention.unit_rows(np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0], [1e-20, 0.0]]))
    assert rows.dtype == np.float32
    np.testing.assert_allclose(rows, [[0.6, 0.8], [0.0, 0.0], [0.0, -1.0], [1e-8, 0.0]], rtol=1e-6, atol=0)
