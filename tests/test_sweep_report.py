"""The sweep summary's arithmetic (the end-to-end sweep tests cover its files)."""


def test_sweep_summary_bins_each_trial_once_and_integers_as_integers():
    from types import SimpleNamespace

    from mobiletune.tuning.summary import _effect

    trials = [SimpleNamespace(params={"epochs": e, "lr": lr}, values=[acc])
              for e, lr, acc in [(3, 1e-4, .97), (6, 2e-4, .96), (9, 3e-4, .95), (10, 1e-3, .974), (8, 5e-4, .9),
                                 (5, 5e-5, .93)]]
    assert _effect(trials, "epochs", {"type": "int"}) == "3-5: 0.970; 6-7: 0.960; 8-10: 0.974"
    assert _effect(trials, "lr", {"type": "float"}) == "5e-05-0.000167: 0.970; 0.000167-0.000367: 0.960; " \
                                                       "0.000367-0.001: 0.974"
    assert _effect(trials[:1], "epochs", {"type": "int"}) == "3: 0.970"
    assert _effect([], "epochs", {"type": "int"}) == "-"


def test_sweep_summary_says_when_fine_tuning_made_a_config_worse(tmp_path):
    """McNemar's test for both runs in the test-set table; the advice only for the one fine-tuning hurt."""
    import optuna

    from mobiletune.config import load_config
    from mobiletune.tuning import objectives
    from mobiletune.tuning.summary import write_sweep_summary

    space = {"phase1.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    study = optuna.create_study(direction="maximize")
    for value, lr in ((0.7, 1e-4), (0.9, 1e-3)):
        study.add_trial(optuna.trial.create_trial(params={"phase1.lr": lr}, distributions={
            "phase1.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}, value=value))

    def run(before, after, mc):
        return {"before_fine_tuning": {"test": {"accuracy": before, "loss": 1.0}},
                "after_fine_tuning": {"test": {"accuracy": after, "loss": 0.5}}, "mcnemar": mc}

    results = {"counts": {"COMPLETE": 2}, "search_seconds": 10, "total_seconds": 20,
               "default": run(0.8, 0.4, {"p_value": 0.0386, "only_after_right": 2, "only_before_right": 10}),
               "best": run(0.6, 0.7, {"p_value": 0.2, "only_after_right": 5, "only_before_right": 2})}
    base = load_config()
    write_sweep_summary(tmp_path / "summary.md", study, space, base, load_config(overrides=["phase1.lr=0.001"]),
                        results, objectives.Objectives(), study.trials[1])
    text = (tmp_path / "summary.md").read_text()
    assert "| p = 0.0386 (2 right only after, 10 only before) |" in text
    assert "| p = 0.2 (5 right only after, 2 only before) |" in text
    assert text.count("Fine-tuning made the model worse") == 1
    assert "The default recipe: Fine-tuning made the model worse" in text
