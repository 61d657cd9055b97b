"""Tests for lrft.recipe: the shipped recipes, `base:` inheritance, overrides, validation, dumping."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

import lrft.recipe as recipe_mod
from lrft.recipe import (
    EIGHT_BIT_OPTIMIZERS, OPTIMIZERS, SCHEDULERS, SECTIONS, OptimConfig, Recipe, RecipeError,
    dump_recipe, load_recipe,
)

ROOT = Path(__file__).resolve().parents[1]
# Every runnable recipe; base.yaml files are fragments, recipes/glue/ has its own schema.
SHIPPED = sorted(
    p for p in ROOT.glob("recipes/**/*.yaml")
    if p.name != "base.yaml" and "glue" not in p.relative_to(ROOT / "recipes").parts[:1]
)
REGIME_LRS = {"full": 5e-6, "standard": 5e-5, "conservative": 4e-5, "lora": 1e-4}
MINIMAL = "model:\n  name_or_path: bert-base-uncased\ndata:\n  glue_task: sst2\n"


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def problems_of(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    assert info.value.problems, "a RecipeError must carry at least one problem"
    return info.value.problems


def header(path: Path) -> str:
    """The comment block a recipe opens with."""
    lines = path.read_text().splitlines()
    block = []
    for line in lines:
        if not line.startswith("#"):
            break
        block.append(line)
    return "\n".join(block)


@pytest.fixture
def minimal(tmp_path: Path) -> Path:
    return write(tmp_path, "minimal.yaml", MINIMAL)


# ----------------------------------------------------------------------------------------------
# The shipped recipes
# ----------------------------------------------------------------------------------------------

def test_the_shipped_recipe_set_is_complete():
    names = {rel(p) for p in SHIPPED}
    expected = {f"recipes/{fam}/{regime}.yaml" for fam in ("bert", "causal") for regime in REGIME_LRS}
    assert expected | {"recipes/quickstart.yaml"} <= names
    assert not any(n.startswith("recipes/glue/") or n.endswith("/base.yaml") for n in names)


@pytest.mark.parametrize("path", SHIPPED, ids=rel)
def test_shipped_recipe_loads_and_validates(path: Path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe_mod.validate(recipe) == []
    assert recipe.model.name_or_path
    assert recipe.train.output_dir.startswith("runs/")


@pytest.mark.parametrize("family", ["bert", "causal"])
@pytest.mark.parametrize("regime, lr", REGIME_LRS.items())
def test_regime_learning_rates(family: str, regime: str, lr: float):
    recipe = load_recipe(ROOT / "recipes" / family / f"{regime}.yaml")
    assert recipe.optim.learning_rate == lr
    assert isinstance(recipe.optim.learning_rate, float)
    assert recipe.lora.enabled is (regime == "lora")
    expected_task = "causal_lm" if family == "causal" else "sequence_classification"
    assert recipe.model.task == expected_task


@pytest.mark.parametrize("path", SHIPPED, ids=rel)
def test_recipe_header_has_launch_command_and_override_example(path: Path, monkeypatch):
    text = header(path)
    assert text, f"{rel(path)} must open with a comment"
    assert f"accelerate launch lrft/train.py {rel(path)}" in text
    examples = [line for line in text.splitlines() if "Override" in line]
    assert len(examples) == 1, f"{rel(path)}: one 'Override:' example line"
    overrides = [tok for tok in shlex.split(examples[0].lstrip("# ")) if re.fullmatch(r"\w+\.\w+=.+", tok)]
    assert overrides, f"{rel(path)}: the override example sets no section.key=value"
    # The documented example must itself be a valid invocation, and take effect. Pretend the
    # optional bitsandbytes is installed (the QLoRA example needs it; this box may lack it).
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    recipe = load_recipe(path, overrides)
    for item in overrides:
        key, _, text_value = item.partition("=")
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        expected = yaml.safe_load(text_value)
        assert value == (float(expected) if isinstance(value, float) else expected), item


@pytest.mark.parametrize("path", [p for p in SHIPPED if (p.parent / "base.yaml").exists()], ids=rel)
def test_recipes_next_to_a_base_inherit_from_it(path: Path):
    raw = yaml.safe_load(path.read_text())
    assert raw.get("base") == "base.yaml"
    base = yaml.safe_load((path.parent / "base.yaml").read_text())
    recipe = load_recipe(path)
    # Keys the child leaves alone come from the base.
    for section, values in base.items():
        for key, value in values.items():
            if key not in (raw.get(section) or {}):
                assert getattr(getattr(recipe, section), key) == value, f"{section}.{key}"


# ----------------------------------------------------------------------------------------------
# base: inheritance
# ----------------------------------------------------------------------------------------------

def test_child_wins_key_by_key_and_sections_merge(tmp_path: Path):
    write(tmp_path, "parent.yaml", MINIMAL + "optim:\n  learning_rate: 3.0e-5\n  weight_decay: 0.05\n"
                                            "train:\n  seed: 7\n")
    child = write(tmp_path, "child.yaml", "base: parent.yaml\noptim:\n  learning_rate: 1.0e-5\n")
    recipe = load_recipe(child)
    assert recipe.optim.learning_rate == 1e-5  # the child's value
    assert recipe.optim.weight_decay == 0.05  # the parent's, same section
    assert recipe.train.seed == 7  # a section only the parent has
    assert recipe.model.name_or_path == "bert-base-uncased"
    assert {"optim.learning_rate", "optim.weight_decay", "train.seed"} <= recipe.explicit


def test_chain_of_two_bases_relative_to_each_file(tmp_path: Path, monkeypatch):
    write(tmp_path, "a/grand.yaml", MINIMAL + "optim:\n  learning_rate: 1.0e-5\n  weight_decay: 0.1\n"
                                              "train:\n  seed: 1\n")
    write(tmp_path, "a/b/parent.yaml", "base: ../grand.yaml\noptim:\n  weight_decay: 0.2\n"
                                       "train:\n  seed: 2\n  logging_steps: 5\n")
    child = write(tmp_path, "a/b/c/child.yaml", "base: ../parent.yaml\ntrain:\n  seed: 3\n")
    monkeypatch.chdir(tmp_path)  # bases resolve against the file, not the working directory
    recipe = load_recipe(child)
    assert recipe.optim.learning_rate == 1e-5  # grandparent
    assert recipe.optim.weight_decay == 0.2  # parent beats grandparent
    assert recipe.train.logging_steps == 5  # parent
    assert recipe.train.seed == 3  # child beats both


def test_base_cycle_is_reported(tmp_path: Path):
    write(tmp_path, "a.yaml", "base: b.yaml\n" + MINIMAL)
    b = write(tmp_path, "b.yaml", "base: a.yaml\n")
    problems = problems_of(b)
    cycle = [p for p in problems if "cycle" in p]
    assert len(cycle) == 1 and cycle[0].startswith("base:")
    assert "a.yaml" in cycle[0] and "b.yaml" in cycle[0]


def test_missing_base_names_the_file(tmp_path: Path):
    child = write(tmp_path, "child.yaml", "base: nowhere.yaml\n" + MINIMAL)
    assert any("nowhere.yaml" in p and "no such file" in p for p in problems_of(child))


def test_base_must_be_a_path(tmp_path: Path):
    child = write(tmp_path, "child.yaml", "base: [a.yaml]\n" + MINIMAL)
    assert problems_of(child) == ["base: expected a path to another file, got ['a.yaml']"]


# ----------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, section, key, expected", [
    ("optim.learning_rate=3e-5", "optim", "learning_rate", 3e-5),  # a YAML-1.1 string, read as float
    ("optim.learning_rate=1", "optim", "learning_rate", 1.0),
    ("train.max_steps=100", "train", "max_steps", 100),
    ("model.gradient_checkpointing=true", "model", "gradient_checkpointing", True),
    ("log.report_to=[tensorboard]", "log", "report_to", ["tensorboard"]),
    ("train.max_grad_norm=null", "train", "max_grad_norm", None),
    ("train.output_dir=runs/a:b", "train", "output_dir", "runs/a:b"),
])
def test_typed_overrides(minimal: Path, override, section, key, expected):
    recipe = load_recipe(minimal, [override])
    value = getattr(getattr(recipe, section), key)
    assert value == expected and type(value) is type(expected)
    assert f"{section}.{key}" in recipe.explicit


def test_override_beats_file_and_base(tmp_path: Path):
    write(tmp_path, "parent.yaml", MINIMAL + "optim:\n  learning_rate: 1.0e-5\n")
    child = write(tmp_path, "child.yaml", "base: parent.yaml\noptim:\n  learning_rate: 2.0e-5\n")
    recipe = load_recipe(child, ["optim.learning_rate=3e-5"])
    assert recipe.optim.learning_rate == 3e-5
    assert isinstance(recipe.optim, OptimConfig)


def test_non_number_for_a_float_names_the_key(minimal: Path):
    assert problems_of(minimal, ["optim.learning_rate=abc"]) == [
        "optim.learning_rate: expected float, got 'abc'"]


def test_unknown_key_and_section_get_did_you_mean(minimal: Path):
    problems = problems_of(minimal, ["optim.learning_rat=1e-5", "optm.weight_decay=0.1"])
    assert len(problems) == 2
    assert any(p.startswith("optim.learning_rat:") and "did you mean 'learning_rate'" in p
               for p in problems)
    assert any(p.startswith("override optm.weight_decay:") and "did you mean 'optim'" in p
               for p in problems)


@pytest.mark.parametrize("bad, hint", [
    ("optim.learning_rate", "expected key=value"),
    ("learning_rate=3e-5", "the key must be section.key"),
    ("optim.args.lr=3e-5", "the key must be section.key"),
])
def test_malformed_override(minimal: Path, bad: str, hint: str):
    problems = problems_of(minimal, [bad])
    assert len(problems) == 1
    assert problems[0].startswith(f"override {bad!r}") and hint in problems[0]


def test_override_does_not_hide_a_malformed_section(tmp_path: Path):
    path = write(tmp_path, "r.yaml", MINIMAL + "optim: 5\n")
    problems = problems_of(path, ["optim.learning_rate=3e-5"])
    assert problems == ["optim: expected a mapping of keys, got 5"]


# ----------------------------------------------------------------------------------------------
# All problems at once
# ----------------------------------------------------------------------------------------------

def test_every_problem_is_reported_at_once(tmp_path: Path):
    path = write(tmp_path, "bad.yaml", MINIMAL + (
        "optim:\n  learning_rate: -1.0\n  weight_decay: heavy\n"
        "schedule:\n  warmup_ratio: 2.0\n"
        "train:\n  bogus: 1\n"
        "colour: blue\n"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["data.max_length=abc"])
    problems = info.value.problems
    expected_keys = ["optim.learning_rate", "optim.weight_decay", "schedule.warmup_ratio",
                     "train.bogus", "colour", "data.max_length"]
    assert len(problems) == len(expected_keys), problems
    for key in expected_keys:
        assert sum(p.startswith(f"{key}:") for p in problems) == 1, (key, problems)
    message = str(info.value)
    assert message.startswith(f"{len(problems)} problem(s) in {path}:")
    assert all(p in message for p in problems)


def test_yaml_1_1_exponent_without_dot_is_a_float(tmp_path: Path):
    text = MINIMAL + "optim:\n  learning_rate: 5e-5\n"
    assert yaml.safe_load(text)["optim"]["learning_rate"] == "5e-5"  # what PyYAML hands us
    recipe = load_recipe(write(tmp_path, "r.yaml", text))
    assert recipe.optim.learning_rate == 5e-5 and isinstance(recipe.optim.learning_rate, float)


# ----------------------------------------------------------------------------------------------
# Range and cross-field checks: each bad setting gives exactly one problem, naming its key
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    (["optim.learning_rate=-1e-5"], "optim.learning_rate"),
    (["optim.learning_rate=0"], "optim.learning_rate"),
    (["optim.learning_rate=5"], "optim.learning_rate"),
    (["schedule.warmup_ratio=-0.1"], "schedule.warmup_ratio"),
    (["schedule.warmup_ratio=1.5"], "schedule.warmup_ratio"),
    (["schedule.warmup_ratio=0.1", "schedule.warmup_steps=10"],
     "schedule.warmup_ratio and schedule.warmup_steps"),
    (["schedule.warmup_steps=200", "train.max_steps=100"], "schedule.warmup_steps"),
    (["optim.layer_decay=0"], "optim.layer_decay"),
    (["optim.layer_decay=1.5"], "optim.layer_decay"),
    (["lora.r=8"], "lora"),
    (["optim.name=sgd", "optim.adam_beta1=0.95"], "optim.adam_beta1"),
    (["optim.name=sgd", "optim.adam_epsilon=1e-6"], "optim.adam_epsilon"),
    (["optim.scale_lr=sqrt"], "optim.reference_batch_size"),
    (["optim.name=adamw_9bit"], "optim.name"),
    (["schedule.lr_scheduler_type=cosine", "schedule.power=2.0"], "schedule.power"),
    (["guard.window=5"], "guard"),
    (["train.max_steps=0"], "train.max_steps"),
])
def test_range_and_cross_field_checks(minimal: Path, overrides: list[str], key: str):
    problems = problems_of(minimal, overrides)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{key}:"), problems


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "1e400"])
def test_non_finite_numbers_are_rejected(minimal: Path, value: str):
    problems = problems_of(minimal, [f"optim.learning_rate={value}"])
    assert problems and all(p.startswith("optim.learning_rate:") for p in problems), problems
    assert any("not a finite number" in p for p in problems)


def test_stray_lora_key_message_names_it(minimal: Path):
    (problem,) = problems_of(minimal, ["lora.r=8", "lora.dropout=0.2"])
    assert "lora.r" in problem and "lora.dropout" in problem and "lora.enabled" in problem


@pytest.mark.parametrize("overrides", [
    ["schedule.warmup_ratio=0"], ["schedule.warmup_ratio=1"],
    ["schedule.warmup_steps=100", "train.max_steps=100"],
    ["optim.layer_decay=1"], ["optim.layer_decay=0.75"],
    ["lora.enabled=true", "lora.r=8"],
    ["optim.name=lion", "optim.adam_beta1=0.95"],  # Lion reads betas too
    ["optim.name=sgd", "optim.adam_beta1=0.9"],  # the default value changes nothing
    ["optim.scale_lr=sqrt", "optim.reference_batch_size=32"],
    ["schedule.lr_scheduler_type=polynomial", "schedule.power=2.0"],
])
def test_the_edges_of_each_range_are_accepted(minimal: Path, overrides: list[str]):
    load_recipe(minimal, overrides)


def test_eight_bit_without_bitsandbytes(minimal: Path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    installed = {"bitsandbytes": False}

    def fake_find_spec(name, *args):
        if name == "bitsandbytes":
            return object() if installed["bitsandbytes"] else None
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    for name in EIGHT_BIT_OPTIMIZERS:
        (problem,) = problems_of(minimal, [f"optim.name={name}"])
        assert problem.startswith("optim.name:") and "pip install bitsandbytes" in problem
    (problem,) = problems_of(minimal, ["lora.enabled=true", "lora.load_in_4bit=true"])
    assert problem.startswith("lora.load_in_4bit:") and "bitsandbytes" in problem
    installed["bitsandbytes"] = True
    assert load_recipe(minimal, ["optim.name=adamw_8bit"]).optim.name == "adamw_8bit"


# ----------------------------------------------------------------------------------------------
# to_dict / dump_recipe
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, overrides", [
    *[(p, []) for p in SHIPPED],
    # Non-default optimizer and schedule: the dump spells out every default (betas, lora.*,
    # gamma, ...), which must not trip the "set but not read" rules when loaded back.
    (ROOT / "recipes/bert/standard.yaml",
     ["optim.name=sgd", "schedule.lr_scheduler_type=step", "schedule.step_size=10"]),
], ids=lambda v: rel(v) if isinstance(v, Path) else "+".join(v))
def test_dump_round_trip(tmp_path: Path, path: Path, overrides: list[str]):
    recipe = load_recipe(path, overrides)
    data = recipe.to_dict()
    assert tuple(data) == SECTIONS
    assert data["optim"]["learning_rate"] == recipe.optim.learning_rate
    text = dump_recipe(recipe)
    assert yaml.safe_load(text) == data
    again = load_recipe(write(tmp_path, "dumped.yaml", text))
    assert again == recipe
    assert dump_recipe(again) == text


def test_explicit_lists_only_what_was_set(minimal: Path):
    recipe = load_recipe(minimal, ["optim.learning_rate=3e-5"])
    assert recipe.explicit == {"model.name_or_path", "data.glue_task", "optim.learning_rate"}




@pytest.mark.parametrize("override, expected", [
    ("log.report_to=[tensorbord]", "log.report_to: unknown tracker 'tensorbord'; did you mean "
                                   "'tensorboard'?"),
    ("log.report_to=[none, tensorboard]", "log.report_to: ['none', 'tensorboard'] mixes none"),
    ("model.attn_implementation=sdap", "model.attn_implementation: unknown kernel 'sdap'; did "
                                       "you mean 'sdpa'?"),
])
def test_keys_with_a_known_set_of_values_are_checked(minimal: Path, override: str, expected: str):
    (problem,) = problems_of(minimal, [override])
    assert problem.startswith(expected)


def test_a_tracker_that_is_not_installed_is_named(minimal: Path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    (problem,) = problems_of(minimal, ["log.report_to=[mlflow]"])
    assert "mlflow is not installed" in problem and "pip install mlflow" in problem


def test_hub_kernels_and_known_kernels_pass(minimal: Path):
    for kernel in ("eager", "sdpa", "flash_attention_2", "kernels-community/flash-attn"):
        assert load_recipe(minimal, [f"model.attn_implementation={kernel}"])
