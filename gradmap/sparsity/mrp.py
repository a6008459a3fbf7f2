"""MRP: Maximum Redundancy Pruning (Gao et al., 2025, arXiv:2503.18377), a layer-wise allocation loop.

The paper's three principles: layer-wise sparsity should be non-uniform, depend on the pruning
metric, and leave the pruned model with a UNIFORM layer-wise redundancy. MRP gets there by
repeatedly pruning a little more of the most redundant block. The paper's exact formulas were not
available; this module implements the project's reading of them, derived below.

Redundancy (what a block can still give up). Let A_i ≥ 0 be the scores of the N weights of a
block under the metric that prunes it (|W| for magnitude, |W|·‖X_j‖₂ for Wanda and SparseGPT),
with pruned weights scoring 0, and μ = ΣA / N the mean over ALL N weights. The outliers are the
weights with A_i > M·μ (OWL's rule, M = 5); they must stay. The redundant weights are the others
that are still there:

    R = #{i : 0 < A_i ≤ M·μ} / N        (`remaining_redundancy`)

Why pruning a block lowers its R (negative feedback). Pruning grows the zero set P to P' ⊇ P and
only sets scores to 0, so μ' ≤ μ and M·μ' ≤ M·μ. Any weight counted after the step (not in P',
0 < A ≤ M·μ') was counted before (not in P, 0 < A ≤ M·μ), so R' ≤ R; every newly pruned
non-outlier is one fewer, so a step of δ lowers R by about δ (pruning takes the lowest scores,
which are never outliers in practice). The loop therefore moves on to another block after a
step, and ends with the R of every block it touched within about δ of each other: uniform
redundancy (the third principle). `redundancy_spread` measures that as std and max − min.

The earlier specification (the non-outlier ratio among the NON-ZERO scores only) had the opposite
sign: pruning removes the smallest scores, the mean of the survivors rises, fewer exceed M × mean,
so R rose after each step and the loop drove one block to the cap.

The loop. Every block starts at sparsity S − Δ. Then, repeatedly, the block with the highest R
(ties: lowest position) among those below the upper cap has its sparsity raised by δ and is pruned
further; only its R is recomputed. The loop stops when the parameter-weighted overall sparsity
reaches S: the last step is partial, so the final overall sparsity equals S up to per-row rounding
(a few weights). Per-block sparsity stays within [max(S − cap, 0), min(S + cap, 1)].

Defaults: Δ = 0.1 (`mrp_delta`), δ = 0.01 (`mrp_step`), cap = 0.2 (`mrp_cap`), M = 5
(`outlier_m`). The loop is model-agnostic: it drives two callbacks, so it can be tested on
synthetic blocks and reused with any score.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from gradmap.core.errors import GradmapError

__all__ = ["MRPStep", "mrp_allocate", "remaining_redundancy", "redundancy_spread", "DEFAULT_DELTA",
           "DEFAULT_STEP", "DEFAULT_CAP"]

log = logging.getLogger(__name__)

DEFAULT_DELTA = 0.1
DEFAULT_STEP = 0.01
DEFAULT_CAP = 0.2


@torch.no_grad()
def remaining_redundancy(scores: list[torch.Tensor], m: float) -> float:
    """R = #{0 < A ≤ m·mean(A)} / #A over the pooled scores (pruned weights score 0); see the docstring."""
    flats = [sc.reshape(-1).float() for sc in scores]
    total = sum(f.numel() for f in flats)
    if total == 0:
        return 0.0
    threshold = m * sum(float(f.sum(dtype=torch.float64)) for f in flats) / total
    kept = sum(int(((f > 0) & (f <= threshold)).sum()) for f in flats)
    return kept / total


def redundancy_spread(values: list[float]) -> tuple[float, float]:
    """(population std, max − min) of per-block redundancies; (0, 0) for fewer than two blocks."""
    if len(values) < 2:
        return 0.0, 0.0
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.std(unbiased=False)), float(t.max() - t.min())


@dataclass
class MRPStep:
    """One step of the MRP loop (block = current position in the decoder)."""

    step: int
    block: int
    increment: float          # sparsity added to `block` (δ, or less on the last/capped step)
    sparsity: float           # the block's sparsity after the step
    redundancy: float         # R of `block` before the step (the maximum among eligible blocks)
    redundancy_after: float   # R of `block` after it was pruned further
    overall: float            # parameter-weighted overall sparsity after the step

    def to_dict(self) -> dict:
        return asdict(self)


def mrp_allocate(n_params: list[int], zeros: list[int], start: list[float], sparsity: float,
                 prune_block: Callable[[int, float], int], redundancy: Callable[[int], float],
                 step: float = DEFAULT_STEP, cap: float = DEFAULT_CAP, slack: int = 0,
                 ) -> tuple[list[float], list[MRPStep]]:
    """Run the MRP loop from block sparsities `start` (zero counts `zeros`) to overall `sparsity`.

    `prune_block(p, s)` prunes block p to sparsity s (a superset of its current zeros) and
    returns its new zero count; `redundancy(p)` returns R_p of its current weights. The loop
    stops when the zero count is within `slack` weights of S·Σn_params (per-row rounding
    makes an exact count unreachable in general). Returns (final block sparsities, steps).
    """
    n = len(n_params)
    total = float(sum(n_params))
    target = sparsity * total
    lo, hi = max(sparsity - cap, 0.0), min(sparsity + cap, 1.0)
    alloc = list(start)
    zeros = list(zeros)
    if any(a < lo - 1e-9 or a > hi + 1e-9 for a in alloc):
        raise GradmapError(f"MRP start sparsities {min(alloc):.4f}..{max(alloc):.4f} leave the cap band "
                           f"[{lo:.4f}, {hi:.4f}]; make mrp_delta <= mrp_cap")
    red = [redundancy(p) for p in range(n)]
    steps: list[MRPStep] = []
    # each block can take at most ceil((hi - lo) / step) + 1 steps (the +1: partial ones)
    max_steps = n * (int((hi - lo) / step) + 2) + 10
    while target - sum(zeros) > slack:
        eligible = [p for p in range(n) if alloc[p] < hi - 1e-12]
        if not eligible:
            raise GradmapError(f"MRP cannot reach overall sparsity {sparsity}: every block is at the "
                               f"upper cap {hi:.4f}; raise mrp_cap")
        if len(steps) >= max_steps:
            raise RuntimeError(f"MRP made no progress after {len(steps)} steps (gap "
                               f"{target - sum(zeros):.0f} weights); this is a bug")
        p = max(eligible, key=lambda q: (red[q], -q))
        inc = min(step, hi - alloc[p], (target - sum(zeros)) / n_params[p])
        alloc[p] = min(alloc[p] + inc, hi)
        zeros[p] = prune_block(p, alloc[p])
        before, red[p] = red[p], redundancy(p)
        steps.append(MRPStep(step=len(steps), block=p, increment=inc, sparsity=alloc[p],
                             redundancy=before, redundancy_after=red[p], overall=sum(zeros) / total))
    log.info("MRP: %d steps, overall sparsity %.5f (target %.5f)", len(steps), sum(zeros) / total,
             sparsity)
    return alloc, steps
