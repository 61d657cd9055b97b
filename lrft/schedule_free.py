"""Schedule-free AdamW (Defazio et al. 2024, the `schedulefree` package): building it, and which
weights are in the model: the ones it trains (y) or the ones to evaluate and save (x).

Schedule-free AdamW averages its weights instead of decaying the LR: it trains at an
interpolation y of its average x and its base sequence z, and x is the model to evaluate and keep.
It swaps x into the parameters in place (`eval_mode`) and back (`train_mode`); forgetting either
evaluates or saves the wrong weights. lrft's loop, checkpoints, final save, range test, guard and
HF Trainer integration switch with these functions, which are no-ops for every other optimizer.
"""

from __future__ import annotations

import contextlib


def build(groups: list[dict], kwargs: dict, model=None):
    """`AdamWScheduleFree` over the groups, in training mode as every lrft optimizer is built.

    Raises:
        ImportError: schedulefree is not installed (naming the install).
    """
    try:
        from schedulefree import AdamWScheduleFree
    except ImportError as err:
        raise ImportError("optimizer 'schedule_free_adamw' needs schedulefree: "
                          "pip install schedulefree") from err
    optimizer = AdamWScheduleFree(groups, **kwargs)
    optimizer.train()
    return optimizer



def _schedule_free_part(optimizer):
    """The schedule-free optimizer (the schedulefree package's, whose groups carry
    `train_mode`), also inside Accelerate's wrapper; None for any other optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    groups = getattr(inner, "param_groups", None) or [{}]
    return inner if "train_mode" in groups[0] and callable(getattr(inner, "eval", None)) else None


def train_mode(optimizer) -> None:
    """Put the weights a schedule-free optimizer trains (its y) in the model; a no-op for every
    other optimizer. `build_optimizer` returns them so; call it after loading a checkpoint,
    which `eval_weights` saved with the averaged weights in place."""
    part = _schedule_free_part(optimizer)
    if part is not None:
        part.train()


def eval_mode(optimizer) -> None:
    """Put the weights a schedule-free optimizer evaluates (its average x) in the model, until
    `train_mode`; a no-op for every other optimizer. `eval_weights` does both around a block."""
    part = _schedule_free_part(optimizer)
    if part is not None:
        part.eval()


@contextlib.contextmanager
def eval_weights(optimizer):
    """Inside, the model holds the weights to evaluate and save; after, those it trains on.

    Schedule-free AdamW trains at an interpolation y of its average x and its base sequence z,
    and x is the model to evaluate and keep (Defazio et al. 2024). It swaps x into the
    parameters in place, and back on exit. Every other optimizer trains and evaluates the same
    weights: a no-op. Everything saved inside (a checkpoint's model and optimizer state, the
    final model) is x, with the optimizer marked to be in eval mode.
    """
    eval_mode(optimizer)
    try:
        yield
    finally:
        train_mode(optimizer)
