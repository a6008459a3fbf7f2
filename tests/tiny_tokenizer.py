"""A tiny offline tokenizer whose ids fit the tiny test models (vocab <= tiny.VOCAB).

Character-level BPE over lower-cased printable ASCII with a few learnt merges, a GPT-2-like
split that keeps the leading space on each word, and a Llama-like BOS added by default, so
tests exercise special-token handling and context/continuation boundaries. Built in memory.
"""
from __future__ import annotations

import functools
import string

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tiny import VOCAB

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3 match tiny.COMMON pad/bos/eos
ALPHABET = sorted(set(string.printable) - set(string.ascii_uppercase) - set("\t\r\x0b\x0c"))
TRAIN_TEXT = [
    "question: what is the answer to the question?\nanswer: the answer is yes, and then no.",
    "the cat sat on the mat. then the dog ran to the park and the man went home.",
    "a person wants to start saving money so that they can afford a nice vacation.",
]


@functools.lru_cache(maxsize=None)
def _backend_json() -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_next")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=ALPHABET, limit_alphabet=len(ALPHABET),
                                  show_progress=False)
    tok.train_from_iterator(TRAIN_TEXT, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tiny tokenizer (BOS added by default, pad = id 0, eos = id 2)."""
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_backend_json()),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", model_max_length=256)
    assert len(tok) <= VOCAB, len(tok)
    return tok


BPE_TEXT = ["the cat sat on the mat, then the dog ran to the park.", "hello world: the answer is yes, 42!"]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (the GPT-2 kind GGUF describes as "gpt2", so the GGUF converter
    can write it), with a chat template; about 300 tokens (a model needs vocab >= len(tok))."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # llama.cpp looks <unk> and <|endoftext|> up by name in a model named phi3 (as Phi-3's vocab has)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>",
                                                                  "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(BPE_TEXT * 4, trainer=trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                pad_token="<pad>")
    t.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    return t
