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
`passes.forward_pass`, so block influence, angular distance and the dense means run
unchanged. The activation gradient of GradMAP Stage 1 uses a layer-by-layer backward:
the forward stores every layer's INPUT on the host; the loss at the head gives
g = ∂L/∂h_L; then for ℓ = L−1 … 0 the layer is recomputed from its stored input x
(x.requires_grad), `on_layer(ℓ, x, h_out)` may hook h_out, and
h_out.backward(∂L/∂h_out) yields ∂L/∂x, the next layer's output gradient. This is
exact (the same chain rule as one full backward), at the cost of one extra forward
per layer and host memory for every layer's inputs (n_layers × tokens × d).

Compensation statistics (`gradmap.prune.compensation.streamed`) and sequential calibration
(`gradmap.runtime.sequential`, used by `sparsify`) run on the same engine; weight edits happen on
the host weights (folds) or on the device copy written back (`placement.on_device(write_back=True)`).

Callbacks see layers in layer-major order (all micro-batches of layer 0, then of
layer 1, ...; the backward from the last layer down) and `after_batch(start, stop)`
is called after every (layer, micro-batch) step. Activated per model with
`layer_offload(model, compute_device)`, which `gradmap.runtime.passes` consults;
outside that context nothing changes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gradmap.core import distributed
from gradmap.core.adapter import ModelAdapter, get_adapter
from gradmap.runtime.batching import MeanSink, check_finite, preserved_state
from gradmap.runtime.hooks import LayerFn
from gradmap.runtime.loss import head_loss_sum
from gradmap.runtime import placement
from gradmap.runtime.placement import embedding_modules, head_modules, host_device, offload_of, to_device
from gradmap.runtime.sequential import capture_block_inputs

__all__ = ["StreamInputs", "layer_out", "run_layers", "stream_forward_pass", "stream_backward_pass",
           "stream_calibration_losses"]


class StreamInputs:
    """Block 0's inputs and every block's kwargs for this rank's rows, held on the host."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int,
                 device: torch.device):
        lo, hi = distributed.shard_bounds(calib.shape[0], allow_empty=True)
        self.rows = calib[lo:hi]
        self.starts = [lo + s for s in range(0, self.rows.shape[0], batch_size)]
        self.sizes = [min(batch_size, self.rows.shape[0] - (s - lo)) for s in self.starts]
        host = host_device(model)
        if self.rows.shape[0] == 0:
            self.hidden, self.kwargs = [], [[] for _ in adapter.layers]
            return
        with placement.on_device(embedding_modules(adapter), device):
            captured = capture_block_inputs(model, self.rows, batch_size)
        memo: dict[int, Any] = {}
        self.hidden = [h.to(host) for h in captured.hidden]
        self.kwargs = [[to_device(kw, host, memo) for kw in per_layer] for per_layer in captured.layer_kwargs]

    def kw(self, pos: int, j: int, device: torch.device) -> dict[str, Any]:
        """Layer `pos`'s kwargs for micro-batch j on `device` (one micro-batch's masks at a time)."""
        return to_device(self.kwargs[pos][j], device, {})

    def ids(self, j: int) -> torch.Tensor:
        start = self.starts[j] - self.starts[0]
        return self.rows[start:start + self.sizes[j]]


def layer_out(layer: nn.Module, h: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    """One decoder layer's output hidden states for input `h` and the kwargs the decoder gives it."""
    out = layer(h, **kw)
    return out if torch.is_tensor(out) else out[0]


def run_layers(model: nn.Module, adapter: ModelAdapter, inputs: StreamInputs, device: torch.device,
           on_layer: LayerFn | None, sink: MeanSink | None, after_batch, keep_inputs: bool,
           skip: nn.Module | None, progress: bool, desc: str) -> list[list[torch.Tensor]]:
    """Layer-major forward over the stored inputs; returns every layer's inputs if `keep_inputs`.

    `inputs.hidden` ends as the last layer's outputs (host); with `skip`, that layer is bypassed.
    """
    host = host_device(model)
    ids = adapter.original_ids
    kept: list[list[torch.Tensor]] = []
    hidden = inputs.hidden
    for pos, layer in enumerate(tqdm(adapter.layers, desc=desc, unit="layer", leave=False,
                                     disable=not progress or not distributed.is_main())):
        if keep_inputs:
            kept.append(list(hidden))
        if layer is skip:
            continue
        with placement.on_device([layer], device), torch.no_grad():
            for j, start in enumerate(inputs.starts):
                h_in = hidden[j].to(device)
                h_out = layer_out(layer, h_in, inputs.kw(pos, j, device))
                if sink is not None:
                    sink.add(ids[pos], h_in, h_out)
                if on_layer is not None:
                    on_layer(pos, h_in, h_out)
                hidden[j] = h_out.to(host)
                if after_batch is not None:
                    after_batch(start, start + inputs.sizes[j])
    return kept


def stream_forward_pass(model: nn.Module, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int,
                        on_layer: LayerFn | None, sink: MeanSink | None = None, progress: bool = False,
                        desc: str = "forward", after_batch: Callable[[int, int], None] | None = None) -> None:
    """`passes.forward_pass` with one layer at a time on the compute device (layer-major callbacks)."""
    device = offload_of(model).compute_device
    inputs = StreamInputs(model, adapter, calib, batch_size, device)
    run_layers(model, adapter, inputs, device, on_layer, sink, after_batch, False, None, progress, desc)


def stream_calibration_losses(model: nn.Module, calib: torch.Tensor, batch_size: int,
                              skips: Sequence[nn.Module | None], progress: bool = False,
                              desc: str = "loss") -> list[float]:
    """`passes.calibration_losses` streamed: L = Σ_tokens CE / N once per entry of `skips`."""

    adapter = get_adapter(model)
    device = offload_of(model).compute_device
    totals = []
    for skip in skips:
        inputs = StreamInputs(model, adapter, calib, batch_size, device)
        run_layers(model, adapter, inputs, device, None, None, None, False, skip, progress, desc)
        total = 0.0
        with placement.on_device(head_modules(adapter), device), torch.no_grad():
            for j, start in enumerate(inputs.starts):
                loss = head_loss_sum(model, adapter, inputs.hidden[j].to(device), inputs.ids(j).to(device))
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
    """`passes.backward_pass(weight_grads=False)` as a layer-by-layer backward (module docstring).

    L = Σ_tokens CE / N over the whole set; every parameter is frozen, so only activation
    gradients flow. `on_layer(pos, x, h_out)` runs on each recomputed layer before
    h_out.backward(∂L/∂h_out), so a tensor hook it registers on h_out sees ∂L/∂h_out.
    """
    device = offload_of(model).compute_device
    n_tokens = calib.shape[0] * (calib.shape[1] - 1)
    host = host_device(model)
    total = 0.0
    with preserved_state(model) as params:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        inputs = StreamInputs(model, adapter, calib, batch_size, device)
        stored = run_layers(model, adapter, inputs, device, None, sink, None, True, None, progress, desc)
        grads: list[torch.Tensor] = []
        with placement.on_device(head_modules(adapter), device), torch.enable_grad():
            for j, start in enumerate(inputs.starts):
                h = inputs.hidden[j].to(device).requires_grad_(True)
                loss = head_loss_sum(model, adapter, h, inputs.ids(j).to(device))
                check_finite(loss.detach(), "loss", start, start + inputs.sizes[j], model)
                (loss / n_tokens).backward()
                total += float(loss.detach())
                grads.append(h.grad.to(host))
        inputs.hidden = []
        for pos in reversed(range(adapter.num_layers)):
            layer = adapter.layers[pos]
            with placement.on_device([layer], device), torch.enable_grad():
                for j, start in enumerate(inputs.starts):
                    x = stored[pos][j].to(device).detach().requires_grad_(True)
                    h_out = layer_out(layer, x, inputs.kw(pos, j, device))
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

