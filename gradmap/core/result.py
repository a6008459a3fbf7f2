"""Result records returned by the pruning drivers (serialisable to report.json)."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PruneResult", "json_text", "finite_json"]

# phases every driver reports, in seconds (compensators add to the last three)
TIMING_PHASES = ("scoring", "removal", "compensation_statistics", "solve", "safeguard", "total")


@dataclass
class PruneResult:
    """What `fast_prune` did. All layer indices are ORIGINAL indices."""

    metric: str
    schedule: str
    compensation: list[str]
    removed_layers: list[int] = field(default_factory=list)
    # one dict per scoring pass: original layer index -> score (lowest is removed first)
    scores: list[dict[int, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in TIMING_PHASES})
    peak_memory_bytes: int = 0
    # Stage 2 mean-shift analysis: original layer index -> relative mean shift
    shifts: dict[int, float] = field(default_factory=dict)
    # per-compensator free-form report (placements, ridge, held-out loss before/after, reverts...)
    compensation_report: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    # the pipeline safeguard's held-out checks (gradmap.prune.safeguard); empty when it did not run
    safeguard: dict[str, Any] = field(default_factory=dict)
    # gradmap.heal's report when fast_prune(heal=...) healed the pruned model; empty otherwise
    heal: dict[str, Any] = field(default_factory=dict)

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    def compensation_summary(self) -> list[str]:
        """One plain line per compensator: what was applied and what was reverted or skipped."""
        lines = []
        reverted = self.safeguard.get("reverted", [])
        for name in self.compensation:
            rep = self.compensation_report.get(name)
            if name == "none":
                continue
            if name in reverted:
                why = next((e["reason"] for e in self.safeguard.get("stages", [])
                            if name in e["compensators"] and not e["kept"]), "")
                lines.append(f"{name}: reverted by the pipeline safeguard ({why})")
            elif not isinstance(rep, dict):
                lines.append(f"{name}: applied")
            elif rep.get("skipped"):
                lines.append(f"{name}: skipped ({rep['skipped']})")
            elif isinstance(rep.get("sites"), list):
                sites = rep["sites"]
                kept = [e.get("layer") for e in sites if e.get("folded")]
                line = f"{name}: applied at {len(kept)} of {len(sites)} site(s) {kept}"
                for e in sites:
                    if not e.get("folded"):
                        line += f"; NOT applied at layer {e.get('layer')} ({e.get('reason', 'reverted')})"
                lines.append(line)
            else:
                lines.append(f"{name}: applied")
        auto = self.options.get("auto")
        if auto:
            others = "; ".join(f"{c['pipeline']} {c['holdout_loss']:.4f}" for c in auto["candidates"]
                               if c["pipeline"] != auto["chosen"] and c["holdout_loss"] is not None)
            lines.append(f"default: kept {auto['chosen']} (held-out loss of the others: {others or 'none'})")
        if "final_loss" in self.safeguard:
            sg = self.safeguard
            lines.append(f"safeguard: held-out loss {sg['final_loss']:.4f} vs {sg['plain_removal_loss']:.4f} "
                         f"for the plain removal ({sg['holdout_samples']} held-out rows)")
        elif self.safeguard.get("skipped"):
            lines.append(f"safeguard: not run ({self.safeguard['skipped']})")
        if self.heal.get("summary"):
            lines.append(self.heal["summary"])
        return lines

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compensation_summary"] = self.compensation_summary()
        d["scores"] = [{str(k): v for k, v in s.items()} for s in self.scores]
        d["shifts"] = {str(k): v for k, v in self.shifts.items()}
        return d


def finite_json(value: Any) -> Any:
    """`value` with every NaN / infinity replaced by None, so json.dumps writes valid JSON (null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def json_text(value: Any, indent: int | None = 2) -> str:
    """Strict JSON text of `value`: NaN / infinity become null, unknown objects their str()."""
    return json.dumps(finite_json(value), indent=indent, default=str, allow_nan=False)
