"""Layer streaming (`offload="layer"`): score a model larger than the accelerator, one layer at a time.

The weights stay where they are (CPU RAM, or memory-mapped safetensors); only one
module group is placed on the compute device at a time — the input embedding (with
the rotary tables), one decoder layer, or the final norm with the LM head — by
swapping each parameter's `.data` for a device copy and back (the host tensors are
never rewritten, so a memory-mapped checkpoint stays mapped). The calibration set
goes through the decoder layer-major, as in sequential calibration
(`gradmap.runtime.sequential.capture_block_inputs` records block 0's inputs and every block's
kwargs): for layer ℓ, every micro-batch of its stored inputs runs on the device and
the outputs go back to the host. Peak device memory ≈ one layer's weights + one
micro-batch of activations, independent of depth.

Forward statistics call the same `on_layer(pos, h_in, h_out)` callback as
`capture.forward_pass`, so block influence, angular distance and the dense means run
unchanged. The activation gradient of GradMAP Stage 1 uses a layer-by-layer backward:
the forward stores every layer's INPUT on the host; the loss at the head gives
g = ∂L/∂h_L; then for ℓ = L−1 … 0 the layer is recomputed from its stored input x
(x.requires_grad), `on_layer(ℓ, x, h_out)` may hook h_out, and
h_out.backward(∂L/∂h_out) yields ∂L/∂x, the next layer's output gradient. This is
exact (the same chain rule as one full backward), at the cost of one extra forward
per layer and host memory for every layer's inputs (n_layers × tokens × d).

Compensation statistics (`gradmap.prune.compensation.streamed`) and sequential calibration
(`gradmap.runtime.sequential`, used by `sparsify`) run on the same engine; weight edits happen on
the host weights (folds) or on the device copy written back (`on_device(write_back=True)`).

Callbacks see layers in layer-major order (all micro-batches of layer 0, then of
layer 1, ...; the backward from the last layer down) and `after_batch(start, stop)`
is called after every (layer, micro-batch) step. Activated per model with
`layer_offload(model, compute_device)`, which `gradmap.runtime.capture` consults;
outside that context nothing changes.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.modeling_outputs import BaseModelOutputWithPast

from gradmap.core import distributed
from gradmap.core.adapter import ModelAdapter
from gradmap.core.errors import GradmapError
from gradmap.runtime.capture import MeanSink, _patched_forward, check_finite, next_token_loss_sum, preserved_state
from gradmap.runtime.sequential import capture_block_inputs

__all__ = ["OFFLOAD_MODES", "STREAMING_METRICS", "STREAMING_COMPENSATORS", "LayerOffload", "layer_offload",
           "offload_of", "resolve_compute_device", "on_device", "is_dispatched", "stream_forward_pass",
           "stream_backward_pass", "stream_calibration_losses", "check_streaming_support",
           "check_prune_support", "check_dispatch_support", "check_weights_editable"]

log = logging.getLogger(__name__)

OFFLOAD_MODES = (None, "layer")
# weight gradients (gradmap's "param", taylor) are not streamed; magnitude reads host weights only
STREAMING_METRICS = ("gradmap (gradient=token|gate|fisher)", "block-influence", "angular", "ppl", "sleb",
                     "magnitude")
# their statistics stream through gradmap.prune.compensation.streamed; the folds edit the host weights
STREAMING_COMPENSATORS = ("projection", "replaceme", "magnitude")
_ATTR = "_gradmap_layer_offload"
LayerFn = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class LayerOffload:
    """Layer streaming is active on a model: compute on `compute_device`, weights stay on the host."""

    compute_device: torch.device


def offload_of(model: nn.Module) -> LayerOffload | None:
    """The active `LayerOffload` of `model`, or None (the in-memory path)."""
    return model.__dict__.get(_ATTR)


def is_dispatched(model: nn.Module) -> bool:
    """True for a model spread by accelerate (`device_map=...`: hf_device_map or AlignDevicesHooks)."""
    return getattr(model, "hf_device_map", None) is not None or any(
        hasattr(m, "_hf_hook") for m in model.modules())


def resolve_compute_device(model: nn.Module, compute_device: str | torch.device | None) -> torch.device:
    """`compute_device`, default CUDA when available else the device of the model's weights."""
    if compute_device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return next(model.parameters()).device
    try:
        device = torch.device(compute_device)
    except (RuntimeError, TypeError) as err:
        raise GradmapError(f"compute_device={compute_device!r} is not a device ({err}); pass e.g. "
                           "'cuda', 'cuda:1' or 'cpu'") from None
    if device.type == "meta":
        raise GradmapError("compute_device='meta' cannot compute; pass 'cuda' or 'cpu'")
    return device


@contextmanager
def layer_offload(model: nn.Module, compute_device: str | torch.device | None = None
                  ) -> Iterator[LayerOffload]:
    """Turn layer streaming on for `model` inside the `with` block (per instance, removed on exit)."""
    if is_dispatched(model):
        raise GradmapError("offload='layer' needs a model whose weights sit on one device (e.g. loaded "
                           "on CPU); this model was dispatched by accelerate (device_map=...). Use either "
                           "device_map='auto' with offload=None, or load on CPU with offload='layer'")
    if offload_of(model) is not None:
        raise GradmapError("layer streaming is already active on this model; do not nest layer_offload")
    state = LayerOffload(resolve_compute_device(model, compute_device))
    log.debug("layer streaming on %s (weights stay on %s)", state.compute_device, _host_device(model))
    model.__dict__[_ATTR] = state
    try:
        yield state
    finally:
        model.__dict__.pop(_ATTR, None)


def check_streaming_support(what: str, supported: bool) -> None:
    """Raise a GradmapError naming offload="layer" when `what` cannot stream yet."""
    if not supported:
        comps = ", ".join(map(repr, ("none",) + STREAMING_COMPENSATORS))
        raise GradmapError(f"{what} does not support offload='layer' yet; with offload='layer' use "
                           f"compensation in ({comps}) and one of the metrics {', '.join(STREAMING_METRICS)}, "
                           "or pass offload=None (in-memory, device_map='auto' works there)")


def _tensors(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    seen, out = set(), []
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


@contextmanager
def on_device(modules: Sequence[nn.Module], device: torch.device, write_back: bool = False
              ) -> Iterator[None]:
    """Place `modules` on `device` for the block: each parameter/buffer's `.data` becomes a device copy.

    The host tensors are kept and put back on exit, so the host storage — possibly a memory
    map — is untouched unless `write_back`: then, when the block ends without error, the
    device values are copied into the host tensors (weight edits made on the device, e.g.
    `sparsify`). Always a copy, even when `device` is the host's: an edit that forgets
    `write_back` is lost on a CPU test run too, not only on a GPU.
    """
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for t in _tensors(modules):
            swapped.append((t, t.data))
            t.data = t.data.to(device, copy=True)
        yield
        if write_back:
            with torch.no_grad():
                for t, host in swapped:
                    host.copy_(t.data)
    finally:
        for t, host in swapped:
            t.data = host


def _to(value: Any, device: torch.device, memo: dict[int, Any]) -> Any:
    """`value` with every tensor inside (tuples, lists, dicts) on `device`; shared tensors moved once."""
    if torch.is_tensor(value):
        if id(value) not in memo:
            memo[id(value)] = value.to(device)
        return memo[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device, memo) for k, v in value.items()}
    return value


def _embedding_modules(adapter: ModelAdapter) -> list[nn.Module]:
    """Everything of the decoder except its layers and final norm (embedding, rotary tables, ...)."""
    skip = {id(adapter.layers), id(adapter.final_norm)}
    return [m for m in adapter.decoder.children() if id(m) not in skip]


def _head_modules(model: nn.Module, adapter: ModelAdapter) -> list[nn.Module]:
    return [adapter.final_norm, adapter.lm_head]


def _host_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _Inputs:
    """Block 0's inputs and every block's kwargs for this rank's rows, held on the host."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int,
                 device: torch.device):
        lo, hi = distributed.shard_bounds(calib.shape[0], allow_empty=True)
        self.rows = calib[lo:hi]
        self.starts = [lo + s for s in range(0, self.rows.shape[0], batch_size)]
        self.sizes = [min(batch_size, self.rows.shape[0] - (s - lo)) for s in self.starts]
        host = _host_device(model)
        if self.rows.shape[0] == 0:
            self.hidden, self.kwargs = [], [[] for _ in adapter.layers]
            return
        with on_device(_embedding_modules(adapter), device):
            captured = capture_block_inputs(model, self.rows, batch_size)
        memo: dict[int, Any] = {}
        self.hidden = [h.to(host) for h in captured.hidden]
        self.kwargs = [[_to(kw, host, memo) for kw in per_layer] for per_layer in captured.layer_kwargs]

    def kw(self, pos: int, j: int, device: torch.device) -> dict[str, Any]:
        """Layer `pos`'s kwargs for micro-batch j on `device` (one micro-batch's masks at a time)."""
        return _to(self.kwargs[pos][j], device, {})

    def ids(self, j: int) -> torch.Tensor:
        start = self.starts[j] - self.starts[0]
        return self.rows[start:start + self.sizes[j]]


def _layer_out(layer: nn.Module, h: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    out = layer(h, **kw)
    return out if torch.is_tensor(out) else out[0]


def _sweep(model: nn.Module, adapter: ModelAdapter, inputs: _Inputs, device: torch.device,
           on_layer: LayerFn | None, sink: MeanSink | None, after_batch, keep_inputs: bool,
           skip: nn.Module | None, progress: bool, desc: str) -> list[list[torch.Tensor]]:
    """Layer-major forward over the stored inputs; returns every layer's inputs if `keep_inputs`.

    `inputs.hidden` ends as the last layer's outputs (host); with `skip`, that layer is bypassed.
    """
    host = _host_device(model)
    ids = adapter.original_ids
    kept: list[list[torch.Tensor]] = []
    hidden = inputs.hidden
    for pos, layer in enumerate(tqdm(adapter.layers, desc=desc, unit="layer", leave=False,
                                     disable=not progress or not distributed.is_main())):
        if keep_inputs:
            kept.append(list(hidden))
        if layer is skip:
            continue
        with on_device([layer], device), torch.no_grad():
            for j, start in enumerate(inputs.starts):
                h_in = hidden[j].to(device)
                h_out = _layer_out(layer, h_in, inputs.kw(pos, j, device))
                if sink is not None:
                    sink.add(ids[pos], h_out)
                if on_layer is not None:
                    on_layer(pos, h_in, h_out)
                hidden[j] = h_out.to(host)
                if after_batch is not None:
                    after_batch(start, start + inputs.sizes[j])
    return kept


def _head_loss(model: nn.Module, adapter: ModelAdapter, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Σ next-token NLL from the last layer's output `h`: the model's own head (final norm, LM head,
    family details such as logit soft-capping) runs on a decoder that returns norm(h)."""
    normed = adapter.final_norm(h)
    with _patched_forward(adapter.decoder, lambda *a, **k: BaseModelOutputWithPast(last_hidden_state=normed)):
        return next_token_loss_sum(model, ids)


def stream_forward_pass(model: nn.Module, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int,
                        on_layer: LayerFn | None, sink: MeanSink | None = None, progress: bool = False,
                        desc: str = "forward", after_batch: Callable[[int, int], None] | None = None) -> None:
    """`capture.forward_pass` with one layer at a time on the compute device (layer-major callbacks)."""
    device = offload_of(model).compute_device
    inputs = _Inputs(model, adapter, calib, batch_size, device)
    _sweep(model, adapter, inputs, device, on_layer, sink, after_batch, False, None, progress, desc)


def stream_calibration_losses(model: nn.Module, calib: torch.Tensor, batch_size: int,
                              skips: Sequence[nn.Module | None], progress: bool = False,
                              desc: str = "loss") -> list[float]:
    """`capture.calibration_losses` streamed: L = Σ_tokens CE / N once per entry of `skips`."""
    from gradmap.core.adapter import get_adapter
    adapter = get_adapter(model)
    device = offload_of(model).compute_device
    totals = []
    for skip in skips:
        inputs = _Inputs(model, adapter, calib, batch_size, device)
        _sweep(model, adapter, inputs, device, None, None, None, False, skip, progress, desc)
        total = 0.0
        with on_device(_head_modules(model, adapter), device), torch.no_grad():
            for j, start in enumerate(inputs.starts):
                loss = _head_loss(model, adapter, inputs.hidden[j].to(device), inputs.ids(j).to(device))
                check_finite(loss, "loss", start, start + inputs.sizes[j], model)
                total += float(loss)
        totals.append(total)
    n_tokens = calib.shape[0] * (calib.shape[1] - 1)
    return [t / n_tokens for t in distributed.all_reduce_moments_([], totals)]


def stream_backward_pass(model: nn.Module, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int, *,
                         on_layer: LayerFn | None = None, sink: MeanSink | None = None,
                         collect: Callable[[list[nn.Parameter]], Any] | None = None,
                         after_batch: Callable[[int, int], None] | None = None, progress: bool = False,
                         desc: str = "gradient") -> tuple[float, Any]:
    """`capture.backward_pass(weight_grads=False)` as a layer-by-layer backward (module docstring).

    L = Σ_tokens CE / N over the whole set; every parameter is frozen, so only activation
    gradients flow. `on_layer(pos, x, h_out)` runs on each recomputed layer before
    h_out.backward(∂L/∂h_out), so a tensor hook it registers on h_out sees ∂L/∂h_out.
    """
    device = offload_of(model).compute_device
    n_tokens = calib.shape[0] * (calib.shape[1] - 1)
    host = _host_device(model)
    total = 0.0
    with preserved_state(model) as params:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        inputs = _Inputs(model, adapter, calib, batch_size, device)
        stored = _sweep(model, adapter, inputs, device, None, sink, None, True, None, progress, desc)
        grads: list[torch.Tensor] = []
        with on_device(_head_modules(model, adapter), device), torch.enable_grad():
            for j, start in enumerate(inputs.starts):
                h = inputs.hidden[j].to(device).requires_grad_(True)
                loss = _head_loss(model, adapter, h, inputs.ids(j).to(device))
                check_finite(loss.detach(), "loss", start, start + inputs.sizes[j], model)
                (loss / n_tokens).backward()
                total += float(loss.detach())
                grads.append(h.grad.to(host))
        inputs.hidden = []
        for pos in reversed(range(adapter.num_layers)):
            layer = adapter.layers[pos]
            with on_device([layer], device), torch.enable_grad():
                for j, start in enumerate(inputs.starts):
                    x = stored[pos][j].to(device).detach().requires_grad_(True)
                    h_out = _layer_out(layer, x, inputs.kw(pos, j, device))
                    if on_layer is not None:
                        on_layer(pos, x, h_out)
                    h_out.backward(grads[j].to(device))
                    grads[j] = x.grad.to(host)
                    if after_batch is not None:
                        after_batch(start, start + inputs.sizes[j])
            stored[pos] = []  # this layer's inputs are no longer needed
        result = collect(params) if collect is not None else None
    total = distributed.all_reduce_moments_([], [total])[0]
    return total / n_tokens, result



def check_prune_support(metric: Any, compensators: Sequence[Any]) -> None:
    """Raise before anything runs when `fast_prune(offload="layer")` cannot stream this setup."""
    name = getattr(metric, "name", "")
    ok = name in ("block-influence", "angular", "ppl", "sleb", "magnitude") or (
        name == "gradmap" and getattr(metric, "gradient", None) != "param")
    check_streaming_support(f"metric {name!r}" + (" with gradient='param'" if name == "gradmap" else ""), ok)
    names = [c.name for c in compensators if c.name != "none"]
    check_streaming_support(f"compensation {names}", all(n in STREAMING_COMPENSATORS for n in names))


def _offloaded(model: nn.Module) -> list[str]:
    """Modules whose weights accelerate offloaded to cpu/disk (parameters on "meta")."""
    if not is_dispatched(model):
        return []
    return sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.device.type == "meta"})


def check_weights_editable(model: nn.Module, what: str) -> None:
    """Raise when `what` would edit (or read) weights that accelerate offloaded (on "meta").

    An offloaded weight lives in accelerate's weights map and is re-created at every forward:
    a write to its meta placeholder, or a `.grad` on the temporary copy, is silently lost.
    """
    offloaded = _offloaded(model)
    if offloaded:
        raise GradmapError(f"{what} needs the weights themselves, but accelerate offloaded {offloaded[:4]}"
                           f"{' ...' if len(offloaded) > 4 else ''} to cpu/disk (parameters on 'meta'); "
                           "give every layer a device in device_map (GPUs, or 'cpu' as the execution "
                           "device)")


def check_dispatch_support(model: nn.Module, metric: Any, compensators: Sequence[Any]) -> None:
    """`fast_prune` on a dispatched model: nothing may edit, read or differentiate offloaded weights."""
    name = getattr(metric, "name", "")
    if name in ("taylor", "magnitude") or (name == "gradmap" and getattr(metric, "gradient", None) == "param"):
        check_weights_editable(model, f"metric {name!r} (weights or weight gradients; the activation "
                                      "metrics gradmap token/gate/fisher, block-influence, angular, ppl, "
                                      "sleb work)")
    names = [c.name for c in compensators if c.name != "none"]
    if names:
        check_weights_editable(model, f"compensation {names} (or pass compensation='none')")
