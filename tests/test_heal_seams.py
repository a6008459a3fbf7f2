"""The optional hidden-state loss at the seams (`seam_mse`): the dense states are the residual stream entering
the same original layer, the loss trains them closer, and every place that cannot supply them refuses
before any work."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from test_heal_cli import _argv, pair  # noqa: F401  (the fixture)
from tiny import random_ids, tiny_model

import gradmap
from gradmap.cli.app import main
from gradmap.core.adapter import get_adapter
from gradmap.core.errors import GradmapError
from gradmap.healing import TeacherTargets, teacher_targets
from gradmap.healing.seams import seam_inputs, seam_layers, seam_loss_sum, seams_of

K = 16


def _pruned(family: str = "llama", removed=(2, 3)):
    dense = tiny_model(family, n_layers=6, seed=0)
    model = copy.deepcopy(dense)
    gradmap.remove_layers(model, list(removed))
    return dense, model, random_ids(16, 24, seed=1)


def test_seams_are_the_kept_layers_right_after_removed_ones():
    assert seams_of([0, 1, 4, 5]) == [4]
    assert seams_of([0, 2, 3, 6]) == [2, 6]
    assert seams_of([0, 1, 2, 3]) == []  # only the tail removed: no kept layer after it
    _, model, _ = _pruned(removed=(1, 4))
    assert seam_layers(get_adapter(model)) == [2, 5]


def test_teacher_hidden_states_are_the_dense_residual_stream_entering_that_layer():
    dense, _, calib = _pruned()
    targets = teacher_targets(dense, calib[:3], k=K, hidden_at=[4])
    with torch.no_grad():
        states = dense(input_ids=calib[:3], output_hidden_states=True).hidden_states
    assert targets.hidden[4].dtype == torch.bfloat16 and targets.hidden[4].shape == (3, 24, 32)
    # hidden_states[j] is the input of layer j; bf16 storage keeps about 3 significant digits
    torch.testing.assert_close(targets.hidden[4].float(), states[4], rtol=1e-2, atol=1e-2)
    again = TeacherTargets.from_state_dict(targets.state_dict())
    assert set(again.hidden) == {4} and torch.equal(again.hidden[4], targets.hidden[4])


def test_the_seam_loss_is_zero_for_the_dense_model_itself():
    dense, _, calib = _pruned()
    targets = teacher_targets(dense, calib[:2], k=K, hidden_at=[4])
    with torch.no_grad(), seam_inputs(get_adapter(dense), [4]) as store:
        dense(input_ids=calib[:2], use_cache=False)
    assert float(seam_loss_sum(store, targets.hidden)) < 1e-4  # bf16 rounding only
    shifted = {4: store[4] * 1.1}
    assert float(seam_loss_sum(shifted, targets.hidden)) == pytest.approx(2 * 0.01, rel=0.05)  # 2 rows × 0.1²


@pytest.mark.parametrize("family,mode", [("llama", "norms+compensation"), ("gemma3_text", "norms+compensation"),
                                         ("qwen2", "partial")])
def test_the_seam_loss_trains_the_seam_states_towards_the_dense_ones(family, mode):
    dense, model, calib = _pruned(family)
    twin = copy.deepcopy(model)
    lr = {"partial": 1e-3}.get(mode, 1e-2)
    with_seam = gradmap.heal(model, calib, teacher=dense, train=mode, steps=12, lr=lr, top_k=K, eval_every=3,
                             seam_mse=1.0, progress=False)
    plain = gradmap.heal(twin, calib, teacher=dense, train=mode, steps=12, lr=lr, top_k=K, eval_every=3,
                         progress=False)
    seam = [h["seam"] for h in with_seam.holdout]
    assert "seam" not in plain.holdout[0] and with_seam.options["seam_mse"] == 1.0
    assert with_seam.best_step > 0 and min(seam[1:]) < seam[0]
    assert with_seam.loss_curve != plain.loss_curve  # the seam term is part of what was optimised
    # the folded model (hooks gone) carries the state it was trained to: measured from scratch
    targets = teacher_targets(dense, calib[14:], k=K, hidden_at=[4])

    def seam_now(m):
        with torch.no_grad(), seam_inputs(get_adapter(m), [4]) as store:
            m(input_ids=calib[14:], use_cache=False)
        return float(seam_loss_sum(store, targets.hidden)) / 2

    assert seam_now(model) < seam_now(twin)


def test_cached_targets_without_the_seam_states_are_refused_before_any_work():
    dense, model, calib = _pruned()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(GradmapError, match=r"hidden_at=\[4\]"):
        gradmap.heal(model, calib, teacher=teacher_targets(dense, calib, k=K), seam_mse=1.0, top_k=K, progress=False)
    cached = teacher_targets(dense, calib, k=K)
    wrong = TeacherTargets(cached.indices, cached.logprobs, hidden={4: torch.zeros(16, 24, 5)})
    with pytest.raises(GradmapError, match="not \\(rows, positions, hidden\\)"):
        gradmap.heal(model, calib, teacher=wrong, seam_mse=1.0, top_k=K, progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_seam_mse_is_refused_where_the_seams_are_unknown_or_absent():
    dense, model, calib = _pruned(removed=(4, 5))  # only the tail: no seam
    with pytest.raises(GradmapError, match="needs a seam"):
        gradmap.heal(model, calib, teacher=dense, train="partial", seam_mse=1.0, top_k=K,
                     progress=False)
    fresh = tiny_model("llama", n_layers=6)
    with pytest.raises(GradmapError, match="known only after pruning"):
        gradmap.fast_prune(fresh, calib[:4], 2, metric="block-influence", heal={"seam_mse": 1.0}, progress=False)
    assert fresh.config.num_hidden_layers == 6
    with pytest.raises(GradmapError, match="seam_mse must be a finite number >= 0"):
        gradmap.heal(model, calib, teacher=dense, seam_mse=-1.0, progress=False)
    from gradmap.experiments.methods import parse_method
    with pytest.raises(GradmapError, match="known only after pruning"):
        parse_method("auto+heal(seam_mse=1.0)")


def test_gradmap_heal_cli_trains_the_seams(pair, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "healed"
    assert main(_argv(pair, out, "--heal-option", "steps=3", "--heal-option", "lr=1e-2",
                      "--heal-option", "seam_mse=1.0")) == 0
    heal = json.loads((out / "report.json").read_text())["heal"]
    assert heal["options"]["seam_mse"] == 1.0 and "seam" in heal["holdout"][0]
