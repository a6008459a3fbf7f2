"""Ops: each statistic and solve with its plain-torch reference and its dispatch, one file per op.

moments (Σx, Σx², XᵀX, XᵀY), gate_reduction (⟨g_t, u_t⟩), grad_reductions (per-layer
Σ|g|, Σg²), solve (batched ridge projection solve); backend holds the shared policy
(kernel loading, fp32/bf16 rule, fallbacks, strict mode) and extension loads the
optional C++/CUDA module. Importing this package never imports Triton and never
initialises CUDA.
"""
from gradmap.ops.backend import StrictKernelError, backends, force_reference, strict_kernels
from gradmap.ops.gate_reduction import gate_reduction, gate_reduction_reference
from gradmap.ops.grad_reductions import layer_grad_reductions, layer_grad_reductions_reference
from gradmap.ops.moments import Moments, accumulate_moments, accumulate_moments_reference
from gradmap.ops.solve import projection_solve, projection_solve_reference

__all__ = [
    "Moments", "accumulate_moments", "accumulate_moments_reference", "projection_solve",
    "projection_solve_reference", "layer_grad_reductions", "layer_grad_reductions_reference",
    "gate_reduction", "gate_reduction_reference", "backends", "force_reference", "strict_kernels",
    "StrictKernelError",
]
