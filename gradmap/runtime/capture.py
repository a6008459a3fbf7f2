"""Streaming calibration passes shared by every layer metric.

Written down once and reused: micro-batching, the fp32 next-token loss, forward
hooks that hand each decoder layer's input and output to a callback, skipping a
layer without copying the model, optional per-layer gradient checkpointing, and
a guard that puts the model's mode, `requires_grad` flags and `.grad` back as
they came in. Every hook and every per-instance `forward` patch is owned by a
context manager and removed in its `finally`. Only running sums survive a
micro-batch; no pass keeps all hidden states.

Data parallelism (`gradmap.core.distributed`): every pass here takes the GLOBAL calibration
rows, runs only this rank's contiguous share of them and sums what it returns over the
ranks (losses, weight gradients, the MeanSink's sums and counts), so callers pick subsets
of rows exactly as a single process would and every rank sees the same numbers.
Callbacks (`on_layer`, `collect`) see this rank's rows only: a metric that accumulates
its own sums reduces them itself after the pass.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from tqdm.auto import tqdm

from gradmap.core import distributed
from gradmap.core.adapter import ModelAdapter
from gradmap.core.errors import GradmapError
from gradmap.ops import layer_grad_reductions

__all__ = [
    "MeanSink", "model_device", "default_batch_size", "micro_batches", "next_token_loss_sum",
    "check_finite", "layer_io", "skip_layer", "checkpointed", "preserved_state", "forward_pass",
    "backward_pass", "calibration_loss", "calibration_losses", "param_grad_reductions",
    "TOKENS_PER_BATCH",
]

# default micro-batch size in tokens: keeps fp32 logits (tokens x vocab) and their gradient modest
TOKENS_PER_BATCH = 2048

LayerFn = Callable[[int, torch.Tensor, torch.Tensor], None]


class MeanSink:
    """Running fp32 sum of every layer's output hidden state over calibration tokens."""

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def add(self, layer_id: int, h_out: torch.Tensor) -> None:
        flat = h_out.detach().reshape(-1, h_out.shape[-1])
        s = flat.float().sum(0)
        if layer_id in self.sums:
            self.sums[layer_id] += s
            self.counts[layer_id] += flat.shape[0]
        else:
            self.sums[layer_id] = s
            self.counts[layer_id] = flat.shape[0]

    def means(self) -> dict[int, torch.Tensor]:
        """ORIGINAL layer index -> mean output hidden state (fp32), sums and counts over all ranks.

        The reduction works on copies, so calling it twice gives the same means.
        """
        keys = sorted(self.sums)
        if not distributed.is_distributed():
            return {i: self.sums[i] / self.counts[i] for i in keys}
        sums = torch.stack([self.sums[i] for i in keys])
        counts = torch.tensor([float(self.counts[i]) for i in keys], dtype=torch.float64,
                              device=sums.device)
        distributed.all_reduce_sums_([sums, counts])
        return {i: sums[k] / counts[k].item() for k, i in enumerate(keys)}


def model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs (and running statistics) go.

    Layer streaming active: its compute device. A model dispatched by accelerate
    (device_map): the execution device of its top-level hook, else the first
    parameter not offloaded to "meta". Otherwise: the device of the first parameter.
    """
    offload = model.__dict__.get("_gradmap_layer_offload")  # gradmap.runtime.streaming.layer_offload
    if offload is not None:
        return offload.compute_device
    hook_device = getattr(getattr(model, "_hf_hook", None), "execution_device", None)
    if hook_device is not None:
        return torch.device(hook_device)
    first = None
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
        first = first or p.device
    return first or torch.device("cpu")


def default_batch_size(seq_len: int, tokens: int = TOKENS_PER_BATCH) -> int:
    """Micro-batch size holding about `tokens` tokens (at least one sequence)."""
    return max(1, tokens // max(int(seq_len), 1))


def micro_batches(calib: torch.Tensor, batch_size: int, progress: bool = False,
                  desc: str = "", offset: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row + `offset`, rows) of consecutive slices of `calib` [n, L], at most `batch_size` rows.

    `offset` is the index of calib's first row in a larger set (a rank's shard), so error
    messages name global rows. Progress bars show on the main rank only.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise GradmapError(f"batch_size must be a positive integer, got {batch_size!r}")
    starts = range(0, calib.shape[0], batch_size)
    bar = tqdm(starts, desc=desc, unit="batch", disable=not progress or not distributed.is_main(),
               leave=False)
    for start in bar:
        yield offset + start, calib[start:start + batch_size]


def _shard(calib: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(index of the first row, rows) of this rank's share of `calib`; may be empty for small subsets."""
    lo, hi = distributed.shard_bounds(calib.shape[0], allow_empty=True)
    return lo, calib[lo:hi]


def next_token_loss_sum(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Σ over positions t < L−1 of −log p(ids[:, t+1] | ids[:, :t+1]), in fp32 (scalar tensor).

    The model's own forward produces the logits (so family details such as
    Gemma's logit soft-capping apply); the cross-entropy is taken in fp32.
    """
    logits = model(input_ids=ids, use_cache=False).logits
    # the last position predicts nothing: label it ignore instead of slicing (no logits copy)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    # at least fp32 (bf16/fp16 logits are up-cast; an fp64 model keeps fp64)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")


def check_finite(value: torch.Tensor, what: str, start: int, stop: int, model: nn.Module) -> None:
    """Raise a clear error when `value` holds NaN/inf for calibration rows [start, stop)."""
    if not bool(torch.isfinite(value).all()):
        dtype = next(model.parameters()).dtype
        raise GradmapError(
            f"non-finite {what} on calibration batch rows {start}..{stop - 1} (model dtype {dtype}); "
            "the forward or backward overflowed — load the model in bfloat16 or float32 "
            "(not float16), or check the calibration tokens")


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output: Any) -> torch.Tensor:
    return output if torch.is_tensor(output) else output[0]


@contextmanager
def layer_io(layers: Sequence[nn.Module], fn: LayerFn) -> Iterator[None]:
    """Call `fn(position, h_in, h_out)` after every forward of each decoder layer."""
    handles = []
    try:
        for pos, layer in enumerate(layers):
            def hook(module, args, kwargs, output, pos=pos):
                h_out = _hidden_out(output)
                # device_map: the input may still sit on the previous layer's device
                fn(pos, _hidden_in(args, kwargs).to(h_out.device), h_out)
            handles.append(layer.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


_MISSING = object()


@contextmanager
def _patched_forward(module: nn.Module, forward: Callable) -> Iterator[None]:
    """Give one module instance a different `forward`; the previous one is put back on exit."""
    old = module.__dict__.get("forward", _MISSING)
    module.forward = forward
    try:
        yield
    finally:
        if old is _MISSING:
            del module.forward
        else:
            module.forward = old


def _identity_layer(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden_states


@contextmanager
def skip_layer(layer: nn.Module) -> Iterator[None]:
    """Run the model as if `layer` were removed: its forward returns its input unchanged."""
    with _patched_forward(layer, _identity_layer):
        yield


@contextmanager
def checkpointed(layers: Sequence[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Recompute each decoder layer in the backward instead of storing its activations.

    Wraps the instance's `forward`, not `__call__`, so forward hooks still fire once
    per layer and the model need not be put in train mode.
    """
    with ExitStack() as stack:
        if enabled:
            for layer in layers:
                orig = layer.forward

                def forward(*args, _orig=orig, **kwargs):
                    return torch.utils.checkpoint.checkpoint(_orig, *args, use_reentrant=False, **kwargs)
                stack.enter_context(_patched_forward(layer, forward))
        yield


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Restore every parameter's `requires_grad` and `.grad` (the same objects) on exit.

    The model is put in eval mode on entry and left in eval mode on exit.
    Yields the parameter list (tied weights once).
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    # accelerate's offload hooks (device_map with "cpu"/"disk") put a NEW Parameter object in
    # the module on every forward: remember each slot too, to restore flags on whatever is there
    slots = [(m, k, p, p.requires_grad) for m in model.modules() for k, p in m._parameters.items()
             if p is not None]
    model.eval()
    try:
        yield params
    finally:
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        for m, k, p, flag in slots:
            now = m._parameters.get(k)
            if now is not None and now is not p:
                now.requires_grad_(flag)
        model.eval()


@contextmanager
def _input_requires_grad(adapter: ModelAdapter) -> Iterator[None]:
    """Make the embedding output a grad-requiring leaf, so activation gradients flow with frozen weights."""
    handle = adapter.embed_tokens.register_forward_hook(
        lambda module, args, output: output.detach().requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()


def _io_hooks(adapter: ModelAdapter, on_layer: LayerFn | None, sink) -> ExitStack:
    stack = ExitStack()
    ids = adapter.original_ids
    fns = []
    if sink is not None:
        fns.append(lambda pos, h_in, h_out: sink.add(ids[pos], h_out))
    if on_layer is not None:
        fns.append(on_layer)
    if fns:
        def fn(pos, h_in, h_out):
            for f in fns:
                f(pos, h_in, h_out)
        stack.enter_context(layer_io(list(adapter.layers), fn))
    return stack


@torch.no_grad()
def forward_pass(model: nn.Module, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int,
                 on_layer: LayerFn | None, sink: MeanSink | None = None, progress: bool = False,
                 desc: str = "forward", after_batch: Callable[[int, int], None] | None = None) -> None:
    """Run the decoder stack (no LM head) over the calibration set, calling `on_layer` per layer."""
    if model.__dict__.get("_gradmap_layer_offload") is not None:
        from gradmap.runtime.streaming import stream_forward_pass  # offload="layer": one layer on the device at a time
        return stream_forward_pass(model, adapter, calib, batch_size, on_layer, sink, progress, desc,
                                   after_batch)
    device = model_device(model)
    offset, calib = _shard(calib)
    with _io_hooks(adapter, on_layer, sink):
        for start, rows in micro_batches(calib, batch_size, progress, desc, offset):
            adapter.decoder(input_ids=rows.to(device), use_cache=False)
            if after_batch is not None:
                after_batch(start, start + rows.shape[0])


def backward_pass(model: nn.Module, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int, *,
                  weight_grads: bool, on_layer: LayerFn | None = None, sink: MeanSink | None = None,
                  collect: Callable[[list[nn.Parameter]], Any] | None = None,
                  after_batch: Callable[[int, int], None] | None = None,
                  gradient_checkpointing: bool = False, progress: bool = False,
                  desc: str = "gradient") -> tuple[float, Any]:
    """One forward + backward of the mean next-token loss L over the calibration set.

    L = Σ_tokens CE / N with N the number of predicted tokens in the whole set, so
    gradients accumulated over micro-batches are exactly those of L. With
    `weight_grads=False` every parameter is frozen and only activation gradients
    are computed; with True only decoder-layer parameters get `.grad` (embedding,
    final norm and LM head get none). `on_layer(pos, h_in, h_out)` runs in each
    layer's forward (it may register tensor hooks on `h_out` to see ∂L/∂h_out);
    `collect(params)` reads the accumulated `.grad` before the model's own grads,
    flags and mode are restored. Returns (L, collect's result). Distributed: each rank
    back-propagates its rows' share of L (divided by the GLOBAL token count N), so the
    `.grad` that `collect` sees must be summed over ranks before use; L is summed here.
    """
    if model.__dict__.get("_gradmap_layer_offload") is not None:
        from gradmap.runtime.streaming import check_streaming_support, stream_backward_pass
        check_streaming_support("a weight-gradient metric (gradmap gradient='param', taylor)", not weight_grads)
        return stream_backward_pass(model, adapter, calib, batch_size, on_layer=on_layer, sink=sink,
                                    collect=collect, after_batch=after_batch, progress=progress, desc=desc)
    device = model_device(model)
    n_tokens = calib.shape[0] * (calib.shape[1] - 1)
    offset, calib = _shard(calib)
    total = 0.0
    with preserved_state(model) as params, ExitStack() as stack:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        if weight_grads:
            for p in adapter.layers.parameters():
                p.requires_grad_(True)
        else:
            stack.enter_context(_input_requires_grad(adapter))
        stack.enter_context(checkpointed(list(adapter.layers), gradient_checkpointing))
        stack.enter_context(_io_hooks(adapter, on_layer, sink))
        with torch.enable_grad():
            for start, rows in micro_batches(calib, batch_size, progress, desc, offset):
                loss = next_token_loss_sum(model, rows.to(device))
                check_finite(loss.detach(), "loss", start, start + rows.shape[0], model)
                (loss / n_tokens).backward()
                total += float(loss.detach())
                if after_batch is not None:
                    after_batch(start, start + rows.shape[0])
        result = collect(params) if collect is not None else None
    total = distributed.all_reduce_moments_([], [total])[0]
    return total / n_tokens, result


@torch.no_grad()
def calibration_losses(model: nn.Module, calib: torch.Tensor, batch_size: int,
                       skips: Sequence[nn.Module | None], progress: bool = False,
                       desc: str = "loss") -> list[float]:
    """Mean next-token loss over `calib` once per entry of `skips` (that layer bypassed; None: none).

    L = Σ_tokens CE / N (fp32 cross-entropy, fp64 running sum). Distributed: each rank
    sums its rows for every entry and one collective sums all of them over ranks.
    """
    if model.__dict__.get("_gradmap_layer_offload") is not None:
        from gradmap.runtime.streaming import stream_calibration_losses
        return stream_calibration_losses(model, calib, batch_size, skips, progress, desc)
    device = model_device(model)
    offset, shard = _shard(calib)
    totals = []
    for skip in skips:
        total = 0.0
        with ExitStack() as stack:
            if skip is not None:
                stack.enter_context(skip_layer(skip))
            for start, rows in micro_batches(shard, batch_size, progress, desc, offset):
                loss = next_token_loss_sum(model, rows.to(device))
                check_finite(loss, "loss", start, start + rows.shape[0], model)
                total += float(loss)
        totals.append(total)
    n_tokens = calib.shape[0] * (calib.shape[1] - 1)
    return [t / n_tokens for t in distributed.all_reduce_moments_([], totals)]


def calibration_loss(model: nn.Module, calib: torch.Tensor, batch_size: int,
                     skip: nn.Module | None = None, progress: bool = False, desc: str = "loss") -> float:
    """Mean next-token loss over `calib` (fp32 accumulation), optionally with layer `skip` bypassed."""
    return calibration_losses(model, calib, batch_size, [skip], progress, desc)[0]


def param_grad_reductions(model: nn.Module, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int,
                          *, times_weight: bool = False, sink: MeanSink | None = None,
                          gradient_checkpointing: bool = False, progress: bool = False,
                          desc: str = "weight gradients"
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-layer Σ|x|, Σx² (fp32) and parameter counts, x = ∂L/∂θ (or θ·∂L/∂θ if `times_weight`).

    One forward + backward of the mean calibration loss with weight gradients on
    the decoder layers only; the reductions go through `gradmap.ops.layer_grad_reductions`,
    one call for all layers. Distributed: the gradients themselves are summed over ranks
    first (|Σ g| is not Σ |g|), in buckets, then every rank reduces the same numbers.
    """
    n = adapter.num_layers

    def collect(params):
        counts = torch.zeros(n, dtype=torch.float64)
        owned = []
        for pos, layer in enumerate(adapter.layers):
            for p in layer.parameters():
                counts[pos] += p.numel()
                if p.grad is None and distributed.is_distributed():
                    p.grad = torch.zeros_like(p)  # a rank without rows still joins the reduction
                if p.grad is not None:
                    owned.append((pos, p))
        distributed.all_reduce_sums_([p.grad for _, p in owned])
        if times_weight:  # in place: these .grad tensors are dropped when the pass ends
            for _, p in owned:
                p.grad.mul_(p.detach())
        grads = [p.grad for _, p in owned]
        if not grads:
            zeros = torch.zeros(n, dtype=torch.float32)
            return zeros, zeros.clone(), counts
        abs_sum, sq_sum = layer_grad_reductions(grads, [pos for pos, _ in owned], n)
        return abs_sum.cpu(), sq_sum.cpu(), counts

    _, (abs_sum, sq_sum, counts) = backward_pass(
        model, adapter, calib, batch_size, weight_grads=True, sink=sink, collect=collect,
        gradient_checkpointing=gradient_checkpointing, progress=progress, desc=desc)
    check_finite(abs_sum + sq_sum, "weight gradient", 0, calib.shape[0], model)
    return abs_sum, sq_sum, counts
