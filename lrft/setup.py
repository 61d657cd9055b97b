"""Run set-up, shared by training, the LR range test and the benchmarks.

    make_accelerator(recipe)      the Accelerator, with the precision `train.mixed_precision` asks
    build_run(recipe, accelerator) data -> model (+LoRA) -> param groups -> optimizer, prepared
    build_schedule(recipe, run)   the LR schedule, sized in optimizer steps, and how it steps

How the schedule steps under Accelerate is decided here, in `Schedule`: the scheduler is NOT
passed to `accelerator.prepare`. A prepared scheduler steps once per process for every optimizer
step (it assumes a schedule sized for one process), so the LR at step k would depend on the
number of processes. Ours is sized in optimizer steps and stepped once per real optimizer step
(`Schedule.after_step`), or once per evaluation with the eval loss for a metric-driven schedule
(`Schedule.after_eval`); with the same global batch the LR at optimizer step k is the same on 1
process and on N (tests/test_launch.py). A step the fp16 loss scaler skipped (an overflow) does
not advance the schedule, as in the HF Trainer.

The launcher (`accelerate launch` with a config file, or its environment) chooses the distributed
type and can set the accumulation count and DeepSpeed's clipping on its own. The recipe decides
both here, and what a distributed type cannot run is refused before anything loads
(`lrft.launch.launcher_problems`). Under FSDP2 the transformer blocks are the wrapped units and the
optimizer's groups are re-pointed at the sharded parameters by name (`_shard`).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lrft import launch
from lrft.errors import RecipeError
from lrft.evaluation import TaskInfo
from lrft.recipe import Recipe


def say(accelerator, *args) -> None:
    """Print on the main process only."""
    if accelerator.is_main_process:
        print(*args, flush=True)


# ---------------------------------------------------------------------------------------------
# The accelerator
# ---------------------------------------------------------------------------------------------

def training_device() -> torch.device:
    """The training device, known before the Accelerator exists (`mixed_precision: auto` needs it).

    The shared process state is created the way `AcceleratorState` creates it (ACCELERATE_USE_CPU
    forces the CPU), so the Accelerator built next reuses it unchanged.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device


def _release_precision(precision: str | None) -> None:
    """Let this run use `precision` after an earlier run in the same process used another.

    Accelerate keeps one precision per process and raises when a second Accelerator asks for a
    different one; `train()` called twice in a notebook (fp32, then auto) would hit that.
    """
    from accelerate.state import AcceleratorState

    earlier = AcceleratorState._shared_state.get("_mixed_precision")
    wanted = precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # None: the launcher's
    if earlier is not None and earlier != wanted:
        AcceleratorState._reset_state()  # the process group (PartialState) is kept


def make_accelerator(recipe: Recipe):
    """The run's Accelerator, and a sentence saying why it got its mixed precision."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from lrft.precision import resolve_mixed_precision

    t = recipe.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    report_to = [r for r in recipe.log.report_to if r != "none"]
    precision, why = resolve_mixed_precision(t.mixed_precision, training_device())
    _release_precision(precision)
    accelerator = Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=precision,
        log_with=report_to or None,
        project_config=ProjectConfiguration(project_dir=t.output_dir,
                                            logging_dir=str(Path(t.output_dir) / "logs")),
    )
    problems = launch.launcher_problems(recipe, accelerator)
    if problems:
        raise RecipeError(problems, recipe.source)
    launch.fill_deepspeed_config(recipe, accelerator)
    return accelerator, why


# ---------------------------------------------------------------------------------------------
# Data, model, groups, optimizer
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything `build_run` sets up: what training (and the LR range test) works on."""

    accelerator: object
    recipe: Recipe
    tokenizer: object
    task_info: TaskInfo
    model: object  # prepared by Accelerate
    optimizer: object  # prepared by Accelerate
    train_loader: object
    eval_loaders: dict
    lr: float  # the base LR after optim.scale_lr
    lr_note: str | None
    trainable_params: int
    lora: dict | None = None  # what peft made of the lora section (lrft.models.lora_scaling)


def effective_lr(recipe: Recipe, num_processes: int) -> tuple[float, str | None]:
    """The base LR after `optim.scale_lr`, and the sentence that explains it (or None)."""
    from lrft.presets import scaled_lr

    o, t = recipe.optim, recipe.train
    if o.scale_lr == "none":
        return o.learning_rate, None
    batch = num_processes * t.per_device_train_batch_size * t.gradient_accumulation_steps
    lr = scaled_lr(o.learning_rate, batch, o.reference_batch_size, o.scale_lr)
    note = (f"{num_processes} processes x {t.per_device_train_batch_size} x "
            f"{t.gradient_accumulation_steps} = {batch} vs reference {o.reference_batch_size}: "
            f"lr {o.learning_rate:.3g} -> {lr:.3g} ({o.scale_lr})")
    return lr, note


def load_data(recipe: Recipe, tokenizer):
    """Datasets for the recipe's task, tokenised (classification) or built (causal LM)."""
    from lrft import data

    if recipe.model.task == "causal_lm":
        return data.load_causal_data(recipe.data, tokenizer, recipe.train.seed)
    raw = data.load_classification_data(recipe.data, recipe.train.seed,
                                        num_labels=recipe.model.num_labels)
    return data.tokenize_classification(raw, tokenizer, recipe.data.max_length)


def _loaders(recipe: Recipe, tokenizer, data):
    from lrft.data import make_dataloader

    t = recipe.train
    kind = "causal" if recipe.model.task == "causal_lm" else "classification"
    train_loader = make_dataloader(
        data.train, tokenizer, t.per_device_train_batch_size, shuffle=True, seed=t.seed,
        group_by_length=recipe.data.group_by_length, task=kind)
    # Eval batches sorted by length (longest first) when grouping is on: a fixed order whose
    # batches carry little padding; metrics do not depend on the order (bench/fixes.py).
    evals = {name: make_dataloader(ds, tokenizer, t.per_device_eval_batch_size, shuffle=False,
                                   seed=t.seed, group_by_length=recipe.data.group_by_length,
                                   task=kind)
             for name, ds in data.evals.items()}
    return train_loader, evals


def _model(recipe: Recipe, accelerator, tokenizer, data):
    """Load the model (+LoRA), with the attention kernel that suits the run's precision."""
    from lrft.models import count_parameters, load_model
    from lrft.precision import attention_for

    attn, why = attention_for(recipe.model.attn_implementation, accelerator.device,
                              accelerator.mixed_precision, recipe.data.max_length)
    if why:
        say(accelerator, why)
    cfg = replace(recipe.model, attn_implementation=attn)
    notes: list[str] = []
    model = load_model(cfg, recipe.lora, num_labels=getattr(data, "num_labels", None),
                       is_regression=getattr(data, "is_regression", False),
                       label_names=getattr(data, "label_names", None),
                       pad_token_id=tokenizer.pad_token_id, notes=notes)
    for note in notes:
        say(accelerator, note)
    trainable, total = count_parameters(model)
    say(accelerator, f"model: {type(model).__name__}, {trainable:,} of {total:,} parameters "
                     f"trainable")
    if cfg.dtype in ("bfloat16", "float16"):
        say(accelerator, f"model.dtype {cfg.dtype}: trainable weights and optimizer state kept "
                         f"in fp32 (master weights), frozen weights in {cfg.dtype}")
    return model, trainable


def build_run(recipe: Recipe, accelerator) -> Run:
    """The phases data -> model (+LoRA) -> param groups -> optimizer, prepared by Accelerate.

    Prints the model's trainable parameters and the param-group table on the main process.

    Raises:
        RecipeError, DataError: the recipe's model or data cannot be used.
    """
    from lrft.evaluation import task_info
    from lrft.groups import format_group_table, param_groups
    from lrft.models import check_model_fits, load_tokenizer
    from lrft.optim import OPTIMIZERS, build_optimizer, recipe_kwargs

    # ---- data -----------------------------------------------------------------------------
    problems, limit = check_model_fits(recipe.model)
    if problems:
        raise RecipeError(problems, recipe.source)
    if limit is not None and recipe.data.max_length > limit:
        say(accelerator, f"data.max_length: {recipe.data.max_length} is above the model's "
                         f"position limit; sequences are cut at {limit} tokens")
        recipe = replace(recipe, data=replace(recipe.data, max_length=limit))
    tokenizer = load_tokenizer(recipe.model)
    with accelerator.main_process_first():  # the main process tokenises and fills the cache
        data = load_data(recipe, tokenizer)
    train_loader, eval_loaders = _loaders(recipe, tokenizer, data)

    # ---- model (+LoRA) --------------------------------------------------------------------
    model, trainable = _model(recipe, accelerator, tokenizer, data)

    # ---- param groups ---------------------------------------------------------------------
    o = recipe.optim
    lr, lr_note = effective_lr(recipe, accelerator.num_processes)
    try:
        groups = param_groups(model, lr, o.weight_decay, layer_decay=o.layer_decay,
                              head_lr_scale=o.head_lr_scale,
                              embedding_lr_scale=o.embedding_lr_scale,
                              loraplus_lr_ratio=recipe.lora.loraplus_lr_ratio,
                              hidden_matrices=OPTIMIZERS[o.name].hidden_matrices)
    except ValueError as e:  # a scale for a role no trainable parameter has (LoRA's frozen base)
        raise RecipeError([f"optim: {e}"], recipe.source) from e
    if lr_note:
        say(accelerator, f"scale_lr: {lr_note}")

    # ---- optimizer ------------------------------------------------------------------------
    optimizer = build_optimizer(groups, o.name, lr=lr, weight_decay=o.weight_decay, model=model,
                                **recipe_kwargs(o))
    say(accelerator, format_group_table(optimizer.param_groups))  # Muon's: with each algorithm
    lora = _lora_summary(recipe, model)
    if lora:
        say(accelerator, lora["line"])
    with _shard(accelerator, model, optimizer):
        model, optimizer, train_loader, *evals = accelerator.prepare(
            model, optimizer, train_loader, *eval_loaders.values())
    return Run(accelerator, recipe, tokenizer, task_info(recipe.model.task, data), model,
               optimizer, train_loader, dict(zip(eval_loaders, evals)), lr, lr_note, trainable,
               lora)


def _lora_summary(recipe: Recipe, model) -> dict | None:
    """What the LoRA adapters are scaled by and how their LRs are set, with the line that says
    it under the group table; None without LoRA."""
    from lrft.models import lora_line, lora_scaling

    info = lora_scaling(model)
    if info is None:
        return None
    ratio = recipe.lora.loraplus_lr_ratio
    return {**info, "loraplus_lr_ratio": ratio, "line": lora_line(info, ratio)}


@contextlib.contextmanager
def _shard(accelerator, model, optimizer):
    """Around `accelerator.prepare` under FSDP2: shard block by block, and keep the groups.

    Before: without a layer class in the launcher config, Accelerate wraps the model's
    `_no_split_modules`, which for BERT-style models include the embeddings block, and then
    shards the word embeddings twice (a TypeError in `prepare`); the blocks named ``layer.i``
    (``groups.block_classes``) are the units to wrap. After: sharding replaces every parameter
    with a DTensor and Accelerate re-points the optimizer by data pointer, which maps every
    parameter of ranks > 0 onto one when `fsdp_cpu_ram_efficient_loading` left them on the meta
    device (all at pointer 0); lrft's groups name their parameters, so they are re-pointed by name.
    """
    from lrft.layers import block_classes

    plugin = getattr(accelerator.state, "fsdp_plugin", None) \
        if accelerator.distributed_type == "FSDP" else None
    if plugin is not None and plugin.transformer_cls_names_to_wrap is None:
        plugin.transformer_cls_names_to_wrap = block_classes(model) or None
    yield
    if plugin is not None and plugin.fsdp_version == 2:
        from accelerate.utils import fsdp2_canonicalize_names

        sharded = fsdp2_canonicalize_names(dict(model.named_parameters()))
        for group in optimizer.param_groups:
            group["params"] = [sharded[name] for name in group["param_names"]]


# ---------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------

def total_training_steps(recipe: Recipe, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps in all, optimizer steps per epoch) for a per-process loader length."""
    t = recipe.train
    per_epoch = max(1, math.ceil(batches_per_epoch / t.gradient_accumulation_steps))
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * per_epoch)
    return total, per_epoch


@dataclass
class Schedule:
    """The LR schedule of a run and the one rule for stepping it (see the module docstring)."""

    scheduler: object  # LambdaLR, or ReduceLROnPlateau for a metric-driven schedule
    total: int  # optimizer steps
    per_epoch: int
    warmup_steps: int
    by_metric: bool

    def after_step(self, scaler_skipped: bool = False) -> None:
        """After each optimizer step (taken, skipped by the guard, or rolled back); a step the
        fp16 loss scaler skipped (`scaler_skipped`) does not count."""
        if not self.by_metric and not scaler_skipped:
            self.scheduler.step()

    def after_eval(self, eval_loss: float | None) -> None:
        """After each evaluation during training: a metric-driven schedule steps here."""
        if self.by_metric and eval_loss is not None:
            self.scheduler.step(eval_loss)


def build_schedule(recipe: Recipe, optimizer, batches_per_epoch: int) -> Schedule:
    """The recipe's LR schedule over `optimizer`'s groups, sized in optimizer steps.

    Raises:
        RecipeError: `schedule.warmup_steps` is longer than the run.
    """
    from lrft import schedule

    s = recipe.schedule
    total, per_epoch = total_training_steps(recipe, batches_per_epoch)
    if s.warmup_steps is not None and s.warmup_steps > total:
        raise RecipeError([f"schedule.warmup_steps: {s.warmup_steps} is more than the run's "
                           f"{total} optimizer steps; lower it or use schedule.warmup_ratio"])
    options = schedule.recipe_options(s)
    scheduler = schedule.build_scheduler(optimizer, s.lr_scheduler_type, total, **options)
    warmup = schedule.resolve_warmup_steps(total, s.warmup_steps, s.warmup_ratio)
    return Schedule(scheduler, total, per_epoch, warmup,
                    by_metric=s.lr_scheduler_type in schedule.METRIC_SCHEDULERS)
