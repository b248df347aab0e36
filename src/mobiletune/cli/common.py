"""What every command shares: the consoles, and one line and an exit code for every error a user can fix."""

from __future__ import annotations

import functools

import typer
from rich.console import Console

from mobiletune.errors import MobiletuneError

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False)


def one_line_errors(command):
    """Turn library errors into `error: ...` and an exit code instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MobiletuneError as exc:
            err_console.print(f"error: {exc}", markup=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            err_console.print(f"error: {where}{exc.strerror or exc}", markup=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("interrupted", markup=False)
            raise typer.Exit(130) from None

    return wrapper
