"""`gradmap compare`: run several pruning methods from the same dense weights and evaluate them.

For every method the comparison starts from a pristine dense model (`dense_source`: a deep
copy of the dense model loaded once, or a fresh load with `restore="reload"`), checked against the dense
weights' fingerprint so a pruned model is never pruned again, and uses the same calibration
tensor. Pruning time is `PruneResult.timings` (scoring, compensation statistics, solve,
total; model loading and evaluation excluded), also given as a ratio to one plain
forward+backward over the calibration set, measured once on the dense model. Every model is
evaluated on paper-style WikiText-2 perplexity and the zero-shot tasks (LAMBADA beside their
average); retention is the pruned task average as a percentage of the dense one. Results are rewritten after every
method (`results.md`, `results.json`, PNG plots), so a failure or an interrupt keeps what
finished; a failing method is reported in its own row.
"""
from __future__ import annotations

import gc
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gradmap.core.checkpoint import save_pretrained
from gradmap.core.errors import GradmapError
from gradmap.experiments.compare_checks import check_before_loading, open_results_dir
from gradmap.experiments.compare_report import small_sample
from gradmap.experiments.compare_speed import measure_row
from gradmap.experiments.dense_source import DenseSource, check_calibration_untouched, weights_fingerprint
from gradmap.experiments.methods import (MethodSpec, method_from_result, parse_methods,
                                         split_methods)
from gradmap.healing.options import HEAL_ROWS

__all__ = ["CompareConfig", "run_compare", "DenseSource", "weights_fingerprint",
           "forward_backward_seconds", "greedy_generate", "evaluate_model", "environment",
           "prune_row", "run_method", "FLOOR_DESCRIPTION"]

log = logging.getLogger(__name__)

FLOOR_DESCRIPTION = ("one plain forward+backward of the LM loss over the whole calibration set "
                     "(same micro-batches as pruning, after one untimed warm-up sequence), "
                     "parameters trainable (requires_grad=True), gradients discarded")


@dataclass
class CompareConfig:
    """Settings of one comparison; validated on construction (errors name the fix)."""

    model: str
    n_prune: int
    methods: list[str]
    tasks: str | list[str] | None = "all"   # None: no zero-shot evaluation
    limit: int | None = None                 # first N examples of each zero-shot task
    calib: str = "c4"
    n_calib: int = 128
    seq_len: int = 512                       # calibration sequence length
    seed: int = 0
    ppl_data: str = "wikitext2"
    ppl_seq_len: int = 2048
    ppl_windows: int | None = None           # first N perplexity windows (None: all)
    batch_size: int | None = None            # pruning micro-batch; None: ~2048 tokens each
    eval_batch_size: int = 32                # zero-shot continuations per forward
    dtype: str | None = None
    device: str = "cpu"
    protect_first: int = 1
    protect_last: int = 1
    restore: str = "copy"                    # "copy": deep copy of the dense model; "reload"
    save_dir: str | None = None              # save this method's pruned checkpoint here
    save_method: str | None = None           # default: the first method whose metric is gradmap
    save_gguf: str | None = None             # also write that model as this .gguf
    save_gguf_dtype: str | None = None       # export_gguf's dtype for it (None: "source")
    generate: str | None = None              # prompt for before/after greedy generations
    max_new_tokens: int = 32
    overwrite: bool | str = False            # "force": also replace folders gradmap did not write
    speed: dict | None = None                # inference_speed settings: time each method vs dense

    def __post_init__(self):
        for name in ("n_prune", "n_calib", "seq_len", "ppl_seq_len", "eval_batch_size",
                     "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise GradmapError(f"{name} must be a positive integer, got {value!r}")
        for name in ("limit", "ppl_windows", "batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise GradmapError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("protect_first", "protect_last", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise GradmapError(f"{name} must be a non-negative integer, got {value!r}")
        if self.restore not in ("copy", "reload"):
            raise GradmapError(f"restore={self.restore!r} is not valid; choose 'copy' (keep a "
                               "dense copy in memory) or 'reload' (load the model for each method)")
        if self.save_gguf_dtype is not None:
            if self.save_gguf is None:
                raise GradmapError("save_gguf_dtype sets the type of the save_gguf file's changed "
                                   "tensors; set save_gguf too (--save-gguf FILE.gguf)")
            from gradmap.core.gguf_export import check_gguf_dtype
            check_gguf_dtype(self.save_gguf_dtype)
        if isinstance(self.methods, str):
            self.methods = split_methods(self.methods)  # commas inside (options) do not split
        if self.speed is not None:
            from gradmap.evaluate.speed import check_speed_options
            self.speed = check_speed_options(**self.speed)


def forward_backward_seconds(model, calib: torch.Tensor, batch_size: int,
                             warmup: bool = True) -> float:
    """Wall time of one forward+backward of the LM loss over `calib` (see FLOOR_DESCRIPTION).

    The floor any gradient-based metric pays: it cannot score layers with less than one
    backward over the calibration set. With `warmup`, one untimed forward+backward of a
    single sequence runs first (allocator and kernel set-up, CUDA context on a GPU).
    Weights are left unchanged; `.grad` is freed.
    """
    device = next(model.parameters()).device

    def step(ids: torch.Tensor) -> None:
        ids = ids.to(device)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(True)
    try:
        if warmup:
            step(calib[:1])
            model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for b in range(0, calib.shape[0], batch_size):
            step(calib[b:b + batch_size])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


@torch.no_grad()
def greedy_generate(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy continuation of `prompt` (new text only)."""
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate_model(model, tokenizer, cfg: CompareConfig, tasks: list[str] | None,
                   progress: bool, per_example: bool = False) -> dict[str, Any]:
    """PPL (and its report), zero-shot and the optional generation of one model, as in a row."""
    from gradmap.evaluate import perplexity_report, zero_shot
    out: dict[str, Any] = {}
    rep = perplexity_report(model, tokenizer, cfg.ppl_data, seq_len=cfg.ppl_seq_len,
                            max_windows=cfg.ppl_windows, progress=progress)
    out["ppl"] = rep.ppl
    out["ppl_report"] = rep.as_dict()
    if tasks:
        extra = {"per_example": True} if per_example else {}  # 0/1 per example for paired tests
        zs = zero_shot(model, tokenizer, tasks, limit=cfg.limit, batch_size=cfg.eval_batch_size,
                       progress=progress, **extra)
        out["tasks"] = {name: e["value"] for name, e in zs["tasks"].items()}
        out["average"] = zs["average"]
        if zs.get("lambada_openai"):  # beside the average, never in it; kept in report.json
            out["lambada"] = {k: zs["lambada_openai"][k] for k in ("acc", "interval", "ppl", "n")}
        out["zero_shot"] = zs
    if cfg.generate is not None:
        out["generation"] = greedy_generate(model, tokenizer, cfg.generate, cfg.max_new_tokens)
    return out


def environment(cfg: CompareConfig) -> dict[str, Any]:
    """Library versions and the machine, recorded next to every result."""
    import os
    import platform

    import transformers

    from gradmap import __version__
    gpu = None
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(cfg.device))
    return {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "gradmap": __version__, "python": platform.python_version()},
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "gpu": gpu}}


def _save_method(specs: list[MethodSpec], cfg: CompareConfig) -> str | None:
    if cfg.save_dir is None:
        return None
    names = [s.name for s in specs]
    if cfg.save_method is not None:
        if cfg.save_method not in names:
            raise GradmapError(f"save_method {cfg.save_method!r} is not among the methods "
                               f"{names}; pass one of them (--save-method)")
        return cfg.save_method
    return next((s.name for s in specs if s.metric == "gradmap"), names[0])


def prune_row(spec: MethodSpec) -> dict[str, Any]:
    """A result row for `spec` before it runs."""
    return {"method": spec.name, "label": spec.label, "metric": spec.metric,
            "compensation": list(spec.compensation), "schedule": spec.schedule,
            "status": "pending"}


def run_compare(cfg: CompareConfig, out_dir: str | Path, progress: bool = True,
                loader: Callable[..., tuple[Any, Any]] | None = None,
                prune_fn: Callable[..., Any] | None = None,
                on_update: Callable[[dict], None] | None = None,
                plots: bool = True) -> dict[str, Any]:
    """Run the comparison described by `cfg`, writing results into `out_dir` as it goes.

    Returns the results dict also written to `results.json`. `loader` defaults to
    `gradmap.core.models.load_model` and `prune_fn` to `gradmap.prune.fast_prune`;
    `on_update(results)` is called after every rewrite; `plots=False` skips the PNGs.
    """
    from gradmap.experiments import compare_report
    from gradmap.evaluate.tasks import resolve_tasks

    # validate everything before any work: methods, tasks, output folders
    specs = parse_methods(cfg.methods)
    tasks = resolve_tasks(cfg.tasks) if cfg.tasks else None
    save_method = _save_method(specs, cfg)
    check_before_loading(cfg, default_loader=loader is None)
    out, lock = open_results_dir(out_dir, cfg, default_loader=loader is None)
    try:
        if loader is None:
            from gradmap.core.models import load_model as loader
        if prune_fn is None:
            from gradmap.prune.driver import fast_prune as prune_fn

        results: dict[str, Any] = {"settings": asdict(cfg), "status": "running",
                                   "floor": {"description": FLOOR_DESCRIPTION},
                                   "dense": None, "methods": [prune_row(s) for s in specs],
                                   **environment(cfg)}
        results["settings"]["methods"] = [s.name for s in specs]
        results["settings"]["tasks"] = tasks
        results["settings"]["save_method"] = save_method

        def write(plots: bool = False) -> None:
            compare_report.write_results(out, results, plots=plots)
            if on_update is not None:
                on_update(results)

        try:
            _run_all(cfg, specs, tasks, save_method, results, write, loader, prune_fn, progress,
                     plots)
        except BaseException as exc:  # keep what finished, and say why the run stopped
            results["status"] = ("interrupted" if isinstance(exc, KeyboardInterrupt)
                                 else f"aborted: {type(exc).__name__}: {exc}")
            for row in results["methods"]:
                if row["status"] == "running":
                    row["status"] = "failed"
                    row["error"] = f"run {results['status']}"
            write()
            raise
        results["status"] = "complete"
        write()
        return results
    finally:
        os.close(lock)


def _run_all(cfg: CompareConfig, specs: list[MethodSpec], tasks: list[str] | None,
             save_method: str | None, results: dict, write: Callable[..., None], loader,
             prune_fn, progress: bool, plots: bool) -> None:
    from gradmap.core.calibration import calibration_data

    source = DenseSource(loader, cfg.model, cfg.dtype, cfg.device, cfg.restore)
    tokenizer = source.tokenizer
    results["dense_layers"] = source.num_layers
    results["load_seconds"] = source.load_seconds
    removable = source.num_layers - cfg.protect_first - cfg.protect_last
    if cfg.n_prune >= removable:
        raise GradmapError(f"n_prune={cfg.n_prune} but only {removable} of {source.num_layers} "
                           f"layers are removable (protecting {cfg.protect_first} first / "
                           f"{cfg.protect_last} last); prune at most {removable - 1}")
    calib = calibration_data(tokenizer, cfg.calib, n_samples=cfg.n_calib, seq_len=cfg.seq_len,
                             seed=cfg.seed)
    calib_copy = calib.clone()
    results["settings"]["calib_shape"] = list(calib.shape)
    # the floor runs a backward with fast_prune's default backward micro-batch; with
    # batch_size None each method keeps fast_prune's per-phase defaults
    from gradmap.runtime.batching import default_batch_size
    model = source.fresh()
    floor_batch = cfg.batch_size or default_batch_size(cfg.seq_len, config=model.config)
    results["settings"]["batch_size"] = cfg.batch_size
    results["settings"]["floor_batch_size"] = floor_batch

    results["dense"] = evaluate_model(model, tokenizer, cfg, tasks, progress)
    results["floor"]["seconds"] = forward_backward_seconds(model, calib, floor_batch)
    source.check(model)  # the floor measurement must leave the weights as they were
    del model
    write()

    bar = tqdm(total=len(specs), desc="methods", unit="method", disable=not progress, position=0)
    try:
        for spec, row in zip(specs, results["methods"]):
            bar.set_postfix_str(spec.name)
            model = source.fresh()
            try:
                run_method(model, tokenizer, calib, spec, row, cfg, tasks, prune_fn,
                           progress, results)
            except Exception as exc:  # one method failing must not lose the others' rows
                row["status"] = "failed"
                row["error"] = f"{type(exc).__name__}: {exc}"
                row["traceback"] = traceback.format_exc()
                log.error("method %s failed: %s", spec.name, row["error"])
            else:
                if spec.name == save_method:
                    _save(model, tokenizer, row, cfg)
                if cfg.speed is not None:
                    gguf = cfg.save_gguf if row.get("saved_to") else None
                    measure_row(source, model, tokenizer, row, cfg.speed, gguf)
            finally:
                del model
                gc.collect()
            check_calibration_untouched(calib, calib_copy, spec.name)
            write(plots=plots and row["status"] == "ok")
            bar.update(1)
    finally:
        bar.close()


def _save(model, tokenizer, row: dict, cfg: CompareConfig) -> None:
    report = {"compare": {k: v for k, v in row.items() if k not in ("prune_result", "zero_shot")},
              **row.get("prune_result", {})}
    try:
        save_pretrained(model, tokenizer, cfg.save_dir, report=report, overwrite=cfg.overwrite,
                        gguf=cfg.save_gguf, gguf_dtype=cfg.save_gguf_dtype)
        row["saved_to"] = str(cfg.save_dir)
    except Exception as exc:  # the row's figures stand; the failed save is reported beside them
        row["save_error"] = f"{type(exc).__name__}: {exc}"
        log.error("saving %s to %s failed: %s", row["method"], cfg.save_dir, row["save_error"])


def run_method(model, tokenizer, calib, spec: MethodSpec, row: dict, cfg: CompareConfig,
               tasks, prune_fn, progress: bool, results: dict, per_example: bool = False) -> None:
    """Prune a dense `model` with `spec`, evaluate it and fill `row` (floor/dense: `results`)."""
    row["status"] = "running"
    healing = {}
    if spec.heal is not None:  # as `gradmap prune --heal`: HEAL_ROWS fresh rows of the calibration source
        from gradmap.core.calibration import calibration_data
        healing["heal_data"] = calibration_data(tokenizer, cfg.calib, n_samples=HEAL_ROWS, seq_len=cfg.seq_len,
                                                seed=row.get("seed", cfg.seed) + 1000)
    start = time.perf_counter()
    res = prune_fn(model, calib, cfg.n_prune, **spec.prune_kwargs(),
                   protect_first=cfg.protect_first, protect_last=cfg.protect_last,
                   batch_size=cfg.batch_size, progress=progress, **healing)
    row["wall_seconds"] = time.perf_counter() - start
    row["removed_layers"] = sorted(res.removed_layers)
    row["timings"] = dict(res.timings)
    floor = results["floor"]["seconds"]
    row["ratio_to_floor"] = res.timings["total"] / floor if floor > 0 else None
    if "heal" in res.timings:  # outside "total": the heal's own cost, teacher pass included
        row["heal_ratio_to_floor"] = res.timings["heal"] / floor if floor > 0 else None
    row["scores"] = [{str(k): v for k, v in s.items()} for s in res.scores]
    row["prune_result"] = res.to_dict()
    row["pipeline"] = method_from_result(row["prune_result"])  # reruns it, every option spelled out
    row.update(evaluate_model(model, tokenizer, cfg, tasks, progress, per_example))
    dense = results["dense"] or {}
    # no retention from a handful of examples: the ratio of two noisy averages is noise squared
    if row.get("average") is not None and dense.get("average") and not small_sample(dense.get("zero_shot")):
        row["retention"] = 100.0 * row["average"] / dense["average"]
    row["status"] = "ok"
