"""Numerical primitives shared by all algorithms, with backend dispatch.

Every function here has a plain-torch reference implementation (`*_reference`)
that is both the CPU fallback and the test oracle. Dispatch:

- CUDA tensors: Triton kernels (`gradmap.kernels`, imported on first use) for
  the moments, gradient reductions and gate reduction; the C++/CUDA extension
  (`gradmap._C`) for the solve when it was built with CUDA.
- CPU tensors: plain torch, and the C++ solve when the extension is built.
- GRADMAP_FORCE_REFERENCE=1 (read at every call) forces plain torch everywhere.

`backends()` says which implementation each op uses. If a Triton kernel fails
to compile or launch, the op logs a warning, finishes the call with the
reference (same formula, so the result does not change) and stays on the
reference for the rest of the process; `backends()` then shows why.
Importing this module never imports Triton and never initialises CUDA.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from types import ModuleType

import torch

from gradmap.ops import extension
from gradmap.core.errors import GradmapError

__all__ = [
    "Moments", "accumulate_moments", "accumulate_moments_reference", "projection_solve",
    "projection_solve_reference", "layer_grad_reductions", "layer_grad_reductions_reference",
    "gate_reduction", "gate_reduction_reference", "backends", "force_reference",
]

log = logging.getLogger(__name__)


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


def _moments_parts_reference(m: Moments, x: torch.Tensor, y: torch.Tensor | None, parts) -> None:
    xf = x.reshape(-1, m.d).float()
    if "stats" in parts:
        m.sum_x += xf.sum(0)
        m.sq_x += xf.square().sum(0)
    if "xtx" in parts and m.xtx is not None:
        m.xtx += xf.T @ xf
    if "xty" in parts and m.xty is not None:
        m.xty += xf.T @ y.reshape(-1, m.d_y).float()


def accumulate_moments_reference(m: Moments, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Plain-torch update of `m` with x [tokens, d] (and y [tokens, d_y]), accumulating in fp32.

    Σx += Σ_t x_t, Σx² += Σ_t x_t², XᵀX += Σ_t x_t x_tᵀ, XᵀY += Σ_t x_t y_tᵀ, count += tokens.
    """
    if m.xty is not None and y is None:
        raise GradmapError("these moments track XᵀY; pass y with the same tokens as x")
    _moments_parts_reference(m, x, y, ("stats", "xtx", "xty"))
    m.count += x.reshape(-1, m.d).shape[0]


def accumulate_moments(m: Moments, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Update running moments `m` in place with a micro-batch (see `Moments`).

    CUDA inputs go to the Triton kernels (`gradmap.kernels.moments`: upper-triangle
    XᵀX tiles kept symmetric, Σx and Σx² as by-products, one read of x); others to
    `accumulate_moments_reference`. Accumulation is fp32 whatever x's dtype.
    """
    kernels = _triton_for("accumulate_moments", x, y)
    if kernels is None:
        return accumulate_moments_reference(m, x, y)
    done: list[str] = []
    try:
        kernels.accumulate_moments(m, x, y, done=done)
    except GradmapError:
        raise
    except Exception as exc:
        _kernel_failed("accumulate_moments", exc)
        _moments_parts_reference(m, x, y, [p for p in ("stats", "xtx", "xty") if p not in done])
        m.count += x.reshape(-1, m.d).shape[0]


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


def _check_solve_inputs(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    if a.dim() not in (2, 3) or a.shape[-1] != a.shape[-2] or b.shape != a.shape:
        raise GradmapError(f"projection_solve: A must be [d, d] or [n, d, d] and B the same shape, got "
                           f"A {tuple(a.shape)} and B {tuple(b.shape)}; pass XᵀX-type and XᵀY-type "
                           "statistics")
    if not (a.is_floating_point() and b.is_floating_point()) or a.device != b.device:
        raise GradmapError("projection_solve: A and B must be floating point tensors on one device")
    if dtype not in (torch.float64, torch.float32):
        raise GradmapError(f"projection_solve: dtype must be torch.float64 or torch.float32, got {dtype}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise GradmapError("projection statistics contain NaN/inf; the calibration forward overflowed "
                           "— run the model in bf16/fp32 rather than fp16, or lower the learning signal")


def projection_solve(a: torch.Tensor, b: torch.Tensor, ridge: float,
                     dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ridge-regularised solve P = (A_sym + λI)⁻¹ (B + λI), λ = ridge·tr(A)/d.

    Returns (P [.., d, d] in `dtype`, status int32 [..]: 0 Cholesky, 1 eigen-decomposition
    fallback). Uses the C++/CUDA extension when built (fused preparation, batched
    factorisation through ATen), else `projection_solve_reference`; results agree to
    1e-10 relative in fp64.
    """
    ext = None if force_reference() else extension.extension()
    if ext is None or (a.is_cuda and not ext.cuda_built()) or not (a.is_cuda or a.device.type == "cpu"):
        return projection_solve_reference(a, b, ridge, dtype)
    _check_solve_inputs(a, b, dtype)
    return ext.projection_solve(a, b, float(ridge), dtype == torch.float64)


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
    """Per-layer Σ|g| and Σg² (fp32) of many gradient tensors in one call.

    On CUDA one multi-tensor launch per dtype group reads every tensor once
    (`gradmap.kernels.grad_reductions`); pass all layers' gradients together to
    get the benefit.
    """
    kernels = _triton_for("layer_grad_reductions", *grads) if grads else None
    if kernels is None:
        return layer_grad_reductions_reference(grads, layer_ids, n_layers)
    try:
        return kernels.layer_grad_reductions(grads, layer_ids, n_layers)
    except GradmapError:
        raise
    except Exception as exc:
        _kernel_failed("layer_grad_reductions", exc)
        return layer_grad_reductions_reference(grads, layer_ids, n_layers)


def gate_reduction_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-token ⟨g_t, u_t⟩ in fp32 for g, u of shape [..., d]; returns shape [...]."""
    return (g.float() * u.float()).sum(-1)


def gate_reduction(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-token gate derivative s_t = ⟨g_t, u_t⟩ (fp32) of a layer's residual update u.

    g, u: [..., d] (g = ∂loss/∂(layer output), u = output − input); returns [...].
    The metric's totals are cheap reductions of this [tokens] vector:
    Σ_t |s_t| = s.abs().sum(), Σ_t s_t = s.sum(), per sequence s.sum(-1) for [batch, seq].
    """
    kernels = _triton_for("gate_reduction", g, u)
    if kernels is None:
        return gate_reduction_reference(g, u)
    try:
        return kernels.gate_reduction(g, u)
    except GradmapError:
        raise
    except Exception as exc:
        _kernel_failed("gate_reduction", exc)
        return gate_reduction_reference(g, u)


# ----------------------------------------------------------------------------- dispatch

_TRITON_OPS = ("accumulate_moments", "layer_grad_reductions", "gate_reduction")
_kernels_module: dict[str, object] = {}  # "module": ModuleType | None, "status": str
_failed: dict[str, str] = {}  # op -> reason its kernel was abandoned in this process


def force_reference() -> bool:
    """True when GRADMAP_FORCE_REFERENCE is set to a non-zero value (read at every call)."""
    return os.environ.get("GRADMAP_FORCE_REFERENCE", "0").strip() not in ("", "0")


def _load_kernels() -> ModuleType | None:
    if "status" not in _kernels_module:
        try:
            from gradmap import kernels as module  # imports triton; never initialises CUDA
            import triton
            _kernels_module.update(module=module, status=f"triton {triton.__version__}")
        except Exception as exc:
            _kernels_module.update(module=None, status=f"unavailable ({type(exc).__name__}: {exc})")
            log.warning("gradmap: Triton kernels %s; CUDA tensors use plain torch", _kernels_module["status"])
    return _kernels_module["module"]  # type: ignore[return-value]


def _triton_for(op: str, *tensors: torch.Tensor | None) -> ModuleType | None:
    """The kernels module when `op` should run on Triton for these tensors, else None."""
    if force_reference() or op in _failed:
        return None
    if not all(t.is_cuda for t in tensors if t is not None):
        return None
    return _load_kernels()


def _kernel_failed(op: str, exc: Exception) -> None:
    _failed[op] = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
    log.warning("gradmap: the Triton kernel for %s failed (%s); using the plain-torch reference "
                "(same result) for the rest of this process", op, _failed[op])


def backends() -> dict[str, str]:
    """Which implementation each op uses in this process, per device, and why.

    Keys: the four ops ("cpu=<impl>, cuda=<impl>"), "triton", "extension",
    "force_reference". Calling it may import Triton and load the extension; it
    never initialises CUDA.
    """
    if force_reference():
        reason = "torch (GRADMAP_FORCE_REFERENCE=1)"
        out = {op: reason for op in (*_TRITON_OPS, "projection_solve")}
        out.update(triton="not used (GRADMAP_FORCE_REFERENCE=1)",
                   extension="not used (GRADMAP_FORCE_REFERENCE=1)", force_reference="1")
        return out
    have_triton = _load_kernels() is not None
    out = {}
    for op in _TRITON_OPS:
        cuda = (f"torch (kernel failed: {_failed[op]})" if op in _failed
                else "triton" if have_triton else "torch")
        out[op] = f"cpu=torch, cuda={cuda}"
    ext = extension.extension()
    cpu_solve = "c++ (gradmap._C)" if ext is not None else "torch"
    cuda_solve = "c++/cuda (gradmap._C)" if ext is not None and ext.cuda_built() else "torch"
    out["projection_solve"] = f"cpu={cpu_solve}, cuda={cuda_solve}"
    out["triton"] = str(_kernels_module["status"])
    out["extension"] = extension.extension_status()
    out["force_reference"] = "0"
    return out
