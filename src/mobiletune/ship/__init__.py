"""Shipping: exports in every format, each re-tested, prediction from any of them, and measured latency."""
