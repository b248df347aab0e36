"""Which trial a sweep keeps, its Pareto front, the same-size pruning rule and the option parsing, on hand-made
trials whose answers are known (pure: no training, no TensorFlow)."""

import math
import statistics
from types import SimpleNamespace

import pytest

from mobiletune.errors import UsageError
from mobiletune.tuning import objectives
from mobiletune.tuning.objectives import Objectives, parse


def _trial(number, acc=0.5, ms=None, *, int8=None, state="COMPLETE", size=None, curve=None, latency2=None):
    """An Optuna-like frozen trial: what objectives reads of one."""
    attrs = {}
    if ms is not None:
        attrs["latency_ms_tflite"] = ms
    if int8 is not None:
        attrs["latency_ms_tflite_int8"] = int8
    if curve is not None:
        attrs["val_curve"] = curve
    return SimpleNamespace(number=number, values=[acc, ms if latency2 is None else latency2],
                           state=SimpleNamespace(name=state), user_attrs=attrs,
                           params={} if size is None else {"data.image_size": size})


class _Study:
    """An Optuna-like study: get_trials(deepcopy=False) and best_trials."""

    def __init__(self, trials, best=None):
        self.trials, self.best_trials = trials, best if best is not None else trials

    def get_trials(self, deepcopy=True):
        assert deepcopy is False  # objectives never copies the trials it only reads
        return list(self.trials)


# ---------------------------------------------------------------------------------------------
# parse


@pytest.mark.parametrize(("text", "names"), [
    ("accuracy", ("accuracy",)),
    ("latency,accuracy", ("accuracy", "latency")),
    (" accuracy , latency ", ("accuracy", "latency")),
    ("accuracy,,latency,", ("accuracy", "latency")),
    ("accuracy,accuracy", ("accuracy",)),
    ("latency,accuracy,latency", ("accuracy", "latency")),
])
def test_objective_names_are_trimmed_deduplicated_and_put_in_order(text, names):
    assert parse(text).names == names


def test_parse_keeps_the_format_and_budget_and_defaults_to_accuracy_alone():
    assert parse() == Objectives(("accuracy",), "tflite", None)
    assert parse("accuracy,latency", "tflite-int8", 2.5) == Objectives(("accuracy", "latency"), "tflite-int8", 2.5)
    assert parse("accuracy", max_latency_ms=1e-6).max_latency_ms == 1e-6  # any positive budget


def test_the_properties_follow_the_names_and_budget():
    single, multi, budget = parse(), parse("accuracy,latency"), parse(max_latency_ms=3.0)
    assert (single.multi, single.measures_latency, single.directions) == (False, False, ["maximize"])
    assert (multi.multi, multi.measures_latency, multi.directions) == (True, True, ["maximize", "minimize"])
    assert (budget.multi, budget.measures_latency, budget.directions) == (False, True, ["maximize"])


@pytest.mark.parametrize(("args", "message"), [
    (("latency",), "--objectives latency: give accuracy or accuracy,latency"),
    (("",), "--objectives : give accuracy or accuracy,latency"),
    (("accuracy,size",), "--objectives accuracy,size: give accuracy or accuracy,latency"),
    (("Accuracy",), "--objectives Accuracy: give accuracy or accuracy,latency"),
    (("accuracy", "onnx"), "--format onnx: latency is measured for tflite or tflite-int8"),
    (("accuracy", "tflite", 0.0), "--max-latency-ms 0: give a positive number of milliseconds"),
    (("accuracy", "tflite", -2.5), "--max-latency-ms -2.5: give a positive number of milliseconds"),
    (("accuracy", "tflite", math.nan), "--max-latency-ms nan: give a positive number of milliseconds"),
])
def test_bad_options_name_the_option_and_the_fix(args, message):
    with pytest.raises(UsageError) as caught:
        parse(*args)
    assert str(caught.value) == message


# ---------------------------------------------------------------------------------------------
# front


def test_the_front_is_fastest_first_and_empty_for_accuracy_alone():
    a, b, c = _trial(0, 0.97, 3.0), _trial(1, 0.90, 1.0), _trial(2, 0.95, 2.0)
    study = _Study([a, b, c])
    assert objectives.front(study, parse("accuracy,latency")) == [b, c, a]
    assert objectives.front(study, parse("accuracy")) == []
    assert objectives.front(study, parse("accuracy", max_latency_ms=5.0)) == []  # a budget alone is one objective


def test_the_front_sorts_by_the_second_value_then_the_more_accurate_first():
    # values[1] is what the study minimised; equal latencies: the more accurate first
    slow, tie_low, tie_high = _trial(0, 0.99, 9.0), _trial(1, 0.80, 2.0), _trial(2, 0.85, 2.0)
    other = _trial(3, 0.5, 0.5, latency2=5.0)  # its own latency attribute is not what the front sorts by
    assert objectives.front(_Study([slow, tie_low, tie_high, other]), parse("accuracy,latency")) == [
        tie_high, tie_low, other, slow]


# ---------------------------------------------------------------------------------------------
# choose


def test_choose_takes_the_most_accurate_finished_trial_and_the_faster_on_a_tie():
    trials = [_trial(0, 0.90, 1.0), _trial(1, 0.95, 3.0), _trial(2, 0.95, 2.0), _trial(3, 0.99, 0.5, state="PRUNED"),
              _trial(4, 0.99, 0.5, state="FAIL")]
    assert objectives.choose(_Study(trials), parse()).number == 2
    assert objectives.choose(_Study(trials), parse("accuracy,latency")).number == 2


def test_on_a_tie_in_accuracy_and_latency_the_earlier_trial():
    trials = [_trial(3, 0.9, 1.0), _trial(5, 0.9, 1.0), _trial(4, 0.8, 0.5)]
    assert objectives.choose(_Study(trials), parse()).number == 3
    assert objectives.choose(_Study(trials), parse(max_latency_ms=1.0)).number == 3


def test_on_a_tie_a_trial_without_a_latency_counts_as_zero_ms():
    trials = [_trial(0, 0.9, 0.5), _trial(1, 0.9, None), _trial(2, 0.9, 0.7)]
    assert objectives.choose(_Study(trials), parse()).number == 1
    assert objectives.choose(_Study(trials[::-1]), parse()).number == 1


def test_choose_ranks_ties_by_the_chosen_formats_latency():
    trials = [_trial(0, 0.9, 1.0, int8=0.9), _trial(1, 0.9, 2.0, int8=0.3)]
    assert objectives.choose(_Study(trials), parse()).number == 0
    assert objectives.choose(_Study(trials), parse("accuracy", "tflite-int8")).number == 1


def test_choose_with_nothing_finished_is_none():
    assert objectives.choose(_Study([]), parse()) is None
    assert objectives.choose(_Study([_trial(0, 0.9, 1.0, state="RUNNING")]), parse("accuracy,latency")) is None


def test_a_budget_keeps_the_trials_at_or_under_it_in_its_format():
    trials = [_trial(0, 0.99, 3.0, int8=1.5), _trial(1, 0.95, 2.0, int8=2.0), _trial(2, 0.90, 1.0, int8=1.0),
              _trial(3, 0.999, None), _trial(4, 0.995, 0.1, state="PRUNED")]
    study = _Study(trials)
    assert objectives.choose(study, parse(max_latency_ms=2.0)).number == 1  # exactly at the budget counts
    assert objectives.choose(study, parse(max_latency_ms=1.99)).number == 2
    assert objectives.choose(study, parse(max_latency_ms=3.0)).number == 0  # never the unmeasured trial 3
    assert objectives.choose(study, parse("accuracy", "tflite-int8", 1.5)).number == 0
    assert objectives.choose(study, parse("accuracy,latency", "tflite-int8", 1.49)).number == 2


def test_an_impossible_budget_names_the_fastest_finished_trial():
    trials = [_trial(0, 0.9, 3.0), _trial(1, 0.8, None), _trial(2, 0.7, 1.25), _trial(3, 0.6, 0.01, state="PRUNED")]
    with pytest.raises(UsageError) as caught:
        objectives.choose(_Study(trials), parse(max_latency_ms=0.5))
    assert str(caught.value) == ("--max-latency-ms 0.5: no finished trial is within it (tflite); the fastest finished "
                                 "trial (2) takes 1.25 ms; raise the budget, or add smaller sizes to the space")
    with pytest.raises(UsageError) as caught:  # in the other format nothing was measured: no hint
        objectives.choose(_Study(trials), parse("accuracy", "tflite-int8", 0.5))
    assert str(caught.value) == ("--max-latency-ms 0.5: no finished trial is within it (tflite-int8); raise the "
                                 "budget, or add smaller sizes to the space")
    with pytest.raises(UsageError) as caught:  # nothing finished at all
        objectives.choose(_Study(trials[3:]), parse(max_latency_ms=0.5))
    assert str(caught.value) == ("--max-latency-ms 0.5: no finished trial is within it (tflite); raise the budget, or "
                                 "add smaller sizes to the space")


# ---------------------------------------------------------------------------------------------
# below_same_size_median


def _pruning_study(curves, size=160, **kw):
    return _Study([_trial(i, c[-1], 1.0, size=size, curve=c, **kw) for i, c in enumerate(curves)])


def test_prune_below_the_median_of_same_size_peers_at_that_epoch():
    study = _pruning_study([[0.1, 0.2, 0.30, 0.9], [0.1, 0.2, 0.50, 0.9], [0.1, 0.2, 0.70, 0.9]])
    me = _trial(99, size=160, curve=[0.1, 0.2])
    below = objectives.below_same_size_median
    assert below(study, me, 2, 0.49, 160)  # median of 0.3, 0.5, 0.7 is 0.5
    assert not below(study, me, 2, 0.50, 160)  # equal to the median: kept
    assert not below(study, me, 2, 0.51, 160)
    assert below(study, me, 3, 0.89, 160)  # at epoch 3 their median is 0.9


def test_the_median_of_an_even_number_of_peers_is_the_mean_of_the_middle_two():
    study = _pruning_study([[0, 0, 0.2], [0, 0, 0.4], [0, 0, 0.6], [0, 0, 1.0]])
    me = _trial(99, size=160)
    assert statistics.median([0.2, 0.4, 0.6, 1.0]) == pytest.approx(0.5)
    assert objectives.below_same_size_median(study, me, 2, 0.49, 160)
    assert not objectives.below_same_size_median(study, me, 2, 0.51, 160)


def test_no_pruning_before_epoch_2_nor_with_fewer_than_3_peers():
    curves = [[0.9, 0.9, 0.9, 0.9]] * 3
    me = _trial(99, size=160)
    assert objectives.PRUNE_AFTER_STEP == 2 and objectives.PRUNE_AFTER_TRIALS == 3
    for step in (0, 1):
        assert not objectives.below_same_size_median(_pruning_study(curves), me, step, 0.0, 160)
    assert objectives.below_same_size_median(_pruning_study(curves), me, 2, 0.0, 160)
    assert not objectives.below_same_size_median(_pruning_study(curves[:2]), me, 2, 0.0, 160)


def test_only_finished_other_same_size_trials_long_enough_are_peers():
    good = [[0.5, 0.5, 0.8]] * 3
    me = _trial(0, size=160)
    below = objectives.below_same_size_median
    assert below(_pruning_study(good), _trial(99, size=160), 2, 0.7, 160)
    # the trial itself is no peer: with it, 3 peers; without, 2
    assert not below(_pruning_study(good), me, 2, 0.7, 160)
    # unfinished trials are no peers
    assert not below(_pruning_study(good, state="PRUNED"), _trial(99), 2, 0.7, 160)
    assert not below(_pruning_study(good, state="RUNNING"), _trial(99), 2, 0.7, 160)
    # other sizes are no peers
    assert not below(_pruning_study(good, size=96), _trial(99), 2, 0.7, 160)
    # a trial without the size parameter (a space without sizes) counts as this size
    assert below(_Study([_trial(i, curve=c) for i, c in enumerate(good)]), _trial(99), 2, 0.7, 160)
    # curves that stop at this epoch, or have none, are no peers
    assert not below(_pruning_study([[0.5, 0.8]] * 3), _trial(99), 2, 0.7, 160)
    assert not below(_Study([_trial(i, size=160) for i in range(3)]), _trial(99), 2, 0.7, 160)


def test_the_best_so_far_of_this_trial_is_what_counts():
    study = _pruning_study([[0.5, 0.5, 0.8]] * 3)
    below = objectives.below_same_size_median
    assert not below(study, _trial(99, curve=[0.85, 0.1]), 2, 0.1, 160)  # its epoch 0 was above the median
    assert not below(study, _trial(99, curve=[0.1, 0.85]), 2, 0.1, 160)
    assert below(study, _trial(99, curve=[0.1, 0.2, 0.95]), 2, 0.1, 160)  # epoch 2 onward: the value given
    assert below(study, _trial(99), 2, 0.79, 160)  # no curve yet: the value alone
