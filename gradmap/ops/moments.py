"""Streaming moments of activations: Σx, Σx² per column, XᵀX and XᵀY, accumulated in fp32.

Reference `accumulate_moments_reference` (plain torch, the CPU path and the test
oracle); dispatch `accumulate_moments`; launchers `gram_update` and
`column_stats_update` in ``kernels/moments.py`` (see `gradmap.ops.backend` for the
policy and why launchers live there).

Dispatch, per part of the update:
- Σx, Σx² (and XᵀX when tracked): the Triton kernel when x is a bf16/fp16 CUDA
  tensor on the accumulators' device; fp32 x goes through cuBLAS with TF32 off.
- XᵀY: the Triton kernel when x and y are both bf16 or both fp16 on that device;
  otherwise torch, which upcasts to fp32 (exact for bf16/fp16 values; cuBLAS needs
  one dtype, so the fp32 copies of mixed inputs are unavoidable there).
The compensators pass the MLP output M in the model's dtype and the regression target r in
fp32 (a difference of residual states): on a bf16 model MᵀM runs on the Gram kernel and Mᵀr
on cuBLAS fp32; the magnitude and mean statistics reach the column kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gradmap.core.errors import GradmapError
from gradmap.ops import backend

__all__ = ["Moments", "accumulate_moments", "accumulate_moments_reference"]


@dataclass
class Moments:
    """Running fp32 statistics of X [tokens, d] (and optionally Y [tokens, d_y]).

    `sum_x` = Σx, `sq_x` = Σx² per column, `xtx` = XᵀX, `xty` = XᵀY; `count` = tokens seen.
    """

    d: int
    d_y: int | None = None
    device: torch.device | str = "cpu"
    want_xtx: bool = True
    count: int = 0
    sum_x: torch.Tensor = field(init=False)
    sq_x: torch.Tensor = field(init=False)
    xtx: torch.Tensor | None = field(init=False)
    xty: torch.Tensor | None = field(init=False)

    def __post_init__(self):
        z = dict(dtype=torch.float32, device=self.device)
        self.sum_x = torch.zeros(self.d, **z)
        self.sq_x = torch.zeros(self.d, **z)
        self.xtx = torch.zeros(self.d, self.d, **z) if self.want_xtx else None
        self.xty = torch.zeros(self.d, self.d_y, **z) if self.d_y is not None else None

    @property
    def mean(self) -> torch.Tensor:
        return self.sum_x / max(self.count, 1)


def _x_part_reference(m: Moments, x: torch.Tensor) -> None:
    xf = x.reshape(-1, m.d).to(device=m.sum_x.device, dtype=torch.float32)
    m.sum_x += xf.sum(0)
    m.sq_x += xf.square().sum(0)
    if m.xtx is not None:
        with backend.exact_fp32(xf):
            m.xtx += xf.T @ xf


def _xty_part_reference(m: Moments, x: torch.Tensor, y: torch.Tensor) -> None:
    xf = x.reshape(-1, m.d).to(device=m.xty.device, dtype=torch.float32)
    yf = y.reshape(-1, m.d_y).to(device=m.xty.device, dtype=torch.float32)
    with backend.exact_fp32(xf):
        m.xty += xf.T @ yf


def accumulate_moments_reference(m: Moments, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Plain-torch update of `m` with x [tokens, d] (and y [tokens, d_y]), accumulating in fp32.

    Σx += Σ_t x_t, Σx² += Σ_t x_t², XᵀX += Σ_t x_t x_tᵀ, XᵀY += Σ_t x_t y_tᵀ, count += tokens.
    Inputs on another device than `m` are moved to it; CUDA matmuls run with TF32 off.
    """
    if m.xty is not None and y is None:
        raise GradmapError("these moments track XᵀY; pass y with the same tokens as x")
    _x_part_reference(m, x)
    if m.xty is not None:
        _xty_part_reference(m, x, y)
    m.count += x.reshape(-1, m.d).shape[0]


def accumulate_moments(m: Moments, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Update running moments `m` in place with a micro-batch (see `Moments`); fp32 accumulation.

    bf16/fp16 CUDA inputs go to the Triton kernels (upper-triangle XᵀX tiles kept
    exactly symmetric, Σx and Σx² as by-products, one read of x); everything else
    to `accumulate_moments_reference`'s formula (module docstring: the rule).
    """
    if m.xty is not None and y is None:
        raise GradmapError("these moments track XᵀY; pass y with the same tokens as x")
    op, acc = "accumulate_moments", backend.device_key(m.sum_x)
    kernels = backend.choose(op, x, device=acc)
    if kernels is None:
        _x_part_reference(m, x)
    else:
        launch = kernels.moments
        if x.shape[-1] != m.d:
            raise GradmapError(f"accumulate_moments: x has {x.shape[-1]} features but the moments track "
                               f"d={m.d}; pass the activations these moments were built for")
        x2 = x.reshape(-1, m.d)
        if m.xtx is not None:
            call = lambda: launch.gram_update(m.xtx, x2, None, m.sum_x, m.sq_x)  # noqa: E731
            name = "gram_update (XᵀX)"
        else:
            call = lambda: launch.column_stats_update(m.sum_x, m.sq_x, x2)  # noqa: E731
            name = "column_stats_update"
        backend.run_kernel(op, name, call, lambda: _x_part_reference(m, x))
    if m.xty is not None:
        kernels = backend.choose(op, x, y, device=acc) if y.dtype == x.dtype else None
        if kernels is None:
            _xty_part_reference(m, x, y)
        else:
            launch = kernels.moments
            if y.shape[-1] != m.d_y or y.numel() // max(m.d_y, 1) != x.numel() // max(m.d, 1):
                raise GradmapError(f"accumulate_moments: y {tuple(y.shape)} must hold as many tokens as x "
                                   f"{tuple(x.shape)}, with d_y={m.d_y} features")
            backend.run_kernel(op, "gram_update (XᵀY)",
                               lambda: launch.gram_update(m.xty, x.reshape(-1, m.d), y.reshape(-1, m.d_y)),
                               lambda: _xty_part_reference(m, x, y))
    m.count += x.reshape(-1, m.d).shape[0]
