"""Prune&Comp magnitude compensation (Chen et al., 2025, "Prune&Comp: Free Lunch for Layer-Pruned LLMs").

Removing layer i leaves layer i+1 reading h_in(i) where it used to read h_out(i), whose
magnitude is usually larger. Before the removal, on calibration data (the current,
already compensated model), one scalar s is estimated and after it folded into every write
into the residual stream before the cut (`fold.fold_residual_scale_`), so the stream that
reaches layer i+1 is s·h_in(i). Two estimates (`statistic`):

* "ratio" (default; the paper's magnitude gap): s = mean_c E|h_out(i)|_c / E|h_in(i)|_c.
* "lsq": s = Σ_t <h_in, h_out> / Σ_t ‖h_in‖², the least-squares fit of h_out by s·h_in.

Where "ratio" fails: it measures how much LARGER the stream becomes, not how much of it h_in
can stand in for. When the removed layer writes across h_in rather than along it (typical of
early layers, and of post-norm families such as Gemma-2/3 whose fixed-size writes dominate a
small early stream), or one channel's input is near zero, or a massive activation is born in
that layer, s is far above the best scale; the whole stream is scaled up and every later
layer's write shrinks relative to it (a real Gemma-3 model: PPL 293 without compensation,
313,426 with it). "lsq" ignores energy orthogonal to h_in and is not moved by those channels,
but it is dominated by the massive-activation channels that h_in and h_out share in Llama-like
models, so it stays near 1 there and the iterative loop then removes early layers: on SmolLM2
at 8 of 30 layers it gave PPL 75.6 against 65.8 for "ratio" (seed 0; bench/RESULTS.md "Default
per model"). So "ratio" stays the default, and the pipeline safeguard (`gradmap.prune.safeguard`)
reverts it wherever it raises the held-out loss above the plain removal's.
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
from gradmap.runtime.batching import MAGNITUDE_TERMS
from gradmap.runtime.placement import model_device

__all__ = ["MagnitudeCompensation", "residual_gain", "STATISTICS"]

log = logging.getLogger(__name__)


STATISTICS = tuple(MAGNITUDE_TERMS)


@torch.no_grad()
def residual_gain(ctx: PruneContext, idx: int, calib: torch.Tensor,
                  scored: tuple[Moments, Moments] | None = None, statistic: str = "ratio") -> tuple[float, int]:
    """The residual scale s of layer `idx` (ORIGINAL id) over `calib` (module docstring).

    Returns (s, number of channels skipped because E|h_in|_c = 0; always 0 for "lsq").
    Distributed: `calib` is the GLOBAL slice; each rank streams its share and the sums are
    added over ranks. `scored`: this rank's sums of the statistic's terms over the same rows
    and micro-batches, already recorded by the scoring pass (`ctx.scored_abs`); then no
    forward runs here.
    """
    if scored is None:
        adapter = ctx.adapter
        d = ctx.model.config.hidden_size
        dev = model_device(ctx.model)
        abs_in, abs_out = Moments(d, want_xtx=False, device=dev), Moments(d, want_xtx=False, device=dev)
        layer_abs_moments(ctx, adapter.position_of(idx), calib, abs_in, abs_out, statistic)
    else:
        abs_in, abs_out = scored
    distributed.all_reduce_moments_([abs_in, abs_out])
    e_in, e_out = abs_in.mean.double(), abs_out.mean.double()
    if statistic == "lsq":
        return _lsq_gain(idx, e_in, e_out), 0
    if not (torch.isfinite(e_in).all() and torch.isfinite(e_out).all()):
        raise GradmapError(f"hidden-state magnitudes around layer {idx} are NaN/inf; the calibration forward "
                           "overflowed — run the model in bf16/fp32 rather than fp16")
    ok = e_in > 0
    if not ok.any():
        raise GradmapError(f"the input of layer {idx} is all zeros on the calibration data; "
                           "magnitude compensation needs non-degenerate calibration text")
    return float((e_out[ok] / e_in[ok]).mean()), int((~ok).sum())


def _lsq_gain(idx: int, sq_in: torch.Tensor, cross: torch.Tensor) -> float:
    energy, dot = float(sq_in.sum()), float(cross.sum())
    if not (energy < float("inf") and abs(dot) < float("inf")):
        raise GradmapError(f"hidden states around layer {idx} are NaN/inf; the calibration forward "
                           "overflowed — run the model in bf16/fp32 rather than fp16")
    if energy <= 0:
        raise GradmapError(f"the input of layer {idx} is all zeros on the calibration data; "
                           "magnitude compensation needs non-degenerate calibration text")
    if dot <= 0:  # h_out points away from h_in: no positive scale fits, so leave the stream as it is
        log.info("layer %d: its output is not positively aligned with its input; residual scale kept at 1", idx)
        return 1.0
    return dot / energy


class MagnitudeCompensation(Compensator):
    """`compensation="magnitude"`: Prune&Comp's per-removal residual rescaling.

    `max_samples` limits the calibration rows used per removal (None: all of them).
    `statistic`: "ratio" (default, the paper's) or "lsq", see the module docstring.
    """

    name = "magnitude"
    needs = frozenset({"layer_io", "weights"})

    @property
    def reads_scored_abs(self) -> bool:
        # the scoring pass covers every row; with max_samples the statistic is a subset's
        return self.max_samples is None

    def __init__(self, max_samples: int | None = None, statistic: str = "ratio"):
        if max_samples is not None and (not isinstance(max_samples, int) or isinstance(max_samples, bool)
                                        or max_samples < 1):
            raise GradmapError(f"max_samples must be a positive integer or None, got {max_samples!r}")
        if statistic not in STATISTICS:
            raise GradmapError(f"magnitude statistic must be one of {', '.join(map(repr, STATISTICS))}, "
                               f"got {statistic!r}")
        self.max_samples = max_samples
        self.statistic = statistic
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
        s, skipped = residual_gain(ctx, idx, calib, scored, self.statistic)
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
        def fold() -> None:
            fold_residual_scale_(adapter, n_before, s, lambda params: self.snapshot.remember(ctx, params))
        if ctx.prefix_cache is not None:  # the kept states before the cut scale with the stream
            ctx.prefix_cache.scale_prefix(adapter, n_before, s, fold)
        else:
            fold()
        ctx.result.compensation_report[self.name]["scales"][idx] = s
        ctx.result.add_time("solve", time.perf_counter() - t0)
        log.info("layer %d removed, residual writes before it scaled by %.4f", idx, s)
