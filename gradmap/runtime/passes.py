"""The calibration passes every algorithm is written against, each run in memory, streamed layer
by layer (`offload="layer"`, gradmap.runtime.streaming) or data-parallel, with the same results.

An algorithm asks for: each layer's input and output (`forward_pass` with `on_layer`),
activation gradients at layer outputs (`backward_pass(weight_grads=False)` with hooks
registered by `on_layer`), weight gradients (`backward_pass(weight_grads=True)`,
`param_grad_reductions`), or the calibration loss with given layers skipped
(`calibration_losses`). The pass picks the execution: `offload_of(model)` set means layer
streaming; an initialised process group means this rank's share of the rows, with every
returned sum reduced over ranks. Callbacks (`on_layer`, `collect`) see this rank's rows only:
an algorithm that accumulates its own sums reduces them itself after the pass.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from gradmap.core import distributed
from gradmap.core.adapter import ModelAdapter
from gradmap.core.errors import GradmapError
from gradmap.ops import layer_grad_reductions
from gradmap.runtime.batching import MeanSink, check_finite, micro_batches, preserved_state, shard
from gradmap.runtime.hooks import LayerFn, checkpointed, input_requires_grad, layer_io, skip_layer
from gradmap.runtime.prefix_cache import PrefixCache, model_hidden, state_bytes
from gradmap.runtime.sequential import capture_block_inputs, run_layer
from gradmap.runtime.loss import next_token_loss_sum
from gradmap.runtime.placement import model_device, offload_of
from gradmap.runtime.streaming import stream_backward_pass, stream_calibration_losses, stream_forward_pass

__all__ = ["forward_pass", "layer_sums", "backward_pass", "calibration_losses", "calibration_loss",
           "param_grad_reductions"]


def _layer_fn(adapter: ModelAdapter, on_layer: LayerFn | None, sink) -> LayerFn | None:
    """One callback for a layer's (h_in, h_out): the sink's record, then `on_layer`."""
    ids = adapter.original_ids
    fns = []
    if sink is not None:
        fns.append(lambda pos, h_in, h_out: sink.add(ids[pos], h_in, h_out))
    if on_layer is not None:
        fns.append(on_layer)
    if not fns:
        return None

    def fn(pos, h_in, h_out):
        for f in fns:
            f(pos, h_in, h_out)
    return fn


def _io_hooks(adapter: ModelAdapter, on_layer: LayerFn | None, sink) -> ExitStack:
    stack = ExitStack()
    fn = _layer_fn(adapter, on_layer, sink)
    if fn is not None:
        stack.enter_context(layer_io(list(adapter.layers), fn))
    return stack


@torch.no_grad()
def forward_pass(model: nn.Module, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int,
                 on_layer: LayerFn | None, sink: MeanSink | None = None, progress: bool = False,
                 desc: str = "forward", after_batch: Callable[[int, int], None] | None = None,
                 cache: PrefixCache | None = None) -> None:
    """Run the decoder stack (no LM head) over the calibration set, calling `on_layer` per layer.

    With `cache` (in-memory runs), the layers before the first one that changed since the last
    pass with the same cache are replayed from its kept states instead of run
    (`gradmap.runtime.prefix_cache`); the callbacks see the same sequence of calls.
    """
    if offload_of(model) is not None:
        return stream_forward_pass(model, adapter, calib, batch_size, on_layer, sink, progress, desc,
                                   after_batch)
    device = model_device(model)
    offset, calib = shard(calib)
    if cache is not None:
        return _cached_forward_pass(model, adapter, calib, offset, batch_size, on_layer, sink, progress, desc,
                                    after_batch, cache)
    with _io_hooks(adapter, on_layer, sink):
        for start, rows in micro_batches(calib, batch_size, progress, desc, offset):
            adapter.decoder(input_ids=rows.to(device), use_cache=False)
            if after_batch is not None:
                after_batch(start, start + rows.shape[0])


def _cached_forward_pass(model, adapter, calib, offset, batch_size, on_layer, sink, progress, desc,
                         after_batch, cache: PrefixCache) -> None:
    n = adapter.num_layers
    key = (calib.data_ptr(), tuple(calib.shape), offset, batch_size)
    k = cache.usable(adapter, key)
    per_position = state_bytes(calib.shape[0], calib.shape[1], model_hidden(model),
                                adapter.embed_tokens.weight.dtype)
    keep = cache.positions_within_budget(per_position, n)
    states: list[list[torch.Tensor]] = [[] for _ in range(keep)]
    kept_before = cache.states
    kwargs = capture_block_inputs(model, calib, batch_size).layer_kwargs if k > 0 else None

    def record(pos: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        if k <= pos < keep:
            states[pos].append(h_in)
        if pos == n - 1 and n < keep:
            states[n].append(h_out)

    with _io_hooks(adapter, on_layer, sink) as stack:
        stack.enter_context(layer_io(list(adapter.layers), record))
        replay = _layer_fn(adapter, on_layer, sink) or (lambda *_: None)
        layers = list(adapter.layers)
        for b, (start, rows) in enumerate(micro_batches(calib, batch_size, progress, desc, offset)):
            if k == 0:
                adapter.decoder(input_ids=rows.to(model_device(model)), use_cache=False)
            else:
                for pos in range(k):  # as `layer_io` gives them: the input on the output's device
                    h_out = kept_before[pos + 1][b]
                    replay(pos, kept_before[pos][b].to(h_out.device), h_out)
                for pos in range(min(k, keep)):
                    states[pos].append(kept_before[pos][b])
                if k == n and n < keep:  # nothing to run: the kept output stays the output
                    states[n].append(kept_before[n][b])
                h = kept_before[k][b]  # position k's input: `record` keeps it when layer k runs
                for pos in range(k, n):
                    h = run_layer(layers[pos], h, kwargs[pos][b])
            if after_batch is not None:
                after_batch(start, start + rows.shape[0])
    cache.reused += k
    cache.run += n - k
    cache.keep(adapter, key, states, reused=k)


def layer_sums(model: nn.Module, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int,
               stat: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], progress: bool = False,
               desc: str = "forward") -> torch.Tensor:
    """Σ over calibration micro-batches of `stat(h_in, h_out)` for every decoder layer: [n_layers, k].

    `stat` returns a 1-D tensor of k sums over one micro-batch's tokens (e.g. [Σ value, count]).
    Accumulated in fp64 and summed over ranks, so an algorithm written with it runs in memory,
    streamed and data-parallel with no code of its own for either.
    """
    sums: list[torch.Tensor | None] = [None] * adapter.num_layers

    def on_layer(pos: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        value = stat(h_in, h_out).detach().to(torch.float64).cpu()
        sums[pos] = value if sums[pos] is None else sums[pos] + value

    forward_pass(model, adapter, calib, batch_size, on_layer, progress=progress, desc=desc)
    if any(v is None for v in sums):  # fast_prune gives every rank >= 1 row; a direct caller may not
        raise GradmapError("layer_sums saw no calibration rows on this rank; pass at least one row per rank")
    out = torch.stack(sums)
    distributed.all_reduce_sums_([out])
    return out


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
    if offload_of(model) is not None:
        if weight_grads:  # fast_prune refuses such metrics before any work (runtime.support)
            raise GradmapError("weight gradients cannot be streamed (offload='layer'); pass offload=None")
        return stream_backward_pass(model, adapter, calib, batch_size, on_layer=on_layer, sink=sink,
                                    collect=collect, after_batch=after_batch, progress=progress, desc=desc)
    device = model_device(model)
    n_tokens = calib.shape[0] * (calib.shape[1] - 1)
    offset, calib = shard(calib)
    total = 0.0
    with preserved_state(model) as params, ExitStack() as stack:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        if weight_grads:
            for p in adapter.layers.parameters():
                p.requires_grad_(True)
        else:
            stack.enter_context(input_requires_grad(adapter.embed_tokens))
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
    if offload_of(model) is not None:
        return stream_calibration_losses(model, calib, batch_size, skips, progress, desc)
    device = model_device(model)
    offset, rows_here = shard(calib)
    totals = []
    for skip in skips:
        total = 0.0
        with ExitStack() as stack:
            if skip is not None:
                stack.enter_context(skip_layer(skip))
            for start, rows in micro_batches(rows_here, batch_size, progress, desc, offset):
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

