"""Self-distillation text: the dense model writes its own healing rows (`--heal-data self`).

Healing on text the teacher itself produced keeps the student on the teacher's own distribution;
for instruct models, whose outputs differ from web text, it is the published fix (self-data
distillation). Each row keeps the first `prefix` tokens of a prompt row (so rows differ and start
like real text) and the model samples the rest at temperature 1 with no top-k / top-p truncation
(truncation would make the teacher's tail unreachable for the student), and no early stop, so
every row keeps its full length. Sampling is seeded (the same seed and batch_rows give the same
rows) and leaves the global RNG as it was.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig

from gradmap.core.errors import GradmapError
from gradmap.runtime.placement import model_device

__all__ = ["self_generated"]


def _eos_ids(model: nn.Module) -> list[int]:
    # min_new_tokens only blocks the ids it is told about: every end-of-text id the model may emit
    ids = []
    for cfg in (getattr(model, "generation_config", None), model.config):
        eos = getattr(cfg, "eos_token_id", None)
        ids += list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    return sorted(set(ids))


@torch.no_grad()
def self_generated(model: nn.Module, prompts: torch.Tensor, prefix: int = 16, seed: int = 0, batch_rows: int = 16,
                   progress: bool = False) -> torch.Tensor:
    """Rows shaped like `prompts` (rows, seq_len): each keeps its first `prefix` tokens and the
    model samples the remaining seq_len − prefix. The model (dense, before pruning) is left in its mode."""
    if not torch.is_tensor(prompts) or prompts.dim() != 2 or prompts.dtype not in (torch.int64, torch.int32):
        raise GradmapError("self_generated needs prompt ids as an integer tensor of shape (rows, seq_len)")
    seq_len = prompts.shape[1]
    if not isinstance(prefix, int) or isinstance(prefix, bool) or not 1 <= prefix < seq_len:
        raise GradmapError(f"prefix must be an integer in [1, {seq_len - 1}] (rows hold {seq_len} tokens), "
                           f"got {prefix!r}")
    new = seq_len - prefix
    eos = _eos_ids(model)
    pad = eos[0] if eos else 0
    cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                           min_new_tokens=new, eos_token_id=eos or None, pad_token_id=pad)
    device = model_device(model)
    was_training = model.training
    model.eval()
    rows = []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in tqdm(range(0, prompts.shape[0], batch_rows), desc="dense model writing healing text",
                              unit="batch", disable=not progress):
                head = prompts[start:start + batch_rows, :prefix].to(device, torch.long)
                out = model.generate(input_ids=head, attention_mask=torch.ones_like(head), generation_config=cfg)
                rows.append(out[:, :seq_len].cpu())
    finally:
        model.train(was_training)
    ids = torch.cat(rows)
    if ids.shape != prompts.shape:  # generate stopped early despite min_new_tokens: never train on short rows
        raise GradmapError(f"the model wrote rows of shape {tuple(ids.shape)}, not {tuple(prompts.shape)}; "
                           "heal on --heal-data c4 (or a file) instead")
    return ids.to(prompts.dtype)
