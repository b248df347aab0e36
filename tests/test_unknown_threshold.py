"""The unknown-input scores and their threshold, on vectors and logits whose answers are worked out by hand
(pure: no model, no TensorFlow)."""

import math

import numpy as np
import pytest

from mobiletune.evaluation import unknown
from mobiletune.evaluation.unknown import UnknownDetector
from mobiletune.model import convention

SQRT_HALF = math.sqrt(0.5)


# ---------------------------------------------------------------------------------------------
# energy and msp


def test_energy_is_minus_log_sum_exp_of_the_logits():
    logits = np.array([[0.0, math.log(3)], [math.log(2), math.log(2)], [1.0, 2.0]], np.float32)
    expected = [-math.log(4), -math.log(4), -math.log(math.e + math.e**2)]
    result = unknown.energy(logits)
    assert result.shape == (3,) and result.dtype == np.float64
    assert result == pytest.approx(expected, abs=1e-6)


def test_energy_of_one_binary_logit_is_that_of_the_pair_0_z():
    z = np.array([[0.0], [math.log(3)], [-2.0]])
    assert unknown.energy(z) == pytest.approx([-math.log(2), -math.log(4), -math.log(1 + math.exp(-2))])


def test_energy_is_computed_in_float64():
    # float32 cannot tell 1e4 + log(1 + e^-30) from 1e4; float64 keeps the two logits apart
    logits = np.array([[1e4, 1e4 - 30]], np.float32)
    assert unknown.energy(logits)[0] == -(1e4 + math.log1p(math.exp(-30)))
    assert unknown.energy(np.array([[20.0]], np.float32))[0] == pytest.approx(-(20 + math.log1p(math.exp(-20))),
                                                                          abs=1e-12)


def test_msp_is_one_minus_the_top_probability():
    logits = np.array([[0.0, math.log(3)], [math.log(2), math.log(2)]])
    assert unknown.msp(logits) == pytest.approx([1 - 3 / 4, 1 - 1 / 2])
    three = np.array([[0.0, math.log(2), math.log(5)], [math.log(6), 0.0, math.log(3)]])
    assert unknown.msp(three) == pytest.approx([1 - 5 / 8, 1 - 6 / 10])
    assert unknown.msp(np.array([[math.log(3)], [-math.log(3)]])) == pytest.approx([0.25, 0.25])


# ---------------------------------------------------------------------------------------------
# knn


def _reference():
    """Unit rows: e1, e2, and the diagonal between them (45 degrees from each)."""
    return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [SQRT_HALF, SQRT_HALF, 0.0]], np.float32)


def test_knn_is_the_cosine_distance_to_the_kth_nearest_reference_row():
    reference = _reference()
    query = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0], [-1.0, 0.0, 0.0]])  # length does not matter
    # 1 - cos to (e1, e2, diagonal): e1 (0, 1, 1 - cos 45); e3 (1, 1, 1); -e1 (2, 1, 1 + cos 45)
    assert unknown.knn(query, reference, 1) == pytest.approx([0.0, 1.0, 1.0], abs=1e-6)
    assert unknown.knn(query, reference, 2) == pytest.approx([1 - SQRT_HALF, 1.0, 1.0 + SQRT_HALF], abs=1e-6)
    assert unknown.knn(query, reference, 3) == pytest.approx([1.0, 1.0, 2.0], abs=1e-6)
    assert unknown.knn(query, reference, 3).dtype == np.float64


def test_knn_asks_for_no_more_neighbours_than_there_are_reference_rows():
    reference = _reference()
    query = np.array([[1.0, 0.0, 0.0]])
    assert unknown.knn(query, reference, 50) == pytest.approx(unknown.knn(query, reference, 3))
    assert unknown.knn(query, reference[:1], 5) == pytest.approx([0.0], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# scores


def test_scores_dispatch_by_name():
    logits = np.array([[0.0, math.log(3)], [1.0, 1.0]])
    pooled = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert unknown.scores("msp", None, logits) == pytest.approx(unknown.msp(logits))
    assert unknown.scores("energy", None, logits) == pytest.approx(unknown.energy(logits))
    assert unknown.scores("knn", pooled, logits, _reference(), k=1) == pytest.approx([0.0, 0.0], abs=1e-6)
    assert unknown.scores("knn", pooled, logits, _reference(), k=2) == pytest.approx([1 - SQRT_HALF] * 2, abs=1e-6)
    # k is 5 unless given: here the farthest of the 3 rows
    assert unknown.scores("knn", pooled, logits, _reference()) == pytest.approx([1.0, 1.0], abs=1e-6)


def test_scores_refuse_an_unknown_name_and_knn_without_reference():
    with pytest.raises(AssertionError, match="mahalanobis"):
        unknown.scores("mahalanobis", None, np.zeros((1, 2)))
    with pytest.raises(AssertionError) as caught:
        unknown.scores("knn", np.ones((1, 3)), np.zeros((1, 2)))
    assert str(caught.value) == "knn needs the training features"


def test_knn_scores_take_the_5th_nearest_unless_told():
    # six reference rows at growing angles from e1: 1 - cos is 0, .1, .2, .3, .4, .5
    cosines = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    reference = np.array([[c, math.sqrt(1 - c * c)] for c in cosines], np.float32)
    query, logits = np.array([[1.0, 0.0]]), np.zeros((1, 2))
    assert unknown.scores("knn", query, logits, reference) == pytest.approx([0.4], abs=1e-6)
    assert unknown.scores("knn", query, logits, reference, k=6) == pytest.approx([0.5], abs=1e-6)
    assert unknown.knn(query, reference, 2) == pytest.approx([0.1], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# fit: the threshold


def _logits_with_energies(energies):
    """Two-class logits (0, z) whose energy is each of `energies`: -log(1 + e^z) = E, z = log(e^-E - 1)."""
    return np.array([[0.0, math.log(math.exp(-e) - 1)] for e in energies])


def test_the_threshold_is_the_higher_quantile_of_the_validation_scores():
    energies = [-3.0, -1.0, -2.0, -0.5, -1.5, -4.0, -2.5, -0.8, -3.5, -1.2]
    logits = _logits_with_energies(energies)
    assert unknown.energy(logits) == pytest.approx(energies)
    ordered = sorted(energies)  # -4, -3.5, -3, -2.5, -2, -1.5, -1.2, -1, -0.8, -0.5
    # numpy's "higher": the sorted value at index ceil(q * (n - 1))
    for keep, index in [(0.9, 9), (0.75, 7), (0.5, 5), (0.34, 4), (0.0, 0), (1.0, 9)]:
        detector = unknown.fit("energy", None, None, logits, keep=keep, k=7)
        assert detector.threshold == pytest.approx(ordered[index])
        assert detector.validation_kept == (index + 1) / 10  # the share at or under it
        assert (detector.score, detector.k, detector.reference) == ("energy", 7, None)
        assert isinstance(detector.threshold, float) and isinstance(detector.validation_kept, float)


def test_validation_kept_counts_the_ties_at_the_threshold():
    logits = _logits_with_energies([-1.0, -1.0, -1.0, -2.0])
    detector = unknown.fit("energy", None, None, logits, keep=0.3, k=5)
    assert detector.threshold == pytest.approx(-1.0) and detector.validation_kept == 1.0


def test_msp_threshold():
    logits = np.array([[0.0, math.log(3)], [0.0, 0.0], [math.log(9), 0.0], [0.0, math.log(4)]])  # msp .25 .5 .1 .2
    detector = unknown.fit("msp", None, None, logits, keep=0.5, k=5)
    assert detector.threshold == pytest.approx(0.25) and detector.validation_kept == 0.75
    assert detector.reference is None


def test_knn_fit_keeps_the_unit_training_rows_as_saved_in_float16():
    train = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [1.0, 1.0, 1.0]])
    val = np.array([[3.0, 4.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, -1.0]])
    detector = unknown.fit("knn", train, val, np.zeros((3, 2)), keep=0.5, k=1)
    unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    assert detector.reference.dtype == np.float32
    assert np.array_equal(detector.reference, unit.astype(np.float16).astype(np.float32))
    assert not np.array_equal(detector.reference, unit.astype(np.float32))  # float16-rounded, as the file has it
    # validation distances to the nearest training row: 0; 1 - 2 / sqrt 6 = .184 (to the diagonal); 1 (to (3, 4, 0));
    # training rows to their nearest other: 1 - 1.4 / sqrt 3 = .192 twice ((3, 4, 0) and the diagonal), 1 - 1 / sqrt 3
    # = .423 ((0, 0, 2) to the diagonal). Of the six, the "higher" 0.5 quantile (index 3 of 0-5) is .192
    assert detector.threshold == pytest.approx(1 - 1.4 / math.sqrt(3), abs=2e-3) and detector.validation_kept == 2 / 3
    assert detector.score == "knn" and detector.k == 1


def test_leave_one_out_is_each_rows_kth_nearest_other_row():
    reference = _reference()  # e1, e2 and the diagonal: 45 degrees between the diagonal and each axis
    near = 1 - SQRT_HALF
    assert unknown.leave_one_out(reference, 1) == pytest.approx([near, near, near], abs=1e-6)  # never itself (0)
    assert unknown.leave_one_out(reference, 2) == pytest.approx([1.0, 1.0, near], abs=1e-6)
    assert unknown.leave_one_out(reference, 9) == pytest.approx(unknown.leave_one_out(reference, 2))  # 2 others
    assert unknown.leave_one_out(reference[:1], 3).size == 0  # one image has no other


def test_the_knn_threshold_pools_validation_with_training_images_left_out():
    # 20 validation images (the 0.95 quantile of 20 is their maximum) and 400 training images, one distribution:
    # pooled, the threshold comes from 420 scores and the outlier among the validation images no longer sets it
    rng = np.random.default_rng(0)
    centre = np.r_[np.ones(8) * 3, np.zeros(8)]
    train, val = centre + rng.normal(size=(400, 16)), centre + rng.normal(size=(20, 16))
    val[0] = -centre  # a validation image that is not like the others: cosine distance ~2
    detector = unknown.fit("knn", train, val, np.zeros((20, 2)), keep=0.95, k=3)
    inside = np.r_[unknown.leave_one_out(detector.reference, 3), unknown.knn(val, detector.reference, 3)]
    assert detector.threshold == pytest.approx(float(np.quantile(inside, 0.95, method="higher")))
    assert detector.threshold < 0.5 < unknown.knn(val[:1], detector.reference, 3)[0]
    assert 0.8 <= detector.validation_kept < 1  # the outlier is unknown, most of the rest kept (17 of 19 here)


def test_near_copies_among_the_training_images_leave_the_threshold_to_validation():
    # 40 images, each also present as 4 slightly changed copies: left out, an image still finds its copies
    # (distance ~0), which no unseen image does. Pooling those scores would put the threshold near 0
    rng = np.random.default_rng(1)
    originals = 3 + rng.normal(size=(40, 16))
    train = np.concatenate([originals + 0.01 * rng.normal(size=originals.shape) for _ in range(5)])
    val = 3 + rng.normal(size=(30, 16))
    detector = unknown.fit("knn", train, val, np.zeros((30, 2)), keep=0.95, k=3)
    alone = unknown.knn(val, detector.reference, 3)
    assert detector.threshold == pytest.approx(float(np.quantile(alone, 0.95, method="higher")))
    assert detector.validation_kept >= 0.95


def test_knn_keeps_a_seeded_sample_of_at_most_reference_limit_rows(monkeypatch):
    monkeypatch.setattr(unknown, "REFERENCE_LIMIT", 6)
    rng = np.random.default_rng(5)
    train = rng.normal(size=(20, 4))
    val, logits = rng.normal(size=(5, 4)), np.zeros((5, 2))
    detector = unknown.fit("knn", train, val, logits, keep=0.9, k=2, seed=3)
    picked = np.random.default_rng(3).choice(20, 6, replace=False)
    assert np.array_equal(detector.reference, convention.unit_rows(train[picked]).astype(np.float16).astype(np.float32))
    again = unknown.fit("knn", train, val, logits, keep=0.9, k=2, seed=3)
    other = unknown.fit("knn", train, val, logits, keep=0.9, k=2, seed=4)
    assert np.array_equal(again.reference, detector.reference)
    assert not np.array_equal(other.reference, detector.reference)
    default = unknown.fit("knn", train, val, logits, keep=0.9, k=2)
    assert np.array_equal(default.reference, unknown.fit("knn", train, val, logits, keep=0.9, k=2, seed=0).reference)
    at_limit = unknown.fit("knn", train[:6], val, logits, keep=0.9, k=2, seed=3)  # exactly the limit: all, in order
    assert np.array_equal(at_limit.reference, convention.unit_rows(train[:6]).astype(np.float16).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# save and load


def test_a_detector_survives_a_round_trip_field_by_field(tmp_path):
    reference = convention.unit_rows(np.array([[3.0, 4.0], [1.0, 0.0]])).astype(np.float16).astype(np.float32)
    two_views = np.concatenate([reference, reference[::-1]], axis=1)
    for detector in (UnknownDetector("knn", 0.123456789, 0.95, 7, reference),
                     UnknownDetector("knn", 2.5, 0.95, 3, two_views, ("block_14_expand_relu",), (2, 2), (0.25, 0.5),
                                     (0.0625, 0.125)),
                     UnknownDetector("energy", -3.25, 0.9, 5, None),
                     UnknownDetector("msp", 0.5, 1.0, 3, None)):
        path = tmp_path / f"{detector.score}.npz"
        detector.save(path)
        again = unknown.load(path)
        assert (again.score, again.threshold, again.validation_kept, again.k) == (
            detector.score, detector.threshold, detector.validation_kept, detector.k)
        assert (again.layers, again.widths, again.centre, again.spread) == (
            detector.layers, detector.widths, detector.centre, detector.spread)
        assert all(type(x) is str for x in again.layers) and all(type(x) is int for x in again.widths)
        assert type(again.score) is str and type(again.threshold) is float and type(again.k) is int
        if detector.reference is None:
            assert again.reference is None
        else:
            assert again.reference.dtype == np.float32 and np.array_equal(again.reference, detector.reference)
        with np.load(path) as f:
            assert set(f.files) == {"score", "threshold", "validation_kept", "k", "reference", "layers", "widths",
                                    "centre", "spread"}
            assert f["reference"].dtype == np.float16  # half the file


def test_a_file_made_before_the_views_scores_as_it_did(tmp_path):
    """unknown.npz from before the middle layer (five keys): one layer, raw distances, the same threshold."""
    reference = convention.unit_rows(np.array([[1.0, 0.0], [0.0, 1.0]]))
    np.savez(tmp_path / "old.npz", score="knn", threshold=0.3, validation_kept=0.95, k=1,
             reference=reference.astype(np.float16))
    old = unknown.load(tmp_path / "old.npz")
    assert (old.layers, old.widths, old.centre, old.spread) == ((), (), (), ())
    query = np.array([[1.0, 1.0], [2.0, 0.0]])
    assert old.scores(query, np.zeros((2, 2))) == pytest.approx([1 - SQRT_HALF, 0.0], abs=1e-3)


def test_several_views_score_the_largest_robust_deviation():
    """With two layers, each layer's knn distance is put in deviations from its in-distribution median (fitted on the
    leave-one-out and validation distances) and the score is the larger: an input strange in either layer is."""
    rng = np.random.default_rng(0)
    train = np.abs(rng.normal(size=(60, 6))) + 5  # two layers of 3 channels each
    val = np.abs(rng.normal(size=(20, 6))) + 5
    detector = unknown.fit("knn", train, val, np.zeros((20, 2)), keep=0.95, k=3, layers=("middle",), widths=(3, 3))
    assert detector.widths == (3, 3) and len(detector.centre) == 2 and min(detector.spread) > 0
    for part in unknown.split_layers(detector.reference, detector.widths):
        assert np.allclose(np.linalg.norm(part, axis=1), 1, atol=1e-3)
    odd_first = np.array([[0.0, 0.0, 9.0, 1.0, 1.0, 1.0]])  # strange in the first layer only
    odd_second = np.array([[5.5, 5.5, 5.5, 9.0, 0.0, 0.0]])  # in the second only
    plain = val[:1]
    for query, strange in ((odd_first, 0), (odd_second, 1)):
        deviations = detector.deviations(detector.distances(query))[:, 0]
        assert deviations[strange] > detector.threshold >= deviations[1 - strange]  # the other layer finds it usual
        assert detector.scores(query, np.zeros((1, 2)))[0] > detector.threshold
    assert detector.scores(plain, np.zeros((1, 2)))[0] <= detector.threshold


def test_saving_rounds_the_reference_to_float16(tmp_path):
    reference = np.array([[0.1, 0.2]], np.float32)
    UnknownDetector("knn", 0.5, 0.9, 1, reference).save(tmp_path / "u.npz")
    assert np.array_equal(unknown.load(tmp_path / "u.npz").reference, reference.astype(np.float16).astype(np.float32))


def test_loading_where_there_is_no_detector_is_none(tmp_path):
    assert unknown.load(tmp_path / "unknown.npz") is None
    (tmp_path / "folder.npz").mkdir()
    assert unknown.load(tmp_path / "folder.npz") is None


def test_a_loaded_detector_scores_and_decides_as_the_fitted_one(tmp_path):
    rng = np.random.default_rng(2)
    train, val = rng.normal(size=(40, 6)), rng.normal(size=(30, 6))
    logits = rng.normal(size=(30, 3))
    for name in ("knn", "energy", "msp"):
        detector = unknown.fit(name, train, val, logits, keep=0.8, k=3)
        detector.save(tmp_path / "d.npz")
        again = unknown.load(tmp_path / "d.npz")
        scores = again.scores(val, logits)
        assert np.array_equal(scores, detector.scores(val, logits))
        if name != "knn":  # the "higher" 0.8 quantile of 30 scores is the 25th smallest: 25 kept, 5 unknown
            assert detector.validation_kept == pytest.approx(25 / 30) and (scores > again.threshold).sum() == 5
        # knn's threshold also counts the 40 training images left out in turn: whatever it keeps, the same
        assert again.summary(scores)["test_kept"] == pytest.approx(detector.validation_kept)
        assert (scores > again.threshold).sum() == round(30 * (1 - detector.validation_kept))
