"""Calibration rows: micro-batches, this rank's shard, running means, and the guard that puts a
model's mode, `requires_grad` flags and `.grad` back as they came in.

Data parallelism (`gradmap.core.distributed`): passes take the GLOBAL calibration rows and run
only this rank's contiguous share (`shard`); what they return is summed over the ranks."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from gradmap.core import distributed
from gradmap.core.errors import GradmapError
from gradmap.ops import Moments, accumulate_moments

__all__ = ["TOKENS_PER_BATCH", "ACTIVATION_BUDGET", "MeanSink", "AbsSink", "MAGNITUDE_TERMS", "magnitude_terms", "Sinks", "default_batch_size", "activation_bytes_per_token", "micro_batches", "shard", "check_finite",
           "preserved_state"]

# default micro-batch size in tokens: keeps fp32 logits (tokens x vocab) and their gradient modest
TOKENS_PER_BATCH = 2048
# activations one micro-batch may keep alive through a backward (default_batch_size)
ACTIVATION_BUDGET = 512 * 2 ** 20


class MeanSink:
    """Running fp32 sum of every layer's output hidden state over calibration tokens."""

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def add(self, layer_id: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
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


# Per-token terms whose channel sums magnitude compensation reduces to one residual scale s:
#   "ratio" (Prune&Comp): Σ|h_in|, Σ|h_out|  ->  s = mean_c E|h_out|_c / E|h_in|_c
#   "lsq": Σ h_in², Σ h_in·h_out            ->  s = argmin_s E‖s·h_in − h_out‖²
# One definition here, for the scoring pass and for the compensator's own forwards alike.
MAGNITUDE_TERMS = {
    "ratio": lambda h_in, h_out: (h_in.abs(), h_out.abs()),
    "lsq": lambda h_in, h_out: (h_in.square(), h_in * h_out),
}


def magnitude_terms(statistic: str, h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two per-channel terms of `statistic` (fp32 when the states are fp32 or wider)."""
    h_in, h_out = h_in.detach(), h_out.detach()
    if statistic == "lsq":  # products of bf16/fp16 states would round before the fp32 sums
        h_in, h_out = h_in.float(), h_out.float()
    return MAGNITUDE_TERMS[statistic](h_in, h_out)


class AbsSink:
    """Per-channel sums of magnitude compensation's terms (`MAGNITUDE_TERMS[statistic]`) for
    every layer (this rank's rows), micro-batch by micro-batch.

    Exactly the moments magnitude compensation takes before a removal (`Moments` without XᵀX,
    on `device`, fp32 sums in micro-batch order), so a scoring pass that already runs the current
    model over every row can hand them over instead of a second forward.
    """

    def __init__(self, device: torch.device | str, statistic: str = "ratio") -> None:
        self.device = device
        self.statistic = statistic
        self.moments: dict[int, tuple[Moments, Moments]] = {}

    def add(self, layer_id: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        pair = self.moments.get(layer_id)
        if pair is None:
            d = h_in.shape[-1]
            pair = self.moments[layer_id] = (Moments(d, want_xtx=False, device=self.device),
                                             Moments(d, want_xtx=False, device=self.device))
        a, b = magnitude_terms(self.statistic, h_in, h_out)
        accumulate_moments(pair[0], a)
        accumulate_moments(pair[1], b)


class Sinks:
    """Several sinks fed by one pass, in order."""

    def __init__(self, *sinks) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def add(self, layer_id: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        for sink in self.sinks:
            sink.add(layer_id, h_in, h_out)


def activation_bytes_per_token(config, backward: bool = True) -> int:
    """Bytes one calibration token keeps alive in a pass over the whole model (fp32).

    Backward: per decoder layer autograd saves about six hidden-size and four intermediate-size
    vectors per token (norm outputs, q/k/v, attention output, gate, up, act(gate), their
    product), for every layer at once; the loss holds logits, log-softmax and their gradient
    (3 x vocab). Forward only: one layer's activations at a time, and logits + log-softmax.
    """
    d = int(getattr(config, "hidden_size", 0) or 0)
    ffn = int(getattr(config, "intermediate_size", 0) or 4 * d)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if backward:
        return 4 * (layers * (6 * d + 4 * ffn) + 3 * vocab)
    return 4 * (6 * d + 4 * ffn + 2 * vocab)


def default_batch_size(seq_len: int, tokens: int = TOKENS_PER_BATCH, config=None,
                       budget_bytes: int = ACTIVATION_BUDGET, backward: bool = True) -> int:
    """Micro-batch size (sequences, at least one) for the calibration passes.

    With a model `config`: the most sequences whose activations (`activation_bytes_per_token`,
    for a backward or a forward-only pass) fit `budget_bytes`, capped at `tokens` tokens. The
    activations of one micro-batch, not the model, set the peak memory of a pruning run:
    on SmolLM2-135M a 2048-token micro-batch keeps ~3.5 GB alive through a backward.
    Without a config: about `tokens` tokens.
    """
    seq_len = max(int(seq_len), 1)
    by_tokens = max(1, tokens // seq_len)
    if config is None:
        return by_tokens
    per_seq = activation_bytes_per_token(config, backward) * seq_len
    return max(1, min(by_tokens, budget_bytes // max(per_seq, 1)))


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


def shard(calib: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(index of the first row, rows) of this rank's share of `calib`; may be empty for small subsets."""
    lo, hi = distributed.shard_bounds(calib.shape[0], allow_empty=True)
    return lo, calib[lo:hi]


def check_finite(value: torch.Tensor, what: str, start: int, stop: int, model: nn.Module) -> None:
    """Raise a clear error when `value` holds NaN/inf for calibration rows [start, stop)."""
    if not bool(torch.isfinite(value).all()):
        dtype = next(model.parameters()).dtype
        raise GradmapError(
            f"non-finite {what} on calibration batch rows {start}..{stop - 1} (model dtype {dtype}); "
            "the forward or backward overflowed — load the model in bfloat16 or float32 "
            "(not float16), or check the calibration tokens")


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

