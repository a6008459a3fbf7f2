"""OWL: Outlier Weighed Layerwise sparsity (Yin et al., 2024, arXiv:2310.05175).

A block's layerwise outlier distribution (LOD) is the fraction of its Wanda scores
A_ij = |W_ij| · ‖X_j‖₂, pooled over all the block's linear layers, that exceed M times
their mean:

    D_ℓ = #{A ∈ block ℓ : A > M · mean(A)} / #A                (M = 5)

Blocks with more outliers keep more weights. As in the authors' code, D is min-max
normalised to a band of width 2λ and shifted so that the mean block sparsity is exactly
the target S:

    x_ℓ = 2λ (D_ℓ − min D) / (max D − min D),     S_ℓ = S − (x_ℓ − mean x)

so S_ℓ ∈ [S − 2λ + ..., S + 2λ − ...] with span 2λ, and S_ℓ = S for every block when
all D_ℓ are equal. (A band exactly [S − λ, S + λ] and a mean of exactly S cannot both
hold unless D is symmetric; the mean is the invariant kept, as in the paper's code.)
"""
from __future__ import annotations

import torch

from gradmap.core.errors import GradmapError

__all__ = ["outlier_ratio", "owl_allocation", "DEFAULT_M", "DEFAULT_LAMBDA"]

DEFAULT_M = 5.0
DEFAULT_LAMBDA = 0.08


@torch.no_grad()
def outlier_ratio(scores: list[torch.Tensor], m: float = DEFAULT_M, nonzero_only: bool = False) -> float:
    """D = fraction of the pooled scores greater than `m` × their mean (OWL's LOD).

    `nonzero_only` restricts the pool to non-zero scores (the weights a sparse block still
    has), which is how MRP measures the redundancy of an already pruned block.
    """
    total = 0
    s_sum = 0.0
    flats = [sc.reshape(-1).float() for sc in scores]
    for flat in flats:
        total += int((flat != 0).sum()) if nonzero_only else flat.numel()
        s_sum += float(flat.sum(dtype=torch.float64))  # zeros add nothing to the sum
    if total == 0:
        return 0.0
    threshold = m * s_sum / total
    # scores are non-negative, so the threshold is > 0 and zero scores are never outliers
    above = sum(int((flat > threshold).sum()) for flat in flats)
    return above / total


def owl_allocation(ratios: list[float], sparsity: float, lam: float = DEFAULT_LAMBDA) -> list[float]:
    """Per-block sparsities from outlier ratios D_ℓ: S_ℓ = S − (x_ℓ − mean x), x = 2λ·minmax(D).

    Mean over blocks is exactly `sparsity`. Raises GradmapError when a block would leave
    [0, 1] (the band is too wide for this target), naming the options to change.
    """
    d = torch.tensor(ratios, dtype=torch.float64)
    span = float(d.max() - d.min()) if d.numel() else 0.0
    if span == 0.0:
        return [float(sparsity)] * len(ratios)
    x = (d - d.min()) / span * (2.0 * lam)
    alloc = sparsity - (x - x.mean())
    lo, hi = float(alloc.min()), float(alloc.max())
    if lo < 0.0 or hi > 1.0:
        raise GradmapError(f"OWL allocation with sparsity={sparsity} and owl_lambda={lam} puts blocks at "
                           f"sparsities in [{lo:.4f}, {hi:.4f}], outside [0, 1]; lower owl_lambda or "
                           "choose a sparsity further from 0 and 1")
    return [float(a) for a in alloc]
