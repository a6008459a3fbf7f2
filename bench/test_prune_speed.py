"""Cost of every layer metric relative to one plain forward+backward over the calibration set.

    pytest bench/test_prune_speed.py --benchmark-only -s          # SmolLM2, 16 x 256, n_prune=8
    pytest bench/test_prune_speed.py --benchmark-disable          # CI smoke: tiny model, runs once
    GRADMAP_BENCH_NCAL=4 GRADMAP_BENCH_SEQ=128 GRADMAP_BENCH_NPRUNE=2 pytest bench/test_prune_speed.py --benchmark-only

The floor is `model(ids, labels=ids).loss.backward()` over the same micro-batches with every
parameter requiring grad. Each metric row records `ratio_to_floor` in `extra_info` (the floor
test runs first in the module). Targets: GradMAP one-shot without verify <= 1.5x the floor,
iterative with k decisions <= k + 0.5, GradMAP one-shot >= 4x faster than ppl and iterative
>= 4x faster than sleb at the same n_prune.
"""
from __future__ import annotations

import copy
import time

import pytest
import torch

from gradmap import fast_prune

CASES = [  # (metric, schedule, options)
    ("gradmap", "one-shot", {"verify": 0}), ("gradmap", "iterative", {"verify": 0}),
    ("gradmap", "one-shot", {"verify": 4}), ("gradmap", "iterative", {"verify": 4}),  # on 1/4 of rows
    ("gradmap", "one-shot", {"gradient": "param", "verify": 0}),
    ("block-influence", "one-shot", {}), ("block-influence", "iterative", {}),
    ("angular", "one-shot", {}), ("taylor", "one-shot", {}), ("taylor", "iterative", {}),
    ("magnitude", "one-shot", {}), ("ppl", "one-shot", {}), ("sleb", "iterative", {}),
]
_FLOOR: dict[str, float] = {}


def _record(benchmark, seconds: float, calib: torch.Tensor, **extra) -> None:
    benchmark.extra_info.update(seconds=round(seconds, 3), threads=torch.get_num_threads(),
                                torch=torch.__version__, ncal=calib.shape[0], seq=calib.shape[1], **extra)
    if "floor" in _FLOOR and "floor" not in extra.get("case", ""):
        benchmark.extra_info["ratio_to_floor"] = round(seconds / _FLOOR["floor"], 3)


def test_floor_forward_backward(benchmark, prune_setup):
    model, calib, _, batch_size = prune_setup
    model = copy.deepcopy(model)

    def floor():
        t = time.perf_counter()
        for s in range(0, calib.shape[0], batch_size):
            rows = calib[s:s + batch_size]
            model(input_ids=rows, labels=rows, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    seconds = benchmark.pedantic(floor, rounds=1, iterations=1, warmup_rounds=0)
    _FLOOR["floor"] = seconds
    benchmark.group = "prune-speed"
    _record(benchmark, seconds, calib, case="floor (plain forward+backward)")


@pytest.mark.parametrize("metric,schedule,options", CASES,
                         ids=[f"{m}-{s}" + "".join(f"-{k}={v}" for k, v in o.items()) for m, s, o in CASES])
def test_metric_cost(benchmark, prune_setup, metric, schedule, options):
    model, calib, n_prune, batch_size = prune_setup

    def prune():
        pruned = copy.deepcopy(model)
        return fast_prune(pruned, calib, n_prune, metric=metric, compensation="none", schedule=schedule,
                          batch_size=batch_size, **options)

    result = benchmark.pedantic(prune, rounds=1, iterations=1, warmup_rounds=0)
    assert len(result.removed_layers) == n_prune
    benchmark.group = "prune-speed"
    _record(benchmark, result.timings["scoring"], calib, case=f"{metric} {schedule} {options}",
            total_s=round(result.timings["total"], 3), removed=result.removed_layers,
            n_prune=n_prune)
