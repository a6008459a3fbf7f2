"""Time each compensation adds to a pruning run, as a ratio to the same run without it.

    pytest bench/test_compensation_overhead.py --benchmark-only -s    # SmolLM2, 16 x 256, n_prune=8
    pytest bench/test_compensation_overhead.py --benchmark-disable    # CI smoke: tiny model, runs once

Layer selection is fixed (block influence, one-shot: one forward) so the rows differ only in
the compensation. Each row records the compensation's own phases (statistics, solve) and
`ratio_to_none` = total pruning time / the total of the `none` row (which runs first).
"""
from __future__ import annotations

import copy

import pytest
import torch

from gradmap import fast_prune

COMPENSATIONS = ["none", "magnitude", "projection", "replaceme", ["magnitude", "projection"]]
_NONE: dict[str, float] = {}


def _name(spec) -> str:
    return "+".join(spec) if isinstance(spec, list) else spec


@pytest.mark.parametrize("compensation", COMPENSATIONS, ids=[_name(c) for c in COMPENSATIONS])
def test_compensation_cost(benchmark, prune_setup, compensation):
    model, calib, n_prune, batch_size = prune_setup

    def prune():
        pruned = copy.deepcopy(model)
        return fast_prune(pruned, calib, n_prune, metric="block-influence", schedule="one-shot",
                          compensation=compensation, batch_size=batch_size)

    result = benchmark.pedantic(prune, rounds=1, iterations=1, warmup_rounds=0)
    assert len(result.removed_layers) == n_prune
    total = result.timings["total"]
    if compensation == "none":
        _NONE["total"] = total
    benchmark.group = "compensation-overhead"
    benchmark.extra_info.update(
        case=_name(compensation), total_s=round(total, 3), threads=torch.get_num_threads(),
        ncal=calib.shape[0], seq=calib.shape[1], n_prune=n_prune,
        **{f"{k}_s": round(v, 3) for k, v in result.timings.items() if k != "total"})
    if "total" in _NONE and compensation != "none":
        benchmark.extra_info["ratio_to_none"] = round(total / _NONE["total"], 3)
