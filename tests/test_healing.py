"""`gradmap.heal` and `fast_prune(heal=...)` on tiny random models: each mode lowers the held-out top-K KL
of the plain (folded / merged) model, leaves no extra module, survives save → reload, refuses bad
options before any work, restores the unhealed weights on error and is reproducible with a seed."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny import random_ids, tiny_model
from transformers import AutoModelForCausalLM

import gradmap
from gradmap.core.errors import GradmapError
from gradmap.healing import HEAL_MODES, HealOptions, TeacherTargets, teacher_targets, topk_kl_sum

K = 16
# per-mode learning rates that move a tiny random model (the library defaults suit real models)
LR = {"compensation": 1e-2, "norms+compensation": 1e-2, "lora": 1e-3, "partial": 1e-3}


def _needs(mode: str) -> None:
    if mode == "lora":
        pytest.importorskip("peft", reason="train='lora' needs peft (pip install 'gradmap[heal]')")


def _setup(family: str = "llama", seed: int = 0):
    model = tiny_model(family, n_layers=6, seed=seed)
    calib = random_ids(16, 24, seed=1)
    targets = teacher_targets(model, calib, k=K)
    gradmap.remove_layers(model, [2, 3])
    return model, calib, targets


@torch.no_grad()
def _heldout_kl(model, calib, targets: TeacherTargets, rows=range(14, 16)) -> float:
    """Mean top-K KL per position on rows 14, 15 (the held-out rows of 16 at holdout=0.125), from scratch."""
    rows = list(rows)
    logits = model(input_ids=calib[rows], use_cache=False).logits
    return float(topk_kl_sum(logits, targets.indices[rows], targets.logprobs[rows])) / (len(rows) * calib.shape[1])


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state) -> bool:
    now = model.state_dict()
    return set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)


def _structure(model) -> list[tuple[str, str]]:
    return [(n, type(m).__name__) for n, m in model.named_modules()]


def test_topk_kl_is_zero_for_the_teacher_and_bounded_by_the_full_kl():
    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 40), torch.randn(2, 5, 40)
    top = torch.log_softmax(t, -1).topk(7, -1)
    assert float(topk_kl_sum(t, top.indices, top.values)) == pytest.approx(0.0, abs=1e-6)
    coarse = float(topk_kl_sum(s, top.indices, top.values))
    full = float(torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                            reduction="sum"))
    assert 0 < coarse <= full + 1e-6


@pytest.mark.parametrize("family,mode", [(f, m) for m in HEAL_MODES for f in ("llama",)] +
                         [("gemma2", "compensation"), ("phi3", "partial"), ("qwen3", "lora")] +
                         # the default mode on the other families (Gemma: diagonal maps, post-norms)
                         [(f, "norms+compensation") for f in ("gemma3_text", "qwen2", "mistral", "phi3")])
def test_heal_lowers_heldout_kl_and_leaves_a_plain_model(family, mode, tmp_path):
    _needs(mode)
    model, calib, targets = _setup(family)
    structure, config = _structure(model), model.config.to_dict()
    before = _heldout_kl(model, calib, targets)
    rep = gradmap.heal(model, calib, teacher=targets, train=mode, steps=12, lr=LR[mode], top_k=K, eval_every=3,
                       progress=False)
    after = _heldout_kl(model, calib, targets)
    assert rep.holdout[0]["kl"] == pytest.approx(before, rel=1e-5)
    assert after < before and rep.best_step > 0
    assert rep.holdout_kl_final == pytest.approx(after, rel=1e-4)
    assert _structure(model) == structure and model.config.to_dict() == config
    assert not any(m._forward_hooks for m in model.modules())
    assert rep.tokens == 12 * 4 * 24 and rep.top_k == K and rep.holdout_rows == 2
    assert rep.loss_curve and len(rep.loss_curve) == 12
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert _heldout_kl(reloaded, calib, targets) == pytest.approx(after, rel=1e-5)


def test_compensation_maps_sit_before_each_removed_block():
    model, calib, targets = _setup()
    gradmap.remove_layers(model, [5])  # the tail: no kept layer after it, so no new site
    from gradmap.core.adapter import get_adapter
    from gradmap.healing.trainables import removal_sites
    assert removal_sites(get_adapter(model)) == [1]  # original layer 1, before the removed 2, 3


def test_heal_is_reproducible_with_a_seed():
    _needs("lora")
    runs = []
    for seed in (0, 0, 1):
        model, calib, targets = _setup()
        gradmap.heal(model, calib, teacher=targets, train="lora", steps=4, lr=1e-3, top_k=K, seed=seed,
                     progress=False)
        runs.append(_state(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_a_dense_model_as_teacher_gives_the_cached_targets_result():
    dense = tiny_model("llama", n_layers=6, seed=0)
    model, calib, targets = _setup()
    twin = copy.deepcopy(model)
    a = gradmap.heal(model, calib, teacher=dense, train="compensation", steps=3, top_k=K, progress=False)
    b = gradmap.heal(twin, calib, teacher=targets, train="compensation", steps=3, top_k=K, progress=False)
    assert a.loss_curve == b.loss_curve
    assert _same_state(model, _state(twin))


@pytest.mark.parametrize("kwargs,match", [
    (dict(train="everything"), "not a healing mode"),
    (dict(steps=0), "steps"),
    (dict(lr=-1.0), "lr"),
    (dict(top_k=K + 1), "top_k"),
    (dict(holdout=1.0), "holdout"),
    (dict(train="partial", partial_layers=9), "partial_layers"),
    (dict(warmup=3), "unknown heal option"),
    (dict(teacher=None), "teacher"),
    (dict(on_eval="print"), "on_eval"),
])
def test_bad_options_are_refused_before_any_work(kwargs, match):
    model, calib, targets = _setup()
    state = _state(model)
    kwargs = {"teacher": targets, "top_k": K, **kwargs}
    with pytest.raises(GradmapError, match=match):
        gradmap.heal(model, calib, progress=False, **kwargs)
    assert _same_state(model, state)


@pytest.mark.parametrize("mode", ["norms+compensation", "lora"])
def test_on_eval_sees_the_current_state_at_every_heldout_check(mode):
    # the budget curve of bench/heal_smollm2.py evaluates inside this callback: the model it gets
    # must compute what the state of that step gives once folded / merged, and nothing may leak back
    _needs(mode)
    model, calib, targets = _setup()
    seen = []

    def watch(m, step, kl):
        assert m is model and not m.training and not torch.is_grad_enabled()
        seen.append((step, kl, _heldout_kl(m, calib, targets)))

    rep = gradmap.heal(model, calib, teacher=targets, train=mode, steps=12, lr=LR[mode], top_k=K, eval_every=3,
                       progress=False, on_eval=watch)
    assert [s for s, _, _ in seen] == [0, 3, 6, 9, 12]
    assert [kl for _, kl, _ in seen] == [h["kl"] for h in rep.holdout]
    for _, kl, fresh in seen:
        assert fresh == pytest.approx(kl, rel=1e-4)
    best = [fresh for step, _, fresh in seen if step == rep.best_step][0]
    assert rep.holdout_kl_final == pytest.approx(best, rel=1e-4)
    twin, _, _ = _setup()  # the callback changes nothing: a run without it ends in the same weights
    gradmap.heal(twin, calib, teacher=targets, train=mode, steps=12, lr=LR[mode], top_k=K, eval_every=3,
                 progress=False)
    assert _same_state(model, _state(twin))


def test_a_model_with_no_removal_site_is_refused_for_compensation():
    model = tiny_model("llama", n_layers=4)
    calib = random_ids(4, 12)
    with pytest.raises(GradmapError, match="removal site"):
        gradmap.heal(model, calib, teacher=teacher_targets(model, calib, K), top_k=K, progress=False)


@pytest.mark.parametrize("mode", ["norms+compensation", "lora", "partial"])
def test_an_error_mid_training_leaves_the_unhealed_weights(mode, monkeypatch):
    _needs(mode)
    model, calib, targets = _setup()
    state, structure = _state(model), _structure(model)
    from gradmap.healing import distill
    calls = {"n": 0}
    real = distill.topk_kl_sum

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 12:  # after a few optimiser steps
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(distill, "topk_kl_sum", failing)
    with pytest.raises(KeyboardInterrupt):
        gradmap.heal(model, calib, teacher=targets, train=mode, steps=8, lr=LR[mode], top_k=K, progress=False)
    assert _same_state(model, state) and _structure(model) == structure
    assert not any(m._forward_hooks for m in model.modules())
    assert not any(p.requires_grad and p.grad is not None for p in model.parameters())


def test_an_error_in_the_fold_leaves_the_unhealed_weights(monkeypatch):
    model = tiny_model("llama", n_layers=8)
    calib = random_ids(16, 24, seed=1)
    targets = teacher_targets(model, calib, k=K)
    gradmap.remove_layers(model, [2, 3, 5])  # two sites: the first fold succeeds, the second fails
    state = _state(model)
    from gradmap.healing import trainables
    real, calls = trainables.fold_projection_, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("fold failed")
        return real(*args, **kw)

    monkeypatch.setattr(trainables, "fold_projection_", failing)
    with pytest.raises(RuntimeError, match="fold failed"):
        gradmap.heal(model, calib, teacher=targets, steps=2, lr=1e-2, top_k=K, progress=False)
    assert _same_state(model, state)


def test_fast_prune_heals_with_the_dense_model_as_its_own_teacher():
    model = tiny_model("llama", n_layers=6, seed=0)
    calib = random_ids(32, 24, seed=1)  # random tokens generalise poorly: more rows, a smaller step
    targets = teacher_targets(model, calib, k=K)
    result = gradmap.fast_prune(model, calib, 2, metric="block-influence", compensation="none", progress=False,
                                heal={"train": "compensation", "steps": 12, "lr": 3e-3, "top_k": K,
                                      "eval_every": 3})
    assert model.config.num_hidden_layers == 4 and len(result.removed_layers) == 2
    heal = result.to_dict()["heal"]
    assert heal["train"] == "compensation" and heal["teacher_seconds"] > 0
    assert heal["holdout_kl_final"] < heal["holdout"][0]["kl"]
    assert heal["holdout_kl_final"] == pytest.approx(_heldout_kl(model, calib, targets, range(28, 32)), rel=1e-4)
    assert result.timings["heal"] > 0 and any(line.startswith("heal (compensation)")
                                              for line in result.compensation_summary())


def test_fast_prune_heals_on_heal_data_rows_not_the_calibration_rows():
    model = tiny_model("llama", n_layers=6, seed=0)
    calib, data = random_ids(8, 24, seed=1), random_ids(32, 24, seed=2)
    targets = teacher_targets(model, data, k=K)
    with pytest.raises(GradmapError, match="heal_data= is the text heal= trains on"):
        gradmap.fast_prune(model, calib, 2, heal_data=data, progress=False)
    with pytest.raises(GradmapError, match="at least 2 heal_data rows"):
        gradmap.fast_prune(model, calib, 2, heal="compensation", heal_data=data[:1], progress=False)
    assert model.config.num_hidden_layers == 6
    result = gradmap.fast_prune(model, calib, 2, metric="block-influence", compensation="none", progress=False,
                                heal={"train": "compensation", "steps": 12, "lr": 3e-3, "top_k": K,
                                      "eval_every": 3}, heal_data=data)
    heal = result.to_dict()["heal"]
    assert heal["rows"] == 32 and heal["holdout_rows"] == 4
    assert heal["tokens_x_calibration"] == pytest.approx(12 * 4 * 24 / calib.numel())
    # the held-out KL was measured on the last rows of heal_data, against the dense model's targets there
    assert heal["holdout_kl_final"] == pytest.approx(_heldout_kl(model, data, targets, range(28, 32)), rel=1e-4)
    assert heal["holdout_kl_final"] < heal["holdout"][0]["kl"]


def test_fast_prune_refuses_bad_heal_options_before_pruning():
    model = tiny_model("llama", n_layers=6)
    calib = random_ids(4, 12)
    for heal, match in (("everything", "not a healing mode"), ({"train": "partial", "partial_layers": 5},
                                                               "partial_layers"), (3, "heal must be")):
        with pytest.raises(GradmapError, match=match):
            gradmap.fast_prune(model, calib, 2, metric="block-influence", heal=heal, progress=False)
        assert model.config.num_hidden_layers == 6


def test_heal_options_validate_on_construction():
    assert HealOptions(train="lora").learning_rate == 1e-4
    assert HealOptions(lr=3e-3).as_dict()["lr"] == 3e-3
    with pytest.raises(GradmapError, match="compensation, norms\\+compensation, lora, partial"):
        HealOptions(train="x")


def test_prune_cli_heals_and_saves_a_plain_checkpoint(tmp_path, capsys):
    from tiny_tokenizer import TRAIN_TEXT, tiny_tokenizer

    from gradmap.cli.app import main
    model_dir, text, out = tmp_path / "model", tmp_path / "calib.txt", tmp_path / "pruned"
    tiny_model("llama", n_layers=6, seed=0).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    text.write_text("\n\n".join(TRAIN_TEXT * 8))
    argv = ["prune", "--model", str(model_dir), "--n-prune", "2", "--metric", "block-influence", "--compensation",
            "none", "--calib", str(text), "--n-calib", "8", "--seq-len", "24", "--out", str(out), "--no-progress"]
    assert main(argv + ["--heal-option", "steps=2"]) == 2
    assert "--heal-option needs --heal" in capsys.readouterr().err
    assert main(argv + ["--heal-data", str(text)]) == 2 and not out.exists()
    assert "--heal-data needs --heal" in capsys.readouterr().err
    assert main(argv + ["--heal-rows", "64"]) == 2 and not out.exists()
    assert "--heal-rows needs --heal" in capsys.readouterr().err
    assert main(argv + ["--heal", "compensation", "--heal-data", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err and not out.exists()
    assert main(argv[:5] + argv[9:] + ["--method", "block-influence+heal"]) == 2 and not out.exists()
    assert "--method takes no +heal in gradmap prune" in capsys.readouterr().err
    assert main(argv + ["--heal", "everything"]) == 2 and not out.exists()
    assert "not a healing mode" in capsys.readouterr().err
    assert main(argv + ["--heal", "norms+compensation", "--heal-option", "steps=2", "--heal-option", "top_k=8"]) == 0
    assert "heal (norms+compensation): 2 steps" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["heal"]["train"] == "norms+compensation" and report["heal"]["top_k"] == 8
    assert report["heal"]["rows"] == 256  # --heal-rows' default, drawn apart from the 8 calibration rows
    again = tmp_path / "on-calib"
    assert main(argv[:-3] + ["--out", str(again), "--no-progress", "--heal", "--heal-rows", "0",
                             "--heal-option", "steps=2", "--heal-option", "top_k=8"]) == 0
    healed = json.loads((again / "report.json").read_text())["heal"]
    assert healed["rows"] == 8 and healed["train"] == "norms+compensation"  # --heal without MODE: the default
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 4
    selfd = tmp_path / "self"
    assert main(argv[:-3] + ["--out", str(selfd), "--no-progress", "--heal", "--heal-data", "self", "--heal-rows",
                             "6", "--heal-option", "steps=2", "--heal-option", "top_k=8"]) == 0
    assert "the dense model writes the healing text" in capsys.readouterr().out
    healed = json.loads((selfd / "report.json").read_text())
    assert healed["heal"]["rows"] == 6 and healed["command"]["heal_data"] == "self"


def test_self_generated_rows_keep_their_prompt_and_are_seeded():
    model = tiny_model("llama", n_layers=4)
    prompts = random_ids(5, 20, seed=1)
    state, rng = _state(model), torch.random.get_rng_state()
    a = gradmap.healing.self_generated(model, prompts, prefix=4, seed=0, batch_rows=2)
    assert torch.equal(torch.random.get_rng_state(), rng) and _same_state(model, state) and model.training is False
    assert a.shape == prompts.shape and a.dtype == prompts.dtype and torch.equal(a[:, :4], prompts[:, :4])
    assert torch.equal(a, gradmap.healing.self_generated(model, prompts, prefix=4, seed=0, batch_rows=2))
    assert not torch.equal(a, gradmap.healing.self_generated(model, prompts, prefix=4, seed=1, batch_rows=2))
    assert (a[:, 4:] != prompts[:, 4:]).float().mean() > 0.5  # written, not copied
    assert not (a[:, 4:] == model.generation_config.eos_token_id).any()  # no early end: rows keep full length
    for bad, match in ((dict(prefix=20), "prefix"), (dict(prefix=0), "prefix"), (dict(prompts=prompts[0]), "shape")):
        with pytest.raises(GradmapError, match=match):
            gradmap.healing.self_generated(model, **({"prompts": prompts, "prefix": 4} | bad))


@pytest.mark.parametrize("bad", [dict(n_prune=99), dict(metric="no-such-metric"),
                                 dict(metric="angular", schedule="iterative")])
def test_fast_prune_heal_refuses_a_bad_prune_before_the_teacher_pass(bad, monkeypatch):
    import gradmap.healing as healing
    monkeypatch.setattr(healing, "teacher_targets", lambda *a, **k: pytest.fail("teacher pass ran"))
    model = tiny_model("llama", 6)
    before = copy.deepcopy(model.state_dict())
    kwargs = {"n_prune": 2, **bad}
    with pytest.raises(GradmapError):
        gradmap.fast_prune(model, random_ids(4, 12), kwargs.pop("n_prune"), heal="compensation",
                           progress=False, **kwargs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
