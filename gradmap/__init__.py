"""gradmap: remove whole decoder layers from HF causal LMs and repair the damage.

Importing gradmap is light: it imports neither torch nor transformers until a name below is
used, never initialises CUDA and never downloads anything. Layers (each imports only from
those before it): core -> ops -> runtime -> prune / healing / sparsity / evaluate -> api -> cli, experiments.
"""
from __future__ import annotations

import importlib

from gradmap.version import __version__

# public name -> module that defines it (resolved on first access)
_EXPORTS = {
    "fast_prune": "gradmap.api", "sparsify": "gradmap.api", "remove_layers": "gradmap.api",
    "save_pretrained": "gradmap.api", "load_model": "gradmap.api", "original_layer_ids": "gradmap.api",
    "calibration_data": "gradmap.api",
    "PruneResult": "gradmap.api", "SparsifyResult": "gradmap.api", "GradmapError": "gradmap.core.errors",
    "UnsupportedModelError": "gradmap.core.errors", "ModelAdapter": "gradmap.core.adapter",
    "get_adapter": "gradmap.core.adapter", "export_gguf": "gradmap.api",
    "heal": "gradmap.api", "HealOptions": "gradmap.api", "HealReport": "gradmap.api",
}
_SUBMODULES = ("api", "core", "ops", "runtime", "prune", "healing", "sparsity", "evaluate", "cli", "experiments")

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"gradmap.{name}")
    else:
        raise AttributeError(f"module 'gradmap' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
