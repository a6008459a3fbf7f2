"""What removing k decoder layers buys at inference: throughput, parameters and bytes, vs dense in one run.

    OMP_NUM_THREADS=1 taskset -c 0 python bench/inference_speed.py --remove 4,8,12 --threads 1 \
        --out runs/inference_speed.json                  # SmolLM2-135M, the docs/guide.md table (~20 min)
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
and batch-1 decode figures are taken with llama.cpp on the exported GGUF files. The measurement is
`gradmap.evaluate.speed.inference_speed` (what `gradmap compare --speed` / `gradmap prune --speed`
run); this script builds the k-removed models and writes its historical JSON layout. Not collected by pytest.
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


def _ggufs(models: dict, tok, gguf_dir) -> dict | None:
    import gradmap
    if not any(getattr(m, "gradmap_gguf_source", None) for m in models.values()):
        return None
    return {name: gradmap.export_gguf(m, tok, Path(gguf_dir) / f"layers{m.config.num_hidden_layers}.gguf",
                                      overwrite=True)["path"] for name, m in models.items()}


def _timing(seconds: list[float], tokens: int) -> dict:
    med = statistics.median(seconds)
    return {"median_s": med, "times_s": seconds, "tokens_per_s": tokens / med}


def _bench_layout(speed: dict, ggufs: dict | None) -> dict:
    """The package's result in this script's JSON layout (kept so older result files compare)."""
    s = speed["settings"]
    out = {}
    for name, row in speed["models"].items():
        r = {k: row[k] for k in ("layers", "params", "matmul_params", "checkpoint_bytes")}
        r["safetensors_bytes"] = row["checkpoint_bytes"]
        for length in s["prefill"]:
            r[f"prefill_{length}"] = _timing(row["seconds"][f"prefill_{length}"], length)
        for batch in s["batches"]:
            r[f"decode_b{batch}"] = _timing(row["seconds"][f"decode_b{batch}"], batch * s["decode_tokens"])
        r["speedup"] = {k: v for k, v in row["x_dense"].items() if k.startswith(("prefill_", "decode_b"))}
        r["expected_speedup"] = row["expected_speedup"]
        r["size_ratio"] = row["x_dense"]["checkpoint_bytes"]
        if ggufs:
            r["gguf_bytes"], r["gguf_path"] = Path(ggufs[name]).stat().st_size, ggufs[name]
        out[name] = r
    return out


def _llama_cpp_layout(speed: dict) -> dict | None:
    if "llama_cpp_skipped" in speed:
        return {"skipped": speed["llama_cpp_skipped"]}
    if "llama_cpp" not in speed:
        return {"skipped": "no GGUF source: llama.cpp figures need a .gguf model"}
    return {name: {**{f"prefill_{k}": v for k, v in row["prefill_tok_s"].items()},
                   **{f"decode_b{k}": v for k, v in row["decode_tok_s"].items()}}
            for name, row in speed["llama_cpp"].items()}


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
    from gradmap.evaluate.speed import inference_speed

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
        ggufs = _ggufs(models, tok, gguf_dir)
        speed = inference_speed(models, tok, prefill=args.prefill, decode_tokens=args.decode_tokens,
                                batches=args.batch, warmup=args.warmup, repeats=args.repeats,
                                gguf_paths=ggufs if args.llama_cpp else None, threads=args.threads)
        result = {"machine": machine_info(device), "settings": dict(vars(args)),
                  "models": _bench_layout(speed, ggufs)}
    if args.llama_cpp:
        result["llama_cpp"] = _llama_cpp_layout(speed)
    keys = [f"prefill_{x}" for x in args.prefill] + [f"decode_b{b}" for b in args.batch]
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
