"""Folding compensation into weights is exact on every supported family (fp64 tiny models)."""
import copy

import pytest
import torch

from gradmap import GradmapError, get_adapter, remove_layers
from gradmap.prune.compensation.fold import diagonal_only, fold_projection_, fold_residual_scale_
from gradmap.prune.compensation.sites import mlp_output_module
from tiny import FAMILIES, random_ids, tiny_model

N = 5
D = 32
# HF RMSNorms compute in fp32 whatever the model dtype; where a fold changes a norm's input or
# weight (Gemma's post-norms; every norm under a residual rescale) the match is to fp32 precision
FP32 = dict(rtol=1e-5, atol=1e-5)
TOL = {f: FP32 if f.startswith("gemma") else dict(rtol=1e-12, atol=1e-10) for f in FAMILIES}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _random_p(adapter, seed):
    g = torch.Generator().manual_seed(seed)
    if diagonal_only(adapter):
        return 1.0 + 0.3 * torch.randn(D, generator=g, dtype=torch.float64)
    return torch.eye(D, dtype=torch.float64) + 0.2 * torch.randn(D, D, generator=g, dtype=torch.float64)


def _as_matrix(p):
    return torch.diag(p) if p.dim() == 1 else p


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_projection_fold_equals_hook(family, tied):
    """Logits with M ↦ M P applied by a forward hook equal the logits of the folded model."""
    model = tiny_model(family, N, tied=tied, dtype=torch.float64)
    remove_layers(model, [1, 3])    # fold into a pruned model, positions != original ids
    adapter = get_adapter(model)
    ids = random_ids(2, 10)
    pos = 1
    p = _random_p(adapter, seed=7)
    pm = _as_matrix(p)
    handle = mlp_output_module(adapter, pos).register_forward_hook(lambda _m, _a, out: out @ pm)
    try:
        hooked = _logits(model, ids)
    finally:
        handle.remove()
    plain = _logits(model, ids)
    edited = []
    fold_projection_(adapter, pos, p, before_edit=edited.extend)
    folded = _logits(model, ids)
    assert (hooked - plain).abs().max() > 1e-3            # P really changes the output
    torch.testing.assert_close(folded, hooked, **TOL[family])
    assert edited and all(t.dtype == torch.float64 for t in edited)


def test_projection_fold_with_bias():
    model = tiny_model("llama", 3, dtype=torch.float64, mlp_bias=True)
    adapter = get_adapter(model)
    with torch.no_grad():
        adapter.parts(2).mlp_down.bias.normal_(0, 0.5)
    p = _random_p(adapter, seed=3)
    ids = random_ids(1, 9)
    handle = adapter.parts(2).mlp_down.register_forward_hook(lambda _m, _a, out: out @ p)
    try:
        hooked = _logits(model, ids)
    finally:
        handle.remove()
    fold_projection_(adapter, 2, p)
    torch.testing.assert_close(_logits(model, ids), hooked, **TOL["llama"])


def test_projection_fold_rejects_full_matrix_on_post_norm_family():
    model = tiny_model("gemma2", 2, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = torch.eye(D, dtype=torch.float64) + 0.1
    with pytest.raises(GradmapError, match="diagonal"):
        fold_projection_(get_adapter(model), 0, full)
    with pytest.raises(GradmapError, match="length 32"):
        fold_projection_(get_adapter(model), 0, torch.ones(D - 1, dtype=torch.float64))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # a diagonal matrix is accepted and equals the vector form
    twin = copy.deepcopy(model)
    diag = 1.0 + torch.linspace(-0.2, 0.2, D, dtype=torch.float64)
    fold_projection_(get_adapter(model), 0, torch.diag(diag))
    fold_projection_(get_adapter(twin), 0, diag)
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_residual_scale_fold(family, tied):
    """Every hidden state before the cut is scaled by exactly s; logits read there are unchanged."""
    eps = {"rms_norm_eps": 1e-30}    # RMSNorm is then scale-invariant to fp64 precision
    model = tiny_model(family, N, tied=tied, dtype=torch.float64, **eps)
    folded = copy.deepcopy(model)
    cut, s = 3, 1.7
    edited = []
    fold_residual_scale_(get_adapter(folded), cut, s, before_edit=edited.extend)
    ids = random_ids(2, 10)
    with torch.no_grad():
        h0 = model(ids, output_hidden_states=True).hidden_states
        h1 = folded(ids, output_hidden_states=True).hidden_states
    for k in range(cut + 1):        # embeddings and the outputs of layers 0 .. cut-1
        torch.testing.assert_close(h1[k], s * h0[k], **FP32)
    assert (h1[cut + 1] - s * h0[cut + 1]).abs().max() > 1e-3   # after the cut: not a plain rescale
    # logits of the model truncated at the cut are unchanged (tied: final norm cancels the LM head)
    remove_layers(model, range(cut, N))
    remove_layers(folded, range(cut, N))
    torch.testing.assert_close(_logits(folded, ids), _logits(model, ids), **FP32)
    a = get_adapter(folded)
    assert any(t is a.embed_tokens.weight for t in edited)
    assert any(t is a.final_norm.weight for t in edited) == tied


def test_residual_scale_rejects_bad_scale():
    model = tiny_model("llama", 2, dtype=torch.float64)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(GradmapError, match="positive finite"):
            fold_residual_scale_(get_adapter(model), 1, bad)
