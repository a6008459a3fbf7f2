"""Unstructured pruning with uniform / OWL / MRP allocation: targets, masks, trajectory, bad input."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from gradmap import GradmapError, SparsifyResult, get_adapter
from gradmap.sparsity import sparsify
from gradmap.sparsity.mrp import mrp_allocate
from gradmap.sparsity.owl import outlier_ratio, owl_allocation
from gradmap.sparsity.sparsify import magnitude_scores, prune_rows_, wanda_scores
from tiny import random_ids, tiny_model

N = 5
S = 0.6
M_SMALL = 2.0  # random tiny weights have no 5x outliers; M = 2 makes D differ between blocks


def _calib():
    return random_ids(4, 20, seed=7)


def _dense_and_sparse(family="llama", sparsity=S, allocation="uniform", score="wanda", **opts):
    dense = tiny_model(family, N, dtype=torch.float64)
    sparse = copy.deepcopy(dense)
    result = sparsify(sparse, _calib(), sparsity, allocation, score, batch_size=3, progress=False, **opts)
    return dense, sparse, result


def _linears(model, pos):
    return get_adapter(model).linear_modules(pos)


def _norms_by_forward(model, pos, calib):
    """‖X_j‖₂ of block `pos`'s linear inputs, from a plain full-model forward (independent oracle)."""
    sq, handles = {}, []
    for name, lin in _linears(model, pos).items():
        def hook(m, args, name=name):
            x = args[0].reshape(-1, m.in_features).double()
            sq[name] = sq.get(name, 0) + x.square().sum(0)
        handles.append(lin.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=calib, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: v.sqrt() for k, v in sq.items()}


def _assert_lowest_per_row(weight_sparse, scores, target):
    zero = weight_sparse == 0
    rows, cols = zero.shape
    per_row = zero.sum(1)
    k = round(target * rows * cols)
    assert int(per_row.sum()) == k
    assert int(per_row.max() - per_row.min()) <= 1
    big = torch.finfo(scores.dtype).max
    max_zeroed = torch.where(zero, scores, torch.full_like(scores, -1.0)).amax(1)
    min_kept = torch.where(zero, torch.full_like(scores, big), scores).amin(1)
    assert bool((max_zeroed <= min_kept * (1 + 1e-9)).all())


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2", "phi3"])
@pytest.mark.parametrize("allocation", ["uniform", "owl", "mrp"])
@pytest.mark.parametrize("score", ["wanda", "magnitude", "sparsegpt"])
def test_overall_sparsity_hits_target(family, allocation, score):
    dense, sparse, r = _dense_and_sparse(family, S, allocation, score, outlier_m=M_SMALL)
    assert isinstance(r, SparsifyResult)
    assert abs(r.overall_sparsity - S) <= 1e-3
    zeros = sum(int((l.weight == 0).sum()) for p in range(N) for l in _linears(sparse, p).values())
    assert r.overall_sparsity == pytest.approx(zeros / sum(r.block_params), abs=0)
    # embeddings, LM head and norms are untouched
    dense_sd, sparse_sd = dense.state_dict(), sparse.state_dict()
    for key in dense_sd:
        if ".layers." not in key or "norm" in key:
            assert torch.equal(dense_sd[key], sparse_sd[key]), key
    assert set(r.timings) >= {"allocation_pass", "pruning_pass", "mrp_loop", "total"}
    assert len(r.block_redundancy) == N and r.pattern is None
    json.dumps(r.to_dict())


@pytest.mark.parametrize("allocation", ["uniform", "owl"])
def test_wanda_zeros_are_lowest_scores_of_each_row_with_sequential_norms(allocation):
    """Block ℓ's norms come from a forward where blocks < ℓ are already pruned and ℓ is dense."""
    dense, sparse, r = _dense_and_sparse("llama", S, allocation, "wanda", outlier_m=M_SMALL)
    calib = _calib()
    hybrid = copy.deepcopy(dense)
    for pos in range(N):
        norms = _norms_by_forward(hybrid, pos, calib)
        for name, lin in _linears(hybrid, pos).items():
            w_sparse = _linears(sparse, pos)[name].weight
            scores = wanda_scores(lin.weight, norms[name]).double()
            _assert_lowest_per_row(w_sparse, scores, r.block_targets[pos])
            lin.weight.data.copy_(w_sparse)  # block pos is now pruned for the next block's norms


@pytest.mark.parametrize("allocation", ["uniform", "owl", "mrp"])
def test_magnitude_zeros_are_lowest_magnitudes_of_each_row(allocation):
    dense, sparse, r = _dense_and_sparse("qwen2", 0.5, allocation, "magnitude", outlier_m=M_SMALL)
    for pos in range(N):
        for name, lin in _linears(dense, pos).items():
            w = _linears(sparse, pos)[name].weight
            _assert_lowest_per_row(w, magnitude_scores(lin.weight).double(), r.block_targets[pos])
            nz = w != 0
            assert torch.equal(w[nz], lin.weight[nz])  # kept weights are unchanged


def test_owl_allocation_from_dense_outlier_ratios():
    dense, sparse, r = _dense_and_sparse("gemma2", S, "owl", "wanda", outlier_m=M_SMALL, owl_lambda=0.05)
    calib = _calib()
    ratios = []
    for pos in range(N):
        norms = _norms_by_forward(dense, pos, calib)  # OWL measures D on the dense model
        scores = [wanda_scores(l.weight, norms[n]) for n, l in _linears(dense, pos).items()]
        ratios.append(outlier_ratio(scores, M_SMALL))
    assert r.outlier_ratios == pytest.approx(ratios, abs=1e-6)
    assert len(set(round(d, 6) for d in ratios)) > 1
    t = torch.tensor(r.block_targets, dtype=torch.float64)
    assert float(t.mean()) == pytest.approx(S, abs=1e-12)
    assert float(t.max() - t.min()) == pytest.approx(0.1, abs=1e-12)  # span 2λ
    for i in range(N):
        for j in range(N):
            if ratios[i] > ratios[j] + 1e-9:
                assert r.block_targets[i] < r.block_targets[j]  # more outliers -> less sparsity
    assert r.block_sparsity == pytest.approx(r.block_targets, abs=2e-3)


def test_owl_allocation_formula_and_equal_ratios():
    assert owl_allocation([0.1, 0.1, 0.1], 0.7) == [0.7, 0.7, 0.7]
    a = owl_allocation([0.0, 0.5, 1.0], 0.5, lam=0.1)
    assert a == pytest.approx([0.6, 0.5, 0.4], abs=1e-12)
    with pytest.raises(GradmapError, match="owl_lambda"):
        owl_allocation([0.0, 0.0, 1.0], 0.95, lam=0.1)


def test_mrp_trajectory_raises_one_block_per_step_and_stops_at_target():
    delta, step, cap = 0.1, 0.01, 0.12
    dense, sparse, r = _dense_and_sparse("llama", S, "mrp", "wanda", outlier_m=M_SMALL,
                                         mrp_delta=delta, mrp_step=step, mrp_cap=cap)
    alloc = [S - delta] * N
    assert len(r.trajectory) > 0
    for i, st in enumerate(r.trajectory):
        p = st["block"]
        assert st["step"] == i
        assert st["sparsity"] == pytest.approx(alloc[p] + st["increment"], abs=1e-12)
        assert 0 < st["increment"] <= step + 1e-12
        if i < len(r.trajectory) - 1:  # only the last step (or one hitting the cap) is partial
            assert st["increment"] == pytest.approx(step) or st["sparsity"] == pytest.approx(S + cap)
        alloc[p] = st["sparsity"]
    assert alloc == pytest.approx(r.block_targets, abs=1e-12)
    assert abs(r.trajectory[-1]["overall"] - S) <= 1e-3
    assert r.trajectory[-1]["overall"] == pytest.approx(r.overall_sparsity, abs=1e-12)
    assert abs(r.overall_sparsity - S) <= 1e-3
    for s in r.block_targets:
        assert S - cap - 1e-12 <= s <= S + cap + 1e-12
    assert r.block_sparsity == pytest.approx(r.block_targets, abs=2e-3)
    assert max(r.block_targets) > S  # the loop moved some blocks above S


def test_mrp_loop_picks_most_redundant_block_and_respects_caps():
    params = [100, 100, 200, 100]
    base = [0.9, 0.5, 0.7, 0.6]
    alloc = [0.3] * 4

    def prune_block(p, s):
        alloc[p] = s
        return round(s * params[p])

    def redundancy(p):  # more pruning -> less redundancy left, so the choice changes over time
        return base[p] - 0.8 * (alloc[p] - 0.3)

    final, steps = mrp_allocate(params, [30, 30, 60, 30], [0.3] * 4, 0.4, prune_block, redundancy,
                                step=0.05, cap=0.15, slack=1)
    replay = [0.3] * 4
    for st in steps:
        eligible = [p for p in range(4) if replay[p] < 0.55 - 1e-12]
        reds = {p: base[p] - 0.8 * (replay[p] - 0.3) for p in eligible}
        assert st.block == max(eligible, key=lambda p: (reds[p], -p))
        assert st.redundancy == pytest.approx(reds[st.block])
        replay[st.block] = st.sparsity
    assert final == pytest.approx(replay)
    assert all(0.25 - 1e-12 <= s <= 0.55 + 1e-12 for s in final)
    assert max(final) == pytest.approx(0.55)  # block 0 hit the upper cap and others took over
    total = sum(round(s * n) for s, n in zip(final, params))
    assert abs(total - 0.4 * sum(params)) <= 1
    assert steps[-1].increment < 0.05  # the last step is partial


def test_prune_rows_exact_count_and_ties():
    w = torch.arange(1.0, 13.0).reshape(3, 4)
    prune_rows_(w, magnitude_scores(w), 5)  # 2, 2, 1 zeros: the extra goes to the first rows
    assert (w == 0).sum(1).tolist() == [2, 2, 1]
    assert w[0].tolist() == [0, 0, 3, 4] and w[2].tolist() == [0, 10, 11, 12]


def test_bad_input_raises_and_leaves_model_untouched():
    model = tiny_model("llama", 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = random_ids(2, 8)
    cases = [
        (dict(sparsity=0.0), "strictly between 0 and 1"),
        (dict(sparsity=1.0), "strictly between 0 and 1"),
        (dict(sparsity=-0.2), "strictly between 0 and 1"),
        (dict(sparsity=True), "strictly between 0 and 1"),
        (dict(allocation="lamp"), "unknown allocation 'lamp'; choose one of uniform, owl, mrp"),
        (dict(score="obs"), "unknown score 'obs'; choose one of wanda, magnitude, sparsegpt"),
        (dict(pattern="4:2", sparsity=None), "pattern must be 'N:M' with 0 < N < M"),
        (dict(pattern="2-4", sparsity=None), "pattern must be 'N:M'"),
        (dict(pattern="2:4", sparsity=0.7), "drop sparsity or pass sparsity=0.5"),
        (dict(pattern="2:4", sparsity=None), "allocation='mrp' cannot apply"),
        (dict(pattern="1:3", sparsity=None, allocation="uniform"), "multiple of 3"),
        (dict(mrp_delta=0.3, mrp_cap=0.2), "make mrp_delta <= mrp_cap"),
        (dict(mrp_cap=-0.1), "mrp_cap"),
        (dict(mrp_step=0.0), "mrp_step"),
        (dict(outlier_m=0), "outlier_m"),
        (dict(owl_lamda=0.1), "unknown option"),
        (dict(batch_size=0), "batch_size"),
    ]
    for kwargs, msg in cases:
        args = dict(sparsity=0.5, allocation="mrp", score="wanda", progress=False) | kwargs
        with pytest.raises(GradmapError, match=msg.replace("(", r"\(")):
            sparsify(model, calib, **args)
    with pytest.raises(GradmapError, match="needs calibration data"):
        sparsify(model, None, 0.5, "owl", "magnitude")
    # OWL's band leaves [0, 1]: detected after the dense pass, before any weight changes
    with pytest.raises(GradmapError, match="lower owl_lambda"):
        sparsify(model, random_ids(4, 20), 0.97, "owl", "wanda", outlier_m=M_SMALL, owl_lambda=0.2,
                 progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(GradmapError, match="not supported"):
        sparsify(gpt2, calib, 0.5, "uniform", "magnitude")


def test_uniform_magnitude_needs_no_calibration():
    model = tiny_model("mistral", 3)
    r = sparsify(model, None, 0.5, "uniform", "magnitude")
    assert r.block_sparsity == [0.5, 0.5, 0.5] and r.options["calibration_shape"] is None
    r = sparsify(model, None, 0.6, "mrp", "magnitude", progress=False, mrp_step=0.05)  # R from |W| alone
    assert abs(r.overall_sparsity - 0.6) <= 1e-3 and len(r.trajectory) > 0
    with pytest.raises(GradmapError, match="needs calibration data"):
        sparsify(model, None, 0.5, "uniform", "sparsegpt")


def test_prune_rows_re_pruning_is_nested_and_equals_direct_pruning():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(7, 13, generator=g, dtype=torch.float64)
    step, direct = w0.clone(), w0.clone()
    assert prune_rows_(step, magnitude_scores(step), 30) == 30
    first = step == 0
    assert prune_rows_(step, magnitude_scores(step), 50) == 50
    assert bool((step == 0)[first].all())  # earlier zeros are kept
    prune_rows_(direct, magnitude_scores(direct), 50)
    assert torch.equal(step, direct)


class _CharTokenizer:
    """Offline stand-in for a tokenizer: one id per character, inside the tiny vocabulary."""

    def __call__(self, text, verbose=False):
        return {"input_ids": [3 + ord(c) % 90 for c in text]}

    def save_pretrained(self, path):
        pass


def _cli(monkeypatch, argv, loaded):
    from gradmap.cli import app as cli
    from gradmap.core import models

    def fake_load(name, dtype=None, device="cpu"):
        loaded.append(name)
        return tiny_model("llama", 4), _CharTokenizer()
    monkeypatch.setattr(models, "load_model", fake_load)
    return cli.main(["sparsify", *argv])


def test_cli_validates_before_loading(monkeypatch, tmp_path, capsys):
    loaded = []
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert _cli(monkeypatch, ["--model", "m", "--out", str(tmp_path / "busy")], loaded) == 2
    assert "not empty" in capsys.readouterr().err
    assert _cli(monkeypatch, ["--model", "m", "--out", str(tmp_path / "o"), "--sparsity", "1.5"], loaded) == 2
    assert "strictly between 0 and 1" in capsys.readouterr().err
    assert _cli(monkeypatch, ["--model", "m", "--out", str(tmp_path / "o"), "--allocation", "x"], loaded) == 2
    assert "unknown allocation" in capsys.readouterr().err
    assert loaded == [] and not (tmp_path / "o").exists()


def test_cli_writes_standard_checkpoint_report_and_plot(monkeypatch, tmp_path, data_dir):
    out = tmp_path / "sparse"
    argv = ["--model", "tiny", "--out", str(out), "--sparsity", "0.5", "--allocation", "mrp",
            "--n-samples", "4", "--seq-len", "16", "--batch-size", "2", "--no-progress", "--outlier-m", "2"]
    assert _cli(monkeypatch, argv, []) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["allocation"] == "mrp" and report["calibration"]["n_samples"] == 4
    assert abs(report["overall_sparsity"] - 0.5) <= 1e-3 and len(report["trajectory"]) > 0
    assert (out / "sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    a = get_adapter(reloaded)
    zeros = sum(int((l.weight == 0).sum()) for p in range(a.num_layers) for l in a.linear_modules(p).values())
    assert zeros / sum(report["block_params"]) == pytest.approx(report["overall_sparsity"], abs=0)


def _groups_nonzero(weight, m):
    rows, cols = weight.shape
    return (weight.reshape(rows, cols // m, m) != 0).sum(2)


@pytest.mark.parametrize("score", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_is_exact_in_every_pruned_matrix(score, pattern):
    n, m = map(int, pattern.split(":"))
    dense = tiny_model("qwen2", N, dtype=torch.float64)
    sparse = copy.deepcopy(dense)
    r = sparsify(sparse, _calib(), score=score, pattern=pattern, batch_size=3, progress=False)
    assert r.pattern == pattern and r.allocation == "uniform" and r.target_sparsity == 0.5
    assert r.overall_sparsity == 0.5
    for pos in range(N):
        for name, lin in _linears(sparse, pos).items():
            assert bool((_groups_nonzero(lin.weight, m) == n).all()), (pos, name)
            if score == "magnitude":  # the zeros are the M - N smallest of each group
                w0 = _linears(dense, pos)[name].weight.abs()
                rows, cols = w0.shape
                g0 = w0.reshape(rows, cols // m, m)
                zero = (lin.weight == 0).reshape(rows, cols // m, m)
                big = torch.finfo(w0.dtype).max
                assert bool((torch.where(zero, g0, -1.0).amax(2)
                             <= torch.where(zero, big, g0).amin(2)).all())
    json.dumps(r.to_dict())


def test_cli_pattern_writes_exact_checkpoint_and_report(monkeypatch, tmp_path, data_dir):
    out = tmp_path / "nm"
    argv = ["--model", "tiny", "--out", str(out), "--pattern", "2:4", "--score", "sparsegpt",
            "--n-samples", "4", "--seq-len", "16", "--batch-size", "2", "--no-progress"]
    assert _cli(monkeypatch, argv, []) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pattern"] == "2:4" and report["allocation"] == "uniform"
    assert report["target_sparsity"] == 0.5 and "redundancy_std" in report
    a = get_adapter(AutoModelForCausalLM.from_pretrained(out))
    for p in range(a.num_layers):
        for lin in a.linear_modules(p).values():
            assert bool((_groups_nonzero(lin.weight, 4) <= 2).all())
    assert _cli(monkeypatch, ["--model", "t", "--out", str(tmp_path / "x"), "--pattern", "2:4",
                              "--allocation", "owl"], []) == 2
