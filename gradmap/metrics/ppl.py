"""PPL criterion (Shortened LLaMA; Kim et al., 2024): calibration loss with each layer removed alone.

    P_ℓ = L(model without layer ℓ)     (mean next-token loss on the calibration set)

One forward per removable layer; a layer is bypassed in the forward (its input
passes through unchanged), never copied. One-shot: the iterative version is SLEB.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Metric, ScoringRun
from .capture import calibration_loss

__all__ = ["PPL", "skip_losses"]


def skip_losses(run: ScoringRun, desc: str) -> dict[int, float]:
    """ORIGINAL index -> calibration loss with that layer bypassed, for every removable layer."""
    losses = {}
    for i in run.removable:
        layer = run.adapter.layers[run.adapter.position_of(i)]
        losses[i] = calibration_loss(run.model, run.calib, run.batch_size, skip=layer,
                                     progress=run.progress, desc=f"{desc}: skip layer {i}")
    return losses


@dataclass
class PPL(Metric):
    """Loss with each layer removed alone; one-shot only."""

    name: ClassVar[str] = "ppl"
    schedules: ClassVar[tuple[str, ...]] = ("one-shot",)

    def score(self, run: ScoringRun) -> dict[int, float]:
        return skip_losses(run, "ppl")
