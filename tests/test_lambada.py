"""LAMBADA (lm-eval `lambada_openai`) and the 95% intervals every accuracy carries (issue 26).

The scorer is checked against a direct per-text computation (one unbatched forward each), the
greedy rule and the perplexity against hand-made cases with known answers, and the CLI tables
against what they must say: LAMBADA beside the average, never in it, with n and an interval.
"""
import json
import math

import pytest
import torch

import gradmap.cli.eval as cli_eval
import gradmap.core.calibration as calibration
from gradmap.cli.app import main
from gradmap.core.errors import GradmapError
from gradmap.evaluate import PROBE_NAMES, TASK_NAMES, zero_shot
from gradmap.evaluate.intervals import accuracy_text, wilson_interval
from gradmap.evaluate.lambada import lambada_metrics
from gradmap.evaluate.tasks import build_examples, resolve_tasks
from gradmap.evaluate.zero_shot import encode_request, greedy_loglikelihoods
from tiny import tiny_model
from tiny_tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", n_layers=3, seed=5)


def _direct(model, tok, text: str, add_bos: bool = False) -> tuple[float, bool]:
    """One text as the harness defines it: split at the last space, one forward, no cache;
    the input cut from the left to the model's max length, as lm-eval does."""
    context, word = text.rsplit(" ", 1)
    ctx = tok(context, add_special_tokens=False, verbose=False)["input_ids"]
    cont = tok(" " + word, add_special_tokens=False)["input_ids"]
    if add_bos:
        ctx = [tok.bos_token_id] + ctx
    x = torch.tensor([(ctx + cont)[-(model.config.max_position_embeddings + 1):-1]])
    with torch.no_grad():
        lp = model(x).logits[0].double().log_softmax(-1)[x.shape[1] - len(cont):]
    target = torch.tensor(cont)
    return float(lp[torch.arange(len(cont)), target].sum()), bool((lp.argmax(-1) == target).all())


# --- building the requests -------------------------------------------------------------------


def test_requests_split_at_the_last_space(data_dir):
    with open(f"{data_dir}/tasks/lambada_openai_test.jsonl", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(5)]
    examples = build_examples("lambada_openai", limit=5)
    assert len(examples) == 5
    for row, ex in zip(rows, examples):
        words = row["text"].split(" ")  # lm-eval: doc_to_text / doc_to_target
        assert ex.requests == ((" ".join(words[:-1]), " " + words[-1]),) and ex.gold == 0
    # the first text of the file ends "... I don't care about signs"
    assert examples[0].requests[0][1] == " signs"
    assert examples[0].requests[0][0].endswith("I don't care about")


def test_all_names_the_seven_tasks_and_lambada_beside_them():
    assert len(TASK_NAMES) == 7 and "lambada_openai" not in TASK_NAMES
    assert PROBE_NAMES == ("lambada_openai",)
    assert resolve_tasks("all") == [*TASK_NAMES, "lambada_openai"]
    assert resolve_tasks("piqa,lambada_openai") == ["piqa", "lambada_openai"]
    with pytest.raises(GradmapError, match="valid tasks: .*openbookqa, lambada_openai"):
        resolve_tasks("lambada")


# --- scoring -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_lambada_matches_a_direct_per_text_computation(tok, family):
    model = tiny_model(family, n_layers=2, seed=6)
    n = 12
    res = zero_shot(model, tok, "piqa,lambada_openai", limit=n, batch_size=5, progress=False,
                    per_example=True)
    texts = [ex.requests[0][0] + ex.requests[0][1] for ex in build_examples("lambada_openai", n)]
    want = [_direct(model, tok, t, add_bos=family == "gemma2") for t in texts]  # lm-eval: BOS for Gemma only
    lam = res["lambada_openai"]
    assert lam["n"] == n and lam["correct"] == {"acc": [int(g) for _, g in want]}
    assert lam["acc"] == sum(g for _, g in want) / n
    assert lam["ppl"] == pytest.approx(math.exp(-sum(ll for ll, _ in want) / n), rel=1e-5)
    assert lam["interval"] == list(wilson_interval(lam["acc"], n))
    # beside the average, never inside it
    assert list(res["tasks"]) == ["piqa"] and res["average"] == res["tasks"]["piqa"]["value"]
    assert res["requests"] == 2 * n + n  # PIQA's two choices per example, one per text


def test_batched_equals_unbatched(llama, tok):
    reqs = [encode_request(tok, c, t, False, 256) for ex in build_examples("lambada_openai", 10)
            for c, t in ex.requests]
    assert len({len(c) for c, _ in reqs}) > 3 and max(len(t) for _, t in reqs) > 1  # padding happens
    one_ll, one_g, _ = greedy_loglikelihoods(llama, reqs, batch_size=1, progress=False)
    many_ll, many_g, _ = greedy_loglikelihoods(llama, reqs, batch_size=16, progress=False)
    torch.testing.assert_close(torch.tensor(many_ll), torch.tensor(one_ll), rtol=1e-5, atol=1e-4)
    assert many_g == one_g


def test_greedy_flag_known_answers(llama, tok):
    """Continuations built from the model's own argmax are greedy; one wrong token is not."""
    ctx = tok("the cat sat on the", add_special_tokens=False)["input_ids"]

    def argmax_after(ids):
        with torch.no_grad():
            return int(llama(torch.tensor([ids])).logits[0, -1].argmax())

    y1 = argmax_after(ctx)
    y2 = argmax_after(ctx + [y1])
    other1, other2 = (y1 + 1) % 96 or 5, (y2 + 1) % 96 or 5
    reqs = [(ctx, [y1]), (ctx, [other1]), (ctx, [y1, y2]), (ctx, [y1, other2]),
            (ctx, [other1, argmax_after(ctx + [other1])])]
    _, greedy, _ = greedy_loglikelihoods(llama, reqs, batch_size=4, progress=False)
    assert greedy == [True, False, True, False, False]


def test_uniform_model_known_perplexity(tok):
    """A model whose logits are all zero gives every token log(1/V): PPL = V^(mean tokens)."""
    model = tiny_model("llama", n_layers=2, seed=7)
    with torch.no_grad():
        model.model.norm.weight.zero_()  # final hidden state 0 -> logits 0
    n = 6
    res = zero_shot(model, tok, "lambada_openai", limit=n, progress=False)
    lengths = [len(encode_request(tok, c, t)[1]) for ex in build_examples("lambada_openai", n)
               for c, t in ex.requests]
    vocab = model.config.vocab_size
    assert res["lambada_openai"]["ppl"] == pytest.approx(vocab ** (sum(lengths) / n), rel=1e-5)
    assert res["lambada_openai"]["acc"] == 0.0  # argmax is token 0 (<pad>), never a word
    assert res["average"] is None and res["tasks"] == {}


def test_lambada_metrics_by_hand():
    m = lambada_metrics([math.log(0.5), math.log(0.25)], [True, False])
    assert m["acc"] == 0.5 and m["n"] == 2
    assert m["ppl"] == pytest.approx(math.sqrt(8))  # exp(-(ln 1/2 + ln 1/4) / 2)
    assert m["interval"] == list(wilson_interval(0.5, 2))
    with pytest.raises(GradmapError, match="one log-likelihood and one greedy flag per text"):
        lambada_metrics([], [])


# --- intervals -----------------------------------------------------------------------------


def test_wilson_interval_known_values_and_symmetry():
    assert wilson_interval(0.0, 3) == pytest.approx((0.0, 0.5615), abs=1e-4)
    assert wilson_interval(0.3, 100) == pytest.approx((0.2189, 0.3958), abs=1e-4)
    assert wilson_interval(1.0, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    lo, hi = wilson_interval(0.2, 50)
    assert wilson_interval(0.8, 50) == pytest.approx((1 - hi, 1 - lo))
    # large n: close to p ± 1.96 sqrt(p(1-p)/n)
    lo, hi = wilson_interval(0.4, 5153)
    half = 1.96 * math.sqrt(0.4 * 0.6 / 5153)
    assert (lo, hi) == pytest.approx((0.4 - half, 0.4 + half), abs=2e-4)
    assert accuracy_text(0.3, 100) == "30.0 [21.9, 39.6]"
    for bad in ((0.5, 0), (1.5, 10)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_wilson_interval_covers_about_95_percent():
    gen = torch.Generator().manual_seed(0)
    p, n, trials = 0.3, 80, 4000
    hits = (torch.rand(trials, n, generator=gen) < p).sum(dim=1).tolist()
    covered = sum(lo <= p <= hi for lo, hi in (wilson_interval(k / n, n) for k in hits))
    assert 0.93 <= covered / trials <= 0.97


# --- the CLI -------------------------------------------------------------------------------


def test_eval_prints_lambada_beside_the_average_with_n_and_interval(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli_eval, "load_model",
                        lambda *a, **k: (tiny_model("llama", n_layers=2, seed=4), tiny_tokenizer()))
    out = tmp_path / "r.json"
    assert main(["eval", "--model", "tiny", "--ppl", "text:" + "the cat sat on the mat. " * 40,
                 "--seq-len", "32", "--tasks", "piqa,boolq,lambada_openai", "--limit", "4",
                 "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())["zero_shot"]
    lam = res["lambada_openai"]
    assert lam["n"] == 4 and set(res["tasks"]) == {"piqa", "boolq"}
    assert "average (2 tasks)" in printed and "[95% Wilson interval]" in printed
    line = next(l for l in printed.splitlines() if l.startswith("last word, greedy"))
    assert line.split() == ["last", "word,", "greedy", *accuracy_text(lam["acc"], 4, 2).split(),
                            f"{lam['ppl']:.3f}", "4"]
    piqa = next(l for l in printed.splitlines() if l.startswith("piqa ") and "[" in l)
    assert accuracy_text(res["tasks"]["piqa"]["acc"], 4, 2) in piqa and piqa.endswith(" 4")


def test_missing_lambada_file_is_one_line_before_loading(monkeypatch, tmp_path, capsys):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(cli_eval, "load_model", refuse)
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "test.txt").write_text("some text\n")
    monkeypatch.setenv(calibration.DATA_ENV, str(tmp_path))
    assert main(["eval", "--model", "tiny", "--tasks", "all"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "tasks/boolq_validation.jsonl" in err  # the first missing file, then LAMBADA's alone:
    (tmp_path / "tasks").mkdir()
    assert main(["eval", "--model", "tiny", "--tasks", "lambada_openai"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tasks/lambada_openai_test.jsonl" in err
    assert "GRADMAP_DATA_DIR" in err and "EleutherAI/lambada_openai" in err


@pytest.mark.slow
def test_smollm2_lambada_matches_direct_computation(smollm2):
    """50 texts on the real model: the batched scorer equals one forward per text."""
    model, tok = smollm2
    n = 50
    res = zero_shot(model, tok, "lambada_openai", limit=n, progress=False, per_example=True)
    texts = [ex.requests[0][0] + ex.requests[0][1] for ex in build_examples("lambada_openai", n)]
    want = [_direct(model, tok, t) for t in texts]
    lam = res["lambada_openai"]
    assert lam["correct"]["acc"] == [int(g) for _, g in want]
    assert lam["ppl"] == pytest.approx(math.exp(-sum(ll for ll, _ in want) / n), rel=1e-4)
    assert 0.2 < lam["acc"] < 0.6  # a 135M model gets some last words right, not most
