"""Magnitude compensation reads its statistics from a forward-only scoring pass when that pass
saw exactly the model and micro-batches it would measure (driver `_scored_abs_device`), and
the pruned model is bit for bit the one its own forward gives."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny import random_ids, tiny_model

from gradmap.prune import driver
from gradmap.prune.compensation.magnitude import MagnitudeCompensation
from gradmap.prune.driver import fast_prune


def _forwards(model):
    """Count calls of decoder layer 0: one per micro-batch of every pass that runs the model."""
    calls = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def _prune(model, calib, schedule, compensation="magnitude", metric="block-influence", **kw):
    calls, handle = _forwards(model)
    try:
        res = fast_prune(model, calib, 3, metric=metric, compensation=compensation, schedule=schedule,
                         batch_size=2, progress=False, **kw)
    finally:
        handle.remove()
    return res, len(calls)


@pytest.fixture(autouse=True)
def _full_rescoring(monkeypatch):
    """Bit-for-bit comparisons with a fresh forward: the iterative loop's prefix cache replays
    states scaled by the magnitude fold, equal only up to the RMSNorm eps
    (tests/test_prefix_cache.py), so every layer is recomputed here."""
    from gradmap.runtime.prefix_cache import PrefixCache
    monkeypatch.setattr(driver, "PrefixCache", lambda: PrefixCache(max_bytes=0))


def _without_scored_abs(monkeypatch):
    monkeypatch.setattr(driver, "_scored_abs_device", lambda *a, **k: None)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("schedule,from_scoring", [("iterative", 3), ("one-shot", 1)])
def test_statistics_from_scoring_pass_are_bitwise_and_save_forwards(family, schedule, from_scoring,
                                                                  monkeypatch):
    base = tiny_model(family, n_layers=6, dtype=torch.float64, seed=1)
    calib = random_ids(6, 16, seed=2)  # 3 micro-batches of 2
    fast, fast_calls = _prune(copy.deepcopy(base), calib, schedule)
    with monkeypatch.context() as m:
        _without_scored_abs(m)
        slow_model = copy.deepcopy(base)
        slow, slow_calls = _prune(slow_model, calib, schedule)
    report = fast.compensation_report["magnitude"]
    assert len(report["statistics_from_scoring_pass"]) == from_scoring
    assert report["statistics_from_scoring_pass"] == fast.removed_layers[:from_scoring]
    assert "statistics_from_scoring_pass" not in slow.compensation_report["magnitude"]
    assert fast.removed_layers == slow.removed_layers and fast.scores == slow.scores
    assert report["scales"] == slow.compensation_report["magnitude"]["scales"]  # exact floats
    # each removal served from the scoring pass skips one forward over every micro-batch
    assert slow_calls - fast_calls == 3 * from_scoring


def test_state_dict_is_identical(monkeypatch):
    base = tiny_model("llama", n_layers=6, dtype=torch.float64, seed=3)
    calib = random_ids(4, 12, seed=4)
    fast_model, slow_model = copy.deepcopy(base), copy.deepcopy(base)
    _prune(fast_model, calib, "iterative", compensation=["magnitude", "replaceme"])
    with monkeypatch.context() as m:
        _without_scored_abs(m)
        _prune(slow_model, calib, "iterative", compensation=["magnitude", "replaceme"])
    fast_sd, slow_sd = fast_model.state_dict(), slow_model.state_dict()
    assert fast_sd.keys() == slow_sd.keys()
    for k in fast_sd:
        assert torch.equal(fast_sd[k], slow_sd[k]), k


@pytest.mark.parametrize("case", ["gradient metric", "max_samples", "batch sizes differ"])
def test_own_forward_when_the_scoring_pass_does_not_match(case):
    model = tiny_model("llama", n_layers=6, dtype=torch.float64, seed=5)
    calib = random_ids(4, 12, seed=6)
    kw = dict(metric="block-influence", compensation="magnitude", schedule="iterative", progress=False)
    if case == "gradient metric":
        res = fast_prune(model, calib, 2, batch_size=2, **{**kw, "metric": "gradmap"})
    elif case == "max_samples":
        res = fast_prune(model, calib, 2, batch_size=2, **{**kw, "compensation": MagnitudeCompensation(3)})
    else:  # batch_size=None: scoring and compensation sizes both default; force them apart
        comp = MagnitudeCompensation()
        assert comp.reads_scored_abs
        device = driver._scored_abs_device(driver.get_metric("block-influence"), [comp], model, 2, 4)
        assert device is None
        res = fast_prune(model, calib, 2, batch_size=2, **kw)
        assert len(res.compensation_report["magnitude"]["statistics_from_scoring_pass"]) == 2
        return
    assert "statistics_from_scoring_pass" not in res.compensation_report["magnitude"]
    assert len(res.compensation_report["magnitude"]["scales"]) == 2


def test_layer_offload_records_the_same_statistics():
    base = tiny_model("llama", n_layers=6, dtype=torch.float64, seed=7)
    calib = random_ids(4, 12, seed=8)
    mem, _ = _prune(copy.deepcopy(base), calib, "iterative")
    streamed, _ = _prune(copy.deepcopy(base), calib, "iterative", offload="layer", compute_device="cpu")
    got = streamed.compensation_report["magnitude"]
    assert got["statistics_from_scoring_pass"] == streamed.removed_layers == mem.removed_layers
    assert got["scales"] == pytest.approx(mem.compensation_report["magnitude"]["scales"], rel=1e-12)


def test_layer_offload_records_statistics_on_the_compute_device(monkeypatch):
    """offload="layer": the scoring pass's magnitude sums are kept where the activations are computed,
    not on the host that holds the weights (else strict mode raises on a GPU and every layer's
    hidden states are copied to the host). A fake second device stands in for the GPU: "cpu:0"
    compares unequal to the host's "cpu" while computing on the CPU."""
    from gradmap.runtime.batching import AbsSink
    made = []

    class RecordingSink(AbsSink):
        def __init__(self, device, statistic="ratio"):
            made.append(torch.device(device))
            super().__init__(device, statistic)
    monkeypatch.setattr(driver, "AbsSink", RecordingSink)
    monkeypatch.setenv("GRADMAP_STRICT_KERNELS", "1")
    compute = torch.device("cpu", 0)
    assert compute != torch.device("cpu")
    model = tiny_model("llama", n_layers=6, dtype=torch.float64, seed=7)
    res, _ = _prune(model, random_ids(4, 12, seed=8), "iterative", offload="layer", compute_device=compute)
    assert res.compensation_report["magnitude"]["statistics_from_scoring_pass"] == res.removed_layers
    assert made == [compute] * 3, made  # one sink per scoring pass, each on the compute device
