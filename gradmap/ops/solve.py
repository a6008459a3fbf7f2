"""Batched ridge-regularised projection solve P = (A_sym + λI)⁻¹ (B + λI), λ = ridge·tr(A)/d.

Reference `projection_solve_reference` (torch.linalg); dispatch `projection_solve`;
implementation in the optional C++/CUDA extension ``gradmap._C`` (csrc/, loaded by
`gradmap.ops.extension`). If the extension raises (no kernel image for this GPU,
a cuSOLVER error, out of memory), the call finishes with the reference after one
warning naming it, and the solve stays on the reference for the process;
GRADMAP_STRICT_KERNELS=1 raises instead (`gradmap.ops.backend`). A CUDA solve
without a CUDA-built extension is a fallback too (warned once).
"""
from __future__ import annotations

import torch

from gradmap.core.errors import GradmapError
from gradmap.ops import backend, extension

__all__ = ["projection_solve", "projection_solve_reference"]

OP = "projection_solve"
_NONFINITE = ("projection statistics contain NaN/inf; the calibration forward overflowed "
              "— run the model in bf16/fp32 rather than fp16, or lower the learning signal")


def projection_solve_reference(a: torch.Tensor, b: torch.Tensor, ridge: float,
                               dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve (A_sym + λI) P = B + λI batched, λ = ridge·trace(A)/d; returns (P, status).

    status[i] = 0 when the Cholesky factorisation succeeded, 1 when item i fell
    back to an eigen-decomposition solve (A + λI not positive definite).
    """
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise GradmapError(_NONFINITE)
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


def _check_inputs(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    if a.dim() not in (2, 3) or a.shape[-1] != a.shape[-2] or b.shape != a.shape:
        raise GradmapError(f"projection_solve: A must be [d, d] or [n, d, d] and B the same shape, got "
                           f"A {tuple(a.shape)} and B {tuple(b.shape)}; pass XᵀX-type and XᵀY-type "
                           "statistics")
    if not (a.is_floating_point() and b.is_floating_point()) or a.device != b.device:
        raise GradmapError("projection_solve: A and B must be floating point tensors on one device")
    if dtype not in (torch.float64, torch.float32):
        raise GradmapError(f"projection_solve: dtype must be torch.float64 or torch.float32, got {dtype}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise GradmapError(_NONFINITE)


def projection_solve(a: torch.Tensor, b: torch.Tensor, ridge: float,
                     dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ridge-regularised solve P = (A_sym + λI)⁻¹ (B + λI), λ = ridge·tr(A)/d.

    Returns (P [.., d, d] in `dtype`, status int32 [..]: 0 Cholesky, 1 eigen-decomposition
    fallback). Uses the C++/CUDA extension when built (fused preparation, batched
    factorisation through ATen), else `projection_solve_reference`; results agree to
    1e-10 relative in fp64.
    """
    if backend.force_reference() or a.device.type not in ("cpu", "cuda"):
        return projection_solve_reference(a, b, ridge, dtype)
    _check_inputs(a, b, dtype)
    ext = extension.extension()
    if ext is None or (a.is_cuda and not ext.cuda_built()):
        if a.is_cuda:  # the CPU solve is optional by design; on CUDA the extension was expected
            backend.fallback(OP, "gradmap._C is not available with CUDA "
                                 f"({extension.extension_status()})")
        return projection_solve_reference(a, b, ridge, dtype)
    if backend.failed(OP):
        backend.fallback(OP, f"gradmap._C failed earlier in this process ({backend.failed(OP)})",
                         warn=False)
        return projection_solve_reference(a, b, ridge, dtype)
    return backend.run_kernel(OP, "gradmap._C.projection_solve",
                              lambda: ext.projection_solve(a, b, float(ridge), dtype == torch.float64),
                              lambda: projection_solve_reference(a, b, ridge, dtype))
