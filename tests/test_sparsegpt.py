"""SparseGPT: the fast blocked solver equals a slow column-by-column OBS loop, beats Wanda's
reconstruction error, and runs under every allocation, N:M, layer streaming and data parallelism."""
from __future__ import annotations

import copy
import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradmap import get_adapter
from gradmap.sparsity import sparsify
from gradmap.sparsity.nm import prune_nm_
from gradmap.sparsity.sparsegpt import sparsegpt_prune_
from gradmap.sparsity.sparsify import prune_rows_, wanda_scores
from tiny import random_ids, tiny_model


def _reference(w, xtx, sparsity, block, nm=None, damp=0.01):
    """Slow OBS: each column with the explicit inverse of the trailing Hessian H[j:, j:]."""
    w, h = w.double().clone(), 2 * xtx.double().clone()
    rows, cols = w.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype)
    inv_diag = [torch.linalg.inv(h[j:, j:])[0, 0] for j in range(cols)]
    total = round(sparsity * rows * cols)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for c1 in range(0, cols, block):
        c2 = min(c1 + block, cols)
        if nm is None:  # the lowest saliencies of the whole block, on the weights updated so far
            sal = torch.stack([w[:, j] ** 2 / inv_diag[j] for j in range(c1, c2)], 1)
            k = round(total * c2 / cols) - round(total * c1 / cols)
            flat = torch.zeros(sal.numel(), dtype=torch.bool)
            flat[sal.reshape(-1).argsort()[:k]] = True
            mask[:, c1:c2] = flat.reshape(rows, c2 - c1)
        for j in range(c1, c2):
            if nm is not None and j % nm[1] == 0:
                n, m = nm
                sal = torch.stack([w[:, i] ** 2 / inv_diag[i] for i in range(j, j + m)], 1)
                for r in range(rows):
                    mask[r, j + sal[r].argsort()[: m - n]] = True
            hinv = torch.linalg.inv(h[j:, j:])
            q = torch.where(mask[:, j], 0.0, w[:, j])
            err = (w[:, j] - q) / hinv[0, 0]
            w[:, j:] -= err[:, None] * hinv[0][None, :]
            w[:, j] = q
    return w


def _layer(rows=12, cols=40, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols ** 0.5
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ (torch.eye(cols, dtype=torch.float64)
                                                                         + 2 * mix)
    x[:, 3] = 0  # a dead input column
    return torch.randn(rows, cols, generator=g, dtype=torch.float64), x


@pytest.mark.parametrize("block,nm", [(16, None), (128, None), (16, (2, 4)), (12, (4, 8))])
def test_fast_solver_equals_column_by_column_obs(block, nm):
    w, x = _layer()
    want = _reference(w, x.T @ x, 0.6, block if nm is None else max(nm[1], block // nm[1] * nm[1]), nm)
    got = w.clone()
    zeros = sparsegpt_prune_(got, x.T @ x, 0.6, nm=nm, block_size=block)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.equal(got == 0, want == 0)
    expect = round(0.6 * w.numel()) if nm is None else w.numel() * (nm[1] - nm[0]) // nm[1]
    assert zeros == int((got == 0).sum()) >= expect  # dead-column zeros are chosen first
    if nm is None:
        assert zeros == expect


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_reconstruction_error_below_wanda_at_the_same_sparsity(seed, nm):
    w, x = _layer(rows=32, cols=64, tokens=400, seed=seed)
    x[:, 3] = torch.randn(400, dtype=torch.float64)  # no dead column: Wanda has no free zeros either
    sgpt, wanda = w.clone(), w.clone()
    sparsegpt_prune_(sgpt, x.T @ x, 0.5, nm=nm)
    scores = wanda_scores(wanda, x.square().sum(0).sqrt()).double()
    prune_rows_(wanda, scores, w.numel() // 2) if nm is None else prune_nm_(wanda, scores, *nm)
    assert int((sgpt == 0).sum()) == int((wanda == 0).sum()) == w.numel() // 2
    err_s = float(torch.linalg.norm(x @ w.T - x @ sgpt.T))
    err_w = float(torch.linalg.norm(x @ w.T - x @ wanda.T))
    assert err_s < err_w, (err_s, err_w)


def _block0_xtx(model, calib):
    xtx, handles = {}, []
    for name, lin in get_adapter(model).linear_modules(0).items():
        def hook(mod, args, name=name):
            a = args[0].reshape(-1, mod.in_features).float()
            xtx[name] = xtx.get(name, 0) + a.T @ a
        handles.append(lin.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    for h in handles:
        h.remove()
    return xtx


@pytest.mark.parametrize("allocation", ["uniform", "owl", "mrp"])
def test_sparsify_with_sparsegpt_hits_the_target_and_reconstructs_block_zero(allocation):
    calib = random_ids(4, 20, seed=7)
    dense = tiny_model("llama", 4, dtype=torch.float64)
    model = copy.deepcopy(dense)
    r = sparsify(model, calib, 0.6, allocation, "sparsegpt", batch_size=3, progress=False, outlier_m=2.0)
    assert abs(r.overall_sparsity - 0.6) <= 1e-3
    assert r.block_sparsity == pytest.approx(r.block_targets, abs=1e-3)
    assert len(r.block_redundancy) == 4 and (allocation != "mrp" or len(r.trajectory) > 0)
    xtx = _block0_xtx(dense, calib)  # block 0's inputs do not depend on any pruning
    for name, lin in get_adapter(dense).linear_modules(0).items():
        want = lin.weight.detach().clone()
        sparsegpt_prune_(want, xtx[name], r.block_targets[0])
        got = get_adapter(model).linear_modules(0)[name].weight
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert not torch.equal(got[got != 0], lin.weight[got != 0])  # kept weights were updated


@pytest.mark.parametrize("allocation", ["uniform", "mrp"])
def test_sparsegpt_streamed_equals_in_memory(allocation):
    base = tiny_model("gemma2", 3, dtype=torch.float64, seed=31)
    calib = random_ids(5, 20, seed=32)
    ref_model, model = copy.deepcopy(base), copy.deepcopy(base)
    ref = sparsify(ref_model, calib, 0.5, allocation, "sparsegpt", batch_size=2, progress=False,
                   mrp_step=0.05)
    got = sparsify(model, calib, 0.5, allocation, "sparsegpt", batch_size=2, progress=False, mrp_step=0.05,
                   offload="layer", compute_device="cpu")
    ref_d, got_d = ref.to_dict(), got.to_dict()
    ref_d.pop("timings"), got_d.pop("timings")
    assert got_d == ref_d
    for (n1, a), (n2, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dp_run():
    model = tiny_model("llama", 3, dtype=torch.float64, seed=0)
    res = sparsify(model, random_ids(6, 16, seed=1), 0.5, "mrp", "sparsegpt", batch_size=2, progress=False,
                   outlier_m=2.0, mrp_step=0.05)
    return res.block_targets, {k: v.clone() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.save(_dp_run(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    targets, state = _dp_run()
    assert ranks[0][0] == ranks[1][0] == pytest.approx(targets, abs=1e-12)
    for key, value in state.items():
        assert torch.equal(ranks[0][1][key], ranks[1][1][key]), key
        # XᵀX summed in fp32 in another order: same masks, weights equal to fp32 rounding
        assert torch.equal(ranks[0][1][key] == 0, value == 0), key
        torch.testing.assert_close(ranks[0][1][key], value, rtol=1e-5, atol=1e-6)
