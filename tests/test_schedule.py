"""Tests for lrft.schedule: every schedule is a multiplier of each group's own base LR, with
the step-0 / warmup / last-step edges pinned down and the shapes matching transformers'."""

import math
import pickle

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from lrft.schedule import (
    SCHEDULER_NAMES,
    build_scheduler,
    lr_lambda,
    lr_multiplier,
    resolve_warmup_steps,
)

torch.set_num_threads(1)

BASE_LRS = (1e-3, 1e-4)  # two groups, ratio 10 (e.g. head vs backbone)
TOTAL, WARMUP = 20, 4


def _optimizer(lrs=BASE_LRS) -> torch.optim.Optimizer:
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr, "name": f"g{i}"}
              for i, lr in enumerate(lrs)]
    return torch.optim.SGD(groups, lr=1.0)


def _lrs_used(name, total=TOTAL, steps=None, **kwargs) -> list[list[float]]:
    """LR of each group used by optimizer step k, for k = 0 .. steps - 1, as a loop sees it."""
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, name, total, **kwargs)
    used = []
    for _ in range(steps or total + 2):
        used.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()  # once per optimizer step, after it
    return used


def _cos(progress):
    return 0.5 * (1 + math.cos(math.pi * progress))


# name -> (kwargs, {step: expected multiplier}) with TOTAL=20, WARMUP=4: step 12 is the middle of
# the post-warmup span (16 steps), step 19 the last optimizer step, step 20 the end.
EXPECTED = {
    "cosine": ({"min_lr_ratio": 0.1}, {12: 0.55, 19: 0.1 + 0.9 * _cos(15 / 16), 20: 0.1, 21: 0.1}),
    "linear": ({"min_lr_ratio": 0.1}, {12: 0.55, 19: 0.1 + 0.9 / 16, 20: 0.1, 21: 0.1}),
    "constant": ({}, {12: 1.0, 19: 1.0, 21: 1.0}),
    "constant_with_warmup": ({}, {12: 1.0, 19: 1.0, 21: 1.0}),
    "cosine_with_restarts": ({"num_cycles": 2}, {8: _cos(0.5), 12: 1.0, 19: _cos(0.875), 20: 0.0}),
    "polynomial": ({"power": 2.0, "min_lr_ratio": 0.1}, {12: 0.325, 19: 0.1 + 0.9 / 256, 20: 0.1}),
    "inverse_sqrt": ({}, {12: math.sqrt(4 / 12), 19: math.sqrt(4 / 19)}),
    # decay_ratio 0.25: 5 decay steps (15..19) after 11 stable ones (4..14).
    "warmup_stable_decay": ({"decay_ratio": 0.25, "min_lr_ratio": 0.1},
                            {12: 1.0, 14: 1.0, 19: 0.1 + 0.9 * _cos(0.8), 20: 0.1}),
    "step": ({"step_size": 3, "gamma": 0.5}, {6: 1.0, 7: 0.5, 12: 0.25, 19: 0.5**5}),
    "exponential": ({"gamma": 0.9}, {12: 0.9**8, 19: 0.9**15}),
}
STEP_NAMES = tuple(n for n in SCHEDULER_NAMES if n != "reduce_lr_on_plateau")


def test_every_step_schedule_is_covered():
    assert set(EXPECTED) == set(STEP_NAMES)


@pytest.mark.parametrize("name", STEP_NAMES)
def test_two_groups_follow_one_multiplier(name):
    kwargs, expected = EXPECTED[name]
    used = _lrs_used(name, warmup_steps=WARMUP, **kwargs)
    # HF convention: LR 0 at step 0, halfway at half the warmup, the exact peak when warmup ends.
    expected = {0: 0.0, 2: 0.5, WARMUP: 1.0, **expected}
    for step, multiplier in expected.items():
        for lr, base in zip(used[step], BASE_LRS):
            assert lr == pytest.approx(base * multiplier, abs=1e-12), (name, step)
    for step, (lr0, lr1) in enumerate(used):
        if lr0 > 0:
            assert lr0 / lr1 == pytest.approx(10.0), (name, step)


@pytest.mark.parametrize("name", STEP_NAMES)
def test_lr_multiplier_is_what_the_scheduler_applies(name):
    kwargs = dict(EXPECTED[name][0], warmup_steps=WARMUP, warmup_start_factor=0.01)
    used = _lrs_used(name, **kwargs)
    for step, lrs in enumerate(used):
        assert lrs[0] == pytest.approx(BASE_LRS[0] * lr_multiplier(name, step, TOTAL, **kwargs), abs=1e-15)


@pytest.mark.parametrize(
    "name, hf_name, kwargs, hf_kwargs",
    [
        ("cosine", "cosine", {}, {}),
        ("linear", "linear", {}, {}),
        ("constant_with_warmup", "constant_with_warmup", {}, {}),
        ("cosine_with_restarts", "cosine_with_restarts", {"num_cycles": 3}, {"num_cycles": 3}),
        ("polynomial", "polynomial", {"power": 2.0}, {"power": 2.0, "lr_end": 0.0}),
        ("inverse_sqrt", "inverse_sqrt", {}, {}),
        ("warmup_stable_decay", "warmup_stable_decay", {"decay_ratio": 0.25}, {"num_decay_steps": 5}),
    ],
)
def test_defaults_match_transformers(name, hf_name, kwargs, hf_kwargs):
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_scheduler(hf_name, optimizer, num_warmup_steps=WARMUP, num_training_steps=TOTAL,
                       scheduler_specific_kwargs=hf_kwargs)
    for step in range(TOTAL):
        assert lr_multiplier(name, step, TOTAL, warmup_steps=WARMUP, **kwargs) == pytest.approx(
            hf.get_last_lr()[0], abs=1e-12), step
        optimizer.step()
        hf.step()


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_no_warmup_starts_at_full_lr(name):
    assert _lrs_used(name, steps=1)[0] == list(BASE_LRS)
    assert lr_multiplier(name, 0, TOTAL, warmup_steps=0) == 1.0


@pytest.mark.parametrize("name", ["cosine", "linear", "polynomial"])
def test_warmup_as_long_as_training(name):
    assert [lr_multiplier(name, s, 5, warmup_steps=5, min_lr_ratio=0.1) for s in range(7)] == pytest.approx(
        [0.0, 0.2, 0.4, 0.6, 0.8, 0.1, 0.1])


def test_warmup_start_factor_linear():
    kwargs = dict(warmup_steps=WARMUP, warmup_start_factor=1e-3)
    assert lr_multiplier("cosine", 0, TOTAL, **kwargs) == pytest.approx(1e-3)
    assert lr_multiplier("cosine", 2, TOTAL, **kwargs) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)
    assert lr_multiplier("cosine", WARMUP, TOTAL, **kwargs) == 1.0


def test_constant_warmup_holds_then_jumps():
    kwargs = dict(warmup_steps=WARMUP, warmup_start_factor=0.1, warmup_type="constant")
    assert [lr_multiplier("linear", s, TOTAL, **kwargs) for s in range(WARMUP + 1)] == [0.1] * WARMUP + [1.0]


def test_warmup_ratio_rounds_up():
    assert resolve_warmup_steps(30, warmup_ratio=0.1) == 3  # 0.1 * 30 is 3.0000000000000004 in floats
    assert resolve_warmup_steps(25, warmup_ratio=0.1) == 3  # ceil(2.5)
    assert resolve_warmup_steps(25) == 0
    assert lr_multiplier("cosine", 2, 25, warmup_ratio=0.1) < 1.0
    assert lr_multiplier("cosine", 3, 25, warmup_ratio=0.1) == 1.0


def test_warmup_errors_name_the_numbers():
    optimizer = _optimizer()
    with pytest.raises(ValueError, match="both set"):
        build_scheduler(optimizer, "cosine", 10, warmup_steps=2, warmup_ratio=0.1)
    with pytest.raises(ValueError, match=r"warmup_steps \(11\).*num_training_steps \(10\)"):
        build_scheduler(optimizer, "cosine", 10, warmup_steps=11)
    with pytest.raises(ValueError, match="warmup_ratio: 1.5 must be in"):
        build_scheduler(optimizer, "cosine", 10, warmup_ratio=1.5)
    with pytest.raises(ValueError, match="decay steps"):
        build_scheduler(optimizer, "warmup_stable_decay", 10, warmup_steps=10, decay_ratio=0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_cycles": 0}, "num_cycles"),
        ({"num_cycles": 1.5}, "num_cycles"),
        ({"power": 0.0}, "power"),
        ({"gamma": 0.0}, "gamma"),
        ({"decay_ratio": 1.5}, "decay_ratio"),
        ({"min_lr_ratio": -0.1}, "min_lr_ratio"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"warmup_start_factor": 2.0}, "warmup_start_factor"),
        ({"warmup_type": "cosine"}, "warmup_type: 'cosine' must be one of linear, constant"),
    ],
)
def test_invalid_values_raise_whatever_the_schedule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_scheduler(_optimizer(), "linear", 10, **kwargs)


def test_unused_parameters_are_not_an_error_here():
    scheduler = build_scheduler(_optimizer(), "linear", 10, num_cycles=3, step_size=5, power=2.0)
    assert scheduler.get_last_lr() == list(BASE_LRS)


def test_step_needs_step_size():
    with pytest.raises(ValueError, match="step_size: needed by"):
        build_scheduler(_optimizer(), "step", 10)


def test_unknown_name_suggests_and_lists():
    match = r"unknown schedule 'cosin'; did you mean 'cosine'\?"
    with pytest.raises(ValueError, match=match):
        build_scheduler(_optimizer(), "cosin", 10)


def test_reduce_lr_on_plateau_scales_every_group_on_a_metric():
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, "reduce_lr_on_plateau", 100, gamma=0.5, patience=1)
    assert isinstance(scheduler, ReduceLROnPlateau)
    for loss in (1.0, 1.0, 1.0):  # one evaluation each; the third exceeds patience
        scheduler.step(loss)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([b * 0.5 for b in BASE_LRS])
    with pytest.raises(ValueError, match="takes no warmup"):
        build_scheduler(_optimizer(), "reduce_lr_on_plateau", 100, warmup_ratio=0.1)
    with pytest.raises(ValueError, match="has no multiplier function"):
        lr_multiplier("reduce_lr_on_plateau", 0, 100)


def test_scheduler_state_round_trips():
    fn = lr_lambda("cosine", TOTAL, warmup_steps=WARMUP, min_lr_ratio=0.1)
    assert pickle.loads(pickle.dumps(fn))(12) == pytest.approx(0.55)
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, "cosine", TOTAL, warmup_steps=WARMUP)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    resumed_optimizer = _optimizer()
    resumed = build_scheduler(resumed_optimizer, "cosine", TOTAL, warmup_steps=WARMUP)
    resumed.load_state_dict(scheduler.state_dict())
    resumed_optimizer.step()
    resumed.step()
    optimizer.step()
    scheduler.step()
    assert resumed.get_last_lr() == pytest.approx(scheduler.get_last_lr())
