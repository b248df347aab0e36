"""The run state, as Hugging Face's `TrainerState`: where the two phases stand. Every epoch's callbacks see it,
every checkpoint saves it, and `--resume` restores it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

HISTORY_COLUMNS = ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"]


@dataclass
class RunState:
    """The history (one row per completed epoch, over both phases), the test predictions made after each phase
    so far, and, from a checkpoint written mid-phase, the optimizer's variables by name."""

    history: list[dict[str, Any]] = field(default_factory=list)
    test_probs: dict[int, np.ndarray] = field(default_factory=dict)  # phase -> test probabilities after it
    optimizer: dict[str, np.ndarray] | None = None  # what the resumed phase's optimizer starts from

    @property
    def epoch(self) -> int:
        """Epochs completed, counted over both phases."""
        return len(self.history)

    def phase_history(self, phase: int) -> list[dict[str, Any]]:
        """The rows up to the end of `phase`."""
        return [row for row in self.history if row["phase"] <= phase]
