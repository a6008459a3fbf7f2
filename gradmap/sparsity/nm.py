"""N:M semi-structured sparsity: in every group of M consecutive inputs of a row, at most N weights are non-zero.

The convention is NVIDIA's (2:4 = two non-zeros in every four, what Ampere and newer GPUs
accelerate), so a pattern N:M zeroes a fraction 1 − N/M of every matrix: 2:4 and 4:8 are both
50%, with 4:8 the more flexible. Groups run along the input dimension (`in_features`), which must
be a multiple of M. The per-layer sparsity is fixed by the pattern, so only the uniform
allocation applies.
"""
from __future__ import annotations

import re

import torch

from gradmap.core.errors import GradmapError

__all__ = ["parse_pattern", "prune_nm_", "check_nm"]


def parse_pattern(pattern: str) -> tuple[int, int]:
    """"N:M" -> (N, M) with 0 < N < M; a GradmapError naming the fix otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern) if isinstance(pattern, str) else None
    if not match or not 0 < int(match.group(1)) < int(match.group(2)):
        raise GradmapError(f"pattern must be 'N:M' with 0 < N < M (N non-zeros in every M weights), "
                           f"got {pattern!r}; e.g. pattern='2:4' or '4:8'")
    return int(match.group(1)), int(match.group(2))


@torch.no_grad()
def prune_nm_(weight: torch.Tensor, scores: torch.Tensor, n: int, m: int) -> int:
    """Zero the M − N lowest-scoring weights of every group of M consecutive inputs; return the zeros."""
    rows, cols = weight.shape
    if cols % m:
        raise GradmapError(f"a layer with {cols} inputs cannot hold the {n}:{m} pattern ({cols} is not a "
                           f"multiple of {m}); choose an M that divides every layer's in_features")
    groups = scores.to(weight.device).reshape(rows, cols // m, m)
    idx = groups.topk(m - n, dim=2, largest=False).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device).scatter_(2, idx, True)
    weight.masked_fill_(mask.reshape(rows, cols), 0)
    return int((weight == 0).sum())


def check_nm(weight: torch.Tensor, n: int, m: int, name: str = "weight") -> None:
    """Raise RuntimeError unless every group of M consecutive inputs has at most N non-zeros."""
    rows, cols = weight.shape
    nonzero = (weight.reshape(rows, cols // m, m) != 0).sum(2)
    worst = int(nonzero.max())
    if worst > n:
        raise RuntimeError(f"{name} breaks the {n}:{m} pattern ({worst} non-zeros in a group of {m}); "
                           "this is a bug")
