"""Launch helpers shared by the Triton kernels: device/dtype checks, dtype maps, block sizes.

The kernels run on CUDA tensors. Under ``TRITON_INTERPRET=1`` (tests only) they
also accept CPU tensors, so their numerics can be checked without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from gradmap.core.errors import GradmapError

__all__ = [
    "SUPPORTED_DTYPES", "TL_DTYPES", "check_inputs", "interpreting", "empty", "device_table",
    "upcast_dots", "cdiv", "on_device",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether a kernel must cast bf16 tiles to fp32 before tl.dot.

    Only in the interpreter: it multiplies bf16 tiles as their raw uint16 bit
    patterns. bf16 products are exact in fp32, so the result is the same.
    """
    return interpreting() and dtype == torch.bfloat16


def check_inputs(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """Check that the named tensors share one usable device and a supported dtype; return it."""
    device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise GradmapError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise GradmapError(f"{op}: {name} has dtype {t.dtype}; the kernel reads float32, bfloat16 "
                               "or float16 — cast it first (accumulation is fp32 regardless)")
        if device is None:
            device = t.device
        elif t.device != device:
            raise GradmapError(f"{op}: {name} is on {t.device} but the other inputs are on {device}; "
                               "move them to one device")
    if device is None:
        raise GradmapError(f"{op}: no input tensors given")
    if device.type != "cuda" and not interpreting():
        raise GradmapError(f"{op}: the Triton kernel needs CUDA tensors, got {device}; call "
                           "gradmap.ops (it uses plain torch on CPU) or move the tensors to a GPU")
    return device


def on_device(device: torch.device):
    """Context making `device` current, so Triton launches on the GPU that holds the tensors."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def empty(shape, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor when GRADMAP_KERNEL_POISON=1 (tests: unwritten → NaN)."""
    if os.environ.get("GRADMAP_KERNEL_POISON", "0") == "1":
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _cached_table(values: tuple, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def device_table(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant index table on `device`, built once per (values, device) and reused."""
    return _cached_table(values, dtype, str(device))


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return triton.cdiv(a, b)
