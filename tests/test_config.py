import pytest
import yaml

from mobiletune.config import Config, load_config, parse_override
from mobiletune.errors import ConfigError


def test_defaults_are_the_seed_recipe():
    flat = Config().flat()
    assert flat["data.image_size"] == 160 and flat["data.batch_size"] == 32 and flat["data.seed"] == 0
    assert flat["augment.flip"] == "horizontal" and flat["augment.rotation"] == 0.2
    assert flat["model.alpha"] == 1.0 and flat["model.weights"] == "imagenet" and flat["model.dropout"] == 0.2
    assert flat["model.bn_mode"] == "inference"
    assert (flat["phase1.epochs"], flat["phase1.lr"], flat["phase1.optimizer"]) == (10, 1e-4, "rmsprop")
    assert (flat["phase2.epochs"], flat["phase2.fine_tune_at"], flat["phase2.lr_ratio"]) == (10, 100, 0.1)
    assert flat["phase2.optimizer"] == "rmsprop"


def test_yaml_then_set_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("phase1: {lr: 0.0003, epochs: 4}\nphase2:\n  fine_tune_at: 80\n")
    config = load_config(recipe, ["phase2.fine_tune_at=120", "augment.flip=none"])
    assert config.phase1.lr == 3e-4 and config.phase1.epochs == 4
    assert config.phase2.fine_tune_at == 120  # --set wins over the file
    assert config.augment.flip == "none"
    assert config.phase2.epochs == 10  # untouched keys keep defaults


def test_saved_yaml_round_trips(tmp_path):
    config = load_config(overrides=["phase1.lr=2e-4", "data.seed=7"])
    saved = tmp_path / "config.yaml"
    saved.write_text(config.to_yaml())
    assert load_config(saved) == config
    assert yaml.safe_load(saved.read_text())["phase1"]["lr"] == 2e-4


def test_int_accepted_for_float():
    assert load_config(overrides=["augment.rotation=0"]).augment.rotation == 0.0


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("phase1.lr=-1", "phase1.lr=-1"),
        ("phase1.lr=0", "phase1.lr=0"),
        ("phase2.fine_tune_at=500", "MobileNetV2 has 154 layers"),
        ("phase2.fine_tune_at=-1", "phase2.fine_tune_at=-1"),
        ("data.image_size=16", "32 to 1024"),
        ("phase1.epochs=ten", "expected int, got str"),
        ("phase1.epochs=2.5", "expected int, got float"),
        ("data.strict=yes please", "expected bool"),
        ("model.bn_mode=frozen", "one of inference, train"),
        ("phase1.optimizer=adamw", "one of rmsprop, adam, sgd"),
        ("augment.flip=diagonal", "augment.flip='diagonal'"),
        ("model.alpha=0.6", "with ImageNet weights"),
        ("model.weights=/no/such/file.h5", "model.weights='/no/such/file.h5'"),
        ("phase1.lr=.nan", "finite"),
        ("phase3.epochs=1", "unknown config key 'phase3.epochs'"),
        ("phase1.learning_rate=1", "unknown config key 'phase1.learning_rate'"),
    ],
)
def test_bad_values_name_key_and_value(override, needle):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(overrides=[override])
    assert needle in str(info.value)


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("phase1.lr")


def test_yaml_merge_keys_still_read(tmp_path):
    """A key given twice is refused, but a merge key's keys may be given again: that is what `<<` is for."""
    from mobiletune.config import load_yaml

    path = tmp_path / "recipe.yaml"
    path.write_text("base: &b {lr: 0.1, epochs: 4}\nphase1: {<<: *b, epochs: 5}\n")
    assert load_yaml(path, "--config")["phase1"] == {"lr": 0.1, "epochs": 5}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (None, "no such file"),
        ("phase1: {lr: [\n", "not valid YAML"),
        ("lr: 0.1\n", "section 'lr' must be a mapping"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("data:\n\timage_size: 96\n", r"not valid YAML at line 2, column 1: .*YAML indents with spaces, not tabs"),
        ("data:\n  image_size: 96\ndata:\n  batch_size: 8\n", "at line 3, column 1: 'data' is given twice"),
        ("phase1:\n  epoch: 3\n", r".*recipe.yaml: unknown config key 'phase1.epoch' \(did you mean "
                                   r"phase1.epochs\?\)"),
        ("? [a, b]\n: 1\n", "at line 1, column 3: a list or mapping cannot be a key"),
    ],
    ids=["missing", "broken", "flat", "list", "tab", "twice", "typo", "list-key"],
)
def test_bad_yaml_files(tmp_path, text, needle):
    path = tmp_path / "recipe.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


def test_config_is_frozen():
    config = Config()
    with pytest.raises(AttributeError):
        config.phase1.lr = 1.0  # type: ignore[misc]
