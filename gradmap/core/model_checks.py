"""Cheap checks of a model argument, dtype and device, run before any model is loaded.

Reading a config or a file header takes milliseconds; loading SmolLM2 takes about a minute.
So every command reads the layer count, the file headers and the device here first and
fails with one line naming the problem and the fix.
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

from gradmap.core.errors import GradmapError

__all__ = ["check_dtype", "check_device", "check_local_model", "looks_local", "gguf_metadata",
           "config_layer_ids", "DTYPE_NAMES", "HUB_ID_RE"]

DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
# what huggingface_hub accepts as a repo id: a name, or an owner/name pair
HUB_ID_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_dtype(dtype):
    """None, a torch floating dtype or one of DTYPE_NAMES -> None or torch.dtype."""
    import torch

    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return getattr(torch, dtype)
    raise GradmapError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPE_NAMES)} "
                       "(or leave it unset to keep the checkpoint's dtype)")


def check_device(device) -> str:
    """Refuse a device this machine does not have, before the model is loaded onto it."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise GradmapError(f"device {device!r} is not a device name; use cpu, cuda, cuda:N or "
                           "mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GradmapError(f"device {device!r}: no CUDA GPU is available (torch "
                               f"{torch.__version__}, CUDA build {torch.version.cuda}); use "
                               "--device cpu or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise GradmapError(f"device {device!r}: this machine has {count} CUDA GPU(s), "
                               f"numbered 0 to {count - 1}; pick one of those")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise GradmapError(f"device {device!r}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise GradmapError(f"device type {dev.type!r} is not supported; use cpu, cuda, cuda:N or mps")
    return str(device)


def looks_local(name: str) -> bool:
    """True for strings that can only be meant as a path (never a hub id)."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name in (".", "..")
            or name.count("/") > 1 or name.endswith(("/", ".gguf", ".safetensors", ".json", ".bin"))
            or not HUB_ID_RE.match(name))


def _read_exact(f, n: int, path: Path) -> bytes:
    # a corrupt length field must not become a multi-GB read (MemoryError) before the size check
    if n > os.fstat(f.fileno()).st_size - f.tell():
        raise GradmapError(f"{str(path)!r} ends inside its header (truncated or corrupt); download it again")
    data = f.read(n)
    if len(data) != n:
        raise GradmapError(f"{str(path)!r} ends inside its header (truncated); download it again")
    return data


# GGUF value types -> struct format of one scalar (8 = string, 9 = array are handled apart)
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}


def _gguf_value(f, vtype: int, path: Path):
    if vtype == 8:
        (n,) = struct.unpack("<Q", _read_exact(f, 8, path))
        return _read_exact(f, n, path).decode("utf-8", "replace")
    if vtype == 9:
        etype, count = struct.unpack("<IQ", _read_exact(f, 12, path))
        return [_gguf_value(f, etype, path) for _ in range(count)]
    if vtype not in _GGUF_SCALARS:
        raise GradmapError(f"{str(path)!r} has an unknown GGUF value type {vtype}; it is corrupt "
                           "or from a newer GGUF version")
    fmt = _GGUF_SCALARS[vtype]
    return struct.unpack(fmt, _read_exact(f, struct.calcsize(fmt), path))[0]


def gguf_metadata(path: str | os.PathLike, stop_at: str | None = None) -> dict:
    """The key/value header of a GGUF file (format spec: ggml docs/gguf.md), up to `stop_at`.

    Reads only the header (kilobytes), so a random or truncated file fails in milliseconds.
    """
    path = Path(path)
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise GradmapError(f"{str(path)!r} is not a GGUF file (it does not start with 'GGUF'); "
                               "pass a .gguf model file")
        version, _, n_kv = struct.unpack("<IQQ", _read_exact(f, 20, path))
        if version < 2:
            raise GradmapError(f"{str(path)!r} is GGUF version {version}; transformers reads "
                               "version 2 and later: convert it again with a recent llama.cpp")
        meta = {}
        for _ in range(n_kv):
            (n,) = struct.unpack("<Q", _read_exact(f, 8, path))
            key = _read_exact(f, n, path).decode("utf-8", "replace")
            (vtype,) = struct.unpack("<I", _read_exact(f, 4, path))
            meta[key] = _gguf_value(f, vtype, path)
            if stop_at is not None and key == stop_at:
                break
        return meta


def _check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header size, a JSON header, then the data it describes."""
    size = path.stat().st_size
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", _read_exact(f, 8, path))
        if n > size - 8:
            raise GradmapError(f"{str(path)!r} is truncated or not a safetensors file; download "
                               "it again")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise GradmapError(f"{str(path)!r} has a corrupt header; download it again") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise GradmapError(f"{str(path)!r} is truncated ({size} of {8 + n + end} bytes); download "
                           "it again")


def check_local_model(directory: str | os.PathLike) -> None:
    """A local HF folder must hold config.json and complete weights."""
    d = Path(directory)
    if not (d / "config.json").is_file():
        raise GradmapError(f"directory {str(d)!r} has no config.json; pass a Hugging Face model "
                           "directory, a .gguf file, a hub id, or an alias")
    _check_config(d / "config.json")
    shards = sorted(d.glob("*.safetensors"))
    if not shards and not any((d / w).is_file() for w in WEIGHT_FILES) and not any(d.glob("*.bin")):
        raise GradmapError(f"directory {str(d)!r} has config.json but no weights "
                           f"({' or '.join(WEIGHT_FILES[:3])}); copy the weights there too")
    for shard in shards:
        _check_safetensors(shard)


# far above any real model; a typo like 1e12 would otherwise allocate until MemoryError
MAX_LAYERS = 10_000


def _check_config(path: Path) -> None:
    """config.json must be a JSON object with a sane layer count, before transformers reads it."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GradmapError(f"{str(path)!r} is not valid JSON ({str(exc).splitlines()[0]}); "
                           "download the model again") from None
    if not isinstance(config, dict):
        raise GradmapError(f"{str(path)!r} holds a JSON {type(config).__name__}, not an object "
                           "of settings; download the model again")
    inner = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for cfg in (config, inner):
        n = cfg.get("num_hidden_layers")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_LAYERS):
            raise GradmapError(f"{str(path)!r}: num_hidden_layers is {n!r}, not an integer in "
                               f"[1, {MAX_LAYERS}]; fix config.json or download the model again")


def _gguf_arch_value(path: Path, key: str):
    """The GGUF header's `<architecture>.<key>` (e.g. block_count), read without the tensors."""
    arch = gguf_metadata(path, stop_at="general.architecture").get("general.architecture")
    return gguf_metadata(path, stop_at=f"{arch}.{key}").get(f"{arch}.{key}")


def config_context(directory: str | os.PathLike | None, gguf_file: str | None) -> int | None:
    """The model's context length (max_position_embeddings), from config.json or the GGUF header;
    None when it cannot be read without loading."""
    if directory is None:
        return None
    if gguf_file:
        n = _gguf_arch_value(Path(directory) / gguf_file, "context_length")
    else:
        try:
            config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict):
            return None
        inner = config.get("text_config")
        n = config.get("max_position_embeddings", inner.get("max_position_embeddings")
                       if isinstance(inner, dict) else None)
    return int(n) if isinstance(n, int) and n > 0 else None


def config_layer_ids(directory: str | os.PathLike | None, gguf_file: str | None) -> list[int] | None:
    """ORIGINAL indices of the decoder layers, from config.json or the GGUF header.

    A checkpoint gradmap already pruned lists them in `gradmap_layer_ids`; otherwise they are
    0 .. num_hidden_layers - 1. None when the config cannot be read (e.g. a hub id).
    """
    if directory is None:
        return None
    if gguf_file:
        count = _gguf_arch_value(Path(directory) / gguf_file, "block_count")
        return list(range(int(count))) if count is not None else None
    try:
        config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config) if "num_hidden_layers" not in config else config
    ids, count = config.get("gradmap_layer_ids"), config.get("num_hidden_layers")
    if isinstance(ids, list) and all(isinstance(i, int) for i in ids):
        return ids
    return list(range(count)) if isinstance(count, int) else None
