"""lrft.doctor on a Hugging Face Trainer's output folder (issue 14): the same curve written by
lrft and by the Trainer gets the same verdict, and the advice is written as TrainingArguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_doctor import (LR, LOG_EVERY, grad_norms, healthy_losses, records, write_run)

from lrft.doctor import diagnose, diagnose_run
from lrft.doctor.dialect import RECIPE, TRAINING_ARGUMENTS
from lrft.doctor.thresholds import WARMUP_RATIO
from lrft.doctor.trainer import TRAINER_STATE, read_trainer_log
from lrft.errors import UserError

WARMUP_ARG = TRAINING_ARGUMENTS.keys["warmup_ratio"]  # warmup_ratio, or warmup_steps (transformers 5)
EVERY_SETTING = {"learning_rate": "5e-06", "scale_lr": "none", "weight_decay": "0.1",
                 "warmup_ratio": str(WARMUP_RATIO), "max_grad_norm": "1.0", "max_steps": "300",
                 "logging_steps": "5", "output_dir": "out-retry"}  # all the doctor can advise


def log_history(recs, *, group_keys=False):
    """lrft records as the Trainer logs them: `loss`/`grad_norm`/`learning_rate` (its first
    group) per logging step, `eval_*` per evaluation, and the end-of-training summary."""
    out = []
    for r in recs:
        if r["kind"] == "train":
            entry = {"epoch": r["epoch"], "grad_norm": r["grad_norm"],
                     "learning_rate": r["lr"]["backbone"], "loss": r["loss"], "step": r["step"]}
            if group_keys:
                entry.update({f"lr/{g}": v for g, v in r["lr"].items()})
            out.append(entry)
        elif r["kind"] == "eval":
            metrics = r["splits"]["validation"]
            out.append({"epoch": r["epoch"], "eval_loss": metrics["eval_loss"],
                        "eval_accuracy": metrics["accuracy"], "eval_runtime": 1.5,
                        "eval_samples_per_second": 600.0, "eval_steps_per_second": 20.0,
                        "step": r["step"]})
    last = max(e["step"] for e in out)
    out.append({"epoch": 1.0, "step": last, "total_flos": 1e12, "train_loss": 0.3,
                "train_runtime": 60.0, "train_samples_per_second": 50.0,
                "train_steps_per_second": 5.0})
    return out


def write_trainer_state(folder, history, global_step=None):
    """A trainer_state.json as TrainerState.save_to_json writes it (NaN as JSON NaN)."""
    folder.mkdir(parents=True, exist_ok=True)
    steps = [e["step"] for e in history if isinstance(e, dict) and isinstance(e.get("step"), int)]
    steps = steps or [0]
    state = {"best_global_step": None, "best_metric": None, "best_model_checkpoint": None,
             "epoch": 1.0, "eval_steps": 75, "global_step": global_step or max(steps),
             "is_hyper_param_search": False, "is_local_process_zero": True,
             "is_world_process_zero": True, "log_history": history, "logging_steps": LOG_EVERY,
             "max_steps": max(steps), "num_train_epochs": 1, "save_steps": 500,
             "stateful_callbacks": {}, "total_flos": 1e12, "train_batch_size": 32,
             "trial_name": None, "trial_params": None}
    (folder / TRAINER_STATE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    return folder


def warming_up(f):
    return min(1.0, f / 0.1)  # 10% warmup, then constant


def _spiky_norms():
    norms = grad_norms()
    norms[[15, 22, 31, 40, 47, 55]] = 20.0
    return norms


def _collapse():
    losses = np.log(2) + 0.003 * np.random.default_rng(10).standard_normal(40)
    losses[2:8] += [0.10, 0.06, 0.03, -0.01, 0.08, 0.02]
    return losses


EVAL_LOSSES = [0.6, 0.5, 0.45, 0.42, 0.44, 0.47, 0.5, 0.55]
CURVES = {
    "healthy": dict(losses=healthy_losses(), grad_norms=grad_norms()),
    "nan": dict(losses=np.concatenate([healthy_losses(30), [np.nan, np.inf, np.nan]])),
    "blow_up": dict(losses=np.concatenate([np.full(10, 0.7), 0.7 * np.exp(np.linspace(0, 2.5, 30))])),
    "spikes": dict(losses=healthy_losses(), grad_norms=_spiky_norms()),
    "rise": dict(losses=np.concatenate([np.linspace(0.7, 0.3, 30), np.linspace(0.3, 0.9, 30)])),
    "oscillating": dict(losses=0.6 + 0.2 * np.sin(2.1 * np.arange(60))),
    "stalled": dict(losses=0.693 * (1 - 0.01 * np.linspace(0, 1, 60))
                    + 0.004 * np.random.default_rng(5).standard_normal(60)),
    "collapse": dict(losses=_collapse()),
    "overfitting": dict(losses=healthy_losses(), grad_norms=grad_norms(),
                        evals=[(75 * (k + 1), v, 0.8) for k, v in enumerate(EVAL_LOSSES)]),
    "few_records": dict(losses=[0.7, 0.6, 0.5]),
}
EXPECTED = {"healthy": "healthy", "nan": "diverged", "blow_up": "diverged", "spikes": "exploding",
            "rise": "exploding", "oscillating": "oscillating", "stalled": "stalled",
            "collapse": "diverged", "overfitting": "overfitting", "few_records": "insufficient_data"}


@pytest.mark.parametrize("warmup", [False, True])
@pytest.mark.parametrize("name", list(CURVES))
def test_same_curve_same_verdict_from_lrft_and_from_the_trainer(tmp_path, name, warmup):
    spec = dict(CURVES[name])
    losses = spec.pop("losses")
    recs = records(losses, **spec, lr_mult=warming_up if warmup else None,
                   warmup=len(losses) * LOG_EVERY // 10 if warmup else 0)
    lrft_run = diagnose(write_run(tmp_path / "lrft", recs))
    trainer_run = diagnose(write_trainer_state(tmp_path / "trainer", log_history(recs)))
    assert lrft_run.verdict == trainer_run.verdict == EXPECTED[name], (lrft_run, trainer_run)
    assert lrft_run.region == trainer_run.region
    assert lrft_run.changes == trainer_run.changes  # the same settings, in either spelling
    assert lrft_run.dialect is RECIPE and trainer_run.dialect is TRAINING_ARGUMENTS
    assert trainer_run.learning_rate == pytest.approx(LR)  # the peak logged LR


def test_trainer_advice_is_written_as_training_arguments(tmp_path, capsys):
    recs = records(np.concatenate([healthy_losses(30), [np.nan, np.nan]]))
    folder = write_trainer_state(tmp_path / "out", log_history(recs))
    d = diagnose(folder)
    assert d.verdict == "diverged"
    assert d.overrides == ["--learning_rate 5e-06", f"--{WARMUP_ARG} {WARMUP_RATIO}"]
    assert "the peak logged LR 5e-05 -> 5e-06" in d.advice
    assert diagnose_run(folder) == 0
    out = capsys.readouterr().out
    assert "lrft train" not in out and "optim." not in out
    assert (f"Try (the TrainingArguments of your script):\n  --learning_rate 5e-06 "
            f"--{WARMUP_ARG} {WARMUP_RATIO} --output_dir {folder.as_posix()}-retry") in out
    assert (folder / "doctor.png").exists()


def test_trainer_insufficient_data_advice_names_its_argument(tmp_path):
    d = diagnose(write_trainer_state(tmp_path, log_history(records([0.7, 0.6, 0.5]))))
    assert d.verdict == "insufficient_data" and "(a smaller logging_steps)" in d.advice


def test_the_advised_training_arguments_parse():
    """Every setting the doctor can advise is an argument the installed transformers takes."""
    transformers = pytest.importorskip("transformers")
    argv = " ".join(TRAINING_ARGUMENTS.render(EVERY_SETTING)).split()
    parser = transformers.HfArgumentParser(transformers.TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    assert (args.learning_rate, args.weight_decay, args.max_grad_norm, args.max_steps,
            args.output_dir) == (5e-6, 0.1, 1.0, 300, "out-retry")
    assert getattr(args, WARMUP_ARG) == WARMUP_RATIO


def test_the_advised_recipe_overrides_load():
    """Every setting the doctor can advise is a recipe key that takes the value it writes."""
    from conftest import REPO

    from lrft.recipe import load_recipe

    assert set(EVERY_SETTING) == set(RECIPE.keys) == set(TRAINING_ARGUMENTS.keys)
    r = load_recipe(REPO / "recipes/bert/standard.yaml", RECIPE.render(EVERY_SETTING))
    assert (r.optim.learning_rate, r.optim.scale_lr, r.optim.weight_decay,
            r.schedule.warmup_ratio, r.train.max_grad_norm, r.train.max_steps,
            r.train.logging_steps, r.train.output_dir) == (5e-6, "none", 0.1, WARMUP_RATIO, 1.0,
                                                           300, 5, "out-retry")


# --- reading a Trainer folder -----------------------------------------------------------------

def test_checkpoints_alone_are_read_and_the_latest_wins(tmp_path):
    """A script that never called save_state leaves the log in its checkpoints only."""
    history = log_history(records(healthy_losses(), grad_norms=grad_norms()))
    write_trainer_state(tmp_path / "checkpoint-300", [e for e in history if e["step"] <= 300])
    write_trainer_state(tmp_path / "checkpoint-600", history)
    write_trainer_state(tmp_path / "checkpoint-100", [e for e in history if e["step"] <= 100])
    log = read_trainer_log(tmp_path)
    assert log.path == tmp_path / "checkpoint-600" / TRAINER_STATE
    assert log.train.step[-1] == 600 and len(log.train) == 60
    assert diagnose(tmp_path).verdict == "healthy"


def test_the_output_folders_own_state_wins_a_tie(tmp_path):
    history = log_history(records(healthy_losses(), grad_norms=grad_norms()))
    write_trainer_state(tmp_path / "checkpoint-600", history[:10], global_step=600)
    write_trainer_state(tmp_path, history)
    assert read_trainer_log(tmp_path).path == tmp_path / TRAINER_STATE


def test_reading_a_trainer_folder_writes_nothing(tmp_path):
    history = log_history(records(healthy_losses(), grad_norms=grad_norms()))
    write_trainer_state(tmp_path / "checkpoint-600", history)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    diagnose(tmp_path)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_per_group_lr_keys_are_read_as_groups(tmp_path):
    recs = records(healthy_losses(), grad_norms=grad_norms())
    log = read_trainer_log(write_trainer_state(tmp_path, log_history(recs, group_keys=True)))
    assert sorted(log.train.lr) == ["backbone", "head"]
    assert log.train.lr["head"][0] == pytest.approx(10 * LR)
    assert log.start["learning_rate"] == pytest.approx(LR)  # the Trainer's learning_rate


def test_several_eval_datasets_become_splits(tmp_path):
    history = log_history(records(healthy_losses(), grad_norms=grad_norms()))
    for k, loss in enumerate([0.6, 0.5, 0.42, 0.45, 0.5, 0.55]):
        history.append({"epoch": 0.5, "step": 75 * (k + 1), "eval_matched_loss": loss,
                        "eval_matched_accuracy": 0.8, "eval_mismatched_loss": 0.3,
                        "eval_mismatched_accuracy": 0.8, "eval_matched_runtime": 1.0})
    folder = write_trainer_state(tmp_path, history)
    log = read_trainer_log(folder)
    assert log.evals[0]["splits"] == {"matched": {"eval_loss": 0.6, "accuracy": 0.8},
                                      "mismatched": {"eval_loss": 0.3, "accuracy": 0.8}}
    assert log.evals[0]["score"] == pytest.approx(0.45)
    d = diagnose(folder)
    assert d.verdict == "overfitting"
    assert d.evidence[0].startswith("eval_loss (mean of matched, mismatched) was best at step 225")
    assert "--max_steps 225" in d.overrides


def test_warmup_is_read_from_the_logged_lr(tmp_path):
    recs = records(np.concatenate([healthy_losses(30), [np.nan]]), lr_mult=warming_up)
    log = read_trainer_log(write_trainer_state(tmp_path, log_history(recs)))
    # the LR peaks at the first logged step past 10% of 31 records: record 4, step 40
    assert log.start["warmup_steps"] == 40 and log.start["learning_rate"] == pytest.approx(LR)
    assert "warmup_ratio" not in diagnose(tmp_path).changes


@pytest.mark.parametrize("content, message", [
    ("not json", "not a Trainer state"), ("[1, 2]", "'log_history' list"),
    ('{"log_history": {}}', "'log_history' list"), ('{"log_history": []}', "no training or eval"),
])
def test_a_broken_trainer_state_is_a_user_error(tmp_path, content, message):
    (tmp_path / TRAINER_STATE).write_text(content)
    with pytest.raises(UserError, match=message):
        diagnose(tmp_path)


def test_odd_log_entries_are_skipped_with_a_warning(tmp_path):
    history = log_history(records(healthy_losses(), grad_norms=grad_norms()))
    history[5:5] = ["a string", {"loss": 0.5}, {"loss": 0.5, "step": "ten"}]
    for entry in history[20:23]:
        entry["loss"] = "DIVERGED"  # not a number: no evidence of anything
    write_trainer_state(tmp_path, history)
    with pytest.warns(UserWarning) as caught:
        assert diagnose(tmp_path).verdict == "healthy"
    assert [str(w.message).split(": ")[1][:14] for w in caught] == [
        "log_history[5]", "log_history[6]", "log_history[7]"]


def test_a_folder_with_neither_log_names_both(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl.*trainer_state.json"):
        diagnose(tmp_path)


@pytest.mark.slow
def test_a_real_trainer_output_folder_is_read(tmp_path):
    """A tiny transformers.Trainer run (no save_state: the log is in its checkpoints only)."""
    torch = pytest.importorskip("torch")
    from transformers import (BertConfig, BertForSequenceClassification, Trainer,
                              TrainingArguments)

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=32, num_labels=2))
    ids = torch.randint(5, 30, (192, 12), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": i, "labels": (i == 7).any().long()} for i in ids]
    warmup = {WARMUP_ARG: 0.25}  # a ratio, however this transformers spells it
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=24, learning_rate=1e-3,
                             lr_scheduler_type="constant_with_warmup", **warmup,
                             per_device_train_batch_size=16, logging_steps=2, eval_strategy="steps",
                             eval_steps=12, save_steps=12, report_to=[], use_cpu=True,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows[:160], eval_dataset=rows[160:]).train()

    log = read_trainer_log(tmp_path / "out")
    assert log.path == tmp_path / "out" / "checkpoint-24" / TRAINER_STATE
    assert log.train.step == list(range(2, 25, 2)) and not log.skipped
    assert log.start["learning_rate"] == pytest.approx(1e-3) and log.start["warmup_steps"] > 0
    assert [e["step"] for e in log.evals] == [12, 24]
    assert np.isfinite(log.evals[-1]["splits"]["eval"]["eval_loss"])
    d = diagnose(tmp_path / "out")
    assert d.dialect is TRAINING_ARGUMENTS and d.learning_rate == pytest.approx(1e-3)
    assert "warmup" not in " ".join(d.overrides)  # the run had warmup
