"""Output is for people: what the libraries print for their developers stays off the console, on a
terminal and in a notebook alike. Errors still arrive, as Python exceptions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

__all__ = ["drop_retracing_warnings", "import_tensorflow", "native_output_muted", "tensorflow_info_muted"]


class _NoRetracing(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def drop_retracing_warnings() -> None:
    """TensorFlow warns when a function retraces "too often": every model we evaluate once (the head,
    the top, each split's last, smaller batch) counts, and the advice it prints does not apply."""
    logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, _NoRetracing) for f in logger.filters):
        logger.addFilter(_NoRetracing())


@contextlib.contextmanager
def native_output_muted() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block: the C++ log lines of TensorFlow, its converters and
    runtimes ("Created TensorFlow Lite XNNPACK delegate", grappler's "Starting new session") ignore
    TF_CPP_MIN_LOG_LEVEL and Python's logging."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def tensorflow_info_muted() -> Iterator[None]:
    """TensorFlow's Python INFO lines ("Assets written to ...") off for the block."""
    logger = logging.getLogger("tensorflow")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def import_tensorflow() -> None:
    """Import TensorFlow (once) without its C++ log lines: the start-up ones (oneDNN, CPU features)
    ignore TF_CPP_MIN_LOG_LEVEL, the rest (a float16 fallback notice) obey it, unless the user set it."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # real errors still reach us as Python exceptions
    with native_output_muted():
        import tensorflow  # noqa: F401
