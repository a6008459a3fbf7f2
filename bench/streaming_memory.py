"""Peak GPU memory and time of GradMAP one-shot scoring: in memory vs layer streaming (offload="layer").

    pytest bench/streaming_memory.py --benchmark-disable        # CPU smoke: tiny Llama, runs once
    pytest bench/streaming_memory.py --benchmark-only -s        # CUDA: the measured rows below

Rows (CUDA only; random bf16 weights built from LlamaConfig, nothing is downloaded):

* ``llama3-8b/in-memory``: Llama-3-8B shape (hidden 4096, 32 layers, intermediate 14336,
  32 heads, 8 KV heads, vocab 128256) with every weight on the GPU;
* ``llama3-8b/streamed``: the same model with its weights on the CPU and one decoder layer
  at a time on the GPU;
* ``llama70b-layer/streamed``: Llama-70B-shaped layers (hidden 8192, intermediate 28672, 64
  heads, 8 KV heads) streamed with 2 and 4 decoder layers; the per-layer cost is the slope
  and ``extrapolated_80_layers_s`` = t(2) + 78·slope — an EXTRAPOLATION, not a measurement.

Scoring = `GradMAP(gradient="token").score`: one forward + one backward over the calibration
set (GRADMAP_BENCH_NCAL x GRADMAP_BENCH_SEQ tokens, default 8 x 2048, micro-batches of one
sequence). `peak_total_mib` is torch.cuda.max_memory_allocated during the timed rounds
(weights resident on the GPU included).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from gradmap import fast_prune, get_adapter
from gradmap.prune.metrics import GradMAP, ScoringRun
from gradmap.runtime.streaming import layer_offload

from .harness import measure

NCAL = int(os.environ.get("GRADMAP_BENCH_NCAL", "8"))
SEQ = int(os.environ.get("GRADMAP_BENCH_SEQ", "2048"))
LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)
LLAMA_70B_LAYER = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: measures peak GPU memory of in-memory vs streamed scoring")


def random_llama(device: str, **shape) -> torch.nn.Module:
    """A bf16 Llama of `shape` with N(0, 0.02) weights and unit norms, materialised on `device`."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    config = LlamaConfig(max_position_embeddings=max(SEQ, 2048), tie_word_embeddings=False, **shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(1.0)
    # the rotary tables are non-persistent buffers computed in __init__, never on "meta": rebuild
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config).to(device)
    return model.eval()


def _score(model: torch.nn.Module, calib: torch.Tensor, streamed: bool, device: str):
    ad = get_adapter(model)
    run = ScoringRun(model, ad, calib, 1, ad.original_ids[1:-1], 1)
    if not streamed:
        return GradMAP().score(run)
    with layer_offload(model, device):
        return GradMAP().score(run)


def _calib(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (NCAL, SEQ), generator=g)


def _peak(benchmark, device: str) -> None:
    benchmark.extra_info["peak_total_mib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)


def test_cpu_smoke_streamed_equals_in_memory(benchmark):
    """Any machine: tiny random Llama, layer streaming on the CPU removes what the in-memory path removes."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from tiny import random_ids, tiny_model
    calib = random_ids(4, 16)

    def both():
        a = fast_prune(tiny_model("llama", n_layers=6), calib, 2, metric="gradmap", compensation="none",
                       schedule="one-shot", batch_size=2)
        b = fast_prune(tiny_model("llama", n_layers=6), calib, 2, metric="gradmap", compensation="none",
                       schedule="one-shot", batch_size=2, offload="layer", compute_device="cpu")
        return a, b
    a, b = measure(benchmark, both, group="streaming-smoke", rounds=1, warmup_rounds=0)
    assert a.removed_layers == b.removed_layers
    assert a.scores == b.scores


@needs_cuda
@pytest.mark.parametrize("mode", ["in-memory", "streamed"])
def test_llama3_8b_scoring(benchmark, mode):
    device = "cuda"
    model = random_llama(device, **LLAMA3_8B)
    if mode == "streamed":
        model.to("cpu")
        torch.cuda.empty_cache()
    calib = _calib(LLAMA3_8B["vocab_size"])
    scores = measure(benchmark, lambda: _score(model, calib, mode == "streamed", device),
                     group="llama3-8b gradmap one-shot scoring", device=device, rounds=2, warmup_rounds=1,
                     baseline=mode == "in-memory", mode=mode, ncal=NCAL, seq=SEQ)
    _peak(benchmark, device)
    assert len(scores) == 32
    del model
    torch.cuda.empty_cache()


@needs_cuda
def test_llama70b_layer_streamed_extrapolated(benchmark):
    import time
    device = "cuda"
    calib = _calib(LLAMA_70B_LAYER["vocab_size"])
    seconds = {}
    for n_layers in (2, 4):
        model = random_llama(device, num_hidden_layers=n_layers, **LLAMA_70B_LAYER).to("cpu")
        torch.cuda.empty_cache()
        _score(model, calib[:1], True, device)  # warm-up (kernels, allocator)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        _score(model, calib, True, device)
        torch.cuda.synchronize()
        seconds[n_layers] = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(device)
        del model
    slope = (seconds[4] - seconds[2]) / 2
    benchmark.extra_info.update(
        seconds_2_layers=round(seconds[2], 3), seconds_4_layers=round(seconds[4], 3),
        per_layer_step_s=round(slope, 3), extrapolated_80_layers_s=round(seconds[2] + 78 * slope, 1),
        extrapolation="t(80) = t(2) + 78 * (t(4) - t(2)) / 2; not measured",
        peak_total_mib_4_layers=round(peak / 2 ** 20, 1), ncal=NCAL, seq=SEQ)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the numbers are in extra_info
