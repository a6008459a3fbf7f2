"""Markdown report of a multi-seed study JSONL (bench/seed_study.py output), issue 14.

    python bench/seed_study_report.py results/seed_study_8.jsonl [--reference PIPELINE] [--out F]
                                     [--plot F.png]

Prints, per protocol found in the file (rows are grouped by their `settings`), the table of
`gradmap compare --seeds`: PPL and task averages as mean ± s.e. over seeds, paired
differences from the reference with 95% intervals (t over seeds for log PPL, paired
bootstrap over examples for accuracy), pruning seconds, × one forward+backward, and the
Jaccard overlap of the removed-layer sets across seeds. The statistics are
`gradmap.experiments.paired` / `seed_table`, the same code the CLI uses.

Reads the file only; a study that is still running can be reported at any time (rows are
appended whole). A pipeline retried after a failure counts its last successful row.
Not collected by pytest (no test_ prefix).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gradmap.experiments.seed_table import (SeedRun, markdown_seed_table, method_lines, summarize,
                                            zero_shot_fields)


def load_rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            print(f"warning: {path}:{n} is not complete JSON, skipped", file=sys.stderr)
    return rows


def seed_run(row: dict) -> SeedRun:
    """One "run" row of the study as the table's SeedRun (per-example 0/1 of the task's metric)."""
    return SeedRun(method=row["pipeline"], seed=row["seed"], ok=row.get("status") == "ok",
                   ppl=row.get("ppl"), task_values=dict(row.get("tasks") or {}),
                   seconds=row.get("prune_seconds"), ratio_to_floor=row.get("ratio_to_floor"),
                   removed_layers=row.get("removed_layers"),
                   **zero_shot_fields(row.get("zero_shot")))


def latest_runs(rows: list[dict]) -> list[SeedRun]:
    """One SeedRun per (pipeline, seed): its last ok row, else its last row."""
    best: dict[tuple, dict] = {}
    for row in rows:
        if row.get("kind") != "run":
            continue
        key = (row["pipeline"], row["seed"])
        if row.get("status") == "ok" or best.get(key, {}).get("status") != "ok":
            best[key] = row
    return [seed_run(r) for r in best.values()]


def report(rows: list[dict], reference: str | None = None) -> str:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(json.dumps(row.get("settings"), sort_keys=True), []).append(row)
    parts = []
    for text, group in groups.items():
        s = json.loads(text) or {}
        runs = latest_runs(group)
        parts.append(f"## {s.get('model')}, {s.get('n_prune')} layers removed")
        lines = [f"- protocol: calibration {s.get('calib')} {s.get('n_calib')} x "
                 f"{s.get('seq_len')} tokens per seed; PPL {s.get('ppl_data')} L="
                 f"{s.get('ppl_seq_len')}, first {s.get('ppl_windows')} windows; zero-shot "
                 f"first {s.get('limit')} examples per task"]
        dense = next((r for r in group if r.get("kind") == "dense" and r.get("status") == "ok"),
                     None)
        if dense:
            no_boolq = [v for t, v in dense["tasks"].items() if t != "boolq"]
            lines.append(f"- dense: PPL {dense['ppl']:.2f}, avg {100 * dense['average']:.2f}, "
                         f"avg w/o boolq {100 * sum(no_boolq) / len(no_boolq):.2f}")
            lam = (dense.get("zero_shot") or {}).get("lambada_openai")
            if lam:
                lines.append(f"- dense LAMBADA (beside the averages): acc {100 * lam['acc']:.2f} % "
                             f"on {lam['n']} texts, PPL {lam['ppl']:.2f}")
        floors = {r["seed"]: r["seconds"] for r in group if r.get("kind") == "floor"}
        if floors:
            lines.append("- one forward+backward (s) per seed: "
                         + ", ".join(f"{k}: {v:.1f}" for k, v in sorted(floors.items())))
        commands = sorted({r["command"] for r in group if r.get("command")})
        commits = sorted({r["git_commit"][:10] for r in group if r.get("git_commit")})
        lines += [f"- command: `{c}`" for c in commands]
        lines.append(f"- git commits: {', '.join(commits) or '?'}; rows: {len(runs)} runs")
        parts.append("\n".join(lines))
        if not runs:
            parts.append("(no finished runs yet)")
            continue
        methods = list(dict.fromkeys(r.method for r in runs))
        if reference is not None and reference not in methods:
            parts.append(f"(reference {reference!r} has no runs in this group yet; the first "
                         f"pipeline, {methods[0]!r}, is the reference)")
        summary = summarize(runs, methods, reference if reference in methods else None)
        parts.append(markdown_seed_table(summary))
        sets = ["- removed layers per seed: " + "; ".join(
            f"{m['method']}: " + ", ".join(f"s{k} {v}" for k, v in m["removed_layers"].items())
            for m in summary["methods"])]
        parts.append("\n".join(method_lines(summary) + sets))
    return "\n\n".join(parts) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """PPL and 7-task average (mean ± s.e. over seeds) against × one forward+backward, per
    protocol in the file (one row of panels each); single-seed points have no error bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(json.dumps(row.get("settings"), sort_keys=True), []).append(row)
    groups = {k: g for k, g in groups.items() if latest_runs(g)}
    fig = Figure(figsize=(12, 4.2 * len(groups)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), 2, squeeze=False)
    for (text, group), (ax_ppl, ax_acc) in zip(groups.items(), axes):
        s = json.loads(text) or {}
        for m in summarize(latest_runs(group))["methods"]:
            cost, ppl, acc = m["ratio_to_floor"], m["ppl"], m["avg"]
            if cost is None or ppl is None:
                continue
            label = f"{m['method']} ({len(m['seeds'])} seed{'s' if len(m['seeds']) > 1 else ''})"
            for ax, level, scale in ((ax_ppl, ppl, 1.0), (ax_acc, acc, 100.0)):
                if level is None:
                    continue
                ax.errorbar(cost["mean"], scale * level["mean"], xerr=cost["se"] or None,
                            yerr=scale * level["se"] if level["se"] else None, fmt="o", capsize=3,
                            label=label)
        where = (f"{s.get('model')}, {s.get('n_prune')} layers removed; calibration "
                 f"{s.get('n_calib')}x{s.get('seq_len')} per seed")
        ax_ppl.set(xlabel="pruning cost (x one forward+backward)", ylabel=f"WikiText-2 PPL "
                   f"({s.get('ppl_windows')} windows)", yscale="log", title=where)
        ax_acc.set(xlabel="pruning cost (x one forward+backward)",
                   ylabel=f"7-task average % ({s.get('limit')} examples per task)", title=where)
        ax_acc.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("jsonl", type=Path)
    p.add_argument("--reference", default=None,
                   help="pipeline the others are compared with (default: the first in the file)")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    p.add_argument("--plot", type=Path, default=None,
                   help="also draw PPL and 7-task average against cost into this PNG")
    args = p.parse_args(argv)
    rows = load_rows(args.jsonl)
    if args.plot is not None:
        plot(rows, args.plot)
    text = report(rows, args.reference)
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
