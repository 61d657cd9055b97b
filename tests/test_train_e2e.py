"""End-to-end training in-process: `lrft.train.train` on the tiny models of conftest.py.

What a run must do, asserted on its outputs rather than on "it ran": the loss goes down and the
eval metric goes up; the files of a Hugging Face checkpoint, the resolved recipe, results.json and
metrics.jsonl are written; the LR of every group at every logged step is exactly the schedule's
multiplier times that group's base LR; gradient accumulation sizes the schedule in optimizer
steps; a resumed run ends bit-identical to an uninterrupted one; an existing run is never
silently replaced; checkpoints are pruned and a half-written one is never resumed;
reduce_lr_on_plateau and optim.scale_lr act on the LRs.

Convention (lrft/schedule.py): the `lr` of the train record at step k is the LR after k scheduler
steps, i.e. the LR optimizer step k + 1 will use: base_lr x lr_multiplier(k).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import bert_recipe, write_recipe
from safetensors.torch import load_file

import lrft.checkpoint
import lrft.train
from lrft.recipe import RecipeError
from lrft.schedule import lr_multiplier
from lrft.train import train

TRAIN_KEYS = {"kind", "step", "epoch", "loss", "lr", "grad_norm", "samples_per_s",
              "tokens_per_s", "time"}


def _records(out: Path, kind: str | None = None) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if kind is None or r["kind"] == kind]


def _recipe(tmp: Path, model: Path, glue: Path, name: str = "run", **train_keys) -> Path:
    return write_recipe(tmp / f"{name}.yaml", bert_recipe(model, glue, tmp / name, **train_keys))


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


# ---------------------------------------------------------------------------------------------
# BERT classifier: learns, writes a complete output folder
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, tiny_bert, tiny_glue):
    """The default tiny recipe (48 steps, batch 8, constant LR after 2 warmup steps), evaluated
    at steps 8, 16, ... so the first evaluation sees a barely trained model."""
    tmp = tmp_path_factory.mktemp("bert")
    results = train(_recipe(tmp, tiny_bert, tiny_glue, eval_steps=8))
    return results, tmp / "run"


def test_bert_loss_falls_and_accuracy_rises(bert_run):
    results, out = bert_run
    losses = [r["loss"] for r in _records(out, "train")]
    assert len(losses) == 48  # logging_steps=1
    assert _mean(losses[:5]) > 0.6  # ~ln 2 at the start: a random head on 2 classes
    assert _mean(losses[-5:]) < 0.2 < _mean(losses[:5]) - 0.4
    evals = _records(out, "eval")
    assert [e["step"] for e in evals] == [8, 16, 24, 32, 40, 48]
    accuracy = [e["splits"]["validation"]["accuracy"] for e in evals]
    assert accuracy[0] < 0.8 and accuracy[-1] == 1.0, accuracy
    assert evals[-1]["splits"]["validation"]["eval_loss"] < evals[0]["splits"]["validation"]["eval_loss"] / 3
    assert results["status"] == "completed" and results["step"] == 48
    assert results["final"] == evals[-1]["splits"]
    assert results["score"] == evals[-1]["score"] == accuracy[-1]
    assert results["main_metric"] == "accuracy" and results["best_score"] == 1.0


def test_bert_output_folder_is_a_complete_checkpoint(bert_run):
    results, out = bert_run
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "recipe.yaml", "results.json", "metrics.jsonl"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names), names
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "completed" and saved["step"] == 48
    assert saved["final"] == results["final"] and set(saved["final"]["validation"]) == {"eval_loss", "accuracy"}
    assert "max_steps: 48" in (out / "recipe.yaml").read_text()

    # The folder is a Hugging Face checkpoint: it reloads with the labels' names and still
    # classifies the held-out sentences (the tokenizer reloads from the same folder).
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    batch = tok(["good great fun movie", "bad awful dull plot"], return_tensors="pt",
                padding=True)
    with torch.no_grad():
        assert model(**batch).logits.argmax(-1).tolist() == [1, 0]


def test_bert_metrics_jsonl_has_every_record(bert_run):
    _, out = bert_run
    records = _records(out)
    assert [r["kind"] for r in records][0] == "start" and records[-1]["kind"] == "end"
    assert {r["kind"] for r in records} == {"start", "train", "eval", "end"}
    start = records[0]
    assert start["num_training_steps"] == 48 and start["steps_per_epoch"] == 12  # 96 rows / 8
    assert start["groups"] == {"body": 3e-3, "body_no_decay": 3e-3}
    assert start["effective_batch_size"] == 8 and start["num_processes"] == 1
    train_records = _records(out, "train")
    assert [r["step"] for r in train_records] == list(range(1, 49))
    for r in train_records:
        assert TRAIN_KEYS <= set(r), r
        assert set(r["lr"]) == set(start["groups"])
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"]
    assert train_records[11]["epoch"] == 1.0
    assert records[-1] == {**records[-1], "step": 48, "status": "completed"}


# ---------------------------------------------------------------------------------------------
# Tiny Llama: full fine-tuning and LoRA on the three causal data formats
# ---------------------------------------------------------------------------------------------

def _causal_recipe(tmp: Path, model: Path, files: dict, fmt: str, lora: bool) -> Path:
    recipe = {
        "model": {"name_or_path": str(model), "task": "causal_lm"},
        "data": {"format": fmt, "train_files": [str(files[f"{fmt}-train"])],
                 "eval_files": [str(files[f"{fmt}-eval"])], "max_length": 64},
        # LoRA on a random tiny model needs a large LR to move in 24 steps.
        "optim": {"name": "adamw", "learning_rate": 3e-2 if lora else 3e-3},
        "schedule": {"lr_scheduler_type": "constant_with_warmup", "warmup_steps": 2},
        "train": {"output_dir": str(tmp / "run"), "per_device_train_batch_size": 8,
                  "per_device_eval_batch_size": 16, "max_steps": 24, "logging_steps": 1,
                  "eval_steps": 12, "seed": 0, "num_threads": 1},
        "log": {"report_to": ["none"]},
    }
    if lora:
        recipe["lora"] = {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0}
    return write_recipe(tmp / "recipe.yaml", recipe)


@pytest.mark.parametrize("fmt,lora", [("messages", False), ("prompt_response", True),
                                      ("text", False)])
def test_causal_lm_trains_saves_and_reloads(fmt, lora, tmp_path, tiny_llama, causal_files,
                                            monkeypatch):
    trained = {}
    save = lrft.train.save_final_model

    def keep_model(model, *args, **kwargs):  # the in-memory model at the end of training
        trained["model"] = model
        return save(model, *args, **kwargs)

    monkeypatch.setattr(lrft.train, "save_final_model", keep_model)
    results = train(_causal_recipe(tmp_path, tiny_llama, causal_files, fmt, lora))
    out = tmp_path / "run"

    losses = [r["loss"] for r in _records(out, "train")]
    assert len(losses) == 24
    # Random-init tiny Llama: ~ln(25) = 3.2 at the start. LoRA leaves the tiny lm_head and norm
    # frozen, which caps how far it can go; full fine-tuning goes further.
    assert _mean(losses[-4:]) < _mean(losses[:4]) - 0.2, losses
    evals = [r["splits"]["validation"] for r in _records(out, "eval")]
    assert len(evals) == 2 and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    final = results["final"]["validation"]
    assert set(final) == {"eval_loss", "perplexity"} and results["main_metric"] == "eval_loss"
    assert final["perplexity"] == pytest.approx(math.exp(final["eval_loss"]))
    if fmt == "messages":  # loss on "good"/"bad" + eos only, which the model learns
        assert final["eval_loss"] < 1.5

    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "recipe.yaml", "results.json", "metrics.jsonl"} <= names
    if lora:
        assert {"adapter_model.safetensors", "adapter_config.json"} <= names
        assert "model.safetensors" not in names
    else:
        assert {"model.safetensors", "config.json"} <= names

    # Reloaded from disk, the model gives the logits of the model that just finished training.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["the movie was good fun", "bad plot"], return_tensors="pt", padding=True)
    if lora:
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out)
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(out)
    memory = trained["model"].eval()
    with torch.no_grad():
        expected, got = memory(**batch).logits, reloaded.eval()(**batch).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(got, base, atol=1e-3)  # and it is not the untrained model


# ---------------------------------------------------------------------------------------------
# The LR of every group follows the schedule exactly
# ---------------------------------------------------------------------------------------------

def _assert_lrs_follow(out: Path, name: str, total: int, bases: dict[str, float], **kwargs):
    """Every train record's LRs are exactly base x multiplier: LambdaLR does that product."""
    for r in _records(out, "train"):
        m = lr_multiplier(name, r["step"], total, **kwargs)
        assert r["lr"] == {g: b * m for g, b in bases.items()}, r["step"]


def test_group_lrs_follow_the_schedule_with_layer_decay_and_head_scale(tmp_path, tiny_bert,
                                                                       tiny_glue):
    lr, decay, head = 1e-3, 0.5, 2.0
    recipe = bert_recipe(tiny_bert, tiny_glue, tmp_path / "run", max_steps=10, eval_steps=None)
    recipe["optim"].update(learning_rate=lr, layer_decay=decay, head_lr_scale=head)
    recipe["schedule"] = {"lr_scheduler_type": "cosine", "warmup_steps": 3, "min_lr_ratio": 0.1}
    train(write_recipe(tmp_path / "r.yaml", recipe))
    out = tmp_path / "run"

    # Tiny BERT, L = 2 blocks: embeddings at depth 0, layer.i at i + 1, head (pooler +
    # classifier) at L + 1 = 3, where head_lr_scale replaces the decay.
    depth_lr = {"embeddings": lr * decay ** 3, "layer.0": lr * decay ** 2,
                "layer.1": lr * decay, "head": lr * head}
    bases = {**depth_lr, **{f"{g}_no_decay": v for g, v in depth_lr.items()}}
    start = _records(out, "start")[0]
    assert start["groups"] == pytest.approx(bases, rel=1e-12)
    _assert_lrs_follow(out, "cosine", 10, bases, warmup_steps=3, min_lr_ratio=0.1)
    lrs = [r["lr"] for r in _records(out, "train")]
    assert lrs[2]["head"] == pytest.approx(2e-3)  # step 3 = end of warmup: the peak
    assert lrs[-1]["head"] < lrs[3]["head"]  # then decays
    for r in lrs:  # ratios between groups hold through warmup and decay
        assert r["head"] / r["embeddings"] == pytest.approx(head / decay ** 3)
        assert r["layer.1"] / r["layer.0"] == pytest.approx(1 / decay)


def test_progress_bar_shows_the_recipes_lr_not_the_head_multiple():
    from types import SimpleNamespace

    w = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    opt = torch.optim.SGD([{"params": [w[0]], "lr": 1e-4 * 0.5 ** 3},  # embeddings, decayed
                           {"params": [w[1]], "lr": 1e-4 * 5}], lr=1e-4)  # head_lr_scale 5
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    run = SimpleNamespace(optimizer=opt, recipe=SimpleNamespace(optim=SimpleNamespace(
        learning_rate=1e-4)))
    opt.step()
    sched.step()  # multiplier 0.5
    lrs = {"embeddings": opt.param_groups[0]["lr"], "head": opt.param_groups[1]["lr"]}
    assert lrft.train._base_lr(run, lrs) == pytest.approx(0.5e-4)
    del opt.param_groups[0]["initial_lr"]  # a metric-driven schedule: the largest group's
    assert lrft.train._base_lr(run, lrs) == pytest.approx(2.5e-4)


def test_gradient_accumulation_sizes_the_schedule_in_optimizer_steps(tmp_path, tiny_bert,
                                                                     tiny_glue):
    # 92 rows / batch 4 = 23 micro-batches per epoch -> ceil(23 / 2) = 12 optimizer steps (the
    # odd last micro-batch makes a step of its own), 24 in two epochs.
    recipe = bert_recipe(tiny_bert, tiny_glue, tmp_path / "run", max_steps=-1,
                         num_train_epochs=2, per_device_train_batch_size=4,
                         gradient_accumulation_steps=2, eval_steps=None)
    recipe["data"]["max_train_samples"] = 92
    recipe["schedule"] = {"lr_scheduler_type": "linear", "warmup_steps": 2}
    results = train(write_recipe(tmp_path / "r.yaml", recipe))
    out = tmp_path / "run"
    start = _records(out, "start")[0]
    assert start["steps_per_epoch"] == 12 and start["num_training_steps"] == 24
    assert start["effective_batch_size"] == 8
    steps = [r["step"] for r in _records(out, "train")]
    assert steps == list(range(1, 25)) and results["step"] == 24
    assert _records(out, "train")[11]["epoch"] == 1.0
    _assert_lrs_follow(out, "linear", 24, start["groups"], warmup_steps=2)
    assert all(v == 0.0 for v in _records(out, "train")[-1]["lr"].values())  # linear ends at 0


# ---------------------------------------------------------------------------------------------
# Resume: N/2 steps, stop, resume to N == N steps straight
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["adamw", "muon", "schedule_free_adamw"])
def test_resume_mid_epoch_is_bit_identical(tmp_path, tiny_bert, tiny_glue, capsys, optimizer):
    # 20 steps (an epoch is 12), a checkpoint at 10 = mid-epoch 0 with dropout on (the tiny
    # BERT's default 0.1) and evaluations at 6, 12, 18 on both sides of the checkpoint: the
    # resumed run must restore weights, optimizer, schedule, RNG and data position exactly.
    # Muon with AdamW is one optimizer (lrft/muon.py); schedule-free AdamW checkpoints its
    # averaged weights and resumes by switching back to its training weights (lrft.optim).
    straight = tmp_path / "straight"
    recipe = bert_recipe(tiny_bert, tiny_glue, straight, max_steps=20, save_steps=10,
                         eval_steps=6)
    recipe["optim"]["name"] = optimizer
    res_a = train(write_recipe(tmp_path / "a.yaml", recipe))
    assert [p.name for p in lrft.checkpoint.list_checkpoints(straight)] == ["checkpoint-10"]

    # The interrupted run: what the folder held when the run was killed after step 10.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-10", resumed / "checkpoint-10")
    kept = [line for line in (straight / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("step", 0) <= 10]
    (resumed / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    recipe["train"]["output_dir"] = str(resumed)
    capsys.readouterr()
    res_b = train(write_recipe(tmp_path / "b.yaml", recipe),
                  ["train.resume_from_checkpoint=latest"])
    assert f"resumed from {resumed / 'checkpoint-10'} at step 10" in capsys.readouterr().out

    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    assert res_b["final"] == res_a["final"] and res_b["step"] == 20
    assert res_b["train_steps_this_run"] == 10

    def curve(out):
        return [(r["kind"], r["step"], r.get("loss"), r.get("lr"), r.get("grad_norm"),
                 r.get("splits")) for r in _records(out) if r["kind"] in ("train", "eval")]
    assert curve(resumed) == curve(straight)
    assert len(_records(resumed, "start")) == 1


# ---------------------------------------------------------------------------------------------
# Output folder, checkpoints
# ---------------------------------------------------------------------------------------------

def test_output_dir_holding_a_run_needs_resume_or_overwrite(tmp_path, tiny_bert, tiny_glue,
                                                            capsys):
    recipe = _recipe(tmp_path, tiny_bert, tiny_glue, max_steps=2, eval_steps=None)
    out = tmp_path / "run"
    train(recipe)
    weights = (out / "model.safetensors").read_bytes()
    with pytest.raises(RecipeError) as err:
        train(recipe)
    message = str(err.value)
    assert "train.output_dir" in message and str(out) in message
    assert "train.overwrite_output_dir=true" in message
    assert "train.resume_from_checkpoint=latest" in message
    assert (out / "model.safetensors").read_bytes() == weights  # untouched

    train(recipe, ["train.overwrite_output_dir=true", "optim.learning_rate=1e-2"])
    assert (out / "model.safetensors").read_bytes() != weights
    assert len(_records(out, "start")) == 1  # the old run was replaced, not appended to

    # `latest` on a folder with no run yet: a fresh start, said so.
    capsys.readouterr()
    fresh = _recipe(tmp_path, tiny_bert, tiny_glue, name="fresh", max_steps=2, eval_steps=None)
    results = train(fresh, ["train.resume_from_checkpoint=latest"])
    assert results["step"] == 2 and results["train_steps_this_run"] == 2
    assert "no checkpoint yet, starting fresh" in capsys.readouterr().out


def test_save_total_limit_and_half_written_checkpoints(tmp_path, tiny_bert, tiny_glue, capsys):
    recipe = _recipe(tmp_path, tiny_bert, tiny_glue, max_steps=8, save_steps=2,
                     save_total_limit=2, eval_steps=None)
    out = tmp_path / "run"
    train(recipe)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]

    # A crash mid-save leaves checkpoint-K.tmp, here even with its state file already written
    # (the crash came between that and the rename): resume must not pick it, and removes it.
    shutil.copytree(out / "checkpoint-6", out / "checkpoint-99.tmp")
    assert [p.name for p in lrft.checkpoint.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    capsys.readouterr()
    results = train(recipe, ["train.resume_from_checkpoint=latest", "train.max_steps=10"])
    assert f"resumed from {out / 'checkpoint-6'} at step 6" in capsys.readouterr().out
    assert results["step"] == 10 and results["train_steps_this_run"] == 4
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]


# ---------------------------------------------------------------------------------------------
# reduce_lr_on_plateau, scale_lr
# ---------------------------------------------------------------------------------------------

def test_reduce_lr_on_plateau_cuts_every_group_after_a_non_improving_eval(tmp_path, tiny_bert,
                                                                          tiny_glue):
    # An LR so small that the eval loss cannot improve by ReduceLROnPlateau's 1e-4 threshold:
    # with patience 0 each evaluation after the first halves every group's LR.
    recipe = bert_recipe(tiny_bert, tiny_glue, tmp_path / "run", max_steps=8, eval_steps=2)
    recipe["optim"].update(learning_rate=1e-7, head_lr_scale=4.0)
    recipe["schedule"] = {"lr_scheduler_type": "reduce_lr_on_plateau", "patience": 0,
                          "gamma": 0.5}
    train(write_recipe(tmp_path / "r.yaml", recipe))
    out = tmp_path / "run"
    assert [e["step"] for e in _records(out, "eval")] == [2, 4, 6, 8]
    bases = _records(out, "start")[0]["groups"]
    assert bases["head"] == pytest.approx(4 * bases["body"])
    # Evals at 2 (the first: the best so far), 4 (-> x0.5) and 6 (-> x0.25); the final
    # evaluation does not step the schedule. The train record of step k comes before its eval.
    factor = {1: 1, 2: 1, 3: 1, 4: 1, 5: 0.5, 6: 0.5, 7: 0.25, 8: 0.25}
    for r in _records(out, "train"):
        assert r["lr"] == pytest.approx({g: b * factor[r["step"]] for g, b in bases.items()},
                                        rel=1e-12), r["step"]


def test_scale_lr_sqrt_scales_every_group_and_says_so(tmp_path, tiny_bert, tiny_glue, capsys):
    recipe = bert_recipe(tiny_bert, tiny_glue, tmp_path / "run", max_steps=2, eval_steps=None)
    recipe["optim"].update(learning_rate=4e-3, scale_lr="sqrt", reference_batch_size=32,
                           head_lr_scale=2.0)
    train(write_recipe(tmp_path / "r.yaml", recipe))
    lr = 4e-3 * math.sqrt(8 / 32)  # 1 process x batch 8 x accumulation 1 vs reference 32
    start = _records(tmp_path / "run", "start")[0]
    assert start["learning_rate"] == pytest.approx(lr)
    assert start["groups"] == pytest.approx({"body": lr, "body_no_decay": lr, "head": 2 * lr,
                                             "head_no_decay": 2 * lr})
    assert "8 vs reference 32" in start["lr_note"] and "(sqrt)" in start["lr_note"]
    printed = capsys.readouterr().out
    assert "scale_lr: 1 processes x 8 x 1 = 8 vs reference 32: lr 0.004 -> 0.002 (sqrt)" in printed
