"""Layer-by-layer (sequential) calibration, written once and reused by every algorithm.

As in SparseGPT (Frantar & Alistarh, 2023) and Wanda (Sun et al., 2023), the calibration
set is pushed through the decoder one block at a time: the inputs of block ℓ are the
outputs of blocks 0..ℓ-1 *as they are when block ℓ is reached*, so a block sees the
damage its already-edited predecessors do. Only one block's inputs are held at a time
(the outputs of a block overwrite its inputs micro-batch by micro-batch), so peak memory
is one set of hidden states [n_samples, seq_len, d] plus one micro-batch of activations.

API
---
`capture_block_inputs(model, calib, batch_size) -> BlockInputs`
    One cheap pass: every decoder layer's `forward` is replaced, for the duration of the
    call only, by a recorder that stores its arguments and returns its input unchanged,
    so no block is computed. Recorded: the hidden states entering block 0 (after the
    embedding and any family-specific scaling, e.g. Gemma's √d) and, for *every* block,
    the keyword arguments the decoder passes it (position embeddings, attention mask,
    position ids, ...). Per-block kwargs matter: Gemma2/3 and sliding-window models give
    different masks (and Gemma3 different rotary tables) to different layer types. The
    kwargs of all blocks share the same tensors, so keeping them costs nothing extra.

`sequential_blocks(model, calib, batch_size=8, progress=True, desc=...) -> Iterator[Block]`
    The loop. Yields one `Block` per decoder layer, in order. While the consumer holds a
    block it may run it (`block.forward()`, e.g. with statistics hooks attached) and edit
    its weights; when the consumer asks for the next block, the *edited* block is run on
    the stored inputs and its outputs become the next block's inputs (skipped after the
    last block). A consumer that edits nothing gets the dense model's block inputs.

        for block in sequential_blocks(model, calib, batch_size=8):
            stats = collect(block)             # hooks on block.layer + block.forward()
            edit_weights(block.layer, stats)   # prune / quantise / compensate
        # the generator has now run every edited block once more to feed the next one

`Block` fields: `position` (current index in the decoder), `original_id`, `layer` (the
module), `hidden` (list of micro-batch inputs, model dtype, on the model's device),
`kwargs` (list of per-micro-batch kwargs for this layer); `forward(collect=False)` runs the
layer over every micro-batch under `torch.no_grad()` and returns the outputs when
`collect` is True (otherwise discards them, keeping memory flat).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gradmap.core.adapter import get_adapter
from gradmap.core.errors import GradmapError
from gradmap.runtime.hooks import StopForward, hidden_in
from gradmap.runtime import placement
from gradmap.runtime.placement import embedding_modules, host_device, model_device, offload_of, to_device

__all__ = ["Block", "BlockInputs", "capture_block_inputs", "run_layer", "sequential_blocks",
           "check_calibration"]

log = logging.getLogger(__name__)


@dataclass
class BlockInputs:
    """Hidden states entering block 0 and the kwargs the decoder gives each block."""

    hidden: list[torch.Tensor]                      # [micro-batch] -> [b, L, d]
    layer_kwargs: list[list[dict[str, Any]]] = field(default_factory=list)  # [block][micro-batch]


def check_calibration(calib: Any, vocab_size: int | None = None) -> torch.Tensor:
    """Validate calibration token ids: a LongTensor [n_samples, seq_len] with ids in the vocabulary."""
    if not torch.is_tensor(calib) or calib.dim() != 2 or calib.dtype not in (torch.long, torch.int):
        got = type(calib).__name__
        if torch.is_tensor(calib):
            got += f" {tuple(calib.shape)} {calib.dtype}"
        raise GradmapError(f"calibration data must be an integer tensor [n_samples, seq_len] of token ids, "
                           f"got {got}; build it with gradmap.core.calibration.calibration_data(tokenizer, ...)")
    if calib.shape[0] < 1 or calib.shape[1] < 1:
        raise GradmapError(f"calibration data {tuple(calib.shape)} is empty; pass at least one sample "
                           "of at least one token")
    if vocab_size is not None and (int(calib.min()) < 0 or int(calib.max()) >= vocab_size):
        raise GradmapError(f"calibration token ids span [{int(calib.min())}, {int(calib.max())}] but the "
                           f"model's vocabulary has {vocab_size} entries; tokenise with the model's "
                           "tokenizer")
    return calib.long()


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int = 8) -> BlockInputs:
    """Record block 0's input hidden states and every block's kwargs, without computing any block.

    Each layer's `forward` is shadowed by an instance attribute for the duration of the call
    and restored in `finally` (including any `forward` wrapper already set on the instance,
    e.g. by accelerate's offloading hooks).
    """
    adapter = get_adapter(model)
    calib = check_calibration(calib, getattr(model.config, "vocab_size", None))
    if not isinstance(batch_size, int) or batch_size < 1:
        raise GradmapError(f"batch_size must be a positive integer, got {batch_size!r}")
    layers = list(adapter.layers)
    # not simply the first parameter: under accelerate offload it may sit on "meta", and under
    # layer streaming the embedding is on the compute device
    device = model_device(model)
    out = BlockInputs(hidden=[], layer_kwargs=[[] for _ in layers])
    saved = [layer.__dict__.get("forward") for layer in layers]

    def recorder(pos: int):
        def forward(*args, **kwargs):
            hidden = hidden_in(args, kwargs)
            if pos == 0:
                out.hidden.append(hidden)
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if len(args) > 1:  # positional extras are not used by any supported family
                raise GradmapError(f"decoder layer {pos} was called with {len(args)} positional "
                                   "arguments; sequential calibration supports hidden states only")
            out.layer_kwargs[pos].append(kw)
            if pos == len(layers) - 1:
                raise StopForward  # the decoder then skips its final norm
            return hidden
        return forward

    try:
        for pos, layer in enumerate(layers):
            layer.forward = recorder(pos)
        for start in range(0, calib.shape[0], batch_size):
            batch = calib[start:start + batch_size].to(device)
            try:
                adapter.decoder(input_ids=batch, use_cache=False)
            except StopForward:
                pass
    finally:
        for layer, fwd in zip(layers, saved):
            if fwd is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = fwd
    return out


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """One decoder layer on one micro-batch; returns its output hidden states."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@dataclass
class Block:
    """One decoder block during sequential calibration (see the module docstring)."""

    position: int
    original_id: int
    layer: nn.Module
    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    # layer streaming: `hidden`/`kwargs` stay on the host, each micro-batch moves to this device
    device: torch.device | None = None

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    @torch.no_grad()
    def forward(self, collect: bool = False) -> list[torch.Tensor] | None:
        """Run the layer on every stored micro-batch (hooks on it fire); outputs if `collect`."""
        if self.device is not None:
            outs = [run_layer(self.layer, h.to(self.device), to_device(kw, self.device, {}))
                    for h, kw in zip(self.hidden, self.kwargs)]
        else:
            outs = [run_layer(self.layer, h, kw) for h, kw in zip(self.hidden, self.kwargs)]
        return outs if collect else None


def sequential_blocks(model: nn.Module, calib: torch.Tensor, batch_size: int = 8,
                      progress: bool = True, desc: str = "blocks") -> Iterator[Block]:
    """Yield the decoder blocks in order with their sequential calibration inputs.

    Block ℓ's `hidden` are the outputs of blocks 0..ℓ-1 as edited by the consumer before it
    asked for block ℓ. The inputs of a block are overwritten in place by its outputs, so
    only one block's inputs are alive at a time. A progress bar counts blocks.
    """
    adapter = get_adapter(model)
    if offload_of(model) is not None:
        yield from _streamed_blocks(model, calib, batch_size, progress, desc)
        return
    captured = capture_block_inputs(model, calib, batch_size)
    hidden = captured.hidden
    ids = adapter.original_ids
    n = adapter.num_layers
    with tqdm(total=n, desc=desc, unit="block", disable=not progress) as bar:
        for pos in range(n):
            layer = adapter.layers[pos]
            kwargs = captured.layer_kwargs[pos]
            yield Block(position=pos, original_id=ids[pos], layer=layer, hidden=hidden, kwargs=kwargs)
            if pos < n - 1:
                with torch.no_grad():
                    for i in range(len(hidden)):
                        hidden[i] = run_layer(layer, hidden[i], kwargs[i])
            captured.layer_kwargs[pos] = []  # this block's masks are no longer needed
            bar.update(1)
    log.debug("sequential calibration over %d blocks done", n)


def _streamed_blocks(model: nn.Module, calib: torch.Tensor, batch_size: int, progress: bool,
                     desc: str) -> Iterator[Block]:
    """`sequential_blocks` under layer streaming (`gradmap.runtime.streaming`): one block on the device at a time.

    Hidden states and kwargs wait on the host; while the consumer holds block ℓ its weights
    are device copies, written back to the host weights when the consumer asks for the next
    block (so edits such as pruning land in the real weights; none if the consumer fails).
    """
    adapter = get_adapter(model)
    device, host = offload_of(model).compute_device, host_device(model)
    with placement.on_device(embedding_modules(adapter), device):
        captured = capture_block_inputs(model, calib, batch_size)
    memo: dict[int, Any] = {}
    hidden = [h.to(host) for h in captured.hidden]
    layer_kwargs = [[to_device(kw, host, memo) for kw in per] for per in captured.layer_kwargs]
    del captured, memo
    ids, n = adapter.original_ids, adapter.num_layers
    with tqdm(total=n, desc=desc, unit="block", disable=not progress) as bar:
        for pos in range(n):
            layer, kwargs = adapter.layers[pos], layer_kwargs[pos]
            with placement.on_device([layer], device, write_back=True):
                yield Block(position=pos, original_id=ids[pos], layer=layer, hidden=hidden, kwargs=kwargs,
                            device=device)
                if pos < n - 1:
                    for i in range(len(hidden)):
                        out = run_layer(layer, hidden[i].to(device), to_device(kwargs[i], device, {}))
                        hidden[i] = out.to(host)
            layer_kwargs[pos] = []
            bar.update(1)
