"""The healing loss: top-K KL to the dense teacher's next-token distribution, teacher cached once.

The dense model's top-K log-probs (full-vocabulary log-softmax, K largest) at every position of
every calibration row are computed ONCE (`teacher_targets`) and kept on the host, so the dense
model can be dropped before the student trains: two full models are never needed together.

Loss (Minitron / LinearPatch-style logit distillation, restricted to the teacher's top K): with
teacher log-probs log p_i and student full-vocabulary log-probs log q_i on the teacher's top-K
tokens I, plus one bucket for the rest of the vocabulary (p_r = 1 − Σ_I p_i, q_r = 1 − Σ_I q_i),

    KL_K = Σ_{i∈I} p_i (log p_i − log q_i) + p_r (log p_r − log q_r)

the exact KL divergence between the two distributions coarse-grained to K + 1 outcomes: never
negative, zero when the student matches the teacher, and at most the full-vocabulary KL.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from gradmap.core.adapter import get_adapter
from gradmap.core.errors import GradmapError
from gradmap.healing.seams import seam_inputs
from gradmap.runtime.placement import model_device

__all__ = ["TeacherTargets", "teacher_targets", "topk_kl_sum"]


@dataclass
class TeacherTargets:
    """The teacher's top-K next-token log-probs of each calibration row (on the host).

    `indices` (N, L, K) int64 token ids, `logprobs` (N, L, K) fp32 full-vocabulary log-probs;
    `hidden` (optional, for the seam loss of gradmap/healing/seams.py): ORIGINAL layer index j ->
    the residual stream entering the teacher's layer j, (N, L, hidden) bf16.
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.indices.shape[-1])

    def rows(self, rows: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        return self.indices[rows], self.logprobs[rows]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"indices": self.indices, "logprobs": self.logprobs} | {f"hidden.{j}": h for j, h in self.hidden.items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "TeacherTargets":
        hidden = {int(k.removeprefix("hidden.")): v for k, v in state.items() if k.startswith("hidden.")}
        return cls(indices=state["indices"], logprobs=state["logprobs"], hidden=hidden)


@torch.no_grad()
def teacher_targets(model: nn.Module, calib: torch.Tensor, k: int = 128, batch_rows: int = 1,
                    hidden_at: Sequence[int] = ()) -> TeacherTargets:
    """Top-`k` next-token log-probs of `model` (the dense teacher) on every position of `calib`, and
    the residual stream entering each of its layers of ORIGINAL index in `hidden_at` (the seams of
    the pruned student, `gradmap.healing.seams.seam_layers`).

    One forward per `batch_rows` rows; the model's own forward gives the logits (family details
    such as Gemma's soft-capping apply); log-softmax in fp32. The model is left in its mode.
    """
    vocab = int(model.config.get_text_config().vocab_size) if hasattr(model.config, "get_text_config") \
        else int(model.config.vocab_size)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < vocab:
        raise GradmapError(f"top_k must be an integer in [1, {vocab - 1}] (the vocabulary has {vocab} "
                           f"tokens), got {k!r}")
    if calib.dim() != 2:
        raise GradmapError(f"calibration ids must be (rows, seq_len), got shape {tuple(calib.shape)}")
    device = model_device(model)
    was_training = model.training
    model.eval()
    idx, lp = [], []
    hidden: dict[int, list[torch.Tensor]] = {j: [] for j in hidden_at}
    seams = (lambda: seam_inputs(get_adapter(model), list(hidden_at))) if hidden_at else nullcontext
    try:
        for start in range(0, calib.shape[0], batch_rows):
            ids = calib[start:start + batch_rows].to(device)
            with seams() as store:
                logits = model(input_ids=ids, use_cache=False).logits
            for j in hidden:
                hidden[j].append(store[j].to(torch.bfloat16).cpu())
            logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            top = logp.topk(k, dim=-1)
            idx.append(top.indices.cpu())
            lp.append(top.values.float().cpu())
    finally:
        model.train(was_training)
    return TeacherTargets(indices=torch.cat(idx), logprobs=torch.cat(lp),
                          hidden={j: torch.cat(h) for j, h in hidden.items()})


def topk_kl_sum(logits: torch.Tensor, indices: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Σ over positions of KL_K(teacher ‖ student) (module docstring), fp32 scalar.

    `logits` (B, L, V) student logits; `indices`, `teacher_logprobs` (B, L, K) from the cache.
    """
    logq_all = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    logq = logq_all.gather(-1, indices.to(logits.device))
    logp = teacher_logprobs.to(device=logits.device, dtype=logq.dtype)
    top = (logp.exp() * (logp - logq)).sum(-1)
    # the rest bucket: log(1 − Σ exp(log x)) computed as log(−expm1(logsumexp)), kept finite
    tiny = torch.finfo(logq.dtype).tiny
    logp_r = torch.log((-torch.expm1(torch.logsumexp(logp, -1).clamp(max=-1e-7))).clamp_min(tiny))
    logq_r = torch.log((-torch.expm1(torch.logsumexp(logq, -1).clamp(max=-1e-7))).clamp_min(tiny))
    rest = logp_r.exp() * (logp_r - logq_r)
    return (top + rest).sum()
