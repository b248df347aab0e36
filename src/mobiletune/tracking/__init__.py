"""Tracking: TensorBoard event files for every run, and an MLflow run when asked for."""
