"""Folding compensation into existing weights, family-aware (no new modules, no runtime cost).

Two folds exist:

* `fold_projection_`: a d×d matrix P applied to what layer p's MLP adds to the residual
  stream, row-vector convention M ↦ M P. Pre-norm families: W_down ← Pᵀ W_down and
  b_down ← Pᵀ b_down (exact). Post-sublayer-norm families (Gemma2/3): M is the output of
  the post-feed-forward norm, so only a diagonal P folds exactly, into that norm's scale.
* `fold_residual_scale_`: a scalar s on every write into the residual stream before a cut
  (Prune&Comp, Chen et al. 2025): token embeddings and the attention/MLP outputs of the
  first `n_layers` layers (or their post-sublayer norms). With tied embeddings the LM head
  is scaled too; the final RMSNorm's scale is divided by s to cancel it exactly.

`before_edit(params)` is called with every parameter just before it changes, so callers
can keep originals (ctx.remember_original) or a backup to revert.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from gradmap.core.adapter import ModelAdapter
from gradmap.core.errors import GradmapError

__all__ = ["fold_projection_", "fold_residual_scale_", "diagonal_only"]

BeforeEdit = Callable[[Sequence[torch.Tensor]], None]


def _noop(_params: Sequence[torch.Tensor]) -> None:
    pass


def diagonal_only(adapter: ModelAdapter) -> bool:
    """True when the MLP output passes a post-sublayer norm (P must be diagonal to fold exactly)."""
    return adapter.spec.mlp_post_norm is not None


@torch.no_grad()
def _scale_(params: Sequence[torch.Tensor | None], factor: float) -> None:
    # in place: one rounding of the exact product, as an fp64 round trip would give, without the copies
    for p in params:
        if p is not None:
            p.mul_(factor)


@torch.no_grad()
def fold_projection_(adapter: ModelAdapter, position: int, p: torch.Tensor,
                     before_edit: BeforeEdit = _noop) -> None:
    """Fold M ↦ M P into the layer at current `position` (in place).

    `p` is d×d, or a length-d vector / diagonal matrix for post-sublayer-norm families,
    where the norm's effective scale (offset + w) is multiplied by diag(P).
    """
    parts = adapter.parts(position)
    d = adapter.config.hidden_size
    if diagonal_only(adapter):
        if p.dim() == 2:
            off = p - torch.diag_embed(p.diagonal())
            if p.shape != (d, d) or off.abs().max() > 0:
                raise GradmapError(
                    f"{adapter.model_type} adds the MLP output through a post-feed-forward norm, so "
                    "only a diagonal P folds exactly; restrict the solve to the diagonal")
            p = p.diagonal()
        if p.shape != (d,):
            raise GradmapError(f"diagonal projection must have length {d}, got shape {tuple(p.shape)}")
        norm = parts.mlp_post_norm
        before_edit([norm.weight])
        adapter.scale_norm_(norm, p.to(norm.weight.device))
        return
    if p.shape != (d, d):
        raise GradmapError(f"projection must be {d}×{d} for this model, got shape {tuple(p.shape)}")
    down = parts.mlp_down
    before_edit([t for t in (down.weight, down.bias) if t is not None])
    pt = p.to(device=down.weight.device, dtype=torch.float64).T
    down.weight.copy_((pt @ down.weight.double()).to(down.weight.dtype))
    if down.bias is not None:
        down.bias.copy_((pt @ down.bias.double()).to(down.bias.dtype))


@torch.no_grad()
def fold_residual_scale_(adapter: ModelAdapter, n_layers: int, s: float,
                         before_edit: BeforeEdit = _noop) -> None:
    """Scale every write into the residual stream before current position `n_layers` by `s`.

    Afterwards every hidden state h_0 … h_{n_layers} is exactly s times its old value up
    to the RMSNorm eps (each layer sees its input through a scale-invariant norm), and
    logits read from those states are unchanged.
    """
    if not (s > 0 and s < float("inf")):
        raise GradmapError(f"residual scale must be a positive finite number, got {s}; the calibration "
                           "statistics are degenerate (all-zero or overflowing hidden states)")
    embed = adapter.embed_tokens
    edits: list[torch.Tensor] = [embed.weight]
    norms: list[nn.Module] = []
    linears: list[nn.Linear] = []
    for pos in range(n_layers):
        parts = adapter.parts(pos)
        for post, out in ((parts.attn_post_norm, parts.attn_out), (parts.mlp_post_norm, parts.mlp_down)):
            if post is not None:
                norms.append(post)
            else:
                linears.append(out)
    edits += [n.weight for n in norms]
    edits += [t for lin in linears for t in (lin.weight, lin.bias) if t is not None]
    if adapter.tied:
        edits.append(adapter.final_norm.weight)
    before_edit(edits)
    _scale_([embed.weight], s)
    for norm in norms:
        adapter.scale_norm_(norm, s)
    for lin in linears:
        _scale_([lin.weight, lin.bias], s)
    if adapter.tied:  # the LM head shares the embedding: cancel its factor s in the final norm
        adapter.scale_norm_(adapter.final_norm, 1.0 / s)
