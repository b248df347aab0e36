"""The before/after results table: one set of rows from metrics.json, rendered for markdown (summary.md, the
model card), the console, and HTML (report.html, through its own table renderer), so every place shows the same
figures the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STAGES = (("before_fine_tuning", "before fine-tuning"), ("after_fine_tuning", "after fine-tuning"))
COLUMNS = ("stage", "accuracy", "95% interval", "loss", "balanced accuracy", "ROC-AUC", "ECE")
BRIEF = 5  # the console and summary.md: stage, accuracy, interval, loss, balanced accuracy (accuracy alone hides a
# class the model misses)


@dataclass(frozen=True)
class ResultsTable:
    """Header and text rows; the first column names the stage, the others are right-aligned figures."""

    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]

    def markdown(self) -> list[str]:
        return ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns),
                *("| " + " | ".join(row) + " |" for row in self.rows)]

    def rich(self, title: str):
        from rich.table import Table

        table = Table(title=title)
        for column in self.columns:
            table.add_column(column, justify="left" if column == self.columns[0] else "right")
        for row in self.rows:
            table.add_row(*row)
        return table


def results_table(metrics: dict[str, Any], brief: bool = False) -> ResultsTable:
    """Each stage's test figures in metrics.json; `brief`: the first `BRIEF` columns."""
    width = BRIEF if brief else len(COLUMNS)
    rows = []
    for stage, label in STAGES:
        test = metrics.get(stage, {}).get("test")
        if not test:
            continue
        lo, hi = test.get("accuracy_ci95", (float("nan"), float("nan")))
        auc = (test.get("roc") or {}).get("auc")
        row = (label, f"{test['accuracy']:.2%}", f"{lo:.1%} to {hi:.1%}", f"{test['loss']:.4f}",
               f"{test.get('balanced_accuracy', float('nan')):.2%}", "-" if auc is None else f"{auc:.4f}",
               f"{test.get('calibration', {}).get('ece', float('nan')):.3f}")
        rows.append(row[:width])
    return ResultsTable(COLUMNS[:width], rows)
