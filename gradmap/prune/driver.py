"""`fast_prune`: remove whole decoder layers chosen by a layer-importance metric, in place.

Schedules (both remove one layer at a time, with the compensator hooks around each):

* ``"one-shot"``: score once, remove the n_prune lowest-scoring removable layers;
* ``"iterative"``: score, remove the single lowest, re-score the pruned (and
  possibly compensated) model, repeat — one scoring pass per decision.

The compensator interface is called exactly as `gradmap.prune.compensation.base`
documents: ``begin`` on the dense model (after the first scoring pass, so
``ctx.dense_means`` is filled when the metric ran a plain dense forward),
``before_removal`` / ``after_removal`` around every removal, ``finalize`` once
after the last one.
"""
from __future__ import annotations

import logging
import resource
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gradmap.core import distributed
from gradmap.prune.support import check_model_support, check_prune_support
from gradmap.runtime.placement import OFFLOAD_MODES, layer_offload
from gradmap.core.adapter import get_adapter
from gradmap.prune.compensation.base import Compensator, PruneContext
from gradmap.core.errors import GradmapError
from gradmap.prune.metrics import Metric, ScoringRun, get_metric
from gradmap.prune.metrics.base import check_choice
from gradmap.runtime.batching import AbsSink, MeanSink, Sinks, default_batch_size, preserved_state
from gradmap.runtime.memory import limit_heap_fragmentation
from gradmap.runtime.prefix_cache import PrefixCache
from gradmap.runtime.support import requirements_of
from gradmap.runtime.placement import model_device
from gradmap.core.result import PruneResult
from gradmap.core.surgery import remove_layers
from gradmap.prune.safeguard import PipelineSafeguard, split_holdout
from gradmap.prune.plan_checks import (SCHEDULES, check_calibration, check_prune_plan, check_schedule,
                                      protected_layers, resolve_compensation)
from gradmap.prune.pipeline import DEFAULT_PIPELINE, default_pipeline_name, resolve_pipeline
from gradmap.prune.auto import choose_pipeline
from gradmap.prune.attention_pattern import check_pattern_plan, window_plan

__all__ = ["fast_prune", "check_calibration", "resolve_compensation", "protected_layers", "check_schedule",
           "check_prune_plan", "SCHEDULES", "DEFAULT_PIPELINE", "resolve_pipeline", "default_pipeline_name"]

log = logging.getLogger(__name__)

@contextmanager
def _peak_memory(model: nn.Module, result: PruneResult):
    device = model_device(model)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        if cuda:
            result.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
            result.options["peak_memory"] = "torch.cuda.max_memory_allocated during the call"
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux
            result.peak_memory_bytes = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
            result.options["peak_memory"] = "process peak RSS (ru_maxrss), not reset per call"


@contextmanager
def _editing(ctx: PruneContext, c: Compensator):
    """Attribute the weight changes of `c`'s hook to it (the pipeline safeguard reports them)."""
    ctx.editing = c.name
    try:
        yield
    finally:
        ctx.editing = None


def _remove(ctx: PruneContext, compensators: list[Compensator], run: ScoringRun, idx: int) -> None:
    for c in compensators:
        with _editing(ctx, c):
            c.before_removal(ctx, idx)
    ctx.scored_abs = None  # recorded on the model as it was; it changes now
    t = time.perf_counter()
    adapter = ctx.adapter
    module = adapter.layers[adapter.position_of(idx)]
    remove_layers(ctx.model, [idx])
    ctx.removed_modules[idx] = module
    ctx.result.removed_layers.append(idx)
    run.removable.remove(idx)
    ctx.result.add_time("removal", time.perf_counter() - t)
    log.info("removed original layer %d (%d layers left)", idx, adapter.num_layers)
    for c in compensators:
        with _editing(ctx, c):
            c.after_removal(ctx, idx)


def _timed_score(metric: Metric, run: ScoringRun, ctx: PruneContext, means: MeanSink | None,
                 abs_device: tuple[torch.device, str] | None) -> dict[int, float]:
    """One scoring pass; with `abs_device` it also records every layer's magnitudes for the
    removal that follows (`ctx.scored_abs`), with `means` the dense means (first pass only)."""
    scored = AbsSink(*abs_device) if abs_device is not None else None
    run.sink = None if means is None and scored is None else Sinks(means, scored)
    t = time.perf_counter()
    try:
        scores = metric.score(run)
    finally:
        run.sink = None
    ctx.result.add_time("scoring", time.perf_counter() - t)
    ctx.result.scores.append(dict(scores))
    ctx.scored_abs = scored.moments if scored is not None else None
    return scores


def _backward(metric: Metric) -> bool:
    """True when the metric's scoring passes run a backward (gradient metrics)."""
    return bool(requirements_of(metric) & {"activation_grads", "weight_grads"})


def _scored_abs_device(metric: Metric, compensators: list[Compensator], model: nn.Module,
                       batch_size: int, comp_batch_size: int) -> tuple[torch.device, str] | None:
    """(device, statistic) where the scoring pass should record layer magnitudes, or None when
    it should not.

    Only a forward-only pass over every row, in the compensators' own micro-batches, sees
    exactly what magnitude compensation would measure (bit for bit), so only then is its
    forward skipped; a gradient pass may recompute layers (checkpointing) or batch differently.
    """
    statistics = {getattr(c, "statistic", "ratio") for c in compensators if c.reads_scored_abs}
    if len(statistics) != 1 or _backward(metric) or not metric.feeds_dense_means() or batch_size != comp_batch_size:
        return None
    return model_device(model), statistics.pop()


def _drop_prefix_cache(run: ScoringRun, ctx: PruneContext) -> None:
    """Free the loop's kept layer inputs once the loop is over; report what they saved."""
    cache = run.prefix
    if cache is not None:
        ctx.result.options["rescoring"] = {"layers_replayed": cache.reused, "layers_run": cache.run}
    run.prefix = ctx.prefix_cache = None


def _plan(metric: Metric, run: ScoringRun, scores: dict[int, float], n: int, period: int):
    """The metric's own plan, or windows of `period` adjacent layers (keep_attention_pattern). A plan
    that removes one contiguous block (`plans_one_block`) keeps the pattern already."""
    if period == 1 or metric.plans_one_block:
        return metric.plan(run, scores, n)
    return (i for i in window_plan(scores, run.adapter.original_ids, run.removable, n, period))


def _next_choice(plan, result: PruneResult) -> int:
    t = time.perf_counter()
    idx = next(plan)
    result.add_time("scoring", time.perf_counter() - t)
    return idx


def fast_prune(model: nn.Module, calib: torch.Tensor, n_prune: int, metric: str | Metric | None = None,
               compensation: Any = None, schedule: str | None = None, protect_first: int = 1,
               protect_last: int = 1, batch_size: int | None = None, progress: bool = True,
               offload: str | None = None, compute_device: str | torch.device | None = None,
               safeguard: bool = True, holdout: float = 0.125, heal: Any = None,
               keep_attention_pattern: bool = False, heal_data: torch.Tensor | None = None,
               **metric_options) -> PruneResult:
    """Remove `n_prune` decoder layers of `model` in place and return what was done.

    With `metric`, `compensation` and `schedule` left None (and no metric options) this runs
    the default, "auto": every pipeline of `gradmap.prune.pipeline.CANDIDATES` in turn, keeping
    the one with the lowest loss on the held-out rows (`gradmap.prune.auto`; what each scored is
    in `result.options["auto"]`). With `safeguard=False` there are no held-out rows, and the
    first candidate, `DEFAULT_PIPELINE`, runs alone; see `resolve_pipeline` for partial choices.
    `metric` is a name from `gradmap.prune.metrics.available_metrics()` (configured by
    `metric_options`) or a Metric instance; lowest score is removed first.
    `schedule=None` takes the metric's `default_schedule`: one-shot for GradMAP (measured
    better than iterative on SmolLM2, bench/RESULTS.md "Stage 1"), iterative for the other
    metrics that support it, else the metric's only schedule.
    `compensation` is "none", a registered compensator name, a Compensator or a
    list. Layers among the first `protect_first` / last `protect_last` of the
    ORIGINAL model are never removed. `batch_size=None` picks, for the scoring passes
    and for the compensators' forward-only passes separately, the largest micro-batch whose
    activations fit 512 MiB (at most 2048 tokens; `gradmap.runtime.batching.default_batch_size`);
    an explicit `batch_size` is used for both. All inputs are validated before the model is touched; the
    model leaves in eval mode with its `requires_grad` flags and `.grad` as they
    came in, also on error (layers removed before an error stay removed).

    Data-parallel under `torchrun` (an initialised torch.distributed group): call it on every
    rank with the same model and the same GLOBAL `calib`; each calibration pass runs the
    rank's contiguous share of the rows it needs and sums its statistics over ranks, so all
    ranks remove the same layers and fold the same weights as one process would (up to
    floating-point summation order). Subsets of rows (GradMAP verification, the projection
    held-out slice, magnitude `max_samples`) are chosen on the global rows first.

    Models larger than one device: a model loaded with `device_map="auto"` works as is
    (statistics stay on each layer's device). `offload="layer"` keeps the weights on the
    host and brings one decoder layer at a time to `compute_device` (default CUDA when
    available), see `gradmap.runtime.streaming`; it supports every metric and compensator whose
    declared `needs` the streaming runtime can execute (`gradmap.runtime.support.STREAMABLE`),
    and raises GradmapError for the others before any work.

    `safeguard=True` (with any compensation): the last `holdout` fraction of the calibration
    rows (at least one) is kept out of every score and fit, and each compensation stage is
    kept only if it lowers the held-out loss below the best so far, starting from the plain
    removal, so the returned model is never worse than the removal alone on those rows
    (`gradmap.prune.safeguard`; what was reverted is in `result.safeguard` and the summary).
    `safeguard=False` uses every row for scoring and fitting and checks nothing.

    `heal` (None, a mode name of `gradmap.healing.HEAL_MODES`, a dict of heal options or a
    HealOptions): after pruning, `gradmap.heal` distils the pruned model towards the dense one on
    `heal_data` (token ids [rows, seq_len]; None: `calib`; more rows than the calibration set
    heal better, bench/RESULTS.md "Healing"); the dense teacher's top-K log-probs are computed on
    this same model before any layer is removed (one forward per row), so no second copy is held. Its report is `result.heal`, its
    seconds `result.timings["heal"]` (outside "total").

    `keep_attention_pattern=True` (Gemma 2/3): remove only runs of P adjacent layers, P the period of
    the model's sliding/full attention alternation, so every kept layer's type still matches its
    position and the pruned model can be exported as GGUF (transformers and llama.cpp then load the
    same model); `n_prune` must be a multiple of P. No effect on models without an alternation.
    See `gradmap.prune.attention_pattern`.
    """
    if not isinstance(keep_attention_pattern, bool):  # before the heal path's teacher pass too
        raise GradmapError(f"keep_attention_pattern must be True or False, got {keep_attention_pattern!r}")
    if heal_data is not None and heal is None:
        raise GradmapError("heal_data= is the text heal= trains on; pass heal= too (e.g. heal='compensation') "
                           "or drop heal_data")
    if heal is not None:
        from gradmap.prune.healed import pruned_then_healed
        return pruned_then_healed(fast_prune, model, calib, heal_data, n_prune, heal, progress, dict(
            metric=metric, compensation=compensation, schedule=schedule, protect_first=protect_first,
            protect_last=protect_last, batch_size=batch_size, progress=progress, offload=offload,
            compute_device=compute_device, safeguard=safeguard, holdout=holdout,
            keep_attention_pattern=keep_attention_pattern, **metric_options))
    if metric is None and compensation is None and schedule is None and not metric_options and safeguard:
        return choose_pipeline(_run, model, calib, n_prune, holdout, protect_first=protect_first,
                               protect_last=protect_last, batch_size=batch_size, progress=progress,
                               offload=offload, compute_device=compute_device,
                               keep_attention_pattern=keep_attention_pattern)
    return _run(model, calib, n_prune, metric, compensation, schedule, protect_first, protect_last, batch_size,
                progress, offload, compute_device, safeguard, holdout, keep_attention_pattern,
                **metric_options)[0]


def _run(model: nn.Module, calib: torch.Tensor, n_prune: int, metric: str | Metric | None = None,
         compensation: Any = None, schedule: str | None = None, protect_first: int = 1,
         protect_last: int = 1, batch_size: int | None = None, progress: bool = True,
         offload: str | None = None, compute_device: str | torch.device | None = None,
         safeguard: bool = True, holdout: float = 0.125, keep_attention_pattern: bool = False,
         **metric_options) -> tuple[PruneResult, PruneContext]:
    """One pipeline, as `fast_prune` describes it; also returns its context (for `choose_pipeline`)."""
    adapter = get_adapter(model)
    defaulted = metric is None and compensation is None
    metric, compensation, schedule, metric_options = resolve_pipeline(metric, compensation, schedule,
                                                                      metric_options)
    metric_obj = get_metric(metric, **metric_options)
    schedule = check_schedule(metric_obj, schedule)
    calib = check_calibration(model, calib)
    if not isinstance(safeguard, bool):
        raise GradmapError(f"safeguard must be True or False, got {safeguard!r}")
    compensators = resolve_compensation(compensation)
    hold = None
    if safeguard and any(c.name != "none" for c in compensators):
        calib, hold = split_holdout(calib, holdout)
    distributed.shard_bounds(calib.shape[0])  # every rank needs at least one calibration row
    progress = progress and distributed.is_main()
    ids = adapter.original_ids
    protected, removable = check_prune_plan(ids, n_prune, protect_first, protect_last)
    period = check_pattern_plan(model.config, n_prune, removable, ids) if keep_attention_pattern else 1
    comp_batch_size = batch_size
    if batch_size is None:  # backward passes keep every layer's activations: a smaller budget share
        batch_size = default_batch_size(calib.shape[1], config=model.config, backward=_backward(metric_obj))
        comp_batch_size = default_batch_size(calib.shape[1], config=model.config, backward=False)
    elif not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise GradmapError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    check_choice("offload", offload, OFFLOAD_MODES)
    if offload == "layer":
        check_prune_support(metric_obj, compensators)
    check_model_support(model, metric_obj, compensators)

    result = PruneResult(metric=metric_obj.name, schedule=schedule,
                         compensation=[c.name for c in compensators])
    result.options.update(metric_obj.options(), n_prune=n_prune, protect_first=protect_first,
                          protect_last=protect_last, batch_size=batch_size,
                          compensation_batch_size=comp_batch_size,
                          n_calib=int(calib.shape[0]), seq_len=int(calib.shape[1]),
                          safeguard=safeguard, n_holdout=0 if hold is None else int(hold.shape[0]),
                          protected_layers=sorted(protected), offload=offload,
                          keep_attention_pattern=keep_attention_pattern, attention_period=period,
                          default_pipeline=defaulted and schedule == DEFAULT_PIPELINE["schedule"],
                          compute_device=None if compute_device is None else str(compute_device),
                          # with the metric options above: everything a rerun needs
                          compensation_options={c.name: c.options() for c in compensators
                                                if c.name != "none"})
    ctx = PruneContext(model=model, calib=calib, batch_size=comp_batch_size, result=result, progress=progress,
                       dense_layer_ids=list(ids))
    want_means = metric_obj.feeds_dense_means() and any(c.needs_dense_means for c in compensators)
    means = MeanSink() if want_means else None
    run = ScoringRun(model=model, adapter=adapter, calib=calib, batch_size=batch_size,
                     removable=list(removable), n_prune=n_prune, progress=progress)
    if schedule == "iterative" and n_prune > 1 and not offload:
        run.prefix = ctx.prefix_cache = PrefixCache()
    limit_heap_fragmentation()  # freed activations go back to the OS (runtime/memory.py)
    start = time.perf_counter()
    plan = None
    offloaded = layer_offload(model, compute_device) if offload else nullcontext()
    with offloaded, _peak_memory(model, result), preserved_state(model):
        # inside the offload block: model_device is then the compute device, where the activations are
        abs_device = _scored_abs_device(metric_obj, compensators, model, batch_size, comp_batch_size)
        try:
            scores = _timed_score(metric_obj, run, ctx, means, abs_device)
            if means is not None:
                ctx.dense_means = means.means()
            guard = PipelineSafeguard(ctx, hold) if hold is not None else None
            if safeguard and hold is None and any(c.name != "none" for c in compensators):
                result.safeguard = {"skipped": "a single calibration row: nothing to hold out"}
            for c in compensators:
                c.begin(ctx)
            bar = tqdm(total=n_prune, desc=f"prune ({metric_obj.name}, {schedule})", unit="layer",
                       disable=not progress)
            with bar:
                if schedule == "one-shot":
                    plan = _plan(metric_obj, run, scores, n_prune, period)
                    for _ in range(n_prune):
                        _remove(ctx, compensators, run, _next_choice(plan, result))
                        bar.update(1)
                else:  # one decision removes `period` layers (one window; 1 without a pattern to keep)
                    for decision in range(n_prune // period):
                        if decision > 0:
                            scores = _timed_score(metric_obj, run, ctx, None, abs_device)
                        plan = _plan(metric_obj, run, scores, period, period)
                        for _ in range(period):
                            _remove(ctx, compensators, run, _next_choice(plan, result))
                            bar.update(1)
                        plan.close()
            _drop_prefix_cache(run, ctx)
            if guard is not None:
                guard.after_removals(list(ctx.editors))
            for c in compensators:
                with guard.finalize_stage(c.name) if guard is not None else nullcontext(), _editing(ctx, c):
                    c.finalize(ctx)
        finally:
            _drop_prefix_cache(run, ctx)
            if plan is not None:
                plan.close()
            if run.notes:
                result.options["decisions"] = run.notes
            result.timings["total"] = time.perf_counter() - start
    log.info("fast_prune: removed %s with %s (%s) in %.1fs", result.removed_layers, metric_obj.name,
             schedule, result.timings["total"])
    return result, ctx
