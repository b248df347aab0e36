"""mobiletune: fine-tune a pretrained MobileNetV2 on your own images.

    import mobiletune as mt
    run = mt.train("data/", out="runs/a")
    run.predict(["photo.jpg"])

The whole surface is below (`__all__`); docs/python-api.md walks through it.
"""

__version__ = "0.1.0"

from mobiletune.api import Run, load, make_config, sweep, train  # noqa: E402
from mobiletune.config import Config  # noqa: E402
from mobiletune.errors import (  # noqa: E402
    ConfigError,
    DataError,
    ExportError,
    MobiletuneError,
    ModelError,
    UsageError,
)
from mobiletune.predict import Prediction  # noqa: E402

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
    "load",
    "make_config",
    "sweep",
    "train",
]
