"""Data-parallel calibration on torch.distributed: shard the calibration rows, all-reduce statistics.

Every statistic gradmap accumulates is a sum over calibration tokens (or
sequences), so data parallelism is: each rank runs its shard, then sums are
all-reduced before any decision. All ranks then take identical decisions and
fold identical weights; only rank 0 writes files. Without an initialised
process group every function here is a no-op, so single-process code paths
are unchanged. Works with NCCL (GPUs) and gloo (CPU) under `torchrun`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "world_size", "is_main", "shard_rows", "all_reduce_sum_",
           "all_reduce_sums_"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the rank that writes outputs (rank 0, or the only process)."""
    return rank() == 0


def shard_rows(calib: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the calibration rows (all rows when not distributed).

    Ranks get near-equal contiguous slices, so the union over ranks is exactly `calib`.
    """
    if not is_distributed():
        return calib
    n, r, w = calib.shape[0], rank(), world_size()
    if n < w:
        from .errors import GradmapError
        raise GradmapError(f"{n} calibration samples cannot be split over {w} processes; "
                           f"use at least {w} samples or fewer processes")
    lo, hi = (n * r) // w, (n * (r + 1)) // w
    return calib[lo:hi]


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (fp64 tensors stay fp64) and return it."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_sums_(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum several tensors over ranks in one collective per dtype/device group."""
    if not is_distributed() or not tensors:
        return tensors
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    return tensors
