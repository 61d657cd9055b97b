"""Issue 17's findings that one CPU process can reproduce, one test (or a few) each.

The multi-GPU paths were written for GPUs and launchers this machine has not got. Each finding is
reproduced here as closely as a CPU allows, and each test failed before its fix:

- fp16 (findings 2, 10): Accelerate makes no loss scaler on a CPU, so `_cpu_loss_scaler` gives
  the run the one it makes on a GPU (torch's GradScaler runs on the CPU too) with fp16 autocast;
  the loop's and the guard's fp16 paths then run for real. Overflows are made by an inf gradient,
  divergence by a NaN loss, each at a chosen step.
- FSDP2 and DeepSpeed refusals (4, 5, 13, and the launcher's own settings, 8, 9): what the
  launcher gives the Accelerator (its distributed type, accumulation count, DeepSpeed config,
  the shipped JSON files) is what `lrft.launch.launcher_problems` reads; DeepSpeed is not
  installed here, so its accelerator is a stand-in carrying those values. FSDP2 itself runs for
  real in tests/test_distributed.py.
- ZeRO-3's partitioned parameters (6) are simulated as DeepSpeed leaves them: an empty 1-D tensor
  with the real shape in `ds_shape`.
- QLoRA's 4-bit layers (7) run on the CPU with bitsandbytes >= 0.49; only lrft's CUDA check is
  skipped, by calling `models.qlora_config` directly.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, bert_recipe, write_recipe

import lrft.train
from lrft.errors import RecipeError
from lrft.recipe import load_recipe

CONFIGS = REPO / "accelerate_configs"
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="QLoRA's 4-bit layers need bitsandbytes")


def _recipe(tmp: Path, tiny_bert, tiny_glue, *overrides: str, **train):
    path = write_recipe(tmp / "r.yaml", bert_recipe(tiny_bert, tiny_glue, tmp / "run", **train))
    return load_recipe(path, list(overrides))


def _records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# ---------------------------------------------------------------------------------------------
# fp16: the loss scaler, the guard and the schedule (findings 2 and 10)
# ---------------------------------------------------------------------------------------------

def _cpu_loss_scaler(monkeypatch, **scaler_kwargs) -> None:
    """Give every run the GradScaler Accelerate makes for fp16 on a GPU, on the CPU."""
    make = lrft.train.make_accelerator

    def with_scaler(recipe):
        accelerator, why = make(recipe)
        assert accelerator.mixed_precision == "fp16" and accelerator.scaler is None
        accelerator.scaler = torch.amp.GradScaler("cpu", **scaler_kwargs)
        accelerator.native_amp = True  # fp16 autocast, and unscaling before clipping
        return accelerator, why
    monkeypatch.setattr(lrft.train, "make_accelerator", with_scaler)


def _at_steps(monkeypatch, steps: set[int], *, nan_loss: bool = False, inf_grad: bool = False):
    """At the given optimizer steps (1 micro-batch each), make the loss NaN (divergence) or one
    gradient inf with a finite loss (what an fp16 overflow looks like to the scaler)."""
    build = lrft.train.build_run
    calls = [0]

    def build_with_faults(recipe, accelerator):
        run = build(recipe, accelerator)

        def count(module, args, output):
            if module.training:
                calls[0] += 1
                if nan_loss and calls[0] in steps:
                    output["loss"] = output["loss"] * float("nan")
            return output

        run.model.register_forward_hook(count)
        weight = next(p for p in run.model.parameters() if p.requires_grad)
        if inf_grad:
            weight.register_hook(lambda g: g * math.inf if calls[0] in steps else g)
        return run
    monkeypatch.setattr(lrft.train, "build_run", build_with_faults)


@pytest.mark.parametrize("action", ["skip", "rollback"])
def test_fp16_guard_skip_and_rollback_close_the_scalers_step(monkeypatch, tmp_path, tiny_bert,
                                                             tiny_glue, action):
    """Finding 2: a step the guard skips or rolls back never reached `scaler.update()`, so the
    next `clip_grad_norm_` raised "unscale_() has already been called on this optimizer"."""
    _cpu_loss_scaler(monkeypatch)
    _at_steps(monkeypatch, {3}, nan_loss=True)
    recipe = _recipe(tmp_path, tiny_bert, tiny_glue, "guard.enabled=true",
                     f"guard.action={action}", "guard.snapshot_steps=1",
                     max_steps=6, eval_steps=None, mixed_precision="fp16")
    results = lrft.train.train(recipe)
    assert results["status"] == "completed" and results["step"] == 6
    events = [(e["step"], e["event"]) for e in _records(tmp_path / "run", "guard")]
    assert events == [(3, "nan_loss"), (3, action)]


def test_fp16_overflow_is_not_divergence_and_does_not_advance_the_schedule(
        monkeypatch, tmp_path, tiny_bert, tiny_glue):
    """Findings 2 and 10: GradScaler's overflows (the scaler skips the step itself) were counted
    as divergence, rolling back and halving the LR; and the schedule stepped on a step the
    scaler skipped. The run with overflows at steps 2 and 3 must log, from step 3 on, the LRs
    the clean run logged two steps earlier."""
    def run(folder: Path, overflow: set[int]) -> list[float]:
        _cpu_loss_scaler(monkeypatch)
        _at_steps(monkeypatch, overflow, inf_grad=True)
        recipe = _recipe(folder, tiny_bert, tiny_glue, "guard.enabled=true",
                         "schedule.lr_scheduler_type=linear", "schedule.warmup_steps=3",
                         max_steps=8, eval_steps=None,
                         mixed_precision="fp16")
        results = lrft.train.train(recipe)
        assert results["status"] == "completed" and results["rollbacks"] == 0
        assert results["lr_scale"] == 1.0 and not _records(folder / "run", "guard")
        monkeypatch.undo()
        return [r["lr"]["body"] for r in _records(folder / "run", "train")]

    (tmp_path / "clean").mkdir()
    (tmp_path / "overflow").mkdir()
    clean, overflow = run(tmp_path / "clean", set()), run(tmp_path / "overflow", {2, 3})
    assert len(set(clean)) == len(clean)  # warmup then decay: a new LR at every step
    assert overflow[:3] == [clean[0]] * 3  # the scheduler held still on the skipped steps
    assert overflow[3:] == clean[1:-2]


def test_fp16_launcher_with_a_float16_checkpoint_trains(monkeypatch, tmp_path, tiny_bert,
                                                        tiny_glue):
    """Finding 10 (and 1): `model.dtype: float16` under an fp16 launcher trained fp16 weights,
    and GradScaler refuses them: "Attempting to unscale FP16 gradients"."""
    _cpu_loss_scaler(monkeypatch)
    recipe = _recipe(tmp_path, tiny_bert, tiny_glue, "model.dtype=float16", max_steps=3,
                     eval_steps=None, mixed_precision="fp16")
    results = lrft.train.train(recipe)
    assert results["status"] == "completed" and results["step"] == 3
    assert all(math.isfinite(r["loss"]) for r in _records(tmp_path / "run", "train"))


# ---------------------------------------------------------------------------------------------
# What a launcher cannot run, and what it may not decide (findings 4, 5, 8, 9, 13)
# ---------------------------------------------------------------------------------------------

def _launcher(kind: str, *, accumulation: int = 1, ds_json: str | None = None, **ds_changes):
    """A stand-in for the Accelerator a launcher configured: its distributed type, accumulation
    count and (DeepSpeed) config dict, read from a shipped JSON file."""
    config = None
    if ds_json is not None:
        config = {**json.loads((CONFIGS / ds_json).read_text()), **ds_changes}
    return SimpleNamespace(distributed_type=kind, gradient_accumulation_steps=accumulation,
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(
                               deepspeed_config=config)))


FSDP = _launcher("FSDP")
ZERO2 = _launcher("DEEPSPEED", ds_json="deepspeed_zero2.json")
ZERO3 = _launcher("DEEPSPEED", ds_json="deepspeed_zero3.json")
DDP = _launcher("MULTI_GPU")


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit", "lion_8bit", "adafactor"])
def test_optimizers_without_dtensor_support_are_refused_under_fsdp(name, tmp_path, tiny_bert,
                                                                   tiny_glue):
    """Finding 4: bitsandbytes' 8-bit kernels and Adafactor fail at FSDP2's first step
    (tests/test_distributed.py runs FSDP2 for real; so did the review, for each of these)."""
    from lrft.launch import launcher_problems

    recipe = _recipe(tmp_path, tiny_bert, tiny_glue, f"optim.name={name}")
    [problem] = launcher_problems(recipe, FSDP)
    assert problem.startswith(f"optim.name: {name}") and "optim.name=adamw" in problem
    assert "multi_gpu_8xa100.yaml" in problem
    assert launcher_problems(recipe, DDP) == []


def test_adamw_and_lion_run_under_fsdp_and_8bit_is_refused_under_deepspeed(tmp_path, tiny_bert,
                                                                           tiny_glue):
    """Finding 4: under DeepSpeed the 8-bit optimizers get flattened partitions, and the
    embeddings' 32-bit override (keyed by the parameter) silently no longer applies."""
    from lrft.launch import launcher_problems

    for name in ("adamw", "lion"):
        assert launcher_problems(_recipe(tmp_path, tiny_bert, tiny_glue, f"optim.name={name}"),
                                 FSDP) == []
    [problem] = launcher_problems(_recipe(tmp_path, tiny_bert, tiny_glue,
                                          "optim.name=adamw_8bit"), ZERO2)
    assert problem.startswith("optim.name: adamw_8bit") and "DeepSpeed" in problem


def test_guard_is_refused_under_deepspeed_only(tmp_path, tiny_bert, tiny_glue):
    """Finding 5: the step happens inside `accelerator.backward`, so a skip skipped nothing and a
    rollback handed DeepSpeed a state dict it cannot load. (FSDP2 rolls back for real in
    tests/test_distributed.py.)"""
    from lrft.launch import launcher_problems

    recipe = _recipe(tmp_path, tiny_bert, tiny_glue, "guard.enabled=true")
    for launcher in (ZERO2, ZERO3):
        [problem] = launcher_problems(recipe, launcher)
        assert problem.startswith("guard.enabled") and "guard.enabled=false" in problem
    assert launcher_problems(recipe, FSDP) == launcher_problems(recipe, DDP) == []


def test_range_test_is_refused_under_deepspeed():
    """Finding 5: the range test's restore hands DeepSpeed a state dict it cannot load."""
    from lrft.finder import lr_range_test

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RecipeError, match="DEEPSPEED.*lrft find-lr. on one GPU or with DDP"):
        lr_range_test(model, optimizer, [torch.zeros(1, 2)], accelerator=ZERO3,
                      loss_fn=lambda m, b: m(b).sum())


@pytest.mark.parametrize("launcher,refused", [(FSDP, True), (ZERO3, True), (ZERO2, False),
                                              (DDP, False)], ids=["fsdp", "zero3", "zero2", "ddp"])
def test_qlora_is_refused_where_its_4bit_base_would_be_sharded(launcher, refused, tmp_path,
                                                               tiny_bert, tiny_glue):
    """Finding 13: QLoRA under FSDP2 or ZeRO-3 set no `bnb_4bit_quant_storage`."""
    from lrft.launch import launcher_problems

    recipe = _recipe(tmp_path, tiny_bert, tiny_glue, "lora.enabled=true",
                     "lora.load_in_4bit=true")
    problems = launcher_problems(recipe, launcher)
    assert bool(problems) == refused
    assert all(p.startswith("lora.load_in_4bit") and "DDP" in p for p in problems)


@pytest.mark.parametrize("max_grad_norm,expected", [(0.5, 0.5), (None, 0.0)])
def test_deepspeed_clips_at_the_recipes_max_grad_norm(max_grad_norm, expected, tmp_path,
                                                      tiny_bert, tiny_glue):
    """Finding 8: Accelerate fills the JSON's `gradient_clipping: "auto"` with 1.0, whatever
    `train.max_grad_norm` says; lrft fills it first (0: DeepSpeed does not clip)."""
    from lrft.launch import fill_deepspeed_config, launcher_problems

    recipe = _recipe(tmp_path, tiny_bert, tiny_glue, max_grad_norm=max_grad_norm)
    for json_file in ("deepspeed_zero2.json", "deepspeed_zero3.json"):
        launcher = _launcher("DEEPSPEED", ds_json=json_file)
        assert launcher.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] == "auto"
        assert launcher_problems(recipe, launcher) == []
        fill_deepspeed_config(recipe, launcher)
        assert launcher.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] == expected


def test_deepspeed_numbers_that_contradict_the_recipe_are_refused(tmp_path, tiny_bert, tiny_glue):
    """Findings 8 and 9: a number in the DeepSpeed JSON wins over the recipe silently."""
    from lrft.launch import launcher_problems

    recipe = _recipe(tmp_path, tiny_bert, tiny_glue, gradient_accumulation_steps=4)
    launcher = _launcher("DEEPSPEED", accumulation=4, ds_json="deepspeed_zero2.json",
                         gradient_clipping=0.5, gradient_accumulation_steps=1)
    problems = launcher_problems(recipe, launcher)
    assert [p.split(":")[0] for p in problems] == ["train.gradient_accumulation_steps",
                                                   "train.max_grad_norm"]
    assert all('"auto"' in p for p in problems)
    launcher = _launcher("DEEPSPEED", accumulation=4, ds_json="deepspeed_zero2.json",
                         gradient_clipping=1.0, gradient_accumulation_steps=4)
    assert launcher_problems(recipe, launcher) == []  # agreeing numbers are fine


def test_the_launchers_accumulation_count_may_not_differ_from_the_recipes(monkeypatch, tmp_path,
                                                                          tiny_bert, tiny_glue):
    """Finding 9: with ACCELERATE_GRADIENT_ACCUMULATION_STEPS=1 (what `accelerate launch
    --gradient_accumulation_steps 1` or a config file sets) and the recipe's 4, Accelerate
    stepped every batch while the schedule was sized for 4: a quarter of the data, the logged
    loss divided by 4. Now the real Accelerator is refused before anything loads."""
    from lrft.setup import make_accelerator

    recipe = _recipe(tmp_path, tiny_bert, tiny_glue, gradient_accumulation_steps=4)
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    with pytest.raises(RecipeError) as err:
        make_accelerator(recipe)
    assert "train.gradient_accumulation_steps: 4" in str(err.value)
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" in str(err.value)
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    accelerator, _ = make_accelerator(recipe)
    assert accelerator.gradient_accumulation_steps == 4


# ---------------------------------------------------------------------------------------------
# ZeRO-3's partitioned parameters (finding 6), FSDP's wrapping unit (finding 3)
# ---------------------------------------------------------------------------------------------

def _partition_like_zero3(model) -> None:
    """What `deepspeed.zero.Init` leaves in each parameter: an empty 1-D local tensor, the real
    shape and size in `ds_shape` / `ds_numel`, an id in `ds_id`."""
    for i, p in enumerate(model.parameters()):
        p.ds_shape, p.ds_numel, p.ds_id = p.shape, p.numel(), i
        p.data = torch.empty(0, dtype=p.dtype)


def test_zero3_partitioned_parameters_keep_their_decay_and_counts(tiny_bert):
    """Finding 6: partitioned parameters looked 1-D and empty, so every one got weight decay 0
    and the group table showed 0 parameters."""
    from transformers import AutoModelForSequenceClassification

    from lrft.groups import format_group_table, param_groups
    from lrft.models import count_parameters, fp32_master_weights

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2,
                                                               dtype=torch.bfloat16)
    full = {n: tuple(p.shape) for n, p in model.named_parameters()}
    expected = param_groups(model, 1e-3, 0.01, layer_decay=0.8)
    counts, table = count_parameters(model), format_group_table(expected)
    _partition_like_zero3(model)
    groups = param_groups(model, 1e-3, 0.01, layer_decay=0.8)
    assert [(g["name"], g["weight_decay"], g["param_names"]) for g in groups] == \
           [(g["name"], g["weight_decay"], g["param_names"]) for g in expected]
    assert all(len(full[n]) >= 2 for g in groups if g["weight_decay"] > 0
               for n in g["param_names"])
    assert count_parameters(model) == counts and format_group_table(groups) == table
    # DeepSpeed keeps the fp32 copy of partitioned weights: lrft leaves them alone
    assert fp32_master_weights(model) == 0
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_fsdp_wraps_the_transformer_blocks(tiny_bert, tiny_llama):
    """Finding 3: with TRANSFORMER_BASED_WRAP and no class named, Accelerate wrapped BERT's
    `_no_split_modules`, embeddings included, and sharded the word embeddings twice. lrft names
    the block class (the real FSDP2 run is in tests/test_distributed.py)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lrft.layers import block_classes

    bert = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    assert "BertEmbeddings" in bert._no_split_modules
    assert block_classes(bert) == ["BertLayer"]
    lora = get_peft_model(bert, LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    assert block_classes(lora) == ["BertLayer"]
    assert block_classes(AutoModelForCausalLM.from_pretrained(tiny_llama)) == ["LlamaDecoderLayer"]


# ---------------------------------------------------------------------------------------------
# QLoRA (findings 7 and 10)
# ---------------------------------------------------------------------------------------------

@needs_bnb
def test_qlora_keeps_a_classifiers_new_head_out_of_4bit(tiny_bert):
    """Finding 7: the new classifier head became a 4-bit layer holding an unquantised weight and
    the first forward failed (an AssertionError in bitsandbytes)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForSequenceClassification

    from lrft.models import apply_lora, qlora_config
    from lrft.recipe import LoraConfig, ModelConfig

    config = qlora_config(ModelConfig(name_or_path=str(tiny_bert)), torch.device("cpu"))
    assert config.llm_int8_skip_modules == ["classifier"]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2,
                                                               quantization_config=config)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)
    assert type(model.classifier) is torch.nn.Linear
    model = apply_lora(model, "sequence_classification",
                       LoraConfig(enabled=True, load_in_4bit=True, r=4, alpha=8,
                                  target_modules=["query", "value"]))
    model.train()
    out = model(input_ids=torch.tensor([[2, 5, 6, 7, 3]]), labels=torch.tensor([1]))
    out.loss.backward()
    assert math.isfinite(out.loss.item())
    head = model.base_model.model.classifier.modules_to_save["default"]
    assert head.weight.grad is not None and head.weight.dtype == torch.float32


def test_qlora_computes_in_fp16_on_gpus_that_only_emulate_bf16(monkeypatch):
    """Finding 10: `torch.cuda.is_bf16_supported()` counts emulation (T4, V100), so QLoRA chose
    bf16 compute there. A causal LM keeps transformers' default skip (its lm_head)."""
    from lrft.models import qlora_config
    from lrft.recipe import ModelConfig

    causal = ModelConfig(name_or_path="unused", task="causal_lm")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation)  # a T4
    config = qlora_config(causal, torch.device("cuda"))
    assert config.bnb_4bit_compute_dtype == torch.float16
    assert config.llm_int8_skip_modules is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert qlora_config(causal, torch.device("cuda")).bnb_4bit_compute_dtype == torch.bfloat16
