"""The registries agree with everything that derives from them.

One entry per schedule (lrft.schedule.SCHEDULES), per optimizer (lrft.optim.OPTIMIZERS) and per
GLUE task (lrft.glue.TASKS) is the only place a rule lives; the recipe validator, the presets, the
metrics and the schedule math read it. These tests pin that agreement: for every schedule the recipe
accepts exactly the keys the schedule reads and every accepted key changes the LR; for every
optimizer the recipe's argument rules are the registry's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrft import glue, optim, schedule
from lrft.errors import RecipeError
from lrft.metrics import compute_metrics, score_metrics
from lrft.presets import SCENARIOS, lr_preset
from lrft.recipe import OptimConfig, ScheduleConfig, load_recipe

TOTAL = 20
# A valid value, other than the default, for every schedule option.
ALTERNATIVES = {"warmup_steps": 4, "warmup_ratio": 0.2, "warmup_start_factor": 0.1,
                "warmup_type": "constant", "min_lr_ratio": 0.3, "num_cycles": 2, "power": 2.0,
                "decay_ratio": 0.3, "step_size": 3, "gamma": 0.5, "patience": 1}
REQUIRED = {"step": {"step_size": 5}}  # options a schedule cannot run without
WARMUP = {"warmup_steps": 4}  # so warmup_start_factor and warmup_type have a warmup to shape


@pytest.fixture
def minimal(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: some/model}\ndata: {glue_task: sst2}\n"
                    "train: {eval_steps: 10}\n")
    return path


def _overrides(name: str, options: dict) -> list[str]:
    return [f"schedule.lr_scheduler_type={name}",
            *(f"schedule.{k}={v}" for k, v in options.items())]


def test_every_option_has_an_alternative_and_a_recipe_key():
    recipe_keys = {f.name for f in ScheduleConfig.__dataclass_fields__.values()}
    assert set(ALTERNATIVES) == set(schedule.DEFAULTS)
    assert set(schedule.DEFAULTS) <= recipe_keys
    assert recipe_keys - set(schedule.DEFAULTS) == {"lr_scheduler_type"}
    assert all(getattr(ScheduleConfig(), k) == v for k, v in schedule.DEFAULTS.items())


@pytest.mark.parametrize("name", schedule.SCHEDULER_NAMES)
@pytest.mark.parametrize("key", list(schedule.DEFAULTS))
def test_the_recipe_accepts_exactly_the_keys_a_schedule_reads(minimal, name, key):
    spec = schedule.SCHEDULES[name]
    options = {**REQUIRED.get(name, {}), key: ALTERNATIVES[key]}
    if key in ("warmup_start_factor", "warmup_type") and spec.warmup:
        options.update(WARMUP)
    if key in spec.keys:
        assert load_recipe(minimal, _overrides(name, options)).schedule.lr_scheduler_type == name
    else:
        with pytest.raises(RecipeError) as info:
            load_recipe(minimal, _overrides(name, options))
        assert any(p.startswith(f"schedule.{key}: not read by") for p in info.value.problems)


def _curve(name: str, **options) -> list[float]:
    return [schedule.lr_multiplier(name, k, TOTAL, **options) for k in range(TOTAL + 2)]


@pytest.mark.parametrize("name", [n for n in schedule.SCHEDULER_NAMES
                                  if n not in schedule.METRIC_SCHEDULERS])
def test_every_key_a_schedule_reads_changes_its_lr(name):
    spec = schedule.SCHEDULES[name]
    for key in spec.keys:
        base = {**REQUIRED.get(name, {})}
        if key not in ("warmup_steps", "warmup_ratio"):
            base.update(WARMUP)
        changed = {**base, key: ALTERNATIVES[key]}
        assert _curve(name, **base) != _curve(name, **changed), (name, key)


def test_the_plateau_schedule_reads_its_keys():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    plateau = schedule.build_scheduler(opt, "reduce_lr_on_plateau", TOTAL, gamma=0.5, patience=1)
    assert (plateau.factor, plateau.patience) == (0.5, 1)


def test_a_decaying_schedule_ends_at_its_floor():
    for name, spec in schedule.SCHEDULES.items():
        if spec.ends:
            options = {**REQUIRED.get(name, {}), "min_lr_ratio": 0.25}
            assert schedule.lr_multiplier(name, TOTAL, TOTAL, **options) == 0.25, name


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------

def _with_schedule(name: str) -> list[str]:
    """`optim.name=NAME`, and a constant schedule for a schedule-free optimizer (the recipe
    refuses it with the minimal recipe's cosine: tests/test_schedule_free.py)."""
    constant = ["schedule.lr_scheduler_type=constant"] if optim.OPTIMIZERS[name].schedule_free \
        else []
    return [f"optim.name={name}", *constant]


@pytest.mark.parametrize("name", optim.OPTIMIZER_NAMES)
def test_the_recipe_passes_an_optimizer_exactly_what_it_takes(minimal, name):
    spec = optim.OPTIMIZERS[name]
    recipe = load_recipe(minimal, _with_schedule(name))
    kwargs = optim.recipe_kwargs(recipe.optim)
    assert optim.check_optimizer_args(name, kwargs) == []
    assert ("betas" in kwargs) == ("betas" in spec.args)
    assert ("eps" in kwargs) == ("eps" in spec.args)
    for key, reads in (("adam_beta1", "betas"), ("adam_epsilon", "eps")):
        overrides = [*_with_schedule(name), f"optim.{key}=0.5"]
        if reads in spec.args:
            load_recipe(minimal, overrides)
        else:
            with pytest.raises(RecipeError, match=f"optim.{key}"):
                load_recipe(minimal, overrides)
    for arg in spec.args:
        if arg not in optim.RECIPE_KEYS:
            assert optim.check_optimizer_args(name, {arg: None}) == []


@pytest.mark.parametrize("key", list(optim.RECIPE_KEYS))
def test_optim_args_cannot_set_what_the_recipe_has_a_key_for(minimal, key):
    with pytest.raises(RecipeError) as info:
        load_recipe(minimal, [f"optim.args={{{key}: 0.5}}"])
    (problem,) = info.value.problems
    assert problem.startswith(f"optim.args.{key}: set {optim.RECIPE_KEYS[key]} instead")


@pytest.mark.parametrize("name", optim.OPTIMIZER_NAMES)
def test_presets_follow_the_registrys_lr_rule(name):
    if optim.OPTIMIZERS[name].lr_rule is None:
        with pytest.raises(ValueError, match="no LR rule"):
            lr_preset("standard", name)
    else:
        for scenario in SCENARIOS:
            preset = lr_preset(scenario, name)
            assert preset.low <= preset.learning_rate <= preset.high


def test_defaults_are_registered():
    assert OptimConfig().name in optim.OPTIMIZERS
    assert ScheduleConfig().lr_scheduler_type in schedule.SCHEDULES


# ---------------------------------------------------------------------------------------------
# GLUE
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", glue.NAMES)
def test_every_glue_task_scores_from_what_its_metric_computes(task):
    labels = [0.5, 2.0, 3.5, 1.0] if glue.TASKS[task].is_regression else [0, 1, 1, 0]
    computed = compute_metrics(task, labels, labels)
    assert set(score_metrics(task)) <= set(computed)
    splits = {split: computed for split in glue.TASKS[task].eval_splits}
    assert glue.score(task, splits) == pytest.approx(1.0)


def test_the_trackers_the_recipe_knows_are_accelerates():
    from accelerate.utils import LoggerType

    from lrft.validate import TRACKERS

    assert set(TRACKERS) == {t.value for t in LoggerType} - {"all"}
