"""What pruning buys at inference, for `gradmap compare --speed` and `gradmap prune --speed`.

Each pruned model is timed against the dense one in the same round-robin run
(`gradmap.evaluate.speed.inference_speed`), so its x dense ratios share the run's drift. Memory
stays bounded at one dense and one pruned model on the device: compare times the pruned model
of each method as it finishes, against its kept dense copy (or a fresh load with --reload);
prune keeps a copy of the dense model in host memory while it prunes. Torch loads only when
a model is timed, so the report writer can import this module cheaply.
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["host_copy", "speed_vs_dense", "measure_row", "speed_markdown"]

log = logging.getLogger(__name__)


def host_copy(model):
    """A deep copy of `model` in host memory, made without a second copy on the device."""
    device = next(model.parameters()).device
    if device.type == "cpu":
        return copy.deepcopy(model)
    model.to("cpu")
    try:
        return copy.deepcopy(model)
    finally:
        model.to(device)


def speed_vs_dense(dense, pruned, tokenizer, settings: dict, name: str = "pruned",
                   gguf: str | None = None) -> dict[str, Any]:
    """`inference_speed` of {"dense", name}: the dense model is moved next to `pruned` for the run.

    With `gguf` (the pruned model's export) llama.cpp times it against the dense GGUF, when
    llama-cpp-python is installed: the file the model was loaded from, or else the dense model
    exported to a temporary GGUF the way the pruned one was (dtype "auto"), so both files hold
    the same tensor types.
    """
    from gradmap.core.models import GGUF_SOURCE_ATTR
    from gradmap.evaluate.speed import inference_speed
    home, device = next(dense.parameters()).device, next(pruned.parameters()).device
    source = getattr(pruned, GGUF_SOURCE_ATTR, None)
    with tempfile.TemporaryDirectory() as tmp:
        if gguf and not source and importlib.util.find_spec("llama_cpp") is not None:
            from gradmap.core.gguf_export import export_gguf
            source = export_gguf(dense, tokenizer, Path(tmp) / "dense.gguf")["path"]
        ggufs = {"dense": source, name: gguf} if gguf and source else None
        dense.to(device)
        try:
            return inference_speed({"dense": dense, name: pruned}, tokenizer, gguf_paths=ggufs,
                                   **settings)
        finally:
            dense.to(home)


def measure_row(source, model, tokenizer, row: dict, settings: dict, gguf: str | None) -> None:
    """Fill row["speed"] for a finished compare method; a failure goes to row["speed_error"]."""
    try:
        dense = source.reference()
        row["speed"] = speed_vs_dense(dense, model, tokenizer, settings, row["label"], gguf)
    except Exception as exc:  # the method's quality figures stand without the timing
        row["speed_error"] = f"{type(exc).__name__}: {exc}"
        log.error("timing %s failed: %s", row["method"], row["speed_error"])


def _tok(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _cells(row: dict, keys: list[tuple[str, str, str]], dense: bool) -> list[str]:
    cells = [f"{row['layers']}"]
    for key, scale, unit in (("params", 1e6, "M"), ("checkpoint_bytes", 1e6, "MB")):
        cells.append(f"{row[key] / scale:.1f} {unit}" + ("" if dense else f" (x{row['x_dense'][key]:.2f})"))
    for group, key, ratio in keys:
        value = row[group][key]
        cells.append(_tok(value) if dense else f"{_tok(value)} (x{row['x_dense'][ratio]:.2f})")
    cells.append(f"x{row['expected_speedup']:.2f}")
    return cells


def speed_markdown(results: dict[str, Any]) -> list[str]:
    """The "what pruning buys" section of results.md; empty when no method was timed."""
    timed = [r for r in results["methods"] if r.get("speed")]
    errors = [r for r in results["methods"] if r.get("speed_error")]
    if not timed and not errors:
        return []
    lines = ["## What pruning buys (--speed)", ""]
    if timed:
        first = timed[0]["speed"]
        s = first["settings"]
        keys = ([("prefill_tok_s", str(k), f"prefill_{k}") for k in s["prefill"]]
                + [("decode_tok_s", str(b), f"decode_b{b}") for b in s["batches"]])
        lines.append(f"Transformers on {s['device']} ({s['threads']} threads), tokens/s: median of "
                     f"{s['repeats']} runs after {s['warmup']} warm-up, each method timed round-robin "
                     "with the dense model; x dense is against the dense model of the same run, the "
                     f"dense row the median of its {len(timed)} run(s). Prefill: batch 1; decode: "
                     f"{s['decode_tokens']} tokens after a {s['prompt_tokens']}-token prompt, KV cache. "
                     "Expected: dense / pruned matmul parameters.")
        lines.append("")
        header = (["model", "layers", "params", "checkpoint"]
                  + [f"prefill {k} tok/s" for _, k, _ in keys[:len(s["prefill"])]]
                  + [f"decode b={b} tok/s" for _, b, _ in keys[len(s["prefill"]):]] + ["expected"])
        dense = dict(first["models"]["dense"])
        for group, key, _ in keys:
            dense[group] = {**dense[group], key: statistics.median(
                r["speed"]["models"]["dense"][group][key] for r in timed)}
        rows = [["dense"] + _cells(dense, keys, dense=True)]
        rows += [[r["label"]] + _cells(r["speed"]["models"][r["label"]], keys, dense=False) for r in timed]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        lines += _llama_cpp_lines(timed)
    lines += [f"- timing `{r['method']}` failed: {r['speed_error']}" for r in errors]
    return lines


def _llama_cpp_lines(timed: list[dict]) -> list[str]:
    from gradmap.evaluate.speed import throughputs
    out = []
    for r in timed:
        speed = r["speed"]
        if speed.get("llama_cpp_skipped"):
            out.append(f"- llama.cpp ({r['label']}): skipped, {speed['llama_cpp_skipped']}")
        for name, cpp in (speed.get("llama_cpp") or {}).items():
            figures = ", ".join(f"{k} {_tok(v)} tok/s (x{cpp['x_dense'][k]:.2f})"
                                for k, v in throughputs(cpp).items())
            out.append(f"- llama.cpp, {name}: GGUF {cpp['gguf_bytes'] / 1e6:.1f} MB "
                       f"(x{cpp['x_dense']['gguf_bytes']:.2f}), {figures}")
    return [""] + out if out else []
