"""Resuming after the recipe changed: what may change, what is refused, and applying it for real.

A run folder keeps the recipe it started with (`recipe.yaml`). Resuming it with a different
recipe is either a deliberate, safe change or a mistake that would silently mix two runs:

- Applied, and recorded (a `resume` record in metrics.jsonl with every change, and one line on the
  terminal each): more steps or epochs (the schedule is stretched over the new length from where
  the run is), a new learning rate (every group's base LR scaled by new / old, so layer-decay and
  head ratios hold; the usual move after a divergence), and keys that only change what is
  logged, evaluated, saved or guarded.
- Refused, with the list of differences: anything that changes what the steps so far mean, i.e.
  the model, the data, the batch size, accumulation, the optimizer and its settings, the
  schedule's shape, LoRA, the seed, the precision; and fewer steps than the run already did.
"""

from __future__ import annotations

from typing import Any

from lrft.errors import RecipeError

# Keys that may differ on resume; everything else must be as the run started.
APPLIED = ("train.max_steps", "train.num_train_epochs", "optim.learning_rate")
HOOKS = ("train.eval_steps", "train.save_steps", "train.save_total_limit", "train.logging_steps",
         "train.eval_at_start", "train.per_device_eval_batch_size", "train.num_threads",
         "train.output_dir", "train.resume_from_checkpoint", "train.overwrite_output_dir",
         "data.max_eval_samples", "log.report_to", "log.project", "log.run_name")
ALLOWED = APPLIED + HOOKS


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not prefix:  # sections only; mapping values stay whole
            out.update(_flat(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_changes(saved: dict, current: dict) -> dict[str, list]:
    """Keys whose value differs between the recipe a run started with and the current one.

    Args:
        saved: the run's `recipe.yaml`, as loaded.
        current: `Recipe.to_dict()` of the recipe the run is resumed with.

    Returns:
        {dotted key: [old, new]}, in the current recipe's key order.
    """
    old, new = _flat(saved or {}), _flat(current)
    return {k: [old.get(k), v] for k, v in new.items() if k in old and old[k] != v}


def check_changes(changes: dict[str, list], done_steps: int, total_steps: int) -> None:
    """Refuse changes that would mix two different runs under one folder.

    Raises:
        RecipeError: listing every refused difference, with the fix.
    """
    refused = {k: v for k, v in changes.items() if k not in ALLOWED}
    problems = [f"{k}: {old!r} when the run started, {new!r} now; a resumed run must keep it "
                f"(start a new run in another train.output_dir, or set it back)"
                for k, (old, new) in refused.items()]
    if total_steps < done_steps:
        problems.append(f"train.max_steps / train.num_train_epochs: the run already did "
                        f"{done_steps} steps and would now end at {total_steps}; train longer, "
                        f"or use the checkpoint as it is")
    if problems:
        raise RecipeError(problems)


def apply_lr_change(optimizer, scheduler, old_lr: float, new_lr: float) -> float:
    """Scale every group's base and current LR by new / old (ratios between groups kept).

    The checkpoint restored the old base LRs into the optimizer and the scheduler; without this
    the run would continue at the old LR while the start of the run printed the new one.

    Returns:
        The factor applied.
    """
    factor = new_lr / old_lr
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    return factor


def describe(changes: dict[str, list]) -> list[str]:
    """One line per applied change, for the terminal."""
    notes = {"train.max_steps": "the schedule continues over the new length",
             "train.num_train_epochs": "the schedule continues over the new length",
             "optim.learning_rate": "every group's LR scaled by new / old"}
    return [f"resume: {k}: {old!r} -> {new!r}" + (f" ({notes[k]})" if k in notes else "")
            for k, (old, new) in changes.items() if k not in ("train.resume_from_checkpoint",
                                                              "train.overwrite_output_dir")]
