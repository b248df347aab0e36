"""`mobiletune cache ls` and `mobiletune cache clear`: the feature cache, listed or cleared."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mobiletune.cli.common import console, one_line_errors

cache_app = typer.Typer(help="The feature cache: list or clear it.", no_args_is_help=True, rich_markup_mode="markdown")
CacheDirOption = Annotated[
    Optional[Path], typer.Option("--cache-dir", help="Cache folder [default: ~/.cache/mobiletune].")
]


@cache_app.command("ls")
@one_line_errors
def cache_ls(cache_dir: CacheDirOption = None) -> None:
    """List the feature stores and the data sets that used them, most recently used first."""
    import datetime

    from rich.table import Table

    from mobiletune.features.cache import default_cache_dir, list_cache, list_extractors

    def when(t: float) -> str:
        return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")

    stores, datasets = list_cache(cache_dir)
    table = Table(title=f"feature stores in {cache_dir or default_cache_dir()}")
    for column in ("store", "size px", "fine_tune_at", "image views", "shards", "MB", "last used"):
        table.add_column(column, justify="left" if column in ("store", "last used") else "right")
    for e in stores:
        table.add_row(e.key[:12], str(e.image_size), e.fine_tune_at, f"{e.items:,}", str(e.shards),
                      f"{e.megabytes:,.1f}", when(e.last_used))
    console.print(table)
    used = Table(title="data sets")
    for column in ("store", "images", "MB", "last used"):
        used.add_column(column, justify="right" if column in ("images", "MB") else "left")
    used.add_column("data set", overflow="fold")  # last, and whole: a long path wraps instead of being cut
    for d in datasets:
        used.add_row(d["store"][:12], f"{d['images']:,}", f"{d['megabytes']:,.1f}", when(d["last_used"]),
                     d["data_dir"])
    console.print(used)
    extractors = list_extractors(cache_dir)
    extractor_mb = sum(p.stat().st_size for p in extractors) / 2**20
    console.print(f"{len(stores)} store(s), {sum(e.megabytes for e in stores):,.1f} MB; "
                  f"{len(extractors)} exported extractor(s), {extractor_mb:.1f} MB")


def _age_seconds(text: str) -> float:
    """'30d', '12h', '45m' or '90s' -> seconds; anything else is a usage error naming the value."""
    from mobiletune.errors import UsageError

    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    try:
        value = float(text[:-1])
        if text[-1:] not in units or value < 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"--older-than {text!r}: give an age like 30d, 12h, 45m or 90s") from None
    return value * units[text[-1]]


@cache_app.command("clear")
@one_line_errors
def cache_clear(
    cache_dir: CacheDirOption = None,
    older_than: Annotated[
        Optional[str], typer.Option("--older-than", help="Keep what was used more recently than this age, e.g. 30d.")
    ] = None,
) -> None:
    """Delete cached features and exported extractors (all, or those unused for --older-than); they are made
    again when needed."""
    from mobiletune.features.cache import clear_cache

    age = None if older_than is None else _age_seconds(older_than)
    removed, megabytes = clear_cache(cache_dir, age)
    console.print(f"removed {removed} shard(s), extractor(s) and record(s): {megabytes:,.1f} MB freed")
