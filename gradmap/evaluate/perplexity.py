"""Perplexity exactly as the layer-pruning papers report it (SparseGPT/Wanda/SLEB `eval_ppl`).

The whole text is tokenised once (the tokenizer's default special tokens kept), cut into
non-overlapping windows of `L` tokens (incomplete tail dropped), and

    PPL = exp( sum_w (mean_nll_w * L) / (W * L) )

where `mean_nll_w` is the mean next-token cross-entropy over the `L - 1` predictions of
window `w`.  (The papers multiply by `L`, not `L - 1`; we keep that so numbers compare.)
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gradmap.core.calibration import NAMED_SOURCES, check_source, load_documents
from gradmap.core.errors import GradmapError

__all__ = ["PerplexityReport", "perplexity", "perplexity_report", "load_text", "check_text", "TEXT_PREFIX", "window_nll", "input_device"]

log = logging.getLogger(__name__)


@dataclass
class PerplexityReport:
    """Perplexity with what it was measured on."""

    ppl: float
    seq_len: int
    windows: int
    tokens: int          # tokens scored: windows * seq_len
    total_tokens: int    # tokens in the whole text (before dropping the tail / max_windows)
    seconds: float
    data: str

    def as_dict(self) -> dict:
        return asdict(self)


TEXT_PREFIX = "text:"


def load_text(data: str | os.PathLike) -> tuple[str, str]:
    """Resolve `data` to `(text, label)`: a name (`wikitext2`, `c4`), a file path, or literal text.

    Named data reads the *test* split (WikiText-2) from the local data dir, else the hub.  A
    `.jsonl` file's `text` fields are joined with blank lines.  Literal text must be asked for:
    prefix it with ``text:`` (``"text:The cat sat."``), or pass a string of several lines.  A
    one-line string that is neither a name nor an existing file is an error (a typo such as
    ``wikitxt2`` must not be scored as an 8-character text).
    """
    text = os.fspath(data)
    if isinstance(data, str) and text.startswith(TEXT_PREFIX):
        literal = text[len(TEXT_PREFIX):]
        if not literal.strip():
            raise GradmapError("the literal text after 'text:' is empty; pass some text to score")
        return literal, f"<text: {len(literal)} chars>"
    if text in NAMED_SOURCES:
        docs, _ = load_documents(text, split="test" if text == "wikitext2" else "validation")
        return "\n\n".join(docs), text
    if isinstance(data, str) and "\n" in text:  # several lines cannot be a name or a path
        return text, f"<text: {len(text)} chars>"
    if not os.path.isfile(os.path.expanduser(text)):
        raise GradmapError(f"perplexity data {text!r} does not exist: it is neither one of "
                           f"{sorted(NAMED_SOURCES)} nor an existing .txt/.jsonl file; check the spelling, or write "
                           f"'{TEXT_PREFIX}<your text>' to score literal text")
    docs, _ = load_documents(os.path.expanduser(text))
    return "\n\n".join(docs), text


def check_text(data: str | os.PathLike, option: str = "--ppl") -> None:
    """`load_text`'s checks without downloading: a named source must be local or on a reachable hub."""
    if os.fspath(data) in NAMED_SOURCES:
        check_source(data, option)
    else:
        load_text(data)


def window_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each row of `input_ids` [B, L] -> fp32 tensor [B].

    Logits are up-cast to fp32 before the log-softmax, so bf16 models are scored in fp32.
    """
    logits = model(input_ids=input_ids, use_cache=False).logits
    shift = logits[:, :-1, :].float()
    labels = input_ids[:, 1:]
    nll = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), labels.reshape(-1), reduction="none")
    return nll.view(labels.shape).mean(dim=1)


def input_device(model) -> torch.device:
    """Where input ids go: the input embedding's device, not the first parameter's.

    Under an accelerate device map the first weights may be offloaded ("meta"); the
    embedding's hook then names the execution device.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook_device = getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
    if hook_device is not None:
        return torch.device(hook_device)
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def perplexity_report(model, tokenizer, data: str | os.PathLike = "wikitext2", seq_len: int = 2048,
                      max_windows: int | None = None, batch_size: int = 1,
                      progress: bool = True) -> PerplexityReport:
    """Paper-style perplexity of `model` on `data`, with window/token counts and wall time.

    See the module docstring for the formula.  `max_windows` keeps the first N windows.
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise GradmapError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise GradmapError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise GradmapError(f"max_windows must be a positive integer or None, got {max_windows!r}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise GradmapError(f"perplexity window seq_len={seq_len} exceeds the model's "
                           f"max_position_embeddings={max_pos}; pass {max_pos} or less (--seq-len "
                           "of eval, --ppl-seq-len of compare and sparsify)")
    text, label = load_text(data)
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise GradmapError(f"{label} has {ids.numel()} tokens, fewer than one window of "
                           f"seq_len={seq_len}; use a smaller seq_len or a longer text")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    device = input_device(model)
    nll_sum = 0.0  # python float (fp64) accumulation over windows
    start = time.perf_counter()
    with torch.no_grad(), tqdm(total=n_windows, desc=f"ppl L={seq_len}", unit="win",
                               disable=not progress) as bar:
        for b in range(0, n_windows, batch_size):
            batch = windows[b:b + batch_size].to(device)
            nll = window_nll(model, batch)
            nll_sum += float(nll.double().sum()) * seq_len
            bar.update(batch.shape[0])
    seconds = time.perf_counter() - start
    ppl = math.exp(nll_sum / (n_windows * seq_len))
    log.info("perplexity %.4f on %s (L=%d, %d windows, %.1fs)", ppl, label, seq_len, n_windows,
             seconds)
    return PerplexityReport(ppl=ppl, seq_len=seq_len, windows=n_windows,
                            tokens=n_windows * seq_len, total_tokens=int(ids.numel()),
                            seconds=seconds, data=label)


def perplexity(model, tokenizer, data: str | os.PathLike = "wikitext2", seq_len: int = 2048,
               max_windows: int | None = None, batch_size: int = 1, progress: bool = True) -> float:
    """Paper-style perplexity (float): exp(sum_w mean_nll_w * L / (W * L)); see module docstring.

    `data` is `"wikitext2"` (test split), a `.txt`/`.jsonl` path, or literal text (`"text:..."`,
    see `load_text`); windows of
    `seq_len` tokens, non-overlapping, tail dropped, first `max_windows` if given.
    """
    return perplexity_report(model, tokenizer, data, seq_len, max_windows, batch_size,
                             progress).ppl
