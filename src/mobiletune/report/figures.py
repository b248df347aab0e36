"""Figures without pyplot: a `Figure` needs no backend and is not kept by a global figure manager, so drawing a
report neither changes a notebook's backend nor leaks memory in a long sweep."""

from __future__ import annotations

from matplotlib.figure import Figure


def subplots(*grid: int, figsize: tuple[float, float], **kwargs):
    """`plt.subplots` for one figure of its own: (figure, axes)."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(*grid, **kwargs)
