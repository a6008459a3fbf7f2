"""Weight magnitude: the Frobenius norm of all of a layer's linear weights (a weak reference).

    M_ℓ = sqrt(Σ_{W ∈ linear weights of ℓ} ‖W‖_F²)

No calibration data is read; the score ignores what the layer does to the residual stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from gradmap.prune.metrics.base import Metric, ScoringRun

__all__ = ["Magnitude"]


@dataclass
class Magnitude(Metric):
    """Per-layer weight norm; no options."""

    name: ClassVar[str] = "magnitude"
    needs: ClassVar[frozenset[str]] = frozenset({"weights"})

    @torch.no_grad()
    def score(self, run: ScoringRun) -> dict[int, float]:
        scores = {}
        for pos, i in enumerate(run.adapter.original_ids):
            sq = sum(float(m.weight.double().square().sum())
                     for m in run.adapter.linear_modules(pos).values())
            scores[i] = sq ** 0.5
        return scores
