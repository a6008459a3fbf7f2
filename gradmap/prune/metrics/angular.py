"""Angular distance between layer inputs (Gromov et al., 2024, "The Unreasonable Ineffectiveness
of the Deeper Layers"; the layer-selection step of ReplaceMe, Shopkhoev et al., 2025).

    d(ℓ, n) = mean over sequences of  arccos(cos(h_ℓ, h_{ℓ+n})) / π

with h_ℓ the input of layer ℓ (h_L the last layer's output) at the last token of
each sequence (`tokens="all"`: every token). The contiguous block of n = n_prune
layers starting at argmin_ℓ d(ℓ, n) is removed, so the metric is one-shot by
nature; blocks that touch a protected layer are never chosen. Scores are keyed
by the ORIGINAL index of the block's first layer.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from gradmap.core import distributed
from gradmap.core.errors import GradmapError
from gradmap.prune.metrics.base import Metric, ScoringRun, check_choice
from gradmap.runtime.batching import check_finite
from gradmap.runtime.passes import forward_pass
from gradmap.runtime.placement import model_device

__all__ = ["Angular"]


@dataclass
class Angular(Metric):
    """Best contiguous block by angular distance; `tokens` is "last" (default) or "all"."""

    tokens: str = "last"

    name: ClassVar[str] = "angular"
    plans_one_block: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"layer_io"})
    schedules: ClassVar[tuple[str, ...]] = ("one-shot",)
    plain_forward: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_choice("tokens", self.tokens, ("last", "all"))

    def score(self, run: ScoringRun) -> dict[int, float]:
        n_layers, n = run.adapter.num_layers, run.n_prune
        starts = n_layers - n + 1
        # sums[starts] counts sequences (or tokens), so one collective sums everything over ranks
        sums = torch.zeros(starts + 1, dtype=torch.float64, device=model_device(run.model))
        # FIFO per layer of the inputs still waiting for layer pos+n (one per micro-batch): works
        # for batch-major passes and for layer streaming's layer-major order alike
        window: dict[int, list[torch.Tensor]] = {}

        def distance_to(pos: int, x: torch.Tensor) -> None:
            start = pos - n
            if start >= 0:
                ref = window[start].pop(0)
                cos = F.cosine_similarity(ref, x.to(ref.device), dim=-1).clamp(-1.0, 1.0)
                sums[start] += (torch.arccos(cos) / math.pi).sum(dtype=torch.float64).to(sums.device)
                if start == 0:
                    sums[starts] += cos.numel()

        def pick(h: torch.Tensor) -> torch.Tensor:
            return (h if self.tokens == "all" else h[:, -1:]).detach().float()

        def on_layer(pos: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
            x = pick(h_in)
            distance_to(pos, x)
            if pos < starts:
                window.setdefault(pos, []).append(x)
            if pos == n_layers - 1:
                distance_to(n_layers, pick(h_out))

        def after_batch(start: int, stop: int) -> None:
            check_finite(sums, "hidden state", start, stop, run.model)

        forward_pass(run.model, run.adapter, run.calib, run.batch_size, on_layer, sink=run.sink,
                     progress=run.progress, desc="angular distance", after_batch=after_batch)
        distributed.all_reduce_sum_(sums)
        vals = (sums[:starts] / sums[starts].clamp_min(1)).cpu()
        ids = run.adapter.original_ids
        return {ids[s]: float(vals[s]) for s in range(starts)}

    def plan(self, run: ScoringRun, scores: dict[int, float], n: int) -> Iterator[int]:
        """Yield the layers of the lowest-distance block whose layers are all removable."""
        ids = run.adapter.original_ids
        allowed = set(run.removable)
        valid = [s for s in range(len(ids) - n + 1)
                 if ids[s] in scores and all(ids[s + k] in allowed for k in range(n))]
        if not valid:
            raise GradmapError(f"no contiguous block of {n} layers avoids the protected layers; "
                               "lower n_prune or protect fewer layers")
        best = min(valid, key=lambda s: (scores[ids[s]], s))
        yield from list(ids[best:best + n])
