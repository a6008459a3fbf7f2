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
- record the GPU and versions in `extra_info` (bench/harness.py `measure` does) or in
  `machine_info`, under the keys in MACHINE_KEYS. Values shared by the whole run go in the
  run's machine line, values shared by a group in its caption, the rest in the row's notes;
  other `extra_info` entries (tokens_per_s, ratio_to_floor, peak_mem_mib, ...) are notes.

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
MACHINE_KEYS = ("gpu", "gpu_memory_gib", "cuda", "sm", "torch", "triton", "transformers",
                "gradmap", "python", "cpu", "cpu_threads", "os_cpus", "threads")
# the table's own columns already give these (median, IQR, min)
REDUNDANT = {"baseline", "p10_ms", "p50_ms", "p90_ms", "seconds"}


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


def _shared(benchmarks: list[dict]) -> dict:
    """MACHINE_KEYS values that every benchmark recording the key agrees on."""
    values: dict[str, set] = {}
    for b in benchmarks:
        for k in MACHINE_KEYS:
            if k in b.get("extra_info", {}):
                values.setdefault(k, set()).add(str(b["extra_info"][k]))
    return {k: v.pop() for k, v in values.items() if len(v) == 1}


def _machine_words(values: dict) -> list[str]:
    words = []
    if values.get("gpu") not in (None, "none", ""):
        gpu = f"GPU {values['gpu']}"
        extra = [f"{values[k]} GiB" if k == "gpu_memory_gib" else f"{k} {values[k]}"
                 for k in ("gpu_memory_gib", "cuda", "sm") if k in values]
        words.append(gpu + (f" ({', '.join(extra)})" if extra else ""))
    for k in ("cpu_threads", "threads"):
        if k in values:
            words.append(f"{values[k]} torch threads")
    words += [f"{k} {values[k]}" for k in ("torch", "triton", "transformers", "gradmap")
              if k in values]
    return words


def run_values(run: dict) -> dict:
    """Machine values stated once for the whole run (GPU details only when one GPU ran all)."""
    info = run.get("machine_info", {})
    values = dict(_shared(run.get("benchmarks", [])))
    values.update({k: info[k] for k in MACHINE_KEYS if k in info and k not in ("cpu", "python")})
    if "gpu" not in values:
        for k in ("gpu_memory_gib", "cuda", "sm"):
            values.pop(k, None)
    return values


def machine_line(run: dict) -> str:
    """'AMD EPYC, 2 CPUs, x86_64 Linux 6.1; no GPU; torch 2.13; python 3.11' for a run."""
    info = run.get("machine_info", {})
    cpu = info.get("cpu", {})
    values = run_values(run)
    host = (f"{cpu.get('brand_raw') or info.get('processor') or info.get('machine', '?')}, "
            f"{cpu.get('count', '?')} CPUs, {info.get('machine', '?')} {info.get('system', '')} "
            f"{info.get('release', '')}").strip()
    any_gpu = any(b.get("extra_info", {}).get("gpu") not in (None, "none", "")
                  for b in run.get("benchmarks", []))
    words = [host]
    if not any_gpu and values.get("gpu") in (None, "none", ""):
        words.append("no GPU")
    elif "gpu" not in values:
        words.append("GPU rows: see each table")
    words += _machine_words(values)
    words.append(f"python {info.get('python_version', '?')}")
    return "; ".join(words)


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


def group_table(name: str, rows: list[dict], shared: dict | None = None) -> str:
    """One markdown table for a benchmark group: ratio first, then absolute times.

    `shared` are the machine values already stated for the whole run; values this
    group shares and the run does not are put in the caption, varying ones in the notes.
    """
    base, why = _baseline(rows)
    base_median = base["stats"]["median"] if base else None
    shared = shared or {}
    group_values = {k: v for k, v in _shared(rows).items() if shared.get(k) != v}
    machine = "; ".join(_machine_words(group_values))
    shown = set(shared) | set(group_values)
    lines = [f"**{name}** (speed-up = {base['name'] if base else '-'} median / row median; "
             f"{why}{'; ' + machine if machine else ''})", "",
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
                          if k not in REDUNDANT and not (k in MACHINE_KEYS and k in shown))
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
    shared = run_values(run)
    tables = [group_table(g, rows, shared) for g, rows in _groups(run["benchmarks"]).items()]
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
