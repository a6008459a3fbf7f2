"""ReplaceMe (Shopkhoev et al., 2025) as one configuration of the Stage 2 projection solver.

For each removed contiguous block B, the kept layer p just before it gets a linear map on
its MLP output, fitted by the same closed-form ridge solve as GradMAP Stage 2,
    P = argmin Σ_t ‖M_t P + Y_t − T_t‖² + λ‖P − I‖²_F,
but with T the DENSE hidden state just after the block (output of B's last layer) and no
mean-shift selection. Statistics, solve, safeguards and fold are ProjectionCompensation's.
With `each_step=True` the block a removal created or grew is solved right after that removal,
its site being the kept layer before the block as it is then (a merged block gets a new site).
"""
from __future__ import annotations

from collections.abc import Sequence

from gradmap.prune.compensation.projection import DEFAULT_RIDGE_GRID, ProjectionCompensation

__all__ = ["ReplaceMeCompensation"]


class ReplaceMeCompensation(ProjectionCompensation):
    """`compensation="replaceme"`: one projection per removed block, targeting the state after it."""

    name = "replaceme"
    needs_dense_means = False
    uses_shifts = False

    def __init__(self, ridge: float | None = None, ridge_grid: Sequence[float] = DEFAULT_RIDGE_GRID,
                 holdout: float = 0.125, safeguards: bool = True, max_stat_bytes: int = 2 ** 31,
                 each_step: bool = False):
        super().__init__(top_m=0, per_gap=True, ridge=ridge, ridge_grid=ridge_grid, holdout=holdout,
                         safeguards=safeguards, max_stat_bytes=max_stat_bytes, each_step=each_step)

    def _gap_target(self, before: int, block: list[int]) -> int:
        return block[-1]
