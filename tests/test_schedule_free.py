"""optim.name: schedule_free_adamw: evaluate and save the averaged weights x, train at y.

Schedule-free AdamW (Defazio et al. 2024) trains at y = (1 - beta1) z + beta1 x and keeps the
average x, the model to evaluate and keep, only implicitly (y and z are stored). These tests hold
lrft to what the paper and the package ask:
- `eval_weights` puts exactly x in the parameters and y back after; a no-op for AdamW.
- A training run evaluates x (the optimizer in eval mode at every evaluation and checkpoint),
  and saves x as the final model, not y.
- The range test and the guard's rollback restore y, z, the step count and the mode exactly.
- A decaying schedule is refused with the reason and the fix; a missing package names its
  install command.
Resume bit-identical: tests/test_train_e2e.py; `accelerate launch -m lrft.train` on a tiny
Llama: tests/test_launch.py.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import bert_recipe, write_recipe
from safetensors.torch import load_file
from test_groups import tiny_bert
from test_registries import minimal  # noqa: F401 (a fixture: a valid recipe file)

import lrft.train
from lrft.errors import RecipeError
from lrft.groups import param_groups
from lrft.optim import build_optimizer
from lrft.schedule_free import eval_weights
from lrft.recipe import GuardConfig, load_recipe
from lrft.schedule import SCHEDULER_NAMES, SCHEDULES

torch.set_num_threads(1)
BETA1 = 0.9


def _model_and_optimizer(steps: int = 3):
    torch.manual_seed(0)
    model = tiny_bert().eval()  # no dropout; gradients flow
    optimizer = build_optimizer(param_groups(model, 1e-2, 0.01), "schedule_free_adamw")
    _steps(model, optimizer, steps)
    return model, optimizer


def _steps(model, optimizer, n: int, seed: int = 0) -> None:
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        batch = {"input_ids": torch.randint(1, 100, (4, 10), generator=g),
                 "labels": torch.randint(0, 2, (4,), generator=g)}
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _average(model, optimizer, y: dict) -> dict[str, torch.Tensor]:
    """x from y and z by the paper's y = (1 - beta1) z + beta1 x."""
    z = {n: optimizer.state[p]["z"] for n, p in model.named_parameters()}
    return {n: (y[n] - (1 - BETA1) * z[n]) / BETA1 for n in y}


def _same(a: dict, b: dict) -> list[str]:
    return [n for n in a if not torch.equal(a[n], b[n])]


# ---------------------------------------------------------------------------------------------
# The weights: x inside eval_weights, y outside
# ---------------------------------------------------------------------------------------------

def test_eval_weights_puts_the_average_in_place_and_y_back():
    model, optimizer = _model_and_optimizer()
    y = _weights(model)
    x = _average(model, optimizer, y)
    assert max((x[n] - y[n]).abs().max() for n in y) > 1e-4  # they differ: the test can tell
    with eval_weights(optimizer):
        assert optimizer.param_groups[0]["train_mode"] is False
        inside = _weights(model)
    for n in y:
        torch.testing.assert_close(inside[n], x[n], rtol=1e-5, atol=1e-6)
    # y again, up to the float rounding of two in-place interpolations (as in the package)
    torch.testing.assert_close(_weights(model), y)
    assert optimizer.param_groups[0]["train_mode"] is True
    wrapped = SimpleNamespace(optimizer=optimizer)  # as Accelerate's AcceleratedOptimizer holds it
    with eval_weights(wrapped):
        assert optimizer.param_groups[0]["train_mode"] is False


def test_eval_weights_is_a_no_op_for_other_optimizers():
    torch.manual_seed(0)
    model = tiny_bert().eval()
    optimizer = build_optimizer(param_groups(model, 1e-2, 0.01), "adamw")
    _steps(model, optimizer, 2)
    before = _weights(model)
    with eval_weights(optimizer):
        assert _same(_weights(model), before) == []
    assert _same(_weights(model), before) == []


def test_a_run_evaluates_checkpoints_and_saves_the_average(tmp_path, tiny_bert, tiny_glue,
                                                           monkeypatch):
    seen = {"eval": [], "save": []}

    def mode(optimizer):
        return getattr(optimizer, "optimizer", optimizer).param_groups[0]["train_mode"]

    evaluate, save, loop = (lrft.train.evaluate_model, lrft.train.save_checkpoint,
                            lrft.train.train_loop)

    def evaluating(accelerator, model, *args):
        seen["eval"].append((mode(run_of["run"].optimizer), _weights(model)))
        return evaluate(accelerator, model, *args)

    def saving(accelerator, *args, **kwargs):
        seen["save"].append(mode(run_of["run"].optimizer))
        return save(accelerator, *args, **kwargs)

    run_of = {}

    def looping(run, *args, **kwargs):
        run_of["run"] = run
        results = loop(run, *args, **kwargs)
        model = run.accelerator.unwrap_model(run.model)
        inner = run.optimizer.optimizer
        run_of["y"] = _weights(model)  # the loop ends at the training weights
        run_of["x"] = _average(model, inner, run_of["y"])
        return results

    monkeypatch.setattr(lrft.train, "evaluate_model", evaluating)
    monkeypatch.setattr(lrft.train, "save_checkpoint", saving)
    monkeypatch.setattr(lrft.train, "train_loop", looping)
    recipe = bert_recipe(tiny_bert, tiny_glue, tmp_path / "run", max_steps=12, eval_steps=4,
                         save_steps=6, mixed_precision="no")
    recipe["optim"]["name"] = "schedule_free_adamw"
    lrft.train.train(write_recipe(tmp_path / "r.yaml", recipe))

    assert [m for m, _ in seen["eval"]] == [False] * 3  # at steps 4, 8 and the end
    assert seen["save"] == [False]  # checkpoint-6
    saved = load_file(tmp_path / "run" / "model.safetensors")
    x, y = run_of["x"], run_of["y"]
    for n, value in saved.items():  # the final model is x ...
        torch.testing.assert_close(value, x[n], rtol=1e-5, atol=1e-6)
    differs = [n for n, value in saved.items() if (value - y[n]).abs().max() > 1e-4]
    assert len(differs) > len(saved) // 2  # ... not y
    final_eval = seen["eval"][-1][1]  # and x was what the last evaluation saw
    for n, value in saved.items():
        torch.testing.assert_close(value, final_eval[n], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The range test and the guard restore y, z, k and the mode
# ---------------------------------------------------------------------------------------------

def test_range_test_restores_the_training_state_exactly():
    from lrft.finder import lr_range_test

    model, optimizer = _model_and_optimizer()
    before, state = _weights(model), copy.deepcopy(optimizer.state_dict())
    batches = [{"input_ids": torch.randint(1, 100, (4, 10)), "labels": torch.tensor([0, 1, 0, 1])}]
    lr_range_test(model, optimizer, batches, num_steps=5)
    assert _same(_weights(model), before) == []
    after = optimizer.state_dict()
    assert after["param_groups"] == state["param_groups"]  # k, lr_max, weight_sum, train_mode
    assert all(torch.equal(after["state"][i][k], state["state"][i][k])
               for i in state["state"] for k in state["state"][i])
    with eval_weights(optimizer):  # an optimizer left in eval mode stays so, and the sweep runs
        lr_range_test(model, optimizer, batches, num_steps=3)
        assert optimizer.param_groups[0]["train_mode"] is False


def test_guard_rollback_restores_the_training_weights_and_the_averaging():
    from lrft.guard import DivergenceGuard

    model, optimizer = _model_and_optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    guard = DivergenceGuard(GuardConfig(enabled=True), model, optimizer, scheduler,
                            SimpleNamespace(lr_scale=1.0, rollbacks=0))
    good, k = _weights(model), optimizer.param_groups[0]["k"]
    z = {n: optimizer.state[p]["z"].clone() for n, p in model.named_parameters()}
    _steps(model, optimizer, 2, seed=7)
    guard.rollback()
    assert _same(_weights(model), good) == [] and optimizer.param_groups[0]["k"] == k
    assert all(torch.equal(optimizer.state[p]["z"], z[n]) for n, p in model.named_parameters())
    assert optimizer.param_groups[0]["train_mode"] is True
    _steps(model, optimizer, 1)


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------

SF = "optim.name=schedule_free_adamw"


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_only_a_constant_schedule_is_accepted(minimal, name):
    overrides = [SF, f"schedule.lr_scheduler_type={name}"] + \
        (["schedule.step_size=5"] if name == "step" else [])
    if SCHEDULES[name].constant:
        assert load_recipe(minimal, overrides + ["schedule.warmup_ratio=0.1"])
        return
    with pytest.raises(RecipeError) as err:
        load_recipe(minimal, overrides)
    [problem] = err.value.problems
    assert problem.startswith(f"schedule.lr_scheduler_type: {name} decays the LR, but "
                              f"schedule_free_adamw averages its weights")
    assert problem.endswith("use constant or constant_with_warmup (a warmup is fine)")


def test_a_missing_package_names_the_install(minimal, monkeypatch):
    model = tiny_bert()
    monkeypatch.setitem(sys.modules, "schedulefree", None)  # `import schedulefree` fails
    with pytest.raises(ImportError, match="pip install schedulefree"):
        build_optimizer(param_groups(model, 1e-3, 0.0), "schedule_free_adamw")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "schedulefree" else real(name, *a))
    with pytest.raises(RecipeError) as err:
        load_recipe(minimal, [SF, "schedule.lr_scheduler_type=constant"])
    [problem] = err.value.problems
    assert "needs schedulefree, which is not installed; pip install schedulefree" in problem


def test_fsdp_and_deepspeed_are_refused(minimal):
    from lrft.launch import launcher_problems

    recipe = load_recipe(minimal, [SF, "schedule.lr_scheduler_type=constant"])
    for kind in ("FSDP", "DEEPSPEED"):
        launcher = SimpleNamespace(distributed_type=kind, gradient_accumulation_steps=1,
                                   state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(
                                       deepspeed_config={})))
        [problem] = launcher_problems(recipe, launcher)
        assert problem.startswith("optim.name: schedule_free_adamw") and "adamw" in problem
