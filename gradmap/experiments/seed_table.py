"""The multi-seed comparison table: per-pipeline means over seeds and paired differences.

Shared by `gradmap compare --seeds` and bench/seed_study_report.py: both turn their rows
into `SeedRun`s, and `summarize` + `markdown_seed_table` do the rest, so the two print the
same numbers the same way. Statistics: `gradmap.experiments.paired` (its docstring says
which test is used where and why).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gradmap.experiments.paired import (BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED, Interval, mean_se,
                                        mean_pairwise_jaccard, paired_bootstrap, paired_log_ppl)

__all__ = ["SeedRun", "summarize", "markdown_seed_table", "method_lines", "zero_shot_fields",
           "AVERAGES"]

DASH = "—"
# columns of task averages: label -> tasks left out (BoolQ's 62% majority-class floor hides
# damage: a model that always answers "yes" scores well on it)
AVERAGES = {"avg": (), "avg w/o boolq": ("boolq",)}


@dataclass
class SeedRun:
    """One pipeline on one calibration seed, in the form the table needs."""

    method: str
    seed: int
    ok: bool = True
    ppl: float | None = None
    task_values: dict[str, float] = field(default_factory=dict)   # task -> reported accuracy
    correct: dict[str, list[int]] = field(default_factory=dict)   # task -> 0/1 per example
    seconds: float | None = None
    ratio_to_floor: float | None = None
    removed_layers: list[int] | None = None
    lambada_acc: float | None = None                # LAMBADA, beside the averages
    lambada_ppl: float | None = None
    lambada_correct: list[int] | None = None        # 0/1 per text


def zero_shot_fields(zero_shot: dict[str, Any] | None) -> dict[str, Any]:
    """SeedRun's per-example fields from a `zero_shot(..., per_example=True)` result:
    `correct` (each averaged task's reported metric) and LAMBADA's accuracy, PPL and 0/1."""
    zero_shot = zero_shot or {}
    tasks = zero_shot.get("tasks") or {}
    out: dict[str, Any] = {"correct": {t: e["correct"][e["metric"]] for t, e in tasks.items()
                                       if "correct" in e}}
    lam = zero_shot.get("lambada_openai")
    if lam:
        out.update(lambada_acc=lam["acc"], lambada_ppl=lam["ppl"],
                   lambada_correct=(lam.get("correct") or {}).get("acc"))
    return out


def _average(run: SeedRun, leave_out: Sequence[str]) -> float | None:
    values = [v for t, v in run.task_values.items() if t not in leave_out]
    return sum(values) / len(values) if values else None


def _level(values: list[float | None]) -> dict[str, Any] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean, se = mean_se(values)
    return {"mean": mean, "se": se, "n": len(values)}


def _interval(iv: Interval | None) -> dict[str, Any] | None:
    return None if iv is None else {"estimate": iv.estimate, "low": iv.low, "high": iv.high,
                                    "n": iv.n, "verdict": iv.verdict, "method": iv.method}


def _paired(runs: dict[int, SeedRun], ref: dict[int, SeedRun]) -> dict[str, Any]:
    seeds = sorted(s for s in runs if s in ref and runs[s].ok and ref[s].ok)
    out: dict[str, Any] = {"seeds": seeds, "ppl": None}
    pp = [s for s in seeds if runs[s].ppl is not None and ref[s].ppl is not None]
    if pp:
        out["ppl"] = _interval(paired_log_ppl([runs[s].ppl for s in pp], [ref[s].ppl for s in pp]))
    for label, leave_out in AVERAGES.items():
        tasks = sorted(t for t in runs[seeds[0]].correct if t not in leave_out) if seeds else []
        tasks = [t for t in tasks if all(t in runs[s].correct and t in ref[s].correct
                                         for s in seeds)]
        # an average that leaves nothing out of a single task list would repeat "avg"
        if not tasks or (leave_out and not set(leave_out) & set(runs[seeds[0]].correct)):
            out[label] = None
            continue
        out[label] = _interval(paired_bootstrap(
            {t: [runs[s].correct[t] for s in seeds] for t in tasks},
            {t: [ref[s].correct[t] for s in seeds] for t in tasks}))
    lam = [s for s in seeds if runs[s].lambada_correct and ref[s].lambada_correct]
    out["lambada"] = _interval(paired_bootstrap(
        {"lambada_openai": [runs[s].lambada_correct for s in lam]},
        {"lambada_openai": [ref[s].lambada_correct for s in lam]})) if lam else None
    return out


def summarize(runs: list[SeedRun], methods: list[str] | None = None,
              reference: str | None = None) -> dict[str, Any]:
    """Per-method levels over seeds, paired differences from `reference`, selection overlap.

    `methods` fixes the row order (default: first appearance); `reference` defaults to the
    first method. Failed runs count in `failed` and are left out of every statistic.
    """
    methods = methods or list(dict.fromkeys(r.method for r in runs))
    reference = reference or methods[0]
    if reference not in methods:
        raise ValueError(f"reference {reference!r} is not among the methods {methods}")
    by = {m: {r.seed: r for r in runs if r.method == m} for m in methods}
    rows = []
    for m in methods:
        ok = [by[m][s] for s in sorted(by[m]) if by[m][s].ok]
        row: dict[str, Any] = {
            "method": m, "seeds": [r.seed for r in ok],
            "failed": sorted(s for s, r in by[m].items() if not r.ok),
            "ppl": _level([r.ppl for r in ok]),
            "seconds": _level([r.seconds for r in ok]),
            "ratio_to_floor": _level([r.ratio_to_floor for r in ok]),
            "removed_layers": {r.seed: r.removed_layers for r in ok},
            "jaccard": None}
        present = {t for r in ok for t in r.task_values}
        for label, leave_out in AVERAGES.items():
            # an average leaving out a task that was not evaluated would repeat "avg"
            row[label] = (_level([_average(r, leave_out) for r in ok])
                          if not leave_out or set(leave_out) & present else None)
        row["lambada"] = _level([r.lambada_acc for r in ok])
        row["lambada_ppl"] = _level([r.lambada_ppl for r in ok])
        sets = [r.removed_layers for r in ok if r.removed_layers is not None]
        overlap = mean_pairwise_jaccard(sets)
        if overlap is not None:
            row["jaccard"] = {"mean": overlap[0], "min": overlap[1], "seeds": len(sets)}
        row["vs_reference"] = None if m == reference else _paired(by[m], by[reference])
        rows.append(row)
    return {"reference": reference, "methods": rows,
            "tasks": sorted({t for r in runs for t in r.task_values}),
            "lambada": any(r.lambada_acc is not None for r in runs),
            "bootstrap": {"samples": BOOTSTRAP_SAMPLES, "seed": BOOTSTRAP_SEED}}


def _fmt(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    return format(value, fmt)


def _pm(level: dict | None, scale: float = 1.0, fmt: str = ".2f") -> str:
    if not level:
        return DASH
    text = _fmt(level["mean"] * scale, fmt)
    return text if level["se"] is None else f"{text} ± {_fmt(level['se'] * scale, fmt)}"


def _ppl_diff(iv: dict | None) -> str:
    if not iv:
        return DASH
    text = f"×{math.exp(iv['estimate']):.3f}"
    if iv["low"] is None:
        return text + " (1 seed)"
    mark = {"lower": "**better**", "higher": "**worse**"}.get(iv["verdict"], "tie")
    return f"{text} [{math.exp(iv['low']):.3f}, {math.exp(iv['high']):.3f}] {mark}"


def _acc_diff(iv: dict | None) -> str:
    if not iv:
        return DASH
    mark = {"higher": "**better**", "lower": "**worse**"}.get(iv["verdict"], "tie")
    return (f"{100 * iv['estimate']:+.2f} [{100 * iv['low']:+.2f}, {100 * iv['high']:+.2f}] "
            f"{mark}")


def markdown_seed_table(summary: dict[str, Any]) -> str:
    """One row per pipeline: levels (mean ± s.e. over seeds) and differences from the reference."""
    ref = summary["reference"]
    header = ["pipeline", "seeds", "PPL", f"PPL ratio vs {ref} [95%]"]
    for label in AVERAGES:
        header += [f"{label} %", f"Δ{label} pts [95%]"]
    lam = summary.get("lambada")
    if lam:  # beside the averages, never inside them
        header += ["LAMBADA %", "ΔLAMBADA pts [95%]", "LAMBADA PPL"]
    header += ["prune s", "× fwd+bwd", "Jaccard mean / min"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["methods"]:
        vs = row["vs_reference"] or {}
        is_ref = row["method"] == ref
        seeds = ",".join(map(str, row["seeds"])) or DASH
        if row["failed"]:
            seeds += f" (failed: {','.join(map(str, row['failed']))})"
        cells = [row["method"].replace("|", "\\|"), seeds, _pm(row["ppl"]),
                 "reference" if is_ref else _ppl_diff(vs.get("ppl"))]
        for label in AVERAGES:
            cells += [_pm(row[label], 100.0), "reference" if is_ref else _acc_diff(vs.get(label))]
        if lam:
            cells += [_pm(row.get("lambada"), 100.0),
                      "reference" if is_ref else _acc_diff(vs.get("lambada")),
                      _pm(row.get("lambada_ppl"))]
        jac = row["jaccard"]
        cells += [_pm(row["seconds"], fmt=".1f"), _pm(row["ratio_to_floor"]),
                  DASH if not jac else f"{jac['mean']:.2f} / {jac['min']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_lines(summary: dict[str, Any]) -> list[str]:
    """What every column means and how each interval was computed (printed under the table)."""
    b = summary["bootstrap"]
    return [
        "- levels: mean ± standard error over seeds (sample s.d./√n; no ± with one seed)",
        "- PPL ratio: exp(mean over seeds of log PPL − log PPL_reference), same calibration "
        "draw on both sides; 95% interval from Student t with n−1 dof over the paired seeds; "
        "no interval with one seed",
        f"- Δavg: task-averaged accuracy difference in points, 95% paired bootstrap over examples "
        f"(stratified per task, same draw for every seed, averaged over seeds; {b['samples']} "
        f"resamples, RNG seed {b['seed']})",
        "- **better** / **worse**: the 95% interval excludes 0 (ratio 1 for PPL); tie: it does not",
        "- avg w/o boolq: the same average without BoolQ, whose majority-class rate is high",
        *(["- LAMBADA (lm-eval lambada_openai; not in either average): last-word accuracy and "
           "PPL = exp(−mean log p(word)), mean ± s.e. over seeds; ΔLAMBADA: paired bootstrap "
           "over texts as Δavg"] if summary.get("lambada") else []),
        "- × fwd+bwd: pruning seconds / one forward+backward over that seed's calibration set",
        "- Jaccard: |A∩B|/|A∪B| of the removed-layer sets, mean and min over pairs of seeds "
        "(1.00: every seed removed the same layers)",
    ]
