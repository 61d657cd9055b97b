"""The (optimizer, scheduler) pair for `transformers.Trainer(optimizers=...)`, and `attach`.

The pair is built from a recipe's `optim` and `schedule` sections, or from the keyword arguments
of `param_groups`, `build_optimizer` and `build_scheduler` (then what they leave out comes from the
TrainingArguments). It is sized in the Trainer's own optimizer steps (`trainer_steps`: epochs or
max_steps, batch size, gradient accumulation, number of processes, drop_last, exactly as
`Trainer.set_initial_training_values` counts them), and every group keeps its ratio to the others
through the schedule, which multiplies each group's own base LR.

The Trainer steps the scheduler once per optimizer step and does not hand it to
`accelerator.prepare`, so the LR at step k is the same on 1 process and on N.

The scheduler carries a small dict `scheduler.lrft` (the planned step count, and the guard's LR
scale and rollback count). A torch scheduler's `state_dict` holds its attributes, so the dict is
saved in every Trainer checkpoint and restored on resume; `GroupLRCallback` checks the planned step
count against the Trainer's `state.max_steps` when training starts.
"""

from __future__ import annotations

import math
import warnings

from lrft.errors import RecipeError
from lrft.hf.plan import (OVERRIDDEN, Plan, conflicts, make_plan, resolved_warmup,
                          train_key_warning)
from lrft.recipe import GuardConfig

# ---------------------------------------------------------------------------------------------
# The step count
# ---------------------------------------------------------------------------------------------

def trainer_steps(args, train_dataset=None) -> int:
    """The optimizer steps `Trainer.train()` runs with these arguments: its `state.max_steps`.

    Args:
        args: the Trainer's `TrainingArguments`.
        train_dataset: the train dataset (anything with a length) or its number of rows; not
            needed when `args.max_steps` > 0.

    Returns:
        `args.max_steps` if positive, else ceil(num_train_epochs x optimizer steps per epoch),
        where an epoch is each process's share of the batches (`dataloader_drop_last` respected,
        as Accelerate shards them) divided by `gradient_accumulation_steps`, rounded up.

    Raises:
        ValueError: epochs are asked for and the dataset has no length.
    """
    if args.max_steps > 0:
        return int(args.max_steps)
    try:
        rows = train_dataset if isinstance(train_dataset, int) else len(train_dataset)
    except TypeError:
        raise ValueError("the train dataset has no length: set TrainingArguments.max_steps, or "
                         "give num_training_steps") from None
    split = getattr(args.accelerator_config, "split_batches", False)
    per_process = batches_per_process(rows, args.train_batch_size, args.dataloader_drop_last,
                                       1 if split else args.world_size)
    per_epoch = max(math.ceil(per_process / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def batches_per_process(rows: int, batch: int, drop_last: bool, processes: int) -> int:
    """Batches each process gets per epoch (Accelerate's BatchSamplerShard, even_batches)."""
    batches = rows // batch if drop_last else math.ceil(rows / batch)
    return batches // processes if drop_last else math.ceil(batches / processes)


# ---------------------------------------------------------------------------------------------
# Building the pair
# ---------------------------------------------------------------------------------------------

def build_optimizer_for(plan: Plan, model):
    """The plan's param groups and optimizer over `model` (also used by the range test)."""
    from lrft.groups import param_groups
    from lrft.optim import OPTIMIZERS, build_optimizer

    spec = OPTIMIZERS.get(plan.optimizer)
    groups = param_groups(model, plan.lr, plan.weight_decay,
                          hidden_matrices=spec is not None and spec.hidden_matrices,
                          **{k: v for k, v in plan.groups.items() if v is not None})
    return build_optimizer(groups, plan.optimizer, lr=plan.lr, weight_decay=plan.weight_decay,
                           model=model, **plan.optimizer_kwargs)


def build_pair(args, model, train_dataset, recipe, *, overrides=None, num_training_steps=None,
               verbose=True, **kwargs):
    """(optimizer, scheduler, plan): `optimizers` and `attach` share it."""
    from lrft.schedule import build_scheduler

    plan = make_plan(recipe, args, overrides, kwargs)
    total = num_training_steps or trainer_steps(args, train_dataset)
    problems = conflicts(plan, args, total, model)
    if problems:
        raise RecipeError(problems, f"TrainingArguments vs {plan.source}")
    warning = train_key_warning(plan, args)
    if warning:
        warnings.warn(warning, UserWarning, stacklevel=3)
    optimizer = build_optimizer_for(plan, model)
    scheduler = build_scheduler(optimizer, plan.schedule, total, **plan.schedule_options)
    scheduler.lrft = {"num_training_steps": total, "learning_rate": plan.lr, "lr_scale": 1.0,
                      "rollbacks": 0}
    if verbose and args.process_index == 0:
        print(describe(plan, optimizer, total, model), flush=True)
    return optimizer, scheduler, plan


def describe(plan: Plan, optimizer, total: int, model=None) -> str:
    """What the pair does and which TrainingArguments it replaces, with the group table (and
    the LoRA adapters' scale under it)."""
    from lrft.groups import format_group_table
    from lrft.models import lora_line, lora_scaling

    lora = lora_scaling(model) if model is not None else None
    lines = [f"lrft: {plan.optimizer} over {len(optimizer.param_groups)} param groups, "
             f"{plan.schedule} schedule over the Trainer's {total} optimizer steps "
             f"({resolved_warmup(plan, total)} warmup), from {plan.source}",
             *plan.notes,
             f"  not used now: TrainingArguments {', '.join(OVERRIDDEN)}",
             # base LRs: the schedule has already scaled `lr` to its step-0 value
             format_group_table([{**g, "lr": g.get("initial_lr", g["lr"])}
                                 for g in optimizer.param_groups])]
    if lora is not None:
        lines.append(lora_line(lora, plan.groups.get("loraplus_lr_ratio")))
    return "\n".join(lines)


def optimizers(args, model, train_dataset=None, recipe=None, *, overrides: list[str] | None = None,
               num_training_steps: int | None = None, verbose: bool = True, **kwargs):
    """The (optimizer, scheduler) pair for `Trainer(optimizers=...)`, sized in the Trainer's steps.

    Args:
        args: the Trainer's `TrainingArguments` (the step count comes from them).
        model: the model the Trainer trains (PEFT-wrapped or not): its trainable parameters.
        train_dataset: the Trainer's train dataset, or its number of rows.
        recipe: a recipe path or `Recipe`; its `optim` and `schedule` sections are used.
        overrides: `section.key=value` strings for a recipe path.
        num_training_steps: the step count, when the dataset has no length (else computed).
        verbose: print what the pair does and the group table (main process).
        **kwargs: instead of a recipe: `param_groups` keywords (lr, weight_decay, layer_decay,
            head_lr_scale, embedding_lr_scale, no_decay_1d), `optim` (an lrft optimizer name) and
            its keywords (betas, eps, momentum, ...), `lr_scheduler_type` and the schedule's
            options (warmup_steps, warmup_ratio, min_lr_ratio, ...). Left out: lr,
            weight_decay, optim, betas, eps, lr_scheduler_type and warmup come from `args`.

    Returns:
        (optimizer, scheduler): each group's LR at optimizer step k is its base LR x the
        schedule's `lr_multiplier(k)`.

    Raises:
        RecipeError: a bad recipe, or TrainingArguments that contradict it (see `lrft.hf`).
        ValueError: bad keyword arguments, or a warmup longer than the run.
    """
    optimizer, scheduler, _ = build_pair(args, model, train_dataset, recipe, overrides=overrides,
                                         num_training_steps=num_training_steps, verbose=verbose,
                                         **kwargs)
    return optimizer, scheduler


def _guard_config(guard, plan: Plan) -> GuardConfig | None:
    if guard is None:
        return plan.guard
    if guard is False:
        return None
    if guard is True:
        return GuardConfig(enabled=True)
    if isinstance(guard, dict):
        return GuardConfig(**{**guard, "enabled": True})
    return guard


def attach(trainer, recipe=None, *, guard=None, overrides: list[str] | None = None,
           num_training_steps: int | None = None, verbose: bool = True, **kwargs):
    """Give a Trainer lrft's optimizer and schedule, per-group LR logs and (optionally) the guard.

    Call it after `Trainer(...)` and before `trainer.train()`. The callbacks go first in the
    Trainer's list, so the trackers' callbacks (TensorBoard, W&B, ...) see the `lr/<group>` and
    `guard/*` keys.

    Args:
        trainer: a `transformers.Trainer` (or subclass) built without `optimizers=`.
        recipe, overrides, num_training_steps, verbose, **kwargs: as for `optimizers`.
        guard: None follows the recipe's `guard.enabled`; True, a dict of `guard` keys or a
            `GuardConfig` turns it on; False off.

    Returns:
        The trainer.

    Raises:
        ValueError: the trainer already has an optimizer or scheduler, builds its model with
            `model_init`, or runs under FSDP or DeepSpeed (which build their own).
        RecipeError: as for `optimizers`.
    """
    from lrft.hf.callbacks import GroupLRCallback, GuardCallback, ScheduleFreeCallback
    from lrft.optim import OPTIMIZERS

    problems = [m for bad, m in (
        (trainer.optimizer is not None or trainer.lr_scheduler is not None,
         "the trainer already has an optimizer or scheduler (optimizers=...): attach builds them"),
        (getattr(trainer, "optimizer_cls_and_kwargs", None) is not None,
         "the trainer has optimizer_cls_and_kwargs: attach builds the optimizer"),
        (trainer.model_init is not None, "model_init builds a new model per run: build the pair "
                                         "in a Trainer subclass's create_optimizer_and_scheduler"),
        (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled,
         "FSDP and DeepSpeed build the optimizer themselves"),
    ) if bad]
    if problems:
        raise ValueError("lrft.hf.attach: " + "; ".join(problems))
    optimizer, scheduler, plan = build_pair(
        trainer.args, trainer.model, trainer.train_dataset, recipe, overrides=overrides,
        num_training_steps=num_training_steps, verbose=verbose, **kwargs)
    trainer.optimizer, trainer.lr_scheduler = optimizer, scheduler
    config = _guard_config(guard, plan)
    callbacks = [GroupLRCallback()] + ([GuardCallback(config)] if config is not None else [])
    trainer.callback_handler.callbacks[:0] = callbacks
    if OPTIMIZERS[plan.optimizer].schedule_free:  # last: it reads the flow callback's decisions
        trainer.callback_handler.callbacks.append(ScheduleFreeCallback())
    return trainer
