"""lrft inside the Hugging Face Trainer: lrft's param groups, schedule, per-group LR logs and guard.

Two lines added to an existing Trainer script, after `trainer = Trainer(...)`::

    from lrft.hf import attach
    attach(trainer, "recipes/bert/standard.yaml")    # then trainer.train() as before

`attach` builds the recipe's param groups (layer decay, head / embedding LR scales, no-decay), its
optimizer and its schedule, sized from the Trainer's own step count, and adds two callbacks: one
that logs every group's LR (`lr/<group>`) to the Trainer's log and trackers, and, when the
recipe's `guard.enabled` is true, the divergence guard. The parts, for scripts that want them:

    optimizers(args, model, train_dataset, recipe)  the (optimizer, scheduler) pair for
                                                    `Trainer(optimizers=...)`   (pair.py)
    trainer_steps(args, train_dataset)              the optimizer steps the Trainer will run
                                                    (the recipe / keyword plan and the
                                                    TrainingArguments it refuses: plan.py)
    GroupLRCallback, GuardCallback                  the callbacks                (callbacks.py)
    ScheduleFreeCallback                            saves a schedule-free optimizer's averaged
                                                    weights (`attach` adds it)   (callbacks.py)
    find_lr(trainer)                                the LR range test over the Trainer's model,
                                                    collator and train dataset   (range_test.py)

Instead of a recipe, the keyword arguments of `param_groups`, `build_optimizer` and
`build_scheduler` may be given (`attach(trainer, layer_decay=0.8)`); what they leave out comes
from the TrainingArguments.

What the pair replaces: the Trainer then ignores `learning_rate`, `weight_decay`, `optim`,
`optim_args`, `adam_beta1`, `adam_beta2`, `adam_epsilon`, `lr_scheduler_type`,
`lr_scheduler_kwargs` and `warmup_steps` of its TrainingArguments: those are the recipe's
(`optim.*`, `schedule.*`). A TrainingArguments value left at its default is simply replaced; one
set to anything else must agree with the recipe, or the call refuses (a `RecipeError` naming both
values), since the Trainer would silently train with another value than the script says. The run's
length, batch, accumulation, clipping (`max_grad_norm`), precision, logging, evaluation and
checkpoints stay the Trainer's; a recipe's `train` section is not read (a warning names the keys
where it disagrees with the TrainingArguments), nor are `model`, `data` and `log`.
"""

from __future__ import annotations

import transformers

# Written against transformers 5 (warmup_steps doubling as a ratio, train_sampling_strategy, the
# optimizer-step callback events): on 4.x a `warmup_ratio` argument would be silently ignored.
if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"lrft.hf needs transformers >= 5 (found {transformers.__version__}): "
                      f"pip install -U transformers")

from lrft.optim import quiet_bitsandbytes  # noqa: E402

quiet_bitsandbytes()  # transformers' Trainer imports peft, which imports bitsandbytes

from lrft.hf.callbacks import GroupLRCallback, GuardCallback, ScheduleFreeCallback  # noqa: E402
from lrft.hf.pair import attach, optimizers, trainer_steps  # noqa: E402
from lrft.hf.range_test import find_lr  # noqa: E402

__all__ = ["attach", "optimizers", "trainer_steps", "GroupLRCallback", "GuardCallback",
           "ScheduleFreeCallback", "find_lr"]
