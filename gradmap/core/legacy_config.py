"""Keys that transformers 4.x reads, written next to the 5.x ones, so a checkpoint loads the same on both.

transformers 5 saves RoPE settings only as `rope_parameters` and names the tokenizer class
`TokenizersBackend`. transformers 4.57 (which serving stacks often pin, and which the project's
`transformers>=4.56` admits) ignores `rope_parameters`, silently falls back to rope_theta=10000,
and cannot resolve the tokenizer class. transformers 5 reads the legacy keys as well, so writing
both is safe on both sides (tests/test_serving_compat.py checks the 5.x round trip; the
.ci/compat-transformers step loads the output under 4.57.1).
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["legacy_config_keys", "add_legacy_keys"]

# transformers 5's tokenizer class for any tokenizer.json tokenizer; 4.x knows it by this name
_FAST_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _scaling(params: dict) -> dict | None:
    """4.x `rope_scaling`: rope_parameters without rope_theta, None for plain RoPE."""
    if params.get("rope_type", "default") == "default":
        return None
    return {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}


def legacy_config_keys(config: dict) -> dict:
    """The 4.x keys (rope_theta, rope_scaling, rope_local_base_freq, partial_rotary_factor) implied by
    `config["rope_parameters"]`, leaving out any the config already has."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return {}
    out = {}
    if "full_attention" in params or "sliding_attention" in params:
        # per-layer-type RoPE (Gemma 3): 4.x holds the global one in rope_theta/rope_scaling and the
        # sliding layers' base in rope_local_base_freq
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
        if "rope_theta" in full:
            out["rope_theta"] = full["rope_theta"]
            out["rope_scaling"] = _scaling(full)
        if "rope_theta" in local:
            out["rope_local_base_freq"] = local["rope_theta"]
    elif "rope_theta" in params:
        out["rope_theta"] = params["rope_theta"]
        out["rope_scaling"] = _scaling(params)
        if "partial_rotary_factor" in params:
            out["partial_rotary_factor"] = params["partial_rotary_factor"]
    return {k: v for k, v in out.items() if k not in config}


def add_legacy_keys(folder: str | Path) -> None:
    """Rewrite config.json and tokenizer_config.json in `folder` (a fresh save) with the 4.x keys."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        config = json.loads(cfg_path.read_text())
        extra = legacy_config_keys(config)
        if extra:
            config.update(extra)
            cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok_path = folder / "tokenizer_config.json"
    if tok_path.is_file():
        tok = json.loads(tok_path.read_text())
        before = dict(tok)
        if tok.get("tokenizer_class") in _FAST_CLASS and (folder / "tokenizer.json").is_file():
            tok["tokenizer_class"] = _FAST_CLASS[tok["tokenizer_class"]]
        if isinstance(tok.get("extra_special_tokens"), list):
            # 5.x lists extra special tokens here; 4.x expects a dict under this name (a list crashes
            # it) and reads the list as additional_special_tokens, which 5.x also accepts
            tok.setdefault("additional_special_tokens", tok.pop("extra_special_tokens"))
            tok.pop("extra_special_tokens", None)
        if tok != before:
            tok_path.write_text(json.dumps(tok, indent=2, ensure_ascii=False) + "\n")
