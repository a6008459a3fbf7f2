"""Stage 2 / ReplaceMe placements and the running statistics one compensation pass collects.

A site pairs the MLP output M and residual stream Y of a kept layer with the dense output T of
a target layer; its moments are those of the regression min_P Σ_t ‖M_t P + Y_t − T_t‖². Both
the in-memory pass (`stats`) and the streamed one (`streamed`) fill these in the same order.
"""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from torch import nn

from gradmap.core import distributed
from gradmap.core.adapter import ModelAdapter
from gradmap.ops import Moments
from gradmap.prune.compensation.base import PruneContext
from gradmap.prune.compensation.dense import DenseSnapshot, shared_prefix
from gradmap.runtime.placement import model_device

__all__ = ["mlp_output_module", "Site", "SiteMoments", "StreamStats", "merge_means", "moments_in", "stream_plan",
           "all_reduce_stats_"]


def mlp_output_module(adapter: ModelAdapter, position: int) -> nn.Module:
    """The module whose output is what the MLP adds to the residual stream (M of Stage 2).

    Pre-norm families: the down projection. Post-sublayer-norm families (Gemma2/3):
    the norm applied to the MLP output before the residual add.
    """
    parts = adapter.parts(position)
    return parts.mlp_post_norm if parts.mlp_post_norm is not None else parts.mlp_down


@dataclass(frozen=True)
class Site:
    """One projection placement: M, Y at kept layer `layer`, T = dense output of layer `target`."""

    layer: int
    target: int


@dataclass
class SiteMoments:
    """Running statistics of one site: `mr` holds MᵀM and Mᵀ(T − Y); `r` holds Σ‖T − Y‖²."""

    mr: Moments
    r: Moments


@dataclass
class StreamStats:
    """Everything one streaming pass collected (all fp32 running sums)."""

    pruned_means: dict[int, Moments] = field(default_factory=dict)
    dense_means: dict[int, Moments] = field(default_factory=dict)
    sites: dict[Site, SiteMoments] = field(default_factory=dict)
    nll: float = 0.0
    tokens: int = 0


def merge_means(*parts: dict[int, Moments]) -> dict[int, torch.Tensor]:
    """Pooled means of several passes' per-layer Moments (token-weighted)."""
    out: dict[int, torch.Tensor] = {}
    for key in parts[0]:
        total = sum(p[key].sum_x for p in parts)
        count = sum(p[key].count for p in parts)
        out[key] = total / max(count, 1)
    return out


def moments_in(store: dict, key: Hashable, d: int, device, **kw) -> Moments:
    """`store[key]`, created as an empty Moments(d, **kw) on first use."""
    if key not in store:
        store[key] = Moments(d, device=device, **kw)
    return store[key]


def stream_plan(ctx: PruneContext, snap: DenseSnapshot, dense_mean_layers: list[int], sites: list
                ) -> tuple[list[int], set[int], int, set[int], list[int]]:
    """(site layers, dense layers wanted, shared prefix k, those read off the pruned pass, dense run).

    Dense layers inside the prefix the pruned and dense models share are read off the pruned
    pass; only the rest need the dense path.
    """
    site_layers = sorted({s.layer for s in sites})
    dense_wanted = {s.target for s in sites} | set(dense_mean_layers)
    k = shared_prefix(ctx, snap) if dense_wanted else 0
    from_pruned = {o for o in dense_wanted if snap.dense_position(o) < k}
    return site_layers, dense_wanted, k, from_pruned, sorted(dense_wanted - from_pruned)


def all_reduce_stats_(stats: StreamStats, model: nn.Module, d: int, mean_layers: list[int],
                       dense_mean_layers: list[int], sites: list[Site]) -> None:
    """Sum every running statistic of `stats` over ranks, in one collective (no-op single-process).

    A rank whose share of the rows was empty holds no Moments yet: zeros are created first so
    that every rank sends the same tensors in the same order.
    """
    if not distributed.is_distributed():
        return
    device = model_device(model)
    moments = [moments_in(stats.pruned_means, o, d, device, want_xtx=False) for o in mean_layers]
    moments += [moments_in(stats.dense_means, o, d, device, want_xtx=False) for o in dense_mean_layers]
    for s in sites:
        if s not in stats.sites:
            stats.sites[s] = SiteMoments(Moments(d, d_y=d, device=device),
                                         Moments(d, want_xtx=False, device=device))
        moments += [stats.sites[s].mr, stats.sites[s].r]
    stats.nll, tokens = distributed.all_reduce_moments_(moments, [stats.nll, stats.tokens])
    stats.tokens = int(round(tokens))

