"""Data-parallel scaling of layer scoring: wall time of `fast_prune` at a fixed calibration set.

    python bench/distributed_scaling.py --model smollm2-135m --n-calib 8 --seq-len 256
    torchrun --nproc_per_node=2 bench/distributed_scaling.py --model smollm2-135m --n-calib 8 --seq-len 256

Every rank loads the model and draws the SAME n_calib x seq_len calibration tokens, so the
total work is fixed and only its split changes with the number of processes. Each metric in
--metrics (GradMAP one-shot scoring by default; block-influence optional) runs `fast_prune`
(n_prune=4, compensation "none", one-shot) on a fresh copy of the model, --repeats times,
between barriers, so a wall time covers the slowest rank. Rank 0 prints one JSON line per
metric (wall times, world size, threads per rank, device, removed layers) and appends it to
--out. `--tiny` swaps in a random 8-layer Llama for a quick check of the script itself.
Not collected by pytest (no test_ prefix). torchrun sets OMP_NUM_THREADS=1 per rank unless
told otherwise; pass --threads to fix threads per rank explicitly when comparing runs. Give
torchrun a fixed free --master_port (e.g. 29500, its default): --master_port=0 hangs here.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch

from gradmap.core import distributed
from gradmap.prune.driver import fast_prune


def _tiny_model(seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=256, max_position_embeddings=2048, num_hidden_layers=8)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval(), None


def _calibration(model, tokenizer, args) -> torch.Tensor:
    if tokenizer is None:  # --tiny: random ids, identical on every rank
        g = torch.Generator().manual_seed(args.seed)
        return torch.randint(3, model.config.vocab_size, (args.n_calib, args.seq_len), generator=g)
    from gradmap.core.calibration import calibration_data
    return calibration_data(tokenizer, args.calib, args.n_calib, args.seq_len, args.seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tiny", action="store_true", help="random tiny Llama instead of --model")
    p.add_argument("--metrics", default="gradmap", help="comma-separated, e.g. gradmap,block-influence")
    p.add_argument("--n-calib", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib", default="c4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-prune", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch rows (default ~2048 tokens)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: unchanged)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="append JSON lines here (rank 0)")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    with distributed.process_group(args.device) as device:
        if args.tiny:
            model, tokenizer = _tiny_model()
            model.to(device)
        else:
            from gradmap.core.models import load_model
            model, tokenizer = load_model(args.model, device=device)
        calib = _calibration(model, tokenizer, args)
        for metric in [m.strip() for m in args.metrics.split(",") if m.strip()]:
            walls, result = [], None
            for _ in range(args.repeats):
                work = copy.deepcopy(model)
                distributed.barrier()
                t = time.perf_counter()
                result = fast_prune(work, calib, args.n_prune, metric=metric, compensation="none",
                                    schedule="one-shot", batch_size=args.batch_size)
                distributed.barrier()
                walls.append(time.perf_counter() - t)
                del work
            if not distributed.is_main():
                continue
            row = {"bench": "distributed_scaling", "model": "tiny" if args.tiny else args.model,
                   "metric": metric, "world_size": distributed.world_size(),
                   "threads_per_rank": torch.get_num_threads(),
                   "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "device": str(device),
                   "n_calib": args.n_calib, "seq_len": args.seq_len, "tokens": args.n_calib * args.seq_len,
                   "n_prune": args.n_prune, "batch_size": result.options["batch_size"],
                   "wall_s": walls, "wall_s_min": min(walls), "wall_s_median": statistics.median(walls),
                   "scoring_s_rank0": result.timings.get("scoring"),
                   "removed_layers": result.removed_layers, "torch": torch.__version__,
                   "host": platform.node(), "cpus": os.cpu_count()}
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
