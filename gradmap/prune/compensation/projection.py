"""GradMAP Stage 2: mean-shift-guided projection compensation (one closed-form solve per site).

After the last removal (`finalize`):

1. Mean-shift analysis: stream the calibration set through the pruned model; for every
   kept layer o, shift_o = ‖μ_pruned(o) − μ_dense(o)‖ / ‖μ_dense(o)‖, where μ is the mean
   output hidden state and the dense mean is taken at the same ORIGINAL layer
   (ctx.dense_means when the driver recorded them). All shifts go to result.shifts.
2. Sites: the `top_m` kept layers with the largest shift, plus (per_gap=True) the kept
   layer just before each removed block.
3. At each site p, with M its MLP output, Y the residual stream just before the MLP add
   and T the dense hidden state at the same original position, solve
       P = argmin Σ_t ‖M_t P + Y_t − T_t‖² + λ‖P − I‖²_F
         ⇔ (MᵀM + λI) P = Mᵀ(T − Y) + λI,   λ = ridge · tr(MᵀM)/d,
   every site in one batched fp64 solve (`gradmap.ops.projection_solve`). Families with a
   post-feed-forward norm solve for a diagonal P (the same system on diagonal statistics).
4. Fold P into W_down (or the post-feed-forward norm), see `fold.fold_projection_`.
5. Safeguards: a held-out slice of the calibration set picks the ridge from `ridge_grid`
   per site by held-out regression loss (computed from held-out moments: no extra forward),
   a site is folded only if that loss drops below the identity's, and then (sites one at a
   time, in order) kept only if the held-out mean next-token NLL drops too; otherwise the
   fold is reverted and the report says so.

`each_step=True` runs steps 1–5 after every removal instead (`after_removal`), on the model as
it is then (earlier folds in place) against the same DENSE targets, so a re-solve at a site
folded before is a correction, not a double count, and an iterative schedule re-scores the
repaired model (the Prune&Comp loop). Placement per step: per_gap adds only the site of the
block that removal created or grew; the `top_m` sites are the same selection rerun, i.e. the
kept layers with the largest mean shift on the current model, wherever they are (a removal
moves every layer after it, and a site tied to the new gap alone would be a layer this removal
did not move). A fold held by a layer removed later leaves with it (`steps.StepLog`);
`finalize` then folds nothing.

ReplaceMe (Shopkhoev et al. 2025) is the same solver configured differently, see replaceme.py.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from gradmap.core import distributed
from gradmap.core.errors import GradmapError
from gradmap.ops import projection_solve
from gradmap.prune.compensation.base import Compensator, PruneContext
from gradmap.prune.compensation.fold import diagonal_only, fold_projection_
from gradmap.prune.compensation.dense import DenseSnapshot
from gradmap.prune.compensation.sites import Site, SiteMoments, StreamStats, merge_means
from gradmap.prune.compensation.stats import lm_loss_sum, stream_statistics
from gradmap.prune.compensation.steps import StepLog, block_of

__all__ = ["ProjectionCompensation", "solve_sites", "regression_loss", "removed_blocks", "mean_shifts",
           "DEFAULT_RIDGE", "DEFAULT_RIDGE_GRID"]


DEFAULT_RIDGE = 1e-3
DEFAULT_RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# far above it the solve already returns the identity (no correction); inf made NaN weights
MAX_RIDGE = 1e6


def removed_blocks(dense_ids: Sequence[int], kept_ids: Sequence[int]) -> list[list[int]]:
    """Maximal runs of removed layers, in dense order (ORIGINAL ids)."""
    kept, blocks, run = set(kept_ids), [], []
    for i in dense_ids:
        if i in kept:
            if run:
                blocks.append(run)
            run = []
        else:
            run.append(i)
    if run:
        blocks.append(run)
    return blocks


def mean_shifts(pruned: dict[int, torch.Tensor], dense: dict[int, torch.Tensor]) -> dict[int, float]:
    """shift_o = ‖μ_pruned(o) − μ_dense(o)‖ / ‖μ_dense(o)‖ for every layer o in `pruned`."""
    out = {}
    for o, mu in pruned.items():
        ref = dense[o].to(mu.device, torch.float32)
        out[o] = float((mu.float() - ref).norm() / ref.norm().clamp_min(torch.finfo(torch.float32).tiny))
    return out


def solve_sites(moments: Sequence[SiteMoments], ridge: float, diagonal: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched closed-form Stage 2 solve: (MᵀM + λI) P = Mᵀ(T − Y) + λI, λ = ridge·tr(MᵀM)/d.

    With `diagonal` the system keeps only the diagonals of MᵀM and Mᵀ(T − Y), which gives
    the exact minimiser over diagonal P: p_j = (Σ M_j(T − Y)_j + λ) / (Σ M_j² + λ).
    Returns (P [S, d, d] fp64, solver status [S]: 1 where the eigen-decomposition fallback ran).
    """
    a = torch.stack([m.mr.xtx for m in moments]).double()
    b = torch.stack([m.mr.xty for m in moments]).double()
    if diagonal:
        a = torch.diag_embed(a.diagonal(dim1=-2, dim2=-1))
        b = torch.diag_embed(b.diagonal(dim1=-2, dim2=-1))
    return projection_solve(a, b, ridge)


def regression_loss(p: torch.Tensor, moments: Sequence[SiteMoments]) -> torch.Tensor:
    """Σ_t ‖M_t P + Y_t − T_t‖² per site from moments: tr(PᵀAP) − 2 tr(PᵀB) + Σ‖T − Y‖²."""
    a = torch.stack([m.mr.xtx for m in moments]).double().to(p.device)
    b = torch.stack([m.mr.xty for m in moments]).double().to(p.device)
    c = torch.stack([m.r.sq_x.sum() for m in moments]).double().to(p.device)
    return ((a @ p) * p).sum((-2, -1)) - 2 * (b * p).sum((-2, -1)) + c


def _dedupe(sites: Sequence[Site]) -> list[Site]:
    return list(dict.fromkeys(sites))


class ProjectionCompensation(Compensator):
    """`compensation="projection"`: GradMAP Stage 2 (see the module docstring)."""

    name = "projection"
    needs = frozenset({"layer_io", "weights"})
    needs_dense_means = True
    uses_shifts = True

    def __init__(self, top_m: int = 1, per_gap: bool = False, ridge: float | None = None,
                 ridge_grid: Sequence[float] = DEFAULT_RIDGE_GRID, holdout: float = 0.125,
                 safeguards: bool = True, max_stat_bytes: int = 2 ** 31, each_step: bool = False):
        if isinstance(top_m, bool) or not isinstance(top_m, int) or top_m < 0:
            raise GradmapError(f"top_m must be a non-negative integer, got {top_m!r}")
        if top_m == 0 and not per_gap:
            raise GradmapError("top_m=0 with per_gap=False places no projection; set top_m >= 1 or per_gap=True")
        grid = (ridge,) if ridge is not None else tuple(ridge_grid)
        if not grid or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= MAX_RIDGE
                           for r in grid):
            raise GradmapError(f"ridge values must be numbers in [0, {MAX_RIDGE:g}], got {grid!r}")
        for name, value in (("per_gap", per_gap), ("safeguards", safeguards)):
            if not isinstance(value, bool):  # 'False' (a string) would count as True
                raise GradmapError(f"{name} must be True or False (unquoted), got {value!r}")
        if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0.0 < holdout < 1.0:
            raise GradmapError(f"holdout is the held-out fraction of the calibration set, in (0, 1); got {holdout!r}")
        if isinstance(max_stat_bytes, bool) or not isinstance(max_stat_bytes, int) or max_stat_bytes < 0:
            # 0 is meaningful: never hold every site's moments at once (two statistics passes)
            raise GradmapError(f"max_stat_bytes must be a non-negative integer, got {max_stat_bytes!r}")
        if not isinstance(each_step, bool):
            raise GradmapError(f"each_step must be True (solve and fold after every removal) or False "
                               f"(once, after the last), got {each_step!r}")
        self.top_m, self.per_gap, self.ridge_grid = top_m, per_gap, grid
        self.holdout, self.safeguards, self.max_stat_bytes = holdout, safeguards, max_stat_bytes
        self.each_step = each_step
        self.snapshot: DenseSnapshot | None = None
        self.steps: StepLog | None = None

    # --- placement -------------------------------------------------------------------------
    def _gap_target(self, before: int, block: list[int]) -> int:
        """Stage 2 compares a kept layer with the dense model at the same original position."""
        return before

    def _gap_sites(self, blocks: list[list[int]], dense_ids: list[int]) -> tuple[list[Site], list[int]]:
        sites, skipped = [], []
        for block in blocks:
            start = dense_ids.index(block[0])
            if start == 0:  # no kept layer before the block: nothing to fold into
                skipped.append(block[0])
                continue
            before = dense_ids[start - 1]
            sites.append(Site(before, self._gap_target(before, block)))
        return sites, skipped

    # --- hooks -----------------------------------------------------------------------------
    def begin(self, ctx: PruneContext) -> None:
        self.snapshot = DenseSnapshot.take(ctx)
        self.steps = StepLog(ctx.result.compensation_report.setdefault(self.name, {})) if self.each_step else None

    def after_removal(self, ctx: PruneContext, idx: int) -> None:
        if not self.each_step:
            return
        if self.snapshot is None or self.steps is None:
            raise GradmapError(f"{self.name}: after_removal() ran without begin(); call begin(ctx) on the dense "
                               "model first")
        step = self.steps.start(idx, ctx.result)
        ctx.result.shifts.pop(idx, None)    # the layer is gone: its last shift describes nothing now
        kept = ctx.adapter.original_ids
        step["block"] = block_of(removed_blocks(self.snapshot.layer_ids, kept), idx)
        self._compensate(ctx, [step["block"]], step)
        if self.uses_shifts:
            step["shifts"] = {o: ctx.result.shifts[o] for o in kept if o in ctx.result.shifts}
        self.steps.finish(step, ctx.result)

    def _split(self, calib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # split the GLOBAL rows (the last ones are held out); each slice is sharded over ranks
        # only inside the streaming passes, so the split is the single-process one
        n = calib.shape[0]
        if not self.safeguards or n < 2:
            return calib, None
        n_hold = min(n - 1, max(1, round(n * self.holdout)))
        return calib[:n - n_hold], calib[n - n_hold:]

    def finalize(self, ctx: PruneContext) -> None:
        if self.snapshot is None:
            raise GradmapError(f"{self.name}: finalize() ran without begin(); call begin(ctx) on the dense model first")
        snap, report = self.snapshot, ctx.result.compensation_report.setdefault(self.name, {})
        if self.steps is not None:  # every gap was solved and folded when it was made
            self.steps.summarise(report)
            return
        blocks = removed_blocks(snap.layer_ids, ctx.adapter.original_ids)
        if not blocks:
            report["skipped"] = "no layer was removed"
            return
        self._compensate(ctx, blocks, report)

    def _compensate(self, ctx: PruneContext, blocks: list[list[int]], report: dict) -> None:
        """Statistics, placement, solve, safeguards and fold for the gap sites of `blocks`."""
        snap, kept = self.snapshot, ctx.adapter.original_ids
        train, hold = self._split(ctx.calib)
        report.update(n_train_samples=int(train.shape[0]), n_holdout_samples=0 if hold is None else int(hold.shape[0]))
        if hold is None and self.safeguards:
            report["note"] = "safeguards off: the calibration set has a single sample, nothing to hold out"
        t0 = time.perf_counter()
        gap_sites, skipped = self._gap_sites(blocks, snap.layer_ids)
        if skipped:
            report["skipped_blocks_starting_at"] = skipped
        sites = gap_sites if self.per_gap else []
        tr, ho = self._collect(ctx, train, hold, sites, kept, report)
        if self.uses_shifts:
            sites = _dedupe(self._top_sites(ctx, kept, tr, ho) + sites)
            if any(s not in tr.sites for s in sites):  # two-pass mode: shifts first, then the picked sites
                tr, ho = self._collect(ctx, train, hold, sites, [], report)
        ctx.result.add_time("compensation_statistics", time.perf_counter() - t0)
        if not sites:
            report["sites"] = []
            return
        self._solve_and_fold(ctx, sites, tr, ho, hold, report)

    # --- statistics ------------------------------------------------------------------------
    def _collect(self, ctx: PruneContext, train: torch.Tensor, hold: torch.Tensor | None,
                 sites: list[Site], kept: list[int], report: dict) -> tuple[StreamStats, StreamStats | None]:
        """Stream the train and held-out slices; with `kept`, also the per-layer means for shifts."""
        mean_layers, dense_layers = [], []
        if self.uses_shifts and kept:
            mean_layers = kept
            dm = ctx.dense_means
            dense_layers = [] if dm is not None and all(o in dm for o in kept) else kept
            if self.top_m > 0:  # the picks are unknown until the means are in: collect every candidate
                d = ctx.model.config.hidden_size
                per_site = 2 * d * d * 4 * (2 if hold is not None else 1)
                one_pass = len(kept) * per_site <= self.max_stat_bytes
                report["statistics_passes"] = 1 if one_pass else 2
                sites = _dedupe(sites + [Site(o, o) for o in kept]) if one_pass else []
        tr = stream_statistics(ctx, self.snapshot, train, mean_layers, dense_layers, sites)
        ho = None if hold is None else stream_statistics(ctx, self.snapshot, hold, mean_layers, dense_layers,
                                                         sites, with_lm_loss=bool(sites))
        return tr, ho

    def _top_sites(self, ctx: PruneContext, kept: list[int], tr: StreamStats, ho: StreamStats | None) -> list[Site]:
        parts = [tr.pruned_means] + ([ho.pruned_means] if ho is not None else [])
        pruned = merge_means(*parts)
        if tr.dense_means:
            dense = merge_means(tr.dense_means, *([ho.dense_means] if ho is not None else []))
        else:
            dense = {o: ctx.dense_means[o] for o in kept}
        shifts = mean_shifts(pruned, dense)
        ctx.result.shifts.update(shifts)
        ranked = sorted(kept, key=lambda o: (-shifts[o], o))
        return [Site(o, o) for o in ranked[:self.top_m]]

    # --- solve, safeguards, fold -----------------------------------------------------------
    def _solve_and_fold(self, ctx: PruneContext, sites: list[Site], tr: StreamStats,
                        ho: StreamStats | None, hold: torch.Tensor | None, report: dict) -> None:
        t0 = time.perf_counter()
        diagonal = diagonal_only(ctx.adapter)
        train_m = [tr.sites[s] for s in sites]
        grid = self.ridge_grid if ho is not None or len(self.ridge_grid) == 1 else (DEFAULT_RIDGE,)
        solves = [solve_sites(train_m, r, diagonal) for r in grid]
        d = ctx.model.config.hidden_size
        eye = torch.eye(d, dtype=torch.float64, device=train_m[0].mr.xtx.device)
        train_id = regression_loss(eye.expand(len(sites), d, d), train_m)
        if ho is not None:
            hold_m = [ho.sites[s] for s in sites]
            losses = torch.stack([regression_loss(p, hold_m) for p, _ in solves])   # [grid, S]
            best = losses.argmin(0)
            hold_id = regression_loss(eye.expand(len(sites), d, d), hold_m)
        else:
            best = torch.zeros(len(sites), dtype=torch.long)
        entries, chosen = [], []
        for k, s in enumerate(sites):
            g = int(best[k])
            p, status = solves[g][0][k], int(solves[g][1][k])
            train_after = float(regression_loss(p[None], [train_m[k]])[0])
            e = {"layer": s.layer, "target": s.target, "ridge": grid[g], "diagonal": diagonal,
                 "solver_fallback": bool(status),
                 "train_mse_before": float(train_id[k]) / (train_m[k].mr.count * d),
                 "train_mse_after": train_after / (train_m[k].mr.count * d)}
            keep = True
            if ho is not None:
                n_h = ho.sites[s].mr.count * d
                e["holdout_mse_before"] = float(hold_id[k]) / n_h
                e["holdout_mse_after"] = float(losses[g, k]) / n_h
                keep = bool(losses[g, k] < hold_id[k])
            e["folded"] = keep
            if not keep:
                e["reason"] = "held-out regression loss did not drop"
            entries.append(e)
            if keep:
                chosen.append((s, p, e))
        report["sites"] = entries
        report["solver_fallbacks"] = sum(e["solver_fallback"] for e in entries)
        ctx.result.add_time("solve", time.perf_counter() - t0)
        if ho is None:
            for s, p, _e in chosen:
                self._fold(ctx, s, p)
        else:
            self._fold_if_lm_drops(ctx, hold, ho.nll / ho.tokens, chosen, report)
        # one logger per compensator name: "gradmap.replaceme: ..." for the subclass, and no
        # "projection: projection:" when the CLI prints the logger name before the message
        logging.getLogger(f"gradmap.{self.name}").info(
            "folded %d of %d sites %s", sum(e["folded"] for e in entries), len(entries),
            [(e["layer"], e["target"]) for e in entries if e["folded"]])

    def _fold(self, ctx: PruneContext, site: Site, p: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fold P at `site`; returns (parameter, value before) pairs to revert it."""
        backups = []

        def before_edit(params):
            self.snapshot.remember(ctx, params)
            backups.extend((t, t.detach().clone()) for t in params)

        fold_projection_(ctx.adapter, ctx.adapter.position_of(site.layer), p, before_edit)
        return backups

    @torch.no_grad()
    def _fold_if_lm_drops(self, ctx: PruneContext, hold: torch.Tensor, before: float,
                          chosen: list[tuple[Site, torch.Tensor, dict]], report: dict) -> None:
        """Fold the sites one at a time, keeping each only if the held-out mean next-token NLL drops."""
        best = report["holdout_lm_loss_before"] = before
        reverted = []
        for site, p, e in chosen:
            backups = self._fold(ctx, site, p)
            t0 = time.perf_counter()
            nll, tokens = lm_loss_sum(ctx.model, hold, ctx.batch_size, ctx.progress)
            nll, tokens = distributed.all_reduce_moments_([], [nll, tokens])
            ctx.result.add_time("compensation_statistics", time.perf_counter() - t0)
            e["holdout_lm_loss_with_fold"] = loss = nll / tokens
            if loss < best:
                best = loss
                continue
            for t, old in reversed(backups):
                t.data.copy_(old)
            e["folded"], e["reason"] = False, "reverted: held-out LM loss did not drop"
            reverted.append(site.layer)
            # INFO, not WARNING: the safeguard doing its job is a normal outcome, not a failure;
            # the reason stays in the report and in PruneResult.compensation_summary()
            logging.getLogger(f"gradmap.{self.name}").info(
                "fold at layer %d reverted (held-out LM loss %.4f -> %.4f)", site.layer, best, loss)
        report["holdout_lm_loss_after"] = best
        report["reverted"] = reverted
