"""LoRA healing (Hu et al. 2022; the ShortGPT / SLEB / Shortened-LLaMA baseline): low-rank adapters
W + (α/r)·B A on every linear of the kept layers, through `peft`, merged into W at the end
(`merge_and_unload`), so the result is a plain model that loads without `peft`."""
from __future__ import annotations

from torch import nn

from gradmap.core.adapter import ModelAdapter
from gradmap.core.errors import GradmapError
from gradmap.healing.trainables import Trainable

__all__ = ["check_peft", "lora_trainable"]


def check_peft() -> None:
    """Raise GradmapError naming the fix when `peft` is not installed."""
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise GradmapError("train='lora' needs the peft package: pip install 'gradmap[heal]' (or pip install "
                           "peft)") from exc


def lora_trainable(model: nn.Module, adapter: ModelAdapter, rank: int, alpha: float) -> Trainable:
    """Adapters of rank `rank` on every nn.Linear inside the decoder layers (B = 0 at the start, so
    the model is unchanged until the first step; A drawn from torch's global generator)."""
    check_peft()
    from peft import LoraConfig, get_peft_model

    names = {id(m): n for n, m in model.named_modules()}
    linears = [m for pos in range(adapter.num_layers) for m in adapter.linear_modules(pos).values()]
    targets = [names[id(m)] for m in linears]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=targets)
    wrapped = get_peft_model(model, config)
    params = [p for n, p in wrapped.named_parameters() if "lora_" in n]
    done = []

    def finalize() -> None:
        out = wrapped.merge_and_unload()
        done.append(True)
        if out is not model:
            raise GradmapError("peft's merge_and_unload returned a new model object; this peft version is "
                               "not supported by gradmap.heal")

    def discard() -> None:
        if not done:
            wrapped.unload()

    return Trainable(what=f"LoRA r={rank}, alpha={alpha:g} on {len(targets)} linear layers",
                     params=params, edited=[m.weight for m in linears], finalize=finalize, discard=discard)
