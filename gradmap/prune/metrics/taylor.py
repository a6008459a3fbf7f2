"""Taylor+ (Shortened LLaMA; Kim et al., 2024, "Shortened LLaMA: Depth Pruning for LLMs").

    T_ℓ = Σ_{θ ∈ layer ℓ} |θ · ∂L/∂θ|

the first-order estimate of the loss change when every weight of the block is
zeroed, with L the mean calibration loss. One forward + backward with weight
gradients on the decoder layers only; reductions via `gradmap.ops.layer_grad_reductions`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gradmap.prune.metrics.base import Metric, ScoringRun
from gradmap.runtime.passes import param_grad_reductions

__all__ = ["Taylor"]


@dataclass
class Taylor(Metric):
    """Shortened-LLaMA Taylor+ block score."""

    gradient_checkpointing: bool = False

    name: ClassVar[str] = "taylor"
    needs: ClassVar[frozenset[str]] = frozenset({"weight_grads", "weights"})
    plain_forward: ClassVar[bool] = True

    def score(self, run: ScoringRun) -> dict[int, float]:
        abs_sum, _, _ = param_grad_reductions(
            run.model, run.adapter, run.calib, run.batch_size, times_weight=True,
            sink=run.sink, gradient_checkpointing=self.gradient_checkpointing,
            progress=run.progress, desc="taylor")
        return {i: float(abs_sum[p]) for p, i in enumerate(run.adapter.original_ids)}
