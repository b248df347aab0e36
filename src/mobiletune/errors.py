"""The library's error types.

Every problem a user can cause or fix is raised as a `MobiletuneError`. The CLI turns it into
one line on stderr and its `exit_code`; nothing else should escape as a traceback.
"""

from __future__ import annotations


class MobiletuneError(Exception):
    """Base class: a message that names the thing, the value and the fix."""

    exit_code = 1


class UsageError(MobiletuneError):
    """Bad command-line usage: a missing path, an existing --out, conflicting options."""

    exit_code = 2


class ConfigError(UsageError):
    """An unknown config key or a value outside what is allowed."""


class DataError(MobiletuneError):
    """The image folder cannot be used as given (missing, empty, one class, ...)."""


class ModelError(MobiletuneError):
    """A model file or weights file that cannot be loaded or used."""


class ExportError(MobiletuneError):
    """An export that converted but lost too much accuracy, or could not be converted."""


class Interrupted(MobiletuneError):
    """Ctrl-C: training stopped after the current batch; the last epoch's checkpoint is kept."""

    exit_code = 130
