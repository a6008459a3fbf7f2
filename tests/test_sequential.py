"""Sequential (layer-by-layer) calibration: recorded block inputs equal a forward of the edited model."""
import pytest
import torch

from gradmap import GradmapError, get_adapter
from gradmap.runtime.sequential import capture_block_inputs, sequential_blocks
from gradmap.sparsity.sparsify import magnitude_scores, prune_rows_
from tiny import random_ids, tiny_model

N = 5
SEQ = 24  # longer than the tiny Gemma sliding window (16), so sliding and full masks differ


def _inputs_by_forward(model, ids, position):
    """Input hidden states of block `position` in a plain full-model forward (independent oracle)."""
    seen = []
    layer = get_adapter(model).layers[position]
    h = layer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    return seen[0]


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text", "qwen3", "phi3"])
def test_block_inputs_match_forward_of_partially_sparsified_model(family):
    model = tiny_model(family, N, dtype=torch.float64)
    ids = random_ids(5, SEQ, seed=3)
    seen_lists = set()
    for block in sequential_blocks(model, ids, batch_size=2, progress=False):
        assert len(block.hidden) == 3  # micro-batches of 2, 2, 1
        seen_lists.add(id(block.hidden))
        expected = _inputs_by_forward(model, ids, block.position)
        got = torch.cat(block.hidden)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        # edit the block so later blocks must see the edited outputs, not the dense ones
        for lin in get_adapter(model).linear_modules(block.position).values():
            prune_rows_(lin.weight, magnitude_scores(lin.weight), lin.weight.numel() // 2)
    assert len(seen_lists) == 1  # one buffer of inputs, overwritten block by block


def test_gemma2_blocks_get_their_own_layer_type_mask():
    model = tiny_model("gemma2", 4)
    types = model.config.layer_types
    assert types[0] != types[1]
    captured = capture_block_inputs(model, random_ids(2, SEQ), batch_size=2)
    m0 = captured.layer_kwargs[0][0]["attention_mask"]
    m1 = captured.layer_kwargs[1][0]["attention_mask"]
    assert m0.shape == m1.shape == (2, 1, SEQ, SEQ)
    assert not torch.equal(m0, m1)  # sliding window vs full causal
    assert captured.layer_kwargs[2][0]["attention_mask"] is m0


def test_capture_restores_forward_and_computes_no_block():
    model = tiny_model("llama", 3)
    layers = get_adapter(model).layers
    calls = []

    def wrapper(*args, **kwargs):  # an instance-level forward set by someone else (e.g. accelerate)
        calls.append(1)
        return type(layers[1]).forward(layers[1], *args, **kwargs)

    layers[1].forward = wrapper
    hooks = [l.register_forward_hook(lambda *a: calls.append("ran")) for l in layers]
    try:
        captured = capture_block_inputs(model, random_ids(3, 8), batch_size=2)
    finally:
        for h in hooks:
            h.remove()
    assert len(captured.hidden) == 2 and [len(k) for k in captured.layer_kwargs] == [2, 2, 2]
    assert calls.count(1) == 0  # the recorder replaced the wrapper, and no real block ran
    assert layers[1].forward is wrapper
    assert "forward" not in layers[0].__dict__ and "forward" not in layers[2].__dict__
    with torch.no_grad():
        model(input_ids=random_ids(1, 8))
    assert calls.count(1) == 1


def test_bad_calibration_is_rejected_and_model_untouched():
    model = tiny_model("llama", 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad in (torch.randn(2, 8), random_ids(2, 8)[0], torch.full((2, 8), 10_000), [[1, 2, 3]]):
        with pytest.raises(GradmapError, match="calibration"):
            capture_block_inputs(model, bad)
    with pytest.raises(GradmapError, match="batch_size"):
        capture_block_inputs(model, random_ids(2, 8), batch_size=0)
    for layer in get_adapter(model).layers:
        assert "forward" not in layer.__dict__
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
