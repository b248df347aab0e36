"""The recipe as a typed, frozen config: defaults <- YAML file <- `--set key=value`.

Defaults are the seed write-up's recipe (TensorFlow's MobileNetV2 transfer-learning tutorial).
Every key is `section.field`; unknown keys and bad values raise `ConfigError` naming the key,
the value received and what is allowed. The resolved config is saved in every run folder.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mobiletune.errors import ConfigError

# MobileNetV2(include_top=False) has this many layers for every alpha; model/network.py's build_base asserts it.
BASE_LAYERS = 154
# Width multipliers Keras publishes ImageNet weights for.
IMAGENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
OPTIMIZERS = ("rmsprop", "adam", "sgd")
FLIPS = ("horizontal", "vertical", "horizontal_and_vertical", "none")
BN_MODES = ("inference", "train")
ENGINES = ("onnxruntime", "tensorflow")
CLASS_WEIGHTS = ("none", "auto")
UNKNOWN_SCORES = ("knn", "energy", "msp")
AUDITS = ("none", "duplicates", "full")


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 160  # the tutorial's 160x160: a size Keras ships ImageNet weights for
    batch_size: int = 32  # the tutorial's batch; also the batch of every inference pass
    seed: int = 0  # one seed drives the split, the shuffles, augmentation and initial weights
    test_fraction: float = 0.2  # share of validation/ held out as test when there is no test/
    holdout_fraction: float = 0.1  # with class folders only: validation and test each get this
    strict: bool = False  # True: an unreadable image is an error instead of a reported skip
    class_weight: str = "none"  # "auto": weight each class by n / (classes x its count), for imbalanced data
    audit: str = "duplicates"  # every run: exact/near duplicates and cross-split leaks (cheap: ~1 s on 3000 images
    # beyond one more view of each training image); "full" adds label errors and outliers; "none" skips it
    dedupe: bool = True  # where mobiletune makes the split, near copies stay in one split: a copy of a training
    # image in test inflates its accuracy (on by default: costs one look-up, ~1 s for 3000 images, and needs data.audit)
    exclude: str = ""  # an audit.csv or a list of paths (relative to DATA_DIR) to leave out, each reported as skipped
    parent: str = ""  # a finished run folder (`--from`): this run starts from its weights, and its training images
    # stay training images, so none can reach this run's test set; the same classes, base and cut


@dataclass(frozen=True)
class AugmentConfig:
    flip: str = "horizontal"  # RandomFlip mode, or "none"; cats and dogs are left-right symmetric
    rotation: float = 0.2  # RandomRotation factor, a fraction of a full turn (0.2 = +-72 deg)


@dataclass(frozen=True)
class ModelConfig:
    alpha: float = 1.0  # MobileNetV2 width multiplier; 1.0 is the tutorial's base
    weights: str = "imagenet"  # "imagenet" (Keras download/cache), a .h5/.weights.h5 path, or "none"
    dropout: float = 0.2  # before the new Dense head, as the tutorial
    bn_mode: str = "inference"  # BatchNorm of the base stays in inference mode; "train" lets it adapt


@dataclass(frozen=True)
class Phase1Config:
    epochs: int = 10  # feature extraction: base frozen, only the head trains (0: phase 1 is skipped)
    min_steps: int = 630  # at least this many optimizer steps in phase 1: the seed's 10 epochs of 2,000 images at
    # batch 32, so a small folder trains its head as long as the seed's (flowers_mini makes 5 steps a pass: 10
    # passes left it at 50%); an epoch then passes over the training images several times. Cheap: phase 1
    # trains on cached pooled features. 0: the seed's exact recipe, one pass an epoch
    lr: float = 1e-4  # the tutorial's base_learning_rate
    optimizer: str = "rmsprop"  # the tutorial's optimizer


@dataclass(frozen=True)
class Phase2Config:
    epochs: int = 10  # fine-tuning epochs, counted on from phase 1 (20 in all)
    fine_tune_at: int = 100  # base layers from this index on train; those below stay frozen
    lr_ratio: float = 0.1  # phase-2 lr = phase1.lr * lr_ratio: small steps keep ImageNet features
    optimizer: str = "rmsprop"  # recompiled with a fresh optimizer, as the tutorial


@dataclass(frozen=True)
class FeaturesConfig:
    cache: bool = True  # train on cached frozen-base features; False runs the plain recipe (--no-cache)
    views: int = 2  # augmented views cached per training image; each epoch draws one. 2 matched 4 (and
    # the uncached recipe) in test accuracy side by side, at half the extraction time: docs/benchmarks.md
    cache_dir: str = ""  # "" = $XDG_CACHE_HOME/mobiletune (~/.cache/mobiletune); shared by runs and sweeps
    engine: str = "onnxruntime"  # runs the frozen forward pass: ~1.9x TensorFlow on CPU; or "tensorflow"


@dataclass(frozen=True)
class PredictConfig:
    keep: float = 0.95  # share of in-distribution scores (validation images, and with knn each training image left
    # out in turn) the unknown-input threshold accepts; the rest is the share of real images called "unknown"
    unknown_score: str = "knn"  # how unlike the training images an input is: "knn" (distance to the k-th nearest
    # training image's features) separated unseen kinds of images best here (docs/unknown-inputs.md); or
    # "energy", "msp" (1 - top probability), which need only the logits
    knn_k: int = 3  # the k-th nearest training image: 3 flagged the most unknowns at 95% kept over 20-1000 images
    # a class and 96-224 px (5 let through up to 3x as many at 60 a class); 1 follows single images, near copies


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    phase1: Phase1Config = field(default_factory=Phase1Config)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """`{"section.field": value}` for every key, in declaration order."""
        return {f"{s}.{k}": v for s, fields in self.to_dict().items() for k, v in fields.items()}

    def phase_lr(self, phase: int) -> float:
        """Phase 1's learning rate, or phase 2's: phase 1's times phase2.lr_ratio."""
        return self.phase1.lr if phase == 1 else self.phase1.lr * self.phase2.lr_ratio

    def passes_per_epoch(self, phase: int, steps_per_pass: int) -> int:
        """How many passes over the training images (of `steps_per_pass` optimizer steps) make one epoch:
        in phase 1 as many as `phase1.epochs` epochs need to take `phase1.min_steps` steps; else 1."""
        p1 = self.phase1
        if phase == 2 or p1.epochs == 0:
            return 1
        return max(1, -(-p1.min_steps // (p1.epochs * max(1, steps_per_pass))))

    def phase_optimizer(self, phase: int) -> str:
        """The optimizer phase 1 or phase 2 is compiled with."""
        return self.phase1.optimizer if phase == 1 else self.phase2.optimizer


# ---------------------------------------------------------------------------------------------
# Building a config from layers of overrides


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides; validated."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_flatten(_read_yaml(Path(path)), source=str(path)))
    for item in overrides or []:
        key, value = parse_override(item)
        values[key] = value
    return from_flat(values)


def parse_override(item: str) -> tuple[str, Any]:
    """`"phase1.lr=3e-4"` -> `("phase1.lr", 3e-4)`; the value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set phase1.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def from_flat(values: dict[str, Any]) -> Config:
    """A validated Config from `{"section.field": value}`; missing keys keep their defaults."""
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    by_section: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for key, value in values.items():
        section, _, name = key.partition(".")
        if section not in sections or name not in _field_types(section):
            raise ConfigError(unknown_key(key))
        by_section[section][name] = _coerce(key, _field_types(section)[name], value)
    config = Config(**{s: _section_class(s)(**kw) for s, kw in by_section.items()})
    validate(config)
    return config


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *common`: the keys it brings may be given again, that is what it is for
            key = self.construct_object(key_node, deep=deep)
            try:
                twice = key in seen
                seen.add(key)
            except TypeError:  # a list or mapping as a key
                raise yaml.constructor.ConstructorError(None, None, "a list or mapping cannot be a key",
                                                        key_node.start_mark) from None
            if twice:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice", key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml(path: Path, option: str) -> Any:
    """A YAML file's content, or a ConfigError naming the option, the file, the line and column, and the problem."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 - a safe loader
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{option} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        hint = "; YAML indents with spaces, not tabs" if "\\t" in problem else ""
        raise ConfigError(f"{option} {path}: not valid YAML{where}: {problem}{hint}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    data = load_yaml(path, "--config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _flatten(data: dict[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, fields in data.items():
        if not isinstance(fields, dict):
            raise ConfigError(
                f"{source}: section {section!r} must be a mapping, got {fields!r}; "
                f"e.g. 'phase1: {{lr: 0.0001}}'"
            )
        for name, value in fields.items():
            if f"{section}.{name}" not in all_keys():
                raise ConfigError(f"{source}: {unknown_key(f'{section}.{name}')}")
            flat[f"{section}.{name}"] = value
    return flat


def _section_class(section: str) -> type:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}[section]  # type: ignore[return-value]


def _field_types(section: str) -> dict[str, str]:
    return {f.name: f.type for f in dataclasses.fields(_section_class(section))}  # type: ignore[misc]


def all_keys() -> list[str]:
    return list(Config().flat())


def unknown_key(key: str) -> str:
    """What to say of a key no config has: the nearest known one, then every known key."""
    import difflib

    near = difflib.get_close_matches(key, all_keys(), n=1)
    return (f"unknown config key {key!r}" + (f" (did you mean {near[0]}?)" if near else "")
            + f"; known keys: {', '.join(all_keys())}")


def _coerce(key: str, type_name: str, value: Any) -> Any:
    """Check a value's type; ints and numeric text (YAML reads `1e-4` as text) pass for floats."""
    if type_name == "float" and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
    }[type_name]
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {type_name}, got {type(value).__name__}")
    if type_name == "float":
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r}: expected a finite number")
    return value


# ---------------------------------------------------------------------------------------------
# Validation: every rule names the key, the value and what is allowed


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def validate(config: Config) -> None:
    d, a, m, p1, p2 = config.data, config.augment, config.model, config.phase1, config.phase2
    _check(32 <= d.image_size <= 1024, "data.image_size", d.image_size,
           "MobileNetV2 takes 32 to 1024 px (ImageNet weights exist for 96, 128, 160, 192, 224)")
    _check(1 <= d.batch_size <= 4096, "data.batch_size", d.batch_size, "use 1 to 4096")
    _check(d.seed >= 0, "data.seed", d.seed, "use a non-negative integer")
    _check(0 < d.test_fraction < 1, "data.test_fraction", d.test_fraction, "use a fraction in (0, 1)")
    _check(0 < d.holdout_fraction < 0.5, "data.holdout_fraction", d.holdout_fraction,
           "use a fraction in (0, 0.5)")
    _check(d.class_weight in CLASS_WEIGHTS, "data.class_weight", d.class_weight, "none or auto (balanced)")
    _check(d.audit in AUDITS, "data.audit", d.audit, f"one of {', '.join(AUDITS)}")
    _check(not d.exclude or Path(d.exclude).is_file(), "data.exclude", d.exclude,
           "the path of an existing audit.csv or list of paths, or empty")
    _check(a.flip in FLIPS, "augment.flip", a.flip, f"one of {', '.join(FLIPS)}")
    _check(0 <= a.rotation < 1, "augment.rotation", a.rotation,
           "a fraction of a full turn in [0, 1), e.g. 0.2")
    _check(m.alpha > 0, "model.alpha", m.alpha, "a positive width multiplier, e.g. 1.0")
    if m.weights == "imagenet":
        _check(m.alpha in IMAGENET_ALPHAS, "model.alpha", m.alpha,
               f"with ImageNet weights one of {', '.join(map(str, IMAGENET_ALPHAS))}")
    elif m.weights != "none":
        _check(Path(m.weights).is_file(), "model.weights", m.weights,
               "'imagenet', 'none' or the path of an existing weights file")
    _check(0 <= m.dropout < 1, "model.dropout", m.dropout, "a rate in [0, 1)")
    _check(m.bn_mode in BN_MODES, "model.bn_mode", m.bn_mode, f"one of {', '.join(BN_MODES)}")
    for key, phase in (("phase1", p1), ("phase2", p2)):
        _check(phase.epochs >= 0, f"{key}.epochs", phase.epochs, "zero or more epochs")
        _check(phase.optimizer in OPTIMIZERS, f"{key}.optimizer", phase.optimizer,
               f"one of {', '.join(OPTIMIZERS)}")
    _check(0 <= p1.min_steps <= 10**6, "phase1.min_steps", p1.min_steps,
           "0 (epochs as given) to 1000000 optimizer steps, e.g. 630")
    _check(0 < p1.lr <= 1, "phase1.lr", p1.lr, "a learning rate in (0, 1], e.g. 1e-4")
    _check(0 < p2.lr_ratio <= 10, "phase2.lr_ratio", p2.lr_ratio,
           "a ratio in (0, 10]; phase-2 lr = phase1.lr * lr_ratio, e.g. 0.1")
    pr = config.predict
    _check(0.5 <= pr.keep < 1, "predict.keep", pr.keep,
           "a share of in-distribution images to accept in [0.5, 1), e.g. 0.95")
    _check(pr.unknown_score in UNKNOWN_SCORES, "predict.unknown_score", pr.unknown_score,
           f"one of {', '.join(UNKNOWN_SCORES)}")
    _check(1 <= pr.knn_k <= 1000, "predict.knn_k", pr.knn_k, "1 to 1000 neighbours")
    _check(1 <= config.features.views <= 64, "features.views", config.features.views,
           "1 to 64 augmented views per training image")
    _check(config.features.engine in ENGINES, "features.engine", config.features.engine,
           f"one of {', '.join(ENGINES)}")
    _check(0 <= p2.fine_tune_at < BASE_LAYERS, "phase2.fine_tune_at", p2.fine_tune_at,
           f"a base layer index in [0, {BASE_LAYERS - 1}]: MobileNetV2 has {BASE_LAYERS} layers")
