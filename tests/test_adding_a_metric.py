"""docs/architecture.md "Adding a metric": the metric printed there runs in memory, layer-streamed and
data-parallel (2 gloo processes) with no code beyond the documented block, with the same results."""
from __future__ import annotations

import datetime
import os
import re
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradmap.prune.driver import fast_prune
from tiny import random_ids, tiny_model

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def readme_metric():
    """Execute the documented "Adding a metric" code block; return the class it defines."""
    text = DOC.read_text()
    section = text.split("## Adding a metric", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 30, "the docs promise a metric in at most ~30 lines"
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - our own docs, the point of the test
    return namespace["RelativeUpdate"]


def _prune(offload=None):
    model = tiny_model("llama", n_layers=6, dtype=torch.float64, seed=3)
    res = fast_prune(model, random_ids(4, 12, seed=2), 2, metric=readme_metric()(), compensation="none",
                     batch_size=1, offload=offload, compute_device="cpu" if offload else None)
    return res.removed_layers, res.scores


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    try:
        torch.save(_prune(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_readme_metric_runs_in_memory_streamed_and_data_parallel(tmp_path):
    removed, scores = _prune()
    assert len(removed) == 2 and len(scores) == 2  # iterative: one scoring pass per removal
    s_removed, s_scores = _prune(offload="layer")
    assert s_removed == removed
    for a, b in zip(scores, s_scores):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-12 * abs(a[k]) for k in a)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path / "r")), nprocs=2, join=True)
    for rank in range(2):
        d_removed, d_scores = torch.load(tmp_path / f"r.{rank}", weights_only=True)
        assert d_removed == removed
        for a, b in zip(scores, d_scores):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-12 * abs(a[k]) for k in a)


def test_readme_metric_scores_match_a_direct_computation():
    model = tiny_model("llama", n_layers=4, dtype=torch.float64, seed=3)
    calib = random_ids(3, 10, seed=5)
    res = fast_prune(model, calib, 1, metric=readme_metric()(), compensation="none", schedule="one-shot")
    dense = tiny_model("llama", n_layers=4, dtype=torch.float64, seed=3)
    with torch.no_grad():
        hs = dense(input_ids=calib, output_hidden_states=True).hidden_states
    for i in range(4):
        h_in, h_out = hs[i], hs[i + 1] if i < 3 else None
        if h_out is None:  # the last hidden state HF returns is after the final norm
            continue
        want = ((h_out - h_in).norm(dim=-1) / h_in.norm(dim=-1)).mean().item()
        assert abs(res.scores[0][i] - want) <= 1e-9 * want
