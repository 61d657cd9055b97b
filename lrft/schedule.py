"""Scheduler registry: every schedule is a multiplier of each param group's own base LR.

A schedule is one function of the optimizer step, `multiplier(step)`, applied with
`torch.optim.lr_scheduler.LambdaLR`, so group i trains at `base_lr_i * multiplier(step)` and
layer-decay and head/backbone ratios hold at every step. `lr_multiplier` evaluates the very same
function, for plots and tests.

Convention (the same as the HF Trainer):
- The scheduler is stepped once per OPTIMIZER step, right after `optimizer.step()` (not per
  micro-batch under gradient accumulation). Optimizer step k (0-based) therefore uses
  `multiplier(k)`. Under Accelerate, either do not `prepare` the scheduler or remember that a
  prepared one steps `num_processes` times per call; the training loop decides that.
- Warmup covers steps 0 .. warmup_steps - 1 and applies to every step-driven schedule, `constant`
  included (HF's `constant` silently ignores warmup; here it equals `constant_with_warmup`). A
  linear warmup starts at `warmup_start_factor` and rises linearly; a constant warmup holds
  `warmup_start_factor`. The default start factor is 0.0, as in HF: step 0 runs at LR 0, so the
  first optimizer step does not move the weights (Adam's moments still see its gradient); set
  e.g. warmup_start_factor=1e-3 to avoid that. Step `warmup_steps` is the peak, multiplier
  exactly 1.0; with no warmup, step 0 runs at the full LR.
- Decaying schedules (cosine, linear, polynomial, warmup_stable_decay) reach `min_lr_ratio`
  exactly at step `num_training_steps`, one past the last optimizer step (which is just above
  it), and hold it past the end, where HF's cosine would rise again; cosine_with_restarts holds 0
  there. constant, inverse_sqrt, step and exponential have no end and keep going.
- reduce_lr_on_plateau is not a function of the step: it is torch's `ReduceLROnPlateau` and the
  loop must call `scheduler.step(metric)` once per evaluation (lower is better), not per
  optimizer step. It takes no warmup.

The shapes come from `transformers.optimization` (its module-level multiplier functions, bound
with `functools.partial`); only the warmup and the step/exponential decays are written here.
"""

from __future__ import annotations

import difflib
import math
from functools import partial
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

SCHEDULER_NAMES: tuple[str, ...] = (
    "cosine",
    "linear",
    "constant",
    "constant_with_warmup",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "warmup_stable_decay",
    "step",
    "exponential",
    "reduce_lr_on_plateau",
)
# Schedules stepped with a validation metric instead of once per optimizer step.
METRIC_SCHEDULERS: tuple[str, ...] = ("reduce_lr_on_plateau",)
_WARMUP_TYPES = ("linear", "constant")


def _ceil_fraction(ratio: float, total: int) -> int:
    # Round away float noise first: 0.1 * 30 is 3.0000000000000004, which must give 3, not 4.
    return math.ceil(round(ratio * total, 9))


def resolve_warmup_steps(
    num_training_steps: int, warmup_steps: int | None = None, warmup_ratio: float | None = None
) -> int:
    """Turn `warmup_steps` or `warmup_ratio` (at most one) into a step count.

    Args:
        num_training_steps: Total optimizer steps.
        warmup_steps: Warmup length in optimizer steps.
        warmup_ratio: Warmup as a fraction of `num_training_steps`, rounded up (math.ceil).

    Returns:
        The number of warmup steps (0 when neither is given).

    Raises:
        ValueError: both are given, a value is negative, a ratio is above 1, or the warmup is
            longer than training.
    """
    if warmup_steps is not None and warmup_ratio is not None:
        raise ValueError(
            f"give warmup_steps ({warmup_steps}) or warmup_ratio ({warmup_ratio}), not both"
        )
    if warmup_ratio is not None:
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
        warmup_steps = _ceil_fraction(warmup_ratio, num_training_steps)
    warmup_steps = warmup_steps or 0
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps > num_training_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) is longer than num_training_steps ({num_training_steps})"
        )
    return warmup_steps


def _check_values(name: str, num_training_steps: int, opts: dict) -> None:
    """Raise ValueError for an unknown name or an out-of-range value (used or not)."""
    if name not in SCHEDULER_NAMES:
        close = difflib.get_close_matches(name, SCHEDULER_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown schedule {name!r}{hint}; valid names: {', '.join(SCHEDULER_NAMES)}")
    rules = [
        (num_training_steps >= 1, f"num_training_steps must be >= 1, got {num_training_steps}"),
        (opts["warmup_type"] in _WARMUP_TYPES,
         f"warmup_type must be one of {', '.join(_WARMUP_TYPES)}, got {opts['warmup_type']!r}"),
        (0.0 <= opts["warmup_start_factor"] <= 1.0,
         f"warmup_start_factor must be in [0, 1], got {opts['warmup_start_factor']}"),
        (0.0 <= opts["min_lr_ratio"] <= 1.0, f"min_lr_ratio must be in [0, 1], got {opts['min_lr_ratio']}"),
        (int(opts["num_cycles"]) == opts["num_cycles"] >= 1,
         f"num_cycles must be a whole number >= 1, got {opts['num_cycles']}"),
        (opts["power"] > 0, f"power must be > 0, got {opts['power']}"),
        (0.0 <= opts["decay_ratio"] <= 1.0, f"decay_ratio must be in [0, 1], got {opts['decay_ratio']}"),
        (opts["step_size"] is None or opts["step_size"] >= 1,
         f"step_size must be >= 1, got {opts['step_size']}"),
        (name != "step" or opts["step_size"] is not None, "schedule 'step' needs step_size"),
        (opts["gamma"] > 0, f"gamma must be > 0, got {opts['gamma']}"),
        (opts["patience"] >= 0, f"patience must be >= 0, got {opts['patience']}"),
    ]
    for ok, message in rules:
        if not ok:
            raise ValueError(message)


def _warmup(step: int, *, warmup_steps: int, start_factor: float, warmup_type: str) -> float:
    if warmup_type == "constant":
        return start_factor
    return start_factor + (1.0 - start_factor) * step / warmup_steps


def _step_decay(step: int, *, warmup_steps: int, step_size: int, gamma: float) -> float:
    # torch's StepLR, counted from the end of warmup: gamma once every step_size steps.
    return gamma ** ((step - warmup_steps) // step_size)


def _exponential_decay(step: int, *, warmup_steps: int, gamma: float) -> float:
    # torch's ExponentialLR, counted from the end of warmup: gamma every step.
    return gamma ** (step - warmup_steps)


def _decay(name: str, warmup: int, total: int, opts: dict) -> Callable[[int], float]:
    """The post-warmup multiplier for steps >= warmup, mostly transformers' own functions."""
    from transformers import optimization as hf

    common = {"num_warmup_steps": warmup, "num_training_steps": total}
    if name == "cosine":
        return partial(hf._get_cosine_schedule_with_warmup_lr_lambda, **common, num_cycles=0.5,
                       min_lr_rate=opts["min_lr_ratio"])
    if name in ("linear", "polynomial"):
        # HF's linear cannot stop above 0; its polynomial with power 1 is the same line and can.
        # lr_init=1.0 makes lr_end a ratio of each group's base LR.
        power = 1.0 if name == "linear" else opts["power"]
        return partial(hf._get_polynomial_decay_schedule_with_warmup_lr_lambda, **common,
                       lr_end=opts["min_lr_ratio"], power=power, lr_init=1.0)
    if name in ("constant", "constant_with_warmup"):
        return hf._get_constant_lambda
    if name == "cosine_with_restarts":
        return partial(hf._get_cosine_with_hard_restarts_schedule_with_warmup_lr_lambda, **common,
                       num_cycles=int(opts["num_cycles"]))
    if name == "inverse_sqrt":
        # Same default timescale as hf.get_inverse_sqrt_schedule.
        return partial(hf._get_inverse_sqrt_schedule_lr_lambda, num_warmup_steps=warmup,
                       timescale=warmup or 10_000)
    if name == "warmup_stable_decay":
        return _wsd(warmup, total, opts)
    if name == "step":
        return partial(_step_decay, warmup_steps=warmup, step_size=opts["step_size"], gamma=opts["gamma"])
    return partial(_exponential_decay, warmup_steps=warmup, gamma=opts["gamma"])


def _wsd(warmup: int, total: int, opts: dict) -> Callable[[int], float]:
    from transformers import optimization as hf

    decay = _ceil_fraction(opts["decay_ratio"], total)
    if warmup + decay > total:
        raise ValueError(
            f"warmup_stable_decay: warmup_steps ({warmup}) + decay steps ({decay} = "
            f"ceil(decay_ratio {opts['decay_ratio']} x {total})) exceed num_training_steps ({total})"
        )
    # HF's defaults for the shape: cosine decay (half a wave) down to min_lr_ratio.
    return partial(hf._get_wsd_scheduler_lambda, num_warmup_steps=warmup,
                   num_stable_steps=total - warmup - decay, num_decay_steps=decay,
                   warmup_type="linear", decay_type="cosine", min_lr_ratio=opts["min_lr_ratio"],
                   num_cycles=0.5)


def _multiplier(step: int, *, warmup_steps: int, warmup: Callable, decay: Callable,
                num_training_steps: int, end: float | None) -> float:
    if step < warmup_steps:
        return warmup(step)
    if end is not None and step >= num_training_steps:
        return end
    return float(decay(step))


def lr_lambda(
    name: str,
    num_training_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    *,
    warmup_start_factor: float = 0.0,
    warmup_type: str = "linear",
    min_lr_ratio: float = 0.0,
    num_cycles: int = 1,
    power: float = 1.0,
    decay_ratio: float = 0.1,
    step_size: int | None = None,
    gamma: float = 0.1,
    patience: int = 2,
) -> Callable[[int], float]:
    """The multiplier function of a schedule: step -> factor of each group's base LR.

    Arguments are those of `build_scheduler`. The result is a picklable `functools.partial`,
    so a `LambdaLR` built on it can be checkpointed.

    Returns:
        A function of the 0-based optimizer step.

    Raises:
        ValueError: see `build_scheduler`; also for reduce_lr_on_plateau, which has no
            multiplier function.
    """
    opts = dict(warmup_start_factor=warmup_start_factor, warmup_type=warmup_type,
                min_lr_ratio=min_lr_ratio, num_cycles=num_cycles, power=power,
                decay_ratio=decay_ratio, step_size=step_size, gamma=gamma, patience=patience)
    _check_values(name, num_training_steps, opts)
    if name in METRIC_SCHEDULERS:
        raise ValueError(f"schedule {name!r} follows a metric, not the step: it has no multiplier function")
    warmup = resolve_warmup_steps(num_training_steps, warmup_steps, warmup_ratio)
    ends = {"cosine": min_lr_ratio, "linear": min_lr_ratio, "polynomial": min_lr_ratio,
            "warmup_stable_decay": min_lr_ratio, "cosine_with_restarts": 0.0}
    return partial(
        _multiplier,
        warmup_steps=warmup,
        warmup=partial(_warmup, warmup_steps=warmup, start_factor=warmup_start_factor,
                       warmup_type=warmup_type),
        decay=_decay(name, warmup, num_training_steps, opts),
        num_training_steps=num_training_steps,
        end=ends.get(name),
    )


def lr_multiplier(name: str, step: int, num_training_steps: int, **kwargs) -> float:
    """The factor of each group's base LR that optimizer step `step` uses.

    Args:
        name: One of `SCHEDULER_NAMES` except reduce_lr_on_plateau.
        step: 0-based optimizer step.
        num_training_steps: Total optimizer steps.
        **kwargs: The other arguments of `build_scheduler` (warmup_steps, min_lr_ratio, ...).

    Returns:
        The multiplier, the same number `build_scheduler`'s LambdaLR applies at that step.

    Raises:
        ValueError: as `lr_lambda`.
    """
    return lr_lambda(name, num_training_steps, **kwargs)(step)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    num_training_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    *,
    warmup_start_factor: float = 0.0,
    warmup_type: str = "linear",
    min_lr_ratio: float = 0.0,
    num_cycles: int = 1,
    power: float = 1.0,
    decay_ratio: float = 0.1,
    step_size: int | None = None,
    gamma: float = 0.1,
    patience: int = 2,
) -> LambdaLR | ReduceLROnPlateau:
    """Build the named LR schedule over an optimizer's groups (see the module docstring).

    A parameter that the chosen schedule does not use is ignored here (the recipe layer
    reports it); an invalid value is an error whichever schedule is chosen.

    Args:
        optimizer: Its groups' current `lr` are the base LRs the multiplier scales.
        name: One of `SCHEDULER_NAMES`.
        num_training_steps: Total optimizer steps (not micro-batches).
        warmup_steps: Warmup length in optimizer steps; exclusive with `warmup_ratio`.
        warmup_ratio: Warmup as a fraction of `num_training_steps`, rounded up.
        warmup_start_factor: Multiplier at step 0 of the warmup, in [0, 1].
        warmup_type: "linear" (rise from the start factor to 1) or "constant" (hold the start
            factor, then jump to 1).
        min_lr_ratio: Floor reached at the end, as a fraction of the base LR, in [0, 1]
            (cosine, linear, polynomial, warmup_stable_decay).
        num_cycles: Hard restarts for cosine_with_restarts, a whole number >= 1.
        power: Exponent of polynomial, > 0.
        decay_ratio: Fraction of all steps spent in warmup_stable_decay's final (cosine) decay.
        step_size: Steps between decays of `step`; required by it.
        gamma: Decay factor of step (per step_size), exponential (per step) and
            reduce_lr_on_plateau (per plateau), > 0.
        patience: Evaluations without improvement before reduce_lr_on_plateau decays.

    Returns:
        A LambdaLR to step once after every `optimizer.step()`, or for reduce_lr_on_plateau a
        ReduceLROnPlateau to step as `scheduler.step(eval_loss)` after each evaluation.

    Raises:
        ValueError: unknown name (with a did-you-mean), both warmup_steps and warmup_ratio,
            warmup longer than training, an out-of-range value, step without step_size, or
            warmup with reduce_lr_on_plateau.
    """
    opts = dict(warmup_start_factor=warmup_start_factor, warmup_type=warmup_type,
                min_lr_ratio=min_lr_ratio, num_cycles=num_cycles, power=power,
                decay_ratio=decay_ratio, step_size=step_size, gamma=gamma, patience=patience)
    if name not in METRIC_SCHEDULERS:
        return LambdaLR(optimizer, lr_lambda(name, num_training_steps, warmup_steps, warmup_ratio, **opts))
    _check_values(name, num_training_steps, opts)
    if resolve_warmup_steps(num_training_steps, warmup_steps, warmup_ratio):
        raise ValueError(f"{name} takes no warmup: leave warmup_steps and warmup_ratio unset or 0")
    # Scales every group's LR by the same factor, so the group ratios hold here too.
    return ReduceLROnPlateau(optimizer, mode="min", factor=gamma, patience=patience)
