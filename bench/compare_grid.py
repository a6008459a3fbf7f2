"""Markdown tables from one `gradmap compare` results.json: metric x schedule, and metric x compensation.

    python bench/compare_grid.py runs/gridA2/results.json [more results.json ...]

Rows from several files are merged by method label (the first file wins); every file must
share the same model, n_prune, calibration and perplexity settings, which are printed.
Not collected by pytest (no test_ prefix).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

COMPENSATIONS = ["none", "magnitude", "projection", "magnitude+projection", "replaceme"]
SETTINGS = ("model", "n_prune", "calib", "n_calib", "seq_len", "ppl_windows")


def load(paths: list[Path]) -> tuple[dict, dict, dict]:
    rows, settings, dense = {}, None, None
    for path in paths:
        data = json.loads(path.read_text())
        s = {k: data["settings"].get(k) for k in SETTINGS}
        if settings is not None and s != settings:
            raise SystemExit(f"{path}: settings {s} differ from {settings}")
        settings, dense = s, dense or data.get("dense")
        for row in data["methods"]:
            if row.get("status") == "ok":
                rows.setdefault(row["label"], row)
    return rows, settings, dense


def _comp(row: dict) -> str:
    return "+".join(row["compensation"]) or "none"


def _report(row: dict) -> str:
    """Held-out LM loss before -> after for projection/replaceme, and reverted sites."""
    notes = []
    for name, rep in (row.get("prune_result", {}).get("compensation_report") or {}).items():
        if isinstance(rep, dict) and "holdout_lm_loss_before" in rep:
            sites = ",".join(str(s["layer"]) for s in rep.get("sites", []) if s.get("folded"))
            notes.append(f"{name}: held-out {rep['holdout_lm_loss_before']:.3f}→"
                         f"{rep['holdout_lm_loss_after']:.3f}, folded at [{sites}]"
                         + (f", reverted {rep['reverted']}" if rep.get("reverted") else ""))
    return "; ".join(notes)


def schedule_table(rows: dict) -> str:
    lines = ["| method | removed (original) | scoring s | × fwd+bwd | PPL |", "|---|---|---|---|---|"]
    for label, r in rows.items():
        if _comp(r) == "none":
            lines.append(f"| {label} | {' '.join(map(str, r['removed_layers']))} | "
                         f"{r['timings']['scoring']:.0f} | {r['ratio_to_floor']:.1f} | {r['ppl']:.1f} |")
    return "\n".join(lines)


def compensation_table(rows: dict, schedule: str = "one-shot") -> str:
    metrics = sorted({r["metric"] for r in rows.values() if _comp(r) != "none" and r["schedule"] == schedule})
    head = "| metric | " + " | ".join(COMPENSATIONS) + " |"
    lines = [head, "|---" * (len(COMPENSATIONS) + 1) + "|"]
    extra = []
    for m in metrics:
        cells = []
        for c in COMPENSATIONS:
            r = next((r for r in rows.values() if r["metric"] == m and r["schedule"] == schedule
                      and _comp(r) == c), None)
            if r is None:
                cells.append("not run")
                continue
            added = r["timings"]["compensation_statistics"] + r["timings"]["solve"]
            cells.append(f"{r['ppl']:.1f} (+{added:.0f} s)" if c != "none" else f"{r['ppl']:.1f}")
            if _report(r):
                extra.append(f"- {r['label']}: {_report(r)}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path)
    args = p.parse_args()
    rows, settings, dense = load(args.results)
    print(f"settings: {settings}; dense PPL {dense['ppl']:.2f}\n")
    print(schedule_table(rows) + "\n")
    print(compensation_table(rows))


if __name__ == "__main__":
    main()
