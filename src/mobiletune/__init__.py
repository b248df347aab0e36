"""mobiletune: fine-tune a pretrained MobileNetV2 on your own images.

    import mobiletune as mt
    run = mt.train("data/", out="runs/a")
    run.predict(["photo.jpg"])

The whole surface is below (`__all__`); docs/python-api.md walks through it.
"""

from mobiletune.api import Run, audit_folder, load, make_config, sweep, train
from mobiletune.config import Config
from mobiletune.errors import (
    ConfigError,
    DataError,
    ExportError,
    MobiletuneError,
    ModelError,
    UsageError,
)
from mobiletune.ship.predict import Prediction
from mobiletune.version import __version__

__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "ExportError",
    "MobiletuneError",
    "ModelError",
    "Prediction",
    "Run",
    "UsageError",
    "__version__",
    "audit_folder",
    "load",
    "make_config",
    "sweep",
    "train",
]
