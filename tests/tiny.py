"""Tiny random models of every supported family, built offline from config classes."""
from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig,
                          MistralConfig, Phi3Config, Qwen2Config, Qwen3Config)

VOCAB = 96
COMMON = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)

# keyword arguments of tiny_model override these (e.g. vocab_size, head_dim)
CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**{**COMMON, **kw}),
    "mistral": lambda **kw: MistralConfig(**{**COMMON, "sliding_window": None, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**COMMON, **kw}),
    "qwen3": lambda **kw: Qwen3Config(**{**COMMON, "head_dim": 8, **kw}),
    "gemma2": lambda **kw: Gemma2Config(**{**COMMON, "head_dim": 8, "sliding_window": 16, **kw}),
    "gemma3_text": lambda **kw: Gemma3TextConfig(**{**COMMON, "head_dim": 8, "sliding_window": 16, **kw}),
    "phi3": lambda **kw: Phi3Config(**{**COMMON, **kw}),
}
FAMILIES = sorted(CONFIGS)


def tiny_model(family: str, n_layers: int = 6, tied: bool | None = None, dtype=torch.float32,
               seed: int = 0, **kw):
    """A randomly initialised tiny causal LM of `family` in eval mode.

    Weights are drawn with a larger std than HF's default so every layer
    changes the residual stream noticeably (tests then see real differences).
    """
    if tied is not None:
        kw["tie_word_embeddings"] = tied
    config = CONFIGS[family](num_hidden_layers=n_layers, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
            elif "norm" in name:
                p.uniform_(-0.2, 0.2).add_(0.0 if "gemma" in family else 1.0)
    return model.to(dtype).eval()


def random_ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def paired_leaves(a, b, path: str = ""):
    """Walk two nested dict/list/tuple trees together, asserting the same shape; yield (x, y, path)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), \
            f"{path}: keys {sorted(a, key=str)} != {sorted(b, key=str) if isinstance(b, dict) else b!r}"
        for k in a:
            yield from paired_leaves(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            yield from paired_leaves(x, y, f"{path}[{i}]")
    else:
        yield a, b, path
