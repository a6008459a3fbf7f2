"""Ops: each statistic and solve with its plain-torch reference, its dispatch and its kernel launcher.

Importing this package never imports Triton and never initialises CUDA.
"""
from gradmap.ops.dispatch import (Moments, accumulate_moments, accumulate_moments_reference, backends,
                                  force_reference, gate_reduction, gate_reduction_reference,
                                  layer_grad_reductions, layer_grad_reductions_reference, projection_solve,
                                  projection_solve_reference)

__all__ = [
    "Moments", "accumulate_moments", "accumulate_moments_reference", "projection_solve",
    "projection_solve_reference", "layer_grad_reductions", "layer_grad_reductions_reference",
    "gate_reduction", "gate_reduction_reference", "backends", "force_reference",
]
