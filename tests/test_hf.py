"""lrft.hf without training: the Trainer's step count, the plan from a recipe or keyword arguments,
and the TrainingArguments that contradict it. Helpers here are shared by tests/test_hf_*.py."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from conftest import sentences

from lrft.errors import RecipeError
from lrft.hf import GuardCallback, attach, optimizers, trainer_steps
from lrft.hf.pair import batches_per_process
from lrft.schedule import lr_multiplier

torch.set_num_threads(1)


# ---- helpers shared by the test_hf files --------------------------------------------------------

def tiny_dataset(model_dir, n: int = 37):
    """`n` labelled sentences tokenised for the tiny BERT (padding is the collator's)."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts, labels = sentences(n)
    data = datasets.Dataset.from_dict({"text": texts, "label": labels})
    return data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=32), batched=True,
                    remove_columns=["text"]), tokenizer


def tiny_model(model_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the new classifier head starts the same in every run
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)


def training_args(output_dir, **overrides):
    from transformers import TrainingArguments

    settings = {"output_dir": str(output_dir), "per_device_train_batch_size": 4,
                "logging_steps": 1, "report_to": "none", "save_strategy": "no", "use_cpu": True,
                "disable_tqdm": True, "seed": 0, **overrides}
    return TrainingArguments(**settings)


def make_trainer(model_dir, output_dir, n: int = 37, callbacks=(), model=None,
                 optimizers=(None, None), **args):
    """A Trainer on the tiny BERT; `args` are TrainingArguments (see `training_args`)."""
    from transformers import DataCollatorWithPadding, Trainer

    data, tokenizer = tiny_dataset(model_dir, n)
    model = model if model is not None else tiny_model(model_dir)
    return Trainer(model=model, args=training_args(output_dir, **args), train_dataset=data,
                   data_collator=DataCollatorWithPadding(tokenizer), callbacks=list(callbacks),
                   optimizers=optimizers)


def recipe_file(path, model_dir, optim: dict, schedule: dict, **sections):
    """A valid recipe (model and data are required by validation; lrft.hf reads neither)."""
    recipe = {"model": {"name_or_path": str(model_dir)}, "data": {"glue_task": "sst2"},
              "optim": optim, "schedule": schedule, **sections}
    path.write_text(yaml.safe_dump(recipe))
    return path


def base_lrs(optimizer) -> dict[str, float]:
    return {g["name"]: g["initial_lr"] for g in optimizer.param_groups}


# ---- the step count -----------------------------------------------------------------------------

@pytest.mark.parametrize("processes", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def testbatches_per_process_is_accelerates_shard_length(processes, drop_last):
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    for rows in (1, 7, 8, 9, 37, 64, 100):
        for batch in (1, 4, 8):
            if drop_last and rows < batch * processes:
                continue
            sampler = BatchSampler(range(rows), batch, drop_last)
            shards = [len(BatchSamplerShard(sampler, processes, i)) for i in range(processes)]
            assert len(set(shards)) == 1  # even_batches: every process the same
            assert batches_per_process(rows, batch, drop_last, processes) == shards[0]


def test_trainer_steps_counts_epochs_accumulation_and_drop_last(tmp_path):
    # 37 rows / batch 4 = 10 batches (9 with drop_last); accumulation 3 -> 4 (3) steps per epoch
    assert trainer_steps(training_args(tmp_path, gradient_accumulation_steps=3,
                                       num_train_epochs=1.5), 37) == 6
    assert trainer_steps(training_args(tmp_path, gradient_accumulation_steps=3,
                                       num_train_epochs=1.5, dataloader_drop_last=True), 37) == 5
    assert trainer_steps(training_args(tmp_path, max_steps=7), None) == 7
    with pytest.raises(ValueError, match="max_steps"):
        trainer_steps(training_args(tmp_path), iter([]))


# ---- the plan ------------------------------------------------------------------------------------

def test_keyword_arguments_take_the_rest_from_training_arguments(tmp_path, tiny_bert):
    args = training_args(tmp_path, learning_rate=2e-3, weight_decay=0.1, max_steps=20,
                         lr_scheduler_type="cosine", warmup_steps=0.1, adam_beta2=0.98)
    optimizer, scheduler = optimizers(args, tiny_model(tiny_bert), layer_decay=0.5, verbose=False)
    bases = base_lrs(optimizer)
    assert bases["head"] == 2e-3 and bases["layer.1"] == 1e-3 and bases["embeddings"] == 2.5e-4
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups}["layer.0"] == 0.1
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.98)
    for k in range(20):  # HF's warmup_steps=0.1 is a ratio: 2 warmup steps of 20, then cosine
        multiplier = lr_multiplier("cosine", k, 20, warmup_steps=2)
        assert scheduler.get_last_lr() == pytest.approx([b * multiplier for b in bases.values()])
        optimizer.step()  # no gradients: moves nothing, keeps torch's step order
        scheduler.step()


def test_contradicting_training_arguments_are_refused_all_at_once(tmp_path, tiny_bert):
    recipe = recipe_file(tmp_path / "r.yaml", tiny_bert, {"learning_rate": 5e-5},
                         {"lr_scheduler_type": "linear", "warmup_ratio": 0.1})
    args = training_args(tmp_path, learning_rate=2e-5, lr_scheduler_type="cosine",
                         lr_scheduler_kwargs={"min_lr": 1e-6}, warmup_steps=5, max_steps=100,
                         optim="sgd")
    with pytest.raises(RecipeError) as err:
        optimizers(args, tiny_model(tiny_bert), recipe=recipe, verbose=False)
    problems = "\n".join(err.value.problems)
    assert len(err.value.problems) == 5
    for name, ours in (("learning_rate=2e-05", "optim.learning_rate = 5e-05"),
                       ("lr_scheduler_type='cosine'", "'linear'"), ("optim='sgd'", "'adamw'"),
                       ("warmup_steps=5", "'10 steps'"), ("lr_scheduler_kwargs", "schedule.*")):
        assert f"TrainingArguments.{name}" in problems and ours in problems


def test_agreeing_or_default_training_arguments_pass(tmp_path, tiny_bert):
    recipe = recipe_file(tmp_path / "r.yaml", tiny_bert, {"learning_rate": 3e-4},
                         {"lr_scheduler_type": "cosine", "warmup_ratio": 0.1})
    for args in (training_args(tmp_path, max_steps=100),  # defaults: replaced, no complaint
                 training_args(tmp_path, max_steps=100, learning_rate=3e-4, warmup_steps=10,
                               lr_scheduler_type="cosine", optim="adamw_torch")):
        optimizer, scheduler = optimizers(args, tiny_model(tiny_bert), recipe=recipe,
                                          verbose=False)
        assert max(base_lrs(optimizer).values()) == 3e-4
        assert scheduler.lrft["num_training_steps"] == 100


def test_recipe_train_keys_that_disagree_are_named_in_a_warning(tmp_path, tiny_bert):
    recipe = recipe_file(tmp_path / "r.yaml", tiny_bert, {}, {},
                         train={"per_device_train_batch_size": 32, "num_train_epochs": 3,
                                "logging_steps": 7})
    with pytest.warns(UserWarning) as caught:
        optimizers(training_args(tmp_path, per_device_train_batch_size=8, num_train_epochs=3),
                   tiny_model(tiny_bert), 64, recipe, verbose=False)
    message = str(caught[0].message)
    assert "train.per_device_train_batch_size=32 (TrainingArguments: 8)" in message
    assert "num_train_epochs" not in message and "logging_steps" not in message


def test_settings_that_would_silently_do_something_else_are_refused(tmp_path, tiny_bert):
    model = tiny_model(tiny_bert)
    lora = recipe_file(tmp_path / "lora.yaml", tiny_bert, {}, {}, lora={"enabled": True})
    with pytest.raises(RecipeError, match="not a PEFT model"):
        optimizers(training_args(tmp_path, max_steps=10), model, recipe=lora, verbose=False)
    plateau = recipe_file(tmp_path / "p.yaml", tiny_bert, {},
                          {"lr_scheduler_type": "reduce_lr_on_plateau"}, train={"eval_steps": 5})
    with pytest.raises(RecipeError, match="eval_strategy") as err:
        optimizers(training_args(tmp_path, max_steps=10), model, recipe=plateau, verbose=False)
    assert any("metric_for_best_model" in p for p in err.value.problems)
    with pytest.raises(RecipeError, match="auto_find_batch_size"):
        optimizers(training_args(tmp_path, max_steps=10, auto_find_batch_size=True), model,
                   verbose=False)
    with pytest.raises(RecipeError, match="no lrft optimizer"):
        optimizers(training_args(tmp_path, max_steps=10, optim="ademamix"), model, verbose=False)
    with pytest.raises(ValueError, match="not both"):
        optimizers(training_args(tmp_path, max_steps=10), model, recipe=plateau, layer_decay=0.8)
    with pytest.raises(ValueError, match="does not take 'momentum'"):  # never dropped silently
        optimizers(training_args(tmp_path, max_steps=10), model, momentum=0.9, verbose=False)


def test_scale_lr_follows_the_trainers_batch(tmp_path, tiny_bert):
    recipe = recipe_file(tmp_path / "r.yaml", tiny_bert,
                         {"learning_rate": 1e-3, "scale_lr": "linear", "reference_batch_size": 32},
                         {"lr_scheduler_type": "constant"},
                         train={"per_device_train_batch_size": 32})
    args = training_args(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                         max_steps=10)
    with pytest.warns(UserWarning, match="per_device_train_batch_size"):
        optimizer, _ = optimizers(args, tiny_model(tiny_bert), recipe=recipe, verbose=False)
    assert max(base_lrs(optimizer).values()) == pytest.approx(1e-3 * 16 / 32)


def test_attach_refuses_a_trainer_that_has_its_optimizer(tmp_path, tiny_bert):
    model = tiny_model(tiny_bert)
    pair = optimizers(training_args(tmp_path, max_steps=3), model, verbose=False)
    trainer = make_trainer(tiny_bert, tmp_path, model=model, max_steps=3, optimizers=pair)
    with pytest.raises(ValueError, match="already has an optimizer"):
        attach(trainer, lr=1e-3)


def test_guard_settings_are_checked_by_the_recipes_rules():
    with pytest.raises(RecipeError, match="guard.lr_backoff"):
        GuardCallback(lr_backoff=2.0)
    with pytest.raises(TypeError):
        GuardCallback(lr_backof=0.5)
    assert GuardCallback(action="skip").config.enabled


def test_printed_table_shows_base_lrs_not_the_warmup_start(tmp_path, tiny_bert, capsys):
    optimizers(training_args(tmp_path, max_steps=10, warmup_steps=5), tiny_model(tiny_bert),
               lr=1e-3, layer_decay=0.5)
    out = capsys.readouterr().out
    assert "over the Trainer's 10 optimizer steps (5 warmup)" in out
    assert "not used now: TrainingArguments learning_rate" in out
    head = next(line for line in out.splitlines() if line.startswith("head "))
    assert "1.00e-03" in head and math.isfinite(float(head.split()[3]))


def test_schedule_free_with_a_decaying_schedule_or_best_model_reload_is_refused(tmp_path,
                                                                                 tiny_bert):
    # keyword arguments take TrainingArguments' default linear schedule: refused with the fix
    args = training_args(tmp_path, max_steps=10)
    with pytest.raises(RecipeError) as err:
        optimizers(args, tiny_model(tiny_bert), optim="schedule_free_adamw", verbose=False)
    [problem] = err.value.problems
    assert problem.startswith("lr_scheduler_type: linear decays the LR, but "
                              "schedule_free_adamw averages its weights")
    args = training_args(tmp_path, max_steps=10, lr_scheduler_type="constant",
                         load_best_model_at_end=True, eval_strategy="steps",
                         save_strategy="steps", eval_steps=5, save_steps=5)
    with pytest.raises(RecipeError) as err:
        optimizers(args, tiny_model(tiny_bert), optim="schedule_free_adamw", verbose=False)
    [problem] = err.value.problems
    assert "load_best_model_at_end" in problem and "load_best_model_at_end=False" in problem


def test_muon_from_keyword_arguments_is_one_optimizer_over_tagged_groups(tmp_path, tiny_bert):
    args = training_args(tmp_path, max_steps=10)
    optimizer, _ = optimizers(args, tiny_model(tiny_bert), optim="muon", layer_decay=0.5,
                              verbose=False)
    algorithms = {g["name"]: g["algorithm"] for g in optimizer.param_groups}
    assert algorithms["layer.0"] == algorithms["layer.1"] == "muon"
    assert algorithms["embeddings"] == algorithms["head"] == algorithms["layer.0_no_decay"] \
        == "adamw"


def test_importing_lrft_hf_says_nothing_about_bitsandbytes_kernels():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import lrft.hf"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gemm_4bit" not in done.stderr and "bitsandbytes" not in done.stderr
