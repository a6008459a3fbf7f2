"""THE next-token loss: every pass that needs a calibration loss computes it here, in one way."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from gradmap.core.adapter import ModelAdapter
from gradmap.runtime.hooks import patched_forward

__all__ = ["next_token_loss_sum", "head_loss_sum"]


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



def head_loss_sum(model: nn.Module, adapter: ModelAdapter, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Σ next-token NLL from the last layer's output `h`: the model's own head (final norm, LM head,
    family details such as logit soft-capping) runs on a decoder that returns norm(h)."""
    normed = adapter.final_norm(h)
    with patched_forward(adapter.decoder, lambda *a, **k: BaseModelOutputWithPast(last_hidden_state=normed)):
        return next_token_loss_sum(model, ids)

