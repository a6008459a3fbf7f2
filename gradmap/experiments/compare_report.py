"""Writing a `gradmap compare` run: results.md (tables), results.json and two PNG plots.

Every file is written to a temporary sibling and renamed into place, so an interrupt never
leaves a half-written result; `write_results` is called after every method.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from gradmap.core.checkpoint import write_file_atomic
from gradmap.core.result import json_text
from gradmap.evaluate.intervals import accuracy_text, wilson_interval
from gradmap.evaluate.tasks import PROBE_NAMES
from gradmap.experiments.compare_speed import speed_markdown

__all__ = ["write_results", "markdown_table", "settings_lines", "accuracy_standard_errors",
           "plot_ppl_vs_time", "plot_layer_scores", "fewest_examples", "small_sample",
           "wilson_interval", "lambada_cells", "SMALL_SAMPLE"]

DASH = "—"
# Fewer examples per task than this and per-task accuracies and retention are not shown: at
# n = 100 a task's 95% interval is already about ±10 points, at n = 3 it spans most of [0, 100].
SMALL_SAMPLE = 100


def _atomic_write(path: Path, data: bytes) -> None:
    write_file_atomic(path, data)


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    return format(value, fmt)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def accuracy_standard_errors(zero_shot: dict[str, Any]) -> tuple[dict[str, float], float] | None:
    """Binomial standard errors (in points) of a zero-shot result, so readers see the noise.

    Per task se_t = 100·sqrt(p_t(1-p_t)/n_t) with p_t the reported accuracy on n_t examples;
    for the unweighted task average se = sqrt(Σ se_t²)/T (tasks are independent samples).
    A difference between two methods is about √2·se noise when both are evaluated on the same
    examples with uncorrelated errors (an upper bound: their errors are positively correlated).
    None when there is no per-task count.
    """
    tasks = zero_shot.get("tasks") or {}
    per_task = {}
    for name, t in tasks.items():
        n, p = t.get("n"), t.get("value")
        if not n or p is None:
            return None
        per_task[name] = 100.0 * math.sqrt(p * (1.0 - p) / n)
    if not per_task:
        return None
    return per_task, math.sqrt(sum(v * v for v in per_task.values())) / len(per_task)


def fewest_examples(zero_shot: dict[str, Any] | None) -> int | None:
    """The smallest per-task example count of a zero-shot result (None without counts)."""
    counts = [t.get("n") for t in ((zero_shot or {}).get("tasks") or {}).values()]
    return min(counts) if counts and all(isinstance(n, int) for n in counts) else None


def small_sample(zero_shot: dict[str, Any] | None) -> bool:
    """True when some task has fewer than `SMALL_SAMPLE` examples (or the counts are unknown)."""
    n = fewest_examples(zero_shot)
    return n is None or n < SMALL_SAMPLE


def _pooled_n(zero_shot: dict[str, Any] | None) -> int:
    return sum(t.get("n") or 0 for t in ((zero_shot or {}).get("tasks") or {}).values())


def settings_lines(results: dict[str, Any]) -> list[str]:
    """Human-readable settings, stated above the table (what every number was measured on)."""
    s = results["settings"]
    lines = [f"# gradmap compare: {s['model']}, {s['n_prune']} of "
             f"{results.get('dense_layers', '?')} layers removed", ""]
    shape = s.get("calib_shape") or [s["n_calib"], s["seq_len"]]
    lines.append(f"- calibration: {s['calib']}, {shape[0]} x {shape[1]} tokens (seed {s['seed']}), "
                 f"micro-batch {s['batch_size']}; protected layers: first {s['protect_first']}, "
                 f"last {s['protect_last']}; dtype {s['dtype'] or 'checkpoint'}, "
                 f"device {s['device']}")
    dense = results.get("dense") or {}
    ppl = dense.get("ppl_report")
    if ppl:
        scope = (f"first {ppl['windows']} windows only (--ppl-windows {s['ppl_windows']})"
                 if s["ppl_windows"] is not None else f"all {ppl['windows']} windows")
        lines.append(f"- PPL: {ppl['data']}, L={ppl['seq_len']}, {scope}, {ppl['tokens']} of "
                     f"{ppl['total_tokens']} tokens")
    if s.get("tasks"):
        limit = ("all examples" if s["limit"] is None
                 else f"first {s['limit']} examples per task (--limit)")
        zero_shot = dense.get("zero_shot") or {}
        metrics = zero_shot.get("average_metrics", {})
        lines.append(f"- zero-shot: {limit}; accuracy in %; metric per task: "
                     + ", ".join(f"{t} {metrics.get(t, '?')}" for t in s["tasks"]))
        se = accuracy_standard_errors(zero_shot)
        lam = zero_shot.get("lambada_openai")
        if lam:
            lines.append(f"- LAMBADA (lm-eval lambada_openai), beside the average and not in it: "
                         f"{'all ' if s['limit'] is None else 'first '}{lam['n']} texts; acc = the "
                         "last word is the greedy prediction, % with its 95% Wilson interval; "
                         "PPL = exp(−mean over texts of log p(last word))")
        if small_sample(zero_shot):
            lines.append(f"- small sample: fewer than {SMALL_SAMPLE} examples per task, so the "
                         "table shows only the task average with its 95% interval (Wilson, the "
                         "examples of all tasks pooled) and n, and no per-task accuracy or "
                         "retention; results.json keeps the raw figures")
        elif se:
            lines.append(f"- noise: binomial standard error of the dense accuracies, per task "
                         f"{min(se[0].values()):.1f}–{max(se[0].values()):.1f} points, "
                         f"of the {len(se[0])}-task average {se[1]:.2f} points")
    floor = results.get("floor", {})
    if floor.get("seconds") is not None:
        lines.append(f"- x fwd+bwd: pruning time / {floor['seconds']:.2f} s, the time of "
                     f"{floor['description']}")
    lines.append("- pruning time in seconds: total (scoring / compensation statistics / solve); "
                 "model loading and evaluation excluded")
    m, v = results.get("machine", {}), results.get("versions", {})
    lines.append(f"- machine: {m.get('platform')}, {m.get('cpu_count')} CPUs"
                 + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
                 + f"; torch {v.get('torch')}, transformers {v.get('transformers')}, "
                 f"gradmap {v.get('gradmap')}")
    return lines


def _time_cell(row: dict) -> str:
    t = row.get("timings")
    if not t:
        return DASH
    return (f"{t.get('total', 0.0):.1f} ({t.get('scoring', 0.0):.1f} / "
            f"{t.get('compensation_statistics', 0.0):.1f} / {t.get('solve', 0.0):.1f})")


def _task_counts(zero_shot: dict[str, Any] | None) -> dict[str, int]:
    return {t: e.get("n") for t, e in ((zero_shot or {}).get("tasks") or {}).items()}


def lambada_cells(entry: dict[str, Any] | None) -> list[str]:
    """LAMBADA accuracy (% [95% Wilson]) and perplexity cells; dashes when not measured."""
    if not entry:
        return [DASH, DASH]
    return [accuracy_text(entry["acc"], entry["n"]), _num(entry.get("ppl"), ".2f")]


def markdown_table(results: dict[str, Any]) -> str:
    """The results table: one row for the dense model and one per method, in run order.

    Every accuracy carries its 95% Wilson interval, and the header says on how many examples
    each task was measured; LAMBADA sits after the average and retention, outside both.
    """
    tasks = results["settings"].get("tasks") or []
    dense_zs = (results.get("dense") or {}).get("zero_shot")
    metrics = (dense_zs or {}).get("average_metrics", {})
    counts = _task_counts(dense_zs)
    mc = [t for t in tasks if t not in PROBE_NAMES]  # the averaged tasks
    lam = (dense_zs or {}).get("lambada_openai")
    small = bool(mc) and dense_zs is not None and small_sample(dense_zs)
    header = ["method", "removed layers", "pruning s", "x fwd+bwd", "PPL"]
    if small:
        header += [f"avg ({len(mc)}) % [95%]", "n"]
    elif mc:
        header += [f"{t} ({metrics.get(t, 'acc')}, n={counts.get(t, '?')}) % [95%]" for t in mc]
        header += [f"avg ({len(mc)})", "retention %"]
    if lam:
        header += [f"LAMBADA acc (n={lam['n']}) % [95%]", "LAMBADA PPL"]
    rows = []
    dense = results.get("dense")
    all_rows = ([dict(dense, method="dense", status="ok")] if dense else []) + results["methods"]
    for row in all_rows:
        cells = [_cell(row.get("label", row["method"]))]
        status = row.get("status")
        if status == "failed":
            cells.append(_cell(f"FAILED: {row.get('error', '?')}"))
        elif status in ("pending", "running"):
            cells.append(f"({status})")
        else:
            cells.append(", ".join(map(str, row.get("removed_layers", []))) or DASH)
        cells.append(_time_cell(row))
        cells.append(_num(row.get("ratio_to_floor"), ".1f"))
        cells.append(_num(row.get("ppl"), ".2f"))
        zs = row.get("zero_shot") or {}
        if small:
            cells += _small_sample_cells(row)
        elif mc:
            entries = zs.get("tasks") or {}
            cells += [accuracy_text(entries[t]["value"], entries[t]["n"]) if t in entries else DASH
                      for t in mc]
            cells.append(_num(100 * row["average"] if row.get("average") is not None else None,
                              ".2f"))
            cells.append("100.0" if row["method"] == "dense" and row.get("average") is not None
                         else _num(row.get("retention"), ".1f"))
        if lam:
            cells += lambada_cells(zs.get("lambada_openai"))
        rows.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _small_sample_cells(row: dict) -> list[str]:
    n = _pooled_n(row.get("zero_shot"))
    if row.get("average") is None or not n:
        return [DASH, DASH]
    lo, hi = wilson_interval(row["average"], n)
    return [f"{100 * row['average']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]", str(n)]


def _notes(results: dict[str, Any]) -> list[str]:
    notes = []
    for row in results["methods"]:
        if row.get("saved_to"):
            notes.append(f"- checkpoint of `{row['method']}` saved to `{row['saved_to']}`")
        if row.get("save_error"):
            notes.append(f"- saving `{row['method']}` failed: {row['save_error']}")
    if results.get("status") != "complete":
        notes.append(f"- run status: {results.get('status')} (this file is rewritten as methods "
                     "finish)")
    return notes


def _markdown(results: dict[str, Any]) -> str:
    parts = ["\n".join(settings_lines(results)), markdown_table(results)]
    for section in (_notes(results), speed_markdown(results)):
        if section:
            parts.append("\n".join(section))
    return "\n\n".join(parts) + "\n"


def _new_figure(width: float, height: float):
    # Figure + Agg canvas directly: no pyplot, so no global backend or figure state is touched
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_ppl_vs_time(results: dict[str, Any], path: Path) -> bool:
    """Scatter of perplexity against total pruning time per method; False when nothing to plot."""
    pts = [(r["timings"]["total"], r["ppl"], r.get("label", r["method"])) for r in results["methods"]
           if r.get("status") == "ok" and r.get("ppl") is not None and r.get("timings")]
    if not pts:
        return False
    fig = _new_figure(6.4, 4.4)
    ax = fig.add_subplot()
    for x, y, name in pts:  # one call per point so each method gets its own colour
        ax.scatter([x], [y], s=30)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    dense = (results.get("dense") or {}).get("ppl")
    if dense is not None:
        ax.axhline(dense, color="gray", linestyle="--", linewidth=1, label=f"dense ({dense:.2f})")
        ax.legend(fontsize=8)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    if min(ys) > 0 and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    s = results["settings"]
    ax.set_xlabel("pruning time (s, total)")
    ax.set_ylabel(f"PPL ({s['ppl_data']}, L={s['ppl_seq_len']})")
    ax.set_title(f"{s['model']}: {s['n_prune']} layers removed", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_layer_scores(results: dict[str, Any], path: Path) -> bool:
    """One panel per metric: its first-pass (dense-model) score of every layer, removed ones marked."""
    per_metric: dict[str, dict] = {}
    for row in results["methods"]:
        if row.get("status") == "ok" and row.get("scores") and row["metric"] not in per_metric:
            per_metric[row["metric"]] = row
    if not per_metric:
        return False
    from matplotlib.ticker import MaxNLocator
    n = len(per_metric)
    cols = 2 if n > 1 else 1
    nrows = math.ceil(n / cols)
    fig = _new_figure(6.0 * cols, 2.6 * nrows)
    for i, (metric, row) in enumerate(per_metric.items()):
        ax = fig.add_subplot(nrows, cols, i + 1)
        scores = {int(k): v for k, v in row["scores"][0].items()}
        layers = sorted(scores)
        ax.plot(layers, [scores[k] for k in layers], marker="o", markersize=3, linewidth=1)
        removed = [k for k in row.get("removed_layers", []) if k in scores]
        ax.scatter(removed, [scores[k] for k in removed], color="red", s=18, zorder=3,
                   label=f"removed by {row['method']}")
        ax.set_title(f"{metric} (first pass, dense model)", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("original layer index", fontsize=8)
        ax.set_ylabel("score (low = removed first)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return True


def write_results(out: str | os.PathLike, results: dict[str, Any], plots: bool = True) -> None:
    """(Re)write results.md and results.json in `out`, and with `plots` the two PNGs.

    `ppl_vs_time.png`: PPL against pruning time per method; `layer_scores.png`: each
    metric's per-layer scores. Plotting takes seconds, so callers skip it when no new
    method finished since the last write.
    """
    out = Path(out)
    results.setdefault("plots", {})
    for name, fn in (("ppl_vs_time.png", plot_ppl_vs_time), ("layer_scores.png", plot_layer_scores)):
        if not plots:
            break
        tmp = out / f".{name}.tmp.png"
        if fn(results, tmp):
            os.replace(tmp, out / name)
            results["plots"][name] = str(out / name)
    _atomic_write(out / "results.json",
                  json_text(results).encode("utf-8"))
    _atomic_write(out / "results.md", _markdown(results).encode("utf-8"))
