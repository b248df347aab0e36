"""The sweep's search space: config keys and the ranges Optuna draws them from.

The default space holds the knobs that matter for fine-tuning MobileNetV2, input size first (on
cats vs dogs, 224 px beat the seed's 160 by 1.5-2.5 points after fine-tuning: docs/benchmarks.md);
the seed's recipe (trial 0 of a sweep) lies inside every range. A YAML file replaces it:
`key: {type, low, high[, log]}` or `key: [choices]`, any config key but those a sweep holds fixed (`FIXED`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mobiletune.config import all_keys, from_flat, load_yaml, unknown_key
from mobiletune.errors import ConfigError

# Sensible MobileNetV2 ranges; the seed's recipe (trial 0) lies inside every one of them.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    # the strongest knob here; each size has its own feature cache entry, and the latency it costs
    # is measured per size (`mobiletune sweep --objectives accuracy,latency`). Keras has ImageNet
    # weights trained at each of these sizes.
    "data.image_size": {"type": "categorical", "choices": [96, 128, 160, 192, 224]},
    "phase1.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
    "phase2.lr_ratio": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
    # how many top layers to unfreeze: 54, 34, 14 or 4 of 154; 0 and 50 cost far more per epoch
    "phase2.fine_tune_at": {"type": "categorical", "choices": [100, 120, 140, 150]},
    "phase1.epochs": {"type": "int", "low": 2, "high": 10},
    "phase2.epochs": {"type": "int", "low": 2, "high": 10},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
    # each augmentation setting needs its own feature extraction pass: a few choices, not a range
    "augment.rotation": {"type": "categorical", "choices": [0.1, 0.2]},
}


# Keys a sweep holds fixed (set them with --set): every trial is compared on one split, from one base network.
FIXED = {
    **dict.fromkeys(("data.seed", "data.test_fraction", "data.holdout_fraction", "data.exclude", "data.dedupe",
                     "data.audit", "data.strict"),
                    "it decides the split, and trials are compared on one split"),
    **dict.fromkeys(("model.alpha", "model.weights"),
                    "every trial starts from the one base network; sweep each in its own --out"),
    **dict.fromkeys(("features.cache", "features.cache_dir"), "trials always train on the feature cache"),
}


def load_space(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """The default space, or one from YAML: `key: {type, low, high[, log]}` or `key: [choices]`."""
    if path is None:
        return DEFAULT_SPACE
    path = Path(path)
    raw = load_yaml(path, "--space")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"--space {path}: expected a mapping of config keys to ranges, e.g. 'phase1.lr: "
                          "{type: float, low: 1e-5, high: 1e-3, log: true}'")
    space = {}
    for key, spec in raw.items():
        if key not in all_keys():
            raise ConfigError(f"--space {path}: {unknown_key(key)}")
        if key in FIXED:
            raise ConfigError(f"--space {path}: {key} cannot be searched ({FIXED[key]}); set it with --set {key}=...")
        if isinstance(spec, list):
            spec = {"type": "categorical", "choices": spec}
        if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
            raise ConfigError(f"--space {path}: {key}: give a list of choices or {{type: float|int, low, high}}")
        if spec["type"] == "categorical" and not spec.get("choices"):
            raise ConfigError(f"--space {path}: {key}: choices must be a non-empty list")
        if spec["type"] != "categorical":
            low, high = spec.get("low"), spec.get("high")
            if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high):
                raise ConfigError(f"--space {path}: {key}: needs numbers low < high, got low={low!r} high={high!r}")
            if spec.get("log") and low <= 0:
                raise ConfigError(f"--space {path}: {key}: a log range needs low > 0, got {low!r}")
        _check_values(path, key, spec)
        space[key] = spec
    return space


def _check_values(path: Path, key: str, spec: dict[str, Any]) -> None:
    """Every choice, or both ends of a range, must be a value the config takes: refused now, not when a trial
    draws it after others have run."""
    for value in spec["choices"] if spec["type"] == "categorical" else (spec["low"], spec["high"]):
        try:
            from_flat({key: value})
        except ConfigError as exc:
            raise ConfigError(f"--space {path}: {key}: {value!r} cannot be drawn ({exc})") from None


def suggest(trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    params = {}
    for key, spec in space.items():
        if spec["type"] == "float":
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
        elif spec["type"] == "int":
            params[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
        else:
            params[key] = trial.suggest_categorical(key, spec["choices"])
    return params


def in_space(value: Any, spec: dict[str, Any]) -> bool:
    if spec["type"] == "categorical":
        return value in spec["choices"]
    return spec["low"] <= value <= spec["high"]
