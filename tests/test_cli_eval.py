"""`gradmap eval`: runs end to end, prints a table naming each metric, writes JSON."""
import json

import pytest

import gradmap.cli.eval as cli_eval
from gradmap.cli.app import main
from gradmap.evaluate import perplexity, zero_shot
from tiny import tiny_model
from tiny_tokenizer import tiny_tokenizer
from test_evaluate import TEXT


@pytest.fixture
def tiny_loader(monkeypatch):
    """Make `gradmap eval --model anything` load a tiny llama and the tiny tokenizer."""
    calls = []

    def fake_load(name, dtype=None, device="cpu"):
        calls.append((name, dtype, device))
        return tiny_model("llama", n_layers=2, seed=4), tiny_tokenizer()

    monkeypatch.setattr(cli_eval, "load_model", fake_load)
    return calls


def test_eval_prints_tables_and_json(tiny_loader, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "res.json"
    rc = main(["eval", "--model", "tiny", "--ppl", str(text), "--seq-len", "32", "--max-windows",
               "3", "--tasks", "piqa,winogrande,arc_challenge", "--limit", "3", "--batch-size", "4",
               "--json", str(out), "--no-progress"])
    assert rc == 0 and tiny_loader == [("tiny", None, "cpu")]
    printed = capsys.readouterr().out
    for header in ("ppl (L=32)", "piqa (acc)", "winogrande (acc)", "arc_challenge (acc_norm)",
                   "average (3 tasks)", "acc_norm", "limit 3 per task"):
        assert header in printed
    res = json.loads(out.read_text())
    model, tok = tiny_model("llama", n_layers=2, seed=4), tiny_tokenizer()
    want_ppl = perplexity(model, tok, str(text), seq_len=32, max_windows=3, progress=False)
    assert res["perplexity"]["ppl"] == pytest.approx(want_ppl, rel=1e-9)
    assert res["perplexity"]["windows"] == 3 and f"{want_ppl:.4f}" in printed
    want = zero_shot(model, tok, ["piqa", "winogrande", "arc_challenge"], limit=3, progress=False)
    for task, entry in want["tasks"].items():
        assert res["zero_shot"]["tasks"][task]["acc"] == entry["acc"]
        assert res["zero_shot"]["tasks"][task]["n"] == 3
    assert res["zero_shot"]["average"] == pytest.approx(want["average"])


def test_eval_defaults_to_wikitext2(tiny_loader, tmp_path, monkeypatch, capsys):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "test.txt").write_text(TEXT)
    monkeypatch.setenv("GRADMAP_DATA_DIR", str(tmp_path))
    assert main(["eval", "--model", "tiny", "--seq-len", "64", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "wikitext2" in printed and "ppl (L=64)" in printed and "zero-shot" not in printed


@pytest.mark.parametrize("argv, match", [
    (["--tasks", "piqa,mmlu"], "unknown zero-shot task(s) 'mmlu'"),
    (["--limit", "0", "--tasks", "piqa"], "--limit must be a positive integer"),
    (["--json", "/nonexistent/dir/x.json"], "does not exist"),
    (["--ppl", "/nonexistent/wiki.txt"], "'/nonexistent/wiki.txt' does not exist"),
])
def test_eval_bad_input_exits_2_before_loading(tiny_loader, capsys, argv, match):
    assert main(["eval", "--model", "tiny", *argv]) == 2
    assert match in capsys.readouterr().err
    assert tiny_loader == []  # validated before the (slow) model load


@pytest.mark.slow
def test_eval_real_model_smoke(smollm2, monkeypatch, capsys):
    monkeypatch.setattr(cli_eval, "load_model", lambda *a, **k: smollm2)
    assert main(["eval", "--model", "smollm2-135m", "--ppl", "wikitext2", "--seq-len", "128",
                 "--max-windows", "2", "--tasks", "all", "--limit", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "hellaswag (acc_norm)" in printed and "average (7 tasks)" in printed
