"""MRP's redundancy has negative feedback, the loop equalises it, and MRP leaves the most uniform redundancy."""
import copy

import pytest
import torch

from gradmap import get_adapter
from gradmap.sparsity import sparsify
from gradmap.sparsity.mrp import mrp_allocate, redundancy_spread, remaining_redundancy
from gradmap.sparsity.sparsify import prune_rows_
from tiny import random_ids, tiny_model


def _synthetic_blocks(n=6, rows=32, cols=64, seed=0):
    """Score tensors with heavy tails of different weight per block (different outlier ratios)."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for b in range(n):
        base = torch.rand(rows, cols, generator=g, dtype=torch.float64)
        tail = torch.rand(rows, cols, generator=g, dtype=torch.float64) < 0.01 * (b + 1)
        blocks.append([torch.where(tail, base * 40, base)])
    return blocks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruning_a_block_lowers_its_redundancy(seed):
    for (scores,) in _synthetic_blocks(seed=seed):
        before = remaining_redundancy([scores], 5.0)
        for s in (0.1, 0.3, 0.5, 0.7):
            prune_rows_(scores, scores, round(s * scores.numel()))
            after = remaining_redundancy([scores], 5.0)
            assert after < before  # strictly: each step prunes non-outliers
            before = after


def test_remaining_redundancy_formula():
    scores = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 30.0]])
    # mean 39/10 = 3.9, threshold 2 × 3.9 = 7.8: 8 kept non-outliers, one zero, one outlier
    assert remaining_redundancy([scores], 2.0) == pytest.approx(0.8)
    assert redundancy_spread([0.5, 0.7, 0.6]) == pytest.approx((0.0816496580927726, 0.2))
    assert redundancy_spread([0.5]) == (0.0, 0.0)


def test_loop_moves_on_and_equalises_redundancy_on_synthetic_blocks():
    blocks = _synthetic_blocks()
    n_params = [b[0].numel() for b in blocks]
    S, delta, step, cap = 0.6, 0.1, 0.01, 0.2
    zeros = [prune_rows_(b[0], b[0], round((S - delta) * b[0].numel())) for b in blocks]

    def prune_block(p, s):
        return prune_rows_(blocks[p][0], blocks[p][0], round(s * n_params[p]))

    final, steps = mrp_allocate(n_params, zeros, [S - delta] * 6, S, prune_block,
                                lambda p: remaining_redundancy(blocks[p], 5.0), step=step, cap=cap,
                                slack=1)
    assert all(st.redundancy_after < st.redundancy for st in steps)  # every step lowers R
    assert len({st.block for st in steps}) == 6                       # the loop visits every block
    assert max(final) < S + cap - 1e-9                                 # no block driven to the cap
    red = [remaining_redundancy(b, 5.0) for b in blocks]
    std, span = redundancy_spread(red)
    assert span <= 2 * step  # uniform redundancy to within about one step
    # blocks with more outliers (larger b) end less sparse: the allocation is non-uniform
    assert final[0] > final[-1] + 0.02


def test_mrp_leaves_the_most_uniform_redundancy_on_a_tiny_model():
    calib = random_ids(4, 20, seed=7)
    dense = tiny_model("llama", 6, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for p, frac in ((1, 0.03), (4, 0.08)):  # random tiny weights have few outliers: give two blocks more
        for lin in get_adapter(dense).linear_modules(p).values():
            w = lin.weight.data
            w[torch.rand(w.shape, generator=g) < frac] *= 8
    spread = {}
    for allocation in ("uniform", "owl", "mrp"):
        r = sparsify(copy.deepcopy(dense), calib, 0.6, allocation, "wanda", batch_size=2, progress=False,
                     outlier_m=2.0, mrp_step=0.005)
        assert len(r.block_redundancy) == 6
        assert (r.redundancy_std, r.redundancy_range) == pytest.approx(redundancy_spread(r.block_redundancy))
        spread[allocation] = (r.redundancy_std, r.redundancy_range)
    assert spread["mrp"][0] < min(spread["uniform"][0], spread["owl"][0]), spread
    assert spread["mrp"][1] < min(spread["uniform"][1], spread["owl"][1]), spread
