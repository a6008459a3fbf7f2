"""A transformers tokenizer as GGUF `tokenizer.*` metadata, read by the `gguf` package's vocab classes.

The classes read a tokenizer folder, so the tokenizer (and the model config, for the special token
ids it states) is saved to a temporary folder first. Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM)
goes through `BpeVocab`, Llama-style BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3 saved as
tokenizer.json) through `LlamaHfVocab`, a sentencepiece `tokenizer.model` through
`SentencePieceVocab`; any other tokenizer is refused.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from gguf import GGUFWriter, TokenType
from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab, SpecialVocab

from gradmap.core.errors import GradmapError

__all__ = ["tokenizer_metadata"]


def _vocab(folder: Path):
    for cls in (BpeVocab, LlamaHfVocab):
        try:
            return cls(folder)
        except (FileNotFoundError, TypeError):  # "not this kind of tokenizer"
            continue
    if (folder / "tokenizer.model").is_file():
        return SentencePieceVocab(folder)
    model = json.loads((folder / "tokenizer.json").read_text()).get("model", {}).get("type") \
        if (folder / "tokenizer.json").is_file() else "slow, without tokenizer.model"
    raise GradmapError(f"the tokenizer ({model}) is neither byte-level BPE, Llama-style BPE nor "
                       "sentencepiece, the kinds a GGUF file can describe; it cannot be exported")


def _pre_tokenizer(folder: Path) -> str:
    """llama.cpp's name for the split regex of a byte-level BPE tokenizer, "default" when unknown.

    The names are the ones transformers' GGUF reader maps back to a regex, matched on the regex
    itself, so a file this writes is split the same way when transformers reads it back.
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    spec = json.loads((folder / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    steps = spec.get("pretokenizers", [spec])
    patterns = {s.get("pattern", {}).get("Regex") for s in steps if s and s.get("type") == "Split"}
    return next((name for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex in patterns), "default")


def tokenizer_metadata(tokenizer, config, n_vocab: int):
    """(`apply(writer)` that writes `tokenizer` as GGUF metadata, summary), all read and checked now.

    The token list is padded to the model's `n_vocab` embedding rows. The summary names the
    tokenizer model, pre-tokenizer, token count and the padding added.
    """
    if tokenizer is None:
        raise GradmapError("exporting a model loaded from an HF folder to GGUF needs its tokenizer "
                           "(a GGUF file carries the vocabulary); pass the tokenizer load_model returned")
    with tempfile.TemporaryDirectory(prefix="gradmap-gguf-vocab-") as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        config.to_json_file(folder / "config.json")
        vocab = _vocab(folder)
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(ttype)
        pre = _pre_tokenizer(folder) if isinstance(vocab, BpeVocab) else None
        special = SpecialVocab(folder, load_merges=isinstance(vocab, BpeVocab), n_vocab=n_vocab)
    # BpeVocab lists special tokens that sit inside the base vocabulary as NORMAL; llama.cpp and
    # transformers' reader only keep a token whole in text when it is CONTROL/USER_DEFINED
    for tid, added in tokenizer.added_tokens_decoder.items():
        if tid < len(types) and types[tid] == TokenType.NORMAL:
            types[tid] = TokenType.CONTROL if added.special else TokenType.USER_DEFINED
    if len(tokens) > n_vocab:
        raise GradmapError(f"the tokenizer has {len(tokens)} tokens but the model's embedding only "
                           f"{n_vocab} rows; pass the tokenizer that belongs to this model")
    pad = n_vocab - len(tokens)  # embedding rows past the tokenizer (vocab padded for speed)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    scores += [-1000.0] * pad
    types += [TokenType.UNUSED] * pad

    def apply(writer: GGUFWriter) -> None:
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if pre is not None:
            writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special.add_to_gguf(writer, quiet=True)
    return apply, {"tokenizer": vocab.tokenizer_model, "pre": pre, "tokens": n_vocab, "padding": pad}
