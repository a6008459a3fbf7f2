"""Measurements of `bash .ci/gpu` (issue 27), run by bench/gpu_check.py after the checks.

P3: every row of bench/kernel_table.py (the table the pytest-benchmark suite times too) at its
production shapes: each implementation checked against fp64, then timed (median of 10 after a
warm-up); one measurement line per row and shape with ms, rates and the ratio to the row's
strongest torch baseline, and the column kernel's launch grid against the GPU's multiprocessors.
P4: the pipelines users run, on a Llama-3-8B-shaped model with random bf16 weights and a
16 x 2048-token calibration set: one forward+backward over those tokens in the runtime's
micro-batches (the floor), GradMAP one-shot + projection, and the default pipeline ("auto",
which runs both candidates and keeps one); seconds, x the floor, peak GPU memory, and the kernels
each reached (the dispatch layer's `record_kernels`). In the dry run everything runs at toy sizes
on CPU so the code cannot rot; its figures mean nothing.
"""
from __future__ import annotations

import statistics
import time

import torch

from gpu_report import Report, Skip
from harness import time_calls
from kernel_table import TABLE, KernelCase, Unavailable

__all__ = ["p3", "p4", "llama"]

P4_ROWS, P4_SEQ, P4_PRUNE = 16, 2048, 8


# ----------------------------------------------------------------------------- P3

def _row(report: Report, case: KernelCase, shape: tuple) -> dict:
    device, dry = report.device, report.dry
    work = case.build(device, shape)
    impls, checked = {}, {}
    for impl in case.impls:
        try:
            checked[impl] = work.verify(impl)
        except Unavailable as why:
            if impl == case.impls[0]:
                raise Skip(str(why)) from None
            impls[impl] = {"unavailable": str(why)}
            continue
        times = time_calls(work.calls[impl], device, reps=1 if dry else 10, warmup=1)
        median = statistics.median(times)
        impls[impl] = {"ms": round(median * 1e3, 4)}
        if work.bytes_moved:
            impls[impl]["TB_per_s"] = round(work.bytes_moved / median / 1e12, 3)
        if work.flops:
            impls[impl]["TFLOP_per_s"] = round(work.flops / median / 1e12, 2)
    mine, base = impls[case.impls[0]], impls.get(case.baseline, {})
    ratio = f", {base['ms'] / mine['ms']:.2f}x vs {case.baseline}" if "ms" in base and case.baseline != case.impls[0] else ""
    report.measurement(f"P3 {case.name} {work.shape}", f"{case.impls[0]} {mine['ms']:.3f} ms{ratio}",
                       kernel=case.kernel, reference=case.reference, production=case.production,
                       baseline=case.baseline, impls=impls, **work.detail,
                       detail="; ".join(f"{k} {v.get('ms', v.get('unavailable'))} ms" for k, v in impls.items()))
    if not dry and "programs" in work.detail and work.detail["programs"] < work.detail["multiprocessors"]:
        raise AssertionError(f"{case.kernel}: {work.detail['grid']} = {work.detail['programs']} programs for "
                             f"{work.detail['multiprocessors']} multiprocessors")
    del work
    return {"checked": checked, "impls": impls}


def p3(report: Report) -> None:
    """Every row of the kernel table at its production shapes (dry run: its tiny CPU shapes)."""
    for case in TABLE:
        shapes = (case.small if report.dry else case.shapes).get(report.device, ())
        for shape in shapes:
            report.check(f"P3 {case.name} {shape}", _row, report, case, shape)


# ----------------------------------------------------------------------------- P4

def llama(dry: bool, device: str, seed: int = 0):
    """A random bf16 Llama: Llama-3-8B shapes, or a toy one in the dry run (same seed, same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    if dry:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                          rope_theta=500000.0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(before)
    return model.eval()


def _peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device == "cuda" else None


def _floor(model, calib: torch.Tensor, device: str) -> dict:
    """One forward+backward over `calib` in the runtime's backward micro-batches."""
    from gradmap.runtime.batching import default_batch_size
    step = default_batch_size(calib.shape[1], config=model.config, backward=True)
    params = list(model.parameters())

    def run(rows: int) -> None:
        for p in params:
            p.requires_grad_(True)
        for i in range(0, rows, step):
            ids = calib[i:i + step].to(device)
            model(ids, labels=ids).loss.backward()
        for p in params:
            p.grad = None
            p.requires_grad_(False)
    run(step)  # warm-up: one micro-batch
    _peak_reset(device)
    seconds = time_calls(lambda: run(calib.shape[0]), device, reps=1, warmup=0)[0]
    return {"seconds": round(seconds, 2), "micro_batch_rows": step, "peak_gib": _peak_gib(device)}


def _pipeline(report: Report, label: str, model, calib: torch.Tensor, n_prune: int, floor_s: float,
              options: dict) -> dict:
    from gradmap.ops import backend
    from gradmap.prune.driver import fast_prune
    _peak_reset(report.device)
    with backend.record_kernels() as launched:
        t0 = time.perf_counter()
        result = fast_prune(model, calib, n_prune, progress=False, **options)
        if report.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    kernels = {k: launched.count(k) for k in sorted(set(launched))}
    chosen = result.options.get("auto", {}).get("chosen")
    report.measurement(f"P4 {label}", f"{seconds:.1f} s = {seconds / floor_s:.1f}x one forward+backward",
                       seconds=round(seconds, 2), x_floor=round(seconds / floor_s, 2),
                       peak_gib=_peak_gib(report.device), removed=result.removed_layers, chosen=chosen,
                       kernels=kernels, timings={k: round(v, 2) for k, v in result.timings.items()},
                       detail=f"peak {_peak_gib(report.device)} GiB, removed {result.removed_layers}"
                              + (f", kept {chosen}" if chosen else "") + f", kernels {kernels}")
    return {"seconds": seconds}


def p4(report: Report) -> None:
    """The floor, GradMAP one-shot + projection, and the default pipeline, each on a fresh model."""
    device, dry = report.device, report.dry
    rows, seq, n_prune = (8, 32, 1) if dry else (P4_ROWS, P4_SEQ, P4_PRUNE)
    calib = torch.randint(0, 256 if dry else 128256, (rows, seq), generator=torch.Generator().manual_seed(0))
    state: dict = {}

    def floor():
        state["model"] = llama(dry, device)
        out = _floor(state["model"], calib, device)
        state["floor"] = out["seconds"]
        report.measurement("P4 one forward+backward (floor)", f"{out['seconds']} s",
                           detail=f"{rows}x{seq} tokens, micro-batches of {out['micro_batch_rows']} rows, "
                                  f"peak {out['peak_gib']} GiB", **out)
        return out
    report.check("P4 floor: one forward+backward", floor)
    if "floor" not in state:
        return

    def run(label: str, options: dict):
        model = state.pop("model", None) or llama(dry, device)  # every pipeline starts from the dense model
        try:
            return _pipeline(report, label, model, calib, n_prune, state["floor"], options)
        finally:
            del model
    gradmap = dict(metric="gradmap", compensation="projection", schedule="one-shot")
    out = report.check("P4 GradMAP one-shot + projection", run, "GradMAP one-shot + projection", gradmap,
                       need_s=6 * state["floor"] + 15)
    need = (out or {}).get("seconds", 6 * state["floor"]) + (n_prune + 6) * state["floor"] / 2 + 15
    report.check("P4 default pipeline (auto)", run, "default pipeline (auto: both candidates)", {}, need_s=need)
