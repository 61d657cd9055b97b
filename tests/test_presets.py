"""Tests for lrft.presets: the LR table, Lion's rule, batch-size scaling and the printed guide."""

from __future__ import annotations

import math
import typing
from dataclasses import replace
from pathlib import Path

import pytest

from lrft.presets import GUIDE_OPTIMIZERS, SCENARIOS, format_lr_table, lr_preset, scaled_lr
from lrft.recipe import OptimConfig, load_recipe

ROOT = Path(__file__).resolve().parents[1]
ADAMW = {"full": 5e-6, "standard": 5e-5, "conservative": 4e-5, "lora": 1e-4, "scratch": 1e-3}


def test_scenarios():
    assert SCENARIOS == tuple(ADAMW)


@pytest.mark.parametrize("scenario, lr", ADAMW.items())
def test_adamw_values(scenario: str, lr: float):
    p = lr_preset(scenario)
    assert (p.scenario, p.optimizer) == (scenario, "adamw")
    assert p.learning_rate == lr
    assert p.low < p.learning_rate <= p.high
    assert p.weight_decay >= 0 and p.reason


def test_lora_has_no_weight_decay_and_full_is_the_smallest_lr():
    assert lr_preset("lora").weight_decay == 0.0
    finetune = [s for s in SCENARIOS if s != "scratch"]
    assert min(finetune, key=lambda s: lr_preset(s).learning_rate) == "full"
    assert max(SCENARIOS, key=lambda s: lr_preset(s).learning_rate) == "scratch"


@pytest.mark.parametrize("family", ["bert", "causal"])
@pytest.mark.parametrize("scenario", ["full", "standard", "conservative", "lora"])
def test_shipped_recipes_use_the_preset(family: str, scenario: str):
    recipe = load_recipe(ROOT / "recipes" / family / f"{scenario}.yaml")
    assert recipe.optim.learning_rate == lr_preset(scenario, recipe.optim.name).learning_rate


@pytest.mark.parametrize("lion_name", ["lion", "lion_8bit"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lion_lr_3_to_10x_smaller_and_wd_3_to_10x_larger(scenario: str, lion_name: str):
    adamw, lion = lr_preset(scenario, "adamw"), lr_preset(scenario, lion_name)
    assert lion.optimizer == lion_name
    assert 3 <= adamw.learning_rate / lion.learning_rate <= 10
    # The whole range moves with it: AdamW's range divided by 10 (low) .. 3 (high).
    assert lion.low == pytest.approx(adamw.low / 10) and lion.high == pytest.approx(adamw.high / 3)
    assert lion.low <= lion.learning_rate <= lion.high
    if adamw.weight_decay > 0:
        assert 3 <= lion.weight_decay / adamw.weight_decay <= 10
    else:  # LoRA: no weight decay on adapters, whatever the optimizer
        assert lion.weight_decay == 0.0
    assert "Lion" in lion.reason


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name, same_as", [
    ("adamw_8bit", "adamw"), ("paged_adamw_8bit", "adamw"), ("adam", "adamw"), ("lion_8bit", "lion"),
])
def test_variants_share_their_family_values(scenario: str, name: str, same_as: str):
    p = lr_preset(scenario, name)
    assert p.optimizer == name
    assert replace(p, optimizer=same_as) == lr_preset(scenario, same_as)


def test_unknown_scenario_lists_the_choices():
    with pytest.raises(ValueError, match="unknown scenario 'huge'") as info:
        lr_preset("huge")
    assert all(s in str(info.value) for s in SCENARIOS)


@pytest.mark.parametrize("optimizer", ["adagrad", "adafactor", "adamx"])
def test_an_optimizer_without_a_rule_lists_the_ones_with_one(optimizer: str):
    with pytest.raises(ValueError, match=f"optimizer '{optimizer}'") as info:
        lr_preset("standard", optimizer)
    for name in ("adamw", "adamw_8bit", "paged_adamw_8bit", "adam", "lion", "lion_8bit"):
        assert name in str(info.value)


@pytest.mark.parametrize("lr, batch, ref, rule, expected", [
    (5e-5, 256, 32, "sqrt", 1.4142135623730951e-4),
    (5e-5, 8, 32, "sqrt", 2.5e-5),
    (5e-5, 64, 32, "linear", 1e-4),
    (5e-5, 16, 32, "linear", 2.5e-5),
    (5e-5, 256, 32, "none", 5e-5),
])
def test_scaled_lr(lr, batch, ref, rule, expected):
    assert scaled_lr(lr, batch, ref, rule) == pytest.approx(expected, rel=1e-12)


def test_scaled_lr_rounding_example():
    assert f"{scaled_lr(5e-5, 256, 32, 'sqrt'):.4g}" == "0.0001414"


@pytest.mark.parametrize("rule", typing.get_args(typing.get_type_hints(OptimConfig)["scale_lr"]))
def test_every_recipe_scaling_rule_is_implemented_and_neutral_at_the_reference(rule: str):
    assert scaled_lr(3e-5, 32, 32, rule) == pytest.approx(3e-5)
    assert scaled_lr(3e-5, 64, 32, rule) >= 3e-5


def test_unknown_scaling_rule():
    with pytest.raises(ValueError, match="none, linear, sqrt"):
        scaled_lr(5e-5, 64, 32, "cube")


def test_lr_table_rows_match_the_presets():
    lines = format_lr_table().splitlines()
    assert lines[0].split() == ["scenario", "optimizer", "lr", "range", "wd"]
    rows = [line.split() for line in lines[1:lines.index("")]]
    assert [(r[0], r[1]) for r in rows] == [(s, o) for s in SCENARIOS for o in GUIDE_OPTIMIZERS]
    assert GUIDE_OPTIMIZERS == ("adamw", "lion", "muon", "schedule_free_adamw")
    for scenario, optimizer, lr, _low, _dots, _high, wd in rows:
        p = lr_preset(scenario, optimizer)
        assert float(lr) == p.learning_rate, (scenario, optimizer, lr)
        assert math.isclose(float(wd), p.weight_decay), (scenario, optimizer, wd)


def test_lr_table_gives_every_reason():
    table = format_lr_table()
    for scenario in SCENARIOS:
        assert f"\n{scenario}: {lr_preset(scenario).reason}." in table
    assert "\nlion: " in table and "\nmuon: " in table and "\nschedule_free_adamw: " in table
    only_adamw = format_lr_table(("adamw",))
    assert "lion " not in only_adamw.split("\n\n")[0] and "\nlion: " not in only_adamw


def test_lora_reason_says_how_the_lr_moves_with_rank_and_rslora():
    reason = lr_preset("lora").reason
    assert "alpha/r" in reason and "alpha/sqrt(r)" in reason and "use_rslora" in reason
    assert "divide the LR by about sqrt(r)" in reason and "loraplus_lr_ratio" in reason


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_muon_takes_adamws_values_and_schedule_free_1_to_10x(scenario: str):
    adamw = lr_preset(scenario)
    assert replace(lr_preset(scenario, "muon"), optimizer="adamw", reason=adamw.reason) == adamw
    assert "match_rms_adamw" in lr_preset(scenario, "muon").reason
    free = lr_preset(scenario, "schedule_free_adamw")
    assert free.learning_rate == pytest.approx(adamw.learning_rate * 10 ** 0.5, rel=0.05)
    assert (free.low, free.high) == (adamw.low, pytest.approx(adamw.high * 10))
    assert free.weight_decay == adamw.weight_decay


@pytest.mark.parametrize("optimizer, ratio", [("adamw_8bit", 1.0), ("rmsprop", 1.0),
                                              ("lion", 1 / math.sqrt(30)), ("sgd", math.sqrt(1e5))])
def test_equivalent_lr_follows_the_optimizers_rule(optimizer: str, ratio: float):
    from lrft.presets import equivalent_lr

    assert equivalent_lr(5e-5, optimizer) == pytest.approx(5e-5 * ratio, rel=0.02)
    assert lr_preset("standard", optimizer).learning_rate == equivalent_lr(5e-5, optimizer)
