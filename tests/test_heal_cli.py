"""`gradmap heal`: a checkpoint `gradmap prune` saved, healed against its dense model into a new folder;
every bad input refused before any model loads, the input folder never changed."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from tiny import random_ids, tiny_model
from tiny_tokenizer import TRAIN_TEXT, tiny_tokenizer
from transformers import AutoModelForCausalLM

import gradmap
from gradmap.cli.app import main


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def pair(tmp_path):
    dense_dir, pruned_dir, text = tmp_path / "dense", tmp_path / "pruned", tmp_path / "heal.txt"
    model = tiny_model("llama", n_layers=6, seed=0)
    tok = tiny_tokenizer()
    model.save_pretrained(dense_dir)
    tok.save_pretrained(dense_dir)
    gradmap.remove_layers(model, [2, 3])
    gradmap.save_pretrained(model, tok, pruned_dir, report={"removed_layers": [2, 3]})
    text.write_text("\n\n".join(TRAIN_TEXT * 8))
    return dense_dir, pruned_dir, text


def _argv(pair, out, *more):
    dense_dir, pruned_dir, text = pair
    return ["heal", "--model", str(pruned_dir), "--teacher", str(dense_dir), "--out", str(out), "--heal-data",
            str(text), "--heal-rows", "8", "--seq-len", "24", "--no-progress", "--heal-option", "top_k=8", *more]


def test_heal_writes_a_healed_plain_checkpoint_and_leaves_the_input(pair, tmp_path, capsys):
    dense_dir, pruned_dir, text = pair
    before = _digest(pruned_dir)
    out = tmp_path / "healed"
    assert main(_argv(pair, out, "--heal-option", "steps=3", "--heal-option", "lr=1e-2")) == 0
    assert "heal (norms+compensation): 3 steps" in capsys.readouterr().out
    assert _digest(pruned_dir) == before
    report = json.loads((out / "report.json").read_text())
    assert report["heal"]["rows"] == 8 and report["heal"]["top_k"] == 8
    assert report["pruned_from"]["removed_layers"] == [2, 3]
    healed, pruned = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert healed.config.num_hidden_layers == 4 and healed.config.gradmap_layer_ids == [0, 1, 4, 5]
    assert report["heal"]["best_step"] > 0  # the held-out KL fell, so the weights moved
    x = random_ids(2, 10)
    with torch.no_grad():
        assert not torch.allclose(healed(x).logits, pruned(x).logits)


@pytest.mark.parametrize("swap,more,match", [
    (False, ["--heal-rows", "1"], "--heal-rows must be at least 2"),
    (False, ["--mode", "everything"], "not a healing mode"),
    (False, ["--heal-option", "warmup=3"], "unknown heal option"),
    (True, [], "--teacher must be the dense model"),
    (False, ["--heal-data", "missing.txt"], "missing.txt"),
])
def test_bad_input_is_refused_before_loading(pair, tmp_path, capsys, monkeypatch, swap, more, match):
    import gradmap.core.models as models
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = _argv(pair, tmp_path / "healed", *more)
    if swap:
        argv[2], argv[4] = argv[4], argv[2]
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "healed").exists()


def test_output_inside_an_input_and_compensation_without_a_gap_are_refused(pair, tmp_path, capsys):
    dense_dir, pruned_dir, text = pair
    assert main(_argv(pair, pruned_dir / "healed")) == 2
    assert "input" in capsys.readouterr().err and not (pruned_dir / "healed").exists()
    tail = tmp_path / "tail"
    model = tiny_model("llama", n_layers=6, seed=0)
    gradmap.remove_layers(model, [5])
    gradmap.save_pretrained(model, tiny_tokenizer(), tail)
    argv = _argv(pair, tmp_path / "o")
    argv[2] = str(tail)
    assert main(argv) == 2
    assert "no gap between kept layers" in capsys.readouterr().err
