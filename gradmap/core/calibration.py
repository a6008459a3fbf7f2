"""Calibration data: random token windows from random documents, as SparseGPT/Wanda sample C4.

SparseGPT (Frantar & Alistarh, 2023, `datautils.get_c4`) and Wanda (Sun et al., 2023) draw each
calibration sample by picking a random document, retrying until its tokenisation is longer than
`seq_len`, and cutting a random window of `seq_len` tokens out of it.  A single text stream
(WikiText-2) is tokenised once and windows are cut at random offsets.  With the same tokenizer
and seed this module reproduces their draws exactly (same `random.Random` call sequence), but
it uses a local generator and never touches global RNG state.
"""
from __future__ import annotations

import json
import logging
import os
import random
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from gradmap.core.errors import GradmapError

__all__ = ["calibration_data", "data_dir", "load_documents", "check_source", "check_seed", "hub_reachable",
           "missing_data_message", "DATA_ENV", "NAMED_SOURCES", "DEFAULT_DATA_DIR"]

log = logging.getLogger(__name__)

# Environment variable that overrides the shared data directory.
DATA_ENV = "GRADMAP_DATA_DIR"

# name -> file under the data dir; with no data dir the hub is used (see `_hub_documents`).
NAMED_SOURCES = {
    "c4": "c4/validation_2k.jsonl",
    "wikitext2": "wikitext2/test.txt",
}

# the layout the project's tests, CI and benchmarks use: <project root>/../shared/data
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
# one TCP connect, no retries: an offline machine must fail in seconds, not after a retry storm
HUB_TIMEOUT_S = 3.0
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_hub_answers: dict[tuple, bool] = {}


def data_dir() -> Path | None:
    """The offline evaluation-data directory, or None when there is none.

    `$GRADMAP_DATA_DIR` wins when set; otherwise `<project root>/../shared/data`, the layout
    the project's tests, CI and benchmarks use.  Returns None when the directory is absent
    (callers then fall back to the Hugging Face hub).
    """
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise GradmapError(f"${DATA_ENV} points to {str(path)!r}, which is not a directory; "
                               "set it to the folder holding c4/, wikitext2/ and tasks/, or unset it")
        return path
    return DEFAULT_DATA_DIR if DEFAULT_DATA_DIR.is_dir() else None


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """True when the Hugging Face hub (`$HF_ENDPOINT`) accepts a TCP connection within `timeout`.

    False at once when an HF offline variable is set. The answer is kept for the process, so
    the checks before loading and the load itself ask at most once.
    """
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARS):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    key = (url.hostname, url.port)
    if key not in _hub_answers:
        try:
            with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
                _hub_answers[key] = True
        except OSError:
            _hub_answers[key] = False
    return _hub_answers[key]


def missing_data_message(rel: str, what: str) -> str:
    """One line: which data file is missing, where it was looked for, and how to point at it."""
    return (f"{what} needs {rel}, which is in no data folder (${DATA_ENV} is unset and "
            f"{DEFAULT_DATA_DIR} does not exist) and the Hugging Face hub is unreachable; set "
            f"{DATA_ENV}=/path/to/data, a folder holding {rel} (layout: docs/data.md)")


def _read_file(path: Path) -> tuple[list[str], bool]:
    """Documents of a `.jsonl` (field `text`) or `.txt` file; the bool says 'one stream'."""
    try:
        return _parse_file(path)
    except UnicodeDecodeError as exc:
        raise GradmapError(f"{str(path)!r} is not UTF-8 text (byte {exc.start} cannot be decoded); "
                           "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _parse_file(path: Path) -> tuple[list[str], bool]:
    if path.suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise GradmapError(f"{path}:{line_no} is not valid JSON ({exc}); a .jsonl "
                                       "source needs one JSON object per line") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise GradmapError(f"{path}:{line_no} has no string field 'text'; a .jsonl "
                                       'source needs {"text": ...} on every line')
                docs.append(row["text"])
        return docs, False
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")], True
    raise GradmapError(f"calibration file {str(path)!r} has suffix {path.suffix!r}; use a .jsonl "
                       "file (one {\"text\": ...} per line) or a .txt file")


def _hub_documents(name: str, split: str) -> tuple[list[str], bool]:
    """The named corpus from the Hugging Face hub, as the SparseGPT/Wanda code loads it."""
    if not hub_reachable():
        raise GradmapError(missing_data_message(NAMED_SOURCES[name], f"data {name!r}"))
    log.info("no local data dir; loading %s (%s) from the Hugging Face hub", name, split)
    try:
        return _load_from_hub(name, split)
    except Exception as exc:  # noqa: BLE001 - network and hub failures come in many classes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GradmapError(f"loading {name!r} from the Hugging Face hub failed ({first}); set "
                           f"{DATA_ENV} to a folder holding {NAMED_SOURCES[name]} to work "
                           "offline") from None


def _load_from_hub(name: str, split: str) -> tuple[list[str], bool]:
    from datasets import load_dataset  # imported lazily: only online users reach this

    if name == "c4":
        shard = ("en/c4-train.00000-of-01024.json.gz" if split == "train"
                 else "en/c4-validation.00000-of-00008.json.gz")
        ds = load_dataset("allenai/c4", data_files={split: shard}, split=split)
        return list(ds["text"]), False
    ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    return ["\n\n".join(ds["text"])], True


def load_documents(source: str | os.PathLike, split: str = "train") -> tuple[list[str], bool]:
    """Resolve `source` to `(documents, is_stream)`.

    `source` is a `.jsonl`/`.txt` path or a name in `NAMED_SOURCES`; a name reads the local data
    dir when present, else the hub (`split` picks the hub split; the local files hold only the
    C4 validation subset and the WikiText-2 test split).
    """
    text = os.fspath(source)
    if text in NAMED_SOURCES:
        root = data_dir()
        if root is not None:
            path = root / NAMED_SOURCES[text]
            if not path.is_file():
                raise GradmapError(f"data file {str(path)!r} for {text!r} is missing; restore the "
                                   f"shared data dir or set ${DATA_ENV} to a copy of it")
            if text == "wikitext2" and split == "train":
                log.warning("the local wikitext2 file is the TEST split; calibrating on it and "
                            "evaluating on it mixes the two")
            return _read_file(path)
        return _hub_documents(text, split)
    path = Path(text).expanduser()
    if not path.is_file():
        raise GradmapError(f"calibration source {text!r} is neither a file nor one of the names "
                           f"{sorted(NAMED_SOURCES)}; pass an existing .jsonl/.txt path or a name")
    return _read_file(path)


def check_seed(seed, flag: str = "--seed") -> None:
    """A seed is a non-negative integer: random.Random(-7) draws what Random(7) does."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise GradmapError(f"{flag} must be a non-negative integer (-7 would draw what 7 draws), "
                           f"got {seed!r}")


def check_source(source: str | os.PathLike, option: str = "--calib") -> None:
    """Cheap check that `source` names data `load_documents` can read (a name or a file)."""
    text = os.fspath(source)
    if text in NAMED_SOURCES:
        root = data_dir()
        if root is not None and not (root / NAMED_SOURCES[text]).is_file():
            raise GradmapError(f"data file {str(root / NAMED_SOURCES[text])!r} for {text!r} is "
                               f"missing; restore the shared data dir or set ${DATA_ENV}")
        if root is None and not hub_reachable():
            raise GradmapError(missing_data_message(NAMED_SOURCES[text], f"{option} {text}"))
        return
    path = Path(text).expanduser()
    if not path.is_file():
        raise GradmapError(f"{option} {text!r} is neither an existing file nor one of "
                           f"{sorted(NAMED_SOURCES)}; pass an existing .jsonl/.txt path or a name")
    if path.suffix not in (".jsonl", ".txt"):
        raise GradmapError(f"{option} {text!r} has suffix {path.suffix!r}; use a .jsonl file (one "
                           '{"text": ...} per line) or a .txt file')
    # read now (milliseconds to seconds) so a non-UTF-8, malformed or empty file fails before
    # the model loads (a minute for SmolLM2), not after it
    docs, _ = _read_file(path)
    if not any(doc.strip() for doc in docs):
        raise GradmapError(f"{option} {text!r} holds no text (the file is empty or blank); pass a "
                           "file that holds text")


def _token_ids(tokenizer, text: str) -> list[int]:
    # default special tokens, exactly as `tokenizer(text)` in the SparseGPT/Wanda loaders
    return tokenizer(text, verbose=False)["input_ids"]


def calibration_data(tokenizer, source: str | os.PathLike = "c4", n_samples: int = 128,
                     seq_len: int = 2048, seed: int = 0) -> torch.Tensor:
    """Draw `n_samples` random windows of `seq_len` tokens: LongTensor[n_samples, seq_len].

    Documents (C4, .jsonl): for each sample pick a uniformly random document, retry until its
    token count exceeds `seq_len`, then take the window starting at a uniform offset in
    `[0, len - seq_len - 1]` (SparseGPT `get_c4`).  A single stream (.txt, WikiText-2) is
    tokenised once and each window starts at a uniform offset in `[0, len - seq_len - 1]`
    (SparseGPT `get_wikitext2`).  Deterministic for a given `seed` and tokenizer.
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise GradmapError(f"n_samples must be a positive integer, got {n_samples!r}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise GradmapError(f"seq_len must be a positive integer, got {seq_len!r}")
    check_seed(seed)
    docs, is_stream = load_documents(source, split="train")
    rng = random.Random(seed)
    samples = []
    if is_stream:
        ids = _token_ids(tokenizer, docs[0])
        if len(ids) <= seq_len:
            raise GradmapError(f"calibration text {os.fspath(source)!r} has {len(ids)} tokens, too "
                               f"few for windows of seq_len={seq_len}; use a longer text or a "
                               "smaller seq_len")
        for _ in range(n_samples):
            start = rng.randint(0, len(ids) - seq_len - 1)
            samples.append(ids[start:start + seq_len])
        return torch.tensor(samples, dtype=torch.long)
    if not docs:
        raise GradmapError(f"calibration source {os.fspath(source)!r} holds no documents")
    cache: dict[int, list[int]] = {}
    long_enough = None  # counted only once every document has been tokenised
    for _ in range(n_samples):
        while True:
            i = rng.randint(0, len(docs) - 1)
            if i not in cache:
                cache[i] = _token_ids(tokenizer, docs[i])
                if len(cache) == len(docs):
                    long_enough = sum(len(v) > seq_len for v in cache.values())
            if len(cache[i]) > seq_len:
                break
            if long_enough == 0:
                longest = max(len(v) for v in cache.values())
                raise GradmapError(
                    f"no document in {os.fspath(source)!r} is longer than seq_len={seq_len} tokens "
                    f"(longest: {longest}); use a smaller seq_len or a source with longer documents")
        ids = cache[i]
        start = rng.randint(0, len(ids) - seq_len - 1)
        samples.append(ids[start:start + seq_len])
    return torch.tensor(samples, dtype=torch.long)
