"""Checks of a local model's config.json that prune, sparsify and compare run before loading.

The adapter and the N:M sparsifier refuse the same things once the weights are loaded (a minute
for SmolLM2); config.json says enough to refuse them in milliseconds.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from gradmap.core.errors import GradmapError

__all__ = ["model_config", "check_family", "config_widths", "check_pattern_widths"]


def model_config(model: str) -> dict | None:
    """The config.json of a local folder or cached hub id; None when it cannot be read cheaply
    (GGUF files, hub ids not in the cache, unreadable files: the loader reports those)."""
    from gradmap.core.models import resolve_model_path
    try:
        folder, gguf_file = resolve_model_path(model)
    except GradmapError:  # reported by the command's own model check
        return None
    if gguf_file:
        return None
    path = Path(folder) / "config.json"
    if not os.path.isdir(folder):
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(folder, "config.json")
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def check_family(model: str) -> None:
    """config.json's model_type must be one the adapter supports."""
    from gradmap.core.adapter import FAMILIES
    config = model_config(model)
    family = config.get("model_type") if config else None
    if isinstance(family, str) and family not in FAMILIES:
        raise GradmapError(f"model {model!r} is a {family!r} model (config.json model_type), which "
                           "gradmap does not support; supported model types: "
                           f"{', '.join(sorted(FAMILIES))}")


def config_widths(config: dict) -> set[int]:
    """The in_features of a decoder layer's linear modules, as config.json gives them."""
    config = config.get("text_config", config) if "hidden_size" not in config else config
    hidden, inter, heads = (config.get(k) for k in ("hidden_size", "intermediate_size",
                                                     "num_attention_heads"))
    # q/k/v/gate/up read hidden_size, down reads intermediate_size, o reads heads * head_dim
    head_dim = config.get("head_dim") or (hidden // heads if isinstance(hidden, int)
                                          and isinstance(heads, int) and heads > 0 else None)
    attn = heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else None
    return {w for w in (hidden, inter, attn) if isinstance(w, int) and not isinstance(w, bool)}


def check_pattern_widths(model: str, n: int, m: int) -> None:
    """Every linear layer's in_features must be a multiple of M for an N:M pattern."""
    config = model_config(model)
    bad = sorted(w for w in config_widths(config) if w % m) if config else []
    if bad:
        raise GradmapError(f"pattern {n}:{m} needs every layer's in_features to be a multiple of {m}, "
                           f"but model {model!r} has {', '.join(map(str, bad))} (config.json); "
                           f"choose an M that divides {', '.join(map(str, bad))}")
