"""Argument checks the subcommands share, all run before the model is loaded.

Loading SmolLM2 takes about a minute; a typo found after it wastes that minute. Each check
here reads at most a config file or a file header.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gradmap.core.errors import GradmapError

__all__ = ["positive", "check_context", "check_gguf_output", "add_overwrite_arguments", "overwrite_mode", "check_runtime", "run_on_ranks", "compensation_names", "check_json_target",
           "write_json", "add_gguf_type_argument", "METRICS", "COMPENSATIONS", "DEFAULT_PIPELINE_NAME", "DTYPES",
           "GGUF_TYPES"]

# Listed here so `--help` can show them without importing torch; tests/test_reliability_cli.py
# checks they equal the registries.
METRICS = ("gradmap", "block-influence", "angular", "taylor", "ppl", "sleb", "magnitude")
COMPENSATIONS = ("none", "projection", "magnitude", "replaceme")
# load dtypes the commands accept (torch names, spelled out for --help without torch)
DTYPES = ("float32", "bfloat16", "float16")
# gradmap.core.gguf_export.DTYPES: the type of the tensors pruning changed in a GGUF export
GGUF_TYPES = ("source", "auto", "q8_0", "f16", "bf16", "f32")
# gradmap.prune.driver.default_pipeline_name(), for --help without torch (a test checks they agree)
DEFAULT_PIPELINE_NAME = "auto"


def positive(args, *names: str) -> None:
    """Each `args.<name>` must be None or an integer >= 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise GradmapError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def check_runtime(args) -> None:
    """--dtype and --device, checked against this machine."""
    from gradmap.core.model_checks import check_device, check_dtype
    check_dtype(getattr(args, "dtype", None))
    check_device(args.device)


def run_on_ranks(args, body) -> int:
    """`body(args, device)` on every `torchrun` rank (or the only process), inside the process group.

    --dtype and --device are checked first: `process_group` would set a CUDA device that may
    not exist.
    """
    from gradmap.core.distributed import process_group
    check_runtime(args)
    with process_group(args.device) as device:
        return body(args, device)


def compensation_names(spec: str) -> list[str]:
    """'a,b' -> ['a', 'b']; an empty item (',,,', 'a,,b') is a typo, not 'none'."""
    names = [c.strip() for c in spec.split(",")]
    if not all(names):
        raise GradmapError(f"--compensation {spec!r} has an empty name; pass a comma-separated list "
                           f"of {', '.join(COMPENSATIONS)} (e.g. --compensation projection)")
    return names


def check_context(model: str, lengths: dict) -> None:
    """Each `{flag: tokens}` fits the model's context (config.json or GGUF header, no weights): a
    window too long used to fail after the work it followed."""
    from gradmap.core.model_checks import config_context
    from gradmap.core.models import resolve_model_path
    try:
        folder, gguf_file = resolve_model_path(model)
    except GradmapError:  # reported by the command's own model check
        return
    context = config_context(folder if gguf_file or os.path.isdir(folder) else None, gguf_file)
    for flag, tokens in lengths.items():
        if context is not None and tokens is not None and tokens > context:
            raise GradmapError(f"{flag} {tokens} exceeds the model's context of {context} tokens "
                               f"(max_position_embeddings); pass {flag} {context} or less")


def check_json_target(path: str) -> None:
    """--json must be a file path we can create: checked with a real write next to it."""
    target = Path(path)
    if target.is_dir():
        raise GradmapError(f"--json {path!r} is a directory; pass a file path such as results.json")
    parent = target.resolve().parent
    if not parent.is_dir():
        raise GradmapError(f"--json {path!r}: folder {str(parent)!r} does not exist; create it or "
                           "pick another path")
    if target.exists() and not os.access(target, os.W_OK):
        raise GradmapError(f"--json {path!r} exists and is read-only; pick another path")
    try:  # os.access() says yes to root even on read-only mounts
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{target.name}.probe-"):
            pass
    except OSError as exc:
        raise GradmapError(f"--json {path!r}: cannot write into {str(parent)!r} ({exc.strerror}); "
                           "pick a writable location") from None


def write_json(path: str, value) -> None:
    """Strict JSON (NaN -> null), written atomically: a full disk leaves no empty file."""
    from gradmap.core.checkpoint import write_file_atomic
    from gradmap.core.result import json_text
    write_file_atomic(path, json_text(value).encode())


def add_overwrite_arguments(p, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} when gradmap wrote it (a folder with a .gradmap-output file)")
    p.add_argument("--force-overwrite", action="store_true",
                   help=f"replace {what} even when gradmap did not write it (never an input, "
                        "system or home folder)")


def overwrite_mode(args):
    """The `overwrite` argument of the writers: False, True or "force"."""
    from gradmap.core.output_paths import FORCE
    return FORCE if args.force_overwrite else args.overwrite


def add_gguf_type_argument(p, flag: str) -> None:
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default=None,
                   help=f"type of the tensors pruning changed in {flag} (from a .gguf --model): source "
                        "(default: each in its source tensor's type, e.g. Q4_1, so the file shrinks "
                        "by the removed layers' share; types the gguf package cannot write, e.g. "
                        "Q4_K, become the smallest one with a bit more per weight, e.g. Q5_0), auto "
                        "(Q8_0, or F16 if Q8_0 moves the next-token distribution by more than 1e-3 "
                        "nats), or one type for all; an HF --model is converted whole, F16 unless "
                        "q8_0/bf16/f32 is given")


def check_gguf_output(model: str, path: str, overwrite, flag: str, inputs=()) -> None:
    """The GGUF output file, and the model: a GGUF file (its tensors are copied) or an HF folder of a
    family the converter supports (its config.json is read); both checked before loading. The
    output must not be one of `inputs` or inside one."""
    from gradmap.core.gguf_export import check_gguf_paths
    from gradmap.core.gguf_write import check_gguf_target
    from gradmap.core.models import resolve_model_path
    folder, gguf_file = resolve_model_path(model)
    if gguf_file is not None:
        check_gguf_paths(f"{folder}/{gguf_file}", path, overwrite, inputs)
        return
    check_gguf_target(path, overwrite, inputs)
    config = Path(folder, "config.json")
    if config.is_file():  # a hub id that is not cached is checked once loaded
        import json

        from gradmap.core.gguf_convert import FAMILIES
        family = json.loads(config.read_text()).get("model_type")
        if family not in FAMILIES:
            raise GradmapError(f"{flag}: GGUF export of {family!r} models is not supported; "
                               f"supported: {', '.join(sorted(FAMILIES))}")
