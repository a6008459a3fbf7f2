"""The default pipeline chosen per model: run each candidate, keep the one the held-out rows prefer.

No pipeline wins on every model: block influence (iterative) + magnitude + ReplaceMe is the best
measured on SmolLM2 and 36% worse than GradMAP + projection on a Gemma-3 model. So the default
runs the candidates one after the other on the same model object (restoring the dense model in
between from the removed layers and original weights the driver keeps, so no second copy of the
model is held) and keeps the one whose held-out mean next-token loss is lowest. The held-out
rows are the pipeline safeguard's (`gradmap.prune.safeguard`): no score and no fit of any
candidate sees them, and every candidate is already no worse than its own plain removal there.
Memory: the weights the best candidate so far changed (a copy), while the next one runs.
Cost: the sum of the candidates' costs (nothing is shared between them; the iterative
candidate re-runs only the layers after the first changed one, `gradmap.runtime.prefix_cache`).

The first candidate is kept unless another is better on the held-out rows beyond their noise:
per row, the difference of mean next-token loss, and a switch needs a paired t statistic over
rows above 2 (`SWITCH_T`). A lower total alone is not enough: on SmolLM2 at 4 of 30 layers
GradMAP + projection led by 0.006 nats on 4 rows and had PPL 42.5 against 36.8.
Stronger signals were measured and are worse (bench/RESULTS.md "Would a stronger signal pick
better"): KL to the dense model, 16 more C4 rows, another domain's text and the dense model's
own samples all rank the two candidates level or GradMAP ahead at 4 layers, where WikiText-2
ranks GradMAP 12-17% worse; held-out KL would have switched on one seed out of three (t = 7.8).
The check separates candidates that are far apart, not close ones, so the first stays unless
the evidence is clear.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradmap.core import distributed
from gradmap.core.adapter import get_adapter
from gradmap.core.result import PruneResult
from gradmap.core.surgery import remove_layers
from gradmap.prune.compensation.base import PruneContext
from gradmap.prune.compensation.dense import DenseSnapshot, restore_dense_
from gradmap.prune.compensation.stats import lm_loss_sum
from gradmap.prune.pipeline import CANDIDATES, pipeline_name
from gradmap.prune.safeguard import split_holdout

__all__ = ["choose_pipeline"]

log = logging.getLogger(__name__)

Run = Callable[..., tuple[PruneResult, PruneContext]]

# a later candidate replaces the first only when its per-row held-out gain has a paired t above
# this (about a 95% one-sided test for the row counts used here): the first is the measured best
SWITCH_T = 2.0


def _row_losses(model: nn.Module, hold: torch.Tensor, batch_size: int | None) -> list[float]:
    """Mean next-token loss of every held-out row (summed over ranks when distributed)."""
    out = []
    for i in range(hold.shape[0]):
        nll, tokens = lm_loss_sum(model, hold[i:i + 1], batch_size or 1)
        nll, tokens = distributed.all_reduce_moments_([], [nll, tokens])
        out.append(nll / tokens)
    return out


def _paired_t(base: list[float], other: list[float]) -> float:
    """t statistic of the per-row gain base - other (positive: `other` is better)."""
    d = torch.tensor(base, dtype=torch.float64) - torch.tensor(other, dtype=torch.float64)
    if d.numel() < 2:
        return 0.0
    sd = float(d.std())
    mean = float(d.mean())
    if sd == 0.0:
        return float("inf") if mean > 0 else 0.0
    return mean / (sd / d.numel() ** 0.5)


def _snapshot(model: nn.Module) -> DenseSnapshot:
    ids = get_adapter(model).original_ids
    probe = PruneContext(model=model, calib=torch.empty(0, 0, dtype=torch.long), batch_size=1,
                         result=PruneResult("auto", "auto", []), dense_layer_ids=ids)
    return DenseSnapshot.take(probe)


def _changed_weights(ctx: PruneContext, snap: DenseSnapshot) -> dict[str, torch.Tensor]:
    """Dense name -> current value of every weight the pipeline changed."""
    names = snap.param_names(ctx)
    return {names[id(p)]: p.detach().clone() for p in ctx.model.parameters()
            if names[id(p)] in ctx.original_params}


@torch.no_grad()
def _apply(model: nn.Module, snap: DenseSnapshot, removed: list[int], weights: dict[str, torch.Tensor]) -> None:
    remove_layers(model, removed)
    probe = PruneContext(model=model, calib=torch.empty(0, 0, dtype=torch.long), batch_size=1,
                         result=PruneResult("auto", "auto", []))
    names = snap.param_names(probe)
    for p in model.parameters():
        value = weights.get(names[id(p)])
        if value is not None:
            p.data.copy_(value.to(p.device))


def choose_pipeline(run: Run, model: nn.Module, calib: torch.Tensor, n_prune: int, holdout: float,
                    **common: Any) -> PruneResult:
    """Run every candidate of `CANDIDATES` with `run` (the driver's one-pipeline function, with
    the safeguard on) and leave `model` pruned by the best on the held-out rows."""
    rows: list[dict[str, Any]] = []
    best: tuple[list[float], int, PruneResult, list[int], dict[str, torch.Tensor]] | None = None
    first: list[float] | None = None
    ctx = snap = None
    _, hold = split_holdout(calib, holdout)
    start = time.perf_counter()
    for i, cand in enumerate(CANDIDATES):
        if ctx is not None:
            restore_dense_(ctx, snap)
        snap = _snapshot(model)
        t0 = time.perf_counter()
        result, ctx = run(model, calib, n_prune, metric=cand["metric"], compensation=list(cand["compensation"]),
                          schedule=cand["schedule"], safeguard=True, holdout=holdout, **common,
                          **cand["metric_options"])
        rows.append({"pipeline": pipeline_name(cand), "removed_layers": list(result.removed_layers),
                     "holdout_loss": result.safeguard.get("final_loss"),
                     "plain_removal_loss": result.safeguard.get("plain_removal_loss"),
                     "reverted": list(result.safeguard.get("reverted", []))})
        if hold is None:  # nothing held out (a single calibration row): no basis to compare
            rows[-1]["note"] = "no held-out rows: the first candidate is kept"
            best = ([], i, result, list(result.removed_layers), {})
            rows[-1]["seconds"] = time.perf_counter() - t0
            break
        losses = _row_losses(model, hold, common.get("batch_size"))
        rows[-1]["seconds"] = time.perf_counter() - t0
        if first is None:
            first = losses
            best = (losses, i, result, list(result.removed_layers), _changed_weights(ctx, snap))
            continue
        t = _paired_t(first, losses)
        rows[-1]["paired_t_vs_first"] = t
        if t > SWITCH_T and sum(losses) < sum(best[0]):
            best = (losses, i, result, list(result.removed_layers), _changed_weights(ctx, snap))
    _, chosen, result, removed, weights = best
    if chosen != len(rows) - 1:  # the model holds the last candidate: go back to the best one
        restore_dense_(ctx, snap)
        _apply(model, snap, removed, weights)
    result.options["default_pipeline"] = True
    result.options["auto"] = {
        "chosen": rows[chosen]["pipeline"], "candidates": rows,
        "validation": f"held-out mean next-token loss on the last {result.options.get('n_holdout', 0)} "
                      f"calibration rows (used by no score and no fit); a later candidate replaces the "
                      f"first only with a paired t over rows above {SWITCH_T}"}
    result.timings["candidates"] = sum(r["seconds"] for r in rows)
    result.timings["total"] = time.perf_counter() - start
    log.info("default pipeline: kept %s (held-out loss %s) of %s", rows[chosen]["pipeline"],
             rows[chosen]["holdout_loss"], [(r["pipeline"], r["holdout_loss"]) for r in rows])
    return result
