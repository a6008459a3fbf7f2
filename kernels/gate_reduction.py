"""Fused per-token gate reduction s_t = ⟨g_t, u_t⟩ in fp32.

g is the gradient of the loss at a layer's output, u the layer's residual
update (output − input), both [..., d]; s_t is the derivative of the loss with
respect to a scalar gate on the update, per token. The kernel returns the
per-token values so the caller gets Σ_t |s_t|, Σ_t s_t and per-sequence sums
with one cheap reduction over a [tokens] vector instead of another pass over
[tokens, d].

Reference: ``gradmap.ops.gate_reduction_reference`` (fp32 inputs to 1e-5
relative, bf16/fp16 to 1e-3 against the same inputs upcast to fp32).
g and u may have different dtypes (e.g. fp32 gradients, bf16 activations); both
are read once and multiplied in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradmap.core.errors import GradmapError

from .utils import cdiv, check_inputs, empty, interpreting, on_device

__all__ = ["gate_reduction"]


@triton.jit(do_not_specialize=["T"])  # T (tokens) changes with the last micro-batch: no recompiles
def _gate_kernel(g_ptr, u_ptr, out_ptr, T, D, stride_g, stride_u,
                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        m = row_mask[:, None] & (c[None, :] < D)
        g = tl.load(g_ptr + rows64[:, None] * stride_g + c[None, :], mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + rows64[:, None] * stride_u + c[None, :], mask=m, other=0.0).to(tl.float32)
        acc += g * u
    tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=row_mask)


def _rows(x: torch.Tensor, d: int) -> torch.Tensor:
    """x as [tokens, d] with unit stride along d (a view when possible)."""
    x2 = x.reshape(-1, d)
    return x2 if d == 1 or x2.stride(1) == 1 else x2.contiguous()


def gate_reduction(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-token ⟨g_t, u_t⟩ in fp32 for g, u of identical shape [..., d]; returns shape [...]."""
    device = check_inputs("gate_reduction", g=g, u=u)
    if g.shape != u.shape or g.dim() < 1:
        raise GradmapError(f"gate_reduction: g {tuple(g.shape)} and u {tuple(u.shape)} must have the same "
                           "shape [..., d]; pass the output gradient and the residual update of one layer")
    d = g.shape[-1]
    lead = g.shape[:-1]
    g2, u2 = _rows(g, d), _rows(u, d)
    tokens = g2.shape[0]
    out = empty((tokens,), g.device)
    if tokens == 0:
        return out.reshape(lead)
    if d == 0:
        return out.zero_().reshape(lead)
    if interpreting():
        block_t, block_d, warps = 4, 32, 1
    else:
        # bandwidth bound: 4 rows x 512 columns per step, 16 bytes per thread per load
        block_t, block_d, warps = 4, 512, 4
    block_d = min(block_d, triton.next_power_of_2(d))
    with on_device(device):
        _gate_kernel[(cdiv(tokens, block_t),)](g2, u2, out, tokens, d, g2.stride(0), u2.stride(0),
                                               BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)
    return out.reshape(lead)
