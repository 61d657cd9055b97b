"""lrft.hf inside real transformers.Trainer runs on a tiny BERT: the step count, every group's LR at
every step, the lr/<group> logs, the guard's skip and rollback, resume from a Trainer checkpoint,
and the range test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_hf import base_lrs, make_trainer, recipe_file, tiny_model, training_args
from transformers import TrainerCallback

from lrft.groups import param_groups
from lrft.hf import GroupLRCallback, attach, find_lr, optimizers, trainer_steps
from lrft.schedule import lr_multiplier

torch.set_num_threads(1)

LR, DECAY = 1e-3, 0.5
SCHEDULE = {"lr_scheduler_type": "linear", "warmup_steps": 2, "min_lr_ratio": 0.1}


class Recorder(TrainerCallback):
    """What each optimizer step k (0-based: the global_step it starts from) used, and the logs."""

    def __init__(self):
        self.lrs, self.weights, self.logs = {}, {}, []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {n: p.detach().clone()
                                           for n, p in model.named_parameters()}

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs[state.global_step] = {g["name"]: g["lr"] for g in optimizer.param_groups}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {n: p.detach().clone()
                                           for n, p in model.named_parameters()}

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


class NanAt(TrainerCallback):
    """Makes the classifier's input NaN on the step starting at global_step `step`: a NaN batch."""

    def __init__(self, model, step):
        self.step, self.active = step, False
        model.classifier.register_forward_pre_hook(
            lambda module, inputs: (inputs[0] * math.nan,) if self.active else None)

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step == self.step


class LrSpikeAt(TrainerCallback):
    """Multiplies every group's LR by `factor` for the one step starting at global_step `step`."""

    def __init__(self, step, factor=1e3):
        self.step, self.factor = step, factor

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == self.step:
            for group in optimizer.param_groups:
                group["lr"] *= self.factor

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == self.step:
            for group in optimizer.param_groups:
                group["lr"] /= self.factor


def expected_lr(bases: dict, name: str, k: int, total: int, scale: float = 1.0) -> float:
    return scale * bases[name] * lr_multiplier("linear", k, total, warmup_steps=2,
                                               min_lr_ratio=0.1)


def history(trainer, step: int) -> dict:
    """The training log entry of `step` in trainer_state's log_history."""
    return next(e for e in trainer.state.log_history if e.get("step") == step and "loss" in e)


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---- the step count ------------------------------------------------------------------------------

@pytest.mark.parametrize("how, args", [
    ("attach", {"gradient_accumulation_steps": 3, "num_train_epochs": 1.5}),
    ("attach", {"gradient_accumulation_steps": 3, "num_train_epochs": 1.5,
                "dataloader_drop_last": True}),
    ("attach", {"max_steps": 7, "gradient_accumulation_steps": 2}),
    ("pair", {"num_train_epochs": 0.5}),  # Trainer(optimizers=..., callbacks=[GroupLRCallback()])
])
def test_schedule_is_sized_to_the_steps_the_trainer_runs(tmp_path, tiny_bert, how, args):
    if how == "attach":
        trainer = attach(make_trainer(tiny_bert, tmp_path, **args), lr=LR, verbose=False)
    else:
        model = tiny_model(tiny_bert)
        pair = optimizers(training_args(tmp_path, **args), model, 37, lr=LR, verbose=False)
        trainer = make_trainer(tiny_bert, tmp_path, model=model, optimizers=pair,
                               callbacks=[GroupLRCallback()], **args)
    planned = trainer.lr_scheduler.lrft["num_training_steps"]
    assert planned == trainer_steps(trainer.args, trainer.train_dataset)
    trainer.train()
    assert trainer.state.global_step == trainer.state.max_steps == planned
    # linear decay ends exactly at the last step: the LR it scheduled past the run is 0
    assert trainer.lr_scheduler.get_last_lr() == pytest.approx([0.0] * len(base_lrs(
        trainer.optimizer)))
    assert all("lr/body" in e for e in trainer.state.log_history if "loss" in e)


def test_a_pair_sized_for_another_run_is_refused_before_any_step(tmp_path, tiny_bert):
    model = tiny_model(tiny_bert)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pair = optimizers(training_args(tmp_path), model, 100, lr=LR, verbose=False)  # not 37 rows
    trainer = make_trainer(tiny_bert, tmp_path, model=model, optimizers=pair,
                           callbacks=[GroupLRCallback()])
    with pytest.raises(ValueError, match="sized for 75 optimizer steps but this Trainer runs 30"):
        trainer.train()
    assert_same_weights(before, {n: p.detach() for n, p in model.named_parameters()})


# ---- every group's LR at every step, and the logs ------------------------------------------------

def test_every_group_trains_at_its_base_lr_times_the_schedule(tmp_path, tiny_bert):
    recipe = recipe_file(tmp_path / "llrd.yaml", tiny_bert,
                         {"learning_rate": LR, "layer_decay": DECAY}, SCHEDULE)
    recorder = Recorder()
    trainer = make_trainer(tiny_bert, tmp_path, callbacks=[recorder], num_train_epochs=2,
                           gradient_accumulation_steps=2, report_to=["tensorboard"])
    attach(trainer, recipe, verbose=False)
    trainer.train()

    total = trainer.state.max_steps
    assert total == 10  # 10 batches of 4 per epoch, 2 per step, 2 epochs
    groups = param_groups(tiny_model(tiny_bert), LR, 0.01, layer_decay=DECAY)
    bases = {g["name"]: g["lr"] for g in groups}
    assert bases["head"] == LR and bases["layer.1"] == LR * DECAY
    assert bases["embeddings"] == pytest.approx(LR * DECAY ** 3)
    assert sorted(recorder.lrs) == list(range(total))
    for k, lrs in recorder.lrs.items():
        assert lrs.keys() == bases.keys()
        for name, lr in lrs.items():
            assert lr == pytest.approx(expected_lr(bases, name, k, total), rel=1e-12, abs=0)

    # the log at step s carries the LR of every group that step used, in the history and in what
    # the callbacks after it (trackers) receive; `learning_rate` is the Trainer's first group
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in train_logs] == list(range(1, total + 1))
    for entry, seen in zip(train_logs, [log for log in recorder.logs if "loss" in log]):
        used = recorder.lrs[entry["step"] - 1]
        assert {k[3:]: v for k, v in entry.items() if k.startswith("lr/")} == used
        assert entry["learning_rate"] == used["embeddings"]
        assert {k: v for k, v in seen.items() if k.startswith("lr/")} == \
            {f"lr/{k}": v for k, v in used.items()}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(tmp_path.glob("runs/*")))).Reload()
    for name in bases:
        values = [e.value for e in events.Scalars(f"train/lr/{name}")]
        assert values == pytest.approx([recorder.lrs[k][name] for k in range(total)], rel=1e-6)


# ---- the guard -----------------------------------------------------------------------------------

def test_guard_skips_a_nan_batch_and_the_run_goes_on(tmp_path, tiny_bert):
    recorder = Recorder()
    trainer = make_trainer(tiny_bert, tmp_path, callbacks=[recorder], max_steps=8,
                           logging_steps=4)
    trainer.add_callback(NanAt(trainer.model, step=3))
    attach(trainer, lr=LR, lr_scheduler_type="linear", guard={"action": "skip"}, verbose=False)
    trainer.train()

    assert trainer.state.global_step == 8
    assert_same_weights(recorder.weights[3], recorder.weights[4])  # the NaN step moved nothing
    assert not torch.equal(recorder.weights[4]["classifier.weight"],
                           recorder.weights[5]["classifier.weight"])  # the next one did
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    guard = next(cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "events"))
    assert [(e["step"], e["event"]) for e in guard.events] == [(4, "nan_loss"), (4, "skip")]
    entry = history(trainer, 4)  # an extra log at the event's own step (logging_steps is 4 anyway)
    assert entry["guard/nan_loss"] == 1.0 and entry["guard/skip"] == 1.0
    assert "loss is nan" in entry["guard/detail"]
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [4, 8]
    for k in range(8):  # a skip leaves the schedule alone
        assert recorder.lrs[k]["body"] == pytest.approx(LR * lr_multiplier("linear", k, 8))


@pytest.mark.parametrize("factor, max_grad_norm, event", [
    (1e4, 1.0, "loss_spike"),
    # The Trainer clips before the guard looks: only without clipping does the guard see the
    # gradient norm jump (x 1e3 with clipping at 1.0 stays under it and is not flagged)
    (1e3, 0.0, "grad_spike"),
])
def test_guard_rolls_back_an_lr_spike_and_lowers_every_group(tmp_path, tiny_bert, factor,
                                                             max_grad_norm, event):
    recorder = Recorder()
    trainer = make_trainer(tiny_bert, tmp_path, callbacks=[recorder, LrSpikeAt(7, factor)],
                           max_steps=14, max_grad_norm=max_grad_norm)
    attach(trainer, lr=LR, layer_decay=DECAY, **SCHEDULE,
           guard={"action": "rollback", "snapshot_steps": 2, "lr_backoff": 0.5}, verbose=False)
    bases = base_lrs(trainer.optimizer)
    trainer.train()

    guard = next(cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "events"))
    events = [(e["step"], e["event"]) for e in guard.events]
    assert events == [(9, event), (9, "rollback")]  # the step after the spike, 1-based
    # the last snapshot was taken checking step 7: the weights after step 6 (global_step 6)
    assert_same_weights(recorder.weights[6], recorder.weights[9])
    for k in range(14):  # the recorder reads the LRs before the spike callback scales them
        scale = 1.0 if k <= 8 else 0.5
        for name in bases:
            assert recorder.lrs[k][name] == pytest.approx(
                expected_lr(bases, name, k, 14, scale), rel=1e-12)
    assert trainer.lr_scheduler.lrft["rollbacks"] == 1
    assert trainer.lr_scheduler.lrft["lr_scale"] == 0.5
    entry = history(trainer, 9)
    assert entry[f"guard/{event}"] == 1.0 and entry["guard/rollback"] == 1.0
    assert entry["guard/lr_scale"] == 0.5
    assert history(trainer, 14)["loss"] < history(trainer, 9)["loss"]


# ---- resume --------------------------------------------------------------------------------------

def run_to(tmp_path, tiny_bert, resume_from=None):
    """14 steps, a checkpoint every 5; a NaN batch at step 3: the guard rolls back, LR x 0.5."""
    recorder = Recorder()
    trainer = make_trainer(tiny_bert, tmp_path, callbacks=[recorder], max_steps=14,
                           save_strategy="steps", save_steps=5, gradient_accumulation_steps=2)
    trainer.add_callback(NanAt(trainer.model, step=2))
    attach(trainer, lr=LR, layer_decay=DECAY, **SCHEDULE, guard={"snapshot_steps": 2},
           verbose=False)
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, recorder


def test_trainer_resume_continues_with_the_same_group_lrs(tmp_path, tiny_bert):
    whole, seen = run_to(tmp_path / "whole", tiny_bert)
    assert whole.lr_scheduler.lrft["rollbacks"] == 1  # the guard's backoff is part of the run
    resumed, seen_after = run_to(tmp_path / "whole", tiny_bert,
                                 resume_from=str(tmp_path / "whole" / "checkpoint-5"))

    assert sorted(seen_after.lrs) == list(range(5, 14))
    bases = base_lrs(whole.optimizer)  # initial_lr, with the guard's backoff
    assert bases["head"] == 0.5 * LR and bases["layer.1"] == 0.5 * LR * DECAY
    for k in range(5, 14):
        assert seen_after.lrs[k] == seen.lrs[k]  # exactly
        for name in bases:
            assert seen.lrs[k][name] == pytest.approx(expected_lr(bases, name, k, 14), rel=1e-12)
    assert resumed.lr_scheduler.lrft["rollbacks"] == 1
    assert_same_weights(seen.weights[14], seen_after.weights[14])
    logged = [{k: v for k, v in e.items() if k.startswith("lr/")} for e in
              resumed.state.log_history if "loss" in e and e["step"] > 5]
    assert logged == [{f"lr/{n}": v for n, v in seen.lrs[k].items()} for k in range(5, 14)]


# ---- the range test ------------------------------------------------------------------------------

def test_range_test_keeps_the_group_ratios_and_leaves_no_trace(tmp_path, tiny_bert):
    trainer = attach(make_trainer(tiny_bert, tmp_path / "a", max_steps=6), lr=LR,
                     layer_decay=DECAY, verbose=False)
    bases = base_lrs(trainer.optimizer)
    swept = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: swept.append({g["name"]: g["lr"] for g in opt.param_groups}))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    result = find_lr(trainer, num_steps=8, output_dir=tmp_path / "find_lr", verbose=False)

    assert len(swept) == len(result.multipliers) == 8
    for lrs, m in zip(swept, result.multipliers):
        assert {n: lr / bases[n] for n, lr in lrs.items()} == pytest.approx(
            dict.fromkeys(bases, m), rel=1e-12)
    assert result.group_base_lrs == bases and result.base_lr == LR
    assert np.allclose(result.multipliers, np.geomspace(1e-3, 1e3, 8))
    assert (tmp_path / "find_lr" / "lr_range_test.csv").exists()
    assert_same_weights(before, {n: p.detach() for n, p in trainer.model.named_parameters()})
    assert not trainer.optimizer.state  # the sweep's moments are gone
    trainer.train()

    untouched = attach(make_trainer(tiny_bert, tmp_path / "b", max_steps=6), lr=LR,
                       layer_decay=DECAY, verbose=False)
    untouched.train()
    assert_same_weights(dict(trainer.model.named_parameters()),
                        dict(untouched.model.named_parameters()))


# ---- schedule-free AdamW -------------------------------------------------------------------------

def test_schedule_free_checkpoints_and_final_model_hold_the_averaged_weights(tmp_path,
                                                                              tiny_bert):
    """The Trainer saves without switching a schedule-free optimizer to eval mode (it switches
    only around evaluations); attach's ScheduleFreeCallback does, before every save and at the
    end, so checkpoint-3 and the final model hold the average x, and training goes on from y."""
    import json

    from safetensors.torch import load_file

    recipe = recipe_file(tmp_path / "r.yaml", tiny_bert,
                         {"name": "schedule_free_adamw", "learning_rate": 1e-2},
                         {"lr_scheduler_type": "constant_with_warmup", "warmup_steps": 1})
    trainer = attach(make_trainer(tiny_bert, tmp_path / "run", max_steps=6,
                                  save_strategy="steps", save_steps=3), recipe, verbose=False)
    modes = []

    class Mode(TrainerCallback):  # the mode each optimizer step runs in
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            modes.append(optimizer.param_groups[0]["train_mode"])

    trainer.add_callback(Mode())
    trainer.train()
    assert modes == [True] * 6
    saved = torch.load(tmp_path / "run" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert {g["train_mode"] for g in saved["param_groups"]} == {False}  # saved in eval mode
    assert trainer.optimizer.param_groups[0]["train_mode"] is False  # the end: x in place
    trainer.save_model(str(tmp_path / "final"))
    final = load_file(tmp_path / "final" / "model.safetensors")
    live = dict(trainer.model.named_parameters())
    assert all(torch.equal(final[n], live[n].detach()) for n in final)
    # x differs from y: switching to train mode moves the weights
    trainer.optimizer.train()
    assert any(not torch.equal(final[n], live[n].detach()) for n in final)
    state = json.loads((tmp_path / "run" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
