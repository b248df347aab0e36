"""mobiletune: fine-tune a pretrained MobileNetV2 on your own images."""

__version__ = "0.1.0"
