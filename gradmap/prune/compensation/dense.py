"""The dense model seen through the pruned one: `dense_view` puts the removed layers (kept in
`ctx.removed_modules`) back at their original places and swaps in the original value of every
weight a compensation changed (`ctx.original_params`), so no second copy of the model is held.
`shared_prefix` / `start_from` let the dense path start where it stops sharing layers with the
pruned path instead of recomputing the common prefix."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradmap.core.adapter import LAYER_IDS_KEY, ModelAdapter
from gradmap.core.errors import GradmapError
from gradmap.core.surgery import per_layer_config, renumber_layer
from gradmap.prune.compensation.base import PruneContext

__all__ = ["DenseSnapshot", "dense_view", "restore_dense_", "shared_prefix", "start_from"]


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


def _to_dense(ctx: PruneContext, snap: DenseSnapshot):
    """Turn `ctx.model` back into the dense model; returns the function that undoes it."""
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

    def undo() -> None:
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
    except BaseException:
        undo()
        raise
    return undo


@contextmanager
def dense_view(ctx: PruneContext, snap: DenseSnapshot) -> Iterator[nn.Module]:
    """Temporarily turn `ctx.model` back into the dense model; everything is restored on exit.

    Re-inserts the removed layers at their original places, restores the per-layer config
    entries, layer numbering and the original value of every weight in ctx.original_params.
    """
    undo = _to_dense(ctx, snap)
    try:
        yield ctx.model
    finally:
        undo()


def restore_dense_(ctx: PruneContext, snap: DenseSnapshot) -> None:
    """Turn `ctx.model` back into the dense model for good (what `dense_view` does, not undone).

    `ctx` is spent afterwards: its removed modules are back in the model and every compensated
    weight holds its original value again.
    """
    _to_dense(ctx, snap)
    config = ctx.model.config
    if snap.layer_ids == list(range(snap.num_hidden_layers)) and hasattr(config, LAYER_IDS_KEY):
        delattr(config, LAYER_IDS_KEY)  # a never-pruned model carries no layer ids
    ctx.removed_modules.clear()
    ctx.original_params.clear()


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

