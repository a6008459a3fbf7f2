"""What healing trains, for the modes that need no extra package: compensation maps at the removal
sites, the norm weights, the last k kept layers. Each mode is a `Trainable`: the tensors the
optimiser updates, the existing weights that training or the final fold change (backed up by
`gradmap.healing.distill` and restored on error), the hooks active while training, and the step that
leaves a plain model (fold the maps into existing weights)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import ContextManager

import torch
from torch import nn

from gradmap.core.adapter import ModelAdapter
from gradmap.core.errors import GradmapError
from gradmap.prune.compensation.fold import diagonal_only, fold_projection_
from gradmap.prune.compensation.sites import mlp_output_module
from gradmap.runtime.hooks import mapped_output

__all__ = ["Trainable", "removal_sites", "norm_weights", "compensation_trainable", "partial_trainable"]


def _nothing() -> None:
    pass


@dataclass
class Trainable:
    """One healing mode's moving parts (see the module docstring)."""

    what: str
    params: list[torch.Tensor]
    edited: list[torch.Tensor]
    active: Callable[[], ContextManager] = nullcontext
    finalize: Callable[[], None] = _nothing
    discard: Callable[[], None] = _nothing
    sites: list[int] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)


def removal_sites(adapter: ModelAdapter) -> list[int]:
    """Current positions of the kept layers directly before each removed block (ReplaceMe's
    placement): position p where the ORIGINAL index jumps by more than one after p."""
    ids = adapter.original_ids
    return [p for p in range(len(ids) - 1) if ids[p + 1] - ids[p] > 1]


def norm_weights(adapter: ModelAdapter) -> list[torch.Tensor]:
    """The weight of every RMSNorm the adapter knows: each kept layer's pre/post-sublayer norms and
    the final norm."""
    out = []
    for pos in range(adapter.num_layers):
        parts = adapter.parts(pos)
        for norm in (parts.attn_pre_norm, parts.mlp_pre_norm, parts.attn_post_norm, parts.mlp_post_norm):
            if norm is not None:
                out.append(norm.weight)
    out.append(adapter.final_norm.weight)
    return out


def _fold_targets(adapter: ModelAdapter, pos: int) -> list[torch.Tensor]:
    module = adapter.parts(pos).mlp_post_norm if diagonal_only(adapter) else adapter.parts(pos).mlp_down
    return [t for t in (module.weight, getattr(module, "bias", None)) if t is not None]


def compensation_trainable(adapter: ModelAdapter, with_norms: bool) -> Trainable:
    """A map P per removal site on what the site's MLP adds to the residual stream (M ↦ M P),
    initialised at the identity and folded into the site's down projection at the end
    (`fold_projection_`, as Stage 2 folds its closed-form P). Post-sublayer-norm families
    (Gemma2/3) train a diagonal P (a vector), the only form that folds exactly."""
    sites = removal_sites(adapter)
    if not sites:
        raise GradmapError("train='compensation' needs a removal site (a kept layer directly before a removed "
                           "one); this model has none (config.gradmap_layer_ids shows no gap). Prune it first, "
                           "or use train='lora' or 'partial'")
    d = adapter.config.hidden_size
    ref = adapter.parts(sites[0]).mlp_down.weight
    diag = diagonal_only(adapter)
    maps = [nn.Parameter(torch.ones(d, device=ref.device, dtype=torch.float32) if diag
                         else torch.eye(d, device=ref.device, dtype=torch.float32)) for _ in sites]

    def apply(p: nn.Parameter) -> Callable[[torch.Tensor], torch.Tensor]:
        return (lambda y: y * p.to(y.dtype)) if diag else (lambda y: y @ p.to(y.dtype))

    @contextmanager
    def active() -> Iterator[None]:
        with mapped_output([mlp_output_module(adapter, pos) for pos in sites], [apply(p) for p in maps]):
            yield

    def finalize() -> None:
        for pos, p in zip(sites, maps):
            fold_projection_(adapter, pos, p.detach())

    norms = norm_weights(adapter) if with_norms else []
    edited = [t for pos in sites for t in _fold_targets(adapter, pos)]
    edited += [n for n in norms if not any(n is e for e in edited)]
    shape = "diagonal" if diag else f"{d}×{d}"
    what = f"{len(sites)} {shape} compensation map(s) at layer position(s) {sites}"
    if with_norms:
        what += f" and {len(norms)} norm weights"
    return Trainable(what=what, params=[*maps, *norms], edited=edited, active=active, finalize=finalize,
                     sites=sites)


def partial_trainable(adapter: ModelAdapter, k: int) -> Trainable:
    """Every weight of the last `k` kept layers, and every norm weight."""
    if k > adapter.num_layers:
        raise GradmapError(f"partial_layers={k} but the model has only {adapter.num_layers} layers; choose "
                           f"at most {adapter.num_layers}")
    params: list[torch.Tensor] = []
    for layer in list(adapter.layers)[-k:]:
        params += list(layer.parameters())
    params += [n for n in norm_weights(adapter) if not any(n is p for p in params)]
    first = adapter.num_layers - k
    return Trainable(what=f"layer positions {first}..{adapter.num_layers - 1} and every norm weight",
                     params=params, edited=list(params))
