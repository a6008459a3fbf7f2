"""Data-parallel calibration: 2 gloo processes on CPU reproduce the single-process run.

One spawn runs every configuration (start-up dominates); each rank writes its results to a
file and the test compares them with the same configurations run in this process without a
process group: removed layers, every scoring pass, compensation decisions and the final
weights, within fp32 summation-order tolerance. Ranks must also agree with each other exactly.
"""
from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradmap.core import distributed
from gradmap.core.checkpoint import save_pretrained
from gradmap.prune.compensation import MagnitudeCompensation
from gradmap.prune.driver import fast_prune
from gradmap.sparsity.sparsify import sparsify
from tiny import paired_leaves, random_ids, tiny_model

WORLD = 2
# fp64 model: most results match the single process to the last bits; statistics kept in fp32
# (Moments, Wanda norms) move by ~1e-8 relative with the summation order, and the mean shift of a
# layer the pruning did not change is pure fp32 noise (~5e-8 absolute), hence the atol
RTOL, ATOL = 1e-6, 2e-7

PRUNE_CONFIGS = {
    "gradmap-oneshot-projection": dict(metric="gradmap", schedule="one-shot", compensation="projection"),
    "gradmap-iterative-magnitude-projection": dict(metric="gradmap", schedule="iterative",
                                                   compensation=["magnitude", "projection"]),
    "gradmap-verify": dict(metric="gradmap", schedule="one-shot", compensation="none", verify=3),
    "gradmap-param": dict(metric="gradmap", schedule="iterative", compensation="none", gradient="param"),
    "block-influence-projection": dict(metric="block-influence", schedule="one-shot",
                                       compensation="projection"),
    "angular": dict(metric="angular", schedule="one-shot", compensation="none"),
    "sleb": dict(metric="sleb", schedule="iterative", compensation="none"),
    "ppl": dict(metric="ppl", schedule="one-shot", compensation="none"),
    # 3 rows for the magnitude statistics: an uneven split (1 and 2 rows)
    "taylor-magnitude3": dict(metric="taylor", schedule="one-shot",
                              compensation=lambda: [MagnitudeCompensation(max_samples=3)]),
}
SPARSIFY_CONFIGS = {"wanda-mrp": "mrp", "wanda-owl": "owl"}


def _calib() -> torch.Tensor:
    return random_ids(8, 16, seed=1)  # 8 rows: 4 per rank; the held-out slice is 1 row


def _count_rows(model, seen: list[int]):
    """Count the calibration rows that reach the embedding (all passes of one call)."""
    def hook(_module, args):
        seen[0] += args[0].shape[0]
    return model.get_input_embeddings().register_forward_pre_hook(hook)


def _run_all() -> tuple[dict, int]:
    """Every configuration on a fresh fp64 tiny model: (plain tensors and lists, rows embedded)."""
    out, seen = {}, [0]
    for name, cfg in PRUNE_CONFIGS.items():
        cfg = dict(cfg)
        if callable(cfg["compensation"]):
            cfg["compensation"] = cfg["compensation"]()
        model = tiny_model("llama", n_layers=7, dtype=torch.float64, seed=0)
        _count_rows(model, seen)
        res = fast_prune(model, _calib(), 2, batch_size=2, **cfg)
        out[name] = {"removed": list(res.removed_layers), "scores": [dict(s) for s in res.scores],
                     "shifts": dict(res.shifts), "report": res.compensation_report,
                     "decisions": res.options.get("decisions"),
                     "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    for name, allocation in SPARSIFY_CONFIGS.items():
        model = tiny_model("llama", n_layers=4, dtype=torch.float64, seed=0)
        _count_rows(model, seen)
        res = sparsify(model, _calib(), 0.5, allocation, "wanda", batch_size=3, progress=False,
                       outlier_m=2.0)
        out[name] = {"targets": list(res.block_targets), "ratios": list(res.outlier_ratios),
                     "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    return out, seen[0]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results, seen = _run_all()
        model = tiny_model("llama", n_layers=3, dtype=torch.float64, seed=0)
        save_pretrained(model, None, Path(out_dir) / f"saved-by-rank{rank}")
        save_pretrained(model, None, Path(out_dir) / "shared")
        results["shared_complete"] = (Path(out_dir) / "shared" / "model.safetensors").is_file()
        torch.save((results, seen), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a, b, path: str) -> None:
    """Recursive comparison with the module tolerance; floats, tensors, lists and dicts."""
    for x, y, where in paired_leaves(a, b, path):
        if torch.is_tensor(x):
            torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL, msg=lambda m, w=where: f"{w}: {m}")
        elif isinstance(x, float):
            assert x == pytest.approx(y, rel=RTOL, abs=ATOL), f"{where}: {x} != {y}"
        else:
            assert x == y, f"{where}: {x!r} != {y!r}"


def _equal(a, b, path: str) -> None:
    for x, y, where in paired_leaves(a, b, path):
        if torch.is_tensor(x):
            assert torch.equal(x, y), f"{where}: ranks differ by {float((x - y).abs().max())}"
        else:
            assert x == y, f"{where}: {x!r} != {y!r}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    loaded = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert not distributed.is_distributed()
    single, seen = _run_all()
    return out, [r for r, _ in loaded], single, ([s for _, s in loaded], seen)


def test_ranks_hold_identical_results(runs):
    _, ranks, _, _ = runs
    _equal(ranks[0], ranks[1], "rank0 vs rank1")


@pytest.mark.parametrize("name", list(PRUNE_CONFIGS) + list(SPARSIFY_CONFIGS))
def test_two_ranks_equal_single_process(runs, name):
    _, ranks, single, _ = runs
    assert name in single and name in ranks[0]
    _close(ranks[0][name], single[name], name)


def test_each_row_ran_on_exactly_one_rank(runs):
    """Guard against a vacuous pass: the ranks split the rows, none was run twice or skipped.

    The 1-row held-out slices run on rank 1 only (rank 0's share is empty), so the split is uneven:
    the pipeline safeguard keeps 1 of the 8 rows, projection 1 of the remaining 7.
    """
    _, _, single, (per_rank, seen) = runs
    assert sum(per_rank) == seen
    assert all(0.3 * seen < s < 0.7 * seen for s in per_rank)
    rep = single["gradmap-oneshot-projection"]["report"]["projection"]
    assert rep["n_train_samples"] == 6 and rep["n_holdout_samples"] == 1


def test_only_rank_zero_writes(runs):
    out, ranks, _, _ = runs
    assert (out / "saved-by-rank0" / "model.safetensors").is_file()
    assert not (out / "saved-by-rank1").exists()
    assert all(r["shared_complete"] for r in ranks)  # the barrier: complete when any rank returns
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_shard_bounds_tile_the_rows(monkeypatch):
    for n in (1, 2, 5, 8, 13):
        for w in (1, 2, 3, 4):
            spans = []
            for r in range(w):
                monkeypatch.setattr(distributed, "rank", lambda r=r: r)
                monkeypatch.setattr(distributed, "world_size", lambda w=w: w)
                spans.append(distributed.shard_bounds(n, allow_empty=True))
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(hi - lo for lo, hi in spans) - min(hi - lo for lo, hi in spans) <= 1
