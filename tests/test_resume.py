"""One run per folder at a time, and resuming after the recipe changed (issue 16, items 6 and 7)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, bert_recipe, write_recipe

from lrft.checkpoint import LOCK_FILE
from lrft.errors import RecipeError, UserError
from lrft.train import train


def _records(out, kind=None):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["kind"] == kind]


def test_a_second_run_on_a_busy_folder_is_refused_naming_the_holder(tiny_bert, tiny_glue, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", bert_recipe(
        tiny_bert, tiny_glue, out, max_steps=400, eval_steps=None, logging_steps=50))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-m", "lrft.cli", "train", str(recipe)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before the second could start"
        second = subprocess.run([sys.executable, "-m", "lrft.cli", "train", str(recipe)], env=env,
                                capture_output=True, text=True, timeout=300)
    finally:
        assert first.wait(timeout=600) == 0
    assert second.returncode == 2
    assert f"is in use by another run (pid {first.pid} on {socket.gethostname()}" in second.stderr
    assert "Traceback" not in second.stderr
    assert len(_records(out, "start")) == 1  # one run's records, not two interleaved
    steps = [r["step"] for r in _records(out, "train")]
    assert steps == sorted(steps) and len(steps) == len(set(steps))
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_a_lock_left_by_a_dead_process_is_taken_over(tiny_bert, tiny_glue, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (out / LOCK_FILE).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(),
                                             "started": "earlier"}))
    recipe = write_recipe(tmp_path / "r.yaml", bert_recipe(tiny_bert, tiny_glue, out, max_steps=2,
                                                           eval_steps=None))
    assert train(recipe)["status"] == "completed"
    assert f"took over the lock of a run that is gone (pid {dead}" in capsys.readouterr().out


def test_a_lock_from_another_host_is_not_guessed_at(tiny_bert, tiny_glue, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "node-17", "started": "then"}))
    recipe = write_recipe(tmp_path / "r.yaml", bert_recipe(tiny_bert, tiny_glue, out, max_steps=2))
    with pytest.raises(UserError, match=f"pid 1 on node-17.*delete {out / LOCK_FILE}"):
        train(recipe)


@pytest.fixture
def interrupted(tiny_bert, tiny_glue, tmp_path):
    """A 20-step run (constant LR 3e-3 after 2 warmup steps) that kept its checkpoint at 10."""
    out = tmp_path / "run"
    recipe = bert_recipe(tiny_bert, tiny_glue, out, max_steps=20, save_steps=10, eval_steps=None)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    train(path)
    (out / "results.json").unlink()  # as if it had been killed after step 10's checkpoint
    return path, out


def test_a_resume_with_more_steps_and_a_lower_lr_applies_both_and_says_so(interrupted, capsys):
    path, out = interrupted
    results = train(path, ["train.resume_from_checkpoint=latest", "train.max_steps=30",
                           "optim.learning_rate=1e-3"])
    assert results["step"] == 30
    printed = capsys.readouterr().out
    assert "resume: optim.learning_rate: 0.003 -> 0.001" in printed
    assert "resume: train.max_steps: 20 -> 30" in printed
    (record,) = _records(out, "resume")
    assert record["step"] == 10 and record["num_training_steps"] == 30
    assert record["changes"] == {"train.max_steps": [20, 30],
                                 "optim.learning_rate": [0.003, 0.001]}
    lrs = {r["step"]: sorted(r["lr"].values()) for r in _records(out, "train")}
    assert lrs[10] == [0.003, 0.003]
    assert lrs[11] == lrs[30] == [pytest.approx(1e-3), pytest.approx(1e-3)]


@pytest.mark.parametrize("override, key", [
    ("train.per_device_train_batch_size=16", "train.per_device_train_batch_size"),
    ("optim.name=sgd", "optim.name"),
    ("train.seed=1", "train.seed"),
])
def test_a_resume_that_would_mix_two_runs_is_refused(interrupted, override, key):
    path, out = interrupted
    with pytest.raises(RecipeError) as info:
        train(path, ["train.resume_from_checkpoint=latest", override])
    (problem,) = info.value.problems
    assert problem.startswith(f"{key}: ") and "a resumed run must keep it" in problem


def test_a_resume_ending_before_the_checkpoint_is_refused(interrupted):
    path, _ = interrupted
    with pytest.raises(RecipeError, match="already did 10 steps and would now end at 5"):
        train(path, ["train.resume_from_checkpoint=latest", "train.max_steps=5"])
