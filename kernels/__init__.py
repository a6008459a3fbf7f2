"""Triton kernels for gradmap's statistics (installed as ``gradmap.kernels``).

One kernel per file: private ``@triton.jit`` kernels, then a launcher that
checks its inputs. Each names the plain-torch reference in ``gradmap.ops`` that
it must equal. Import this package only when a CUDA tensor needs it (or under
TRITON_INTERPRET=1 in tests): ``gradmap.ops`` does so lazily, and importing it
never initialises CUDA.
"""
from .gate_reduction import gate_reduction
from .grad_reductions import layer_grad_reductions
from .moments import accumulate_moments, column_stats_update, gram_update

__all__ = ["accumulate_moments", "column_stats_update", "gate_reduction", "gram_update",
           "layer_grad_reductions"]
