"""Perplexity and zero-shot scoring against slow, direct reference computations."""
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from gradmap.core.calibration import DATA_ENV
from gradmap.core.errors import GradmapError
from gradmap.evaluate import TASK_NAMES, perplexity, perplexity_report, zero_shot
from gradmap.evaluate.tasks import build_examples, hellaswag_preprocess
from gradmap.evaluate.zero_shot import encode_request, loglikelihoods
from tiny import tiny_model
from tiny_tokenizer import tiny_tokenizer

TEXT = ("the cat sat on the mat. then the dog ran to the park and the man went home.\n\n"
        " = a heading = \n\nquestion: what is the answer? answer: yes, and then no. ") * 12


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", n_layers=3, seed=1)


# ---------------------------------------------------------------- perplexity

def _reference_ppl(model, ids: list[int], seq_len: int, max_windows=None) -> float:
    """SparseGPT/Wanda `eval_ppl`: one window at a time, HF loss * L, exp(sum / (W * L))."""
    n = len(ids) // seq_len if max_windows is None else min(len(ids) // seq_len, max_windows)
    nlls = []
    with torch.no_grad():
        for w in range(n):
            x = torch.tensor([ids[w * seq_len:(w + 1) * seq_len]])
            nlls.append(model(x, labels=x).loss.double() * seq_len)
    return math.exp(float(torch.stack(nlls).sum() / (n * seq_len)))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_matches_per_window_reference(llama, tok, batch_size):
    ids = tok(TEXT)["input_ids"]
    assert ids[0] == tok.bos_token_id  # the tokenizer's default BOS is kept, as in the papers
    rep = perplexity_report(llama, tok, TEXT, seq_len=64, batch_size=batch_size, progress=False)
    assert rep.windows == len(ids) // 64 >= 5 and rep.tokens == rep.windows * 64
    assert rep.total_tokens == len(ids)
    assert rep.ppl == pytest.approx(_reference_ppl(llama, ids, 64), rel=1e-6)
    limited = perplexity(llama, tok, TEXT, seq_len=64, max_windows=2, batch_size=batch_size,
                         progress=False)
    assert limited == pytest.approx(_reference_ppl(llama, ids, 64, max_windows=2), rel=1e-6)


def test_perplexity_from_files_and_names(llama, tok, tmp_path, monkeypatch):
    txt = tmp_path / "t.txt"
    txt.write_text(TEXT)
    jsonl = tmp_path / "t.jsonl"
    parts = TEXT.split("\n\n")
    jsonl.write_text("".join(json.dumps({"text": p}) + "\n" for p in parts))
    want = perplexity(llama, tok, TEXT, seq_len=32, max_windows=4, progress=False)
    assert perplexity(llama, tok, str(txt), seq_len=32, max_windows=4, progress=False) == want
    assert perplexity(llama, tok, jsonl, seq_len=32, max_windows=4, progress=False) == want
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "test.txt").write_text(TEXT)
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert perplexity(llama, tok, "wikitext2", seq_len=32, max_windows=4, progress=False) == want


def test_perplexity_bf16_scored_in_fp32(tok):
    model = tiny_model("qwen2", n_layers=2, dtype=torch.bfloat16)
    ids = tok(TEXT)["input_ids"][: 2 * 48]
    want = []
    with torch.no_grad():
        for w in range(2):
            x = torch.tensor([ids[w * 48:(w + 1) * 48]])
            logits = model(x).logits[0, :-1].float()
            want.append(F.cross_entropy(logits, x[0, 1:]).double())
    got = perplexity(model, tok, TEXT, seq_len=48, max_windows=2, batch_size=2, progress=False)
    assert got == pytest.approx(math.exp(float(torch.stack(want).mean())), rel=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(data="text:too short"), r"fewer than one window of seq_len=64"),
    (dict(data="missing_file.txt"), r"'missing_file.txt' does not exist"),
    (dict(data=TEXT, seq_len=1), "seq_len must be an integer >= 2"),
    (dict(data=TEXT, seq_len=512), r"exceeds the model's max_position_embeddings=256"),
    (dict(data=TEXT, max_windows=0), "max_windows must be a positive integer"),
    (dict(data=TEXT, batch_size=0), "batch_size must be a positive integer"),
])
def test_perplexity_bad_input(llama, tok, kwargs, match):
    kwargs.setdefault("seq_len", 64)
    with pytest.raises(GradmapError, match=match):
        perplexity(llama, tok, progress=False, **kwargs)


@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers(smollm2, data_dir):
    model, tok = smollm2
    rep = perplexity_report(model, tok, "wikitext2", seq_len=256, max_windows=3, batch_size=2,
                            progress=False)
    with open(os.path.join(data_dir, "wikitext2", "test.txt"), encoding="utf-8") as f:
        ids = tok(f.read(), verbose=False)["input_ids"]
    assert rep.windows == 3 and rep.total_tokens == len(ids)
    assert rep.ppl == pytest.approx(_reference_ppl(model, ids, 256, max_windows=3), rel=1e-4)


# ---------------------------------------------------------------- zero-shot

def _readme_prompts(task: str, row: dict) -> tuple[list[tuple[str, str]], int]:
    """The data README's table, re-implemented independently of gradmap.evaluate.tasks."""
    if task == "boolq":
        ctx = row["passage"] + "\nQuestion: " + row["question"] + "?\nAnswer:"
        return [(ctx, " no"), (ctx, " yes")], row["label"]
    if task == "piqa":
        ctx = "Question: " + row["goal"] + "\nAnswer:"
        return [(ctx, " " + row["sol1"]), (ctx, " " + row["sol2"])], row["label"]
    if task in ("arc_easy", "arc_challenge"):
        ctx = "Question: " + row["question"] + "\nAnswer:"
        return [(ctx, " " + c) for c in row["choices"]], row["gold"]
    if task == "openbookqa":
        return [(row["question_stem"], " " + c) for c in row["choices"]], row["gold"]
    if task == "hellaswag":
        def pre(t):
            t = t.strip().replace(" [title]", ". ")
            return re.sub(r"\[.*?\]", "", t).replace("  ", " ")
        ctx = pre(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
        return [(ctx, " " + pre(e)) for e in row["endings"]], int(row["label"])
    assert task == "winogrande"
    before, after = row["sentence"].split("_", 1)
    return ([(before + row["option1"], " " + after.strip()),
             (before + row["option2"], " " + after.strip())], int(row["answer"]) - 1)


def _raw_rows(data_dir: str, task: str, n: int) -> list[dict]:
    file = {"boolq": "boolq_validation", "piqa": "piqa_validation",
            "hellaswag": "hellaswag_validation", "winogrande": "winogrande_validation",
            "arc_easy": "arc_easy_test", "arc_challenge": "arc_challenge_test",
            "openbookqa": "openbookqa_test"}[task]
    with open(os.path.join(data_dir, "tasks", file + ".jsonl"), encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(n)]
    if task == "piqa":
        with open(os.path.join(data_dir, "tasks", "piqa_validation_labels.lst")) as f:
            for row in rows:
                row["label"] = int(next(f))
    return rows


def _slow_scores(model, tok, pairs, add_bos: bool, max_len: int) -> list[float]:
    """One forward per (context, continuation), no batching, no cache, lm-eval truncation."""
    scores = []
    with torch.no_grad():
        for ctx, cont in pairs:
            c = tok(ctx, add_special_tokens=False, verbose=False)["input_ids"]
            t = tok(cont, add_special_tokens=False)["input_ids"]
            if add_bos:
                c = [tok.bos_token_id] + c
            full = (c + t)[-(max_len + 1):]
            x = torch.tensor([full[:-1]])
            lp = model(x).logits[0].float().log_softmax(-1)
            n = len(t)
            scores.append(sum(float(lp[x.shape[1] - n + i, t[i]]) for i in range(n)))
    return scores


def _accuracies(pairs_per_ex, golds, scores):
    acc = norm = i = 0
    for pairs, gold in zip(pairs_per_ex, golds):
        ll = scores[i:i + len(pairs)]
        i += len(pairs)
        acc += max(range(len(ll)), key=lambda j: (ll[j], -j)) == gold
        lengths = [len(cont) - 1 for _, cont in pairs]  # minus the leading space
        normed = [v / n for v, n in zip(ll, lengths)]
        norm += max(range(len(ll)), key=lambda j: (normed[j], -j)) == gold
    return acc / len(golds), norm / len(golds)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_zero_shot_matches_slow_reference(tok, data_dir, family):
    model = tiny_model(family, n_layers=2, seed=2)
    add_bos, max_len = family.startswith("gemma"), model.config.max_position_embeddings
    n = 4
    res = zero_shot(model, tok, "all", limit=n, batch_size=5, progress=False)
    assert list(res["tasks"]) == list(TASK_NAMES)
    for task in TASK_NAMES:
        rows = _raw_rows(data_dir, task, n)
        pairs_per_ex, golds = zip(*[_readme_prompts(task, r) for r in rows])
        examples = build_examples(task, limit=n)
        # prompts identical to the README's rules
        assert [list(ex.requests) for ex in examples] == [list(p) for p in pairs_per_ex]
        assert [ex.gold for ex in examples] == list(golds)
        pairs = [p for ps in pairs_per_ex for p in ps]
        want = _slow_scores(model, tok, pairs, add_bos, max_len)
        reqs = [encode_request(tok, c, t, add_bos, max_len) for c, t in pairs]
        got, _ = loglikelihoods(model, reqs, batch_size=5, progress=False)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-4)
        acc, acc_norm = _accuracies(pairs_per_ex, golds, want)
        entry = res["tasks"][task]
        assert entry["n"] == n and entry["acc"] == acc
        if task == "winogrande" or task == "boolq":
            assert "acc_norm" not in entry
        else:
            assert entry["acc_norm"] == acc_norm
    metrics = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc",
               "arc_easy": "acc", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
    assert res["average_metrics"] == metrics
    assert res["average"] == pytest.approx(
        sum(res["tasks"][t][m] for t, m in metrics.items()) / 7, abs=1e-12)
    assert res["tokens"] > 0 and res["tokens_per_s"] > 0 and res["limit"] == n


def test_batching_does_not_change_scores(llama, tok):
    pairs = [ex.requests for t in ("arc_challenge", "winogrande", "boolq")
             for ex in build_examples(t, limit=3)]
    reqs = [encode_request(tok, c, t, False, 256) for ps in pairs for c, t in ps]
    one, _ = loglikelihoods(llama, reqs, batch_size=1, progress=False)
    many, _ = loglikelihoods(llama, reqs, batch_size=64, progress=False)
    torch.testing.assert_close(torch.tensor(many), torch.tensor(one), rtol=1e-5, atol=1e-4)


def test_encode_request_edges(tok):
    # trailing context spaces move to the continuation, as lm-eval's _encode_pair does
    assert encode_request(tok, "answer: ", "yes") == encode_request(tok, "answer:", " yes")
    ctx, cont = encode_request(tok, "the cat sat on the mat", " then", max_len=6)
    assert len(ctx) + len(cont) - 1 == 6
    assert ctx == tok("the cat sat on the mat", add_special_tokens=False)["input_ids"][-len(ctx):]
    assert encode_request(tok, "", " yes")[0] == [tok.bos_token_id]
    with pytest.raises(GradmapError, match="does not fit the model's max length 2"):
        encode_request(tok, "a", " the cat sat", max_len=2)


def test_hellaswag_preprocess():
    assert hellaswag_preprocess("  Do it [title] Now [step] go  ") == "Do it. Now go"
    ex = build_examples("hellaswag", limit=1)[0]
    assert ex.requests[0][0] == "Roof shingle removal: A man is sitting on a roof. He"


def test_zero_shot_bad_input(llama, tok, tmp_path, monkeypatch):
    with pytest.raises(GradmapError, match=r"unknown zero-shot task\(s\) 'mmlu'.*boolq, piqa"):
        zero_shot(llama, tok, ["piqa", "mmlu"], limit=1, progress=False)
    with pytest.raises(GradmapError, match="limit must be a positive integer"):
        zero_shot(llama, tok, "piqa", limit=0, progress=False)
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(GradmapError, match=r"tasks/piqa_validation.jsonl.*missing.*GRADMAP_DATA_DIR"):
        zero_shot(llama, tok, "piqa", limit=1, progress=False)


@pytest.mark.slow
def test_smollm2_zero_shot_matches_slow_reference(smollm2):
    model, tok = smollm2
    pairs = [p for t in ("arc_easy", "hellaswag", "winogrande")
             for ex in build_examples(t, limit=2) for p in ex.requests]
    max_len = model.config.max_position_embeddings
    want = _slow_scores(model, tok, pairs, False, max_len)
    reqs = [encode_request(tok, c, t, False, max_len) for c, t in pairs]
    got, _ = loglikelihoods(model, reqs, batch_size=8, progress=False)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-3)


def test_chunks_bound_rows_and_padding():
    from gradmap.evaluate.zero_shot import PAD_SLACK, _chunks
    lengths = [100, 98, 60, 59, 58, 57, 10, 10, 10, 10, 9]
    weights = [1, 2, 1, 1, 1, 1, 3, 1, 1, 1, 1]
    chunks = _chunks(lengths, 4, weights)
    assert chunks == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9, 10]]

    def fits(c):
        return (sum(weights[i] for i in c) <= 4
                and len(c) * lengths[c[0]] <= PAD_SLACK * sum(lengths[i] for i in c))

    assert all(fits(c) for c in chunks)
    assert not any(fits(c + [c[-1] + 1]) for c in chunks[:-1])  # greedy: each batch is full
    assert _chunks([7, 7], 1) == [[0], [1]] and _chunks([50, 1], 8) == [[0], [1]]
