"""Data-parallel calibration on torch.distributed: shard the calibration rows, all-reduce statistics.

Every statistic gradmap accumulates is a sum over calibration tokens (or
sequences), so data parallelism is: each rank runs its shard, then sums are
all-reduced before any decision. All ranks then take identical decisions and
fold identical weights; only rank 0 writes files. Without an initialised
process group every function here is a no-op, so single-process code paths
are unchanged. Works with NCCL (GPUs) and gloo (CPU) under `torchrun`.

Where rows are split: `fast_prune` keeps the GLOBAL calibration set everywhere and every
calibration pass (gradmap.runtime.passes, compensation.stats / magnitude / projection)
shards the rows it is given and reduces what it returns. Subsets of rows (GradMAP
verification rows, the projection held-out slice, magnitude `max_samples`) are therefore
picked exactly as in one process; a subset smaller than the world leaves some ranks with
no rows, which contribute zeros. `sparsify` uses every row in every pass, so it shards once
at its entry. An exception on one rank only leaves the other ranks waiting in the next
collective: under torchrun the agent then stops the whole group.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from gradmap.ops import Moments

__all__ = ["is_distributed", "rank", "world_size", "is_main", "shard_bounds", "shard_rows",
           "all_reduce_sum_", "all_reduce_sums_", "all_reduce_moments_", "barrier", "process_group"]

# all_reduce_sums_ packs tensors into flat buffers of at most this size (one extra copy at a time)
BUCKET_BYTES = 2 ** 28


def is_distributed() -> bool:
    """True inside an initialised torch.distributed group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the rank that writes outputs (rank 0, or the only process)."""
    return rank() == 0


def shard_bounds(n: int, allow_empty: bool = False) -> tuple[int, int]:
    """[lo, hi): this rank's contiguous share of n rows, lo = ⌊n·r/w⌋, hi = ⌊n·(r+1)/w⌋.

    The shares of all ranks tile [0, n) in rank order. With `allow_empty` a rank may get no
    row (a small subset such as a held-out slice); otherwise n < world size is an error.
    """
    r, w = rank(), world_size()
    if n < w and not allow_empty:
        from gradmap.core.errors import GradmapError
        raise GradmapError(f"{n} calibration samples cannot be split over {w} processes; "
                           f"use at least {w} samples or fewer processes")
    return (n * r) // w, (n * (r + 1)) // w


def shard_rows(calib: torch.Tensor, allow_empty: bool = False) -> torch.Tensor:
    """This rank's contiguous share of the calibration rows (all rows when not distributed).

    Ranks get near-equal contiguous slices, so the union over ranks is exactly `calib`.
    """
    if not is_distributed():
        return calib
    lo, hi = shard_bounds(calib.shape[0], allow_empty)
    return calib[lo:hi]


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (fp64 tensors stay fp64) and return it."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _reduce_bucket(bucket: list[torch.Tensor]) -> None:
    if len(bucket) == 1 and bucket[0].is_contiguous():
        dist.all_reduce(bucket[0], op=dist.ReduceOp.SUM)
        return
    flat = torch.cat([t.reshape(-1) for t in bucket])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in bucket:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_sums_(tensors: Sequence[torch.Tensor], bucket_bytes: int = BUCKET_BYTES
                     ) -> Sequence[torch.Tensor]:
    """Sum several tensors over ranks in place: one collective per dtype/device group.

    A group larger than `bucket_bytes` is sent in several flat buckets, so the extra
    memory is one bucket, not a second copy of everything (e.g. all weight gradients).
    Every rank must pass tensors of the same shapes, dtypes and order.
    """
    if not is_distributed() or not tensors:
        return tensors
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        bucket, size = [], 0
        for t in group:
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > bucket_bytes:
                _reduce_bucket(bucket)
                bucket, size = [], 0
            bucket.append(t)
            size += nbytes
        if bucket:
            _reduce_bucket(bucket)
    return tensors


def all_reduce_moments_(moments: Sequence["Moments"], scalars: Sequence[float] = ()) -> list[float]:
    """Sum running `Moments` (Σx, Σx², XᵀX, XᵀY and token counts) and extra scalars over ranks.

    The moments are updated in place; returns the summed `scalars` (fp64). One
    `all_reduce_sums_` call for everything. Without a process group it returns
    `scalars` unchanged.
    """
    if not is_distributed():
        return [float(x) for x in scalars]
    tensors = [t for m in moments for t in (m.sum_x, m.sq_x, m.xtx, m.xty) if t is not None]
    device = tensors[0].device if tensors else _collective_device()
    counts = torch.tensor([float(m.count) for m in moments] + [float(x) for x in scalars],
                          dtype=torch.float64, device=device)
    all_reduce_sums_(tensors + [counts])
    values = counts.tolist()
    for m, c in zip(moments, values):
        m.count = int(round(c))
    return values[len(moments):]


def _collective_device() -> torch.device:
    """A device the process group's backend can reduce on (NCCL needs CUDA tensors)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


@contextmanager
def process_group(device: str = "cpu") -> Iterator[str]:
    """Join the process group `torchrun` describes in the environment; yield this rank's device.

    Under `torchrun` (WORLD_SIZE > 1 in the environment) a group is initialised — NCCL
    when `device` is CUDA (each rank then uses cuda:LOCAL_RANK), gloo otherwise — and
    destroyed on exit. Without torchrun, or when a group already exists, nothing changes.
    """
    wanted = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not wanted or (dist.is_available() and dist.is_initialized()):
        yield device
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()
