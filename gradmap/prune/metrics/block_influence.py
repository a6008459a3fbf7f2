"""Block influence (ShortGPT; Men et al., 2024, "ShortGPT: Layers in Large Language Models are
More Redundant Than You Expect").

    BI_ℓ = mean over calibration tokens t of  1 − cos(h_in,t, h_out,t)

A layer that barely turns the residual stream is redundant. One plain forward,
streamed: only a per-layer running sum leaves each micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from gradmap.core import distributed
from gradmap.prune.metrics.base import Metric, ScoringRun
from gradmap.runtime.batching import check_finite
from gradmap.runtime.passes import forward_pass
from gradmap.runtime.placement import model_device

__all__ = ["BlockInfluence"]


@dataclass
class BlockInfluence(Metric):
    """ShortGPT block influence; no options."""

    name: ClassVar[str] = "block-influence"
    needs: ClassVar[frozenset[str]] = frozenset({"layer_io"})
    plain_forward: ClassVar[bool] = True

    def score(self, run: ScoringRun) -> dict[int, float]:
        n = run.adapter.num_layers
        # sums[n] counts tokens, so one collective sums everything over ranks
        sums = torch.zeros(n + 1, dtype=torch.float64, device=model_device(run.model))

        def on_layer(pos: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
            cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            sums[pos] += (1.0 - cos).sum(dtype=torch.float64).to(sums.device)
            if pos == 0:
                sums[n] += cos.numel()

        def after_batch(start: int, stop: int) -> None:
            check_finite(sums, "hidden state", start, stop, run.model)

        forward_pass(run.model, run.adapter, run.calib, run.batch_size, on_layer, sink=run.sink,
                     progress=run.progress, desc="block influence", after_batch=after_batch,
                     cache=run.prefix)
        distributed.all_reduce_sum_(sums)
        vals = (sums[:n] / sums[n]).cpu()
        return {i: float(vals[p]) for p, i in enumerate(run.adapter.original_ids)}
