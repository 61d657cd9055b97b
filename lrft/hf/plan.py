"""The plan of the Trainer's (optimizer, scheduler) pair, and the TrainingArguments it contradicts.

A plan is what `lrft.hf.pair` builds the pair from: a recipe's `optim` and `schedule` sections
(its `guard` too, for `attach`), or the keyword arguments of `param_groups`, `build_optimizer` and
`build_scheduler`, with what they leave out taken from the TrainingArguments. `conflicts` lists
every TrainingArguments value the pair would make the Trainer ignore while it says something else
(`OVERRIDDEN` names them), and the set-ups in which the plan would silently do something other
than it says (a LoRA recipe on a plain model, a plateau schedule without evaluations, a batch size
found at run time).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lrft import schedule as schedules
from lrft.errors import RecipeError
from lrft.recipe import GuardConfig, Recipe, load_recipe
from lrft.validate import schedule_problem

# TrainingArguments the pair replaces -> the recipe key that decides it instead.
OVERRIDDEN = {
    "learning_rate": "optim.learning_rate", "weight_decay": "optim.weight_decay",
    "optim": "optim.name", "optim_args": "optim.args", "adam_beta1": "optim.adam_beta1",
    "adam_beta2": "optim.adam_beta2", "adam_epsilon": "optim.adam_epsilon",
    "lr_scheduler_type": "schedule.lr_scheduler_type",
    "lr_scheduler_kwargs": "schedule.* (min_lr_ratio, num_cycles, ...)",
    "warmup_steps": "schedule.warmup_steps or schedule.warmup_ratio",
}
# The same, named as keyword arguments of `optimizers` / `attach`.
KWARG_NAMES = {
    "learning_rate": "lr", "weight_decay": "weight_decay", "optim": "optim", "optim_args":
    "optimizer keyword arguments", "adam_beta1": "betas", "adam_beta2": "betas",
    "adam_epsilon": "eps", "lr_scheduler_type": "lr_scheduler_type",
    "lr_scheduler_kwargs": "schedule keyword arguments (min_lr_ratio=...)",
    "warmup_steps": "warmup_steps or warmup_ratio",
}
# TrainingArguments `optim` values that name an lrft optimizer.
HF_OPTIMIZERS = {
    "adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_bnb_8bit": "adamw_8bit",
    "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit", "lion_32bit": "lion",
    "lion_8bit": "lion_8bit", "sgd": "sgd", "adagrad": "adagrad", "rmsprop": "rmsprop",
    "adafactor": "adafactor", "schedule_free_adamw": "schedule_free_adamw",
}
GROUP_KEYS = ("layer_decay", "head_lr_scale", "embedding_lr_scale", "no_decay_1d",
              "loraplus_lr_ratio")
# Recipe `train` keys that change what the recipe's LR means (run length, batch, clipping): the
# Trainer's arguments decide them, and a disagreement is worth a warning.
TRAIN_KEYS = ("num_train_epochs", "max_steps", "per_device_train_batch_size",
              "gradient_accumulation_steps", "max_grad_norm")


@dataclass
class Plan:
    """What the pair is built from, whichever way it was given."""

    lr: float  # every group's LR before its scales: after the recipe's scale_lr
    stated_lr: float  # as the recipe or the keyword arguments say it
    weight_decay: float
    groups: dict[str, Any]  # param_groups keywords besides lr and weight_decay
    optimizer: str
    optimizer_kwargs: dict[str, Any]
    schedule: str
    schedule_options: dict[str, Any]  # warmup_steps, warmup_ratio, min_lr_ratio, ...
    source: str  # "recipes/x.yaml" or "keyword arguments"
    names: dict[str, str]  # TrainingArguments name -> how this source names the setting
    recipe: Recipe | None = None
    guard: GuardConfig | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The plan: from a recipe, or from keyword arguments and the TrainingArguments
# ---------------------------------------------------------------------------------------------

def _value(x):
    return getattr(x, "value", x)  # TrainingArguments turns some strings into enums


def _plan_from_recipe(recipe: Recipe, args) -> Plan:
    from lrft.optim import recipe_kwargs
    from lrft.setup import effective_lr

    o, s = recipe.optim, recipe.schedule
    # scale_lr follows the Trainer's batch, not the recipe's train section
    sized = replace(recipe, train=replace(
        recipe.train, per_device_train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps))
    lr, lr_note = effective_lr(sized, args.world_size)
    return Plan(lr=lr, stated_lr=o.learning_rate, weight_decay=o.weight_decay,
                groups={"layer_decay": o.layer_decay, "head_lr_scale": o.head_lr_scale,
                        "embedding_lr_scale": o.embedding_lr_scale,
                        "loraplus_lr_ratio": recipe.lora.loraplus_lr_ratio},
                optimizer=o.name, optimizer_kwargs=recipe_kwargs(o),
                schedule=s.lr_scheduler_type, schedule_options=schedules.recipe_options(s),
                source=recipe.source or "the recipe", names=dict(OVERRIDDEN), recipe=recipe,
                guard=recipe.guard if recipe.guard.enabled else None,
                notes=[f"scale_lr: {lr_note}"] if lr_note else [])


def _plan_from_kwargs(kwargs: dict, args) -> tuple[Plan, list[str]]:
    """A plan from keyword arguments; what they leave out comes from the TrainingArguments."""
    from lrft.optim import reads_betas, reads_eps

    kw, problems = dict(kwargs), []
    lr = kw.pop("lr", args.learning_rate)
    weight_decay = kw.pop("weight_decay", args.weight_decay)
    groups = {k: kw.pop(k) for k in GROUP_KEYS if k in kw}
    options = {k: kw.pop(k) for k in schedules.DEFAULTS if k in kw}
    optimizer = kw.pop("optim", None) or HF_OPTIMIZERS.get(_value(args.optim))
    if optimizer is None:
        problems.append(f"TrainingArguments.optim={_value(args.optim)!r} has no lrft optimizer; "
                        f"pass optim= one of {', '.join(sorted(set(HF_OPTIMIZERS.values())))}")
        optimizer = "adamw"
    if "adam" in optimizer:  # HF's adam_* arguments are Adam's: Lion keeps its own betas
        if reads_betas(optimizer):
            kw.setdefault("betas", (args.adam_beta1, args.adam_beta2))
        if reads_eps(optimizer):
            kw.setdefault("eps", args.adam_epsilon)
    schedule = kw.pop("lr_scheduler_type", None) or _value(args.lr_scheduler_type)
    if schedule not in schedules.SCHEDULES:
        problems.append(f"lr_scheduler_type {schedule!r}: {schedules.unknown_schedule(schedule)}")
        schedule = "linear"
    if "warmup_steps" not in options and "warmup_ratio" not in options \
            and schedules.SCHEDULES[schedule].warmup and args.warmup_steps:
        key = "warmup_steps" if args.warmup_steps >= 1 else "warmup_ratio"  # HF's own rule
        options[key] = int(args.warmup_steps) if key == "warmup_steps" else args.warmup_steps
    plan = Plan(lr=lr, stated_lr=lr, weight_decay=weight_decay, groups=groups,
                optimizer=optimizer, optimizer_kwargs=kw, schedule=schedule,
                schedule_options=options, source="keyword arguments", names=dict(KWARG_NAMES))
    return plan, problems


def make_plan(recipe, args, overrides: list[str] | None, kwargs: dict) -> Plan:
    """The plan from a recipe (a path or a `Recipe`) or from keyword arguments.

    Raises:
        RecipeError: a bad recipe, or a recipe and keyword arguments given together.
        ValueError: overrides without a recipe path.
    """
    if recipe is not None and kwargs:
        raise ValueError(f"give a recipe or keyword arguments, not both (got {sorted(kwargs)}); "
                         f"change a recipe value with overrides=['optim.layer_decay=0.8']")
    if overrides and not isinstance(recipe, (str, Path)):
        raise ValueError("overrides apply to a recipe file: pass its path")
    if recipe is None:
        plan, problems = _plan_from_kwargs(kwargs, args)
        if problems:
            raise RecipeError(problems, "TrainingArguments")
        return plan
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    return _plan_from_recipe(recipe, args)


# ---------------------------------------------------------------------------------------------
# Contradictions between the TrainingArguments and the plan
# ---------------------------------------------------------------------------------------------

def _set_by_user(args) -> set[str]:
    """The overridden TrainingArguments whose value is not their class's default."""
    defaults = {f.name: f.default for f in dataclasses.fields(type(args))}
    out = set()
    for name in OVERRIDDEN:
        value, default = _value(getattr(args, name)), _value(defaults.get(name))
        if name in ("lr_scheduler_kwargs", "optim_args"):
            if value:  # None and {} both mean unset
                out.add(name)
        elif value != default:
            out.add(name)
    return out


def _agrees(name: str, plan: Plan, args, total: int, warmup: int) -> tuple[bool, Any]:
    """(does TrainingArguments.<name> agree with the plan, the plan's value)."""
    betas = plan.optimizer_kwargs.get("betas")
    planned = {
        "learning_rate": plan.stated_lr, "weight_decay": plan.weight_decay,
        "optim": plan.optimizer, "lr_scheduler_type": plan.schedule,
        "adam_beta1": betas[0] if betas else None, "adam_beta2": betas[1] if betas else None,
        "adam_epsilon": plan.optimizer_kwargs.get("eps"), "warmup_steps": warmup,
    }[name]
    value = _value(getattr(args, name))
    if name == "optim":
        return HF_OPTIMIZERS.get(value) == planned, planned
    if name == "warmup_steps":
        return args.get_warmup_steps(total) == planned, f"{planned} steps"
    if isinstance(planned, float) and isinstance(value, (int, float)):
        return math.isclose(value, planned, rel_tol=1e-9), planned
    return planned is not None and value == planned, planned


def conflicts(plan: Plan, args, total: int, model) -> list[str]:
    """Every way the TrainingArguments would make the Trainer do something the plan does not."""
    warmup = resolved_warmup(plan, total)
    problems = []
    for name in sorted(_set_by_user(args)):
        if name in ("lr_scheduler_kwargs", "optim_args"):
            problems.append(f"TrainingArguments.{name}={getattr(args, name)!r} is not read by "
                            f"lrft's pair: set {plan.names[name]} instead")
            continue
        ok, planned = _agrees(name, plan, args, total, warmup)
        if not ok:
            problems.append(
                f"TrainingArguments.{name}={_value(getattr(args, name))!r} is not used: "
                f"{plan.source} sets {plan.names[name]} = {planned!r}; remove {name} from the "
                f"TrainingArguments or make the two agree")
    if plan.schedule in schedules.METRIC_SCHEDULERS:
        if _value(args.eval_strategy) == "no":
            problems.append(f"{plan.schedule} steps on evaluations: set TrainingArguments."
                            f"eval_strategy='steps' (and eval_steps)")
        if args.metric_for_best_model is None:
            problems.append(f"{plan.schedule} follows the eval loss: set TrainingArguments."
                            f"metric_for_best_model='loss'")
    clash = schedule_problem(plan.optimizer, plan.schedule)
    if clash:  # a recipe refuses it itself; keyword arguments take the Trainer's linear default
        problems.append(f"lr_scheduler_type: {clash}")
    if _schedule_free(plan) and args.load_best_model_at_end:
        problems.append(f"TrainingArguments.load_best_model_at_end with {plan.optimizer}: the "
                        f"Trainer would load a checkpoint's averaged weights into a model it "
                        f"then treats as the training weights; set load_best_model_at_end=False "
                        f"(the final model is the averaged one)")
    if args.auto_find_batch_size:
        problems.append("TrainingArguments.auto_find_batch_size changes the batch, and so the "
                        "step count, after the schedule is sized; set it to False")
    if plan.recipe is not None and plan.recipe.lora.enabled and not hasattr(model, "peft_config"):
        problems.append("lora.enabled: the recipe trains LoRA adapters (its LR is a LoRA LR) but "
                        "the model is not a PEFT model; wrap it with peft.get_peft_model or use "
                        "a full fine-tuning recipe")
    return problems


def _schedule_free(plan: Plan) -> bool:
    from lrft.optim import OPTIMIZERS

    spec = OPTIMIZERS.get(plan.optimizer)
    return spec is not None and spec.schedule_free


def train_key_warning(plan: Plan, args) -> str | None:
    """The recipe's `train` keys that the TrainingArguments contradict, as one sentence."""
    if plan.recipe is None:
        return None
    t, differ = plan.recipe.train, []
    for key in TRAIN_KEYS:
        ours, theirs = getattr(t, key), getattr(args, key)
        if key == "max_grad_norm":
            ours, theirs = ours or 0.0, theirs or 0.0
        if f"train.{key}" in plan.recipe.explicit and ours != theirs:
            differ.append(f"train.{key}={ours!r} (TrainingArguments: {theirs!r})")
    if not differ:
        return None
    return (f"{plan.source}: the Trainer's TrainingArguments decide the run, so these recipe "
            f"values are not used: {', '.join(differ)}")


def resolved_warmup(plan: Plan, total: int) -> int:
    """The plan's warmup in optimizer steps, by lrft.schedule's one rounding rule."""
    if plan.schedule in schedules.METRIC_SCHEDULERS:
        return 0
    o = plan.schedule_options
    return schedules.resolve_warmup_steps(total, o.get("warmup_steps"), o.get("warmup_ratio"))
