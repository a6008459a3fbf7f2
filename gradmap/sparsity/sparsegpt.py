"""SparseGPT (Frantar & Alistarh, 2023, arXiv:2301.00774): OBS mask selection with weight reconstruction.

For one linear layer with weights W [rows, cols] and calibration inputs X [tokens, cols], the
layer-wise problem is  min ‖XWᵀ − XŴᵀ‖²  over Ŵ with the wanted zeros. Its Hessian is H = 2XᵀX,
shared by every row. Columns are processed left to right; when column j is pruned (or kept), the
error it leaves is spread over the columns not yet processed with the OBS update

    δ = (w_j − q_j) / [H_F⁻¹]_jj,        W[:, F] −= δ · [H_F⁻¹]_{j, F}

where F = {j, ..., cols−1} and H_F⁻¹ = (H[F, F])⁻¹. The rows [H_F⁻¹]_{j,F} / √[H_F⁻¹]_jj for every
j are the rows of the upper Cholesky factor U of H⁻¹, so one factorisation gives them all.

Masks are chosen adaptively per block of B = 128 columns, on the weights as updated so far, by the
OBS saliency w²_ij / [H_F⁻¹]_jj = w²_ij / U²_jj: unstructured, the k_b lowest over the whole block
(k_b such that the blocks' counts add up to round(s · rows · cols) exactly); N:M, the M − N lowest
of each row's group of M, chosen when the group's first column is reached. Updates inside a block
are applied at once; those for the columns after it are applied together at the block's end (the
paper's lazy batch update; the same arithmetic in another order).

Defaults as in the paper: B = 128 and dampening λ = 0.01 × mean(diag H) added to diag H. Columns
no token touched (H_jj = 0) carry no information: their weights are zeroed and H_jj set to 1.
Computed in fp32 (fp64 for fp64 weights); the result is cast back to the weight's dtype.
"""
from __future__ import annotations

import torch

from gradmap.core.errors import GradmapError

__all__ = ["sparsegpt_prune_", "BLOCK_SIZE", "DAMPENING"]

BLOCK_SIZE = 128
DAMPENING = 0.01


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹."""
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise GradmapError("SparseGPT: the dampened Hessian 2XᵀX is not positive definite (non-finite "
                           "activations?); check the calibration data or the model's weights")
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


@torch.no_grad()
def sparsegpt_prune_(weight: torch.Tensor, xtx: torch.Tensor, sparsity: float,
                     nm: tuple[int, int] | None = None, block_size: int = BLOCK_SIZE,
                     dampening: float = DAMPENING) -> int:
    """Prune `weight` [rows, cols] in place to `sparsity` (or the N:M pattern `nm`); return its zeros.

    `xtx`: XᵀX [cols, cols] of the layer's calibration inputs (any positive scale: the result
    does not depend on it). With `nm`, `sparsity` is ignored and `block_size` is rounded down to
    a multiple of M so that no group straddles two blocks.
    """
    rows, cols = weight.shape
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dt).clone()
    h = 2.0 * xtx.to(weight.device, dt)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(dampening * float(torch.diagonal(h).mean()))
    u = _inverse_cholesky(h)
    if nm is not None:
        n, m = nm
        if cols % m:
            raise GradmapError(f"a layer with {cols} inputs cannot hold the {n}:{m} pattern; choose an M "
                               "that divides every layer's in_features")
        block_size = max(m, block_size // m * m)
    total = round(sparsity * rows * cols) if nm is None else 0
    for c1 in range(0, cols, block_size):
        c2 = min(c1 + block_size, cols)
        w1, u1 = w[:, c1:c2].clone(), u[c1:c2, c1:c2]
        d = torch.diagonal(u1)
        q1, e1 = torch.zeros_like(w1), torch.zeros_like(w1)
        mask = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:
            k = round(total * c2 / cols) - round(total * c1 / cols)  # telescopes to `total`
            if k > 0:
                saliency = (w1.square() / d.square()[None, :]).reshape(-1)
                mask.view(-1)[saliency.topk(k, largest=False).indices] = True
        for i in range(c2 - c1):
            if nm is not None and i % m == 0:
                saliency = w1[:, i:i + m].square() / d[i:i + m].square()[None, :]
                idx = saliency.topk(m - n, dim=1, largest=False).indices
                mask[:, i:i + m].scatter_(1, idx, True)
            col = w1[:, i]
            q = col.masked_fill(mask[:, i], 0.0)
            err = (col - q) / d[i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            q1[:, i], e1[:, i] = q, err
        w[:, c1:c2] = q1
        w[:, c2:] -= e1 @ u[c1:c2, c2:]
    weight.copy_(w.to(weight.dtype))
    return int((weight == 0).sum())
