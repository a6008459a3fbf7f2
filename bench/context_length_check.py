"""Is the WikiText-2 gap between the default's two candidates a long-context effect? (issue 24, Part 4)

    OMP_NUM_THREADS=1 taskset -c 1 python bench/context_length_check.py SEED N_PRUNE OUT.jsonl

Prunes SmolLM2 with each `auto` candidate (the seed's 32 x 256 C4 rows), then measures WikiText-2
PPL with windows of 256, 512 and 2048 tokens over the same first 32,768 tokens; the dense model
first. One JSON line per model. Not collected by pytest.
"""
from __future__ import annotations

import gc
import json
import sys

import torch

import gradmap
from gradmap.core.calibration import calibration_data
from gradmap.evaluate import perplexity_report
from gradmap.experiments.dense_source import DenseSource
from gradmap.prune.pipeline import CANDIDATES, pipeline_name

TOKENS = 32768


def main() -> None:
    torch.set_num_threads(1)
    seed, n_prune, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    source = DenseSource(gradmap.load_model, "smollm2-135m", None, "cpu", "reload")
    tok = source.tokenizer
    calib = calibration_data(tok, "c4", 32, 256, seed)
    for cand in [None, *CANDIDATES]:
        model = source.fresh()
        name = "dense"
        if cand is not None:
            gradmap.fast_prune(model, calib, n_prune, metric=cand["metric"], compensation=list(cand["compensation"]),
                               schedule=cand["schedule"], progress=False, **cand["metric_options"])
            name = pipeline_name(cand)
        row = {"seed": seed, "n_prune": n_prune, "pipeline": name}
        for length in (256, 512, 2048):
            row[f"ppl_{length}"] = perplexity_report(model, tok, "wikitext2", seq_len=length,
                                                     max_windows=TOKENS // length, progress=False).ppl
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        del model
        gc.collect()


if __name__ == "__main__":
    main()
