"""GradMAP Stage 1: a global gradient score for every decoder layer from one backward.

Write u_t = h_out,t − h_in,t for a layer's residual update at token t and
g_t = ∂L/∂h_out,t, with L the mean next-token cross-entropy over the whole
calibration set. ⟨g_t, u_t⟩ is the derivative of L with respect to a scalar
gate α on the layer's update (h_out = h_in + α·u) at token t, so one forward
and one backward give, for every layer at once (`gradient=`):

    token   Σ_t |⟨g_t, u_t⟩|              activation gradients only (weights frozen)
    gate    −Σ_t ⟨g_t, u_t⟩                first-order loss increase if the layer is deleted
    fisher  Σ_seq (Σ_{t∈seq} ⟨g_t, u_t⟩)²  empirical Fisher of the gate
    param   mean_θ |∂L/∂θ| over the layer's weights (norm="l2": sqrt(mean (∂L/∂θ)²))

`normalize=` divides each token's term by ‖h_in,t‖, ‖u_t‖ or ‖h_out,t‖ before
the reduction (to remove the depth trend of raw gradients). `verify=c` then
checks the c lowest-scoring candidates with c forwards of the real calibration
loss (each candidate skipped) and removes the best, so a decision costs one
backward plus c forwards. Lowest score is removed first.

`verify_holdout=True` splits the calibration rows: the first `verify_rows` rows
only verify, the rest only feed the gradient, so the loss that picks among the
shortlist is measured on data the ranking never saw (the two pieces of evidence
are independent). Off by default so `verify=c` results stay reproducible; the
gradient then uses fewer rows, and the dense forward no longer covers the whole
set, so compensators that need dense means measure them with a forward of their own.

Default (chosen on SmolLM2-135M, bench/RESULTS.md "Stage 1"): gradient="token",
normalize="none", verify=0 — verification (verify=4 on a quarter of the calibration rows)
did not lower perplexity at the points measured, so the cheaper setting is the default;
default schedule one-shot (`default_schedule`): at 8 of 30 layers, 16 x 256 calibration,
WikiText-2 PPL 100.4 one-shot vs 121.4 iterative (no compensation).
Per-token normalisations over-correct the depth trend and are not recommended; the raw
signed gate, fisher and param variants rank layers far worse than token (see RESULTS.md
for where block influence still wins).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from gradmap.core import distributed
from gradmap.core.errors import GradmapError
from gradmap.ops import gate_reduction
from gradmap.prune.metrics.base import Metric, ScoringRun, check_choice, lowest_first
from gradmap.runtime.passes import backward_pass, calibration_losses, param_grad_reductions
from gradmap.runtime.batching import check_finite
from gradmap.runtime.placement import model_device

__all__ = ["GradMAP", "gate_statistics", "GRADIENTS", "NORMALIZATIONS"]

log = logging.getLogger(__name__)

GRADIENTS = ("token", "gate", "fisher", "param")
NORMALIZATIONS = ("none", "h_in", "u", "h_out")
_EPS = 1e-12


def _divisor(norm: str, h_in: torch.Tensor, h_out: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
    if norm == "none":
        return None
    x = {"h_in": h_in, "u": u, "h_out": h_out}[norm]
    return torch.linalg.vector_norm(x.float(), dim=-1).clamp_min(_EPS)


def gate_statistics(run: ScoringRun, normalizations: tuple[str, ...] = ("none",),
                    gradient_checkpointing: bool = False
                    ) -> dict[tuple[str, str], dict[int, float]]:
    """Scores of the token, gate and fisher variants for each normalisation, from one backward.

    Returns {(variant, normalisation): {ORIGINAL layer index: score}}. Every
    parameter is frozen, so the backward computes activation gradients only.
    Per-token terms ⟨g_t, u_t⟩ come from `gradmap.ops.gate_reduction` (fp32).
    """
    adapter = run.adapter
    n = adapter.num_layers
    device = model_device(run.model)
    acc = {(v, nz): torch.zeros(n, dtype=torch.float64) for v in ("token", "gate", "fisher")
           for nz in normalizations}
    # per-batch sums stay on the model's device (no host sync inside the backward)
    batch = {k: torch.zeros(n, dtype=torch.float64, device=device) for k in acc}

    def on_layer(pos: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        if not h_out.requires_grad:
            return

        def hook(g: torch.Tensor) -> None:
            u = h_out.detach() - h_in.detach()
            s = gate_reduction(g, u)  # [batch, seq] fp32: ⟨g_t, u_t⟩
            for nz in normalizations:
                div = _divisor(nz, h_in.detach(), h_out.detach(), u)
                sn = (s if div is None else s / div).to(device)  # device_map: sums on one device
                batch["token", nz][pos] += sn.abs().sum(dtype=torch.float64)
                batch["gate", nz][pos] -= sn.sum(dtype=torch.float64)
                batch["fisher", nz][pos] += sn.sum(-1, dtype=torch.float64).square().sum()
        h_out.register_hook(hook)

    def after_batch(start: int, stop: int) -> None:
        for k, b in batch.items():
            check_finite(b, "layer gradient", start, stop, run.model)
            acc[k] += b.cpu()
            b.zero_()

    backward_pass(run.model, adapter, run.calib, run.batch_size, weight_grads=False,
                  on_layer=on_layer, sink=run.sink, after_batch=after_batch,
                  gradient_checkpointing=gradient_checkpointing, progress=run.progress,
                  desc="gradmap gradient")
    distributed.all_reduce_sums_(list(acc.values()))
    ids = adapter.original_ids
    return {k: {ids[p]: float(v[p]) for p in range(n)} for k, v in acc.items()}


@dataclass
class GradMAP(Metric):
    """GradMAP Stage 1 layer scores (see module docstring); options are validated on construction."""

    gradient: str = "token"
    normalize: str = "none"
    norm: str = "l1"
    verify: int = 0
    verify_samples: int | None = None
    verify_holdout: bool = False
    gradient_checkpointing: bool = False

    name: ClassVar[str] = "gradmap"
    needs: ClassVar[frozenset[str]] = frozenset({"layer_io", "activation_grads"})
    plain_forward: ClassVar[bool] = True
    # one-shot beat iterative on the largest calibration measured on SmolLM2 (RESULTS.md
    # "Quality at 8 of 30 layers"; the order flips on a smaller one), and costs one backward
    # instead of one per decision
    default_schedule: ClassVar[str] = "one-shot"

    def requirements(self) -> frozenset[str]:
        needs = frozenset({"weight_grads", "weights"}) if self.gradient == "param" else self.needs
        return needs | ({"skip_losses"} if self.verify else set())

    def __post_init__(self) -> None:
        check_choice("gradient", self.gradient, GRADIENTS)
        check_choice("normalize", self.normalize, NORMALIZATIONS)
        check_choice("norm", self.norm, ("l1", "l2"))
        if self.gradient == "param" and self.normalize != "none":
            raise GradmapError("normalize applies to the token/gate/fisher variants; "
                               "pass normalize='none' with gradient='param'")
        if not isinstance(self.verify, int) or isinstance(self.verify, bool) or self.verify < 0:
            raise GradmapError(f"verify must be an integer >= 0 (candidates checked per decision), "
                               f"got {self.verify!r}")
        if self.verify_samples is not None and (not isinstance(self.verify_samples, int)
                                                or self.verify_samples < 1):
            raise GradmapError(f"verify_samples must be a positive integer or None (a quarter), "
                               f"got {self.verify_samples!r}")
        if not isinstance(self.verify_holdout, bool):
            raise GradmapError(f"verify_holdout must be True or False, got {self.verify_holdout!r}")
        if self.verify_holdout and not self.verify:
            raise GradmapError("verify_holdout=True splits rows between the gradient and the "
                               "verification; pass verify=c (c >= 2) with it")

    def feeds_dense_means(self) -> bool:
        # with verify_holdout the scoring forward sees only the gradient rows, so it cannot
        # record the dense means a compensator expects over the whole calibration set
        return not self.verify_holdout

    def verify_rows(self, n_samples: int) -> int:
        """Calibration rows used to verify candidates: `verify_samples`, default a quarter (>= 1)."""
        if self.verify_samples is None:
            return max(1, n_samples // 4)
        return min(self.verify_samples, n_samples)

    def _split(self, calib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gradient rows, verification rows) of the GLOBAL calibration set."""
        k = self.verify_rows(calib.shape[0])
        if not self.verify_holdout:
            return calib, calib[:k]
        if k >= calib.shape[0]:
            raise GradmapError(f"verify_holdout=True needs at least 2 calibration rows and "
                               f"verify_samples below the {calib.shape[0]} given "
                               f"(got verify_samples={self.verify_samples}); pass more samples")
        return calib[k:], calib[:k]

    def score(self, run: ScoringRun) -> dict[int, float]:
        """Per-layer score of the chosen variant (one forward + one backward)."""
        if self.verify_holdout:
            run = replace(run, calib=self._split(run.calib)[0], sink=None)
        if self.gradient == "param":
            abs_sum, sq_sum, counts = param_grad_reductions(
                run.model, run.adapter, run.calib, run.batch_size, sink=run.sink,
                gradient_checkpointing=self.gradient_checkpointing, progress=run.progress,
                desc="gradmap param gradient")
            vals = (abs_sum.double() / counts if self.norm == "l1"
                    else (sq_sum.double() / counts).sqrt())
            return {i: float(vals[p]) for p, i in enumerate(run.adapter.original_ids)}
        stats = gate_statistics(run, (self.normalize,), self.gradient_checkpointing)
        return stats[self.gradient, self.normalize]

    def plan(self, run: ScoringRun, scores: dict[int, float], n: int) -> Iterator[int]:
        """Lowest score first; with verify=c, the best of the c lowest by measured calibration loss."""
        order = lowest_first(scores, [i for i in run.removable if i in scores])
        for _ in range(n):
            candidates = [i for i in order if i in run.removable][:max(1, self.verify)]
            if len(candidates) == 1:
                yield candidates[0]
                continue
            # the first rows of the GLOBAL calibration set (sharded inside, summed over ranks)
            subset = self._split(run.calib)[1]
            layers = [run.adapter.layers[run.adapter.position_of(i)] for i in candidates]
            losses = dict(zip(candidates, calibration_losses(
                run.model, subset, run.batch_size, layers, progress=run.progress,
                desc="verify candidates")))
            best = min(candidates, key=lambda i: (losses[i], candidates.index(i)))
            log.info("verify: calibration loss with each candidate skipped %s -> remove %d",
                     {i: round(v, 4) for i, v in losses.items()}, best)
            run.notes.append({"verify_losses": losses, "chosen": best})
            yield best
