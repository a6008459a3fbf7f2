"""What removing k decoder layers buys at inference: throughput, parameters and bytes, vs dense in one run.

    OMP_NUM_THREADS=1 taskset -c 0 python bench/inference_speed.py --remove 4,8,12 --threads 1 \
        --out runs/inference_speed.json                  # SmolLM2-135M, the README table (~20 min)
    python bench/inference_speed.py --tiny --out /tmp/speed.json   # smoke test, seconds

For dense and each pruned model (the k layers before the last one removed with `remove_layers`; all
layers have the same shape, so which ones does not change speed): parameter count, safetensors
checkpoint bytes, GGUF bytes (GGUF sources: `export_gguf`), prefill tokens/s (batch 1, each --prefill
length, building the KV cache) and decode tokens/s (--decode-tokens single-token steps with the KV
cache after a 32-token prompt, each --batch size). Every measurement has --warmup untimed runs, then
--repeats timed runs taken round-robin over the models (so machine drift hits all alike); the median
is reported with its ratio to dense. `expected_speedup` is the ratio of matmul parameters (decoder
layers + LM head; the embedding is a lookup), i.e. the gain if time were proportional to weights
read/multiplied. With --llama-cpp (needs the gguf-runtime extra and a GGUF source) the same prefill
and batch-1 decode figures are taken with llama.cpp on the exported GGUF files. Not collected by pytest.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = 32


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _load(args):
    import gradmap
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny import tiny_model
        return tiny_model("llama", n_layers=8), None
    model, tok = gradmap.load_model(args.model, dtype=args.dtype)
    return model.to(args.device), tok


def _matmul_params(model) -> int:
    layers = sum(p.numel() for p in model.model.layers.parameters())
    return layers + model.lm_head.weight.numel()


def _sizes(model, tok, gguf_dir) -> dict:
    import gradmap
    out = {"params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
           "matmul_params": _matmul_params(model)}
    with tempfile.TemporaryDirectory() as d:
        path = gradmap.save_pretrained(model, tok, Path(d) / "ck")
        out["checkpoint_bytes"] = sum(f.stat().st_size for f in path.iterdir())
        out["safetensors_bytes"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    if gguf_dir is not None and getattr(model, "gradmap_gguf_source", None):
        n = model.config.num_hidden_layers
        info = gradmap.export_gguf(model, tok, Path(gguf_dir) / f"layers{n}.gguf", overwrite=True)
        out["gguf_bytes"], out["gguf_path"] = info["bytes"], info["path"]
    return out


def _timer(fn, device):
    def run():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t
    return run


def _prefill(model, length: int):
    ids = torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)

    def fn():
        with torch.no_grad():
            model(ids, use_cache=True)
    return fn, length


def _decode(model, batch: int, steps: int):
    import inspect

    from transformers import DynamicCache
    # transformers 5.2x renamed past_key_values to cache (the old name warns until 5.40)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, model.config.vocab_size, (batch, PROMPT), generator=g).to(model.device)
    nxt = torch.randint(3, model.config.vocab_size, (batch, steps), generator=g).to(model.device)

    def fn():
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            model(prompt, use_cache=True, **{key: cache})
            for i in range(steps):
                model(nxt[:, i:i + 1], use_cache=True, **{key: cache})
    # the prompt's prefill is timed too; measured separately and subtracted below
    return fn, batch * steps, _prefill_prompt(model, prompt)


def _prefill_prompt(model, prompt):
    def fn():
        with torch.no_grad():
            model(prompt, use_cache=True)
    return fn


def _measure(models: dict, make, args, device) -> dict:
    """{name: {"median_s", "times", "tokens_per_s"}} for the benchmark `make(model)` builds."""
    built = {name: make(m) for name, m in models.items()}
    times = {name: [] for name in models}
    sub = {name: [] for name in models}
    for name, (fn, _, *rest) in built.items():
        for _ in range(args.warmup):
            fn()
            if rest:
                rest[0]()
    for _ in range(args.repeats):
        for name, (fn, _, *rest) in built.items():
            times[name].append(_timer(fn, device)())
            if rest:  # decode: take the prompt's prefill out of the decode time
                sub[name].append(_timer(rest[0], device)())
    out = {}
    for name, (_, tokens, *rest) in built.items():
        med = statistics.median(times[name]) - (statistics.median(sub[name]) if rest else 0.0)
        out[name] = {"median_s": med, "times_s": times[name], "tokens_per_s": tokens / med}
    return out


def _llama_cpp(sizes: dict, args) -> dict:
    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install 'gradmap[gguf-runtime]')"}
    out = {}
    for name, s in sizes.items():
        if "gguf_path" not in s:
            return {"skipped": "no GGUF source: llama.cpp figures need a .gguf model"}
        llm = llama_cpp.Llama(model_path=s["gguf_path"], n_ctx=max(args.prefill) + 8,
                              n_batch=max(args.prefill), n_threads=args.threads, verbose=False)
        row = {}
        for length in args.prefill:
            ids = list(range(100, 100 + length))
            ts = []
            for r in range(args.warmup + args.repeats):
                llm.reset()
                t = time.perf_counter()
                llm.eval(ids)
                ts.append(time.perf_counter() - t)
            row[f"prefill_{length}"] = length / statistics.median(ts[args.warmup:])
        ts = []
        for r in range(args.warmup + args.repeats):
            llm.reset()
            llm.eval(list(range(100, 100 + PROMPT)))
            t = time.perf_counter()
            for i in range(args.decode_tokens):
                llm.eval([200 + i])
            ts.append(time.perf_counter() - t)
        row["decode_b1"] = args.decode_tokens / statistics.median(ts[args.warmup:])
        out[name] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--remove", type=_ints, default=[4, 8, 12], help="layer counts to remove (4,8,12)")
    p.add_argument("--prefill", type=_ints, default=[512, 2048], help="prefill lengths (512,2048)")
    p.add_argument("--batch", type=_ints, default=[1, 8], help="decode batch sizes (1,8)")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="load dtype (default: the checkpoint's)")
    p.add_argument("--llama-cpp", action="store_true", help="also time the exported GGUFs with llama.cpp")
    p.add_argument("--tiny", action="store_true",
                   help="smoke test: a tiny random 8-layer Llama, short sequences, 2 repeats")
    p.add_argument("--out", required=True, help="JSON output file")
    args = p.parse_args(argv)
    if args.tiny:
        args.remove, args.prefill, args.batch = [2, 4], [32, 64], [1, 2]
        args.decode_tokens, args.repeats = 8, 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import gradmap
    from bench.harness import machine_info

    dense, tok = _load(args)
    n = dense.config.num_hidden_layers
    if max(args.remove) >= n - 1:
        sys.exit(f"--remove {max(args.remove)} leaves no layer besides the last of {n}")
    models = {"dense": dense}
    for k in args.remove:
        m = copy.deepcopy(dense)
        gradmap.remove_layers(m, list(range(n - 1 - k, n - 1)))
        models[f"-{k}"] = m
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as gguf_dir:
        sizes = {name: _sizes(m, tok, gguf_dir) for name, m in models.items()}
        result = {"machine": machine_info(device), "settings": {k: v for k, v in vars(args).items()},
                  "models": {name: {"layers": m.config.num_hidden_layers, **sizes[name]}
                             for name, m in models.items()}}
        for length in args.prefill:
            res = _measure(models, lambda m: _prefill(m, length), args, device)
            for name, r in res.items():
                result["models"][name][f"prefill_{length}"] = r
        for batch in args.batch:
            res = _measure(models, lambda m: _decode(m, batch, args.decode_tokens), args, device)
            for name, r in res.items():
                result["models"][name][f"decode_b{batch}"] = r
        if args.llama_cpp:
            result["llama_cpp"] = _llama_cpp(sizes, args)
    base = result["models"]["dense"]
    keys = [f"prefill_{x}" for x in args.prefill] + [f"decode_b{b}" for b in args.batch]
    for name, row in result["models"].items():
        row["speedup"] = {k: row[k]["tokens_per_s"] / base[k]["tokens_per_s"] for k in keys}
        row["expected_speedup"] = base["matmul_params"] / row["matmul_params"]
        row["size_ratio"] = row["safetensors_bytes"] / base["safetensors_bytes"]
    result["wall_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("model  layers  params  " + "  ".join(f"{k} tok/s (x)" for k in keys) + "  expected x  size x")
    for name, row in result["models"].items():
        print(f"{name:6s} {row['layers']:6d} {row['params'] / 1e6:7.1f}M  " + "  ".join(
            f"{row[k]['tokens_per_s']:9.1f} ({row['speedup'][k]:.2f})" for k in keys) +
            f"  {row['expected_speedup']:.2f}  {row['size_ratio']:.2f}")
    print(f"wrote {args.out} in {result['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
