"""The per-removal record of a compensator that solves and folds after every removal (`each_step`).

Each removal gets one step entry in the compensation report: the removed layer, the block of
removed layers it now belongs to, the report the solve wrote (sites, ridge, held-out checks,
reverts) and the seconds it added to each timing phase. A fold lives in the weights of its
site's layer, so when a later step removes that layer the fold leaves with it: the step that
folded it is marked (`fold_removed_at_step`), and the summary `finalize` writes counts it as
no longer applied.
"""
from __future__ import annotations

from typing import Any

from gradmap.core.result import PruneResult

__all__ = ["StepLog", "block_of"]

# the timing phases a compensator adds to (core/result.py TIMING_PHASES)
STEP_PHASES = ("compensation_statistics", "solve")


def block_of(blocks: list[list[int]], idx: int) -> list[int]:
    """The block of removed layers (ORIGINAL ids, dense order) that holds `idx`."""
    return next(b for b in blocks if idx in b)


class StepLog:
    """Step entries written into `report["steps"]` as they happen, so a failed run shows its progress."""

    def __init__(self, report: dict[str, Any]):
        report["each_step"] = True
        self.steps: list[dict[str, Any]] = report.setdefault("steps", [])
        self._held: dict[int, list[dict[str, Any]]] = {}   # layer -> site entries folded into it
        self._before: dict[str, float] = {}

    def start(self, idx: int, result: PruneResult) -> dict[str, Any]:
        step: dict[str, Any] = {"step": len(self.steps) + 1, "removed": idx}
        dropped = self._held.pop(idx, [])
        for e in dropped:
            e["fold_removed_at_step"] = step["step"]
        if dropped:
            step["dropped_folds_from_steps"] = [e["step"] for e in dropped]
        self._before = {k: result.timings.get(k, 0.0) for k in STEP_PHASES}
        return step

    def finish(self, step: dict[str, Any], result: PruneResult) -> None:
        step["seconds"] = {k: result.timings.get(k, 0.0) - self._before[k] for k in STEP_PHASES}
        for e in step.get("sites", []):
            e["step"] = step["step"]
            if e["folded"]:
                self._held.setdefault(e["layer"], []).append(e)
        self.steps.append(step)

    def summarise(self, report: dict[str, Any]) -> None:
        """Top-level `sites` (every step's, as `PruneResult.compensation_summary` reads them), reverts, fallbacks."""
        if not self.steps:
            report["skipped"] = "no layer was removed"
            return
        sites = []
        for e in (e for s in self.steps for e in s.get("sites", [])):
            view = dict(e)
            if "fold_removed_at_step" in e:
                view["folded"] = False
                view["reason"] = (f"folded at step {e['step']}; layer {e['layer']} was removed at step "
                                  f"{e['fold_removed_at_step']}, its fold with it")
            sites.append(view)
        report["sites"] = sites
        report["reverted"] = [layer for s in self.steps for layer in s.get("reverted", [])]
        report["solver_fallbacks"] = sum(s.get("solver_fallbacks", 0) for s in self.steps)
