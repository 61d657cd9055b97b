"""`lrft find-lr` from a Trainer script: the LR range test over the Trainer's own model and batches.

`find_lr(trainer)` runs `lrft.finder.lr_range_test` on the Trainer's model, with batches from
`trainer.get_train_dataloader()` (its data collator, sampler and column handling) and the loss from
`trainer.compute_loss` (so `compute_loss_func` and label smoothing count), clipping at the
Trainer's `max_grad_norm`. Every param group is scaled by one multiplier, so layer-decay and head
ratios are those the run will train with. The model, optimizer and torch RNG are restored
afterwards: `trainer.train()` then runs exactly as it would have without the test.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lrft.finder import END_MULT, NUM_STEPS, START_MULT, RangeTestResult, format_suggestions


def find_lr(trainer, recipe=None, *, overrides: list[str] | None = None,
            num_steps: int = NUM_STEPS, start_mult: float = START_MULT,
            end_mult: float = END_MULT, output_dir: str | Path | None = None,
            verbose: bool = True, **kwargs) -> RangeTestResult:
    """Run the LR range test inside a Trainer script and print the suggestion.

    Args:
        trainer: a `transformers.Trainer` with a train dataset. If it already has an
            optimizer (from `lrft.hf.attach` or `optimizers=`), the test sweeps that one's groups.
        recipe, overrides, **kwargs: as for `lrft.hf.optimizers`, when the trainer has no
            optimizer yet; with neither, one group at `TrainingArguments.learning_rate`.
        num_steps, start_mult, end_mult: the sweep (`lrft.finder.lr_range_test`): each group's
            base LR times multipliers from start_mult to end_mult.
        output_dir: where `lr_range_test.csv` and `.png` go; default `<output_dir>/find_lr`.
        verbose: print the suggestions (main process).

    Returns:
        The `RangeTestResult`; `suggestion_min_div10` is the value for the recipe's
        `optim.learning_rate` (or `lr=`), the groups following it as the recipe says.

    Raises:
        ValueError: more than one process (the model is not wrapped for data parallelism before
            `train()`), or an optimizer on the trainer and a recipe or keyword arguments as well.
    """
    from lrft.finder import lr_range_test
    from lrft.hf.pair import build_optimizer_for, make_plan

    args = trainer.args
    if args.world_size > 1:
        raise ValueError("lrft.hf.find_lr runs in one process: run the script without "
                         "torchrun / accelerate launch for the range test")
    optimizer = trainer.optimizer
    if optimizer is not None and (recipe is not None or kwargs or overrides):
        raise ValueError("the trainer already has an optimizer: call find_lr(trainer) to sweep "
                         "its groups, or pass a recipe to a trainer without one")
    if optimizer is None:
        plan = make_plan(recipe, args, overrides, kwargs)
        optimizer, base_lr = build_optimizer_for(plan, trainer.model), plan.lr
    else:
        plan_dict = getattr(trainer.lr_scheduler, "lrft", None) or {}
        base_lr = plan_dict.get("learning_rate")  # None: the largest group LR
    out = Path(output_dir) if output_dir is not None else Path(args.output_dir) / "find_lr"
    with torch.random.fork_rng():  # building the loader may draw from the RNG too
        result = lr_range_test(
            trainer.model, optimizer, trainer.get_train_dataloader(),
            loss_fn=lambda model, batch: trainer.compute_loss(model, batch), base_lr=base_lr,
            start_mult=start_mult, end_mult=end_mult, num_steps=num_steps,
            max_grad_norm=args.max_grad_norm or None,
            output_dir=out if args.process_index == 0 else None)
    if verbose and args.process_index == 0:
        print(format_suggestions(result, result.base_lr, out), flush=True)
    return result
