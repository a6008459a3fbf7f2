"""Streaming calibration statistics shared by every compensator.

Two paths see the same calibration tokens, one micro-batch at a time:

* the PRUNED path: the model as it is now;
* the DENSE path: the same model object seen through `dense_view`, which puts the
  removed decoder layers (`ctx.removed_modules`) back at their original places and
  swaps in the original value of every weight a compensation changed
  (`ctx.original_params`) — no second copy of the model is ever held.

Only running sums leave a micro-batch (fp32, via `gradmap.ops.accumulate_moments`);
hidden states of one micro-batch are dropped before the next one starts.

Distributed (`gradmap.core.distributed`): `stream_statistics` takes the GLOBAL rows of the slice it
is asked for (train or held-out), runs this rank's share and sums every Moments and the LM
loss over ranks before returning, so compensators decide and fold identically on all ranks.
"""
from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradmap.core import distributed
from gradmap.core.adapter import LAYER_IDS_KEY, ModelAdapter, get_adapter
from gradmap.core.errors import GradmapError
from gradmap.runtime.capture import micro_batches, model_device
from gradmap.ops import Moments, accumulate_moments
from gradmap.core.surgery import per_layer_config, renumber_layer
from gradmap.prune.compensation.base import PruneContext

__all__ = [
    "StopForward", "DenseSnapshot", "dense_view", "capture", "run_decoder",
    "mlp_output_module", "Site", "SiteMoments", "StreamStats", "stream_statistics",
    "merge_means", "lm_loss", "shared_prefix", "start_from",
]

log = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised by a hook to end a forward pass once every statistic it needs is captured."""


def _first_tensor(out: Any) -> torch.Tensor:
    return out if torch.is_tensor(out) else out[0]


def mlp_output_module(adapter: ModelAdapter, position: int) -> nn.Module:
    """The module whose output is what the MLP adds to the residual stream (M of Stage 2).

    Pre-norm families: the down projection. Post-sublayer-norm families (Gemma2/3):
    the norm applied to the MLP output before the residual add.
    """
    parts = adapter.parts(position)
    return parts.mlp_post_norm if parts.mlp_post_norm is not None else parts.mlp_down


@contextmanager
def capture(modules: dict[Hashable, nn.Module], stop_at: nn.Module | None = None,
            inputs: dict[Hashable, nn.Module] | None = None) -> Iterator[dict[Hashable, torch.Tensor]]:
    """Record the output of each module in `modules` (and the first input of each in `inputs`).

    The returned dict is filled during the forward run inside the `with` block; when
    `stop_at` is given the forward ends with `StopForward` right after that module ran.
    Every hook is removed on exit, also on error.
    """
    store: dict[Hashable, torch.Tensor] = {}
    handles = []

    def out_hook(key):
        def hook(_module, _args, out):
            store[key] = _first_tensor(out)
        return hook

    def in_hook(key):
        def hook(_module, args, kwargs):
            store[key] = args[0] if args else kwargs["hidden_states"]
        return hook

    def stop_hook(_module, _args, _out):
        raise StopForward

    try:
        for key, module in (inputs or {}).items():
            handles.append(module.register_forward_pre_hook(in_hook(key), with_kwargs=True))
        for key, module in modules.items():
            handles.append(module.register_forward_hook(out_hook(key)))
        if stop_at is not None:  # registered last, so it runs after the capture hooks of that module
            handles.append(stop_at.register_forward_hook(stop_hook))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def run_decoder(model: nn.Module, ids: torch.Tensor) -> None:
    """Run the decoder stack (no LM head) on `ids`; a `StopForward` from a hook ends it early."""
    try:
        get_adapter(model).decoder(input_ids=ids.to(model_device(model)), use_cache=False)
    except StopForward:
        pass


@torch.no_grad()  # returns a float: building an autograd graph would only cost memory
def lm_loss(model: nn.Module, ids: torch.Tensor) -> tuple[float, int]:
    """(Σ next-token NLL, token count) of `model` on `ids` [b, L], fp32."""
    ids = ids.to(model_device(model))
    logits = model(input_ids=ids, use_cache=False).logits
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
    return float(nll), ids[:, 1:].numel()


def _layers_prefix(model: nn.Module, adapter: ModelAdapter) -> str:
    """Parameter-name prefix of the decoder layers, e.g. "model.layers."."""
    return next(n for n, m in model.named_modules() if m is adapter.layers) + "."


@dataclass
class DenseSnapshot:
    """What the dense model's config looked like, taken in `Compensator.begin`."""

    layer_ids: list[int]              # ORIGINAL ids of the dense layers, in order
    per_layer: dict[str, Any]         # config entries with one value per layer (e.g. layer_types)
    num_hidden_layers: int
    has_sliding: bool | None          # decoder.has_sliding_layers, where the family has it

    @classmethod
    def take(cls, ctx: PruneContext) -> "DenseSnapshot":
        adapter = ctx.adapter
        ids = list(ctx.dense_layer_ids) or adapter.original_ids
        if ids != adapter.original_ids:
            raise GradmapError(
                f"compensators must begin on the dense model (layers {ids}) but it holds layers "
                f"{adapter.original_ids}; call begin() before removing any layer")
        config = ctx.model.config
        per_layer = {k: list(v) if isinstance(v, list) else v
                     for k, v in per_layer_config(config, len(ids)).items()}
        return cls(ids, per_layer, config.num_hidden_layers, getattr(adapter.decoder, "has_sliding_layers", None))

    def dense_position(self, original_id: int) -> int:
        return self.layer_ids.index(original_id)

    def param_names(self, ctx: PruneContext) -> dict[int, str]:
        """id(parameter) -> its name in the DENSE model's named_parameters()."""
        adapter = ctx.adapter
        prefix = _layers_prefix(ctx.model, adapter)
        current = adapter.original_ids
        names = {}
        for name, p in ctx.model.named_parameters():
            if name.startswith(prefix):
                pos, rest = name[len(prefix):].split(".", 1)
                name = f"{prefix}{self.dense_position(current[int(pos)])}.{rest}"
            names[id(p)] = name
        return names

    def remember(self, ctx: PruneContext, params: Iterable[torch.Tensor]) -> None:
        """`ctx.remember_original` for each of `params`, under its dense-model name."""
        names = self.param_names(ctx)
        for p in params:
            ctx.remember_original(names[id(p)], p)


@contextmanager
def dense_view(ctx: PruneContext, snap: DenseSnapshot) -> Iterator[nn.Module]:
    """Temporarily turn `ctx.model` back into the dense model; everything is restored on exit.

    Re-inserts the removed layers at their original places, restores the per-layer config
    entries, layer numbering and the original value of every weight in ctx.original_params.
    """
    model, adapter, config = ctx.model, ctx.adapter, ctx.model.config
    current_ids = adapter.original_ids
    current_layers = adapter.decoder.layers
    by_id = dict(zip(current_ids, current_layers))
    missing = [i for i in snap.layer_ids if i not in by_id and i not in ctx.removed_modules]
    if missing:
        raise GradmapError(f"the dense path needs removed layers {missing}, which are not in "
                           "ctx.removed_modules; keep every removed module until finalize() has run")
    dense_layers = nn.ModuleList([by_id[i] if i in by_id else ctx.removed_modules[i]
                                  for i in snap.layer_ids])
    saved_cfg = {k: getattr(config, k) for k in snap.per_layer}
    saved_n, saved_has_ids = config.num_hidden_layers, hasattr(config, LAYER_IDS_KEY)
    saved_ids = getattr(config, LAYER_IDS_KEY, None)
    saved_sliding = getattr(adapter.decoder, "has_sliding_layers", None)
    swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        adapter.decoder.layers = dense_layers
        for k, v in snap.per_layer.items():
            setattr(config, k, v)
        config.num_hidden_layers = snap.num_hidden_layers
        setattr(config, LAYER_IDS_KEY, list(snap.layer_ids))
        if snap.has_sliding is not None:
            adapter.decoder.has_sliding_layers = snap.has_sliding
        for pos, layer in enumerate(dense_layers):
            renumber_layer(layer, pos)
        for name, p in model.named_parameters():
            if name in ctx.original_params:
                swapped.append((p, p.data))
                p.data = ctx.original_params[name].to(p.device)
        yield model
    finally:
        for p, data in swapped:
            p.data = data
        adapter.decoder.layers = current_layers
        for k, v in saved_cfg.items():
            setattr(config, k, v)
        config.num_hidden_layers = saved_n
        if saved_has_ids:
            setattr(config, LAYER_IDS_KEY, saved_ids)
        elif hasattr(config, LAYER_IDS_KEY):
            delattr(config, LAYER_IDS_KEY)
        if saved_sliding is not None:
            adapter.decoder.has_sliding_layers = saved_sliding
        for pos, layer in enumerate(current_layers):
            renumber_layer(layer, pos)


class _Passthrough(nn.Module):
    """Stands in for a decoder layer whose output is already known (the shared prefix)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def shared_prefix(ctx: PruneContext, snap: DenseSnapshot) -> int:
    """How many leading dense layers the pruned model runs unchanged (same module, no edited weight).

    Up to there both paths carry the same hidden state, so the dense path can start from the
    pruned path's state instead of recomputing it. An edit outside the decoder layers that
    changes hidden states (e.g. a rescaled embedding) makes the prefix empty.
    """
    adapter = ctx.adapter
    prefix = _layers_prefix(ctx.model, adapter)
    head_only = {id(p) for m in (adapter.final_norm, adapter.lm_head) for p in m.parameters()}
    head_names = {n for n, p in ctx.model.named_parameters() if id(p) in head_only}
    edited = set()
    for name in ctx.original_params:
        if name.startswith(prefix):
            edited.add(int(name[len(prefix):].split(".", 1)[0]))
        elif name not in head_names:
            return 0
    current, k = adapter.original_ids, 0
    while (k < min(len(current), len(snap.layer_ids) - 1) and current[k] == snap.layer_ids[k]
           and k not in edited):
        k += 1
    return k


@contextmanager
def start_from(layers: nn.ModuleList, k: int, hidden: torch.Tensor) -> Iterator[None]:
    """Run `layers` from position k with input `hidden`: layers 0..k-1 become pass-throughs."""
    saved = [layers[i] for i in range(k)]

    def inject(_module, args, kwargs):
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = layers[k].register_forward_pre_hook(inject, with_kwargs=True)
    try:
        for i in range(k):
            layers[i] = _Passthrough()
        yield
    finally:
        handle.remove()
        for i, layer in enumerate(saved):
            layers[i] = layer


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


def _moments(store: dict, key: Hashable, d: int, device, **kw) -> Moments:
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
    if ctx.model.__dict__.get("_gradmap_layer_offload") is not None:  # offload="layer"
        from gradmap.prune.compensation.streamed import streamed_statistics
        return streamed_statistics(ctx, snap, calib, mean_layers, dense_mean_layers, sites, with_lm_loss)
    d = ctx.model.config.hidden_size
    stats = StreamStats()
    site_layers, dense_wanted, k, from_pruned, dense_run = stream_plan(ctx, snap, dense_mean_layers, sites)
    handoff = snap.layer_ids[k - 1] if k > 0 and dense_run else None
    pruned_wanted = set(mean_layers) | set(site_layers) | from_pruned | ({handoff} - {None})
    for _, ids in micro_batches(distributed.shard_rows(calib, allow_empty=True), ctx.batch_size):
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
            accumulate_moments(_moments(stats.pruned_means, o, d, h.device, want_xtx=False), h)
        m_of = {o: got[("m", o)].float() for o in site_layers}
        y_of = {o: got[("h", o)].float() - m_of[o] for o in site_layers}
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
            accumulate_moments(_moments(stats.dense_means, o, d, dense[o].device, want_xtx=False), dense[o])
        for s in sites:
            m, r = m_of[s.layer], dense[s.target].float() - y_of[s.layer]
            if s not in stats.sites:
                stats.sites[s] = SiteMoments(Moments(d, d_y=d, device=m.device),
                                             Moments(d, want_xtx=False, device=m.device))
            accumulate_moments(stats.sites[s].mr, m, r)
            accumulate_moments(stats.sites[s].r, r)
        del dense, m_of, y_of, h_k
    _all_reduce_stats_(stats, ctx.model, d, mean_layers, dense_mean_layers, sites)
    return stats


def _all_reduce_stats_(stats: StreamStats, model: nn.Module, d: int, mean_layers: list[int],
                       dense_mean_layers: list[int], sites: list[Site]) -> None:
    """Sum every running statistic of `stats` over ranks, in one collective (no-op single-process).

    A rank whose share of the rows was empty holds no Moments yet: zeros are created first so
    that every rank sends the same tensors in the same order.
    """
    if not distributed.is_distributed():
        return
    device = model_device(model)
    moments = [_moments(stats.pruned_means, o, d, device, want_xtx=False) for o in mean_layers]
    moments += [_moments(stats.dense_means, o, d, device, want_xtx=False) for o in dense_mean_layers]
    for s in sites:
        if s not in stats.sites:
            stats.sites[s] = SiteMoments(Moments(d, d_y=d, device=device),
                                         Moments(d, want_xtx=False, device=device))
        moments += [stats.sites[s].mr, stats.sites[s].r]
    stats.nll, tokens = distributed.all_reduce_moments_(moments, [stats.nll, stats.tokens])
    stats.tokens = int(round(tokens))
