"""MRP: Maximum Redundancy Pruning, a layer-wise sparsity allocation loop.

RECONSTRUCTION. The MRP paper's formulas were not available when this was written; this
module implements the project's specification of it, not a transcription of the paper:

* A block's redundancy is its non-outlier ratio, measured on the CURRENT sparse model over
  the weights it still has:  R_ℓ = 1 − D_ℓ, with D_ℓ the OWL outlier ratio (fraction of the
  block's non-zero Wanda scores |W_ij|·‖X_j‖₂ above M × their mean; see `gradmap.sparsity.owl`).
* Every block starts at sparsity S − Δ. Then, repeatedly, the block with the highest R_ℓ
  (ties: lowest position) among those below the upper cap has its sparsity raised by δ and
  is pruned further; only its R_ℓ is recomputed. The loop stops when the parameter-weighted
  overall sparsity reaches S: the last step is partial, so the final overall sparsity equals
  S up to per-row rounding (a few weights), well within 0.1%.
* Per-block sparsity stays within [max(S − cap, 0), min(S + cap, 1)].

Defaults: Δ = 0.1 (`mrp_delta`), δ = 0.01 (`mrp_step`), cap = 0.2 (`mrp_cap`), M = 5
(`outlier_m`). The loop itself is model-agnostic: it drives two callbacks, so it can be
tested on synthetic blocks and reused with other scores.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

from gradmap.core.errors import GradmapError

__all__ = ["MRPStep", "mrp_allocate", "DEFAULT_DELTA", "DEFAULT_STEP", "DEFAULT_CAP"]

log = logging.getLogger(__name__)

DEFAULT_DELTA = 0.1
DEFAULT_STEP = 0.01
DEFAULT_CAP = 0.2


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
