"""Every bad input a clear error, round 2 (issue 18): each case once gave a traceback or a silently
wrong run; now it is a message naming the key and the fix (exit 2) or a correct run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, bert_recipe, write_recipe

import lrft.cli
from lrft.errors import RecipeError
from lrft.recipe import load_recipe
from lrft.train import train


def _cli(capsys, *argv) -> tuple[int, str, str]:
    status = lrft.cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def recipe(tmp_path, tiny_bert, tiny_glue) -> Path:
    return write_recipe(tmp_path / "r.yaml", bert_recipe(tiny_bert, tiny_glue, tmp_path / "run",
                                                         max_steps=2, eval_steps=None))


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_numpy_cannot_take_is_refused_at_check(recipe, seed):  # item 3
    with pytest.raises(RecipeError, match=r"train.seed: .* must be in \[0, 2\*\*32\)"):
        load_recipe(recipe, [f"train.seed={seed}"])


def test_launcher_options_are_checked_before_launching(recipe, capsys):  # items 5, 22
    status, _, err = _cli(capsys, "train", str(recipe), "--config_file", "nowhere.yaml")
    assert status == 2 and "--config_file: nowhere.yaml does not exist" in err
    status, _, err = _cli(capsys, "train", str(recipe), "--num_processes", "0")
    assert status == 2 and "--num_processes: 0 must be >= 1" in err


def test_a_user_error_under_the_launcher_is_one_message(recipe, tmp_path):  # item 5
    done = subprocess.run([sys.executable, "-m", "lrft.cli", "train", str(recipe),
                           "--num_processes", "1", "--config_file",
                           str(REPO / "accelerate_configs/cpu.yaml"), "data.glue_task=cola"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode != 0
    assert "lrft train:" in done.stderr and "Traceback" not in done.stderr
    assert "CalledProcessError" not in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--num_steps", "1"], "--num_steps: 1 must be >= 2"),
    (["--num_steps", "-5"], "--num_steps: -5 must be >= 2"),
    (["--start_mult", "1", "--end_mult", "0.1"], "--end_mult (0.1) must be above --start_mult"),
    (["--start_mult", "nan"], "--start_mult: nan must be a number > 0"),
])
def test_find_lr_arguments_are_checked_before_loading_anything(recipe, capsys, monkeypatch, args,
                                                               message):  # item 6
    import lrft.finder

    monkeypatch.setattr(lrft.finder, "find_lr_for_recipe", lambda *a, **k: pytest.fail("ran"))
    status, _, err = _cli(capsys, "find-lr", str(recipe), *args)
    assert status == 2 and message in err


def test_check_into_a_closed_pipe_is_quiet(recipe):  # item 9
    done = subprocess.run(f"{sys.executable} -m lrft.cli check {recipe} | head -1", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("# ") and "BrokenPipe" not in done.stderr
    assert "Traceback" not in done.stderr


def test_a_truncated_weights_file_is_a_clear_error(tmp_path, tiny_bert, tiny_glue, capsys):  # 10
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    path = write_recipe(tmp_path / "b.yaml", bert_recipe(broken, tiny_glue, tmp_path / "run",
                                                         max_steps=2))
    status, _, err = _cli(capsys, "train", str(path))
    assert status == 2 and "model.name_or_path: cannot load" in err and "Traceback" not in err


def test_a_key_twice_in_a_recipe_is_an_error(tmp_path):  # item 13
    path = tmp_path / "dup.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {glue_task: sst2}\n"
                    "train: {output_dir: runs/a}\ntrain: {max_steps: 5}\n")
    with pytest.raises(RecipeError, match="key 'train' appears twice .first on line 3.; keep one"):
        load_recipe(path)


def test_a_lora_target_typo_beside_a_valid_name_is_an_error(recipe):  # item 14
    with pytest.raises(RecipeError, match="lora.target_modules: 'valu' matches no module.*'value'"):
        train(recipe, ["lora.enabled=true", "lora.target_modules=[query, valu]"])


def test_betas_and_eps_have_one_place(recipe):  # item 15
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, ["optim.args={betas: [0.9, 0.95], eps: 1.0e-6}"])
    assert sorted(p.split(":")[0] for p in info.value.problems) == ["optim.args.betas",
                                                                   "optim.args.eps"]


def test_find_lr_apply_writes_nothing_when_the_loss_never_fell():  # item 16
    import numpy as np

    from lrft.finder import _suggestions

    rising = np.linspace(1.0, 3.0, 50)
    assert _suggestions(np.geomspace(1e-7, 1e-1, 50), rising) == (None, None)


def test_an_unclosed_list_override_is_an_error(recipe):  # item 18
    with pytest.raises(RecipeError, match=r"'\[none' opens a list that does not close"):
        load_recipe(recipe, ["log.report_to=[none"])


def test_overrides_may_follow_options(recipe, capsys, monkeypatch):  # item 20
    import lrft.finder

    seen = {}
    monkeypatch.setattr(lrft.finder, "find_lr_for_recipe",
                        lambda path, overrides, **k: seen.update(overrides=overrides, **k))
    status, _, _ = _cli(capsys, "find-lr", str(recipe), "--num_steps", "20",
                        "train.output_dir=elsewhere", "--apply")
    assert status == 0 and seen["overrides"] == ["train.output_dir=elsewhere"]
    assert seen["num_steps"] == 20 and seen["apply"] is True


def test_a_local_model_path_that_does_not_exist_says_so(recipe, capsys):  # item 22
    status, _, err = _cli(capsys, "train", str(recipe), "model.name_or_path=./no/such/model")
    assert status == 2 and "model.name_or_path: ./no/such/model does not exist" in err
    assert "Repo id" not in err


def test_an_infinite_learning_rate_is_named_without_a_bogus_suggestion(recipe):  # item 22
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, ["optim.learning_rate=1e400"])
    assert "optim.learning_rate: inf is not a finite number" in info.value.problems
    assert not any("infe-5" in p for p in info.value.problems)
