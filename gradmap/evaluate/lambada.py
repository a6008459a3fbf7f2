"""LAMBADA last-word prediction, scored as lm-evaluation-harness's `lambada_openai`.

Each text (the OpenAI version of LAMBADA, Paperno et al. 2016) is split at its last space:
context = `text.rsplit(" ", 1)[0]`, continuation = `" " + last word`, tokenised as the other
zero-shot requests (`encode_request`: context and continuation separately).  With
ll_i = Σ_t log p(cont_t | context, cont_<t) and g_i = [every continuation token is the argmax
of its position] (lm-eval's `is_greedy`):

    acc = mean_i g_i        perplexity = exp(−mean_i ll_i)

(lm-eval's `perplexity` aggregation: a mean over documents of the summed log-probability of
the word, not a per-token mean).  Layer removal hurts this generative probe far more than the
multiple-choice tasks, so it is reported beside the seven-task average, never inside it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from gradmap.core.errors import GradmapError
from gradmap.evaluate.intervals import wilson_interval

__all__ = ["lambada_metrics"]


def lambada_metrics(loglikelihoods: Sequence[float], greedy: Sequence[bool]) -> dict:
    """`{"acc", "interval", "ppl", "n"}` of LAMBADA from each text's (ll_i, g_i).

    `interval` is the 95% Wilson interval of `acc` on n texts.
    """
    n = len(loglikelihoods)
    if n == 0 or len(greedy) != n:
        raise GradmapError(f"LAMBADA needs one log-likelihood and one greedy flag per text, got "
                           f"{n} and {len(greedy)}; check tasks/lambada_openai_test.jsonl")
    acc = sum(map(bool, greedy)) / n
    mean_ll = math.fsum(loglikelihoods) / n
    return {"acc": acc, "interval": list(wilson_interval(acc, n)), "ppl": math.exp(-mean_ll),
            "n": n}
