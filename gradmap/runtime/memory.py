"""The runtime's memory policy: how large a micro-batch may be, and how freed memory goes back.

Measured on SmolLM2-135M (fp32, 0.54 GB of weights), default prune at 16 x 256 calibration
(bench/prune_peak_rss.py): with 2048-token micro-batches for the backward the process peaked at
4.15 GiB; with micro-batches sized to the activation budget below and glibc's mmap threshold
fixed, at 1.62 GiB (the model load itself peaks at 1.2 GiB: GGUF dequantisation).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["limit_heap_fragmentation"]


def limit_heap_fragmentation(threshold: int = 128 * 1024) -> bool:
    """Fix glibc's mmap threshold so activation-sized buffers are returned to the OS when freed.

    glibc raises the threshold dynamically (up to 32 MiB) after large frees, so the
    few-MiB activations of a long CPU pruning run land on the heap and fragment it: a
    `gradmap compare` on SmolLM2 grew to 22 GiB RSS and was OOM-killed, and two
    `fast_prune` calls left 7.8 GiB resident; with a fixed 128 KiB threshold
    (MALLOC_MMAP_THRESHOLD_=131072) the same two calls left 1.8 GiB. No-op off glibc or when
    the user set the variable. Returns whether the threshold was set.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3  # from malloc.h
        return bool(libc.mallopt(m_mmap_threshold, threshold))
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
