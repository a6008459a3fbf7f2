"""gradmap: remove whole decoder layers from HF causal LMs and repair the damage.

Importing gradmap never initialises CUDA and never downloads anything.
"""
from .adapter import ModelAdapter, get_adapter
from .checkpoint import save_pretrained
from .errors import GradmapError, UnsupportedModelError
from .models import load_model
from .prune import fast_prune
from .result import PruneResult
from .sparsify import SparsifyResult, sparsify
from .surgery import original_layer_ids, remove_layers

__all__ = [
    "GradmapError", "ModelAdapter", "UnsupportedModelError", "get_adapter", "load_model",
    "original_layer_ids", "remove_layers", "save_pretrained", "sparsify", "SparsifyResult",
    "fast_prune", "PruneResult",
]
__version__ = "0.1.0"
