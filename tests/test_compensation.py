"""Compensators driven through PruneContext directly: statistics, solve, safeguards, placements."""
import copy
import logging

import pytest
import torch

from gradmap import GradmapError, get_adapter, original_layer_ids, remove_layers
from gradmap.prune.compensation import COMPENSATORS, NoCompensation, PruneContext, get_compensator
from gradmap.prune.compensation import projection as projection_mod
from gradmap.prune.compensation.magnitude import MagnitudeCompensation
from gradmap.prune.compensation.projection import ProjectionCompensation, regression_loss, removed_blocks, solve_sites
from gradmap.prune.compensation.replaceme import ReplaceMeCompensation
from gradmap.prune.compensation.dense import DenseSnapshot, dense_view
from gradmap.prune.compensation.sites import Site, SiteMoments
from gradmap.prune.compensation.stats import stream_statistics
from gradmap.ops import Moments, accumulate_moments
from gradmap.core.result import PruneResult
from tiny import VOCAB, random_ids, tiny_model


def drive(model, calib, removed, compensators, batch_size=2, dense_means=None):
    """What fast_prune does around removals (base.py's protocol), for a fixed removal order."""
    ctx = PruneContext(model=model, calib=calib, batch_size=batch_size,
                       result=PruneResult("test", "one-shot", [c.name for c in compensators]),
                       dense_layer_ids=original_layer_ids(model), dense_means=dense_means)
    ctx.snap = DenseSnapshot.take(ctx)      # for the tests' own dense-path statistics
    for c in compensators:
        c.begin(ctx)
    for idx in removed:
        for c in compensators:
            c.before_removal(ctx, idx)
        module = ctx.adapter.layers[ctx.adapter.position_of(idx)]
        remove_layers(model, [idx])
        ctx.removed_modules[idx] = module
        for c in compensators:
            c.after_removal(ctx, idx)
    for c in compensators:
        c.finalize(ctx)
    return ctx


def markov_ids(n, seq, seed):
    """Token sequences from a fixed sparse Markov chain, so a tiny model can learn something."""
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randint(3, VOCAB, (VOCAB, 3), generator=torch.Generator().manual_seed(123))
    ids = torch.empty(n, seq, dtype=torch.long)
    ids[:, 0] = torch.randint(3, VOCAB, (n,), generator=g)
    for t in range(1, seq):
        ids[:, t] = nxt[ids[:, t - 1], torch.randint(0, 3, (n,), generator=g)]
    return ids


@pytest.fixture(scope="module")
def trained():
    """Tiny llama and gemma2 trained for a few Adam steps on the Markov chain (fp64)."""
    out = {}
    for family in ("llama", "gemma2"):
        model = tiny_model(family, 6, dtype=torch.float32, seed=1).train()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for step in range(20):
            ids = markov_ids(8, 16, seed=step)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[family] = model.double().eval()
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- registry ----------------------------------------------------------------------------------

def test_registry_names_and_errors():
    assert set(COMPENSATORS) == {"none", "projection", "magnitude", "replaceme"}
    for name in COMPENSATORS:
        assert get_compensator(name).name == name
    assert isinstance(get_compensator("none"), NoCompensation)
    assert get_compensator("projection", top_m=2, per_gap=True, ridge=1e-2).ridge_grid == (1e-2,)
    with pytest.raises(GradmapError, match="none, projection, magnitude, replaceme"):
        get_compensator("projektion")
    with pytest.raises(GradmapError, match=r"no option\(s\) \['ridge'\].*max_samples"):
        get_compensator("magnitude", ridge=1e-3)
    for name, bad in [("projection", dict(top_m=-1)), ("projection", dict(holdout=1.5)),
                      ("projection", dict(ridge=-1.0)), ("projection", dict(top_m=0)),
                      ("magnitude", dict(max_samples=0)), ("replaceme", dict(ridge_grid=()))]:
        with pytest.raises(GradmapError):
            get_compensator(name, **bad)


def test_hooks_need_begin():
    model = tiny_model("llama", 3)
    ctx = PruneContext(model=model, calib=random_ids(2, 8), batch_size=2, result=PruneResult("t", "one-shot", []))
    with pytest.raises(GradmapError, match="begin"):
        ProjectionCompensation().finalize(ctx)
    with pytest.raises(GradmapError, match="begin"):
        MagnitudeCompensation().before_removal(ctx, 1)


# --- closed-form solve -------------------------------------------------------------------------

def _exact_moments(m, y, t):
    """SiteMoments holding exact fp64 statistics of M, Y, T."""
    d = m.shape[1]
    sm = SiteMoments(Moments(d, d_y=d), Moments(d, want_xtx=False))
    r = t - y
    sm.mr.xtx, sm.mr.xty, sm.mr.count = m.T @ m, m.T @ r, m.shape[0]
    sm.r.sq_x, sm.r.count = (r * r).sum(0), m.shape[0]
    return sm


def _problem(n=40, d=5, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, d, generator=g, dtype=torch.float64)
    if rank is not None:
        m = m[:, :rank] @ torch.randn(rank, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, d, generator=g, dtype=torch.float64)
    t = y + m @ (torch.eye(d, dtype=torch.float64) + 0.5 * torch.randn(d, d, generator=g, dtype=torch.float64)) \
        + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return m, y, t


def _gradient_descent(m, y, t, lam, diagonal):
    """Plain gradient descent with step 1/L, run until the contraction bounds the error by 1e-14."""
    d = m.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    evals = torch.linalg.eigvalsh(m.T @ m) + lam
    lr = 1.0 / (2 * evals.max())
    steps = int(torch.log(torch.tensor(1e-14)) / torch.log(1 - evals.min() / evals.max())) + 1
    p = torch.zeros(d, dtype=torch.float64) if diagonal else torch.zeros(d, d, dtype=torch.float64)
    for _ in range(steps):
        pm = torch.diag(p) if diagonal else p
        grad = 2 * m.T @ (m @ pm + y - t) + 2 * lam * (pm - eye)
        p = p - lr * (grad.diagonal() if diagonal else grad)
    return torch.diag(p) if diagonal else p


@pytest.mark.parametrize("diagonal", [False, True])
def test_closed_form_equals_gradient_descent(diagonal):
    m, y, t = _problem(n=200)
    ridge = 1e-2
    lam = float(ridge * (m * m).sum() / m.shape[1])
    p, status = solve_sites([_exact_moments(m, y, t)], ridge, diagonal)
    assert int(status[0]) == 0
    torch.testing.assert_close(p[0], _gradient_descent(m, y, t, lam, diagonal), rtol=0, atol=1e-9)
    if diagonal:
        assert torch.equal(p[0], torch.diag(p[0].diagonal()))


def test_streamed_fp32_moments_match_exact_solve():
    m, y, t = _problem(n=300, d=6, seed=3)
    sm = SiteMoments(Moments(6, d_y=6), Moments(6, want_xtx=False))
    for k in range(0, 300, 64):       # micro-batches through gradmap.ops
        accumulate_moments(sm.mr, m[k:k + 64], (t - y)[k:k + 64])
        accumulate_moments(sm.r, (t - y)[k:k + 64])
    p_stream, _ = solve_sites([sm], 1e-3)
    p_exact, _ = solve_sites([_exact_moments(m, y, t)], 1e-3)
    torch.testing.assert_close(p_stream, p_exact, rtol=0, atol=2e-5)


def test_regression_loss_from_moments_is_the_direct_loss():
    m, y, t = _problem(seed=5)
    p = torch.eye(5, dtype=torch.float64) + 0.3
    direct = ((m @ p + y - t) ** 2).sum()
    torch.testing.assert_close(regression_loss(p[None], [_exact_moments(m, y, t)])[0], direct, rtol=1e-12, atol=0)


def test_singular_statistics():
    m, y, t = _problem(n=40, d=6, rank=3, seed=2)        # MᵀM has rank 3
    sm = _exact_moments(m, y, t)
    p, status = solve_sites([sm], 1e-3)
    a, b = sm.mr.xtx, sm.mr.xty
    lam = 1e-3 * torch.trace(a) / 6
    assert int(status[0]) == 0 and torch.isfinite(p).all()
    torch.testing.assert_close((a + lam * torch.eye(6, dtype=torch.float64)) @ p[0],
                               b + lam * torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-9)
    p0, status0 = solve_sites([sm], 0.0)                  # no ridge: eigen fallback, least-squares solution
    assert int(status0[0]) == 1 and torch.isfinite(p0).all()
    torch.testing.assert_close(a @ p0[0], b, rtol=0, atol=1e-8)


def test_non_finite_statistics_raise():
    m, y, t = _problem()
    sm = _exact_moments(m, y, t)
    sm.mr.xtx[0, 0] = float("nan")
    with pytest.raises(GradmapError, match="NaN/inf"):
        solve_sites([sm], 1e-3)


# --- shared statistics -------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2"])
def test_dense_view_rebuilds_the_dense_model(family):
    model = tiny_model(family, 6, dtype=torch.float64)
    ids = random_ids(2, 10)
    dense_logits = _logits(model, ids)
    config_before = copy.deepcopy(model.config.to_dict())
    ctx = drive(model, random_ids(4, 10, seed=1), [4, 1, 2], [MagnitudeCompensation()])
    assert ctx.original_params                              # magnitude edited weights
    pruned_logits = _logits(model, ids)
    ids_after = original_layer_ids(model)
    types_after = copy.copy(getattr(model.config, "layer_types", None))
    snap = ctx.snap
    assert snap.per_layer.get("layer_types", None) == config_before.get("layer_types", None)
    with dense_view(ctx, snap):
        assert get_adapter(model).num_layers == 6
        torch.testing.assert_close(_logits(model, ids), dense_logits, rtol=0, atol=0)
    assert original_layer_ids(model) == ids_after == [0, 3, 5]
    assert getattr(model.config, "layer_types", None) == types_after
    for pos, layer in enumerate(get_adapter(model).layers):
        assert all(m.layer_idx == pos for m in layer.modules() if hasattr(m, "layer_idx"))
    torch.testing.assert_close(_logits(model, ids), pruned_logits, rtol=0, atol=0)
    del ctx.removed_modules[2]
    with pytest.raises(GradmapError, match=r"removed layers \[2\]"):
        with dense_view(ctx, snap):
            pass


def test_stream_statistics_match_direct_computation():
    model = tiny_model("llama", 5, dtype=torch.float64)
    dense = copy.deepcopy(model)
    calib = random_ids(3, 9, seed=4)
    ctx = drive(model, calib, [2, 3], [])
    site = Site(1, 3)
    stats = stream_statistics(ctx, ctx.snap, calib, mean_layers=[1], dense_mean_layers=[3], sites=[site])
    with torch.no_grad():      # direct: hidden states of the whole calibration set at once
        cap = {}
        h = get_adapter(model).parts(1).mlp_down.register_forward_hook(lambda _m, _a, o: cap.setdefault("m", o))
        hp = model(calib, output_hidden_states=True).hidden_states
        h.remove()
        hd = dense(calib, output_hidden_states=True).hidden_states
    m = cap["m"].reshape(-1, 32)
    y = hp[2].reshape(-1, 32) - m          # output of kept layer 1 (position 1) minus its MLP add
    r = hd[4].reshape(-1, 32) - y          # dense output of original layer 3
    sm = stats.sites[site]
    torch.testing.assert_close(sm.mr.xtx.double(), m.T @ m, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sm.mr.xty.double(), m.T @ r, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sm.r.sq_x.double(), (r * r).sum(0), rtol=1e-5, atol=1e-4)
    # (the last hidden state HF returns is after the final norm, so compare inner layers only)
    torch.testing.assert_close(stats.pruned_means[1].mean.double(), hp[2].reshape(-1, 32).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.dense_means[3].mean.double(), hd[4].reshape(-1, 32).mean(0), rtol=1e-5, atol=1e-6)
    assert stats.dense_means[3].count == stats.sites[site].mr.count == calib.numel()
    # plain statistics: a graph here would keep every micro-batch's activations alive
    moments = [stats.pruned_means[1], stats.dense_means[3], sm.mr, sm.r]
    assert not any(t.requires_grad for m in moments for t in vars(m).values()
                   if isinstance(t, torch.Tensor))


# --- projection (GradMAP Stage 2) --------------------------------------------------------------

def _fresh_loss(ctx, site, calib):
    """Calibration regression loss of `site` on the model as it is now (identity P on fresh stats)."""
    stats = stream_statistics(ctx, ctx.snap, calib, sites=[site])
    sm = stats.sites[site]
    return float(regression_loss(torch.eye(32, dtype=torch.float64)[None], [sm])[0])


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_projection_never_increases_the_calibration_loss(trained, family):
    model = copy.deepcopy(trained[family])
    calib = markov_ids(6, 24, seed=99)
    comp = ProjectionCompensation(safeguards=False)
    # measure the loss of every kept layer before folding, via a twin run without compensation
    twin = copy.deepcopy(model)
    twin_ctx = drive(twin, calib, [3, 4], [])
    ctx = drive(model, calib, [3, 4], [comp])
    report = ctx.result.compensation_report["projection"]
    assert sorted(ctx.result.shifts) == [0, 1, 2, 5]
    assert ctx.result.shifts[0] == pytest.approx(0.0, abs=1e-6)   # before the cut nothing moved
    (entry,) = report["sites"]
    top = max(ctx.result.shifts, key=ctx.result.shifts.get)
    assert entry["layer"] == entry["target"] == top and entry["folded"]
    site = Site(top, top)
    before, after = _fresh_loss(twin_ctx, site, calib), _fresh_loss(ctx, site, calib)
    assert after < before
    n = calib.numel() * 32
    assert after / n == pytest.approx(entry["train_mse_after"], rel=1e-4)
    assert before / n == pytest.approx(entry["train_mse_before"], rel=1e-4)
    assert entry["diagonal"] == (family == "gemma2")
    assert ctx.original_params           # the dense weights were remembered before the fold


def test_projection_safeguards_pick_ridge_and_keep_only_improvements(trained):
    model = copy.deepcopy(trained["llama"])
    calib = markov_ids(8, 24, seed=7)
    ctx = drive(model, calib, [2, 4], [ProjectionCompensation(top_m=2, per_gap=True)])
    rep = ctx.result.compensation_report["projection"]
    assert rep["n_train_samples"] == 7 and rep["n_holdout_samples"] == 1
    assert {(e["layer"], e["target"]) for e in rep["sites"]} >= {(1, 1), (3, 3)}   # per-gap sites
    for e in rep["sites"]:
        assert e["ridge"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
        improved = e["holdout_mse_after"] < e["holdout_mse_before"]
        if e["folded"]:          # passed both gates
            assert improved and e["holdout_lm_loss_with_fold"] < rep["holdout_lm_loss_before"]
        else:
            assert (e["layer"] in rep["reverted"]) == improved
    assert rep["holdout_lm_loss_after"] <= rep["holdout_lm_loss_before"]


def test_regression_gate_rejects_a_bad_projection(trained, monkeypatch):
    model = copy.deepcopy(trained["llama"])
    calib = markov_ids(8, 24, seed=8)
    twin = copy.deepcopy(model)
    drive(twin, calib, [3], [])

    def bad_solve(a, b, ridge):      # −I flips the MLP output: worse on any data
        return -torch.eye(a.shape[-1], dtype=torch.float64).expand_as(a).clone(), torch.zeros(a.shape[0])
    monkeypatch.setattr(projection_mod, "projection_solve", bad_solve)
    ctx = drive(model, calib, [3], [ProjectionCompensation()])
    rep = ctx.result.compensation_report["projection"]
    assert not any(e["folded"] for e in rep["sites"])
    assert rep["sites"][0]["reason"] == "held-out regression loss did not drop"
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in model.state_dict().items())


def test_lm_gate_reverts_folds_that_hurt_the_heldout_loss(trained, monkeypatch, caplog):
    model = copy.deepcopy(trained["llama"])
    calib = markov_ids(8, 24, seed=9)
    twin = copy.deepcopy(model)
    drive(twin, calib, [3], [])
    real_loss = projection_mod.regression_loss

    def bad_solve(a, b, ridge):
        return -torch.eye(a.shape[-1], dtype=torch.float64).expand_as(a).clone(), torch.zeros(a.shape[0])

    def fooled_loss(p, moments):     # the regression gate is fooled; the LM gate must catch it
        out = real_loss(p, moments)
        return torch.where((p[:, 0, 0] < 0), torch.full_like(out, -1.0), out)
    monkeypatch.setattr(projection_mod, "projection_solve", bad_solve)
    monkeypatch.setattr(projection_mod, "regression_loss", fooled_loss)
    with caplog.at_level(logging.INFO, logger="gradmap"):
        ctx = drive(model, calib, [3], [ProjectionCompensation()])
    rep = ctx.result.compensation_report["projection"]
    (site,) = rep["sites"]
    assert rep["reverted"] == [site["layer"]]
    # a revert is the safeguard working: INFO, never WARNING, with the reason in the summary
    reverts = [r for r in caplog.records if "reverted" in r.getMessage()]
    assert reverts and all(r.levelno == logging.INFO for r in reverts)
    summary = " ".join(ctx.result.compensation_summary())
    assert f"NOT applied at layer {site['layer']} (reverted: held-out LM loss did not drop)" in summary
    assert site["holdout_lm_loss_with_fold"] > rep["holdout_lm_loss_before"]
    assert rep["holdout_lm_loss_after"] == rep["holdout_lm_loss_before"]
    assert site["reason"].startswith("reverted") and not site["folded"]
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in model.state_dict().items())


def test_two_pass_statistics_give_the_same_result(trained):
    calib = markov_ids(6, 24, seed=11)
    reports = []
    for budget in (2 ** 31, 0):      # 0 bytes: shifts first, then only the picked sites
        model = copy.deepcopy(trained["llama"])
        ctx = drive(model, calib, [2, 3], [ProjectionCompensation(max_stat_bytes=budget)])
        reports.append((ctx.result.compensation_report["projection"], ctx.result.shifts, _state(model)))
    (r1, s1, w1), (r2, s2, w2) = reports
    assert (r1["statistics_passes"], r2["statistics_passes"]) == (1, 2)
    assert s1 == pytest.approx(s2, rel=1e-6)
    assert r1["sites"] == r2["sites"]
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-12)


def test_driver_dense_means_replace_the_dense_mean_pass(trained):
    calib = markov_ids(6, 24, seed=12)
    model = copy.deepcopy(trained["llama"])
    means, handles = {}, []
    for o, layer in enumerate(get_adapter(model).layers):
        handles.append(layer.register_forward_hook(
            lambda _m, _a, out, o=o: means.__setitem__(o, out.reshape(-1, 32).mean(0).float())))
    with torch.no_grad():
        model(calib)
    for h in handles:
        h.remove()
    a = drive(copy.deepcopy(model), calib, [3], [ProjectionCompensation()])
    b = drive(model, calib, [3], [ProjectionCompensation()], dense_means=means)
    assert a.result.shifts == pytest.approx(b.result.shifts, rel=1e-4, abs=1e-6)


def test_replaceme_places_one_site_per_block(trained):
    model = copy.deepcopy(trained["llama"])
    calib = markov_ids(6, 24, seed=13)
    ctx = drive(model, calib, [0, 2, 3, 5], [ReplaceMeCompensation(safeguards=False)])
    rep = ctx.result.compensation_report["replaceme"]
    assert [(e["layer"], e["target"]) for e in rep["sites"]] == [(1, 3), (4, 5)]
    assert rep["skipped_blocks_starting_at"] == [0]
    assert not ctx.result.shifts
    for e in rep["sites"]:
        assert e["train_mse_after"] < e["train_mse_before"]
    assert removed_blocks([0, 1, 2, 3, 4, 5], [1, 4]) == [[0], [2, 3], [5]]


def test_nothing_removed_is_a_no_op():
    model = tiny_model("llama", 3)
    before = _state(model)
    ctx = drive(model, random_ids(2, 8), [], [ProjectionCompensation(), ReplaceMeCompensation()])
    assert ctx.result.compensation_report["projection"] == {"skipped": "no layer was removed"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# --- magnitude (Prune&Comp) --------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_magnitude_scale_and_fold(family):
    model = tiny_model(family, 6, tied=True, dtype=torch.float64)
    dense = copy.deepcopy(model)
    calib = random_ids(4, 10, seed=2)
    with torch.no_grad():
        hs = dense(calib, output_hidden_states=True).hidden_states
    e_in, e_out = hs[3].abs().mean((0, 1)), hs[4].abs().mean((0, 1))     # layer 3's input and output
    lsq = float((hs[3] * hs[4]).sum() / hs[3].square().sum())             # argmin_s Σ‖s·h_in − h_out‖²
    ratio = float((e_out / e_in).mean())
    other = copy.deepcopy(model)
    s = drive(other, calib, [3], [MagnitudeCompensation(statistic="lsq")]).result.compensation_report
    assert s["magnitude"]["scales"][3] == pytest.approx(lsq, rel=1e-6) and lsq != pytest.approx(ratio, rel=1e-3)
    ctx = drive(model, calib, [3], [MagnitudeCompensation()])
    s = ctx.result.compensation_report["magnitude"]["scales"][3]
    assert s == pytest.approx(ratio, rel=1e-6)
    emb = get_adapter(model).embed_tokens.weight
    torch.testing.assert_close(emb, s * get_adapter(dense).embed_tokens.weight, rtol=1e-12, atol=0)
    torch.testing.assert_close(ctx.original_params["model.embed_tokens.weight"],
                               get_adapter(dense).embed_tokens.weight, rtol=0, atol=0)
    # layers after the cut untouched; their dense names are kept for the dense path
    for name, p in get_adapter(dense).layers[4].named_parameters():
        assert torch.equal(p, get_adapter(model).layers[3].get_parameter(name))
    assert any(k.startswith("model.layers.2.") for k in ctx.original_params)
    assert not any(k.startswith(("model.layers.4.", "model.layers.5.")) for k in ctx.original_params)


def test_magnitude_then_projection(trained):
    model = copy.deepcopy(trained["llama"])
    calib = markov_ids(6, 24, seed=14)
    ctx = drive(model, calib, [4, 2], [MagnitudeCompensation(max_samples=3), ProjectionCompensation()])
    rep = ctx.result.compensation_report
    assert set(rep["magnitude"]["scales"]) == {4, 2} and rep["magnitude"]["samples"] == 3
    assert rep["projection"]["holdout_lm_loss_after"] <= rep["projection"]["holdout_lm_loss_before"]
    assert ctx.result.timings["compensation_statistics"] > 0 and ctx.result.timings["solve"] > 0
    assert torch.isfinite(_logits(model, calib)).all()


# --- real model --------------------------------------------------------------------------------

def test_projection_on_smollm2(smollm2):
    model, _tok = smollm2
    model = copy.deepcopy(model)
    calib = torch.randint(100, 40000, (4, 48), generator=torch.Generator().manual_seed(0))
    ctx = drive(model, calib, [24, 25, 26], [ProjectionCompensation()])
    rep = ctx.result.compensation_report["projection"]
    assert len(ctx.result.shifts) == 27 and ctx.result.shifts[0] < 1e-5
    assert rep["holdout_lm_loss_after"] <= rep["holdout_lm_loss_before"]
    assert all(e["train_mse_after"] <= e["train_mse_before"] for e in rep["sites"])


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_shared_prefix_shortcut_is_exact(family, monkeypatch):
    """Starting the dense path from the pruned path's state gives the same statistics as a full dense pass."""
    from gradmap.prune.compensation import dense as stats_mod
    from gradmap.prune.compensation import sites as sites_mod
    model = tiny_model(family, 6, dtype=torch.float64)
    calib = random_ids(3, 9, seed=6)
    ctx = drive(model, calib, [3, 5], [])
    assert stats_mod.shared_prefix(ctx, ctx.snap) == 3
    sites = [Site(2, 2), Site(4, 5), Site(1, 1)]
    fast = stream_statistics(ctx, ctx.snap, calib, [0, 4], [0, 4], sites)
    monkeypatch.setattr(sites_mod, "shared_prefix", lambda ctx, snap: 0)
    full = stream_statistics(ctx, ctx.snap, calib, [0, 4], [0, 4], sites)
    for s in sites:
        for a, b in ((fast.sites[s].mr.xtx, full.sites[s].mr.xtx), (fast.sites[s].mr.xty, full.sites[s].mr.xty)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for o in (0, 4):
        torch.testing.assert_close(fast.dense_means[o].sum_x, full.dense_means[o].sum_x, rtol=1e-6, atol=1e-6)


def test_shared_prefix_is_empty_after_an_embedding_edit():
    from gradmap.prune.compensation import dense as stats_mod
    model = tiny_model("llama", 6, dtype=torch.float64)
    ctx = drive(model, random_ids(2, 9), [4], [MagnitudeCompensation()])
    assert "model.embed_tokens.weight" in ctx.original_params
    assert stats_mod.shared_prefix(ctx, ctx.snap) == 0
    ctx.original_params.clear()
    assert stats_mod.shared_prefix(ctx, ctx.snap) == 4
    ctx.original_params["model.layers.2.mlp.down_proj.weight"] = torch.zeros(1)
    assert stats_mod.shared_prefix(ctx, ctx.snap) == 2


def test_per_gap_only_placement(trained):
    model = copy.deepcopy(trained["llama"])
    calib = markov_ids(6, 24, seed=15)
    ctx = drive(model, calib, [2, 4], [ProjectionCompensation(top_m=0, per_gap=True, safeguards=False)])
    rep = ctx.result.compensation_report["projection"]
    assert [(e["layer"], e["target"]) for e in rep["sites"]] == [(1, 1), (3, 3)]
    assert sorted(ctx.result.shifts) == [0, 1, 3, 5]          # shifts are reported whatever the placement
    first = rep["sites"][0]      # nothing was removed before layer 1: its state is already the dense one
    assert first["train_mse_before"] < 1e-6 and first["train_mse_after"] < 1e-6     # fp32 rounding only
    assert rep["sites"][1]["train_mse_before"] > 1e-2


@pytest.mark.parametrize("schedule", ["one-shot", "iterative"])
def test_every_compensation_through_fast_prune(trained, schedule):
    from gradmap.prune.driver import fast_prune
    calib = markov_ids(6, 24, seed=16)
    for comp in ["none", "projection", "magnitude", "replaceme", ["magnitude", "projection"]]:
        model = copy.deepcopy(trained["llama"])
        res = fast_prune(model, calib, 2, metric="block-influence", compensation=comp, schedule=schedule)
        names = [comp] if isinstance(comp, str) else comp
        assert res.compensation == names and len(res.removed_layers) == 2
        assert set(res.compensation_report) == set(names) - {"none"}
        if "projection" in names:
            assert sorted(res.shifts) == original_layer_ids(model)
            assert res.compensation_report["projection"]["holdout_lm_loss_after"] <= \
                res.compensation_report["projection"]["holdout_lm_loss_before"]
        if "magnitude" in names:
            assert set(res.compensation_report["magnitude"]["scales"]) == set(res.removed_layers)
        assert torch.isfinite(_logits(model, calib)).all()
