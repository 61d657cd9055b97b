"""Tests for lrft.optim: every optimizer steps every group with its own lr / weight decay,
arguments are checked, group names survive, and optimizer_state_bytes counts real state."""

import gc
import sys
import warnings

import pytest
import torch
from torch import nn

from lrft.optim import (
    OPTIMIZER_NAMES,
    OPTIMIZERS,
    build_optimizer,
    check_optimizer_args,
    optimizer_args,
    optimizer_state_bytes,
)

torch.set_num_threads(1)

EIGHT_BIT = ("adamw_8bit", "paged_adamw_8bit", "lion_8bit")
# Optimizers that take any groups; Muon's must come from param_groups(..., hidden_matrices=True)
# and has the same checks in tests/test_muon.py.
ANY_GROUPS = tuple(n for n in OPTIMIZER_NAMES if not OPTIMIZERS[n].hidden_matrices)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    # 64 x 64 = 4096 elements: bnb's min_8bit_size, the smallest tensor it keeps in 8 bits.
    return nn.Sequential(nn.Embedding(64, 64), nn.Linear(64, 64))


def _groups(model, lrs=(1e-2, 1e-3), wds=(0.0, 0.1)) -> list[dict]:
    embed, head = model[0], model[1]
    return [
        {"params": [embed.weight], "lr": lrs[0], "weight_decay": wds[0], "name": "embed",
         "param_names": ["0.weight"]},
        {"params": [head.weight, head.bias], "lr": lrs[1], "weight_decay": wds[1], "name": "head",
         "param_names": ["1.weight", "1.bias"]},
    ]


def _set_grads(model) -> None:
    # The same gradients for the same architecture, whichever params the optimizer holds.
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def _one_step(name, module, groups, **kwargs) -> torch.optim.Optimizer:
    optimizer = build_optimizer(groups, name, **kwargs)
    _set_grads(module)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        optimizer.step()
    return optimizer


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ANY_GROUPS)
def test_every_group_steps_and_keeps_its_keys(name):
    model = _model()
    before = _params(model)
    optimizer = _one_step(name, model, _groups(model))
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"{name} did not move {n}"
    assert [g["name"] for g in optimizer.param_groups] == ["embed", "head"]
    assert optimizer.param_groups[1]["param_names"] == ["1.weight", "1.bias"]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-3]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.1]


@pytest.mark.parametrize("name", ANY_GROUPS)
def test_two_groups_step_as_each_group_alone(name):
    model = _model()
    _one_step(name, model, _groups(model))
    for index in (0, 1):
        alone = _model()
        _one_step(name, alone, [_groups(alone)[index]])
        for p, q in zip(_groups(model)[index]["params"], _groups(alone)[index]["params"]):
            torch.testing.assert_close(p, q)


@pytest.mark.parametrize("name", ANY_GROUPS)
def test_group_lr_and_weight_decay_are_per_group(name):
    # A group with lr 0 stays put while the other moves: the group lr is the one used.
    model = _model()
    before = _params(model)
    _one_step(name, model, _groups(model, lrs=(1e-2, 0.0), wds=(0.0, 0.1)))
    assert torch.equal(model[1].weight, before["1.weight"])
    assert not torch.equal(model[0].weight, before["0.weight"])
    # Changing only the head's weight decay changes only the head's update.
    other = _model()
    _one_step(name, other, _groups(other, wds=(0.0, 0.5)))
    again = _model()
    _one_step(name, again, _groups(again, wds=(0.0, 0.1)))
    torch.testing.assert_close(other[0].weight, again[0].weight)
    assert not torch.allclose(other[1].weight, again[1].weight)


def _two_tensor_groups(lrs, wds):
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))
    a.grad, b.grad = torch.randn(5), torch.randn(5)
    groups = [{"params": [p], "lr": lr, "weight_decay": wd, "name": f"g{i}"}
              for i, (p, lr, wd) in enumerate(zip((a, b), lrs, wds))]
    return groups, [a.detach().clone(), b.detach().clone()], [a.grad, b.grad]


@pytest.mark.parametrize(
    "name, expected",
    [
        # First step from zero state, by each paper's update rule.
        ("sgd", lambda p, g, lr, wd: p - lr * (g + wd * p)),
        ("adamw", lambda p, g, lr, wd: p * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)),
        ("lion", lambda p, g, lr, wd: p * (1 - lr * wd) - lr * g.sign()),
    ],
)
def test_first_step_matches_hand_computation_per_group(name, expected):
    lrs, wds = (0.1, 0.01), (0.2, 0.05)
    groups, before, grads = _two_tensor_groups(lrs, wds)
    build_optimizer(groups, name).step()
    for group, p0, g, lr, wd in zip(groups, before, grads, lrs, wds):
        torch.testing.assert_close(group["params"][0].detach(), expected(p0, g, lr, wd))


def test_defaults_fill_groups_without_lr_or_weight_decay():
    model = _model()
    groups = [{"params": list(model.parameters()), "name": "all"}]
    optimizer = build_optimizer(groups, "adamw", lr=3e-4, weight_decay=0.05)
    assert optimizer.param_groups[0]["lr"] == 3e-4
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    assert "lr" not in groups[0], "the caller's dicts must not be mutated"
    with pytest.raises(ValueError, match="group all has no 'lr'"):
        build_optimizer(groups, "adamw")


def test_betas_and_eps_reach_every_group():
    model = _model()
    optimizer = build_optimizer(_groups(model), "adamw", betas=(0.8, 0.95), eps=1e-6)
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in optimizer.param_groups)
    optimizer = build_optimizer(_groups(model), "sgd", momentum=0.9, nesterov=True)
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in optimizer.param_groups)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("sgd", {"betas": (0.9, 0.99)}, r"'sgd' does not take 'betas'; it takes: lr, weight_decay, momentum"),
        ("adamw", {"momentum": 0.9}, r"'adamw' does not take 'momentum'.*betas, eps, amsgrad"),
        ("adamw", {"weight_decy": 0.1}, r"did you mean 'weight_decay'"),
        ("lion", {"eps": 1e-8}, r"'lion' does not take 'eps'"),
        ("lion", {"decoupled_weight_decay": True}, r"does not take 'decoupled_weight_decay'"),
        ("adamww", {}, r"unknown optimizer 'adamww'; did you mean 'adamw'\?"),
    ],
)
def test_bad_arguments_and_names_raise_with_choices(name, kwargs, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        build_optimizer(_groups(model), name, **kwargs)
    assert check_optimizer_args(name, kwargs), "the validator must report the same problem"


def test_check_optimizer_args_reports_every_problem_and_accepts_valid_ones():
    assert check_optimizer_args("adamw", {"betas": (0.9, 0.999), "eps": 1e-8, "lr": 1e-3}) == []
    problems = check_optimizer_args("sgd", {"betas": (0.9, 0.99), "momentun": 0.9})
    assert len(problems) == 2 and "did you mean 'momentum'" in problems[1]
    assert optimizer_args("lion") == ("lr", "weight_decay", "betas")
    with pytest.raises(ValueError, match="did you mean 'sgd'"):
        optimizer_args("sdg")


def test_8bit_needs_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    model = _model()
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        build_optimizer(_groups(model), "adamw_8bit")


def test_8bit_state_is_uint8_and_embeddings_stay_32bit():
    model = _model()
    optimizer = _one_step("adamw_8bit", model, _groups(model), model=model)
    assert optimizer.state[model[1].weight]["state1"].dtype == torch.uint8
    assert optimizer.state[model[1].bias]["state1"].dtype == torch.float32  # below min_8bit_size
    assert optimizer.state[model[0].weight]["state1"].dtype == torch.float32  # embedding override


def test_embedding_override_does_not_leak_into_later_optimizers():
    import bitsandbytes as bnb

    model = _model()
    _one_step("adamw_8bit", model, _groups(model), model=model)
    embedding_id = id(model[0].weight)
    del model
    gc.collect()
    # bnb's override manager is process-global and keyed by id(): a freed weight's id may be
    # reused by any new tensor, so its override must be gone.
    assert embedding_id not in bnb.optim.GlobalOptimManager.get_instance().pid2config
    linear = nn.Linear(64, 64, bias=False)  # at the embedding's old (group 0, position 0)
    optimizer = _one_step("adamw_8bit", linear, [{"params": [linear.weight], "lr": 1e-3}])
    assert optimizer.state[linear.weight]["state1"].dtype == torch.uint8


def test_paged_adamw_8bit_falls_back_on_cpu():
    model = _model()
    optimizer = build_optimizer(_groups(model), "paged_adamw_8bit", model=model)
    _set_grads(model)
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):
        optimizer.step()
    assert optimizer.state[model[1].weight]["state1"].dtype == torch.uint8


def test_adamw_is_fused_on_cpu():
    # torch has a fused AdamW kernel on CPU (and CUDA): ~6x faster than its default there.
    model = _model()
    optimizer = build_optimizer(_groups(model), "adamw")
    assert optimizer.defaults["fused"] is True
    _set_grads(model)
    before = model[1].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model[1].weight)


@pytest.mark.parametrize(
    "name, low, high", [("adamw", 7.99, 8.01), ("lion", 3.99, 4.01), ("adamw_8bit", 2.0, 2.3)]
)
def test_optimizer_state_bytes_per_param(name, low, high):
    torch.manual_seed(0)
    layer = nn.Linear(128, 128, bias=False)  # 16384 elements
    optimizer = _one_step(name, layer, [{"params": [layer.weight], "lr": 1e-3}])
    # adamw: two fp32 moments; lion: one; adamw_8bit: two uint8 moments + qmaps + absmax.
    assert low <= optimizer_state_bytes(optimizer) / layer.weight.numel() <= high


def test_optimizer_state_bytes_is_zero_before_the_first_step():
    model = _model()
    assert optimizer_state_bytes(build_optimizer(_groups(model), "adamw")) == 0
