"""Compensation statistics under layer streaming (`offload="layer"`, see `gradmap.runtime.streaming`).

The same sums as the in-memory passes — `stats.stream_statistics` (mean shifts and the
Stage 2 / ReplaceMe moments), `magnitude.residual_gain` (E|h_in|, E|h_out|) and the
held-out next-token loss — but computed layer-major with one decoder layer at a time on
the compute device. Every Moments object still receives the micro-batches in the same
order and the same values, so the sums are those of the in-memory path.

Pruned and dense path. The pruned model and the dense view (`stats.dense_view`: removed
layers re-inserted, original weights swapped in) share their first k layers
(`stats.shared_prefix`). The pruned path runs positions [0, k), hands its hidden states to
the dense path, which runs from position k to its last wanted layer, then the pruned path
goes on from k (to the LM head for the held-out loss). A Stage 2 site needs, for the same
micro-batch, the pruned (M, Y) of its layer and the dense target T; whichever comes first
waits on the host until the other arrives (host memory: one tokens × d tensor per waiting
site or target, per micro-batch). Statistics live on the compute device; weights are never
edited here — the folds run afterwards on the host weights.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from gradmap.core.adapter import ModelAdapter, get_adapter
from gradmap.ops import Moments, accumulate_moments
from gradmap.prune.compensation.base import PruneContext
from gradmap.prune.compensation.dense import DenseSnapshot, dense_view
from gradmap.prune.compensation.sites import (Site, SiteMoments, StreamStats, all_reduce_stats_, mlp_output_module,
                                              moments_in, stream_plan)
from gradmap.runtime.batching import magnitude_terms
from gradmap.runtime.hooks import capture
from gradmap.runtime.loss import head_loss_sum
from gradmap.runtime import placement
from gradmap.runtime.placement import head_modules, host_device, offload_of
from gradmap.runtime.streaming import StreamInputs, layer_out

__all__ = ["streamed_statistics", "streamed_layer_abs", "streamed_lm_loss"]

# step(pos, j, h_in, h_out, captured module outputs) after layer `pos` ran on micro-batch j
Step = Callable[[int, int, torch.Tensor, torch.Tensor, dict], None]


def _device(model: nn.Module) -> torch.device:
    return offload_of(model).compute_device


def _run(adapter: ModelAdapter, inputs: StreamInputs, hidden: list[torch.Tensor], positions: Iterable[int],
         device: torch.device, host: torch.device, step: Step | None = None,
         watch: Callable[[int], dict] = lambda pos: {}) -> None:
    """Layers `positions` over every micro-batch of `hidden` (host, replaced by the outputs)."""
    for pos in positions:
        layer = adapter.layers[pos]
        with placement.on_device([layer], device), torch.no_grad():
            for j in range(len(hidden)):
                h_in = hidden[j].to(device)
                with capture(watch(pos)) as got:
                    h_out = layer_out(layer, h_in, inputs.kw(pos, j, device))
                if step is not None:
                    step(pos, j, h_in, h_out, got)
                hidden[j] = h_out.to(host)


def _head_nll(model: nn.Module, adapter: ModelAdapter, h: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """`stats.lm_loss` from the last layer's output `h`: the model's own head on norm(h)."""
    return float(head_loss_sum(model, adapter, h, ids)), ids[:, 1:].numel()


def _add_head_nll(model: nn.Module, adapter: ModelAdapter, inputs: StreamInputs,
                  hidden: list[torch.Tensor], device: torch.device, stats: StreamStats) -> None:
    with placement.on_device(head_modules(adapter), device), torch.no_grad():
        for j in range(len(hidden)):
            nll, n = _head_nll(model, adapter, hidden[j].to(device), inputs.ids(j).to(device))
            stats.nll += nll
            stats.tokens += n


@torch.no_grad()
def streamed_lm_loss(model: nn.Module, calib: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """(Σ next-token NLL, tokens) of this rank's share of `calib`, as `stats.lm_loss` per micro-batch."""
    adapter, device = get_adapter(model), _device(model)
    host = host_device(model)
    stats = StreamStats()
    inputs = StreamInputs(model, adapter, calib, batch_size, device)
    hidden = list(inputs.hidden)
    _run(adapter, inputs, hidden, range(adapter.num_layers), device, host)
    _add_head_nll(model, adapter, inputs, hidden, device, stats)
    return stats.nll, stats.tokens


@torch.no_grad()
def streamed_layer_abs(ctx: PruneContext, position: int, calib: torch.Tensor,
                       abs_in: Moments, abs_out: Moments, statistic: str = "ratio") -> None:
    """Accumulate the magnitude terms (`MAGNITUDE_TERMS[statistic]`) of the layer at current
    `position` over this rank's share of `calib`."""
    model, adapter, device = ctx.model, ctx.adapter, _device(ctx.model)
    inputs = StreamInputs(model, adapter, calib, ctx.batch_size, device)

    def step(pos, j, h_in, h_out, got):
        if pos == position:
            a, b = magnitude_terms(statistic, h_in, h_out)
            accumulate_moments(abs_in, a)
            accumulate_moments(abs_out, b)
    _run(adapter, inputs, list(inputs.hidden), range(position + 1), device, host_device(model), step)


class _Pairs:
    """Joins, per (site, micro-batch), the pruned (M, Y) with the dense target T and accumulates."""

    def __init__(self, sites: list[Site], stats: StreamStats, d: int, device: torch.device, host: torch.device):
        self.sites, self.stats, self.d, self.device, self.host = sites, stats, d, device, host
        self.waiting_my: dict[tuple[Site, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.waiting_t: dict[tuple[Site, int], torch.Tensor] = {}

    def _add(self, s: Site, m: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        # the in-memory formulas: r = T.float() − Y, then (MᵀM, Mᵀr) and Σr²
        r = t.float() - y
        if s not in self.stats.sites:
            self.stats.sites[s] = SiteMoments(Moments(self.d, d_y=self.d, device=m.device),
                                              Moments(self.d, want_xtx=False, device=m.device))
        accumulate_moments(self.stats.sites[s].mr, m, r)
        accumulate_moments(self.stats.sites[s].r, r)

    def target(self, o: int, j: int, t: torch.Tensor) -> None:
        t_host = None
        for s in self.sites:
            if s.target != o:
                continue
            if (s, j) in self.waiting_my:
                m, y = self.waiting_my.pop((s, j))
                self._add(s, m.to(self.device), y.to(self.device), t)
            else:
                t_host = t.to(self.host) if t_host is None else t_host
                self.waiting_t[(s, j)] = t_host

    def site(self, o: int, j: int, m: torch.Tensor, y: torch.Tensor) -> None:
        for s in self.sites:
            if s.layer != o:
                continue
            if (s, j) in self.waiting_t:
                self._add(s, m, y, self.waiting_t.pop((s, j)).to(self.device))
            else:
                self.waiting_my[(s, j)] = (m.to(self.host), y.to(self.host))


@torch.no_grad()
def streamed_statistics(ctx: PruneContext, snap: DenseSnapshot, calib: torch.Tensor, mean_layers: list[int],
                        dense_mean_layers: list[int], sites: list[Site], with_lm_loss: bool) -> StreamStats:
    """`stats.stream_statistics` with layer streaming (see the module docstring); same sums, over ranks."""
    model, device = ctx.model, _device(ctx.model)
    host = host_device(model)
    d = model.config.hidden_size
    stats = StreamStats()
    # the same plan as the in-memory pass: which dense layers the pruned pass can provide
    site_layers, dense_wanted, k, from_pruned, dense_run = stream_plan(ctx, snap, dense_mean_layers, sites)
    pruned_wanted = set(mean_layers) | set(site_layers) | from_pruned
    pairs = _Pairs(sites, stats, d, device, host)

    def dense_out(o, j, h):
        if o in dense_mean_layers:
            accumulate_moments(moments_in(stats.dense_means, o, d, h.device, want_xtx=False), h)
        pairs.target(o, j, h)

    adapter = ctx.adapter
    ids = adapter.original_ids
    mlp = {pos: {o: mlp_output_module(adapter, pos)} for pos, o in enumerate(ids) if o in site_layers}

    def pruned_step(pos, j, h_in, h_out, got):
        o = ids[pos]
        if o in mean_layers:
            accumulate_moments(moments_in(stats.pruned_means, o, d, h_out.device, want_xtx=False), h_out)
        if o in from_pruned:
            dense_out(o, j, h_out)
        if o in site_layers:
            m = got[o]  # the model's dtype, as in the in-memory pass (stats.stream_statistics)
            pairs.site(o, j, m, h_out.float() - m.float())

    inputs = StreamInputs(model, adapter, calib, ctx.batch_size, device)
    hidden = list(inputs.hidden)
    last = max((ids.index(o) for o in pruned_wanted), default=-1)
    split = k if dense_run else 0  # the dense path starts from the pruned state after the shared prefix
    stop = adapter.num_layers if with_lm_loss else max(last + 1, split)
    watch = lambda pos: mlp.get(pos, {})  # noqa: E731
    _run(adapter, inputs, hidden, range(split), device, host, pruned_step, watch)
    if dense_run and inputs.starts:
        with dense_view(ctx, snap):
            dense = ctx.adapter
            d_inputs = StreamInputs(model, dense, calib, ctx.batch_size, device)
            d_hidden = list(hidden) if k > 0 else d_inputs.hidden
            d_ids = snap.layer_ids
            d_stop = max(snap.dense_position(o) for o in dense_run) + 1

            def dense_step(pos, j, h_in, h_out, got):
                if d_ids[pos] in dense_run:
                    dense_out(d_ids[pos], j, h_out)
            _run(dense, d_inputs, d_hidden, range(k, d_stop), device, host, dense_step)
            del d_hidden, d_inputs
    _run(adapter, inputs, hidden, range(split, stop), device, host, pruned_step, watch)
    if with_lm_loss:
        _add_head_nll(model, adapter, inputs, hidden, device, stats)
    if pairs.waiting_my or pairs.waiting_t:  # a target that never ran: a planning bug, not user input
        raise RuntimeError(f"streamed statistics left sites unjoined: {sorted({s for s, _ in pairs.waiting_my})}")
    all_reduce_stats_(stats, model, d, mean_layers, dense_mean_layers, sites)
    return stats
