"""Saved checkpoints are self-consistent and carry the keys older transformers / serving stacks read.

The cross-version check itself (load under transformers 4.57.1, compare logits and greedy tokens)
needs a second environment and runs as `bash .ci/compat-transformers`.
"""
import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from gradmap import remove_layers, save_pretrained
from gradmap.core.legacy_config import legacy_config_keys
from tiny import CONFIGS, FAMILIES, random_ids, tiny_model
from tiny_tokenizer import tiny_tokenizer

# a sliding-window Qwen2 makes max_window_layers and layer_types matter
EXTRA = {"qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=3),
         "qwen3": dict(use_sliding_window=True, sliding_window=8, max_window_layers=3),
         "llama": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e4})}
REMOVE = [1, 4]
N = 6


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    fam = request.param
    model = tiny_model(fam, N, **EXTRA.get(fam, {}))
    before = model.config.to_dict()
    remove_layers(model, REMOVE)
    out = save_pretrained(model, tiny_tokenizer(), tmp_path_factory.mktemp(fam) / "ck")
    return fam, model, before, out


def test_per_layer_fields_match_layer_count(saved):
    fam, model, before, out = saved
    cls = type(CONFIGS[fam]())
    config = cls.from_pretrained(out)
    n = N - len(REMOVE)
    keep = [i for i in range(N) if i not in REMOVE]
    assert config.num_hidden_layers == n
    after = config.to_dict()
    per_layer = [k for k, v in before.items() if isinstance(v, list) and len(v) == N]
    for key in per_layer:  # anything that had one entry per layer must still have one
        assert len(after[key]) == n, f"{fam}: {key} has {len(after[key])} entries for {n} layers"
        assert after[key] == [before[key][i] for i in keep], f"{fam}: {key} not trimmed to the kept layers"
    if "layer_types" in before:
        assert "layer_types" in per_layer
    assert after.get("sliding_window") == before.get("sliding_window")
    if "max_window_layers" in before:
        assert 0 <= config.max_window_layers <= n
        # a stack that derives attention types from max_window_layers gets the saved layer_types
        raw = json.loads((out / "config.json").read_text())
        raw.pop("layer_types")
        derived = cls(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})
        assert derived.layer_types == config.layer_types, fam
        assert "sliding_attention" in config.layer_types  # the sliding case is really exercised
    if "layer_types" in before:
        assert config.layer_types == model.config.layer_types


def test_legacy_keys_written_and_round_trip_on_this_transformers(saved):
    fam, model, before, out = saved
    raw = json.loads((out / "config.json").read_text())
    rope = before["rope_parameters"]
    if fam.startswith("gemma3"):
        assert raw["rope_theta"] == rope["full_attention"]["rope_theta"]
        assert raw["rope_local_base_freq"] == rope["sliding_attention"]["rope_theta"]
    else:
        assert raw["rope_theta"] == rope["rope_theta"]
    if fam == "llama":
        assert raw["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    # transformers 5 reads the legacy keys too: the reloaded config and model are unchanged
    assert AutoConfig.from_pretrained(out).rope_parameters == rope
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    # the renamed class changes nothing on transformers 5 (which maps qwen2/qwen3 configs to
    # Qwen2Tokenizer whatever the class name, so compare with the name it wrote itself)
    as_written = out.parent / "as-written"
    shutil.copytree(out, as_written, dirs_exist_ok=True)
    (as_written / "tokenizer_config.json").write_text(
        json.dumps({**tok_cfg, "tokenizer_class": "TokenizersBackend"}))
    text = "the cat sat on the mat. question: what is the answer?"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == \
        AutoTokenizer.from_pretrained(as_written)(text).input_ids
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    x = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=1e-5)


def test_legacy_keys_from_rope_parameters():
    llama3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    got = legacy_config_keys({"rope_parameters": llama3})
    assert got["rope_theta"] == 5e5
    assert got["rope_scaling"] == {k: v for k, v in llama3.items() if k != "rope_theta"}
    got = legacy_config_keys({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                  "partial_rotary_factor": 0.5}})
    assert got == {"rope_theta": 1e4, "rope_scaling": None, "partial_rotary_factor": 0.5}
    # keys the config already has are never overwritten
    assert legacy_config_keys({"rope_theta": 7.0, "rope_parameters": {"rope_theta": 1e4}}) == \
        {"rope_scaling": None}
    assert legacy_config_keys({"hidden_size": 8}) == {}


def test_extra_special_tokens_written_as_additional_special_tokens(tmp_path):
    """transformers 5 writes a list under extra_special_tokens, which 4.x reads as a dict and crashes."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    out = save_pretrained(tiny_model("llama", 2), tok, tmp_path / "ck")
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert not isinstance(cfg.get("extra_special_tokens"), list)
    assert cfg["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    back = AutoTokenizer.from_pretrained(out)  # and transformers 5 reads it back the same
    assert sorted(back.all_special_tokens) == sorted(tok.all_special_tokens)
    text = "<|im_start|>the cat<|im_end|>"
    assert back(text).input_ids == tok(text).input_ids
