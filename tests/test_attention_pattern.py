"""fast_prune(keep_attention_pattern=True): a pruned Gemma 2/3 that leaves as GGUF (issue 29, item 5)."""
import json

import numpy as np
import pytest
import torch
from llama_cpp_logits import llama_cpp_logits
from tiny import tiny_model
from tiny_tokenizer import BPE_TEXT as TEXT, byte_level_tokenizer
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

from gradmap import export_gguf, fast_prune, remove_layers
from gradmap.cli.app import main
from gradmap.core.errors import GradmapError
from gradmap.prune.attention_pattern import attention_period, window_plan
from gradmap.prune.metrics import get_metric

# as in test_gguf_convert: Gemma's query scale must be head_dim for llama.cpp to read it right
KW = {"head_dim": 256}
CANONICAL = {"gemma2": lambda n: Gemma2Config(num_hidden_layers=n).layer_types,
             "gemma3_text": lambda n: Gemma3TextConfig(num_hidden_layers=n).layer_types}


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


def _calib(tok, rows=4, n=24):
    ids = tok("\n\n".join(TEXT * 4), return_tensors="pt").input_ids[0]
    return ids[:rows * n].reshape(rows, n)


def test_period_of_each_kind_of_model():
    assert attention_period(tiny_model("gemma3_text", 12, **KW).config) == 6
    assert attention_period(tiny_model("gemma2", 6, **KW).config) == 2
    assert attention_period(tiny_model("llama", 4).config) == 1  # no alternation: nothing to keep
    broken = tiny_model("gemma2", 6, **KW)
    remove_layers(broken, [1])
    with pytest.raises(GradmapError, match="not one full layer every 2 .*already pruned"):
        attention_period(broken.config)


def test_windows_are_chosen_greedily_by_summed_score_and_never_cross_protected_layers():
    ids = list(range(10))
    scores = {i: 1.0 for i in ids} | {3: 0.0, 4: 0.0, 7: -0.5}
    # windows of 2: (3, 4) sums 0.0, (6, 7) and (7, 8) sum 0.5; first (3, 4), then (6, 7) over the new order
    assert window_plan(scores, ids, ids[1:-1], 4, 2) == [3, 4, 6, 7]
    with pytest.raises(GradmapError, match="no run of 3 removable layers is left"):
        window_plan(scores, ids, [1, 2, 4, 5, 7, 8], 3, 3)


@pytest.mark.parametrize("family,n_layers,n_prune", [("gemma3_text", 12, 6), ("gemma2", 8, 4)])
@pytest.mark.parametrize("pipeline", [
    {"metric": "block-influence", "schedule": "iterative", "compensation": ["magnitude", "replaceme"]},
    {"metric": "gradmap", "schedule": "one-shot", "compensation": "none"},
])
def test_pruned_model_keeps_its_pattern_and_loads_alike_in_transformers_and_llama_cpp(
        family, n_layers, n_prune, pipeline, tok, tmp_path):
    model = tiny_model(family, n_layers, vocab_size=len(tok) + 3, **KW)
    result = fast_prune(model, _calib(tok), n_prune, progress=False, keep_attention_pattern=True, **pipeline)
    period = 6 if family == "gemma3_text" else 2
    assert result.options["attention_period"] == period
    removed = sorted(result.removed_layers)
    runs = [removed[i:i + period] for i in range(0, len(removed), period)]
    assert all(r == list(range(r[0], r[0] + period)) for r in runs), removed
    assert model.config.layer_types == CANONICAL[family](n_layers - n_prune)
    out = tmp_path / "m.gguf"
    export_gguf(model, tok, out, dtype="f32")
    ids = torch.randint(3, len(tok), (1, 40), generator=torch.Generator().manual_seed(0))  # past the window
    with torch.no_grad():
        want = model(ids).logits[0].numpy()
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
        assert back.config.layer_types == model.config.layer_types
        np.testing.assert_allclose(back(ids).logits[0].numpy(), want, atol=1e-4, rtol=0)
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (gguf-runtime extra)")
    got = llama_cpp_logits(llama_cpp, out, ids)
    # the tolerance of test_gguf_convert's Gemma logits check (ggml's fp16 GELU table)
    assert np.abs(got - want).max() <= 5e-3, np.abs(got - want).max()


@pytest.mark.parametrize("schedule", ["one-shot", "iterative"])
def test_scores_that_would_break_the_pattern_give_windows_instead(schedule, tok, monkeypatch, tmp_path):
    # layers 1-4, 6, 7 score lowest: unconstrained, they go and full layer 5 lands at position 1
    low = {1, 2, 3, 4, 6, 7}
    metric = get_metric("block-influence")
    monkeypatch.setattr(type(metric), "score", lambda self, run: {
        i: (0.0 if i in low else 1.0) + i / 100 for i in run.adapter.original_ids})
    kw = dict(metric="block-influence", schedule=schedule, compensation="none", progress=False)
    loose = tiny_model("gemma3_text", 12, vocab_size=len(tok) + 3, **KW)
    assert fast_prune(loose, _calib(tok), 6, **kw).removed_layers == [1, 2, 3, 4, 6, 7]
    with pytest.raises(GradmapError, match="keep_attention_pattern=True"):
        export_gguf(loose, tok, tmp_path / "never-written.gguf")
    model = tiny_model("gemma3_text", 12, vocab_size=len(tok) + 3, **KW)
    # window sums: 1..6 holds five low layers and 5 (1.21), 2..7 also five but higher indices (1.27)
    assert fast_prune(model, _calib(tok), 6, keep_attention_pattern=True, **kw).removed_layers == [1, 2, 3, 4, 5, 6]
    assert model.config.layer_types == CANONICAL["gemma3_text"](6)


def test_n_prune_not_whole_windows_is_refused_before_any_work(tok):
    model = tiny_model("gemma3_text", 12, vocab_size=len(tok) + 3, **KW)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(GradmapError, match=r"n_prune must be a multiple of 6 \(got 4\); use n_prune=6"):
        fast_prune(model, _calib(tok), 4, keep_attention_pattern=True, progress=False)
    with pytest.raises(GradmapError, match="multiple of 6"):
        fast_prune(model, _calib(tok), 4, keep_attention_pattern=True, heal="compensation", progress=False)
    assert model.config.num_hidden_layers == 12
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_models_without_an_alternation_prune_as_before(tok):
    calib = _calib(tok)
    a, b = (tiny_model("llama", 6, vocab_size=len(tok)) for _ in range(2))
    kw = dict(metric="block-influence", schedule="iterative", compensation="none", progress=False)
    ra = fast_prune(a, calib, 2, **kw)
    rb = fast_prune(b, calib, 2, keep_attention_pattern=True, **kw)
    assert ra.removed_layers == rb.removed_layers and rb.options["attention_period"] == 1


def test_cli_gguf_implies_keeping_the_pattern(tok, tmp_path, capsys):
    model_dir, text = tmp_path / "model", tmp_path / "calib.txt"
    tiny_model("gemma3_text", 12, vocab_size=len(tok), **KW).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    text.write_text("\n\n".join(TEXT * 16))
    args = ["prune", "--model", str(model_dir), "--metric", "block-influence", "--schedule", "one-shot",
            "--compensation", "none", "--calib", str(text), "--n-calib", "4", "--seq-len", "16", "--no-progress"]
    assert main(args + ["--n-prune", "6", "--out", str(tmp_path / "ck"), "--gguf", str(tmp_path / "p.gguf")]) == 0
    assert "kept the sliding/full attention pattern: removed runs of 6" in capsys.readouterr().out
    report = json.loads((tmp_path / "ck" / "report.json").read_text())
    assert report["gguf"]["blocks"] == 6 and report["options"]["keep_attention_pattern"] is True
    assert main(args + ["--n-prune", "4", "--out", str(tmp_path / "ck4"), "--gguf", str(tmp_path / "p4.gguf")]) == 2
    err = capsys.readouterr().err
    assert "n_prune must be a multiple of 6" in err and "Traceback" not in err
    assert not (tmp_path / "p4.gguf").exists() and not (tmp_path / "ck4").exists()
