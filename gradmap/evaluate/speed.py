"""What pruning buys at inference: parameters, checkpoint bytes and measured throughput, vs dense.

`inference_speed({"dense": m0, "pruned": m1, ...})` times every model in the same run:
prefill (batch 1, one forward of each length, building the KV cache) and decode (single-token
steps with a transformers `DynamicCache` after a PROMPT-token prompt, each batch size). Each
benchmark gets `warmup` untimed runs per model, then `repeats` timed runs taken round-robin
over the models, so drift of the machine (clock, cache, a neighbour's load) hits all alike; the
median is reported with its ratio to the reference model ("dense") of the same run. Untimed
set-up (building the decode prompt's cache) stays out of the clock; on CUDA the device is
synchronised around every timed call. `expected_speedup` is the ratio of matmul parameters
(decoder layers + LM head; the embedding is a lookup), the gain if time were proportional to
the weights read. Checkpoint bytes are measured by writing the weights with
`model.save_pretrained` (safetensors, the files `gradmap prune` writes) to a temporary folder;
config and tokenizer files (a few kB, the same for every model) are not counted. With
`gguf_paths` and llama-cpp-python installed, the same prefill and batch-1 decode figures are
taken with llama.cpp on those GGUF files (its Python API evaluates one sequence at a time).
"""
from __future__ import annotations

import inspect
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gradmap.core.errors import GradmapError

__all__ = ["inference_speed", "check_speed_options", "model_sizes", "speed_lines", "throughputs",
           "SPEED_DEFAULTS", "PROMPT", "REFERENCE"]

PROMPT = 32          # decode: prompt tokens in the cache before the timed steps
REFERENCE = "dense"  # the model every ratio is taken against
SPEED_DEFAULTS = {"prefill": (512, 2048), "decode_tokens": 128, "batches": (1, 8), "warmup": 1,
                  "repeats": 3}
LLAMA_CPP_HINT = "pip install 'gradmap[gguf-runtime]'"


def _int_list(name: str, value, flag: str) -> tuple[int, ...]:
    items = value.split(",") if isinstance(value, str) else value
    try:
        out = tuple(int(x) for x in items)
    except (TypeError, ValueError):
        out = ()
    if not out or any(x < 1 for x in out) or (isinstance(value, str) and not value.strip()):
        raise GradmapError(f"{flag} {value!r} is not a comma-separated list of positive integers; "
                           f"pass e.g. {','.join(map(str, SPEED_DEFAULTS[name]))}")
    return out


def check_speed_options(prefill=SPEED_DEFAULTS["prefill"], decode_tokens=SPEED_DEFAULTS["decode_tokens"],
                        batches=SPEED_DEFAULTS["batches"], warmup=SPEED_DEFAULTS["warmup"],
                        repeats=SPEED_DEFAULTS["repeats"],
                        flags: dict[str, str] | None = None) -> dict[str, Any]:
    """The measurement settings, validated (GradmapError naming the fix); lists may be '512,2048'.

    `flags` maps a setting to the name errors call it (a command-line flag); default: its name.
    """
    flags = flags or {}
    out = {name: _int_list(name, value, flags.get(name, name))
           for name, value in (("prefill", prefill), ("batches", batches))}
    for name, value, low in (("decode_tokens", decode_tokens, 1), ("warmup", warmup, 0),
                             ("repeats", repeats, 1)):
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = None
        if number is None or number < low or str(number) != str(value).strip():
            kind = "positive" if low else "non-negative"
            raise GradmapError(f"{flags.get(name, name)} must be a {kind} integer, got {value!r} "
                               f"(default {SPEED_DEFAULTS[name]})")
        out[name] = number
    return out


def _matmul_params(model) -> int:
    from gradmap.core.adapter import get_adapter
    adapter = get_adapter(model)
    return sum(p.numel() for p in adapter.layers.parameters()) + adapter.lm_head.weight.numel()


def model_sizes(model) -> dict[str, int]:
    """Decoder layers, parameters (tied weights once), matmul parameters and safetensors bytes."""
    from transformers.utils import logging as hf_logging
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Writing model shards" bar per model is noise here
    try:
        with tempfile.TemporaryDirectory(prefix="gradmap-speed-") as tmp:
            # HF's writer, as gradmap.save_pretrained uses; that one also holds a torchrun barrier
            model.save_pretrained(tmp, safe_serialization=True)
            size = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return {"layers": model.config.num_hidden_layers,
            "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "matmul_params": _matmul_params(model), "checkpoint_bytes": size}


def _synchronised(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _ids(model, batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=g).to(device)


def _prefill(model, length: int) -> Callable[[], Callable[[], None]]:
    ids = _ids(model, 1, length, 0)

    def prepare():
        return lambda: model(ids, use_cache=True)
    return prepare


def _decode(model, batch: int, steps: int) -> Callable[[], Callable[[], None]]:
    from transformers import DynamicCache
    # transformers 5.2x renamed past_key_values to cache (the old name warns until 5.40)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prompt, nxt = _ids(model, batch, PROMPT, 1), _ids(model, batch, steps, 2)

    def prepare():
        cache = DynamicCache(config=model.config)
        model(prompt, use_cache=True, **{key: cache})  # untimed: the prompt is prefill, not decode

        def run():
            for i in range(steps):
                model(nxt[:, i:i + 1], use_cache=True, **{key: cache})
        return run
    return prepare


def _round_robin(prepares: dict[str, Callable], sync: dict[str, Callable], warmup: int,
                 repeats: int) -> dict[str, list[float]]:
    """Seconds of each timed run: warm-up per model, then `repeats` rounds over all models."""
    times: dict[str, list[float]] = {name: [] for name in prepares}
    for name, prepare in prepares.items():
        for _ in range(warmup):
            prepare()()
    for _ in range(repeats):
        for name, prepare in prepares.items():
            run = prepare()
            sync[name]()
            start = time.perf_counter()
            run()
            sync[name]()
            times[name].append(time.perf_counter() - start)
    return times


def _record(rows: dict, times: dict[str, list[float]], kind: str, key: str, tokens: int) -> None:
    """tokens/s from the median of each model's timed runs; the raw seconds are kept beside it."""
    for name, ts in times.items():
        rows[name][f"{kind}_tok_s"][key] = tokens / statistics.median(ts)
        rows[name]["seconds"][f"{kind}_{key}" if kind == "prefill" else f"decode_b{key}"] = ts


def _transformers_figures(models: dict, opts: dict, rows: dict) -> None:
    sync = {name: _synchronised(next(m.parameters()).device) for name, m in models.items()}
    for row in rows.values():
        row.update(prefill_tok_s={}, decode_tok_s={}, seconds={})
    with torch.no_grad():
        for length in opts["prefill"]:
            times = _round_robin({n: _prefill(m, length) for n, m in models.items()}, sync,
                                 opts["warmup"], opts["repeats"])
            _record(rows, times, "prefill", str(length), length)
        for batch in opts["batches"]:
            steps = opts["decode_tokens"]
            times = _round_robin({n: _decode(m, batch, steps) for n, m in models.items()}, sync,
                                 opts["warmup"], opts["repeats"])
            _record(rows, times, "decode", str(batch), batch * steps)


def _llama_cpp_figures(module, gguf_paths: dict, opts: dict, threads: int) -> dict[str, dict]:
    steps, longest = opts["decode_tokens"], max(opts["prefill"])
    llms = {name: module.Llama(model_path=str(path), n_ctx=max(longest, PROMPT + steps) + 8,
                               n_batch=longest, n_threads=threads, verbose=False)
            for name, path in gguf_paths.items()}
    rows = {name: {"gguf_path": str(path), "gguf_bytes": Path(path).stat().st_size,
                   "prefill_tok_s": {}, "decode_tok_s": {}, "seconds": {}}
            for name, path in gguf_paths.items()}
    none = {name: (lambda: None) for name in llms}  # llama.cpp's eval returns when it is done

    def prefill(llm, length):
        def prepare():
            llm.reset()
            return lambda: llm.eval(list(range(100, 100 + length)))
        return prepare

    def decode(llm):
        def prepare():
            llm.reset()
            llm.eval(list(range(100, 100 + PROMPT)))

            def run():
                for i in range(steps):
                    llm.eval([200 + i])
            return run
        return prepare

    for length in opts["prefill"]:
        times = _round_robin({n: prefill(llm, length) for n, llm in llms.items()}, none,
                             opts["warmup"], opts["repeats"])
        _record(rows, times, "prefill", str(length), length)
    times = _round_robin({n: decode(llm) for n, llm in llms.items()}, none, opts["warmup"], opts["repeats"])
    _record(rows, times, "decode", "1", steps)
    return rows


def _ratios(rows: dict[str, dict], reference: str, sizes: bool) -> None:
    base = rows[reference]
    for row in rows.values():
        ratio = {f"prefill_{k}": v / base["prefill_tok_s"][k] for k, v in row["prefill_tok_s"].items()}
        ratio.update({f"decode_b{k}": v / base["decode_tok_s"][k] for k, v in row["decode_tok_s"].items()})
        for key in ("params", "checkpoint_bytes", "gguf_bytes") if sizes else ("gguf_bytes",):
            if key in row:
                ratio[key] = row[key] / base[key]
        row["x_dense"] = ratio
        if sizes:
            row["expected_speedup"] = base["matmul_params"] / row["matmul_params"]


def _llama_cpp_module(llama_cpp: bool | None):
    if llama_cpp is False:
        return None, "not requested (llama_cpp=False)"
    try:
        import llama_cpp as module
    except ImportError:
        if llama_cpp:
            raise GradmapError(f"llama.cpp figures need llama-cpp-python; {LLAMA_CPP_HINT}") from None
        return None, f"llama-cpp-python is not installed ({LLAMA_CPP_HINT})"
    return module, None


def inference_speed(models: dict[str, Any], tokenizer=None, prefill=SPEED_DEFAULTS["prefill"],
                    decode_tokens: int = SPEED_DEFAULTS["decode_tokens"],
                    batches=SPEED_DEFAULTS["batches"], warmup: int = SPEED_DEFAULTS["warmup"],
                    repeats: int = SPEED_DEFAULTS["repeats"], gguf_paths: dict[str, str] | None = None,
                    llama_cpp: bool | None = None, threads: int | None = None,
                    reference: str = REFERENCE) -> dict[str, Any]:
    """Sizes and measured prefill/decode throughput of every model in `models`, vs `reference`.

    Returns {"settings", "reference", "models": {name: row}} and, with `gguf_paths`, either
    "llama_cpp": {name: row} or "llama_cpp_skipped": why. A row holds layers, params,
    matmul_params, checkpoint_bytes, prefill_tok_s {length: tok/s}, decode_tok_s {batch: tok/s},
    seconds (every timed run), x_dense (each figure / the reference's) and expected_speedup.
    `llama_cpp`: None measures when llama-cpp-python imports, True requires it, False skips.
    `tokenizer` is accepted for symmetry with the other evaluations; ids are random tokens.
    """
    del tokenizer  # throughput does not depend on which tokens are fed
    opts = check_speed_options(prefill, decode_tokens, batches, warmup, repeats)
    if reference not in models:
        raise GradmapError(f"inference_speed needs the reference model {reference!r} among "
                           f"{sorted(models)}; name the dense model {reference!r}")
    if gguf_paths is not None:
        if reference not in gguf_paths or not set(gguf_paths) <= set(models):
            raise GradmapError(f"gguf_paths names {sorted(gguf_paths)}; it needs {reference!r} and "
                               f"only names from {sorted(models)}")
        missing = [str(p) for p in gguf_paths.values() if not Path(p).is_file()]
        if missing:
            raise GradmapError(f"GGUF file(s) {missing} not found; pass existing .gguf paths")
    threads = threads or torch.get_num_threads()
    device = str(next(next(iter(models.values())).parameters()).device)
    result: dict[str, Any] = {"settings": {**opts, "prompt_tokens": PROMPT, "threads": threads,
                                           "device": device},
                              "reference": reference}
    rows = {name: model_sizes(m) for name, m in models.items()}
    _transformers_figures(models, opts, rows)
    _ratios(rows, reference, sizes=True)
    result["models"] = rows
    if gguf_paths is not None:
        module, why = _llama_cpp_module(llama_cpp)
        if module is None:
            result["llama_cpp_skipped"] = why
        else:
            cpp = _llama_cpp_figures(module, gguf_paths, opts, threads)
            _ratios(cpp, reference, sizes=False)
            result["llama_cpp"] = cpp
    return result


def _tok(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def throughputs(row: dict) -> dict[str, float]:
    """A result row's tokens/s keyed as its x_dense ratios are: prefill_<length>, decode_b<batch>."""
    return {**{f"prefill_{k}": v for k, v in row["prefill_tok_s"].items()},
            **{f"decode_b{k}": v for k, v in row["decode_tok_s"].items()}}


def _figures(row: dict) -> str:
    return ", ".join(f"{k} {_tok(v)} (x{row['x_dense'][k]:.2f})" for k, v in throughputs(row).items())


def speed_lines(result: dict[str, Any]) -> list[str]:
    """A plain-text summary of `inference_speed`'s result: one line per model, x dense in brackets."""
    s = result["settings"]
    lines = [f"inference speed ({s['device']}, {s['threads']} threads, median of {s['repeats']} "
             f"round-robin runs; decode: {s['decode_tokens']} tokens after a {s['prompt_tokens']}-token "
             "prompt), tok/s (x dense):"]
    for name, row in result["models"].items():
        lines.append(f"  {name}: {row['params'] / 1e6:.1f}M params (x{row['x_dense']['params']:.2f}), "
                     f"{row['checkpoint_bytes'] / 1e6:.1f} MB, {_figures(row)}, "
                     f"expected x{row['expected_speedup']:.2f} (matmul parameters)")
    for name, row in (result.get("llama_cpp") or {}).items():
        lines.append(f"  llama.cpp {name}: {row['gguf_bytes'] / 1e6:.1f} MB GGUF, {_figures(row)}")
    if result.get("llama_cpp_skipped"):
        lines.append(f"  llama.cpp: skipped, {result['llama_cpp_skipped']}")
    return lines
