"""Shared benchmark helper: one timed call per benchmark, with percentiles, peak memory,
achieved bandwidth/throughput and the machine (GPU, versions) recorded in `extra_info`.

Usage inside a pytest-benchmark test::

    from bench.harness import measure  # or, inside bench/: from .harness import measure
    measure(benchmark, fn, group="gate_reduction", device=x.device, bytes_moved=..., flops=...,
            baseline=True)

With ``--benchmark-disable`` (CI smoke runs) `fn` is called once and nothing is timed.
On CUDA every round ends with ``torch.cuda.synchronize()`` so wall time covers the work.
Rows of one `group` are compared by bench/render_results.py (baseline: `baseline=True`).
"""
from __future__ import annotations

import logging
import os
import platform
import time
from typing import Any, Callable

import torch

__all__ = ["machine_info", "measure", "percentiles", "time_calls"]

log = logging.getLogger("gradmap.bench")


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """GPU (or CPU) name and the versions that decide kernel speed."""
    device = torch.device(device)
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "cpu": platform.processor() or platform.machine(),
                            "cpu_threads": torch.get_num_threads(), "os_cpus": os.cpu_count()}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # triton is optional on CPU machines
        info["triton"] = "not installed"
    try:
        import gradmap
        info["gradmap"] = gradmap.__version__
    except Exception:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda, sm=f"{props.major}.{props.minor}")
    else:
        info["gpu"] = "none"
    return info


def percentiles(data: list[float], qs=(10, 50, 90)) -> dict[str, float]:
    """Nearest-rank percentiles of `data` (seconds), keyed "p10", "p50", ..."""
    xs = sorted(data)
    out = {}
    for q in qs:
        k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
        out[f"p{q}"] = xs[k]
    return out


def time_calls(fn: Callable[[], Any], device: torch.device | str = "cpu", reps: int = 5,
               warmup: int = 1) -> list[float]:
    """Seconds of `reps` calls of `fn` after `warmup` untimed ones (CUDA-synchronised): the
    timer of `.ci/gpu`, which runs outside pytest-benchmark."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def measure(benchmark, fn: Callable[[], Any], *, group: str, device: torch.device | str = "cpu",
            bytes_moved: float | None = None, flops: float | None = None, baseline: bool = False,
            rounds: int = 10, warmup_rounds: int = 2, **extra: Any) -> Any:
    """Time `fn` with `benchmark.pedantic`; record percentiles, TB/s, TFLOP/s, peak memory, machine.

    `bytes_moved` / `flops` are the work of one call (the minimum a perfect
    implementation must read+write / compute); achieved rates use the median.
    Returns fn's last result.
    """
    device = torch.device(device)
    benchmark.group = group
    cuda = device.type == "cuda"

    def timed():
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        return out

    if not benchmark.enabled:  # --benchmark-disable: a smoke run of the code path only
        return benchmark(timed)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    result = benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    stats = benchmark.stats.stats
    median = stats.median
    info: dict[str, Any] = dict(machine_info(device), **extra)
    for name, seconds in percentiles(stats.data).items():
        info[f"{name}_ms"] = round(seconds * 1e3, 4)
    if baseline:
        info["baseline"] = True
    if bytes_moved is not None:
        info["TB_per_s"] = round(bytes_moved / median / 1e12, 3)
    if flops is not None:
        info["TFLOP_per_s"] = round(flops / median / 1e12, 3)
    if cuda:
        info["peak_mem_mib"] = round((torch.cuda.max_memory_allocated(device) - before) / 2 ** 20, 1)
    benchmark.extra_info.update(info)
    log.info("%s: median %.4g ms %s", group, median * 1e3,
             {k: info[k] for k in ("TB_per_s", "TFLOP_per_s", "peak_mem_mib") if k in info})
    return result
