"""Per-layer Σ|g| and Σg² (fp32) over many gradient tensors.

Reference `layer_grad_reductions_reference`; dispatch `layer_grad_reductions`;
launcher ``kernels/grad_reductions.py`` (a multi-tensor kernel, policy:
`gradmap.ops.backend`). Gradients are grouped per device (``device_map="auto"``
spreads layers over GPUs) and, within a device, bf16/fp16 CUDA tensors go to one
multi-tensor launch per dtype; fp32 tensors go through torch; other dtypes to
the reference after a warning. The per-group sums are added on the first
gradient's device.
"""
from __future__ import annotations

import torch

from gradmap.core.errors import GradmapError
from gradmap.ops import backend

__all__ = ["layer_grad_reductions", "layer_grad_reductions_reference"]

OP = "layer_grad_reductions"


def layer_grad_reductions_reference(grads: list[torch.Tensor], layer_ids: list[int], n_layers: int
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer Σ|g| and Σg² in fp32 over tensors `grads` owned by layers `layer_ids`."""
    device = grads[0].device if grads else "cpu"
    abs_sum = torch.zeros(n_layers, dtype=torch.float32, device=device)
    sq_sum = torch.zeros(n_layers, dtype=torch.float32, device=device)
    for g, lid in zip(grads, layer_ids):
        gf = g.to(device=device, dtype=torch.float32)
        abs_sum[lid] += gf.abs().sum()
        sq_sum[lid] += gf.square().sum()
    return abs_sum, sq_sum


def _check(grads: list[torch.Tensor], layer_ids: list[int], n_layers: int) -> None:
    if len(grads) != len(layer_ids):
        raise GradmapError(f"layer_grad_reductions: {len(grads)} gradients but {len(layer_ids)} layer ids; "
                           "pass one layer id per gradient tensor")
    bad = [lid for lid in layer_ids if not 0 <= int(lid) < n_layers]
    if bad:
        raise GradmapError(f"layer_grad_reductions: layer ids {bad[:5]} are outside [0, {n_layers}); "
                           "number layers by their current position")


def _group(grads: list[torch.Tensor], layer_ids: list[int], n_layers: int):
    """(abs, sq) of one device's gradients: the kernel for its bf16/fp16 tensors, torch for the rest."""
    fast = [i for i, g in enumerate(grads) if g.dtype in backend.KERNEL_DTYPES]
    kernels = backend.choose(OP, *(grads[i] for i in fast)) if fast else None
    rest = [i for i in range(len(grads)) if kernels is None or i not in set(fast)]
    unsupported = sorted({str(grads[i].dtype) for i in rest if grads[i].dtype not in
                          backend.KERNEL_DTYPES + backend.TORCH_DTYPES})
    if unsupported and backend.on_kernel_device(grads[0]) and not backend.force_reference():
        backend.fallback(OP, f"no kernel for dtype {', '.join(unsupported)}")
    if kernels is None:
        return layer_grad_reductions_reference(grads, layer_ids, n_layers)
    sub = [grads[i] for i in fast], [layer_ids[i] for i in fast]
    abs_sum, sq_sum = backend.run_kernel(
        OP, "layer_grad_reductions", lambda: kernels.layer_grad_reductions(*sub, n_layers),
        lambda: layer_grad_reductions_reference(*sub, n_layers))
    if rest:
        ref_abs, ref_sq = layer_grad_reductions_reference([grads[i] for i in rest],
                                                          [layer_ids[i] for i in rest], n_layers)
        abs_sum, sq_sum = abs_sum + ref_abs, sq_sum + ref_sq
    return abs_sum, sq_sum


def layer_grad_reductions(grads: list[torch.Tensor], layer_ids: list[int], n_layers: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer Σ|g| and Σg² (fp32) of many gradient tensors in one call.

    Returns two fp32 [n_layers] tensors on the first gradient's device. On CUDA one
    multi-tensor launch per device and dtype reads every bf16/fp16 tensor once; pass
    all layers' gradients together to get the benefit.
    """
    if not grads or backend.force_reference() or not any(backend.on_kernel_device(g) for g in grads):
        return layer_grad_reductions_reference(grads, layer_ids, n_layers)
    _check(grads, layer_ids, n_layers)
    groups: dict[object, list[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault(backend.device_key(g), []).append(i)
    if len(groups) == 1:
        return _group(grads, layer_ids, n_layers)
    out_device = grads[0].device
    abs_sum = torch.zeros(n_layers, dtype=torch.float32, device=out_device)
    sq_sum = torch.zeros(n_layers, dtype=torch.float32, device=out_device)
    for idx in groups.values():
        a, s = _group([grads[i] for i in idx], [layer_ids[i] for i in idx], n_layers)
        abs_sum += a.to(out_device)
        sq_sum += s.to(out_device)
    return abs_sum, sq_sum
