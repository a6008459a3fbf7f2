"""Layer surgery on every supported family: removal, renumbering, config lists, KV cache, save/reload."""
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from gradmap import GradmapError, UnsupportedModelError, get_adapter, remove_layers, save_pretrained
from tiny import FAMILIES, random_ids, tiny_model

N = 6


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _check_consistent(model, expected_ids):
    a = get_adapter(model)
    assert a.original_ids == expected_ids
    assert model.config.num_hidden_layers == len(expected_ids) == a.num_layers
    for pos, layer in enumerate(a.layers):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                assert m.layer_idx == pos
    for key, value in vars(model.config).items():
        if key.endswith("layer_types"):
            assert len(value) == len(expected_ids)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_remove_save_reload_generate(family, tied, tmp_path):
    model = tiny_model(family, N, tied=tied, dtype=torch.float64)
    assert get_adapter(model).tied == tied
    types_before = list(getattr(model.config, "layer_types", []) or [])
    remove_layers(model, [0])           # first
    remove_layers(model, [N - 1, 3])    # last + middle, original numbering after a first call
    kept = [1, 2, 4]
    _check_consistent(model, kept)
    if types_before:
        assert model.config.layer_types == [types_before[i] for i in kept]

    x = random_ids(2, 11)
    cached = model.generate(x, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(x, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)

    out = save_pretrained(model, None, tmp_path / "pruned", report={"removed": [0, 5, 3]})
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    assert get_adapter(reloaded).original_ids == kept
    assert get_adapter(reloaded).tied == tied
    with torch.no_grad():
        diff = (model(x).logits - reloaded(x).logits).abs().max().item()
    assert diff <= 1e-5
    assert (out / "report.json").is_file()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_removed_layer_equals_skipping_it(family):
    """Removing layer k gives the same logits as a forward that skips layer k."""
    model = tiny_model(family, N, dtype=torch.float64)
    x = random_ids(1, 9)
    a = get_adapter(model)
    layer = a.layers[2]
    handle = layer.register_forward_hook(lambda m, args, kwargs, out: (args[0] if args else kwargs["hidden_states"]),
                                         with_kwargs=True)
    try:
        with torch.no_grad():
            skipped = model(x).logits
    finally:
        handle.remove()
    remove_layers(model, [2])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, skipped, rtol=0, atol=1e-10)


@pytest.mark.parametrize("bad, match", [
    ([7], "not in the model"),
    ([-1], "not in the model"),
    ([1, 1], "more than once"),
    (list(range(N)), "leave none"),
    (["a"], "integers"),
])
def test_bad_indices_leave_model_untouched(bad, match):
    model = tiny_model("llama", N)
    before = _state(model)
    with pytest.raises(GradmapError, match=match):
        remove_layers(model, bad)
    _check_consistent(model, list(range(N)))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_already_removed_index_is_rejected():
    model = tiny_model("qwen2", N)
    remove_layers(model, [2])
    with pytest.raises(GradmapError, match=r"original layers \[0, 1, 3, 4, 5\]"):
        remove_layers(model, [2])


def test_unsupported_architecture_lists_supported():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="llama.*qwen3"):
        remove_layers(gpt2, [0])


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_parts(family):
    model = tiny_model(family, 3)
    a = get_adapter(model)
    p = a.parts(1)
    d = model.config.hidden_size
    assert p.attn_out.out_features == d and p.mlp_down.out_features == d
    gemma = family.startswith("gemma")
    assert (p.mlp_post_norm is not None) == gemma and (p.attn_post_norm is not None) == gemma
    assert a.norm_offset == (1.0 if gemma else 0.0)
    assert a.embed_tokens.weight.shape == (model.config.vocab_size, d)
    # scale_norm_ multiplies the effective scale, whatever the parameterisation
    before = a.norm_scale(p.attn_pre_norm).detach().clone()
    a.scale_norm_(p.attn_pre_norm, 2.0)
    torch.testing.assert_close(a.norm_scale(p.attn_pre_norm), 2.0 * before)
