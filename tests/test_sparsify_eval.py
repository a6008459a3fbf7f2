"""`gradmap sparsify --eval`: the sparse model's perplexity and zero-shot accuracy in report.json."""
from __future__ import annotations

import json

import pytest

from gradmap.cli import app as cli


def test_eval_options_checked_before_loading(tmp_path, capsys):
    base = ["sparsify", "--model", "smollm2-135m", "--out", str(tmp_path / "o"), "--score", "magnitude",
            "--sparsity", "0.5", "--eval"]
    cases = [(["--tasks", "boolq,nope"], "unknown zero-shot task"),
             (["--limit", "-1"], "--limit must be 0"),
             (["--ppl-windows", "0"], "--ppl-windows must be a positive integer"),
             (["--ppl-seq-len", "1"], "--ppl-seq-len must be at least 2"),
             (["--ppl-data", str(tmp_path / "missing.txt")], "missing.txt")]
    for extra, message in cases:
        assert cli.main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_eval_matches_a_separate_evaluation_of_the_saved_checkpoint(tmp_path, data_dir, capsys):
    from gradmap import load_model
    from gradmap.evaluate import perplexity_report, zero_shot

    out = tmp_path / "sparse"
    argv = ["sparsify", "--model", "smollm2-135m", "--out", str(out), "--score", "magnitude",
            "--sparsity", "0.5", "--eval", "--tasks", "boolq,arc_easy", "--limit", "8",
            "--ppl-windows", "2", "--ppl-seq-len", "128", "--no-progress"]
    assert cli.main(argv) == 0
    ev = json.loads((out / "report.json").read_text())["evaluation"]
    assert "zero-shot average" in capsys.readouterr().out
    model, tok = load_model(str(out))
    want_ppl = perplexity_report(model, tok, "wikitext2", 128, 2, progress=False)
    want_zs = zero_shot(model, tok, "boolq,arc_easy", limit=8, progress=False)
    assert ev["perplexity"]["windows"] == 2 and ev["perplexity"]["seq_len"] == 128
    assert ev["ppl"] == pytest.approx(want_ppl.ppl, rel=1e-5)
    assert set(ev["zero_shot"]["tasks"]) == {"boolq", "arc_easy"}
    assert ev["zero_shot"]["average"] == pytest.approx(want_zs["average"], abs=1e-9)
    assert all(t["n"] == 8 for t in ev["zero_shot"]["tasks"].values())
    # half the decoder weights are zero: the model is measurably worse than dense SmolLM2 (PPL ~20)
    dense, _ = load_model("smollm2-135m")
    assert ev["ppl"] > perplexity_report(dense, tok, "wikitext2", 128, 2, progress=False).ppl
