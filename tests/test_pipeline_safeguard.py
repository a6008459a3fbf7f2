"""Issue 24: magnitude compensation's scale on post-norm families, and the pipeline safeguard.

Models are tiny but "realistic" in the ways real checkpoints differ from random inits: norm
scales far from 1, a channel that the embedding and the first layer barely write, a massive
activation born in an early layer, and a few Adam steps on a Markov chain so the loss means
something (a random model predicts near-uniformly and nothing can hurt it much).
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from gradmap import fast_prune, get_adapter, remove_layers
from gradmap.prune.compensation.fold import fold_residual_scale_
from gradmap.prune.compensation.magnitude import MagnitudeCompensation
from gradmap.prune.safeguard import split_holdout
from gradmap.runtime.loss import next_token_loss_sum
from test_compensation import drive, markov_ids
from tiny import FAMILIES, tiny_model

DEAD, MASSIVE = 5, 3  # channels


def realistic_model(family: str, steps: int = 40, seed: int = 1):
    model = tiny_model(family, 6, seed=seed)
    offset = get_adapter(model).norm_offset
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:  # effective scales in [0.5, 4.5]
                p.copy_(torch.rand(p.shape, generator=g) * 4.0 + 0.5 - offset)
        ad = get_adapter(model)
        ad.embed_tokens.weight[:, DEAD].mul_(1e-3)
        for pos in (0, 1):
            parts = ad.parts(pos)
            for post, out in ((parts.attn_post_norm, parts.attn_out), (parts.mlp_post_norm, parts.mlp_down)):
                if post is not None:
                    post.weight[DEAD] = 1e-3 - offset if pos == 0 else post.weight[DEAD]
                    post.weight[MASSIVE] = (30.0 - offset) if pos == 1 else post.weight[MASSIVE]
                else:
                    out.weight[DEAD].mul_(1e-3 if pos == 0 else 1.0)
                    out.weight[MASSIVE].mul_(30.0 if pos == 1 else 1.0)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = markov_ids(64, 32, 5)
    for step in range(steps):
        b = data[(step * 8) % 64:(step * 8) % 64 + 8]
        loss = next_token_loss_sum(model, b) / b[:, 1:].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def mean_loss(model, ids) -> float:
    with torch.no_grad():
        return float(next_token_loss_sum(model, ids)) / ids[:, 1:].numel()


@pytest.fixture(scope="module")
def gemma3():
    return realistic_model("gemma3_text")


def test_ratio_statistic_overshoots_where_least_squares_does_not(gemma3):
    """The mechanism: after an early layer goes, the per-channel magnitude ratio is far above the
    best scale (the removed layer writes across its input, and a near-dead input channel or a
    massive activation dominates the mean of ratios); the least-squares scale is not."""
    calib, val = markov_ids(24, 32, 0), markov_ids(16, 32, 1)
    got, layer = {}, 1
    for statistic in ("ratio", "lsq"):
        m = copy.deepcopy(gemma3)
        ctx = drive(m, calib, [layer], [MagnitudeCompensation(statistic=statistic)])
        got[statistic] = (ctx.result.compensation_report["magnitude"]["scales"], mean_loss(m, val))
    plain = copy.deepcopy(gemma3)
    remove_layers(plain, [layer])
    best = min((mean_loss(_scaled(gemma3, layer, s), val), s) for s in (0.6, 0.8, 1.0, 1.2, 1.5, 2.0))
    s_ratio, s_lsq = got["ratio"][0][layer], got["lsq"][0][layer]
    assert s_ratio > 1.4 and abs(s_lsq - best[1]) < abs(s_ratio - best[1])
    # the ratio's scale makes the model worse than no compensation; the least-squares one far less so
    assert got["ratio"][1] > mean_loss(plain, val) + 0.05
    assert got["lsq"][1] < got["ratio"][1] - 0.05


def _scaled(model, layer, s):
    m = copy.deepcopy(model)
    remove_layers(m, [layer])
    fold_residual_scale_(get_adapter(m), layer, s)
    return m


PIPELINES = {
    "magnitude-lsq": dict(metric="block-influence", schedule="one-shot",
                          compensation=lambda: MagnitudeCompensation(statistic="lsq")),
    "magnitude": dict(metric="block-influence", schedule="one-shot", compensation="magnitude"),
    "magnitude+replaceme": dict(metric="block-influence", schedule="one-shot", compensation=["magnitude", "replaceme"]),
    "gradmap+projection": dict(metric="gradmap", schedule="one-shot", compensation="projection"),
    "default": dict(),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_no_pipeline_ends_above_the_plain_removal_on_held_out_rows(family):
    """With the safeguard (the default), every shipped pipeline's held-out loss is at most that of
    the same layers removed with no compensation, measured here independently of its report."""
    dense = realistic_model(family)
    calib = markov_ids(16, 32, 2)
    _, hold = split_holdout(calib, 0.125)
    for name, cfg in PIPELINES.items():
        cfg = dict(cfg)
        if callable(cfg.get("compensation")):
            cfg["compensation"] = cfg["compensation"]()
        m = copy.deepcopy(dense)
        r = fast_prune(m, calib, 2, protect_first=1, protect_last=1, progress=False, **cfg)
        plain = copy.deepcopy(dense)
        remove_layers(plain, r.removed_layers)
        got, base = mean_loss(m, hold), mean_loss(plain, hold)
        assert got <= base + 1e-9, f"{family} {name}: held-out loss {got:.4f} above the plain removal's {base:.4f}"
        assert r.safeguard["plain_removal_loss"] == pytest.approx(base, rel=1e-5), name
        assert r.safeguard["final_loss"] == pytest.approx(got, rel=1e-5), name
        assert r.options["n_holdout"] == hold.shape[0] and r.options["n_calib"] == calib.shape[0] - hold.shape[0]


def test_reverted_stage_is_reported_logged_and_leaves_the_plain_weights(gemma3, caplog):
    """A stage that raises the held-out loss is undone: weights back at their plain-removal values,
    the report and the summary line say so, and the log warns."""
    calib = markov_ids(24, 32, 0)
    m = copy.deepcopy(gemma3)
    with caplog.at_level(logging.WARNING, logger="gradmap.prune.safeguard"):
        r = fast_prune(m, calib, 1, metric="block-influence", compensation=MagnitudeCompensation(statistic="ratio"),
                       schedule="one-shot", protect_first=1, protect_last=3, progress=False)
    assert r.safeguard["reverted"] == ["magnitude"]
    (stage,) = r.safeguard["stages"]
    assert stage["stage"] == "removals" and not stage["kept"] and stage["loss_with"] > stage["loss_before"]
    assert any("magnitude" in rec.getMessage() and "reverted" in rec.getMessage() for rec in caplog.records)
    assert any(line.startswith("magnitude: reverted by the pipeline safeguard") for line in r.compensation_summary())
    plain = copy.deepcopy(gemma3)
    remove_layers(plain, r.removed_layers)
    for (name, a), (_, b) in zip(m.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name
    assert r.to_dict()["safeguard"]["reverted"] == ["magnitude"]


def test_safeguard_off_and_single_row_and_bad_options():
    model = tiny_model("llama", 5, seed=2)
    calib = markov_ids(8, 16, 0)
    r = fast_prune(copy.deepcopy(model), calib, 1, compensation="magnitude", safeguard=False, progress=False)
    assert r.safeguard == {} and r.options["n_calib"] == 8 and r.options["n_holdout"] == 0
    r = fast_prune(copy.deepcopy(model), calib[:1], 1, compensation="magnitude", progress=False)
    assert "skipped" in r.safeguard and r.options["n_calib"] == 1
    assert any(line.startswith("safeguard: not run") for line in r.compensation_summary())
    r = fast_prune(copy.deepcopy(model), calib, 1, compensation="none", progress=False)
    assert r.safeguard == {} and r.options["n_calib"] == 8  # nothing to check: every row is used
    from gradmap import GradmapError
    with pytest.raises(GradmapError, match="holdout"):
        fast_prune(copy.deepcopy(model), calib, 1, compensation="magnitude", holdout=1.5, progress=False)
    with pytest.raises(GradmapError, match="safeguard must be True or False"):
        fast_prune(copy.deepcopy(model), calib, 1, compensation="magnitude", safeguard="no", progress=False)
    with pytest.raises(GradmapError, match="statistic"):
        MagnitudeCompensation(statistic="mean")


@pytest.mark.parametrize("order", ["as shipped", "reversed"])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_default_keeps_the_candidate_with_the_lower_held_out_loss(family, order, monkeypatch):
    """"auto" leaves the model exactly as the chosen candidate run alone would (both when that is
    the last candidate run and when it must be restored), keeps the first candidate unless the
    other's per-row held-out gain has a paired t above SWITCH_T, and reports every candidate."""
    from gradmap.prune import auto, pipeline
    from gradmap.experiments.methods import parse_method
    cands = pipeline.CANDIDATES if order == "as shipped" else tuple(reversed(pipeline.CANDIDATES))
    monkeypatch.setattr(auto, "CANDIDATES", cands)
    dense = realistic_model(family)
    calib = markov_ids(16, 32, 2)
    m = copy.deepcopy(dense)
    r = fast_prune(m, calib, 2, progress=False)
    rows = r.options["auto"]["candidates"]
    assert [row["pipeline"] for row in rows] == [pipeline.pipeline_name(c) for c in cands]
    _, hold = split_holdout(calib, 0.125)
    models, per_row = {}, {}
    for row in rows:
        alone = copy.deepcopy(dense)
        ra = fast_prune(alone, calib, 2, progress=False, **parse_method(row["pipeline"]).prune_kwargs())
        assert ra.safeguard["final_loss"] == pytest.approx(row["holdout_loss"], rel=1e-9)
        assert ra.removed_layers == row["removed_layers"]
        models[row["pipeline"]] = alone
        per_row[row["pipeline"]] = [mean_loss(alone, hold[i:i + 1]) for i in range(hold.shape[0])]
    first, other = rows[0]["pipeline"], rows[1]["pipeline"]
    d = torch.tensor(per_row[first], dtype=torch.float64) - torch.tensor(per_row[other], dtype=torch.float64)
    sd = float(d.std())
    t = float(d.mean() / (sd / d.numel() ** 0.5)) if sd > 0 else (float("inf") if float(d.mean()) > 0 else 0.0)
    assert rows[1]["paired_t_vs_first"] == pytest.approx(t, rel=1e-6)
    chosen = other if t > auto.SWITCH_T else first  # the first is kept unless clearly beaten
    assert r.options["auto"]["chosen"] == chosen and r.options["default_pipeline"] is True
    losses = {k: (None, models[k]) for k in models}
    want = losses[chosen][1]
    assert m.config.num_hidden_layers == want.config.num_hidden_layers
    for (k, a), b in zip(m.state_dict().items(), want.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_reverted_stage_keeps_the_dense_path_exact(gemma3):
    """After the safeguard reverts magnitude compensation, compensators that run later (ReplaceMe
    fits to the dense model's outputs) still see the exact dense model: a removed layer whose
    weights were scaled before it went keeps its original values for the dense path."""
    from gradmap.prune import driver
    from gradmap.prune.compensation.dense import DenseSnapshot, dense_view
    calib = markov_ids(24, 32, 0)
    m = copy.deepcopy(gemma3)
    r, ctx = driver._run(m, calib, 2, metric="taylor", schedule="one-shot", progress=False,
                         compensation=MagnitudeCompensation(statistic="ratio"), protect_first=1, protect_last=1)
    assert "magnitude" in r.safeguard["reverted"]
    assert r.removed_layers[1] < r.removed_layers[0]  # the second went from the first one's scaled prefix
    snap = DenseSnapshot.take(type(ctx)(model=copy.deepcopy(gemma3), calib=calib, batch_size=1, result=r))
    with dense_view(ctx, snap) as view, torch.no_grad():
        got = view(calib[:2]).logits
    with torch.no_grad():
        want = gemma3(calib[:2]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
