"""`gradmap prune`: remove decoder layers with a metric and save a plain HF checkpoint.

Writes to --out: the checkpoint (safetensors, config, tokenizer), report.json
(the PruneResult plus the command line) and scores.png (one line of layer
scores per decision). --out is validated before the model is loaded.
"""
from __future__ import annotations

import argparse
import ast
import json
import time
from collections.abc import Callable

from gradmap.cli.checks import (COMPENSATIONS, DEFAULT_PIPELINE_NAME, DTYPES, METRICS, add_gguf_type_argument,
                                add_overwrite_arguments, check_gguf_output, compensation_names, overwrite_mode, positive,
                                run_on_ranks)
from gradmap.cli.speed import add_speed_arguments, speed_lengths, speed_settings
from gradmap.core.errors import GradmapError

__all__ = ["add_parser", "run", "parse_options", "pipeline_arguments", "gguf_line", "heal_arguments"]

SELF, SELF_PREFIX = "self", 16  # --heal-data self: the dense model continues each row's first 16 tokens


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prune", help="remove decoder layers chosen by a layer-importance metric",
        description="Score layers on calibration text, remove the n least important ones (in place), "
                    "optionally compensate, and save a plain Hugging Face checkpoint.")
    p.add_argument("--model", required=True, help="hub id, local HF directory, .gguf file or alias "
                                                  "(e.g. smollm2-135m)")
    p.add_argument("--n-prune", type=int, required=True, help="number of decoder layers to remove")
    p.add_argument("--metric", default=None,
                   help=f"layer metric: {', '.join(METRICS)} (default: none named runs the default, "
                        f"{DEFAULT_PIPELINE_NAME}: the candidate pipeline best on held-out rows)")
    p.add_argument("--metric-option", action="append", default=[], metavar="KEY=VALUE",
                   help="metric option, repeatable (e.g. gradient=token, verify=4)")
    p.add_argument("--schedule", default=None, choices=("iterative", "one-shot"),
                   help="re-score after every removal (iterative) or score once (one-shot); "
                        "default: the default pipeline's when --metric is not given, else the "
                        "metric's own (one-shot for gradmap, iterative for the others that support it)")
    p.add_argument("--compensation", default=None,
                   help=f"comma-separated compensators from {', '.join(COMPENSATIONS)} "
                        f"(default: with no --metric, the default {DEFAULT_PIPELINE_NAME}; with one, magnitude,replaceme)")
    p.add_argument("--method", default=None, metavar="PIPELINE",
                   help="the whole pipeline as one `gradmap compare` method string, compensator "
                        "options included, e.g. 'block-influence+magnitude+replaceme(each_step=True)"
                        "@iterative'; replaces --metric, --metric-option, --schedule and --compensation")
    p.add_argument("--calib", default="c4", help="calibration data: c4, wikitext2 or a .jsonl/.txt path")
    p.add_argument("--n-calib", type=int, default=128, help="calibration sequences (128)")
    p.add_argument("--seq-len", type=int, default=2048,
                   help="calibration sequence length (2048, as the papers calibrate)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (0)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="calibration micro-batch (default: about 2048 tokens)")
    p.add_argument("--protect-first", type=int, default=1, help="never remove the first N layers (1)")
    p.add_argument("--protect-last", type=int, default=1, help="never remove the last N layers (1)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="load dtype (default: checkpoint's)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--offload", choices=("layer",), default=None,
                   help="'layer': keep the weights in host memory and bring one decoder layer at a "
                        "time to --device (models larger than the device; see docs/guide.md)")
    p.add_argument("--out", required=True, help="output directory for the pruned checkpoint")
    p.add_argument("--gguf", default=None, metavar="FILE",
                   help="also write the pruned model as FILE.gguf for llama.cpp/ollama (a .gguf --model "
                        "keeps its untouched tensors' quantisation, an HF model is converted to F16; "
                        "see docs/guide.md)")
    add_gguf_type_argument(p, "--gguf")
    p.add_argument("--keep-attention-pattern", action="store_true",
                   help="Gemma 2/3: remove only runs of P adjacent layers (P: the sliding/full attention "
                        "period, 2 or 6), so the pruned model can leave as GGUF; --n-prune must be a multiple "
                        "of P. Implied by --gguf; no effect on models without the alternation")
    add_overwrite_arguments(p, "a non-empty --out (and an existing --gguf)")
    p.add_argument("--heal", nargs="?", const="norms+compensation", default=None, metavar="MODE",
                   help="after pruning, distil the pruned model towards the dense one on --heal-rows fresh rows "
                        "(top-K KL) and fold the result into plain weights: norms+compensation (the default when "
                        "MODE is left out), compensation, lora or partial (see docs/guide.md, 'Healing')")
    p.add_argument("--heal-option", action="append", default=[], metavar="KEY=VALUE",
                   help="healing option, repeatable (e.g. steps=64, lr=1e-3, top_k=128, batch_rows=4, seed=0)")
    p.add_argument("--heal-data", default=None, metavar="SOURCE",
                   help="healing text: c4, wikitext2 or a .jsonl/.txt path (default: the --calib source), or "
                        "'self': the dense model writes it, continuing the first 16 tokens of each row drawn "
                        "from --calib (self-distillation)")
    p.add_argument("--heal-rows", type=int, default=None,
                   help="healing rows of --seq-len tokens drawn from --heal-data with seed --seed + 1000, "
                        "so they differ from the calibration draw (256, as measured; 0: heal on the "
                        "calibration rows themselves)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_speed_arguments(p, "the dense model (a copy kept in host memory) and the pruned one")
    return p


def parse_options(items: list[str], flag: str = "--metric-option", example: str = "verify=4") -> dict:
    """KEY=VALUE strings -> dict; values are Python literals when they parse as one, else strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise GradmapError(f"{flag} {item!r} is not KEY=VALUE (e.g. {flag} {example})")
        if key in out:  # the last one used to win silently
            raise GradmapError(f"{flag} {key} is given twice; give each option once")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError, RecursionError, MemoryError):
            out[key] = value
    return out


def pipeline_arguments(args: argparse.Namespace) -> tuple[dict, Callable[[], dict]]:
    """(the pipeline as given, a factory of fresh fast_prune keyword arguments).

    The first holds None for what the user left to the default pipeline. A factory, because
    compensators configured with options keep per-run state: the cheap checks before loading
    and the run itself each get their own.
    """
    if args.method is None:
        comp = None if args.compensation is None else compensation_names(args.compensation)
        given = {"metric": args.metric, "compensation": comp, "schedule": args.schedule,
                 **parse_options(args.metric_option)}
        return given, lambda: dict(given)
    clashes = [flag for flag, value in (("--metric", args.metric), ("--metric-option", args.metric_option),
                                         ("--schedule", args.schedule), ("--compensation", args.compensation))
               if value]
    if clashes:
        raise GradmapError(f"--method names the whole pipeline, so {', '.join(clashes)} cannot be given "
                           "with it; put metric options in brackets, e.g. --method 'gradmap(verify=4)"
                           "+magnitude@one-shot', or drop --method")
    from gradmap.experiments.methods import parse_method
    spec = parse_method(args.method)  # names valid metrics, compensations and options on error
    if spec.heal is not None:  # one way to ask for healing here, with its data flags beside it
        raise GradmapError("--method takes no +heal in gradmap prune; drop it and pass --heal MODE (with "
                           "--heal-option KEY=VALUE for its options)")
    return spec.prune_kwargs(), spec.prune_kwargs


def heal_arguments(args: argparse.Namespace):
    """The validated HealOptions of --heal / --heal-option, or None without --heal."""
    if args.heal is None:
        given = [f for f, v in (("--heal-option", args.heal_option), ("--heal-data", args.heal_data),
                                ("--heal-rows", args.heal_rows is not None)) if v]
        if given:  # silently ignoring a healing flag would save an unhealed model the user thinks is healed
            raise GradmapError(f"{given[0]} needs --heal MODE (e.g. --heal compensation)")
        return None
    from gradmap.healing.options import HEAL_ROWS, heal_options
    if args.heal_rows is None:
        args.heal_rows = HEAL_ROWS
    if args.heal_rows < 0 or (args.heal_rows == 0 and args.heal_data):
        raise GradmapError(f"--heal-rows must be a positive number of rows to draw from --heal-data (or 0 without "
                           f"--heal-data: heal on the calibration rows), got {args.heal_rows}")
    if args.heal_data and args.heal_data != SELF:
        from gradmap.core.calibration import check_source
        check_source(args.heal_data)
    if args.offload:
        raise GradmapError("--heal cannot run with --offload yet (healing trains in memory); drop one of them")
    return heal_options({"train": args.heal, **parse_options(args.heal_option, "--heal-option", "steps=64")})


def run(args: argparse.Namespace) -> int:
    """Under `torchrun` every rank runs this; calibration is data-parallel and rank 0 writes --out."""
    return run_on_ranks(args, _run)


def _run(args: argparse.Namespace, device: str) -> int:
    from gradmap.core import distributed
    from gradmap.core.calibration import calibration_data, check_seed, check_source
    from gradmap.prune.support import check_prune_support
    from gradmap.core.checkpoint import prepare_output_dir, save_pretrained
    from gradmap.core.models import load_model, model_layer_ids
    from gradmap.experiments.plots import plot_scores
    from gradmap.prune.driver import (check_prune_plan, check_schedule, fast_prune, resolve_compensation,
                                      resolve_pipeline)
    from gradmap.prune.metrics import get_metric

    # every cheap check before the model is loaded
    speed = speed_settings(args)
    if speed is not None and args.offload:
        raise GradmapError("--speed times whole models on --device, which --offload says they do not "
                           "fit; drop --speed (or --offload)")
    from gradmap.core.output_paths import check_apart, input_paths
    overwrite = overwrite_mode(args)
    check_apart({"--out": args.out, "--gguf": args.gguf})
    inputs = input_paths(args.model, [args.calib])
    prepare_output_dir(args.out, overwrite, inputs)
    positive(args, "n_calib", "seq_len", "batch_size")
    check_source(args.calib)
    check_seed(args.seed)
    from gradmap.cli.checks import check_context
    check_context(args.model, {"--seq-len": args.seq_len, **speed_lengths(speed)})
    from gradmap.core.config_checks import check_family
    check_family(args.model)
    given, fresh_kwargs = pipeline_arguments(args)
    heal = heal_arguments(args)
    given_options = {k: v for k, v in given.items() if k not in ("metric", "compensation", "schedule")}
    # what fast_prune will run, for the checks; fast_prune resolves the same defaults itself
    metric_name, compensation, schedule, options = resolve_pipeline(given["metric"], given["compensation"],
                                                                    given["schedule"], given_options)
    metric = get_metric(metric_name, **options)
    check_schedule(metric, schedule)
    compensators = resolve_compensation(compensation)
    if args.offload:
        check_prune_support(metric, compensators)
    if args.n_prune <= 0:
        raise GradmapError(f"--n-prune must be a positive integer, got {args.n_prune}")
    if args.gguf_type is not None and not args.gguf:
        raise GradmapError("--gguf-type sets the type of the --gguf file's changed tensors; pass "
                           "--gguf FILE.gguf too (or drop --gguf-type)")
    if args.gguf:
        check_gguf_output(args.model, args.gguf, overwrite, "--gguf", inputs)
    layer_ids = model_layer_ids(args.model)  # from config.json or the GGUF header: no weights
    if layer_ids is not None:
        check_prune_plan(layer_ids, args.n_prune, args.protect_first, args.protect_last)

    main = distributed.is_main()
    say = print if main else (lambda *a, **k: None)
    t0 = time.perf_counter()
    say(f"loading {args.model} ...", flush=True)
    # offloaded weights stay on the host; fast_prune moves one layer at a time to the device
    model, tokenizer = load_model(args.model, dtype=args.dtype,
                                  device="cpu" if args.offload else device)
    dense = None
    if speed is not None and main:
        from gradmap.experiments.compare_speed import host_copy
        dense = host_copy(model)  # timed against the pruned model after pruning, same run
    say(f"drawing {args.n_calib} x {args.seq_len} calibration tokens from {args.calib} "
          f"(seed {args.seed}) ...", flush=True)
    calib = calibration_data(tokenizer, args.calib, args.n_calib, args.seq_len, args.seed)
    heal_data = None
    if heal is not None and args.heal_rows:
        source = args.calib if args.heal_data in (None, SELF) else args.heal_data
        say(f"drawing {args.heal_rows} x {args.seq_len} healing tokens from {source} (seed {args.seed + 1000}) ...",
            flush=True)
        heal_data = calibration_data(tokenizer, source, args.heal_rows, args.seq_len, args.seed + 1000)
        if args.heal_data == SELF:  # the model is still dense here
            from gradmap.healing import self_generated
            say(f"the dense model writes the healing text (first {SELF_PREFIX} tokens of each row kept) ...",
                flush=True)
            heal_data = self_generated(model, heal_data, prefix=min(SELF_PREFIX, args.seq_len - 1),
                                       seed=args.seed + 1000, progress=not args.no_progress and main)
    result = fast_prune(model, calib, args.n_prune, protect_first=args.protect_first,
                        protect_last=args.protect_last, batch_size=args.batch_size,
                        progress=not args.no_progress and main, offload=args.offload,
                        compute_device=device if args.offload else None, heal=heal, heal_data=heal_data,
                        # a GGUF file can only describe the pattern at its index-derived positions
                        keep_attention_pattern=args.keep_attention_pattern or bool(args.gguf), **fresh_kwargs())
    if not main:  # identical result on every rank; rank 0 writes, the others wait for it
        distributed.barrier()
        return 0
    report = result.to_dict()
    report["world_size"] = distributed.world_size()
    report["command"] = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    png = plot_scores(result)
    # the checkpoint first: a failing GGUF export or timing must not lose a finished prune
    out = save_pretrained(model, tokenizer, args.out, report=report, overwrite=overwrite,
                          extra_files={"scores.png": png})
    if args.gguf or dense is not None:
        _after_save(model, tokenizer, dense, report, out, args, speed, overwrite, say)
        del dense
    t = result.timings
    print(f"removed layers (original indices, in order): {result.removed_layers}")
    if result.options.get("attention_period", 1) > 1:
        print(f"kept the sliding/full attention pattern: removed runs of {result.options['attention_period']} "
              "adjacent layers (--keep-attention-pattern)")
    for line in result.compensation_summary() or ["compensation: none"]:
        print(line)
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()) +
          f"; wall incl. loading {time.perf_counter() - t0:.1f}s")
    print(f"saved to {out} (report.json, scores.png)")
    if args.gguf:
        print(gguf_line(report["gguf"]))
    if "speed" in report:
        from gradmap.evaluate.speed import speed_lines
        print("\n".join(speed_lines(report["speed"])))
    if args.verbose:
        print(json.dumps(report["scores"][-1], indent=None))
    return 0


def _after_save(model, tokenizer, dense, report: dict, out, args, speed, overwrite, say) -> None:
    """GGUF export and --speed, after the checkpoint is saved; report.json is updated with them."""
    from gradmap.core.checkpoint import write_file_atomic
    from gradmap.core.result import json_text
    try:
        if args.gguf:
            from gradmap.core.gguf_export import export_gguf
            report["gguf"] = export_gguf(model, tokenizer, args.gguf, dtype=args.gguf_type or "source",
                                         overwrite=overwrite)
        if dense is not None:
            from gradmap.experiments.compare_speed import speed_vs_dense
            say("timing the dense and the pruned model (--speed) ...", flush=True)
            report["speed"] = speed_vs_dense(dense, model, tokenizer, speed, gguf=args.gguf)
    except GradmapError as exc:
        raise GradmapError(f"{exc} (the pruned checkpoint is saved in {out})") from None
    finally:
        write_file_atomic(out / "report.json", json_text(report).encode())


def gguf_line(g: dict) -> str:
    """One line on an export_gguf summary: sizes, tensors copied and re-written, their types."""
    head = f"GGUF: {g['path']} ({g['bytes'] / 2**20:.1f} MiB"
    if g["source"] is None:
        return f"{head}, converted from the HF model, tensors {g['tensors']})"
    types = {}
    for name, qt in g["changed"].items():
        key = f"{g['source_types'][name]}->{qt}" if g["source_types"][name] != qt else qt
        types[key] = types.get(key, 0) + 1
    written = ", ".join(f"{n} {k}" for k, n in sorted(types.items()))
    kl = g["changed_errors"].get("kl")
    return (f"{head}, source {g['source_bytes'] / 2**20:.1f} MiB; {g['copied']} tensors copied as they "
            f"were, {len(g['changed'])} re-written" + (f" ({written}; mean KL {kl:.1e} nats/token on "
                                                         "3 rows)" if g["changed"] else "") + ")")
