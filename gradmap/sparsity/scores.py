"""Per-weight scores, row-wise pruning and the activation statistics the scores need.

    wanda:      A_ij = |W_ij| · ‖X_j‖₂      (X_j: j-th input feature over all calibration tokens)
    magnitude:  A_ij = |W_ij|
    sparsegpt:  its masks come from the OBS saliency (`gradmap.sparsity.sparsegpt`); where one score
                per weight is needed (MRP's redundancy) it is scored like Wanda (`block_scores`).
"""
from __future__ import annotations

import torch
from torch import nn

from gradmap.core import distributed
from gradmap.core.errors import GradmapError
from gradmap.ops import Moments, accumulate_moments
from gradmap.runtime.sequential import Block

__all__ = ["wanda_scores", "magnitude_scores", "prune_rows_", "block_moments", "block_scores",
           "SCORES"]

SCORES = ("wanda", "magnitude", "sparsegpt")


def wanda_scores(weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Wanda score |W_ij| · ‖X_j‖₂ (fp32); `norm`: per-input-column L2 norm over calibration tokens."""
    return weight.detach().float().abs() * norm.to(weight.device, torch.float32)[None, :]


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude score |W_ij| (fp32)."""
    return weight.detach().float().abs()


def block_scores(linears: dict[str, nn.Linear], score: str,
                 norms: dict[str, torch.Tensor] | None) -> list[torch.Tensor]:
    """One score tensor per linear of a block: |W| for magnitude, |W|·‖X_j‖₂ otherwise.

    SparseGPT uses the Wanda form: with H⁻¹ replaced by diag(H)⁻¹, its saliency W²_ij/[H⁻¹]_jj
    becomes 2·(|W_ij|·‖X_j‖₂)², whose square root is the Wanda score (the root keeps the outlier
    threshold M × mean on the same scale as for Wanda).
    """
    if score == "magnitude":
        return [magnitude_scores(l.weight) for l in linears.values()]
    return [wanda_scores(l.weight, norms[n]) for n, l in linears.items()]


@torch.no_grad()
def prune_rows_(weight: torch.Tensor, scores: torch.Tensor, k: int) -> int:
    """Zero the k lowest-scoring entries of `weight`, compared within each output row; return its zeros.

    Row r ends with ⌊k/rows⌋ + (r < k mod rows) zeros. Entries that are already zero count
    towards that and are never revived, so re-pruning a pruned layer to a higher k (its zeros
    score 0, the lowest) only looks at the few entries it adds: a top-k of size Δk per row.
    """
    rows, cols = scores.shape
    base, extra = divmod(int(k), rows)
    want = torch.full((rows,), base, dtype=torch.long, device=weight.device)
    want[:extra] += 1
    zero = weight == 0
    need = (want - zero.sum(1)).clamp_(min=0)
    n_new = int(need.max())
    if n_new > 0:
        live = scores.to(weight.device).masked_fill(zero, float("inf"))
        idx = live.topk(n_new, dim=1, largest=False, sorted=True).indices
        take = torch.arange(n_new, device=weight.device)[None, :] < need[:, None]
        weight.masked_fill_(torch.zeros_like(zero).scatter_(1, idx, take), 0)
    return int(zero.sum()) + int(need.sum())


@torch.no_grad()
def block_moments(block: Block, linears: dict[str, nn.Linear], want_xtx: bool = False) -> dict[str, Moments]:
    """Σx² (and XᵀX when `want_xtx`) of every linear layer's input over the block's calibration tokens.

    One block forward with pre-hooks streaming into `gradmap.ops.accumulate_moments` (fp32).
    Distributed: the moments are summed over ranks (one collective per block), so every rank
    sees the statistics of the whole calibration set.
    """
    moments: dict[str, Moments] = {}

    def hook(name: str):
        def pre(module: nn.Linear, args: tuple) -> None:
            x = args[0]
            if name not in moments:
                moments[name] = Moments(d=module.in_features, device=x.device, want_xtx=want_xtx)
            accumulate_moments(moments[name], x.reshape(-1, module.in_features))
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        block.forward()
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in linears if n not in moments]
    if missing:
        raise GradmapError(f"linear layers {missing} of block {block.original_id} never ran during the "
                           "calibration forward; sparsify supports only layers the block always uses")
    distributed.all_reduce_moments_([moments[n] for n in linears])
    return moments
