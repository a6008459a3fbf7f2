"""The pipeline safeguard: no compensation may leave the model worse than the plain removal.

Every compensator has a mechanism that can fail on a model nobody measured (a magnitude scale
that overshoots on a post-norm family, a linear map fitted on too few rows). The driver holds
out calibration rows that no score and no fit sees, and after the removals and after each
compensator's `finalize` it compares the held-out mean next-token loss with the best state so
far, starting from the plain removal (same layers removed, every compensated weight at its
original value). A stage that does not lower it is reverted on the spot, so what follows is
fitted on the model that is actually kept. Stages: "removals" (every edit made around the
removals, e.g. magnitude compensation or an `each_step` fold) and one per compensator's
`finalize`. Cost: one forward of the held-out rows for the plain removal and one per stage
that edited a weight.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from gradmap.core import distributed
from gradmap.core.errors import GradmapError
from gradmap.prune.compensation.base import PruneContext
from gradmap.prune.compensation.dense import DenseSnapshot
from gradmap.prune.compensation.stats import lm_loss_sum

__all__ = ["split_holdout", "PipelineSafeguard"]

log = logging.getLogger(__name__)


def split_holdout(calib: torch.Tensor, holdout: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows for scoring and fitting, held-out rows); the last rows are held out, at least one.

    With a single row nothing can be held out and the safeguard does not run.
    """
    if not isinstance(holdout, float) or not 0.0 < holdout < 1.0:
        raise GradmapError(f"holdout is the fraction of calibration rows the pipeline safeguard keeps out "
                           f"of scoring and fitting, in (0, 1); got {holdout!r}")
    n = calib.shape[0]
    if n < 2:
        return calib, None
    n_hold = min(n - 1, max(1, round(n * holdout)))
    return calib[:n - n_hold], calib[n - n_hold:]


def _params_by_dense_name(ctx: PruneContext, snap: DenseSnapshot) -> dict[str, nn.Parameter]:
    names = snap.param_names(ctx)
    return {names[id(p)]: p for p in ctx.model.parameters()}


@contextmanager
def _swapped(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> Iterator[None]:
    saved = []
    try:
        for name, value in values.items():
            if name in params:
                p = params[name]
                saved.append((p, p.data))
                p.data = value.to(p.device)
        yield
    finally:
        for p, data in saved:
            p.data = data


@torch.no_grad()
def _restore_(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    for name, value in values.items():
        if name in params:
            params[name].data.copy_(value.to(params[name].device))


class PipelineSafeguard:
    """Held-out checks around the compensators of one `fast_prune` call (module docstring)."""

    def __init__(self, ctx: PruneContext, hold: torch.Tensor):
        self.ctx, self.hold = ctx, hold
        self.snap = DenseSnapshot.take(ctx)
        self.best: float | None = None
        self.report: dict = {"holdout_samples": int(hold.shape[0]), "stages": [], "reverted": []}
        ctx.result.safeguard = self.report

    def _loss(self) -> float:
        t0 = time.perf_counter()
        nll, tokens = lm_loss_sum(self.ctx.model, self.hold, self.ctx.batch_size, self.ctx.progress)
        nll, tokens = distributed.all_reduce_moments_([], [nll, tokens])
        self.ctx.result.add_time("safeguard", time.perf_counter() - t0)
        return nll / tokens

    def _judge(self, stage: str, owners: list[str], before: dict[str, torch.Tensor]) -> None:
        """Keep the stage that produced the current weights only if it lowered the held-out loss."""
        if not before:
            return
        params = _params_by_dense_name(self.ctx, self.snap)
        if self.best is None:  # the plain removal: every compensated weight at its original value
            with _swapped(params, self.ctx.original_params):
                self.best = self.report["plain_removal_loss"] = self._loss()
        loss = self._loss()
        entry = {"stage": stage, "compensators": owners, "loss_before": self.best, "loss_with": loss}
        if torch.isfinite(torch.tensor(loss)) and loss < self.best:
            entry["kept"] = True
            self.best = loss
        else:
            entry["kept"] = False
            entry["reason"] = (f"held-out loss {loss:.4f} with it, {self.best:.4f} without: reverted")
            _restore_(params, before)
            # a kept weight back at its original value is no longer edited; a removed layer's weights
            # left with their module as they were, so their originals stay for the dense path
            for name, value in before.items():
                orig = self.ctx.original_params.get(name)
                if name in params and orig is not None and torch.equal(orig, value):
                    del self.ctx.original_params[name]
            self.report["reverted"].extend(o for o in owners if o not in self.report["reverted"])
            log.warning("safeguard: %s (%s) reverted: held-out loss %.4f with it, %.4f without",
                        stage, ", ".join(owners), loss, self.best)
        self.report["stages"].append(entry)
        self.report["final_loss"] = self.best

    def after_removals(self, owners: list[str]) -> None:
        """Judge every edit made around the removals (against the plain removal)."""
        self._judge("removals", owners, dict(self.ctx.original_params))

    @contextmanager
    def finalize_stage(self, name: str) -> Iterator[None]:
        """Journal the values `name`'s finalize overwrites, then judge what it did."""
        self.ctx.journal = {}
        try:
            yield
            before = self.ctx.journal
        finally:
            self.ctx.journal = None
        self._judge(f"{name}.finalize", [name], before)
