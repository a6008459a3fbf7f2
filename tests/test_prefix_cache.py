"""The iterative loop's prefix cache (gradmap.runtime.prefix_cache): a re-scoring pass replays the
layers before the first changed one and must give what a full pass gives."""
from __future__ import annotations

import copy

import pytest
import torch

import gradmap.prune.driver as driver
from gradmap import fast_prune
from gradmap.core.adapter import get_adapter
from gradmap.core.errors import GradmapError
from gradmap.core.surgery import remove_layers
from gradmap.runtime.passes import forward_pass
from gradmap.runtime.prefix_cache import PrefixCache
from test_compensation import markov_ids
from tiny import FAMILIES, tiny_model


def _no_cache(monkeypatch):
    monkeypatch.setattr(driver, "PrefixCache", lambda: PrefixCache(max_bytes=0))


def _layer_outputs(model, calib, cache=None):
    """Every (position, micro-batch) -> (h_in, h_out) a pass shows its callback."""
    seen = {}

    def on_layer(pos, h_in, h_out):
        seen.setdefault(pos, []).append((h_in.clone(), h_out.clone()))
    forward_pass(model, get_adapter(model), calib, 3, on_layer, cache=cache)
    return seen


def _same(a, b):
    assert a.keys() == b.keys()
    for pos in a:
        assert len(a[pos]) == len(b[pos])
        for (x_in, x_out), (y_in, y_out) in zip(a[pos], b[pos]):
            assert torch.equal(x_in, y_in) and torch.equal(x_out, y_out), f"position {pos} differs"


@pytest.mark.parametrize("family", FAMILIES)
def test_iterative_loop_with_cache_matches_full_passes(family, monkeypatch):
    """Block influence + magnitude, iterative: the same layers, scores and folded weights as
    with every layer recomputed; only the RMSNorm eps separates the scaled kept states from
    recomputed ones."""
    base = tiny_model(family, 8, dtype=torch.float64)
    calib = markov_ids(12, 24, 3)
    runs = {}
    for mode in ("cache", "full"):
        if mode == "full":
            _no_cache(monkeypatch)
        m = copy.deepcopy(base)
        r = fast_prune(m, calib, 4, metric="block-influence", compensation=["magnitude"],
                       schedule="iterative", progress=False, safeguard=False, batch_size=5)
        runs[mode] = (r, m)
    (rc, mc), (rf, mf) = runs["cache"], runs["full"]
    assert rc.removed_layers == rf.removed_layers
    assert rc.options["rescoring"]["layers_replayed"] > 0
    assert rf.options["rescoring"]["layers_replayed"] == 0
    for sc, sf in zip(rc.scores, rf.scores):
        for i in sf:
            assert sc[i] == pytest.approx(sf[i], rel=1e-3, abs=1e-6)
    for pc, pf in zip(mc.parameters(), mf.parameters()):
        torch.testing.assert_close(pc, pf, rtol=1e-4, atol=1e-6)


def test_without_a_fold_the_replayed_pass_is_exact(monkeypatch):
    """No compensation: nothing scales the prefix, so the kept states are the recomputed ones
    bit for bit, and every score equals the full pass's."""
    base = tiny_model("llama", 8)
    calib = markov_ids(12, 24, 4)
    results = []
    for mode in ("cache", "full"):
        if mode == "full":
            _no_cache(monkeypatch)
        m = copy.deepcopy(base)
        results.append(fast_prune(m, calib, 4, metric="block-influence", compensation="none",
                                  schedule="iterative", progress=False, batch_size=5))
    assert results[0].options["rescoring"]["layers_replayed"] > 0
    assert results[0].removed_layers == results[1].removed_layers
    assert results[0].scores == results[1].scores


def test_removal_and_an_unannounced_edit_restart_the_pass_where_they_happened():
    """A removal at position 5 and an edit through `.data` (no version bump) at position 2:
    the next pass replays positions 0-1 only and shows what a full pass shows."""
    model = tiny_model("qwen2", 8)
    calib = markov_ids(7, 16, 5)
    cache = PrefixCache()
    _layer_outputs(model, calib, cache)
    remove_layers(model, [5])
    again = _layer_outputs(model, calib, cache)
    assert cache.reused == 5
    _same(again, _layer_outputs(model, calib))
    with torch.no_grad():
        get_adapter(model).layers[2].mlp.down_proj.weight.data.mul_(1.5)
    before = cache.reused
    edited = _layer_outputs(model, calib, cache)
    assert cache.reused - before == 2
    _same(edited, _layer_outputs(model, calib))


def test_a_memory_bound_keeps_only_the_leading_layers():
    model = tiny_model("mistral", 8)
    calib = markov_ids(7, 16, 6)
    one_position = 7 * 16 * model.config.hidden_size * 4
    cache = PrefixCache(max_bytes=3 * one_position)
    _layer_outputs(model, calib, cache)
    assert len(cache.states) == 3
    remove_layers(model, [6])
    again = _layer_outputs(model, calib, cache)
    assert cache.reused == 2  # positions 0 and 1: replaying needs each one's kept output too
    _same(again, _layer_outputs(model, calib))


@pytest.mark.parametrize("raw", ["lots", "-1", "2.5e9"])
def test_a_bad_memory_bound_in_the_environment_is_named(raw, monkeypatch):
    monkeypatch.setenv("GRADMAP_PREFIX_CACHE_BYTES", raw)
    with pytest.raises(GradmapError, match="GRADMAP_PREFIX_CACHE_BYTES"):
        PrefixCache()
    monkeypatch.setenv("GRADMAP_PREFIX_CACHE_BYTES", "0")
    assert PrefixCache().max_bytes == 0
