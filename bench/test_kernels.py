"""Kernel and solve benchmarks: every row of bench/kernel_table.py, every implementation of it.

    pytest bench/test_kernels.py --benchmark-only -s          # measure (prints rates and ratios)
    pytest bench/test_kernels.py --benchmark-disable          # CI smoke test: small sizes, run once

The rows, their production shapes (Llama-3-8B) and baselines live in `bench.kernel_table.TABLE`,
which `.ci/gpu` (bench/gpu_perf.py) times too. A row runs on each device its production shapes
name: the Triton kernels on CUDA (skipped without one), the projection solve on CUDA and CPU
(d = 576 there; GRADMAP_BENCH_THREADS=1 pins torch to one thread). Every implementation's
result is checked against fp64 after it is timed (`Workload.verify`).

Rates: TB/s = minimum bytes read+written / median time; TFLOP/s for XᵀX counts 2·T·d² (a full
XᵀX), so the upper-triangle kernel's figure is an "effective" rate.
"""
from __future__ import annotations

import os

import pytest
import torch

from .harness import measure
from .kernel_table import TABLE, Unavailable

CUDA = torch.cuda.is_available()
_medians: dict[tuple[str, str], float] = {}
_built: dict[tuple, object] = {}  # the last workload only: a row's implementations share its inputs

ROWS = [(device, case, shape_i, impl) for case in TABLE for device in case.shapes
        for shape_i in range(len(case.shapes[device])) for impl in case.impls]


def _id(row) -> str:
    device, case, shape_i, impl = row
    return f"{device}-{case.name.replace(' ', '_')}-{shape_i}-{impl}"


@pytest.fixture
def cpu_threads():
    """GRADMAP_BENCH_THREADS=N pins torch's CPU threads for a benchmark (restored afterwards)."""
    before = torch.get_num_threads()
    wanted = os.environ.get("GRADMAP_BENCH_THREADS")
    if wanted:
        torch.set_num_threads(int(wanted))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


def _workload(case, device: str, shape: tuple):
    key = (case.name, device, shape)
    if key not in _built:
        _built.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
        _built[key] = case.build(device, shape)
    return _built[key]


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_kernel_row(benchmark, row, cpu_threads):
    device, case, shape_i, impl = row
    if device == "cuda" and not CUDA:
        pytest.skip("no CUDA device: the GPU rows need one")
    shapes = case.shapes if benchmark.enabled else case.small
    if shape_i >= len(shapes.get(device, ())):
        pytest.skip(f"{case.name}: no {'' if benchmark.enabled else 'small '}{device} shape {shape_i}")
    shape = shapes[device][shape_i]
    try:
        work = _workload(case, device, shape)
        fn = work.calls[impl]
        group = f"{device}_{case.name.replace(' ', '_')}_{shape_i}"
        measure(benchmark, fn, group=group, device=device, bytes_moved=work.bytes_moved, flops=work.flops,
                baseline=impl == case.baseline, impl=impl, shape=work.shape, threads=cpu_threads,
                rounds=5, warmup_rounds=1, **work.detail)
        work.verify(impl)
    except Unavailable as why:
        pytest.skip(str(why))
    if benchmark.enabled and benchmark.stats is not None:
        median = benchmark.stats.stats.median
        _medians[group, impl] = median
        base = _medians.get((group, case.baseline))
        ratio = f", {base / median:.2f}x vs {case.baseline}" if base and impl != case.baseline else ""
        print(f"\n[{group}] {impl}: {median * 1e3:.3f} ms{ratio}")
