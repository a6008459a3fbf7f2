"""`fast_prune(..., heal=...)`: every option checked, the dense teacher's targets computed on the model
before any layer is removed, then the prune and the heal (`gradmap.healing`)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradmap.core import distributed
from gradmap.core.adapter import get_adapter
from gradmap.core.errors import GradmapError
from gradmap.core.result import PruneResult
from gradmap.prune.attention_pattern import check_pattern_plan
from gradmap.prune.metrics import get_metric
from gradmap.prune.pipeline import resolve_pipeline
from gradmap.prune.plan_checks import check_calibration, check_prune_plan, check_schedule, resolve_compensation

__all__ = ["pruned_then_healed"]

# fast_prune's own keywords, as `pruned_then_healed` receives them; the rest are metric options
_RUN_KEYWORDS = ("metric", "compensation", "schedule", "protect_first", "protect_last", "batch_size", "progress",
                 "offload", "compute_device", "safeguard", "holdout", "keep_attention_pattern")


def pruned_then_healed(prune: Callable[..., PruneResult], model: nn.Module, calib: torch.Tensor,
                       heal_data: torch.Tensor | None, n_prune: int, heal: Any, progress: bool,
                       prune_kwargs: dict[str, Any]) -> PruneResult:
    """`fast_prune(..., heal=...)` (`prune` is fast_prune): options checked first, teacher targets on the
    dense model, prune, heal."""
    from gradmap.healing import check_heal, heal_options, teacher_targets
    from gradmap.healing.options import check_before_pruning
    from gradmap.healing import heal as heal_fn

    if prune_kwargs.get("offload"):
        raise GradmapError(f"heal= cannot run with offload={prune_kwargs['offload']!r} yet (healing trains in memory); heal "
                           "the saved pruned model with gradmap.heal on a device it fits")
    opts = heal_options(heal)
    check_before_pruning(opts)
    check_heal(model, opts, n_layers_after=get_adapter(model).num_layers - n_prune)
    calib = check_calibration(model, calib)
    data = calib if heal_data is None else check_calibration(model, heal_data)
    if data.shape[0] < 2:
        raise GradmapError(f"heal= needs at least 2 {'calibration' if heal_data is None else 'heal_data'} rows "
                           "(one is held out)")
    # the pruning's own refusals come before the teacher's forward over every row
    _, removable = check_prune_plan(get_adapter(model).original_ids, n_prune, prune_kwargs["protect_first"],
                                    prune_kwargs["protect_last"])
    if prune_kwargs["keep_attention_pattern"]:
        check_pattern_plan(model.config, n_prune, removable, get_adapter(model).original_ids)
    if prune_kwargs["metric"] is not None or prune_kwargs["compensation"] is not None:
        named = {k: prune_kwargs[k] for k in ("metric", "compensation", "schedule")}
        extra = {k: v for k, v in prune_kwargs.items() if k not in _RUN_KEYWORDS}
        metric, compensation, schedule, extra = resolve_pipeline(*named.values(), extra)
        check_schedule(get_metric(metric, **extra), schedule)
        resolve_compensation(compensation)
    start = time.perf_counter()
    targets = teacher_targets(model, data, opts.top_k)
    teacher_seconds = time.perf_counter() - start
    result = prune(model, calib, n_prune, **prune_kwargs)
    report = heal_fn(model, data, teacher=targets, options=opts, progress=progress and distributed.is_main())
    report.teacher_seconds = teacher_seconds  # computed here, on the dense model, before pruning
    # the budget in the unit fast_prune's own cost is quoted in: tokens of the calibration set
    result.heal = report.to_dict() | {"summary": report.summary(), "rows": int(data.shape[0]),
                                      "tokens_x_calibration": report.tokens / calib.numel()}
    result.add_time("heal", teacher_seconds + report.seconds)
    return result
