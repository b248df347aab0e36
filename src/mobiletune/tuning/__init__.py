"""Tuning the recipe (`mobiletune sweep`): an Optuna study of trials on cached features, its choice, and its summary."""
