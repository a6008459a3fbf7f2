"""Zero-shot multiple-choice accuracy scored exactly as lm-evaluation-harness scores it.

Each choice `i` of an example is scored by `ll_i = sum_t log p(cont_t | context, cont_<t)`, the
context and continuation tokenised separately (no special tokens; a BOS is prepended only for
Gemma models, as lm-eval does) and the whole request truncated from the left to the model's
maximum length.  `acc` = [argmax_i ll_i == gold], `acc_norm` = [argmax_i ll_i / chars_i == gold]
(Gao et al., "A framework for few-shot language model evaluation", lm-evaluation-harness).

Speed without changing the numbers: requests that share a context are scored from one forward
of that context.  A batch of distinct contexts is left-padded and run once with a KV cache; the
cache is then repeated per continuation and the continuations (right-padded) run on top of it.
Real positions never attend to padding, so scores equal one unbatched forward per request up
to float rounding (tests/test_evaluate.py checks this against such a loop).  The same pass
records lm-eval's `is_greedy` per request (LAMBADA's accuracy, `gradmap/evaluate/lambada.py`).
"""
from __future__ import annotations

import copy
import inspect
import logging
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from gradmap.core.errors import GradmapError
from gradmap.evaluate.intervals import wilson_interval
from gradmap.evaluate.lambada import lambada_metrics
from gradmap.evaluate.perplexity import input_device
from gradmap.evaluate.tasks import TASKS, Example, build_examples, resolve_tasks

__all__ = ["zero_shot", "loglikelihoods", "greedy_loglikelihoods", "encode_request", "max_length",
           "correctness", "PAD_SLACK"]

log = logging.getLogger(__name__)

# A padded batch may hold at most this many positions per real token (contexts and
# continuations alike); more padding is cheaper as a separate, smaller forward on CPU.
PAD_SLACK = 1.25


@dataclass
class _Group:
    """All requests sharing one context: token ids, continuations and their output slots."""

    ctx: list[int]
    conts: list[list[int]]
    slots: list[int]


def max_length(model, default: int = 2048) -> int:
    """lm-eval's HFLM max length: the first of n_positions / max_position_embeddings / n_ctx."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _adds_bos(model) -> bool:
    # lm-eval forces add_bos_token for Gemma: those models degrade badly without a BOS
    return "gemma" in str(getattr(model.config, "model_type", ""))


def encode_request(tokenizer, context: str, continuation: str, add_bos: bool = False,
                   max_len: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids `(context, continuation)` as lm-eval's `_encode_pair`, tokenised separately.

    Trailing spaces of the context move to the front of the continuation; an empty context
    becomes the BOS/EOS token; with `max_len` the context is cut from the left so that the
    model input `(ctx + cont)[:-1]` has at most `max_len` tokens.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    # verbose=False: long contexts are truncated below, the tokenizer's length warning is noise
    ctx = (tokenizer(context, add_special_tokens=False, verbose=False)["input_ids"]
           if context else [])
    cont = tokenizer(continuation, add_special_tokens=False, verbose=False)["input_ids"]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if add_bos or not ctx:
        if prefix is None:
            raise GradmapError("tokenizer has neither a BOS nor an EOS token to start a request "
                               "with; set tokenizer.bos_token before scoring")
        ctx = [prefix] + ctx
    if not cont:
        raise GradmapError(f"continuation {continuation!r} encodes to no tokens; every choice "
                           "needs at least one token")
    if max_len is not None and len(ctx) + len(cont) - 1 > max_len:
        keep = max_len + 1 - len(cont)
        if keep < 1:
            raise GradmapError(f"a continuation of {len(cont)} tokens does not fit the model's "
                               f"max length {max_len}; use a model with longer positions")
        ctx = ctx[-keep:]
    return ctx, cont


def _cache_kwarg(model) -> str:
    """The forward's name for an input KV cache: `cache` from transformers 5.3x (where
    `past_key_values` warns that it is deprecated), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _device(model) -> torch.device:
    return input_device(model)  # the embedding's device: works when accelerate offloaded the first weights


def _pick_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[targets] in fp32 without keeping a full log-softmax copy."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _chunks(lengths: list[int], max_rows: int, weights: list[int] | None = None) -> list[list[int]]:
    """Split indices of `lengths` (sorted longest first) into padded batches.

    A batch grows while it has at most `max_rows` rows (`weights` counts rows per item) and its
    padded area `n * lengths[first]` stays within `PAD_SLACK` of the real tokens.
    """
    weights = weights or [1] * len(lengths)
    out: list[list[int]] = []
    for i, n in enumerate(lengths):
        if out:
            cur = out[-1]
            rows = sum(weights[j] for j in cur) + weights[i]
            real = sum(lengths[j] for j in cur) + n
            if rows <= max_rows and (len(cur) + 1) * lengths[cur[0]] <= PAD_SLACK * real:
                cur.append(i)
                continue
        out.append([i])
    return out


def _score_batch(model, groups: list[_Group], pad_id: int, max_rows: int,
                 out: list[float], greedy: list[bool]) -> int:
    """Score every continuation of `groups` into `out`; returns positions forwarded.

    `greedy[slot]` says whether every continuation token is the argmax of its position's
    logits (lm-eval's `is_greedy`, the LAMBADA accuracy).

    One left-padded forward of the contexts gives each first continuation token's log-prob and
    the KV cache; the other continuation tokens run on top of that cache, rows sorted by length
    and cut into sub-batches (`_chunks`) so right padding stays small.
    """
    device = _device(model)
    n_ctx = max(len(g.ctx) for g in groups)
    ids = torch.full((len(groups), n_ctx), pad_id, dtype=torch.long)
    mask = torch.zeros((len(groups), n_ctx), dtype=torch.long)
    for k, g in enumerate(groups):  # left padding: every context ends at column n_ctx - 1
        ids[k, n_ctx - len(g.ctx):] = torch.tensor(g.ctx)
        mask[k, n_ctx - len(g.ctx):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    rows = [(k, c, s) for k, g in enumerate(groups) for c, s in zip(g.conts, g.slots)]
    longer = sorted((r for r in range(len(rows)) if len(rows[r][1]) > 1),
                    key=lambda r: -len(rows[r][1]))  # rows whose tokens after the first need input
    res = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                position_ids=pos.to(device), use_cache=bool(longer), logits_to_keep=1)
    first = torch.tensor([c[0] for _, c, _ in rows], device=device)
    row_ctx = torch.tensor([k for k, _, _ in rows], device=device)
    first_logits = res.logits[row_ctx, -1, :]
    scores = _pick_logprobs(first_logits, first).double()
    is_greedy = first_logits.argmax(dim=-1) == first
    forwarded = len(groups) * n_ctx
    chunks = _chunks([len(rows[r][1]) - 1 for r in longer], max_rows)
    for n, chunk in enumerate(chunks):
        sel = [longer[i] for i in chunk]
        # the last sub-batch may consume the context cache; earlier ones work on a copy
        cache = res.past_key_values if n == len(chunks) - 1 else copy.deepcopy(res.past_key_values)
        ctx_of = torch.tensor([rows[r][0] for r in sel])
        cache.reorder_cache(ctx_of.to(device))  # one cache row per continuation (repeats allowed)
        width = len(rows[sel[0]][1]) - 1  # the last continuation token is never input
        c_ids = torch.full((len(sel), width), pad_id, dtype=torch.long)
        c_tgt = torch.zeros((len(sel), width), dtype=torch.long)
        c_mask = torch.zeros((len(sel), width), dtype=torch.long)
        c_pos = torch.zeros((len(sel), width), dtype=torch.long)
        for j, r in enumerate(sel):
            k, c, _ = rows[r]
            m = len(c) - 1
            c_ids[j, :m] = torch.tensor(c[:-1], dtype=torch.long)
            c_tgt[j, :m] = torch.tensor(c[1:], dtype=torch.long)
            c_mask[j, :m] = 1
            c_pos[j] = len(groups[k].ctx) + torch.arange(width)
        full_mask = torch.cat([mask[ctx_of], c_mask], dim=1)
        res2 = model(input_ids=c_ids.to(device), attention_mask=full_mask.to(device),
                     position_ids=c_pos.to(device), use_cache=True, **{_cache_kwarg(model): cache})
        lp = _pick_logprobs(res2.logits, c_tgt.to(device)).double()
        idx = torch.tensor(sel, device=device)
        scores[idx] += (lp * c_mask.to(device)).sum(dim=1)
        hits = (res2.logits.argmax(dim=-1) == c_tgt.to(device)) | (c_mask.to(device) == 0)
        is_greedy[idx] &= hits.all(dim=1)
        forwarded += len(sel) * width
    for (_, _, slot), value, g in zip(rows, scores.tolist(), is_greedy.tolist()):
        out[slot] = value
        greedy[slot] = bool(g)
    return forwarded


def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 32,
                   progress: bool = True, desc: str = "zero-shot") -> tuple[list[float], int]:
    """Sum of continuation log-probs for token-id requests `(ctx, cont)`; returns (scores, fwd).

    Requests with equal contexts share one context forward.  Groups are sorted by context
    length (longest first) and packed (`_chunks`) so each batch holds at most `batch_size`
    continuations (at least one group) with little padding.  `fwd` counts positions forwarded,
    padding included.
    """
    scores, _, forwarded = greedy_loglikelihoods(model, requests, batch_size, progress, desc)
    return scores, forwarded


def greedy_loglikelihoods(model, requests: list[tuple[list[int], list[int]]],
                          batch_size: int = 32, progress: bool = True,
                          desc: str = "zero-shot") -> tuple[list[float], list[bool], int]:
    """`loglikelihoods` plus lm-eval's `is_greedy` per request: (scores, greedy, fwd).

    `greedy[i]` is True when every continuation token of request `i` is the argmax of the
    logits at its position (ties go to the lowest token id, as torch.argmax), i.e. greedy
    decoding from the context would produce exactly the continuation.
    """
    by_ctx: dict[tuple[int, ...], _Group] = {}
    for slot, (ctx, cont) in enumerate(requests):
        g = by_ctx.setdefault(tuple(ctx), _Group(list(ctx), [], []))
        g.conts.append(list(cont))
        g.slots.append(slot)
    groups = sorted(by_ctx.values(), key=lambda g: (-len(g.ctx), -max(map(len, g.conts))))
    pad_id = getattr(model.config, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    out = [float("nan")] * len(requests)
    greedy = [False] * len(requests)
    forwarded = 0
    batches = _chunks([len(g.ctx) for g in groups], batch_size, [len(g.conts) for g in groups])
    with torch.no_grad(), tqdm(total=len(requests), desc=desc, unit="req",
                               disable=not progress) as bar:
        for chunk in batches:
            batch = [groups[i] for i in chunk]
            forwarded += _score_batch(model, batch, pad_id, batch_size, out, greedy)
            bar.update(sum(len(g.conts) for g in batch))
    return out, greedy, forwarded


def correctness(examples: list[Example], scores: list[float]) -> dict[str, list[int]]:
    """Per-example 0/1 correctness under `acc` and `acc_norm`, from the requests' log-likelihoods.

    `scores` holds one log-likelihood per request, in the order of `ex.requests` for each
    example. Ties resolve to the first maximum, as numpy.argmax in lm-eval.
    """
    out: dict[str, list[int]] = {"acc": [], "acc_norm": []}
    i = 0
    for ex in examples:
        ll = scores[i:i + len(ex.requests)]
        i += len(ex.requests)
        normed = [v / n for v, n in zip(ll, ex.choice_chars)]
        for key, vals in (("acc", ll), ("acc_norm", normed)):
            out[key].append(int(max(range(len(vals)), key=lambda j: (vals[j], -j)) == ex.gold))
    return out


def zero_shot(model, tokenizer, tasks: str | list[str] = "all", limit: int | None = None,
              batch_size: int = 32, progress: bool = True, per_example: bool = False) -> dict:
    """lm-eval-style zero-shot accuracy on BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e/c, OBQA,
    and LAMBADA beside them (`"all"` names all eight).

    Returns `{"tasks": {name: {"acc", ["acc_norm"], "n", "metric", "value", "interval"}},
    "average", "average_metrics", "lambada_openai", "limit", "requests", "tokens",
    "forwarded_tokens", "seconds", "tokens_per_s"}`.  `value` is the metric the papers quote
    for the task (`metric`), `interval` its 95% Wilson interval on n examples, and `average`
    the mean of those values over the multiple-choice tasks evaluated (None without one).
    `lambada_openai` (None unless asked for) is `{"acc", "interval", "ppl", "n"}`
    (`gradmap/evaluate/lambada.py`), never part of `average`.  `limit` takes the first N
    examples of every task, LAMBADA included.  `tokens` counts `len(ctx) + len(cont)` per
    request (what an unbatched scorer would forward); `tokens_per_s` divides it by the wall
    time of scoring.  With `per_example`, each entry also holds `correct = {metric: [0/1 per
    example]}` for its metrics (LAMBADA: `{"acc": [...]}`), in the task's example order (the
    same for every model), so two models can be compared with paired tests.
    """
    names = resolve_tasks(tasks)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise GradmapError(f"limit must be a positive integer or None, got {limit!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise GradmapError(f"batch_size must be a positive integer, got {batch_size!r}")
    built = {name: build_examples(name, limit) for name in names}  # fails early on missing data
    add_bos, max_len = _adds_bos(model), max_length(model)
    was_training = model.training
    model.eval()
    result: dict = {"tasks": {}, "lambada_openai": None, "limit": limit}
    total_tokens = total_requests = total_forwarded = 0
    seconds = 0.0
    try:
        for name in names:
            examples = built[name]
            if not examples:
                raise GradmapError(f"task {name!r} has no examples; check its data file")
            requests = [encode_request(tokenizer, c, t, add_bos, max_len)
                        for ex in examples for c, t in ex.requests]
            start = time.perf_counter()
            scores, greedy, forwarded = greedy_loglikelihoods(model, requests, batch_size,
                                                              progress, desc=name)
            seconds += time.perf_counter() - start
            total_tokens += sum(len(c) + len(t) for c, t in requests)
            total_requests += len(requests)
            total_forwarded += forwarded
            spec = TASKS[name]
            if spec.greedy:  # one request per example: right when it is the greedy prediction
                entry = lambada_metrics(scores, greedy)
                if per_example:
                    entry["correct"] = {"acc": [int(g) for g in greedy]}
                result[name] = entry
                log.info("%s: acc %.4f, ppl %.3f (n=%d)", name, entry["acc"], entry["ppl"],
                         entry["n"])
                continue
            correct = correctness(examples, scores)
            m = {k: sum(v) / len(examples) for k, v in correct.items()}
            entry = {k: m[k] for k in spec.metrics}
            value = m[spec.average_metric]
            entry.update(n=len(examples), metric=spec.average_metric, value=value,
                         interval=list(wilson_interval(value, len(examples))))
            if per_example:
                entry["correct"] = {k: correct[k] for k in spec.metrics}
            result["tasks"][name] = entry
            log.info("%s: %s (n=%d)", name, {k: round(v, 4) for k, v in m.items()}, len(examples))
    finally:
        model.train(was_training)
    values = [e["value"] for e in result["tasks"].values()]
    result.update(average=sum(values) / len(values) if values else None,
                  average_metrics={n: e["metric"] for n, e in result["tasks"].items()},
                  requests=total_requests, tokens=total_tokens, forwarded_tokens=total_forwarded,
                  seconds=seconds, tokens_per_s=total_tokens / seconds if seconds > 0 else 0.0)
    return result
