"""`each_step=True` on projection and ReplaceMe: solve and fold after every removal (issue 14 Part 2)."""
import pytest
import torch

from gradmap import GradmapError, get_adapter, original_layer_ids, remove_layers
from gradmap.core.result import PruneResult
from gradmap.experiments.methods import method_from_result, parse_method
from gradmap.prune.compensation import PruneContext, get_compensator
from gradmap.prune.compensation.projection import ProjectionCompensation
from gradmap.prune.compensation.replaceme import ReplaceMeCompensation
from gradmap.prune.driver import fast_prune
from gradmap.prune.metrics.block_influence import BlockInfluence
from tiny import random_ids, tiny_model

FAMILIES = ["llama", "gemma2"]   # pre-norm (full P into down_proj) and post-FFN norm (diagonal P)


def _model(family, n_layers=6):
    return tiny_model(family, n_layers, dtype=torch.float64, seed=4)


def _calib():
    return random_ids(6, 16, seed=5)


def begin(model, calib, comps):
    ctx = PruneContext(model=model, calib=calib, batch_size=3,
                       result=PruneResult("test", "iterative", [c.name for c in comps]),
                       dense_layer_ids=original_layer_ids(model))
    for c in comps:
        c.begin(ctx)
    return ctx


def remove(ctx, comps, idx):
    """One removal with the hooks around it, as gradmap.prune.driver._remove calls them."""
    for c in comps:
        c.before_removal(ctx, idx)
    module = ctx.adapter.layers[ctx.adapter.position_of(idx)]
    remove_layers(ctx.model, [idx])
    ctx.removed_modules[idx] = module
    for c in comps:
        c.after_removal(ctx, idx)


def drive(model, calib, removed, comps):
    ctx = begin(model, calib, comps)
    for idx in removed:
        remove(ctx, comps, idx)
    for c in comps:
        c.finalize(ctx)
    return ctx


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _sites(entries):
    return [(e["layer"], e["target"]) for e in entries]


def _make(name, **kw):
    return (ProjectionCompensation if name == "projection" else ReplaceMeCompensation)(**kw)


# --- options -------------------------------------------------------------------------------

def test_each_step_is_an_option_off_by_default():
    for name in ("projection", "replaceme"):
        assert get_compensator(name).options()["each_step"] is False
        assert get_compensator(name, each_step=True).options()["each_step"] is True
        with pytest.raises(GradmapError, match="each_step must be True .* got 'yes'"):
            get_compensator(name, each_step="yes")
    with pytest.raises(GradmapError, match="each_step"):
        parse_method("block-influence+replaceme(each_step=1)")


# --- one removal: nothing to do differently ------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES + ["phi3"])
@pytest.mark.parametrize("name", ["projection", "replaceme"])
def test_one_removal_gives_the_finalize_weights(family, name):
    calib = _calib()
    runs = []
    for each_step in (False, True):
        model = _model(family)
        ctx = drive(model, calib, [3], [_make(name, each_step=each_step)])
        runs.append((model, ctx.result))
    (m0, r0), (m1, r1) = runs
    assert _same_weights(m0, m1)
    assert not _same_weights(m0, _model(family))     # something was folded at all
    assert r0.shifts == r1.shifts
    rep0, rep1 = r0.compensation_report[name], r1.compensation_report[name]
    (step,) = rep1["steps"]
    assert step["removed"] == 3 and step["block"] == [3]
    assert [{k: v for k, v in e.items() if k != "step"} for e in step["sites"]] == rep0["sites"]
    assert rep1["sites"] == step["sites"] and rep1["reverted"] == rep0["reverted"]


# --- iterative: the next scoring pass sees the repaired model ------------------------------

def _spy(seen):
    class Spy(BlockInfluence):
        def score(self, run):
            seen.append({k: v.clone() for k, v in run.model.state_dict().items()})
            return super().score(run)
    return Spy()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["projection", "replaceme"])
def test_iterative_rescoring_sees_the_folds(family, name):
    calib = _calib()

    def prune(n, comp, seen=None):
        model = _model(family, 7)
        # safeguard off: "none" and the folding runs must score the same rows
        res = fast_prune(model, calib, n, metric=_spy([] if seen is None else seen), compensation=comp,
                         schedule="iterative", batch_size=3, progress=False, safeguard=False)
        return model, res

    one_folded, r1 = prune(1, _make(name, each_step=True, safeguards=False))
    one_plain, _ = prune(1, "none")
    assert not _same_weights(one_folded, one_plain)
    for each_step, want in ((True, one_folded), (False, one_plain)):
        seen, counted = [], _make(name, each_step=each_step, safeguards=False)
        calls = []
        real = counted._compensate
        counted._compensate = lambda ctx, blocks, report: (calls.append(blocks), real(ctx, blocks, report))
        model, res = prune(3, counted, seen)
        assert len(seen) == 3 and res.removed_layers[0] == r1.removed_layers[0]
        got = seen[1]                # the second scoring pass: after the first removal
        assert got.keys() == want.state_dict().keys()
        assert all(torch.equal(got[k], v) for k, v in want.state_dict().items())
        # one solve per removal, none again in finalize (or one in finalize only)
        assert len(calls) == (3 if each_step else 1)


def test_step_report_and_timings():
    calib = _calib()
    model = _model("llama", 7)
    res = fast_prune(model, calib, 3, metric="block-influence", schedule="iterative", batch_size=3,
                     compensation=ProjectionCompensation(each_step=True, per_gap=True), progress=False)
    rep = res.compensation_report["projection"]
    assert rep["each_step"] is True
    assert [s["removed"] for s in rep["steps"]] == res.removed_layers
    assert [s["step"] for s in rep["steps"]] == [1, 2, 3]
    for s in rep["steps"]:
        assert s["removed"] in s["block"]
        assert set(s["shifts"]) == set(range(7)) - set(res.removed_layers[:s["step"]])   # the kept layers then
        assert all(e["step"] == s["step"] for e in s["sites"])
    assert set(res.shifts).isdisjoint(res.removed_layers)
    assert len(rep["sites"]) == sum(len(s["sites"]) for s in rep["steps"])
    for phase in ("compensation_statistics", "solve"):
        per_step = sum(s["seconds"][phase] for s in rep["steps"])
        assert per_step > 0 and res.timings[phase] == pytest.approx(per_step, rel=1e-9)
    assert res.compensation_summary()[0].startswith("projection: applied at")


# --- a removal that takes an earlier fold with it ------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_removing_the_layer_that_held_the_fold(family):
    calib = _calib()
    dense = _model(family)
    model = _model(family)
    comp = ReplaceMeCompensation(each_step=True, safeguards=False)
    ctx = begin(model, calib, [comp])
    remove(ctx, [comp], 3)                           # block [3]: fold at layer 2, target 3
    folded_2 = {k: v.clone() for k, v in get_adapter(model).layers[2].state_dict().items()}
    dense_2 = get_adapter(dense).layers[2].state_dict()
    assert any(not torch.equal(folded_2[k], dense_2[k]) for k in dense_2)
    remove(ctx, [comp], 2)                           # block [2, 3]: the fold leaves with layer 2
    comp.finalize(ctx)
    rep = ctx.result.compensation_report["replaceme"]
    s1, s2 = rep["steps"]
    assert _sites(s1["sites"]) == [(2, 3)] and s1["sites"][0]["fold_removed_at_step"] == 2
    assert s2["block"] == [2, 3] and _sites(s2["sites"]) == [(1, 3)]
    assert s2["dropped_folds_from_steps"] == [1]
    assert rep["sites"][0]["folded"] is False and "removed at step 2" in rep["sites"][0]["reason"]
    assert rep["sites"][1]["folded"] is True
    # no trace of the dropped fold: the model equals one solve over the merged block, whose dense
    # targets came from layer 2's original weights (not the folded ones it left with)
    twin = _model(family)
    drive(twin, calib, [3, 2], [ReplaceMeCompensation(safeguards=False)])
    assert _same_weights(model, twin)


@pytest.mark.parametrize("family", FAMILIES)
def test_merging_two_blocks_drops_the_inner_fold_and_corrects_the_outer(family):
    calib = _calib()
    model = _model(family)
    ctx = drive(model, calib, [2, 4, 3], [ReplaceMeCompensation(each_step=True, safeguards=False)])
    steps = ctx.result.compensation_report["replaceme"]["steps"]
    assert [_sites(s["sites"]) for s in steps] == [[(1, 2)], [(3, 4)], [(1, 4)]]
    assert [s["block"] for s in steps] == [[2], [4], [2, 3, 4]]
    assert steps[2]["dropped_folds_from_steps"] == [2] and "fold_removed_at_step" not in steps[0]["sites"][0]
    # layer 1 keeps its step-1 fold with a correction on top: not the single solve of finalize
    twin = _model(family)
    drive(twin, calib, [2, 4, 3], [ReplaceMeCompensation(safeguards=False)])
    assert not _same_weights(model, twin)


@pytest.mark.parametrize("family", FAMILIES)
def test_projection_fold_removed_with_its_layer(family):
    calib = _calib()
    model = _model(family)
    comp = ProjectionCompensation(each_step=True, safeguards=False)
    ctx = begin(model, calib, [comp])
    remove(ctx, [comp], 3)
    (site,) = ctx.result.compensation_report["projection"]["steps"][0]["sites"]
    assert site["folded"]
    remove(ctx, [comp], site["layer"])
    comp.finalize(ctx)
    rep = ctx.result.compensation_report["projection"]
    assert rep["steps"][1]["dropped_folds_from_steps"] == [1] and rep["sites"][0]["folded"] is False
    assert site["layer"] not in ctx.result.shifts
    twin = _model(family)
    drive(twin, calib, [3, site["layer"]], [ProjectionCompensation(safeguards=False)])
    assert _same_weights(model, twin)


# --- method strings ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["block-influence+replaceme(each_step=True)@iterative",
                                    "block-influence+magnitude+projection(each_step=True,per_gap=True)@iterative"])
def test_method_string_round_trip_reruns_identically(method):
    calib = _calib()
    model = _model("llama", 7)
    res = fast_prune(model, calib, 2, batch_size=3, progress=False, **parse_method(method).prune_kwargs())
    comp = method.split("+")[-1].split("(")[0]
    assert res.options["compensation_options"][comp]["each_step"] is True
    assert len(res.compensation_report[comp]["steps"]) == 2
    pipeline = method_from_result(res.to_dict())
    assert "each_step=True" in pipeline and pipeline.endswith("@iterative")
    again = _model("llama", 7)
    res2 = fast_prune(again, calib, 2, batch_size=3, progress=False, **parse_method(pipeline).prune_kwargs())
    assert res2.removed_layers == res.removed_layers
    assert _same_weights(model, again)
    assert method_from_result(res2.to_dict()) == pipeline


def test_layer_streaming_folds_the_same_steps():
    calib = _calib()
    runs = []
    for offload in (None, "layer"):
        model = _model("llama", 7)
        res = fast_prune(model, calib, 3, metric="block-influence", schedule="iterative", batch_size=3,
                         compensation=ReplaceMeCompensation(each_step=True), progress=False, offload=offload,
                         compute_device="cpu" if offload else None)
        runs.append((model, res))
    (m0, r0), (m1, r1) = runs
    assert r0.removed_layers == r1.removed_layers and _same_weights(m0, m1)
    assert [_sites(s["sites"]) for s in r0.compensation_report["replaceme"]["steps"]] == \
        [_sites(s["sites"]) for s in r1.compensation_report["replaceme"]["steps"]]
