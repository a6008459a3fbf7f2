"""Prune&Comp magnitude compensation (Chen et al., 2025, "Prune&Comp: Free Lunch for Layer-Pruned LLMs").

Removing layer i leaves layer i+1 reading h_in(i) where it used to read h_out(i), whose
magnitude is usually larger. Before the removal, on calibration data (the current,
already compensated model):
    s = mean_c  E|h_out(i)|_c / E|h_in(i)|_c          (mean over channels c)
and after it, s is folded into every write into the residual stream before the cut
(`fold.fold_residual_scale_`), so the stream that reaches layer i+1 is s·h_in(i).
Run with schedule="iterative" this is Prune&Comp's prune → compensate → re-score loop.
"""
from __future__ import annotations

import logging
import time

import torch

from gradmap.core import distributed
from gradmap.core.errors import GradmapError
from gradmap.ops import Moments
from gradmap.prune.compensation.base import Compensator, PruneContext
from gradmap.prune.compensation.fold import fold_residual_scale_
from gradmap.prune.compensation.dense import DenseSnapshot
from gradmap.prune.compensation.stats import layer_abs_moments
from gradmap.runtime.placement import model_device

__all__ = ["MagnitudeCompensation", "residual_gain"]

log = logging.getLogger(__name__)


@torch.no_grad()
def residual_gain(ctx: PruneContext, idx: int, calib: torch.Tensor,
                  scored: tuple[Moments, Moments] | None = None) -> tuple[float, int]:
    """s = mean_c E|h_out|_c / E|h_in|_c of layer `idx` (ORIGINAL id) over `calib`.

    Returns (s, number of channels skipped because E|h_in|_c = 0). Distributed: `calib` is
    the GLOBAL slice; each rank streams its share and the sums are added over ranks.
    `scored`: this rank's (Σ|h_in|, Σ|h_out|) over the same rows and micro-batches, already
    recorded by the scoring pass (`ctx.scored_abs`); then no forward runs here.
    """
    if scored is None:
        adapter = ctx.adapter
        d = ctx.model.config.hidden_size
        dev = model_device(ctx.model)
        abs_in, abs_out = Moments(d, want_xtx=False, device=dev), Moments(d, want_xtx=False, device=dev)
        layer_abs_moments(ctx, adapter.position_of(idx), calib, abs_in, abs_out)
    else:
        abs_in, abs_out = scored
    distributed.all_reduce_moments_([abs_in, abs_out])
    e_in, e_out = abs_in.mean.double(), abs_out.mean.double()
    if not (torch.isfinite(e_in).all() and torch.isfinite(e_out).all()):
        raise GradmapError(f"hidden-state magnitudes around layer {idx} are NaN/inf; the calibration forward "
                           "overflowed — run the model in bf16/fp32 rather than fp16")
    ok = e_in > 0
    if not ok.any():
        raise GradmapError(f"the input of layer {idx} is all zeros on the calibration data; "
                           "magnitude compensation needs non-degenerate calibration text")
    return float((e_out[ok] / e_in[ok]).mean()), int((~ok).sum())


class MagnitudeCompensation(Compensator):
    """`compensation="magnitude"`: Prune&Comp's per-removal residual rescaling.

    `max_samples` limits the calibration rows used per removal (None: all of them).
    """

    name = "magnitude"
    needs = frozenset({"layer_io", "weights"})

    @property
    def reads_scored_abs(self) -> bool:
        # the scoring pass covers every row; with max_samples the statistic is a subset's
        return self.max_samples is None

    def __init__(self, max_samples: int | None = None):
        if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
            raise GradmapError(f"max_samples must be a positive integer or None, got {max_samples!r}")
        self.max_samples = max_samples
        self.snapshot: DenseSnapshot | None = None
        self._pending: dict[int, float] = {}

    def begin(self, ctx: PruneContext) -> None:
        self.snapshot = DenseSnapshot.take(ctx)
        self._pending = {}
        ctx.result.compensation_report[self.name] = {"scales": {}, "skipped_channels": {}}

    def before_removal(self, ctx: PruneContext, idx: int) -> None:
        if self.snapshot is None:
            raise GradmapError("magnitude: before_removal() ran without begin(); call begin(ctx) first")
        t0 = time.perf_counter()
        calib = ctx.calib if self.max_samples is None else ctx.calib[:self.max_samples]
        # popped: the moments are reduced over ranks in place, and the model changes next anyway
        scored = ctx.scored_abs.pop(idx, None) if self.reads_scored_abs and ctx.scored_abs else None
        s, skipped = residual_gain(ctx, idx, calib, scored)
        self._pending[idx] = s
        report = ctx.result.compensation_report[self.name]
        if scored is not None:
            report.setdefault("statistics_from_scoring_pass", []).append(idx)
        report["samples"] = int(calib.shape[0])
        if skipped:
            report["skipped_channels"][idx] = skipped
        ctx.result.add_time("compensation_statistics", time.perf_counter() - t0)

    def after_removal(self, ctx: PruneContext, idx: int) -> None:
        if idx not in self._pending:
            raise GradmapError(f"magnitude: after_removal({idx}) without before_removal({idx}); "
                               "the driver must call both hooks around each removal")
        t0 = time.perf_counter()
        s = self._pending.pop(idx)
        adapter = ctx.adapter
        cut = self.snapshot.dense_position(idx)
        n_before = sum(1 for o in adapter.original_ids if self.snapshot.dense_position(o) < cut)
        fold_residual_scale_(adapter, n_before, s, lambda params: self.snapshot.remember(ctx, params))
        ctx.result.compensation_report[self.name]["scales"][idx] = s
        ctx.result.add_time("solve", time.perf_counter() - t0)
        log.info("layer %d removed, residual writes before it scaled by %.4f", idx, s)
