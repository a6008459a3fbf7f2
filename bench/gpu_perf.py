"""Measurements for `bash .ci/gpu` (issue 18), called by bench/gpu_check.py after the checks.

P3: the kernels against their torch baselines at Llama-3-8B shapes — moments vs a cuBLAS bf16
GEMM of the same shape, the multi-tensor gradient reductions vs the measured device-to-device
copy bandwidth, the gate reduction vs torch, the batched extension solve vs torch.linalg.
P4: a Llama-3-8B-shaped random model in bf16 with a 128 x 2048 calibration: `fast_prune` with
the default pipeline and with block influence (seconds, peak memory, and x one forward+backward
over the same tokens), and `offload="layer"` peak memory on the same model.
Each item is skipped (recorded as such) once GRADMAP_GPU_DEADLINE_S (default 420 s from the
start of gpu_check) has passed, so the whole command stays within its 8-minute budget. A
measurement that raises fails its check. In the dry run every item runs at toy sizes on CPU so
the code cannot rot; its figures mean nothing.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

DEADLINE_S = float(os.environ.get("GRADMAP_GPU_DEADLINE_S", "420"))


def _time(fn, device: str, reps: int = 5, warmup: int = 1) -> float:
    """Median seconds of `fn` (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device == "cuda" else None


def p3_moments(report, kernels, ops, device, dry):
    tokens, d = (64, 32) if dry else (16384, 4096)
    x = torch.randn(tokens, d, device=device, dtype=torch.bfloat16)
    m = ops.Moments(d, device=device)
    t_k = _time(lambda: kernels.accumulate_moments(m, x), device, reps=1 if dry else 10)
    t_c = _time(lambda: torch.matmul(x.T, x), device, reps=1 if dry else 10)
    flops = 2.0 * tokens * d * d
    report.measurements += [
        {"name": "P3 moments XᵀX bf16 (triton)", "value": f"{flops / t_k / 1e12:.1f} TFLOP/s",
         "detail": f"T={tokens} d={d}, {t_k * 1e3:.3f} ms, {t_c / t_k:.2f}x cuBLAS"},
        {"name": "P3 moments XᵀX bf16 (cuBLAS GEMM)", "value": f"{flops / t_c / 1e12:.1f} TFLOP/s",
         "detail": f"{t_c * 1e3:.3f} ms"}]


def p3_grads(report, kernels, device, dry):
    layer = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096),
             (4096, 14336), (4096,), (4096,)]
    n_layers = 2 if dry else 32
    shapes = [(s[0] // 256,) + tuple(x // 256 for x in s[1:]) for s in layer] if dry else layer
    grads = [torch.randn(s, device=device, dtype=torch.bfloat16) for _ in range(n_layers) for s in shapes]
    lids = [i // len(shapes) for i in range(len(grads))]
    n_bytes = sum(g.numel() * g.element_size() for g in grads)
    t_k = _time(lambda: kernels.layer_grad_reductions(grads, lids, n_layers), device, reps=1 if dry else 5)
    del grads
    src = torch.empty(min(n_bytes, 4 * 2 ** 30) // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t_copy = _time(lambda: dst.copy_(src), device, reps=1 if dry else 5)
    copy_bw = 2 * src.numel() * 2 / t_copy  # read + write
    del src, dst
    report.measurements += [
        {"name": "P3 grad reductions bf16 (triton)", "value": f"{n_bytes / t_k / 1e12:.2f} TB/s read",
         "detail": f"{n_layers} layers, {n_bytes / 2 ** 30:.1f} GiB, {t_k * 1e3:.2f} ms, "
                   f"{n_bytes / t_k / copy_bw:.2f} of copy bandwidth"},
        {"name": "P3 device-to-device copy", "value": f"{copy_bw / 1e12:.2f} TB/s (read+write)", "detail": ""}]


def p3_solve(report, ops, extension, device, dry):
    ext = extension.extension()
    d, n = (24, 2) if dry else (4096, 4)
    if ext is None or (device == "cuda" and not ext.cuda_built()):
        report.measurements.append({"name": "P3 projection solve", "value": "skipped",
                                    "detail": extension.extension_status()})
        return
    x = torch.randn(n, 2 * d, d, device=device)
    a = x.transpose(1, 2) @ x
    b = a + 0.1 * torch.randn(n, d, d, device=device)
    del x

    def torch_solve():
        a64 = a.double()
        lam = 0.01 * a64.diagonal(dim1=-2, dim2=-1).sum(-1) / d
        eye = torch.eye(d, dtype=torch.float64, device=device)
        chol = torch.linalg.cholesky(0.5 * (a64 + a64.transpose(-1, -2)) + lam[:, None, None] * eye)
        return torch.cholesky_solve(b.double() + lam[:, None, None] * eye, chol)
    t_e = _time(lambda: ext.projection_solve(a, b, 0.01, True), device, reps=1 if dry else 3)
    t_t = _time(torch_solve, device, reps=1 if dry else 3)
    report.measurements.append({"name": f"P3 projection solve fp64 d={d} batch {n} (gradmap._C)",
                                "value": f"{t_e * 1e3:.1f} ms", "detail": f"torch.linalg {t_t * 1e3:.1f} ms, "
                                                                          f"{t_t / t_e:.2f}x"})


def _llama(dry: bool, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    if dry:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    else:  # Llama-3-8B shapes
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                          rope_theta=500000.0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(before)
    return model.eval(), cfg


def p4(report, device, dry):
    from gradmap.prune.driver import fast_prune
    from gradmap.runtime.batching import default_batch_size
    model, cfg = _llama(dry, "cpu" if dry else device)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # restored between runs
    fresh = True
    n, seq = (4, 32) if dry else (128, 2048)
    calib = torch.randint(0, cfg.vocab_size, (n, seq), generator=torch.Generator().manual_seed(0))
    n_prune = 1 if dry else 8
    step = default_batch_size(seq, config=cfg)  # the runtime's backward micro-batch

    def forward_backward(rows: int):
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        for i in range(0, rows, step):
            ids = calib[i:i + step].to(device)
            model(ids, labels=ids).loss.backward()
        for p in params:
            p.grad = None
            p.requires_grad_(False)
    forward_backward(step)  # warm-up: one micro-batch
    _peak_reset(device)
    t_fb = _time(lambda: forward_backward(n), device, reps=1, warmup=0)
    report.measurements.append({"name": "P4 one forward+backward", "value": f"{t_fb:.1f} s",
                                "detail": f"{n}x{seq} tokens, peak {_peak_gib(device)} GiB"})
    for label, options in (("default pipeline", {}), ("block influence", {"metric": "block-influence"})):
        if time.time() - report.t0 > DEADLINE_S:
            report.measurements.append({"name": f"P4 fast_prune {label}", "value": "skipped (deadline)"})
            continue
        if not fresh:  # the previous run removed layers in place: a new model with the same weights
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
            model = _llama(dry, "cpu" if dry else device)[0]
            model.load_state_dict(state)
        fresh = False

        def run():
            _peak_reset(device)
            t0 = time.perf_counter()
            result = fast_prune(model, calib, n_prune, **options)
            seconds = time.perf_counter() - t0
            report.measurements.append({"name": f"P4 fast_prune {label}", "value": f"{seconds:.1f} s",
                                        "detail": f"{seconds / t_fb:.1f}x one forward+backward, peak "
                                                  f"{_peak_gib(device)} GiB, removed {result.removed_layers}"})
        report.check(f"P4 fast_prune {label}", run)
    del model, state
    if device == "cuda":
        torch.cuda.empty_cache()
    if time.time() - report.t0 > DEADLINE_S:
        report.measurements.append({"name": "P4 offload=layer", "value": "skipped (deadline)"})
        return
    host_model = _llama(dry, "cpu")[0]

    def offload():
        _peak_reset(device)
        t0 = time.perf_counter()
        fast_prune(host_model, calib, n_prune, offload="layer", compute_device=device)
        report.measurements.append({"name": "P4 fast_prune offload=layer", "value": f"peak {_peak_gib(device)} GiB",
                                    "detail": f"{time.perf_counter() - t0:.1f} s"})
    report.check("P4 fast_prune offload=layer", offload)


def run(report) -> None:
    """All measurements into `report` (see bench/gpu_check.py)."""
    import gradmap.ops as ops
    from gradmap.ops import backend, extension
    kernels = backend.load_kernels()
    device, dry = report.device, report.dry
    items = [("P3 moments", lambda: p3_moments(report, kernels, ops, device, dry)),
             ("P3 grad reductions", lambda: p3_grads(report, kernels, device, dry)),
             ("P3 projection solve", lambda: p3_solve(report, ops, extension, device, dry)),
             ("P4", lambda: p4(report, device, dry))]
    for name, fn in items:
        if time.time() - report.t0 > DEADLINE_S:
            report.measurements.append({"name": name, "value": "skipped (deadline)"})
            continue
        report.check(f"measure {name}", fn)
