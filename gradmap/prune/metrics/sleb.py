"""SLEB (Song et al., 2024, "SLEB: Streamlining LLMs through Redundancy Verification and
Elimination of Transformer Blocks").

Greedy: in each round remove, among the remaining layers, the one whose removal
gives the lowest calibration loss,

    ℓ* = argmin_ℓ L(current model without ℓ),

re-evaluated on the pruned model every round (one forward per remaining layer
per decision). Iterative only; scoring once is the `ppl` metric.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gradmap.prune.metrics.base import Metric, ScoringRun
from gradmap.prune.metrics.ppl import skip_losses

__all__ = ["SLEB"]


@dataclass
class SLEB(Metric):
    """SLEB greedy block elimination; iterative only."""

    name: ClassVar[str] = "sleb"
    needs: ClassVar[frozenset[str]] = frozenset({"skip_losses"})
    schedules: ClassVar[tuple[str, ...]] = ("iterative",)

    def score(self, run: ScoringRun) -> dict[int, float]:
        return skip_losses(run, "sleb")
