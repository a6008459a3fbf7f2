"""Numerical primitives shared by all algorithms, with backend dispatch.

Every function here has a plain-torch reference implementation (`*_reference`)
that is both the CPU fallback and the test oracle. The kernels issue routes
CUDA tensors to Triton kernels and the solve to the C++/CUDA extension
without changing these signatures.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import GradmapError

__all__ = [
    "Moments", "accumulate_moments", "accumulate_moments_reference", "projection_solve",
    "projection_solve_reference", "layer_grad_reductions", "layer_grad_reductions_reference",
    "gate_reduction", "gate_reduction_reference", "backends",
]


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


def accumulate_moments_reference(m: Moments, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Plain-torch update of `m` with x [tokens, d] (and y [tokens, d_y]), accumulating in fp32."""
    xf = x.reshape(-1, m.d).float()
    m.sum_x += xf.sum(0)
    m.sq_x += xf.square().sum(0)
    if m.xtx is not None:
        m.xtx += xf.T @ xf
    if m.xty is not None:
        if y is None:
            raise GradmapError("these moments track XᵀY; pass y with the same tokens as x")
        m.xty += xf.T @ y.reshape(-1, m.d_y).float()
    m.count += xf.shape[0]


def accumulate_moments(m: Moments, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Update running moments `m` in place with a micro-batch (see `Moments`)."""
    accumulate_moments_reference(m, x, y)


def projection_solve_reference(a: torch.Tensor, b: torch.Tensor, ridge: float,
                               dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve (A_sym + λI) P = B + λI batched, λ = ridge·trace(A)/d; returns (P, status).

    status[i] = 0 when the Cholesky factorisation succeeded, 1 when item i fell
    back to an eigen-decomposition solve (A + λI not positive definite).
    """
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise GradmapError("projection statistics contain NaN/inf; the calibration forward overflowed "
                           "— run the model in bf16/fp32 rather than fp16, or lower the learning signal")
    squeeze = a.dim() == 2
    a3 = (a[None] if squeeze else a).to(dtype)
    b3 = (b[None] if squeeze else b).to(dtype)
    d = a3.shape[-1]
    a3 = 0.5 * (a3 + a3.transpose(-1, -2))
    lam = ridge * a3.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    eye = torch.eye(d, dtype=dtype, device=a3.device)
    lhs = a3 + lam[:, None, None] * eye
    rhs = b3 + lam[:, None, None] * eye
    chol, info = torch.linalg.cholesky_ex(lhs)
    status = (info != 0).to(torch.int32)
    p = torch.cholesky_solve(rhs, chol)
    for i in torch.nonzero(status).flatten().tolist():
        evals, evecs = torch.linalg.eigh(lhs[i])
        tol = evals.abs().max() * d * torch.finfo(dtype).eps
        inv = torch.where(evals.abs() > tol, 1.0 / evals, torch.zeros_like(evals))
        p[i] = evecs @ (inv[:, None] * (evecs.T @ rhs[i]))
    return (p[0], status[0]) if squeeze else (p, status)


def projection_solve(a: torch.Tensor, b: torch.Tensor, ridge: float,
                     dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ridge-regularised solve for the projection compensation (see reference)."""
    return projection_solve_reference(a, b, ridge, dtype)


def layer_grad_reductions_reference(grads: list[torch.Tensor], layer_ids: list[int], n_layers: int
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer Σ|g| and Σg² in fp32 over tensors `grads` owned by layers `layer_ids`."""
    device = grads[0].device if grads else "cpu"
    abs_sum = torch.zeros(n_layers, dtype=torch.float32, device=device)
    sq_sum = torch.zeros(n_layers, dtype=torch.float32, device=device)
    for g, lid in zip(grads, layer_ids):
        gf = g.float()
        abs_sum[lid] += gf.abs().sum()
        sq_sum[lid] += gf.square().sum()
    return abs_sum, sq_sum


def layer_grad_reductions(grads: list[torch.Tensor], layer_ids: list[int], n_layers: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer Σ|g| and Σg² (fp32) of many gradient tensors in one call."""
    return layer_grad_reductions_reference(grads, layer_ids, n_layers)


def gate_reduction_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-token ⟨g_t, u_t⟩ in fp32 for g, u of shape [..., d]; returns shape [...]."""
    return (g.float() * u.float()).sum(-1)


def gate_reduction(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-token gate derivative ⟨g_t, u_t⟩ (fp32) of a layer's residual update u."""
    return gate_reduction_reference(g, u)


def backends() -> dict[str, str]:
    """Which implementation each op uses in this process."""
    return {"accumulate_moments": "torch", "projection_solve": "torch",
            "layer_grad_reductions": "torch", "gate_reduction": "torch"}
