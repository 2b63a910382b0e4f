"""What a fine-tuning run returns (:class:`FinetuneResult`) and the error it stops with on a NaN/inf."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["FinetuneResult", "NonFiniteError"]


@dataclass
class FinetuneResult:
    """What the run did: per-epoch history, the best metric and where its model is, the time spent.

    ``skipped`` counts the batches skipped for a non-finite loss or gradient (``nonfinite="skip"``), and
    ``skipped_batches`` names them: ``{"step": ..., "epoch": ..., "batch": ...}`` (step and epoch from 1, the
    batch index in the epoch from 0). Both include the steps done before a resume. ``initial_metrics``:
    ``eval_fn``'s metrics on the student before training (finetune calls it once up front to check it), or None.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    best_metric: float | None = None
    best_path: str | None = None
    seconds: float = 0.0
    resumed_from_step: int | None = None
    skipped: int = 0
    skipped_batches: list[dict[str, int]] = field(default_factory=list)
    initial_metrics: dict[str, float] | None = None


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or infinite (``nonfinite="raise"``): training stopped before the weights changed.

    ``step`` (from 1), ``epoch`` (from 1) and ``batch_index`` (in the epoch, from 0) say where.
    """

    def __init__(self, message: str, step: int, epoch: int, batch_index: int) -> None:
        super().__init__(message)
        self.step, self.epoch, self.batch_index = step, epoch, batch_index
