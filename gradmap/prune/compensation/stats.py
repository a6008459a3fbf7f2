"""Calibration statistics shared by every compensator, one pass over the calibration rows.

Two paths see the same calibration tokens, one micro-batch at a time: the PRUNED path (the
model as it is now) and the DENSE path (`dense.dense_view`). Only running sums leave a
micro-batch (fp32, via `gradmap.ops.accumulate_moments`). Under layer streaming
(`offload="layer"`) the same sums are computed layer-major by `streamed`; the choice is made
here, once, so compensators call `stream_statistics`, `lm_loss_sum` and `layer_abs_moments`
and never test the execution strategy themselves.

Distributed (`gradmap.core.distributed`): `stream_statistics` takes the GLOBAL rows of the slice it
is asked for (train or held-out), runs this rank's share and sums every Moments and the LM
loss over ranks before returning, so compensators decide and fold identically on all ranks.
"""
from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext

import torch
from torch import nn

from gradmap.core import distributed
from gradmap.core.adapter import get_adapter
from gradmap.ops import Moments, accumulate_moments
from gradmap.prune.compensation import streamed
from gradmap.prune.compensation.base import PruneContext
from gradmap.prune.compensation.dense import DenseSnapshot, dense_view, start_from
from gradmap.prune.compensation.sites import (Site, SiteMoments, StreamStats, all_reduce_stats_, mlp_output_module,
                                              moments_in, stream_plan)
from gradmap.runtime.batching import magnitude_terms, micro_batches
from gradmap.runtime.hooks import StopForward, capture
from gradmap.runtime.loss import next_token_loss_sum
from gradmap.runtime.placement import model_device, offload_of

__all__ = ["run_decoder", "lm_loss", "lm_loss_sum", "layer_abs_moments", "stream_statistics"]


def run_decoder(model: nn.Module, ids: torch.Tensor) -> None:
    """Run the decoder stack (no LM head) on `ids`; a `StopForward` from a hook ends it early."""
    try:
        get_adapter(model).decoder(input_ids=ids.to(model_device(model)), use_cache=False)
    except StopForward:
        pass



@torch.no_grad()  # returns a float: building an autograd graph would only cost memory
def lm_loss(model: nn.Module, ids: torch.Tensor) -> tuple[float, int]:
    """(Σ next-token NLL, token count) of `model` on `ids` [b, L] (the runtime's one loss)."""
    ids = ids.to(model_device(model))
    return float(next_token_loss_sum(model, ids)), ids[:, 1:].numel()


def lm_loss_sum(model: nn.Module, calib: torch.Tensor, batch_size: int, progress: bool = False
                ) -> tuple[float, int]:
    """(Σ NLL, tokens) over this rank's share of `calib`, in memory or streamed (not reduced)."""
    if offload_of(model) is not None:
        return streamed.streamed_lm_loss(model, calib, batch_size)
    nll = tokens = 0
    for _, ids in micro_batches(distributed.shard_rows(calib, allow_empty=True), batch_size, progress,
                                "held-out loss"):
        s, n = lm_loss(model, ids)
        nll += s
        tokens += n
    return nll, tokens


@torch.no_grad()
def layer_abs_moments(ctx: PruneContext, position: int, calib: torch.Tensor, abs_in: Moments,
                      abs_out: Moments, statistic: str = "ratio") -> None:
    """Accumulate the magnitude terms (`MAGNITUDE_TERMS[statistic]`, |h_in| and |h_out| for
    "ratio") of the layer at current `position` over this rank's share of `calib`."""
    if offload_of(ctx.model) is not None:
        streamed.streamed_layer_abs(ctx, position, calib, abs_in, abs_out, statistic)
        return
    layer = ctx.adapter.layers[position]
    for _, ids in micro_batches(distributed.shard_rows(calib, allow_empty=True), ctx.batch_size, ctx.progress,
                                "magnitude statistics"):
        with capture({"out": layer}, stop_at=layer, inputs={"in": layer}) as got:
            run_decoder(ctx.model, ids)
        a, b = magnitude_terms(statistic, got["in"], got["out"])
        accumulate_moments(abs_in, a)
        accumulate_moments(abs_out, b)


@torch.no_grad()  # statistics only: an autograd graph here would chain every micro-batch together
def stream_statistics(ctx: PruneContext, snap: DenseSnapshot, calib: torch.Tensor,
                      mean_layers: Iterable[int] = (), dense_mean_layers: Iterable[int] = (),
                      sites: Iterable[Site] = (), with_lm_loss: bool = False) -> StreamStats:
    """One streaming pass over `calib`: pruned and (when needed) dense forwards per micro-batch.

    Collects the mean output of kept layers `mean_layers` (pruned path) and of dense
    layers `dense_mean_layers`, and for every site the moments of the Stage 2 regression
    min_P Σ_t ‖M_t P + Y_t − T_t‖², where M is the MLP output of site.layer, Y = h_out − M
    its residual stream just before the MLP add, and T the dense output of site.target.
    With `with_lm_loss` the pruned path runs to the logits and adds Σ NLL to the result.
    Distributed: this rank streams its share of `calib`; the returned sums are over all ranks.
    """
    mean_layers, dense_mean_layers, sites = list(mean_layers), list(dense_mean_layers), list(sites)
    if offload_of(ctx.model) is not None:
        return streamed.streamed_statistics(ctx, snap, calib, mean_layers, dense_mean_layers, sites, with_lm_loss)
    d = ctx.model.config.hidden_size
    stats = StreamStats()
    site_layers, dense_wanted, k, from_pruned, dense_run = stream_plan(ctx, snap, dense_mean_layers, sites)
    handoff = snap.layer_ids[k - 1] if k > 0 and dense_run else None
    pruned_wanted = set(mean_layers) | set(site_layers) | from_pruned | ({handoff} - {None})
    for _, ids in micro_batches(distributed.shard_rows(calib, allow_empty=True), ctx.batch_size, ctx.progress,
                                "compensation statistics"):
        adapter = ctx.adapter
        pos = {o: p for p, o in enumerate(adapter.original_ids)}
        outs = {("h", o): adapter.layers[pos[o]] for o in pruned_wanted}
        mlps = {("m", o): mlp_output_module(adapter, pos[o]) for o in site_layers}
        last = max((pos[o] for o in pruned_wanted), default=None)
        stop = None if with_lm_loss or last is None else adapter.layers[last]
        if outs or with_lm_loss:
            with capture({**outs, **mlps}, stop_at=stop) as got:
                if with_lm_loss:
                    nll, n = lm_loss(ctx.model, ids)
                    stats.nll += nll
                    stats.tokens += n
                else:
                    run_decoder(ctx.model, ids)
        else:
            got = {}
        for o in mean_layers:
            h = got[("h", o)]
            accumulate_moments(moments_in(stats.pruned_means, o, d, h.device, want_xtx=False), h)
        # M stays in the model's dtype: MᵀM then runs on the bf16 Gram kernel (fp32 accumulation,
        # exact products); r = T − Y is a difference of residual states, so it is formed in fp32
        m_of = {o: got[("m", o)] for o in site_layers}
        y_of = {o: got[("h", o)].float() - m_of[o].float() for o in site_layers}
        dense = {o: got[("h", o)] for o in from_pruned}
        h_k = got[("h", handoff)] if handoff is not None else None
        del got
        if not dense_wanted:
            continue
        if dense_run:
            with dense_view(ctx, snap):
                layers = ctx.adapter.layers
                dpos = {o: snap.dense_position(o) for o in dense_run}
                with capture({o: layers[p] for o, p in dpos.items()}, stop_at=layers[max(dpos.values())]) as got, \
                        (start_from(layers, k, h_k) if h_k is not None else nullcontext()):
                    run_decoder(ctx.model, ids)
                dense.update(got)
        for o in dense_mean_layers:
            accumulate_moments(moments_in(stats.dense_means, o, d, dense[o].device, want_xtx=False), dense[o])
        for s in sites:
            m, r = m_of[s.layer], dense[s.target].float() - y_of[s.layer]
            if s not in stats.sites:
                stats.sites[s] = SiteMoments(Moments(d, d_y=d, device=m.device),
                                             Moments(d, want_xtx=False, device=m.device))
            accumulate_moments(stats.sites[s].mr, m, r)
            accumulate_moments(stats.sites[s].r, r)
        del dense, m_of, y_of, h_k
    all_reduce_stats_(stats, ctx.model, d, mean_layers, dense_mean_layers, sites)
    return stats

