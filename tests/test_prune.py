"""fast_prune: schedules, protection, determinism, compensator hooks, state restoration, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny import random_ids, tiny_model

from gradmap import GradmapError, PruneResult, fast_prune, get_adapter, original_layer_ids
from gradmap.prune.compensation.base import Compensator
from gradmap.runtime.hooks import layer_io


class Recorder(Compensator):
    """Records the hook sequence and what the context holds at each call."""

    name = "recorder"
    needs_dense_means = True

    def __init__(self, fail_at: str | None = None):
        self.calls: list[tuple] = []
        self.fail_at = fail_at
        self.dense_means = None

    def begin(self, ctx):
        self.calls.append(("begin", tuple(original_layer_ids(ctx.model))))
        self.dense_means = ctx.dense_means

    def before_removal(self, ctx, idx):
        self.calls.append(("before", idx, idx in original_layer_ids(ctx.model)))

    def after_removal(self, ctx, idx):
        self.calls.append(("after", idx, idx in original_layer_ids(ctx.model),
                           idx in ctx.removed_modules))
        if self.fail_at == "after_removal":
            raise RuntimeError("injected failure")

    def finalize(self, ctx):
        self.calls.append(("finalize", tuple(sorted(ctx.removed_modules))))


@pytest.mark.parametrize("metric", ["gradmap", "block-influence", "taylor", "magnitude"])
def test_iterative_one_equals_one_shot_one(metric):
    calib = random_ids(4, 16, seed=1)
    a = fast_prune(tiny_model("llama", 6, seed=1), calib, 1, metric=metric, compensation="none",
                   schedule="iterative")
    b = fast_prune(tiny_model("llama", 6, seed=1), calib, 1, metric=metric, compensation="none",
                   schedule="one-shot")
    assert a.removed_layers == b.removed_layers
    assert a.scores == b.scores


@pytest.mark.parametrize("metric,schedule", [("gradmap", "iterative"), ("gradmap", "one-shot"),
                                             ("sleb", "iterative"), ("angular", "one-shot"),
                                             ("block-influence", "iterative")])
def test_protected_layers_are_never_removed(metric, schedule):
    model = tiny_model("qwen2", 8, seed=2)
    r = fast_prune(model, random_ids(2, 12, seed=2), 3, metric=metric, compensation="none",
                   schedule=schedule, protect_first=2, protect_last=2)
    assert len(r.removed_layers) == 3 and len(set(r.removed_layers)) == 3
    assert not {0, 1, 6, 7} & set(r.removed_layers)
    assert original_layer_ids(model) == [i for i in range(8) if i not in r.removed_layers]


def test_same_seed_same_layers_and_scores_per_decision():
    calib = random_ids(4, 16, seed=3)
    runs = [fast_prune(tiny_model("gemma2", 6, seed=3), calib, 3, compensation="none",
                          schedule="iterative")
            for _ in range(2)]
    assert runs[0].removed_layers == runs[1].removed_layers
    assert runs[0].scores == runs[1].scores
    r = runs[0]
    assert isinstance(r, PruneResult) and len(r.scores) == 3
    # each decision scores exactly the layers still present, keyed by ORIGINAL index
    for k, scores in enumerate(r.scores):
        assert set(scores) == set(range(6)) - set(r.removed_layers[:k])
    assert r.timings["total"] >= r.timings["scoring"] > 0
    assert r.peak_memory_bytes > 0


def test_compensator_hooks_order_and_dense_means():
    model = tiny_model("llama", 5, seed=4)
    calib = random_ids(3, 10, seed=4)
    ad = get_adapter(model)
    sums = {}

    def grab(pos, h_in, h_out):
        sums[pos] = sums.get(pos, 0) + h_out.detach().double().sum((0, 1))
    with torch.no_grad(), layer_io(list(ad.layers), grab):
        ad.decoder(input_ids=calib)
    rec = Recorder()
    r = fast_prune(model, calib, 2, metric="gradmap", compensation=[rec], schedule="iterative",
                   batch_size=2, safeguard=False)  # every row feeds the dense means
    a, b = r.removed_layers
    assert rec.calls == [("begin", (0, 1, 2, 3, 4)),
                         ("before", a, True), ("after", a, False, True),
                         ("before", b, True), ("after", b, False, True),
                         ("finalize", tuple(sorted((a, b))))]
    assert r.compensation == ["recorder"]
    assert set(rec.dense_means) == set(range(5))
    for i in range(5):
        torch.testing.assert_close(rec.dense_means[i].double(), sums[i] / calib.numel(),
                                   rtol=1e-5, atol=1e-6)


def test_state_restored_after_success_and_after_injected_error():
    for fail in (None, "after_removal"):
        model = tiny_model("llama", 6, seed=5).train()
        params = list(model.parameters())
        params[3].requires_grad_(False)
        grads = [torch.full_like(p, 0.5) if k % 2 else None for k, p in enumerate(params)]
        for p, g in zip(params, grads):
            p.grad = g
        flags = [p.requires_grad for p in params]
        calib = random_ids(2, 12, seed=5)
        if fail:
            with pytest.raises(RuntimeError, match="injected"):
                fast_prune(model, calib, 2, metric="gradmap", gradient="param",
                           compensation=[Recorder(fail)])
        else:
            fast_prune(model, calib, 2, metric="gradmap", gradient="param", compensation="none")
        assert [p.requires_grad for p in params] == flags
        assert all(p.grad is g for p, g in zip(params, grads))
        for m in model.modules():
            assert not m.training
            assert not m._forward_hooks and not m._forward_pre_hooks
            assert "forward" not in m.__dict__


def test_state_restored_after_non_finite_error():
    model = tiny_model("llama", 4, seed=6)
    with torch.no_grad():
        get_adapter(model).parts(1).attn_out.weight[0, 0] = float("nan")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(GradmapError, match="non-finite"):
        fast_prune(model, random_ids(2, 8), 1, metric="gradmap", compensation="none",
                   gradient_checkpointing=True)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert original_layer_ids(model) == [0, 1, 2, 3]
    for m in model.modules():
        assert not m._forward_hooks and "forward" not in m.__dict__


def test_one_shot_verify_records_each_decision():
    model = tiny_model("llama", 6, seed=7)
    r = fast_prune(model, random_ids(4, 12, seed=7), 2, metric="gradmap", verify=3,
                   compensation="none", schedule="one-shot")
    notes = r.options["decisions"]
    assert [n["chosen"] for n in notes] == r.removed_layers
    for n in notes:
        assert n["chosen"] == min(n["verify_losses"], key=n["verify_losses"].get)
    assert len(r.scores) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_prune=0), "positive integer"),
    (dict(n_prune=-2), "positive integer"),
    (dict(n_prune=4), "only 4 of 6 layers are removable"),
    (dict(n_prune=2, metric="nope"), "valid metrics: gradmap, block-influence"),
    (dict(n_prune=2, metric="angular", schedule="iterative"), "schedule 'one-shot'"),
    (dict(n_prune=2, metric="sleb", schedule="one-shot"), "metric='ppl'"),
    (dict(n_prune=2, schedule="greedy"), "'one-shot', 'iterative'"),
    (dict(n_prune=2, calib=torch.zeros(0, 8, dtype=torch.long)), "empty"),
    (dict(n_prune=2, calib=random_ids(1, 300)), "max_position_embeddings=256"),
    (dict(n_prune=2, calib=random_ids(2, 8).float()), "integer token ids"),
    (dict(n_prune=2, calib=torch.full((2, 8), 500)), "vocabulary"),
    (dict(n_prune=2, protect_first=-1), "protect_first"),
    (dict(n_prune=2, batch_size=0), "batch_size"),
    (dict(n_prune=2, compensation=42), "compensation must be"),
    (dict(n_prune=2, verify="all"), "verify"),
])
def test_bad_input_is_rejected_before_the_model_is_touched(kwargs, match):
    model = tiny_model("llama", 6, seed=8)
    before = copy.deepcopy(model.state_dict())
    kwargs.setdefault("calib", random_ids(2, 8))
    kwargs.setdefault("compensation", "none")
    calib = kwargs.pop("calib")
    n_prune = kwargs.pop("n_prune")
    with pytest.raises(GradmapError, match=match):
        fast_prune(model, calib, n_prune, **kwargs)
    assert original_layer_ids(model) == list(range(6))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("metric,expected", [("gradmap", "one-shot"), ("block-influence", "iterative"),
                                             ("ppl", "one-shot"), ("sleb", "iterative")])
def test_default_schedule_is_the_metrics_own(metric, expected):
    model = tiny_model("llama", n_layers=5)
    result = fast_prune(model, random_ids(3, 12), 2, metric=metric, compensation="none")
    assert result.schedule == expected
    assert len(result.scores) == (1 if expected == "one-shot" else 2)
