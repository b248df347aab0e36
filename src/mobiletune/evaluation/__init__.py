"""Evaluation: honest statistics of the test predictions, and the score that says "unknown"."""
