"""Per-token gate derivative s_t = ⟨g_t, u_t⟩ in fp32.

Reference `gate_reduction_reference`; dispatch `gate_reduction`; launcher
``kernels/gate_reduction.py`` (policy: `gradmap.ops.backend`). The kernel is used
when g and u are both bf16/fp16 CUDA tensors on one device (it reads each once
and multiplies in fp32); fp32 inputs go through torch.
"""
from __future__ import annotations

import torch

from gradmap.ops import backend

__all__ = ["gate_reduction", "gate_reduction_reference"]


def gate_reduction_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-token ⟨g_t, u_t⟩ in fp32 for g, u of shape [..., d]; returns shape [...]."""
    return (g.float() * u.float()).sum(-1)


def gate_reduction(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-token gate derivative s_t = ⟨g_t, u_t⟩ (fp32) of a layer's residual update u.

    g, u: [..., d] (g = ∂loss/∂(layer output), u = output − input); returns [...] on g's device.
    The metric's totals are cheap reductions of this [tokens] vector:
    Σ_t |s_t| = s.abs().sum(), Σ_t s_t = s.sum(), per sequence s.sum(-1) for [batch, seq].
    """
    kernels = backend.choose("gate_reduction", g, u)
    if kernels is None:
        return gate_reduction_reference(g, u.to(g.device))
    return backend.run_kernel("gate_reduction", "gate_reduction", lambda: kernels.gate_reduction(g, u),
                              lambda: gate_reduction_reference(g, u))
