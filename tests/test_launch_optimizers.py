"""Muon and schedule-free AdamW through `accelerate launch -m lrft.train`, in subprocesses.

- Muon with AdamW is one optimizer (lrft/muon.py), so the schedule steps it once per optimizer
  step like any other: 2 CPU processes log the same LR for every group, Muon's and AdamW's, at
  every step as 1 process with the same global batch, and the same losses to 1e-3 (the one
  2-process launch here; tests/test_launch.py explains why the rows are the same).
- Schedule-free AdamW on a tiny Llama: evaluates before and after, checkpoints and saves its
  averaged weights, and the held-out loss falls.
The launch helpers and the dropout-free tiny BERT are tests/test_launch.py's.
"""

from __future__ import annotations

import json

import pytest
from conftest import write_recipe
from test_launch import _free_port, _launch_recipe, _records, _run, _script
from test_launch import bert_no_dropout  # noqa: F401 (a fixture)

from lrft.train import train


@pytest.mark.slow
def test_muon_on_two_processes_matches_one(tmp_path, bert_no_dropout, tiny_glue):  # noqa: F811
    recipe = _launch_recipe(tmp_path, bert_no_dropout, tiny_glue, batch=4)
    muon = ["optim.name=muon", "optim.layer_decay=0.8", "train.seed=7"]
    one = tmp_path / "one"
    train(recipe, [*muon, f"train.output_dir={one}", "train.per_device_train_batch_size=8"])
    launch = _script("accelerate", "accelerate.commands.accelerate_cli")
    _run([*launch, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
          str(_free_port()), "-m", "lrft.train", recipe, *muon], tmp_path, ACCELERATE_USE_CPU="1")

    two = tmp_path / "run"
    start_one, start_two = _records(one, "start")[0], _records(two, "start")[0]
    assert start_two["num_processes"] == 2 and start_two["effective_batch_size"] == 8
    assert start_two["groups"] == start_one["groups"]
    assert start_two["algorithms"] == start_one["algorithms"]
    assert {"muon", "adamw"} == set(start_two["algorithms"].values())
    steps_one, steps_two = _records(one, "train"), _records(two, "train")
    assert [r["step"] for r in steps_two] == [r["step"] for r in steps_one] == list(range(1, 25))
    for a, b in zip(steps_one, steps_two):
        assert b["lr"] == a["lr"], a["step"]  # exactly, every group
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-3), a["step"]


@pytest.mark.slow
def test_schedule_free_on_a_tiny_llama(tmp_path, tiny_llama, causal_files):
    recipe = write_recipe(tmp_path / "r.yaml", {
        "model": {"name_or_path": str(tiny_llama), "task": "causal_lm"},
        "data": {"format": "messages", "train_files": [str(causal_files["messages-train"])],
                 "eval_files": [str(causal_files["messages-eval"])], "max_length": 32},
        "optim": {"name": "schedule_free_adamw", "learning_rate": 3e-3},
        "schedule": {"lr_scheduler_type": "constant_with_warmup", "warmup_steps": 2},
        "train": {"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 8,
                  "max_steps": 16, "logging_steps": 4, "eval_at_start": True, "save_steps": 8,
                  "seed": 0, "num_threads": 1},
        "log": {"report_to": ["none"]}})
    launch = _script("accelerate", "accelerate.commands.accelerate_cli")
    _run([*launch, "launch", "--cpu", "--num_processes", "1", "-m", "lrft.train", recipe],
         tmp_path)
    out = tmp_path / "run"
    assert _records(out, "start")[0]["optimizer"] == "schedule_free_adamw"
    evals = [r["splits"]["validation"]["eval_loss"] for r in _records(out, "eval")]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.5, evals
    assert json.loads((out / "results.json").read_text())["status"] == "completed"
    assert (out / "model.safetensors").exists() and (out / "checkpoint-8").is_dir()
