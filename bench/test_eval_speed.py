"""Scorer throughput on SmolLM2-135M (CPU): zero-shot tokens/s and perplexity tokens/s.

    pytest bench/test_eval_speed.py                       # measure (one round each)
    pytest bench/test_eval_speed.py --benchmark-disable   # smoke test: runs each once
    GRADMAP_BENCH_LIMIT=50 pytest bench/test_eval_speed.py --benchmark-only

`extra_info` records tokens, tokens/s and the device; zero-shot `tokens` counts
len(context) + len(continuation) per request, i.e. the work a one-forward-per-request scorer
does, so the shared-context scorer's gain shows up as a higher tokens/s than the naive loop.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see conftest

import platform  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from gradmap.evaluate import perplexity_report, zero_shot  # noqa: E402
from gradmap.evaluate.tasks import TASK_NAMES, build_examples  # noqa: E402
from gradmap.evaluate.zero_shot import encode_request, max_length  # noqa: E402

LIMIT = int(os.environ.get("GRADMAP_BENCH_LIMIT", "3"))
THREADS = int(os.environ.get("GRADMAP_BENCH_THREADS", str(max(1, min(2, os.cpu_count() or 1)))))


@pytest.fixture(scope="module")
def smollm2():
    from gradmap import load_model
    torch.set_num_threads(THREADS)
    return load_model("smollm2-135m")


def _info(benchmark, tokens: int, seconds: float, **extra) -> None:
    benchmark.extra_info.update(
        tokens=tokens, seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 1),
        threads=torch.get_num_threads(), torch=torch.__version__, cpu=platform.processor() or
        platform.machine(), **extra)


def test_zero_shot_scorer_tokens_per_s(benchmark, smollm2):
    model, tok = smollm2
    res = benchmark.pedantic(lambda: zero_shot(model, tok, "all", limit=LIMIT, batch_size=32,
                                               progress=False), rounds=1, iterations=1)
    assert [e["n"] for e in res["tasks"].values()] == [LIMIT] * len(TASK_NAMES)
    assert 0.0 <= res["average"] <= 1.0 and res["tokens"] > res["forwarded_tokens"] / 2
    _info(benchmark, res["tokens"], res["seconds"], limit=LIMIT, requests=res["requests"],
          forwarded_tokens=res["forwarded_tokens"])


def test_naive_per_request_loop_tokens_per_s(benchmark, smollm2):
    """Baseline: one unbatched forward per (context, continuation), as a plain loop does it."""
    model, tok = smollm2
    max_len = max_length(model)
    reqs = [encode_request(tok, c, t, False, max_len) for name in TASK_NAMES
            for ex in build_examples(name, LIMIT) for c, t in ex.requests]

    def naive():
        start = time.perf_counter()
        with torch.no_grad():
            for ctx, cont in reqs:
                x = torch.tensor([(ctx + cont)[:-1]])
                lp = model(x, use_cache=False).logits[0, -len(cont):].float().log_softmax(-1)
                lp.gather(-1, torch.tensor(cont)[:, None]).sum()
        return time.perf_counter() - start

    seconds = benchmark.pedantic(naive, rounds=1, iterations=1)
    _info(benchmark, sum(len(c) + len(t) for c, t in reqs), seconds, limit=LIMIT)


def test_perplexity_tokens_per_s(benchmark, smollm2):
    model, tok = smollm2
    rep = benchmark.pedantic(lambda: perplexity_report(model, tok, "wikitext2", seq_len=512,
                                                       max_windows=2, progress=False),
                             rounds=1, iterations=1)
    assert rep.windows == 2 and 5.0 < rep.ppl < 100.0
    _info(benchmark, rep.tokens, rep.seconds, seq_len=512, windows=rep.windows)
