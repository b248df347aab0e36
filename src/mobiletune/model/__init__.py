"""The network: MobileNetV2 with a new head, its augmentation, the cut at `fine_tune_at`, and faster kernels for
the part above it."""
