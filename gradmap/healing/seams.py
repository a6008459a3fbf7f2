"""The optional hidden-state loss at the seams (`HealOptions.seam_mse`).

A seam is where the pruned model jumps over removed layers: the residual stream entering the
kept layer with ORIGINAL index j, whose predecessor in the pruned model is not j − 1. The dense
model's residual stream entering its layer j is what the pruned model should carry there, so the
loss compares the two at the input of the same original layer:

    seam loss = mean over seams of  Σ_positions ‖h_pruned − h_dense‖² / Σ_positions ‖h_dense‖²

(relative, so one weight suits every model's hidden scale). A removal at the very end has no kept
layer after it and so no seam; the output KL covers it. The dense states are cached once with the
top-K targets (`teacher_targets(..., hidden_at=seam_layers(...))`, bf16 on the host: rows × length
× hidden × 2 bytes per seam), so they can only be computed once the removed layers are known.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from gradmap.core.adapter import ModelAdapter
from gradmap.core.errors import GradmapError
from gradmap.runtime.hooks import capture

__all__ = ["seams_of", "seam_layers", "check_seams", "seam_inputs", "seam_loss_sum"]


def seams_of(kept: list[int]) -> list[int]:
    """ORIGINAL indices of the kept layers (`kept`, in order) that directly follow removed ones."""
    return [b for a, b in zip(kept, kept[1:]) if b - a > 1]


def seam_layers(adapter: ModelAdapter) -> list[int]:
    """`seams_of` a (pruned) model's layers."""
    return seams_of(adapter.original_ids)


@contextmanager
def seam_inputs(adapter: ModelAdapter, originals: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """The residual stream entering each layer of ORIGINAL index in `originals`, filled during a forward
    run inside the block (gradients flow through it)."""
    ids = adapter.original_ids
    missing = [j for j in originals if j not in ids]
    if missing:
        raise GradmapError(f"the teacher has no layer of original index {missing[0]} (its layers: {ids}); the "
                           "teacher must be the dense model the student was pruned from")
    with capture({}, inputs={j: adapter.layers[ids.index(j)] for j in originals}) as store:
        yield store


def seam_loss_sum(student: dict[int, torch.Tensor], dense: dict[int, torch.Tensor]) -> torch.Tensor:
    """Σ over rows of the relative seam loss (module docstring); tensors (rows, length, hidden)."""
    per_seam = []
    for j, target in dense.items():
        h = student[j]
        t = target.to(device=h.device, dtype=torch.float32)
        err = (h.float() - t).pow(2).sum(dim=(1, 2))
        per_seam.append(err / t.pow(2).sum(dim=(1, 2)).clamp_min(torch.finfo(torch.float32).tiny))
    return torch.stack(per_seam).mean(0).sum()


def check_seams(adapter: ModelAdapter) -> list[int]:
    """The seams of a pruned model, refusing one that has none."""
    seams = seam_layers(adapter)
    if not seams:
        raise GradmapError("heal option seam_mse needs a seam (a kept layer directly after removed ones); this "
                           "model has none (config.gradmap_layer_ids shows no gap before a kept layer). Set "
                           "seam_mse=0")
    return seams

