"""The default pipeline chosen per model: run each candidate, keep the one the held-out rows prefer.

No pipeline wins on every model: block influence (iterative) + magnitude + ReplaceMe is the best
measured on SmolLM2 and 36% worse than GradMAP + projection on a Gemma-3 model. So the default
runs the candidates one after the other on the same model object (restoring the dense model in
between from the removed layers and original weights the driver keeps, so no second copy of the
model is held) and keeps the one whose held-out mean next-token loss is lowest. The held-out
rows are the pipeline safeguard's (`gradmap.prune.safeguard`): no score and no fit of any
candidate sees them, and every candidate is already no worse than its own plain removal there.
Memory: the weights the best candidate so far changed (a copy), while the next one runs.
Cost: the sum of the candidates' costs (nothing is shared between them yet).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradmap.core.adapter import get_adapter
from gradmap.core.result import PruneResult
from gradmap.core.surgery import remove_layers
from gradmap.prune.compensation.base import PruneContext
from gradmap.prune.compensation.dense import DenseSnapshot, restore_dense_
from gradmap.prune.pipeline import CANDIDATES, pipeline_name

__all__ = ["choose_pipeline"]

log = logging.getLogger(__name__)

Run = Callable[..., tuple[PruneResult, PruneContext]]


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
    best: tuple[float, int, PruneResult, list[int], dict[str, torch.Tensor]] | None = None
    ctx = snap = None
    start = time.perf_counter()
    for i, cand in enumerate(CANDIDATES):
        if ctx is not None:
            restore_dense_(ctx, snap)
        snap = _snapshot(model)
        t0 = time.perf_counter()
        result, ctx = run(model, calib, n_prune, metric=cand["metric"], compensation=list(cand["compensation"]),
                          schedule=cand["schedule"], safeguard=True, holdout=holdout, **common,
                          **cand["metric_options"])
        loss = result.safeguard.get("final_loss")
        rows.append({"pipeline": pipeline_name(cand), "removed_layers": list(result.removed_layers),
                     "holdout_loss": loss, "plain_removal_loss": result.safeguard.get("plain_removal_loss"),
                     "reverted": list(result.safeguard.get("reverted", [])),
                     "seconds": time.perf_counter() - t0})
        if loss is None:  # nothing held out (a single calibration row): no basis to compare
            rows[-1]["note"] = "no held-out rows: the first candidate is kept"
            best = (float("inf"), i, result, list(result.removed_layers), {})
            break
        if best is None or loss < best[0]:
            best = (loss, i, result, list(result.removed_layers), _changed_weights(ctx, snap))
    _, chosen, result, removed, weights = best
    if chosen != len(rows) - 1:  # the model holds the last candidate: go back to the best one
        restore_dense_(ctx, snap)
        _apply(model, snap, removed, weights)
    result.options["default_pipeline"] = True
    result.options["auto"] = {
        "chosen": rows[chosen]["pipeline"], "candidates": rows,
        "validation": f"held-out mean next-token loss on the last {result.options.get('n_holdout', 0)} "
                      "calibration rows (used by no score and no fit)"}
    result.timings["candidates"] = sum(r["seconds"] for r in rows)
    result.timings["total"] = time.perf_counter() - start
    log.info("default pipeline: kept %s (held-out loss %s) of %s", rows[chosen]["pipeline"],
             rows[chosen]["holdout_loss"], [(r["pipeline"], r["holdout_loss"]) for r in rows])
    return result
