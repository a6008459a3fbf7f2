"""Pruning that keeps a periodic sliding/full attention pattern (Gemma 2/3) where readers expect it.

Gemma 2 alternates sliding-window and full attention (full every 2nd layer), Gemma 3 has one full
layer in every 6. transformers' GGUF reader rebuilds each layer's type from its position, so a
pruned model can leave as a GGUF file that both transformers and llama.cpp load as the same model
only if every kept layer still sits where its type says: a full layer at the positions with
(i + 1) % P == 0. That holds exactly when the number of layers removed before every kept layer is
a multiple of P, i.e. when the removal is made of runs of P adjacent layers (each run holds one
full layer and P − 1 sliding ones, wherever it starts).

`fast_prune(..., keep_attention_pattern=True)` therefore removes windows of P adjacent (current)
layers: each decision takes the window of removable layers with the lowest summed score (the
one-shot schedule picks the windows greedily from its one scoring; the iterative schedule
re-scores after each window). Summing per-layer scores is a choice, not a paper's rule: it is the
window's share of the metric, and the angular-distance metric, which already removes one
contiguous block, keeps its own block choice. Models without an alternation have P = 1: nothing
changes.
"""
from __future__ import annotations

from collections.abc import Sequence

from gradmap.core.errors import GradmapError

__all__ = ["attention_period", "check_pattern_plan", "window_plan"]

SLIDING, FULL = "sliding_attention", "full_attention"


def _declared_period(config) -> int | None:
    """The period the GGUF readers derive the pattern from, where the family has one."""
    if config.model_type == "gemma2":
        return 2
    return getattr(config, "sliding_window_pattern", None) or getattr(config, "_sliding_window_pattern", None)


def attention_period(config) -> int:
    """P: the model's layers are full attention exactly at positions i with (i + 1) % P == 0.

    1 for a model without a sliding/full alternation (every layer of one kind). Refuses a pattern
    that is not of that form (e.g. already pruned out of it), since no removal can restore it.
    """
    types = list(getattr(config, "layer_types", None) or [])
    if len(set(types)) <= 1:
        return 1
    odd = sorted(set(types) - {SLIDING, FULL})
    if odd:
        raise GradmapError(f"keep_attention_pattern knows sliding and full attention layers; this "
                           f"{config.model_type} model also has {odd[0]!r} layers; prune it without "
                           "keep_attention_pattern")
    period = types.index(FULL) + 1
    declared = _declared_period(config)
    if any((t == FULL) != ((i + 1) % period == 0) for i, t in enumerate(types)) or (
            declared and declared != period):
        raise GradmapError(f"this {config.model_type} model's sliding/full attention pattern is not one full layer "
                           f"every {declared or period} (layer_types has full attention at "
                           f"{[i for i, t in enumerate(types) if t == FULL]}), e.g. it was already pruned "
                           "out of it; keep_attention_pattern cannot restore it: prune without it and keep "
                           "the safetensors checkpoint")
    return period


def check_pattern_plan(config, n_prune: int, removable: Sequence[int], original_ids: Sequence[int]) -> int:
    """The period P to keep; refuse an n_prune that is not whole windows, or no window to remove."""
    period = attention_period(config)
    if period == 1:
        return 1
    if n_prune % period:
        lower, upper = n_prune - n_prune % period, n_prune - n_prune % period + period
        choice = f"{lower} or {upper}" if lower else f"{upper}"
        raise GradmapError(f"keep_attention_pattern: this {config.model_type} model has one full-attention layer in "
                           f"every {period}, and the pattern survives only removals of whole runs of {period} "
                           f"adjacent layers, so n_prune must be a multiple of {period} (got {n_prune}); use "
                           f"n_prune={choice}, or prune without keep_attention_pattern (no GGUF export then)")
    window_plan({i: 0.0 for i in original_ids}, original_ids, removable, n_prune, period)  # enough windows?
    return period


def window_plan(scores: dict[int, float], original_ids: Sequence[int], removable: Sequence[int], n: int,
                period: int) -> list[int]:
    """ORIGINAL indices of n / period windows of `period` adjacent layers, all removable, chosen one
    after another by lowest summed score (ties: the earlier window), in removal order."""
    ids, allowed, out = list(original_ids), set(removable), []
    for _ in range(n // period):
        starts = [s for s in range(len(ids) - period + 1) if all(ids[s + k] in allowed for k in range(period))]
        if not starts:
            raise GradmapError(f"keep_attention_pattern removes runs of {period} adjacent layers, but after "
                               f"{len(out) // period} run(s) no run of {period} removable layers is left "
                               f"(protected layers split them); lower n_prune or protect fewer layers")
        best = min(starts, key=lambda s: (sum(scores[ids[s + k]] for k in range(period)), s))
        out += ids[best:best + period]
        ids = ids[:best] + ids[best + period:]
    return out
