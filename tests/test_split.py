"""The split, drawn from each image's content hash and the seed: the draw, the per-class quotas, the test set
carved from validation, and near copies kept together. Each case against the answer worked out from the
rules (pure: digests only, no image files, no TensorFlow)."""

import hashlib

import numpy as np
import pytest

from mobiletune.audit import checks as audit
from mobiletune.config import DataConfig
from mobiletune.data import split
from mobiletune.data.images import ImageSet
from mobiletune.data.split import assign_splits
from mobiletune.errors import DataError


def _digests(n: int, tag: str = "") -> list[str]:
    return [hashlib.sha256(f"{tag}{i}".encode()).hexdigest() for i in range(n)]


def _draw(seed: int, digest: str) -> float:
    """The split draw from its definition: the first 15 hex digits of sha256("seed:digest"), as a fraction."""
    return int(hashlib.sha256(f"{seed}:{digest}".encode()).hexdigest()[:15], 16) / 16**15


def _quota(n: int, fraction: float) -> int:
    return min(max(1, round(n * fraction)), n - 1)


def _held_out_by_rank(digests: list[str], seed: int, fraction: float, parts: int) -> list[set[str]]:
    """Below EXACT_SPLIT_BELOW: the distinct digests ranked by their draw (ties: the smaller digest first); the
    lowest `quota` are the first held-out part, the next `quota` the second."""
    unique = sorted(set(digests))
    ranked = sorted(unique, key=lambda d: _draw(seed, d))  # sorted() is stable: ties keep digest order
    k = _quota(len(unique), fraction)
    return [set(ranked[p * k:(p + 1) * k]) for p in range(parts)]


# ---------------------------------------------------------------------------------------------
# the draw and the quota


def test_the_draw_is_the_hash_of_seed_and_digest_as_a_fraction():
    assert split.split_unit(0, "0" * 64) == int("63e9013a4eb996a", 16) / 16**15
    assert split.split_unit(7, "ab" * 32) == int("7ac067df80fe2ec", 16) / 16**15
    for seed, digest in [(0, d) for d in _digests(50)] + [(s, "ff" * 32) for s in range(50)]:
        unit = split.split_unit(seed, digest)
        assert unit == _draw(seed, digest) and 0 <= unit < 1
    assert split.split_unit(1, "0" * 64) != split.split_unit(0, "0" * 64)


@pytest.mark.parametrize(("n", "fraction", "quota"), [
    (10, 0.1, 1), (100, 0.1, 10), (100, 0.2, 20), (19, 0.1, 2),
    (3, 0.1, 1),  # round(0.3) = 0, but every held-out split gets 1
    (2, 0.9, 1),  # at most n - 1: one is left for training
    (4, 0.9, 3),
    (25, 0.1, 2), (35, 0.1, 4), (5, 0.5, 2),  # Python rounds halves to even
])
def test_the_quota_is_the_rounded_share_at_least_1_leaving_at_least_1(n, fraction, quota):
    assert split._split_counts(n, fraction) == quota


# ---------------------------------------------------------------------------------------------
# the held-out parts of one class


def test_exact_quotas_hold_out_the_lowest_draws_first():
    digests = np.array(_digests(30))
    members = np.arange(3, 30, 2)  # 14 images, not in positions 0..13: the result is in the caller's indices
    test, validation = split._held_out(members, digests, 4, 0.2, 2)
    want_test, want_validation = _held_out_by_rank(list(digests[members]), 4, 0.2, 2)
    assert len(want_test) == len(want_validation) == 3  # round(2.8)
    assert set(digests[test]) == want_test and set(digests[validation]) == want_validation
    assert set(test) <= set(members) and set(validation) <= set(members)
    assert list(test) == sorted(test) and list(validation) == sorted(validation)
    (only,) = split._held_out(members, digests, 4, 0.2, 1)
    assert list(only) == list(test)


def test_copies_are_one_unit_of_the_quota_and_land_together():
    unique = _digests(9, "u")
    digests = np.array(unique + unique[:4] + unique[:2])  # 15 files, 9 distinct images
    members = np.arange(15)
    test, validation = split._held_out(members, digests, 0, 0.2, 2)
    want_test, want_validation = _held_out_by_rank(list(digests), 0, 0.2, 2)
    assert len(want_test) == 2  # round(9 x 0.2): distinct images count, not files
    assert set(digests[test]) == want_test and set(digests[validation]) == want_validation
    assert sorted(test) == [i for i in members if digests[i] in want_test]  # every copy of each
    assert sorted(validation) == [i for i in members if digests[i] in want_validation]


def _fixed_draws(monkeypatch, draws: dict[str, float]) -> None:
    monkeypatch.setattr(split, "split_unit", lambda seed, digest: draws[digest])


def test_equal_draws_are_ranked_by_digest(monkeypatch):
    digests = _digests(60, "tie")
    _fixed_draws(monkeypatch, {d: 0.5 for d in digests})
    test, validation = split._held_out(np.arange(60), np.array(digests), 0, 0.1, 2)
    ranked = sorted(digests)
    assert {digests[i] for i in test} == set(ranked[:6]) and {digests[i] for i in validation} == set(ranked[6:12])
    # a few distinct draws, each shared by many: lower draw first, then the smaller digest
    draws = {d: [0.7, 0.2, 0.5][i % 3] for i, d in enumerate(digests)}
    _fixed_draws(monkeypatch, draws)
    test, validation = split._held_out(np.arange(60), np.array(digests), 0, 0.1, 2)
    ranked = sorted(digests, key=lambda d: (draws[d], d))
    assert {digests[i] for i in test} == set(ranked[:6]) and {digests[i] for i in validation} == set(ranked[6:12])


def test_from_exact_split_below_on_each_image_is_held_out_by_its_draw_alone(monkeypatch):
    n = split.EXACT_SPLIT_BELOW
    assert n == 1000
    digests = _digests(n, "big")
    draws = dict.fromkeys(digests, 0.9)
    # on each edge: [0, 0.1) is test, [0.1, 0.2) validation, the rest train
    edges = {0: 0.0, 1: 0.05, 2: 0.1, 3: 0.15, 4: 0.2, 5: 0.1 - 1e-12, 6: 0.2 - 1e-12, 7: 0.3, 8: 0.999}
    draws.update({digests[i]: u for i, u in edges.items()})
    _fixed_draws(monkeypatch, draws)
    test, validation = split._held_out(np.arange(n), np.array(digests), 0, 0.1, 2)
    assert sorted(test) == [0, 1, 5] and sorted(validation) == [2, 3, 6]  # not a quota of 100 each
    (only,) = split._held_out(np.arange(n), np.array(digests), 0, 0.1, 1)
    assert sorted(only) == [0, 1, 5]


def test_below_exact_split_below_quotas_are_exact(monkeypatch):
    n = split.EXACT_SPLIT_BELOW - 1
    digests = _digests(n, "big")
    _fixed_draws(monkeypatch, {d: 0.9 + i / 1e5 for i, d in enumerate(digests)})  # none under the thresholds
    test, validation = split._held_out(np.arange(n), np.array(digests), 0, 0.1, 2)
    assert list(test) == list(range(100)) and list(validation) == list(range(100, 200))


def test_threshold_split_matches_the_draws_of_real_digests():
    digests = np.array(_digests(1200, "real"))
    test, validation = split._held_out(np.arange(1200), digests, 9, 0.1, 2)
    draws = np.array([_draw(9, d) for d in digests])
    assert list(test) == list(np.flatnonzero(draws < 0.1))
    assert list(validation) == list(np.flatnonzero((draws >= 0.1) & (draws < 0.2)))
    assert len(test) != 120 or len(validation) != 120  # binomial counts, not quotas


# ---------------------------------------------------------------------------------------------
# assign_splits


def test_class_folders_alone_split_each_class_into_test_validation_and_train():
    digests = _digests(11, "a") + _digests(7, "b") + _digests(3, "c")
    labels = np.array([0] * 11 + [1] * 7 + [2] * 3, np.int32)
    config = DataConfig(seed=5, holdout_fraction=0.2)
    splits = assign_splits(labels, [None] * 21, digests, config, ["a", "b", "c"])
    assert splits.dtype.kind == "U" and splits.shape == (21,)
    for cls in range(3):
        members = np.flatnonzero(labels == cls)
        want_test, want_validation = _held_out_by_rank([digests[i] for i in members], 5, 0.2, 2)
        for i in members:
            want = "test" if digests[i] in want_test else "validation" if digests[i] in want_validation else "train"
            assert splits[i] == want, (cls, i)
    # quotas per class: 11 -> 2 + 2, 7 -> 1 + 1, 3 -> 1 + 1
    counts = [(int(((labels == c) & (splits == "test")).sum()), int(((labels == c) & (splits == "validation")).sum()))
              for c in range(3)]
    assert counts == [(2, 2), (1, 1), (1, 1)]


def test_a_file_filed_under_two_classes_lands_in_one_split_the_least_held_out():
    """Each class's quota draws its own members, so a copy in two classes can be drawn into two splits (test as a
    cat, validation as a dog): it joins the copy's least held-out split instead, and never leaves validation/."""
    a, b = _digests(10, "a"), _digests(10, "b")
    config = DataConfig(seed=1, holdout_fraction=0.2)
    draws = {}
    for shared in a:  # a digest of class a held out there, also filed under b, where b's quota trains it or not
        labels = np.array([0] * 10 + [1] * 11, np.int32)
        splits = assign_splits(labels, [None] * 21, [*a, *b, shared], config, ["a", "b"])
        mine = splits[a.index(shared)]
        assert splits[20] == mine, shared  # one split for both copies
        draws[str(mine)] = draws.get(str(mine), 0) + 1
    assert {"train", "validation"} <= set(draws)  # held out in one class, trained in the other, and so on
    # a 3-image class whose held-out copy is also trained on as another class keeps its held-out image there
    for seed in range(40):
        splits = assign_splits(np.array([0] * 3 + [1] * 7), [None] * 10, [*a[:3], *b[:6], a[1]],
                               DataConfig(seed=seed), ["a", "b"])
        assert {"validation", "test"} <= set(splits[:3]), (seed, splits)
    # given train/ and validation/: a validation copy of a training image stays in validation, not in test
    given = (["train"] * 3 + ["validation"] * 3) * 2 + ["validation"]
    digests = [*_digests(12, "g"), _digests(12, "g")[0]]  # the last: class b's validation copy of a's first
    splits = assign_splits(np.array([0] * 6 + [1] * 7, np.int32), given, digests, DataConfig(test_fraction=0.5),
                           ["a", "b"])
    assert splits[12] == "validation" and list(splits[[0, 1, 2, 6, 7, 8]]) == ["train"] * 6


def test_the_seed_and_the_holdout_fraction_come_from_the_config():
    digests = _digests(20)
    labels = np.zeros(20, np.int32)
    for seed, fraction in [(0, 0.1), (3, 0.1), (3, 0.25)]:
        splits = assign_splits(labels, [None] * 20, digests, DataConfig(seed=seed, holdout_fraction=fraction),
                                    ["a"])
        want_test, want_validation = _held_out_by_rank(digests, seed, fraction, 2)
        assert {digests[i] for i in np.flatnonzero(splits == "test")} == want_test
        assert {digests[i] for i in np.flatnonzero(splits == "validation")} == want_validation


def test_a_class_of_fewer_than_3_images_cannot_be_split():
    labels = np.array([0, 0, 0, 1, 1], np.int32)
    with pytest.raises(DataError) as caught:
        assign_splits(labels, [None] * 5, _digests(5), DataConfig(), ["cat", "dog"])
    assert str(caught.value) == ("class 'dog' has 2 usable image(s); at least 3 are needed to split into "
                                 "train/validation/test (or give train/ and validation/ folders)")
    three = assign_splits(np.array([0, 0, 0], np.int32), [None] * 3, _digests(3), DataConfig(), ["cat"])
    assert sorted(three) == ["test", "train", "validation"]
    with pytest.raises(DataError, match=r"^class 'cat' has 1 usable image\(s\); at least 3 are needed"):
        assign_splits(np.array([0], np.int32), [None], _digests(1), DataConfig(), ["cat"])


def test_given_train_and_validation_a_share_of_each_classs_validation_becomes_test():
    # class 0: 4 train, 10 validation; class 1: 3 train, 5 validation
    given = ["train"] * 4 + ["validation"] * 10 + ["train"] * 3 + ["validation"] * 5
    labels = np.array([0] * 14 + [1] * 8, np.int32)
    digests = _digests(22, "v")
    config = DataConfig(seed=2, test_fraction=0.3)
    splits = assign_splits(labels, given, digests, config, ["a", "b"])
    for cls, validation in ((0, range(4, 14)), (1, range(17, 22))):
        (want_test,) = _held_out_by_rank([digests[i] for i in validation], 2, 0.3, 1)
        assert len(want_test) == (3 if cls == 0 else 2)  # round(3.0), round(1.5)
        assert {digests[i] for i in np.flatnonzero((splits == "test") & (labels == cls))} == want_test
    assert list(splits[:4]) == ["train"] * 4 and list(splits[14:17]) == ["train"] * 3
    assert ((splits == "test") | (splits == np.array(given))).all()  # only validation images moved, to test


def test_a_class_needs_2_validation_images_to_carve_a_test_set():
    given = ["train", "train", "validation", "train", "validation", "validation"]
    labels = np.array([0, 0, 0, 1, 1, 1], np.int32)
    with pytest.raises(DataError) as caught:
        assign_splits(labels, given, _digests(6), DataConfig(), ["cat", "dog"])
    assert str(caught.value) == ("class 'cat' has 1 usable image(s) in validation/; at least 2 are needed to hold "
                                 "some out as test (or add a test/ folder, or test rows)")
    ok = assign_splits(labels[3:] - 1, given[3:], _digests(3), DataConfig(), ["dog"])
    assert list(ok[:1]) == ["train"] and sorted(ok[1:]) == ["test", "validation"]


def test_near_copies_count_once_towards_the_images_a_class_needs():
    labels = np.zeros(5, np.int32)
    digests = _digests(5, "n")
    # five files, three distinct photos once near copies are together: enough
    groups = {digests[1]: digests[0], digests[2]: digests[0]}
    assert sorted(assign_splits(labels, [None] * 5, digests, DataConfig(), ["cat"], groups)) in (
        ["test", "train", "train", "train", "validation"], ["test", "test", "test", "train", "validation"],
        ["test", "train", "validation", "validation", "validation"])
    # two distinct photos: the error says why, and the way out
    groups[digests[3]] = digests[0]
    with pytest.raises(DataError) as caught:
        assign_splits(labels, [None] * 5, digests, DataConfig(), ["cat"], groups)
    assert str(caught.value) == (
        "class 'cat' has 5 usable image(s) but only 2 distinct one(s) once near copies are kept together; at least 3 "
        "are needed to split into train/validation/test (or give train/ and validation/ folders); add different "
        "photos of it, or --set data.dedupe=false to split copies apart (its test images then include copies of "
        "training images)")
    # exact copies (equal digests) count once too; in validation/, 2 distinct are needed
    given = ["train", "validation", "validation", "validation"]
    with pytest.raises(DataError) as caught:
        assign_splits(np.zeros(4, np.int32), given, ["x", "y", "y", "y"], DataConfig(), ["cat"])
    assert str(caught.value).startswith("class 'cat' has 3 usable image(s) in validation/ but only 1 distinct one(s) "
                                        "once near copies are kept together; at least 2 are needed to hold some out "
                                        "as test (or add a test/ folder, or test rows); add different photos")
    splits = assign_splits(np.zeros(4, np.int32), given, ["x", "y", "y", "z"], DataConfig(), ["cat"])
    assert list(splits[:1]) == ["train"] and sorted(splits[1:]) in (["test", "test", "validation"],
                                                                   ["test", "validation", "validation"])
    assert splits[1] == splits[2]


def test_a_given_test_split_is_kept_as_it_is():
    given = ["train", "validation", "test", "train", "validation", "test", "validation"]
    labels = np.array([0, 0, 0, 1, 1, 1, 1], np.int32)
    splits = assign_splits(labels, given, _digests(7), DataConfig(), ["a", "b"])
    assert list(splits) == given and splits.dtype.kind == "U"


def test_near_copies_named_by_groups_are_split_as_one_image():
    digests = _digests(40, "g")
    labels = np.zeros(40, np.int32)
    config = DataConfig(seed=1, holdout_fraction=0.1)
    alone = assign_splits(labels, [None] * 40, digests, config, ["a"])
    # pick a test image and a train image; make the train image a near copy of the test image
    t, r = int(np.flatnonzero(alone == "test")[0]), int(np.flatnonzero(alone == "train")[0])
    groups = {digests[t]: digests[t], digests[r]: digests[t]}
    together = assign_splits(labels, [None] * 40, digests, config, ["a"], groups)
    assert together[t] == together[r] == "test"
    # the group is one unit of the quota: with the digests a group stands for, as the reference draws them
    units = [groups.get(d, d) for d in digests]
    want_test, want_validation = _held_out_by_rank(units, 1, 0.1, 2)
    assert {units[i] for i in np.flatnonzero(together == "test")} == want_test
    assert {units[i] for i in np.flatnonzero(together == "validation")} == want_validation
    for empty in (None, {}):
        assert list(assign_splits(labels, [None] * 40, digests, config, ["a"], empty)) == list(alone)


def test_groups_carve_a_test_set_from_validation_as_one_image_too():
    given = ["validation"] * 10
    labels = np.zeros(10, np.int32)
    digests = _digests(10, "cv")
    config = DataConfig(test_fraction=0.2)
    alone = assign_splits(labels, given, digests, config, ["a"])
    t = int(np.flatnonzero(alone == "test")[0])
    others = [i for i in range(10) if alone[i] == "validation"][:3]
    groups = {digests[i]: digests[t] for i in [t, *others]}
    together = assign_splits(labels, given, digests, config, ["a"], groups)
    assert all(together[i] == together[t] for i in others)


# ---------------------------------------------------------------------------------------------
# the groups an audit hands to the split


def _images(n: int) -> ImageSet:
    return ImageSet(root=None, classes=["a"], paths=[f"p{i}.jpg" for i in range(n)],
                         labels=np.zeros(n, np.int32), splits=np.array(["train"] * n),
                         hashes=[f"h{i}" for i in range(n)])


def _pair(issue: str, a: int, b: int) -> audit.Finding:
    return audit.Finding(f"p{a}.jpg", "train", "a", issue, 0.9, other_path=f"p{b}.jpg")


def test_duplicate_groups_are_named_by_their_smallest_digest():
    images = _images(8)
    findings = [_pair("exact_duplicate", 3, 1), _pair("near_duplicate", 2, 3), _pair("near_duplicate", 5, 4),
                _pair("label_error", 6, 1), _pair("outlier", 7, 0)]
    assert audit.duplicate_groups(images, findings) == {"h1": "h1", "h2": "h1", "h3": "h1", "h4": "h4", "h5": "h4"}
    assert audit.duplicate_groups(images, []) == {}
    assert audit.duplicate_groups(images, findings[3:]) == {}  # label errors and outliers are no copies


def test_duplicate_groups_refuse_an_image_set_whose_paths_and_digests_do_not_pair_up():
    images = _images(3)
    images.hashes = images.hashes[:2]
    with pytest.raises(ValueError, match="zip"):
        audit.duplicate_groups(images, [_pair("near_duplicate", 0, 1)])


def test_duplicate_groups_merge_through_chains_in_any_order():
    images = _images(7)
    chain = [_pair("near_duplicate", 6, 5), _pair("near_duplicate", 4, 3), _pair("near_duplicate", 5, 4),
             _pair("exact_duplicate", 2, 6), _pair("near_duplicate", 3, 6)]  # the last joins one group to itself
    want = {f"h{i}": "h2" for i in range(2, 7)}
    assert audit.duplicate_groups(images, chain) == want
    assert audit.duplicate_groups(images, chain[::-1]) == want
    # two groups joined by a pair of their larger members: the smaller root names both
    joined = [_pair("near_duplicate", 1, 5), _pair("near_duplicate", 3, 6), _pair("near_duplicate", 6, 5)]
    assert audit.duplicate_groups(images, joined) == {"h1": "h1", "h5": "h1", "h3": "h1", "h6": "h1"}


def test_an_earlier_models_training_images_stay_in_train_as_a_small_class_grows():
    """Quotas rank a small class's draws, so new images move some old ones across the quota's edge: a model's
    training image could land in the test set of the model retrained from it. `trained` keeps them in train,
    with their near copies, and leaves the other images' draws alone."""
    config = DataConfig(seed=3)
    old, new = _digests(20, "old"), _digests(6, "new")
    before = assign_splits(np.zeros(20, int), [None] * 20, old, config, ["a"])
    trained = frozenset(d for d, s in zip(old, before, strict=True) if s == "train")
    grown = old + new
    drawn = assign_splits(np.zeros(26, int), [None] * 26, grown, config, ["a"])
    moved = [d for d, s in zip(grown, drawn, strict=True) if d in trained and s != "train"]
    assert moved  # without the rule, earlier training images are held out now
    kept = assign_splits(np.zeros(26, int), [None] * 26, grown, config, ["a"], trained=trained)
    assert all(s == "train" for d, s in zip(grown, kept, strict=True) if d in trained)
    untouched = [i for i, d in enumerate(grown) if d not in trained]
    assert [kept[i] for i in untouched] == [drawn[i] for i in untouched]
    copy = grown + ["copy-of-0"]  # a near copy of a training image is grouped with it, so it trains too
    first_trained = next(d for d in old if d in trained)
    splits = assign_splits(np.zeros(27, int), [None] * 27, copy, config, ["a"],
                           groups={"copy-of-0": first_trained}, trained=trained)
    assert splits[-1] == "train"
