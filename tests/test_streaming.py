"""Models larger than one device: layer streaming (offload="layer") and accelerate device maps.

The compute device is the CPU here; the memory bound is checked by tracking which module
groups `gradmap.runtime.placement.on_device` has placed on the compute device whenever a module runs.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
from tiny import paired_leaves, random_ids, tiny_model

from gradmap import GradmapError, fast_prune, get_adapter
from gradmap.runtime import placement
from gradmap.prune.compensation.base import Compensator
from gradmap.prune.metrics import ScoringRun, gate_statistics, get_metric
from gradmap.runtime.batching import MeanSink
from gradmap.runtime.passes import calibration_losses, forward_pass

FAMILIES = ["llama", "gemma2", "qwen2"]
REL = 1e-8


def _run(model, calib, n_prune=2, batch_size=2):
    ad = get_adapter(model)
    return ScoringRun(model, ad, calib, batch_size, ad.original_ids[1:-1], n_prune)


def _close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert abs(a[k] - b[k]) <= REL * max(abs(a[k]), 1e-12), f"{what} layer {k}: {a[k]} vs {b[k]}"


def _streamed(model, fn):
    with placement.layer_offload(model, "cpu"):
        return fn()


@pytest.fixture(scope="module", params=FAMILIES)
def fp64_model(request):
    return tiny_model(request.param, n_layers=5, dtype=torch.float64, seed=3), random_ids(5, 20, seed=4)


@pytest.mark.parametrize("name,options", [("block-influence", {}), ("angular", {}),
                                          ("angular", {"tokens": "all"}), ("ppl", {}),
                                          ("gradmap", {"verify": 2, "verify_samples": 3})],
                         ids=["bi", "angular", "angular-all", "ppl", "gradmap-verify"])
def test_forward_metrics_match_in_memory(fp64_model, name, options):
    model, calib = fp64_model
    metric = get_metric(name, **options)
    ref = metric.score(_run(model, calib))
    got = _streamed(model, lambda: metric.score(_run(model, calib)))
    _close(ref, got, name)


def test_gradient_statistics_match_in_memory(fp64_model):
    model, calib = fp64_model
    norms = ("none", "h_in", "u")
    ref = gate_statistics(_run(model, calib), norms)
    got = _streamed(model, lambda: gate_statistics(_run(model, calib), norms))
    assert ref.keys() == got.keys() and len(ref) == 9
    for key in ref:
        _close(ref[key], got[key], str(key))
    # the gradient really flows through every layer: scores differ from layer to layer
    assert len({round(v, 12) for v in got["token", "none"].values()}) == 5


def test_dense_means_and_losses_match(fp64_model):
    model, calib = fp64_model
    ad = get_adapter(model)
    ref_sink, got_sink = MeanSink(), MeanSink()
    forward_pass(model, ad, calib, 2, None, sink=ref_sink)
    _streamed(model, lambda: forward_pass(model, ad, calib, 2, None, sink=got_sink))
    ref_means, got_means = ref_sink.means(), got_sink.means()
    assert ref_means.keys() == got_means.keys() == set(range(5))
    for i in ref_means:
        torch.testing.assert_close(got_means[i], ref_means[i], rtol=REL, atol=0)
    skips = [None, ad.layers[2]]
    ref = calibration_losses(model, calib, 2, skips)
    got = _streamed(model, lambda: calibration_losses(model, calib, 2, skips))
    assert ref[1] != ref[0]
    _close(dict(enumerate(ref)), dict(enumerate(got)), "loss")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("metric,schedule", [("gradmap", "iterative"), ("block-influence", "one-shot")])
def test_fast_prune_streamed_removes_the_same_layers(family, metric, schedule):
    base = tiny_model(family, n_layers=6, dtype=torch.float64, seed=5)
    calib = random_ids(6, 20, seed=6)  # longer than Gemma2's sliding window (16): per-layer masks differ
    ref_model, model = copy.deepcopy(base), copy.deepcopy(base)
    ref = fast_prune(ref_model, calib, 2, metric=metric, compensation="none", schedule=schedule, batch_size=4)
    got = fast_prune(model, calib, 2, metric=metric, compensation="none", schedule=schedule, batch_size=4,
                     offload="layer", compute_device="cpu")
    assert got.removed_layers == ref.removed_layers
    for r, g in zip(ref.scores, got.scores):
        _close(r, g, "scores")
    for (n1, p1), (n2, p2) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def _same_result(ref, got, ref_model, model) -> None:
    """Removed layers, scores, shifts, compensation report and final weights agree (REL)."""
    assert got.removed_layers == ref.removed_layers
    for r, g in zip(ref.scores, got.scores):
        _close(r, g, "scores")
    _close(ref.shifts, got.shifts, "shifts")
    _close_tree(ref.compensation_report, got.compensation_report, "report")
    ref_sd, got_sd = ref_model.state_dict(), model.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(got_sd[k], ref_sd[k], rtol=REL, atol=0, msg=k)


def _close_tree(a, b, what: str) -> None:
    for x, y, where in paired_leaves(a, b, what):
        if isinstance(x, float) and not isinstance(x, bool):
            assert abs(x - y) <= REL * max(abs(x), 1e-12), f"{where}: {x} vs {y}"
        else:
            assert x == y, f"{where}: {x!r} vs {y!r}"


def _compensators(spec):
    from gradmap.prune.compensation.projection import ProjectionCompensation
    from gradmap.prune.compensation.replaceme import ReplaceMeCompensation
    return {"projection-folds": lambda: ProjectionCompensation(top_m=2, per_gap=True, safeguards=False),
            "replaceme-folds": lambda: ReplaceMeCompensation(safeguards=False),
            "projection-two-pass": lambda: ProjectionCompensation(top_m=1, max_stat_bytes=1),
            }.get(spec if isinstance(spec, str) else "", lambda: spec)()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("metric,compensation,schedule", [
    ("block-influence", "projection", "one-shot"),            # safeguards: held-out checks, reverts
    ("gradmap", "projection-folds", "iterative"),             # every site folded
    ("block-influence", "projection-two-pass", "one-shot"),   # shifts first, then the picked sites
    ("block-influence", "replaceme", "one-shot"),
    ("sleb", "replaceme-folds", "iterative"),                 # site in the shared prefix, target after it
    ("angular", "magnitude", "one-shot"),
    ("gradmap", ["magnitude", "projection"], "iterative"),
], ids=["bi-projection", "gradmap-projection-folds", "bi-projection-two-pass", "bi-replaceme",
        "sleb-replaceme-folds", "angular-magnitude", "gradmap-magnitude-projection"])
def test_compensation_streamed_matches_in_memory(family, metric, compensation, schedule):
    base = tiny_model(family, n_layers=7, dtype=torch.float64, seed=21)
    calib = random_ids(9, 20, seed=22)  # 9 rows: 8 train + 1 held out, batches of 2 leave a short one
    ref_model, model = copy.deepcopy(base), copy.deepcopy(base)
    kw = dict(metric=metric, schedule=schedule, batch_size=2)
    ref = fast_prune(ref_model, calib, 3, compensation=_compensators(compensation), **kw)
    got = fast_prune(model, calib, 3, compensation=_compensators(compensation), offload="layer",
                     compute_device="cpu", **kw)
    _same_result(ref, got, ref_model, model)
    if compensation in ("projection-folds", "replaceme-folds", "magnitude"):  # the folds edited weights
        kept = dict(model.named_parameters())
        assert any(not torch.equal(p, kept[n]) for n, p in base.named_parameters() if n in kept)
        assert all(e["folded"] for c in got.compensation_report.values() for e in c.get("sites", []))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("allocation,score", [("uniform", "wanda"), ("owl", "wanda"), ("mrp", "wanda"),
                                              ("uniform", "magnitude")])
def test_sparsify_streamed_gives_the_same_masks(family, allocation, score):
    from gradmap.sparsity import sparsify
    base = tiny_model(family, n_layers=4, dtype=torch.float64, seed=31)
    calib = random_ids(5, 20, seed=32)
    ref_model, model = copy.deepcopy(base), copy.deepcopy(base)
    ref = sparsify(ref_model, calib, 0.5, allocation, score, batch_size=2, progress=False, mrp_step=0.05)
    got = sparsify(model, calib, 0.5, allocation, score, batch_size=2, progress=False, mrp_step=0.05,
                   offload="layer", compute_device="cpu")
    assert placement.offload_of(model) is None
    ref_d, got_d = ref.to_dict(), got.to_dict()
    ref_d.pop("timings"), got_d.pop("timings")
    assert got_d == ref_d
    assert got.overall_sparsity == pytest.approx(0.5, abs=1e-3)
    for (n1, a), (n2, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1


@pytest.mark.parametrize("kwargs,match", [(dict(offload="disk"), "offload='disk' is not valid"),
                                          (dict(offload="layer", compute_device="meta"), "cannot compute")])
def test_sparsify_bad_offload_is_rejected_untouched(kwargs, match):
    from gradmap.sparsity import sparsify
    model = tiny_model("llama", n_layers=3, seed=33)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(GradmapError, match=match):
        sparsify(model, random_ids(2, 8), 0.5, "uniform", progress=False, **kwargs)
    assert placement.offload_of(model) is None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class _Residency:
    """Which module groups `on_device` has placed right now, with their parameter counts."""

    def __init__(self, monkeypatch):
        self.placed: list[tuple[set[int], int]] = []  # (ids of the placed modules, parameter count)
        self.peak = 0
        self.max_layers = 0
        self.layer_ids: set[int] = set()
        original = placement.on_device

        @contextmanager
        def tracking(modules, device, write_back=False):
            ids = {id(m) for mod in modules for m in mod.modules()}
            n = sum(p.numel() for p in {id(p): p for mod in modules for p in mod.parameters()}.values())
            entry = (ids, n)
            self.placed.append(entry)
            self.peak = max(self.peak, sum(k for _, k in self.placed))
            self.max_layers = max(self.max_layers,
                                  sum(1 for ids_, _ in self.placed if ids_ & self.layer_ids))
            try:
                with original(modules, device, write_back):
                    yield
            finally:
                self.placed.remove(entry)
        monkeypatch.setattr(placement, "on_device", tracking)

    def is_placed(self, module) -> bool:
        return any(id(module) in ids for ids, _ in self.placed)


def _prune_job(metric, compensation):
    def job(model):
        fast_prune(model, random_ids(5, 10, seed=8), 2, metric=metric, compensation=compensation,
                   schedule="iterative", batch_size=2, offload="layer", compute_device="cpu")
    return job


def _sparsify_job(allocation):
    def job(model):
        from gradmap.sparsity import sparsify
        sparsify(model, random_ids(4, 10, seed=8), 0.5, allocation, batch_size=2, progress=False,
                 offload="layer", compute_device="cpu")
    return job


@pytest.mark.parametrize("job,head", [
    (_prune_job("gradmap", "none"), True), (_prune_job("block-influence", "none"), False),
    (_prune_job("gradmap", ["magnitude", "projection"]), True),   # dense path, held-out LM loss
    (_prune_job("sleb", "replaceme"), True), (_sparsify_job("mrp"), False), (_sparsify_job("owl"), False),
], ids=["gradmap", "block-influence", "gradmap-magnitude-projection", "sleb-replaceme", "sparsify-mrp",
        "sparsify-owl"])
def test_at_most_one_layer_on_the_compute_device(monkeypatch, job, head):
    model = tiny_model("llama", n_layers=6, seed=7)
    ad = get_adapter(model)
    res = _Residency(monkeypatch)
    res.layer_ids = {id(layer) for layer in ad.layers}  # removed layers too (the dense path runs them)
    ran: list[str] = []

    def must_be_placed(name):
        def hook(module, args):
            assert res.is_placed(module), f"{name} ran while not placed on the compute device"
            ran.append(name)
        return hook

    groups = {f"layer{i}": layer for i, layer in enumerate(ad.layers)}
    groups.update(embed=ad.embed_tokens, norm=ad.final_norm, head=ad.lm_head)
    # leaf modules: they run only when their layer really computes (capturing the block
    # inputs calls each layer's __call__ with a recorder that computes nothing)
    leaves = {n: [m for m in g.modules() if next(m.children(), None) is None] for n, g in groups.items()}
    handles = [m.register_forward_pre_hook(must_be_placed(n)) for n, ms in leaves.items() for m in ms]
    try:
        job(model)
    finally:
        for h in handles:
            h.remove()
    layer_size = max(sum(p.numel() for p in layer.parameters()) for layer in groups.values())
    head_size = sum(p.numel() for p in ad.lm_head.parameters()) + sum(p.numel() for p in ad.final_norm.parameters())
    assert res.max_layers == 1
    assert 0 < res.peak <= max(layer_size, head_size)
    assert {"embed", "layer0", "layer4"} <= set(ran)
    assert ("head" in ran) == head
    assert res.placed == [] and all(p.device.type == "cpu" for p in model.parameters())


def test_model_left_as_it_came():
    model = tiny_model("gemma2", n_layers=5, seed=9)
    params = dict(model.named_parameters())
    params["model.layers.1.mlp.up_proj.weight"].requires_grad_(False)
    grad = torch.ones_like(params["model.layers.2.self_attn.q_proj.weight"])
    params["model.layers.2.self_attn.q_proj.weight"].grad = grad
    before = {n: (p.device, p.data_ptr(), p.requires_grad, p.grad) for n, p in params.items()}
    buffers = {n: b.data_ptr() for n, b in model.named_buffers()}
    model.train()
    ad = get_adapter(model)
    for name in ("gradmap", "block-influence", "angular"):
        _streamed(model, lambda: get_metric(name).score(_run(model, random_ids(3, 9), n_prune=1)))
    after = {n: (p.device, p.data_ptr(), p.requires_grad, p.grad) for n, p in model.named_parameters()}
    assert after == before and after["model.layers.2.self_attn.q_proj.weight"][3] is grad
    assert {n: b.data_ptr() for n, b in model.named_buffers()} == buffers
    assert placement.offload_of(model) is None and not model.training

    def boom(pos, h_in, h_out):
        raise RuntimeError("callback failed")
    with pytest.raises(RuntimeError, match="callback failed"):
        _streamed(model, lambda: forward_pass(model, ad, random_ids(2, 8), 2, boom))
    assert {n: (p.device, p.data_ptr(), p.requires_grad, p.grad) for n, p in model.named_parameters()} == before
    assert placement.offload_of(model) is None


class _Custom(Compensator):
    """A user compensator: its own forwards would bypass the streaming engine."""

    name = "custom"


@pytest.mark.parametrize("kwargs,match", [
    (dict(offload="disk"), "offload='disk' is not valid"),
    (dict(offload="layer", metric="taylor"), "offload='layer'"),
    (dict(offload="layer", metric="gradmap", gradient="param"), "offload='layer'"),
    (dict(offload="layer", compensation=_Custom()), "compensation \\['custom'\\] does not support offload"),
    (dict(offload="layer", compute_device="meta"), "cannot compute"),
    (dict(offload="layer", compute_device="tpu:7"), "not a device"),
])
def test_unsupported_streaming_is_rejected(kwargs, match):
    model = tiny_model("llama", n_layers=4, seed=1)
    state = copy.deepcopy(model.state_dict())
    options = dict(metric="gradmap", compensation="none")
    options.update(kwargs)
    with pytest.raises(GradmapError, match=match):
        fast_prune(model, random_ids(2, 8), 1, **options)
    assert get_adapter(model).num_layers == 4 and placement.offload_of(model) is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


# -- accelerate device maps (CPU only: "disk" offload with the CPU as execution device) --------

def _dispatched(base, tmp_path, disk=(1, 3, 4)):
    from accelerate import dispatch_model
    n = get_adapter(base).num_layers
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if i in disk else "cpu" for i in range(n)})
    return dispatch_model(base, device_map=device_map, offload_dir=str(tmp_path), force_hooks=True)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("metric,compensation,disk", [
    ("gradmap", "none", (1, 3, 4)), ("block-influence", "none", (1, 3, 4)), ("angular", "none", (1, 3, 4)),
    ("gradmap", "projection", ()), ("block-influence", "projection", ()), ("taylor", "none", ())])
def test_device_map_matches_plain_model(tmp_path, family, metric, compensation, disk):
    base = tiny_model(family, n_layers=6, dtype=torch.float64, seed=11)
    calib = random_ids(6, 12, seed=12)
    ref_model = copy.deepcopy(base)
    ref = fast_prune(ref_model, calib, 2, metric=metric, compensation=compensation, schedule="one-shot",
                     batch_size=2)
    model = _dispatched(base, tmp_path, disk)
    assert any(hasattr(m, "_hf_hook") for m in model.modules())
    assert any(p.device.type == "meta" for p in model.parameters()) == bool(disk)
    got = fast_prune(model, calib, 2, metric=metric, compensation=compensation, schedule="one-shot",
                     batch_size=2)
    assert got.removed_layers == ref.removed_layers
    _close(ref.scores[0], got.scores[0], "scores")
    assert all(p.requires_grad for p in model.parameters())
    ids = random_ids(2, 9, seed=13)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore")
def test_device_map_rejects_compensation_on_offloaded_weights_and_streaming(tmp_path):
    model = _dispatched(tiny_model("llama", n_layers=5, seed=2), tmp_path, disk=(2,))
    with pytest.raises(GradmapError, match="offloaded"):
        fast_prune(model, random_ids(3, 8), 1, metric="gradmap", compensation="projection")
    for metric, options in (("taylor", {}), ("magnitude", {}), ("gradmap", {"gradient": "param"})):
        with pytest.raises(GradmapError, match="offloaded"):  # their .grad / weights would be lost
            fast_prune(model, random_ids(3, 8), 1, metric=metric, compensation="none", **options)
    with pytest.raises(GradmapError, match="dispatched by accelerate"):
        fast_prune(model, random_ids(3, 8), 1, metric="gradmap", compensation="none", offload="layer")
    assert get_adapter(model).num_layers == 5


@pytest.mark.filterwarnings("ignore")
def test_device_map_sparsify_matches_plain_model(tmp_path):
    from gradmap.sparsity import sparsify
    base = tiny_model("qwen2", n_layers=4, seed=14)
    calib = random_ids(4, 12, seed=15)
    ref = copy.deepcopy(base)
    sparsify(ref, calib, sparsity=0.5, progress=False)
    model = _dispatched(base, tmp_path, disk=())
    sparsify(model, calib, sparsity=0.5, progress=False)
    for (n1, a), (n2, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1
    offloaded = _dispatched(tiny_model("qwen2", n_layers=4, seed=14), tmp_path / "disk", disk=(1,))
    with pytest.raises(GradmapError, match="sparsify needs the weights"):
        sparsify(offloaded, calib, sparsity=0.5, progress=False)


@pytest.mark.filterwarnings("ignore")
def test_evaluation_feeds_the_embedding_device(tmp_path):
    # the first weights (the embedding) offloaded to disk: inputs go to the embedding's execution
    # device, not to the first parameter's ("meta")
    from tiny_tokenizer import tiny_tokenizer

    from gradmap.evaluate import loglikelihoods, perplexity
    from gradmap.evaluate.zero_shot import encode_request
    tok = tiny_tokenizer()
    base = tiny_model("llama", n_layers=3, seed=16)
    ref = copy.deepcopy(base)
    from accelerate import dispatch_model
    device_map = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.norm": "cpu",
                  "lm_head": "cpu", **{f"model.layers.{i}": "cpu" for i in range(3)}}
    model = dispatch_model(base, device_map=device_map, offload_dir=str(tmp_path), force_hooks=True)
    assert next(model.parameters()).device.type == "meta"
    text = "text:" + "the cat sat on the mat. question: what is the answer? answer: yes, and then no. " * 8
    assert perplexity(model, tok, text, seq_len=16, progress=False) == pytest.approx(
        perplexity(ref, tok, text, seq_len=16, progress=False), rel=1e-6)
    reqs = [encode_request(tok, c, t, False, 64) for c, t in
            [("the cat sat on", " the mat"), ("question: what is", " the answer"), ("the cat sat on", " a dog")]]
    got, _ = loglikelihoods(model, reqs, batch_size=4, progress=False)
    want, _ = loglikelihoods(ref, reqs, batch_size=4, progress=False)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
