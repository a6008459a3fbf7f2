"""What the prefix cache saves in the iterative loop (issue 24, Part 3): the default's first
candidate, block influence (iterative) + magnitude + ReplaceMe, with the cache and with every
layer recomputed, in the same process, on the same model and rows.

    OMP_NUM_THREADS=1 taskset -c 1 pytest bench/test_rescoring_cache.py --benchmark-only -s
    pytest bench/test_rescoring_cache.py --benchmark-disable      # CI smoke: tiny model

Each row records the scoring seconds, the total seconds and the layer positions replayed and
run; the cached row also records `scoring_ratio_to_full` against the full row (run first).
"""
from __future__ import annotations

import copy

import pytest

import gradmap.prune.driver as driver
from gradmap import fast_prune
from gradmap.runtime.prefix_cache import PrefixCache

_FULL: dict[str, object] = {}


@pytest.mark.parametrize("mode", ["full", "cached"])
def test_iterative_default_candidate(benchmark, prune_setup, mode, monkeypatch):
    model, calib, n_prune, _ = prune_setup
    if mode == "full":
        monkeypatch.setattr(driver, "PrefixCache", lambda: PrefixCache(max_bytes=0))

    def prune():
        pruned = copy.deepcopy(model)
        return fast_prune(pruned, calib, n_prune, metric="block-influence", compensation=["magnitude", "replaceme"],
                          schedule="iterative", progress=False)

    result = benchmark.pedantic(prune, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.group = "rescoring-cache"
    info = {"mode": mode, "scoring_s": round(result.timings["scoring"], 3),
            "total_s": round(result.timings["total"], 3), "removed": result.removed_layers,
            **result.options["rescoring"]}
    if mode == "full":
        _FULL.update(info)
    elif _FULL:
        assert result.removed_layers == _FULL["removed"]
        info["scoring_ratio_to_full"] = round(info["scoring_s"] / _FULL["scoring_s"], 3)
        info["total_ratio_to_full"] = round(info["total_s"] / _FULL["total_s"], 3)
    benchmark.extra_info.update(info)
    print(info)
