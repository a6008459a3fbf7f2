"""WikiText-2 perplexity of the model with given layer sets removed (no compensation).

    python bench/eval_removed_sets.py --from-bench bench/results/prune_speed_cpu.json --windows 8 --out sets.jsonl

Without compensation a pruned model depends only on the removed set, so the layer sets that
a timing run chose (pytest-benchmark JSON of bench/test_prune_speed.py, `extra_info.removed`)
can be scored afterwards without re-running the metrics. One JSON line per set is appended to
--out (a rerun skips sets already there). Not collected by pytest (no test_ prefix).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--from-bench", type=Path, required=True)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from gradmap import load_model, remove_layers
    from gradmap.evaluate import perplexity_report

    cases = [(b["extra_info"]["case"], b["extra_info"]["removed"])
             for b in json.loads(args.from_bench.read_text())["benchmarks"] if "removed" in b["extra_info"]]
    done = {json.loads(l)["case"] for l in args.out.read_text().splitlines()} if args.out.exists() else set()
    model, tok = load_model(args.model)
    for case, removed in cases:
        if case in done:
            continue
        pruned = copy.deepcopy(model)
        remove_layers(pruned, removed)
        rep = perplexity_report(pruned, tok, "wikitext2", 2048, args.windows, progress=False)
        row = {"case": case, "removed": removed, "ppl": rep.ppl, "windows": args.windows,
               "source": str(args.from_bench)}
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        del pruned


if __name__ == "__main__":
    main()
