"""One compact markdown table from several `gradmap compare` runs (e.g. 4, 8 and 12 layers removed).

    python bench/compare_summary.py runs/compare_n4/results.json runs/compare_n8/results.json ...

Columns: layers removed, method, pruning time and its ratio to the forward+backward floor,
PPL, the task average, the average without BoolQ, and retention. BoolQ is split out because
on SmolLM2-135M it sits far below its majority-class rate (dense 38% on the first 100
examples, of which 70% are "yes"; 62% on the full validation set), so edits that merely
shift the model's yes/no bias move it by up to ±30 points and dominate a seven-task
average. The binomial standard error of each average (dense accuracies,
`gradmap.experiments.compare_report.accuracy_standard_errors`) is printed under the table.
Not collected by pytest (no test_ prefix).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from gradmap.experiments.compare_report import accuracy_standard_errors

EXCLUDED = "boolq"


def _without_boolq(tasks: dict) -> float | None:
    vals = [v for k, v in tasks.items() if k != EXCLUDED]
    return 100 * sum(vals) / len(vals) if vals else None


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _fmt(x, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def rows(data: dict) -> list[list[str]]:
    n, dense = data["settings"]["n_prune"], data["dense"]
    out = [[str(n), "dense", "—", "—", "—", _fmt(dense.get("ppl"), ".2f"),
            _fmt(_pct(dense.get("average")), ".2f"),
            _fmt(_without_boolq(dense.get("tasks", {})), ".2f"), "100.0"]]
    for r in data["methods"]:
        if r.get("status") != "ok":
            out.append([str(n), r.get("label", r["method"]), f"({r.get('status')})"] + ["—"] * 6)
            continue
        out.append([str(n), r["label"], ", ".join(map(str, r["removed_layers"])),
                    _fmt(r["timings"]["total"], ".1f"), _fmt(r.get("ratio_to_floor"), ".2f"),
                    _fmt(r.get("ppl"), ".2f"), _fmt(_pct(r.get("average")), ".2f"),
                    _fmt(_without_boolq(r.get("tasks", {})), ".2f"),
                    _fmt(r.get("retention"), ".1f")])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    args = ap.parse_args()
    header = ["removed", "method", "layers (original ids)", "pruning s", "x fwd+bwd", "PPL",
              "avg (7)", "avg w/o BoolQ (6)", "retention %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for path in args.results:
        data = json.loads(path.read_text())
        lines += ["| " + " | ".join(r) + " |" for r in rows(data)]
        zs = (data["dense"].get("zero_shot") or {})
        se = accuracy_standard_errors(zs)
        se6 = accuracy_standard_errors(
            {"tasks": {k: v for k, v in zs.get("tasks", {}).items() if k != EXCLUDED}})
        if se and se6:
            notes.append(f"- {path}: limit {zs.get('limit')} per task; s.e. of avg (7) "
                         f"{se[1]:.2f}, of avg (6) {se6[1]:.2f} points; floor "
                         f"{data['floor']['seconds']:.1f} s")
    print("\n".join(lines + [""] + notes))


if __name__ == "__main__":
    main()
