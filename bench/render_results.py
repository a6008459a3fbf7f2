"""Render pytest-benchmark JSON files into the marked region of bench/RESULTS.md.

    pytest bench/ --benchmark-only --benchmark-json=bench/runs/cpu.json
    python bench/render_results.py bench/runs/cpu.json [more.json | a folder ...] [--out bench/RESULTS.md]

One section per JSON file (one run on one machine), named after the file and the machine
it ran on; in it one table per benchmark group. Ratios come first: each row's speed-up
over the group's baseline (baseline median / row median, so > 1 is faster), then the
absolute times (median, IQR, min, rounds) and the row's `extra_info` figures.

Conventions for benchmark writers:
- put the benchmarks to compare in one `benchmark.group`;
- mark the reference with `benchmark.extra_info["baseline"] = True` (otherwise the first
  benchmark of the group in the file is the baseline, and the table says so);
- record the GPU and versions in `machine_info` (a `pytest_benchmark_update_machine_info`
  hook) or in `extra_info` under "gpu", "torch", "transformers", "gradmap"; other
  `extra_info` entries (tokens_per_s, peak_mem_mib, ...) are shown in a notes column.

Only the text between `<!-- rendered:start -->` and `<!-- rendered:end -->` is replaced;
hand-written sections elsewhere in the file are left as they are. Without markers the
region is appended at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

START = "<!-- rendered:start -->"
END = "<!-- rendered:end -->"
MACHINE_KEYS = ("gpu", "torch", "transformers", "gradmap")
HIDDEN_EXTRA = {"baseline", *MACHINE_KEYS}


def fmt_time(seconds: float) -> str:
    """Seconds with a unit chosen so that 1 <= value < 1000 (s, ms, µs, ns)."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _fmt_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def machine_line(run: dict) -> str:
    """'AMD EPYC, 2 CPUs, x86_64 Linux 6.1; no GPU; python 3.11, torch 2.13' from a run."""
    info = run.get("machine_info", {})
    cpu = info.get("cpu", {})
    extras = {}
    for b in run.get("benchmarks", []):
        for k in MACHINE_KEYS:
            if k in b.get("extra_info", {}):
                extras.setdefault(k, b["extra_info"][k])
    for k in MACHINE_KEYS:
        if k in info:
            extras[k] = info[k]
    parts = [f"{cpu.get('brand_raw') or info.get('processor') or info.get('machine', '?')}, "
             f"{cpu.get('count', '?')} CPUs, {info.get('machine', '?')} {info.get('system', '')} "
             f"{info.get('release', '')}".strip()]
    parts.append(f"GPU {extras['gpu']}" if extras.get("gpu") else "no GPU recorded")
    versions = [f"python {info.get('python_version', '?')}"]
    versions += [f"{k} {extras[k]}" for k in ("torch", "transformers", "gradmap") if k in extras]
    parts.append(", ".join(versions))
    return "; ".join(parts)


def _groups(benchmarks: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for b in benchmarks:
        groups.setdefault(b.get("group") or "(no group)", []).append(b)
    return groups


def _baseline(rows: list[dict]) -> tuple[dict | None, str]:
    marked = [b for b in rows if b.get("extra_info", {}).get("baseline")]
    if len(marked) > 1:
        raise SystemExit(f"group {rows[0].get('group')!r} marks {len(marked)} baselines "
                         f"({', '.join(b['name'] for b in marked)}); mark exactly one")
    if marked:
        return marked[0], "marked baseline"
    if len(rows) == 1:
        return None, "single benchmark, no ratio"
    return rows[0], "no baseline marked: first benchmark of the group"


def group_table(name: str, rows: list[dict]) -> str:
    """One markdown table for a benchmark group: ratio first, then absolute times."""
    base, why = _baseline(rows)
    base_median = base["stats"]["median"] if base else None
    lines = [f"**{name}** (speed-up = {base['name'] if base else '-'} median / row median; "
             f"{why})", "",
             "| benchmark | speed-up | median | IQR | min | rounds | notes |",
             "|---|---|---|---|---|---|---|"]
    for b in rows:
        s = b["stats"]
        if base is None:
            ratio = "-"
        elif b is base:
            ratio = "1.00x (baseline)"
        else:
            ratio = f"{base_median / s['median']:.2f}x" if s["median"] > 0 else "-"
        notes = ", ".join(f"{k}={_fmt_value(v)}" for k, v in b.get("extra_info", {}).items()
                          if k not in HIDDEN_EXTRA)
        lines.append(f"| {b['name']} | {ratio} | {fmt_time(s['median'])} | "
                     f"{fmt_time(s['iqr'])} | {fmt_time(s['min'])} | {s['rounds']} | "
                     f"{notes or '-'} |")
    return "\n".join(lines)


def render_run(path: Path) -> str:
    """The markdown section for one pytest-benchmark JSON file."""
    run = json.loads(path.read_text(encoding="utf-8"))
    if "benchmarks" not in run or "machine_info" not in run:
        raise SystemExit(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' / "
                         "'machine_info'); write one with pytest --benchmark-json=PATH")
    head = [f"### {path.stem}", "",
            f"Machine: {machine_line(run)}. Run {run.get('datetime', '?')[:19]} "
            f"(pytest-benchmark {run.get('version', '?')}).", ""]
    if not run["benchmarks"]:
        return "\n".join(head + ["(no benchmarks in this run)"])
    tables = [group_table(g, rows) for g, rows in _groups(run["benchmarks"]).items()]
    return "\n".join(head) + "\n" + "\n\n".join(tables)


def _inputs(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise SystemExit(f"{p} does not exist; pass pytest-benchmark JSON files or folders")
    if not files:
        raise SystemExit("no JSON files found in the given folders")
    return files


def splice(document: str, rendered: str) -> str:
    """Replace the marked region of `document` with `rendered` (append the region if absent)."""
    region = f"{START}\n{rendered.rstrip()}\n{END}"
    if START not in document:
        sep = "" if not document or document.endswith("\n\n") else (
            "\n" if document.endswith("\n") else "\n\n")
        return f"{document}{sep}{region}\n"
    head, rest = document.split(START, 1)
    if END not in rest:
        raise SystemExit(f"found {START} but no {END}; restore the end marker")
    _, tail = rest.split(END, 1)
    return f"{head}{region}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="pytest-benchmark JSON files or folders of them")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")),
                        help="markdown file to update (default: bench/RESULTS.md)")
    args = parser.parse_args(argv)
    sections = [render_run(p) for p in _inputs(args.inputs)]
    rendered = ("_Rendered by `python bench/render_results.py "
                + " ".join(args.inputs) + "`; do not edit by hand._\n\n" + "\n\n".join(sections))
    out = Path(args.out)
    document = out.read_text(encoding="utf-8") if out.exists() else "# Benchmark results\n\n"
    out.write_text(splice(document, rendered), encoding="utf-8")
    print(f"wrote {len(sections)} run(s) into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
