"""The sweep summary's arithmetic (the end-to-end sweep tests cover its files)."""


def test_sweep_summary_bins_each_trial_once_and_integers_as_integers():
    from types import SimpleNamespace

    from mobiletune.sweep_report import _effect

    trials = [SimpleNamespace(params={"epochs": e, "lr": lr}, values=[acc])
              for e, lr, acc in [(3, 1e-4, .97), (6, 2e-4, .96), (9, 3e-4, .95), (10, 1e-3, .974), (8, 5e-4, .9),
                                 (5, 5e-5, .93)]]
    assert _effect(trials, "epochs", {"type": "int"}) == "3-5: 0.970; 6-7: 0.960; 8-10: 0.974"
    assert _effect(trials, "lr", {"type": "float"}) == "5e-05-0.000167: 0.970; 0.000167-0.000367: 0.960; " \
                                                       "0.000367-0.001: 0.974"
    assert _effect(trials[:1], "epochs", {"type": "int"}) == "3: 0.970"
    assert _effect([], "epochs", {"type": "int"}) == "-"
