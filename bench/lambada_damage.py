"""LAMBADA on the dense and a depth-pruned SmolLM2 (issue 26, Part 1): the damage probe's figures.

    flock /tmp/cpu0.lock taskset -c 0 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
        python bench/lambada_damage.py --n-prune 8 --n-calib 16 --seq-len 256 \
        --out bench/results/lambada_n8_16x256.json

Measures LAMBADA (lm-eval's `lambada_openai`: accuracy with its 95% Wilson interval, and
perplexity of the last word) on all 5,153 texts (or the first --limit) and WikiText-2 PPL
(L = 2048, first --ppl-windows windows) of the dense model, then prunes it with the default
pipeline (`gradmap.fast_prune` with no method: `auto`) on a C4 calibration draw and measures
the pruned model the same way. Writes one JSON with every figure, the wall time of each
step and the command. Not collected by pytest (no test_ prefix).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import gradmap
from gradmap.core.calibration import calibration_data
from gradmap.evaluate import perplexity_report, zero_shot
from gradmap.experiments.methods import method_from_result


def evaluate(model, tokenizer, args) -> dict:
    start = time.perf_counter()
    zs = zero_shot(model, tokenizer, "lambada_openai", limit=args.limit,
                   batch_size=args.eval_batch_size, progress=False)
    lam = dict(zs["lambada_openai"], seconds=time.perf_counter() - start, tokens=zs["tokens"])
    start = time.perf_counter()
    rep = perplexity_report(model, tokenizer, "wikitext2", seq_len=args.ppl_seq_len,
                            max_windows=args.ppl_windows, progress=False)
    return {"lambada": lam, "wikitext2": dict(rep.as_dict(), seconds=time.perf_counter() - start)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n-prune", type=int, default=8)
    p.add_argument("--n-calib", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="first N LAMBADA texts (default: all)")
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--ppl-seq-len", type=int, default=2048)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    import transformers
    out: dict = {"command": shlex.join(["python"] + sys.argv), "settings": vars(args) | {"out": str(args.out)},
                 "machine": {"platform": platform.platform(), "affinity": sorted(os.sched_getaffinity(0)),
                             "torch_threads": torch.get_num_threads(),
                             "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
                 "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                              "gradmap": gradmap.__version__}}
    start = time.perf_counter()
    model, tokenizer = gradmap.load_model(args.model)
    out["load_seconds"] = time.perf_counter() - start
    out["dense"] = evaluate(model, tokenizer, args)
    print(json.dumps(out["dense"], indent=1), flush=True)
    calib = calibration_data(tokenizer, "c4", n_samples=args.n_calib, seq_len=args.seq_len,
                             seed=args.seed)
    start = time.perf_counter()
    res = gradmap.fast_prune(model, calib, args.n_prune, progress=False)
    out["prune"] = {"wall_seconds": time.perf_counter() - start,
                    "removed_layers": sorted(res.removed_layers), "timings": dict(res.timings),
                    "pipeline": method_from_result(res.to_dict())}
    out["pruned"] = evaluate(model, tokenizer, args)
    print(json.dumps(out["pruned"], indent=1), flush=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
