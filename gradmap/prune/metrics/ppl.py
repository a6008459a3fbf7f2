"""PPL criterion (Shortened LLaMA; Kim et al., 2024): calibration loss with each layer removed alone.

    P_ℓ = L(model without layer ℓ)     (mean next-token loss on the calibration set)

One forward per removable layer; a layer is bypassed in the forward (its input
passes through unchanged), never copied. One-shot: the iterative version is SLEB.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gradmap.prune.metrics.base import Metric, ScoringRun
from gradmap.runtime.passes import calibration_losses

__all__ = ["PPL", "skip_losses"]


def skip_losses(run: ScoringRun, desc: str) -> dict[int, float]:
    """ORIGINAL index -> calibration loss with that layer bypassed, for every removable layer.

    All the losses of one call are summed over ranks in a single collective.
    """
    layers = [run.adapter.layers[run.adapter.position_of(i)] for i in run.removable]
    losses = calibration_losses(run.model, run.calib, run.batch_size, layers, progress=run.progress,
                                desc=f"{desc}: skip each layer")
    return dict(zip(run.removable, losses))


@dataclass
class PPL(Metric):
    """Loss with each layer removed alone; one-shot only."""

    name: ClassVar[str] = "ppl"
    needs: ClassVar[frozenset[str]] = frozenset({"skip_losses"})
    schedules: ClassVar[tuple[str, ...]] = ("one-shot",)

    def score(self, run: ScoringRun) -> dict[int, float]:
        return skip_losses(run, "ppl")
