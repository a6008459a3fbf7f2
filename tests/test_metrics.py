"""Layer metrics: exact references on tiny models (fp64 where a derivative is checked)."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny import random_ids, tiny_model

from gradmap import GradmapError, get_adapter, remove_layers
from gradmap.prune.metrics import ScoringRun, available_metrics, gate_statistics, get_metric
from gradmap.runtime.passes import calibration_loss
from gradmap.runtime.hooks import layer_io
from gradmap.runtime.loss import next_token_loss_sum

ALL = [("gradmap", {"gradient": "token", "verify": 0}), ("gradmap", {"gradient": "gate", "verify": 0}),
       ("gradmap", {"gradient": "fisher", "verify": 0}), ("gradmap", {"gradient": "param", "verify": 0}),
       ("gradmap", {"gradient": "token", "normalize": "h_in", "verify": 0}),
       ("gradmap", {"gradient": "token", "verify": 2, "verify_samples": 8}),
       ("block-influence", {}), ("angular", {}), ("angular", {"tokens": "all"}), ("taylor", {}),
       ("ppl", {}), ("sleb", {}), ("magnitude", {})]


def _run(model, calib, batch_size=2, n_prune=1, removable=None):
    ad = get_adapter(model)
    removable = removable if removable is not None else ad.original_ids[1:-1]
    return ScoringRun(model, ad, calib, batch_size, list(removable), n_prune)


@torch.no_grad()
def _self_samples(model, n: int, length: int, seed: int) -> torch.Tensor:
    """Sequences sampled from the model itself: on its own samples no layer removal lowers the
    expected loss (Gibbs' inequality), so loss-based metrics have a well-defined minimum."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (n, 1), generator=g)
    for _ in range(length - 1):
        p = model(input_ids=ids).logits[:, -1].double().softmax(-1)
        ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)], 1)
    return ids


def _zero_update(model, position: int) -> None:
    parts = get_adapter(model).parts(position)
    with torch.no_grad():
        for lin in (parts.attn_out, parts.mlp_down):
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
@pytest.mark.parametrize("name,options", ALL, ids=lambda x: x if isinstance(x, str) else
                         ",".join(f"{k}={v}" for k, v in x.items()) or "-")
def test_zero_update_layer_is_least_important(family, name, options):
    if options.get("gradient") == "param" and family == "gemma2":
        pytest.skip("a zero update behind Gemma's post-norm RMSNorm has the LARGEST weight gradient "
                    "(d RMSNorm/dx at x=0 is 1/sqrt(eps)); raw weight gradients measure sensitivity")
    model = tiny_model(family, n_layers=6, seed=1)
    _zero_update(model, 3)
    calib = _self_samples(model, 8, 24, seed=1)
    metric = get_metric(name, **options)
    run = _run(model, calib)
    scores = metric.score(run)
    removable = {i: scores[i] for i in run.removable}
    if options.get("gradient") == "gate":
        # The signed first-order estimate is exactly zero for a layer that adds nothing. On the
        # model's own samples the expected gate derivative of every layer is zero (the loss is
        # stationary in expectation), so other layers may be predicted to *lower* the loss;
        # the zero layer must rank directly after exactly those.
        assert scores[3] == 0.0
        below = sorted(i for i, v in removable.items() if v < 0)
        assert sorted(removable, key=removable.get).index(3) == len(below), scores
        return
    assert min(removable, key=removable.get) == 3, scores
    assert next(iter(metric.plan(run, scores, 1))) == 3


def _fp64_norms(model) -> None:
    """HF RMSNorms compute in fp32 even in an fp64 model; give each an fp64 forward (test only)."""
    offset = get_adapter(model).norm_offset
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            eps = getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6))

            def forward(x, m=m, eps=eps):
                return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + m.weight)
            m.forward = forward


def _gated_loss(model, calib, position, alpha):
    """Mean calibration loss with layer `position`'s update scaled: h_out = h_in + alpha*(h_out - h_in)."""
    layer = get_adapter(model).layers[position]

    def hook(module, args, kwargs, output):
        h_in = args[0] if args else kwargs["hidden_states"]
        return h_in + alpha * (output - h_in)
    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        return next_token_loss_sum(model, calib) / (calib.shape[0] * (calib.shape[1] - 1))
    finally:
        handle.remove()


# Gemma's eager attention takes its softmax in fp32 even in an fp64 model, which swamps a
# finite difference; the pre-norm families are fp64 end to end once their norms are.
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gate_derivative_matches_finite_difference(family):
    model = tiny_model(family, n_layers=4, dtype=torch.float64, seed=2)
    _fp64_norms(model)
    calib = random_ids(4, 16, seed=2)
    scores = get_metric("gradmap", gradient="gate").score(_run(model, calib, batch_size=1))
    eps = 1e-7
    for pos in range(4):
        with torch.no_grad():
            fd = (_gated_loss(model, calib, pos, 1.0) - _gated_loss(model, calib, pos, 1.0 - eps)) / eps
        # gate score = −Σ_t ⟨g_t, u_t⟩ = −dL/dα (per-token products are reduced in fp32)
        assert -scores[pos] == pytest.approx(float(fd), rel=1e-4)


def _per_token_reference(model, calib, position):
    """dL/dα_t for a per-token gate α on one layer (autograd, whole set in one batch): [n, L]."""
    layer = get_adapter(model).layers[position]
    alpha = torch.ones(calib.shape[0], calib.shape[1], 1, dtype=torch.float64, requires_grad=True)
    seen = {}

    def hook(module, args, kwargs, output):
        h_in = args[0] if args else kwargs["hidden_states"]
        seen["h_in"] = h_in.detach()
        return h_in + alpha * (output - h_in)
    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        loss = next_token_loss_sum(model, calib) / (calib.shape[0] * (calib.shape[1] - 1))
        (grad,) = torch.autograd.grad(loss, alpha)
    finally:
        handle.remove()
    return grad[..., 0], seen["h_in"].norm(dim=-1)


def test_token_and_fisher_equal_per_sample_reference():
    model = tiny_model("llama", n_layers=4, dtype=torch.float64, seed=3)
    _fp64_norms(model)
    for p in model.parameters():
        p.requires_grad_(False)
    calib = random_ids(3, 10, seed=3)
    stats = gate_statistics(_run(model, calib, batch_size=2), ("none", "h_in"))
    for pos in range(4):
        s, h_norm = _per_token_reference(model, calib, pos)
        # ⟨g_t, u_t⟩ is formed in fp32 by gradmap.ops.gate_reduction, hence rel=1e-6
        assert stats["token", "none"][pos] == pytest.approx(float(s.abs().sum()), rel=1e-6)
        assert stats["gate", "none"][pos] == pytest.approx(float(-s.sum()), rel=1e-5)
        assert stats["fisher", "none"][pos] == pytest.approx(float(s.sum(1).square().sum()), rel=1e-5)
        assert stats["token", "h_in"][pos] == pytest.approx(float((s.abs() / h_norm).sum()), rel=1e-6)


def _layer_grad_reference(model, calib):
    """.grad after a plain loss.backward() of HF's mean next-token loss over the whole set."""
    model.zero_grad(set_to_none=True)
    model(input_ids=calib, labels=calib).loss.backward()
    ad = get_adapter(model)
    out = []
    for layer in ad.layers:
        params = list(layer.parameters())
        out.append((params, [p.grad.detach().clone() for p in params]))
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_param_and_taylor_equal_plain_backward_reference(norm):
    model = tiny_model("qwen2", n_layers=3, dtype=torch.float64, seed=4)
    calib = random_ids(4, 12, seed=4)
    ref = _layer_grad_reference(model, calib)
    param = get_metric("gradmap", gradient="param", norm=norm).score(_run(model, calib, batch_size=1))
    taylor = get_metric("taylor").score(_run(model, calib, batch_size=3))
    for pos, (params, grads) in enumerate(ref):
        flat = torch.cat([g.flatten() for g in grads])
        expect = flat.abs().mean() if norm == "l1" else flat.square().mean().sqrt()
        # the metric accumulates its reductions in fp32
        assert param[pos] == pytest.approx(float(expect), rel=1e-5)
        t = sum(float((p.detach() * g).abs().sum()) for p, g in zip(params, grads))
        assert taylor[pos] == pytest.approx(t, rel=1e-5)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_skip_loss_equals_loss_of_model_with_layer_removed(family):
    model = tiny_model(family, n_layers=5, seed=5)
    calib = random_ids(3, 20, seed=5)
    scores = get_metric("ppl").score(_run(model, calib))
    for i in (1, 2, 3):
        pruned = copy.deepcopy(model)
        remove_layers(pruned, [i])
        assert scores[i] == pytest.approx(calibration_loss(pruned, calib, 2), rel=1e-6)


def test_block_influence_and_angular_reference():
    model = tiny_model("mistral", n_layers=4, seed=6)
    calib = random_ids(3, 14, seed=6)
    hidden = {}
    ad = get_adapter(model)

    def grab(pos, h_in, h_out):
        hidden[pos] = h_in.detach()
        hidden[pos + 1] = h_out.detach()
    with torch.no_grad(), layer_io(list(ad.layers), grab):
        ad.decoder(input_ids=calib)
    bi = get_metric("block-influence").score(_run(model, calib, batch_size=2))
    ang = get_metric("angular").score(_run(model, calib, batch_size=2, n_prune=2))
    cos = torch.nn.functional.cosine_similarity
    for pos in range(4):
        expect = (1 - cos(hidden[pos], hidden[pos + 1], dim=-1)).mean()
        assert bi[pos] == pytest.approx(float(expect), rel=1e-5)
    for start in range(3):
        c = cos(hidden[start][:, -1], hidden[start + 2][:, -1], dim=-1).clamp(-1, 1)
        assert ang[start] == pytest.approx(float((torch.arccos(c) / torch.pi).mean()), rel=1e-5)


def test_verify_removes_the_candidate_with_the_lowest_loss():
    model = tiny_model("llama", n_layers=6, seed=7)
    calib = random_ids(4, 16, seed=7)
    metric = get_metric("gradmap", gradient="token", verify=3, verify_samples=4)
    run = _run(model, calib)
    scores = metric.score(run)
    chosen = next(iter(metric.plan(run, scores, 1)))
    candidates = sorted(run.removable, key=lambda i: scores[i])[:3]
    ad = get_adapter(model)
    losses = {}
    for i in candidates:
        pruned = copy.deepcopy(model)
        remove_layers(pruned, [i])
        losses[i] = calibration_loss(pruned, calib, 2)
    assert chosen == min(losses, key=losses.get)
    assert run.notes[0]["chosen"] == chosen
    assert set(run.notes[0]["verify_losses"]) == set(candidates)
    assert ad.num_layers == 6


def test_verify_holdout_splits_gradient_rows_from_verification_rows():
    model = tiny_model("llama", n_layers=6, dtype=torch.float64, seed=7)
    calib = random_ids(8, 16, seed=7)
    held = get_metric("gradmap", verify=3, verify_samples=2, verify_holdout=True)
    run = _run(model, calib)
    scores = held.score(run)
    # the ranking is the plain gradient score of the rows the verification does not use ...
    assert scores == pytest.approx(get_metric("gradmap").score(_run(model, calib[2:])), rel=1e-9)
    assert scores != pytest.approx(get_metric("gradmap").score(_run(model, calib)), rel=1e-6)
    chosen = next(iter(held.plan(run, scores, 1)))
    # ... and the choice is the lowest loss on the held-out rows alone
    losses = {}
    for i in sorted(run.removable, key=lambda i: scores[i])[:3]:
        pruned = copy.deepcopy(model)
        remove_layers(pruned, [i])
        losses[i] = calibration_loss(pruned, calib[:2], 2)
    assert chosen == min(losses, key=losses.get)
    assert run.notes[0]["verify_losses"] == pytest.approx(losses, rel=1e-9)
    assert held.feeds_dense_means() is False and get_metric("gradmap", verify=2).feeds_dense_means() is True


@pytest.mark.parametrize("options, message", [
    (dict(verify_holdout=True), "pass verify=c"),
    (dict(verify=2, verify_holdout="yes"), "True or False"),
])
def test_verify_holdout_bad_options_are_named(options, message):
    with pytest.raises(GradmapError, match=message):
        get_metric("gradmap", **options)


def test_verify_holdout_needs_rows_left_for_the_gradient():
    model = tiny_model("llama", n_layers=4, seed=7)
    with pytest.raises(GradmapError, match="pass more samples"):
        get_metric("gradmap", verify=2, verify_samples=4, verify_holdout=True).score(
            _run(model, random_ids(4, 12, seed=7)))


def test_verify_holdout_pipeline_runs_with_magnitude_compensation():
    from gradmap import fast_prune
    model = tiny_model("llama", n_layers=6, seed=11)
    res = fast_prune(model, random_ids(8, 16, seed=11), 2, metric="gradmap", verify=2,
                     verify_holdout=True, compensation="magnitude", progress=False)
    assert len(res.removed_layers) == 2 and res.options["verify_holdout"] is True
    assert get_adapter(model).num_layers == 4


def test_bf16_model_scores_in_fp32():
    model = tiny_model("llama", n_layers=4, dtype=torch.bfloat16, seed=8)
    scores = get_metric("gradmap").score(_run(model, random_ids(2, 12)))
    assert all(v > 0 and torch.isfinite(torch.tensor(v)) for v in scores.values())


def test_non_finite_loss_names_the_batch():
    model = tiny_model("llama", n_layers=4, seed=9)
    with torch.no_grad():
        get_adapter(model).parts(2).mlp_down.weight[0, 0] = float("inf")
    calib = random_ids(4, 12, seed=9)
    with pytest.raises(GradmapError, match=r"batch rows 0\.\.1.*bfloat16"):
        get_metric("gradmap").score(_run(model, calib, batch_size=2))


def test_unknown_metric_and_option_errors_list_valid_choices():
    with pytest.raises(GradmapError) as err:
        get_metric("shortgpt")
    for name in available_metrics():
        assert name in str(err.value)
    with pytest.raises(GradmapError, match="valid options: gradient, normalize"):
        get_metric("gradmap", gradients="token")
    with pytest.raises(GradmapError, match="'token', 'gate', 'fisher', 'param'"):
        get_metric("gradmap", gradient="hessian")
    with pytest.raises(GradmapError, match="verify"):
        get_metric("gradmap", verify=-1)


def test_gradient_checkpointing_gives_the_same_scores():
    model = tiny_model("llama", n_layers=4, dtype=torch.float64, seed=10)
    calib = random_ids(2, 12, seed=10)
    plain = get_metric("gradmap", gradient="fisher").score(_run(model, calib))
    ckpt = get_metric("gradmap", gradient="fisher", gradient_checkpointing=True).score(_run(model, calib))
    for i in plain:
        assert ckpt[i] == pytest.approx(plain[i], rel=1e-10)
    assert "forward" not in get_adapter(model).layers[0].__dict__
