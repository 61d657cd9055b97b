"""Tests for the `lrft` command line: subcommands, light imports, `check` and `lr-guide` output."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lrft
import lrft.cli
from lrft.presets import SCENARIOS, format_lr_table

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("train", "check", "compare", "find-lr", "diagnose", "lr-guide")
HEAVY = ("torch", "transformers", "peft")


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run Python in a fresh process, with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def imported_after(code: str, names: tuple[str, ...] = HEAVY) -> list[str]:
    """Which of `names` a fresh interpreter has imported after running `code`."""
    out = run("-c", f"import sys\n{code}\nprint(sorted(m for m in {names!r} if m in sys.modules))")
    assert out.returncode == 0, out.stderr
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def test_help_lists_every_subcommand():
    out = run("-m", "lrft.cli", "--help")
    assert out.returncode == 0, out.stderr
    for name in SUBCOMMANDS:
        assert re.search(rf"^\s+{re.escape(name)}\s+\S", out.stdout, re.M), name
    assert set(lrft.cli.COMMANDS) == set(SUBCOMMANDS)


def test_no_command_prints_help(capsys):
    assert lrft.cli.main([]) == 0
    assert "lr-guide" in capsys.readouterr().out


def test_version():
    out = run("-m", "lrft.cli", "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"lrft {lrft.__version__}"


@pytest.mark.parametrize("code", [
    "import lrft.cli; lrft.cli.build_parser()",
    "import lrft",
    "import lrft.cli; lrft.cli.main(['lr-guide'])",
    "import lrft.cli; lrft.cli.main(['check', 'recipes/bert/standard.yaml'])",
])
def test_light_paths_import_no_heavy_library(code: str):
    assert imported_after(code) == []


def test_the_import_probe_sees_imports():
    """The probe above is not vacuous: what the code imports shows up (yaml: cheaper than torch)."""
    assert imported_after("import yaml", ("yaml", *HEAVY)) == ["yaml"]


def test_check_bad_recipe_exits_2_with_a_short_message(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {ROOT / 'recipes/bert/standard.yaml'}\n"
                   "optim:\n  learning_rate: -1.0\n  learnin_rate: 3.0e-5\n")
    out = run("-m", "lrft.cli", "check", str(bad), "schedule.warmup_ratio=abc")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert 1 < len(lines) <= 24, out.stderr  # one screen
    assert lines[0] == f"lrft check: 3 problem(s) in {bad}:"
    for key in ("optim.learning_rate:", "optim.learnin_rate:", "schedule.warmup_ratio:"):
        assert sum(line.startswith(f"  - {key}") for line in lines) == 1, key
    assert "did you mean 'learning_rate'" in out.stderr


@pytest.mark.parametrize("argv", [
    ["check", "no/such/recipe.yaml"],
    ["check", "recipes/bert/standard.yaml", "learning_rate"],
    ["check", "recipes"],
])
def test_check_user_errors_never_show_a_traceback(argv: list[str]):
    out = run("-m", "lrft.cli", *argv)
    assert out.returncode == 2
    assert out.stderr.startswith("lrft check: ") and "Traceback" not in out.stderr


def test_check_good_recipe_prints_yaml_that_reads_back():
    out = run("-m", "lrft.cli", "check", "recipes/bert/standard.yaml", "optim.learning_rate=3e-5",
              "train.max_steps=100")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("# recipes/bert/standard.yaml: valid\n")
    data = yaml.safe_load(out.stdout)
    assert list(data) == ["model", "data", "optim", "schedule", "train", "lora", "log", "guard"]
    assert data["optim"]["learning_rate"] == 3e-5  # the override
    assert data["train"]["max_steps"] == 100
    assert data["schedule"]["warmup_ratio"] == 0.06  # from recipes/bert/base.yaml
    assert data["model"]["name_or_path"] == "bert-base-uncased"


def test_check_validates_a_comparison_spec_and_lists_its_grid(tmp_path: Path):
    spec = tmp_path / "cmp.yaml"
    spec.write_text(f"base: {ROOT / 'recipes/bert/standard.yaml'}\noutput_dir: {tmp_path / 'out'}\n"
                    "tasks: [rte, sst2]\nseeds: [1, 2]\n"
                    "optimizers: {adamw: {name: adamw}, lion: {name: lion}}\n"
                    "learning_rates: {adamw: [1.0e-5, 3.0e-5], lion: [3.0e-6]}\n")
    out = run("-m", "lrft.cli", "check", str(spec), "seeds=[1]")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"# {spec}: valid comparison: 6 cells (3 optimizer-LR rows x 2 "
                               f"tasks x 1 seeds)")
    assert [x.strip() for x in lines[2:5]] == ["adamw-lr1e-05", "adamw-lr3e-05", "lion-lr3e-06"]
    assert lines[-1] == f"run: lrft compare {spec} 'seeds=[1]'"
    bad = run("-m", "lrft.cli", "check", str(spec), "learning_rates.sgd=[0.01]")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("lrft check: ") and "learning_rates.sgd" in bad.stderr


def test_lr_guide_prints_the_table():
    out = run("-m", "lrft.cli", "lr-guide")
    assert out.returncode == 0, out.stderr
    assert out.stdout == format_lr_table() + "\n"
    rows = {tuple(line.split()[:2]) for line in out.stdout.splitlines()}
    for scenario in SCENARIOS:
        assert (scenario, "adamw") in rows and (scenario, "lion") in rows


def test_lazy_public_helpers():
    from lrft import load_recipe, lr_preset

    import lrft.presets
    import lrft.recipe

    assert load_recipe is lrft.recipe.load_recipe
    assert lr_preset is lrft.presets.lr_preset
    assert lr_preset("standard").learning_rate == 5e-5
    assert load_recipe(ROOT / "recipes/bert/lora.yaml").optim.learning_rate == 1e-4
    assert {"load_recipe", "lr_preset", "RecipeError"} <= set(dir(lrft))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lrft.nope  # noqa: B018


@pytest.mark.parametrize("name", ["load_recipe", "Recipe", "RecipeError", "lr_preset", "scaled_lr"])
def test_light_exports_resolve_to_their_module(name: str):
    module = lrft._EXPORTS[name]
    assert getattr(lrft, name) is getattr(__import__(module, fromlist=[name]), name)
    assert name in lrft.__all__
