"""Schedule registry: every schedule is a multiplier of each param group's own base LR.

A schedule is one function of the optimizer step, `multiplier(step)`, applied with
`torch.optim.lr_scheduler.LambdaLR`, so group i trains at `base_lr_i * multiplier(step)` and
layer-decay and head/backbone ratios hold at every step. `lr_multiplier` evaluates the very same
function, for plots and tests. Each schedule is one `ScheduleSpec` in `SCHEDULES`, which names the
keys it reads: the recipe accepts exactly those keys for it (tests/test_registries.py), and the
range of every key is checked in one place, `check_options`.

Convention (the same as the HF Trainer; the shapes equal transformers' at its defaults):
- The scheduler is stepped once per OPTIMIZER step, right after `optimizer.step()` (not per
  micro-batch under gradient accumulation). Optimizer step k (0-based) uses `multiplier(k)`.
  Under Accelerate, either do not `prepare` the scheduler or remember that a prepared one steps
  `num_processes` times per call; the training loop decides that (lrft/train.py).
- Warmup covers steps 0 .. warmup_steps - 1 and applies to every step-driven schedule, `constant`
  included (HF's `constant` silently ignores warmup; here it equals `constant_with_warmup`). A
  linear warmup rises from `warmup_start_factor`; a constant warmup holds it. With the default
  start factor 0.0 step 0 runs at LR 0 (as in HF): the first step moves no weight; set e.g.
  warmup_start_factor=1e-3 to avoid that. Step `warmup_steps` is the peak, exactly 1.0; with no
  warmup, step 0 runs at the full LR. `warmup_ratio` is rounded up (`resolve_warmup_steps`).
- Decaying schedules (cosine, linear, polynomial, cosine_with_restarts, warmup_stable_decay) reach
  `min_lr_ratio` exactly at step `num_training_steps`, one past the last optimizer step, and hold
  it past the end (HF's cosine would rise again). constant, inverse_sqrt, step and exponential
  have no end and keep going.
- reduce_lr_on_plateau is not a function of the step: it is torch's `ReduceLROnPlateau`, stepped
  by the loop with the eval loss after each evaluation. It takes no warmup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

from lrft.config import suggest

if TYPE_CHECKING:
    import torch

WARMUP_KEYS = ("warmup_steps", "warmup_ratio", "warmup_start_factor", "warmup_type")
WARMUP_TYPES = ("linear", "constant")
# Every schedule option and its default (the recipe's `schedule` section has the same defaults).
DEFAULTS: dict[str, Any] = {
    "warmup_steps": None, "warmup_ratio": None, "warmup_start_factor": 0.0,
    "warmup_type": "linear", "min_lr_ratio": 0.0, "num_cycles": 1, "power": 1.0,
    "decay_ratio": 0.1, "step_size": None, "gamma": 0.1, "patience": 2,
}


def _progress(step: int, warmup: int, total: int) -> float:
    """Share of the post-warmup span done at `step`, 0 at the peak, 1 at `total`."""
    return min(1.0, (step - warmup) / max(1, total - warmup))


def _floor(value: float, o: dict) -> float:
    return o["min_lr_ratio"] + (1.0 - o["min_lr_ratio"]) * value


def _cosine(step, warmup, total, o):
    return _floor(0.5 * (1.0 + math.cos(math.pi * _progress(step, warmup, total))), o)


def _polynomial(step, warmup, total, o):
    return _floor((1.0 - _progress(step, warmup, total)) ** o["power"], o)


def _linear(step, warmup, total, o):
    return _floor(1.0 - _progress(step, warmup, total), o)


def _constant(step, warmup, total, o):
    return 1.0


def _cosine_with_restarts(step, warmup, total, o):
    # num_cycles hard restarts: each cycle a half cosine from 1 down to min_lr_ratio.
    progress = _progress(step, warmup, total)
    if progress >= 1.0:
        return o["min_lr_ratio"]
    return _floor(0.5 * (1.0 + math.cos(math.pi * ((o["num_cycles"] * progress) % 1.0))), o)


def _inverse_sqrt(step, warmup, total, o):
    # 1 / sqrt(step / timescale), shifted to be 1.0 at the end of warmup (HF's timescale).
    timescale = warmup or 10_000
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


def _wsd_decay_steps(total: int, o: dict) -> int:
    return math.ceil(round(o["decay_ratio"] * total, 9))


def _warmup_stable_decay(step, warmup, total, o):
    # Stable at the peak, then a half cosine to min_lr_ratio over the last decay_ratio of steps.
    decay = _wsd_decay_steps(total, o)
    start = total - decay
    if step < start:
        return 1.0
    return _floor(0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - start) / max(1, decay)))), o)


def _step_decay(step, warmup, total, o):
    return o["gamma"] ** ((step - warmup) // o["step_size"])  # torch's StepLR after warmup


def _exponential(step, warmup, total, o):
    return o["gamma"] ** (step - warmup)  # torch's ExponentialLR after warmup


@dataclass(frozen=True)
class ScheduleSpec:
    """One schedule: the keys it reads (besides warmup) and its post-warmup multiplier.

    Attributes:
        name: the recipe's `lr_scheduler_type`.
        reads: schedule options it reads, besides the warmup keys.
        decay: (step, warmup_steps, num_training_steps, options) -> multiplier, for steps
            at or after warmup; None for a schedule driven by a metric.
        ends: reaches `min_lr_ratio` at `num_training_steps` and holds it.
        warmup: takes a warmup (the warmup keys).
    """

    name: str
    reads: tuple[str, ...]
    decay: Callable[[int, int, int, dict], float] | None
    ends: bool = False
    warmup: bool = True

    @property
    def keys(self) -> tuple[str, ...]:
        """Every option the schedule reads, warmup keys included."""
        return (WARMUP_KEYS if self.warmup else ()) + self.reads

    @property
    def constant(self) -> bool:
        """Holds the LR at its peak after warmup (constant, constant_with_warmup)."""
        return self.decay is _constant


SCHEDULES: dict[str, ScheduleSpec] = {s.name: s for s in (
    ScheduleSpec("cosine", ("min_lr_ratio",), _cosine, ends=True),
    ScheduleSpec("linear", ("min_lr_ratio",), _linear, ends=True),
    ScheduleSpec("constant", (), _constant),
    ScheduleSpec("constant_with_warmup", (), _constant),
    ScheduleSpec("cosine_with_restarts", ("num_cycles", "min_lr_ratio"), _cosine_with_restarts,
                 ends=True),
    ScheduleSpec("polynomial", ("power", "min_lr_ratio"), _polynomial, ends=True),
    ScheduleSpec("inverse_sqrt", (), _inverse_sqrt),
    ScheduleSpec("warmup_stable_decay", ("decay_ratio", "min_lr_ratio"), _warmup_stable_decay,
                 ends=True),
    ScheduleSpec("step", ("step_size", "gamma"), _step_decay),
    ScheduleSpec("exponential", ("gamma",), _exponential),
    ScheduleSpec("reduce_lr_on_plateau", ("gamma", "patience"), None, warmup=False),
)}
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULES)
METRIC_SCHEDULERS: tuple[str, ...] = tuple(n for n, s in SCHEDULES.items() if s.decay is None)

# The range of every option: (is the value fine, the rule as the message says it).
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "warmup_ratio": (lambda v: v is None or 0 <= v <= 1, "must be in [0, 1] (typical: 0.06-0.1)"),
    "warmup_steps": (lambda v: v is None or v >= 0, "must be >= 0"),
    "warmup_start_factor": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "warmup_type": (lambda v: v in WARMUP_TYPES, f"must be one of {', '.join(WARMUP_TYPES)}"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "must be in [0, 1] (e.g. 0.1)"),
    "num_cycles": (lambda v: int(v) == v >= 1, "must be a whole number >= 1"),
    "power": (lambda v: v > 0, "must be > 0"),
    "decay_ratio": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "step_size": (lambda v: v is None or v >= 1, "must be >= 1 (optimizer steps between decays)"),
    "gamma": (lambda v: 0 < v < 1, "must be in (0, 1) (e.g. 0.1)"),
    "patience": (lambda v: v >= 0, "must be >= 0 (evaluations)"),
}


def unknown_schedule(name: str) -> str:
    return f"unknown schedule {name!r}; {suggest(name, SCHEDULER_NAMES, 'choose from')}"


def check_options(name: str, options: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """Every problem with a schedule's options, building nothing: [(keys, message)].

    Out-of-range values are problems whichever schedule is chosen; `step` needs `step_size`;
    warmup_steps and warmup_ratio exclude each other; a metric-driven schedule takes no warmup.
    Whether a key is *read* by the schedule is the caller's rule (the recipe rejects keys a
    schedule does not read; `build_scheduler` ignores them).
    """
    if name not in SCHEDULES:
        return [(("lr_scheduler_type",), unknown_schedule(name))]
    o = {**DEFAULTS, **options}
    problems = []
    for key, (ok, rule) in _RULES.items():
        try:
            fine = ok(o[key])
        except (TypeError, ValueError):
            fine = False
        if not fine:
            problems.append(((key,), f"{o[key]!r} {rule}"))
    if o["warmup_steps"] is not None and o["warmup_ratio"] is not None:
        problems.append((("warmup_ratio", "warmup_steps"), f"both set ({o['warmup_ratio']}, "
                                                          f"{o['warmup_steps']}); keep one"))
    if name == "step" and o["step_size"] is None:
        problems.append((("step_size",), "needed by lr_scheduler_type: step (optimizer steps "
                                         "between decays)"))
    if not SCHEDULES[name].warmup and (o["warmup_steps"] or o["warmup_ratio"]):
        problems.append((("warmup_ratio" if o["warmup_ratio"] else "warmup_steps",),
                         f"{name} takes no warmup: leave warmup_steps and warmup_ratio unset"))
    return problems


def _raise_on(problems: list[tuple[tuple[str, ...], str]]) -> None:
    if problems:
        raise ValueError("; ".join(f"{' and '.join(keys)}: {message}"
                                   for keys, message in problems))


def resolve_warmup_steps(num_training_steps: int, warmup_steps: int | None = None,
                         warmup_ratio: float | None = None) -> int:
    """Turn `warmup_steps` or `warmup_ratio` (at most one) into a step count: the one rounding.

    Args:
        num_training_steps: Total optimizer steps.
        warmup_steps: Warmup length in optimizer steps.
        warmup_ratio: Warmup as a fraction of `num_training_steps`, rounded up (math.ceil,
            after rounding away float noise: 0.1 x 30 is 3, not 4).

    Returns:
        The number of warmup steps (0 when neither is given).

    Raises:
        ValueError: both are given, a value is out of range, or the warmup is longer than
            training.
    """
    if warmup_steps is not None and warmup_ratio is not None:
        raise ValueError(f"give warmup_steps ({warmup_steps}) or warmup_ratio ({warmup_ratio}), "
                         f"not both")
    if warmup_ratio is not None:
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
        warmup_steps = math.ceil(round(warmup_ratio * num_training_steps, 9))
    warmup_steps = warmup_steps or 0
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps > num_training_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) is longer than num_training_steps "
                         f"({num_training_steps})")
    return warmup_steps


def _multiplier(step: int, *, spec_name: str, warmup: int, total: int, options: dict) -> float:
    o = options
    if step < warmup:
        if o["warmup_type"] == "constant":
            return o["warmup_start_factor"]
        return o["warmup_start_factor"] + (1.0 - o["warmup_start_factor"]) * step / warmup
    spec = SCHEDULES[spec_name]
    if spec.ends and step >= total:
        return o["min_lr_ratio"]
    return float(spec.decay(step, warmup, total, o))


def lr_lambda(name: str, num_training_steps: int, warmup_steps: int | None = None,
              warmup_ratio: float | None = None, **options) -> Callable[[int], float]:
    """The multiplier function of a schedule: step -> factor of each group's base LR.

    Arguments are those of `build_scheduler`. The result is a picklable `functools.partial`.

    Raises:
        ValueError: see `build_scheduler`; also for reduce_lr_on_plateau, which has no
            multiplier function.
    """
    options = {**DEFAULTS, **options, "warmup_steps": warmup_steps, "warmup_ratio": warmup_ratio}
    if name in METRIC_SCHEDULERS:
        raise ValueError(f"schedule {name!r} follows a metric, not the step: it has no "
                         f"multiplier function")
    _raise_on(check_options(name, options))
    if num_training_steps < 1:
        raise ValueError(f"num_training_steps must be >= 1, got {num_training_steps}")
    warmup = resolve_warmup_steps(num_training_steps, warmup_steps, warmup_ratio)
    if name == "warmup_stable_decay" and warmup + _wsd_decay_steps(num_training_steps, options) \
            > num_training_steps:
        raise ValueError(f"warmup_stable_decay: warmup_steps ({warmup}) + decay steps "
                         f"({_wsd_decay_steps(num_training_steps, options)} = ceil(decay_ratio "
                         f"{options['decay_ratio']} x {num_training_steps})) exceed "
                         f"num_training_steps ({num_training_steps})")
    return partial(_multiplier, spec_name=name, warmup=warmup, total=num_training_steps,
                   options=options)


def lr_multiplier(name: str, step: int, num_training_steps: int, **kwargs) -> float:
    """The factor of each group's base LR that optimizer step `step` (0-based) uses.

    Args:
        name: One of `SCHEDULER_NAMES` except reduce_lr_on_plateau.
        step: 0-based optimizer step.
        num_training_steps: Total optimizer steps.
        **kwargs: The other arguments of `build_scheduler` (warmup_steps, min_lr_ratio, ...).

    Returns:
        The multiplier, the same number `build_scheduler`'s LambdaLR applies at that step.
    """
    return lr_lambda(name, num_training_steps, **kwargs)(step)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, num_training_steps: int,
                    warmup_steps: int | None = None, warmup_ratio: float | None = None,
                    **options):
    """Build the named LR schedule over an optimizer's groups (see the module docstring).

    An option the chosen schedule does not read is ignored here (the recipe reports it); an
    out-of-range value is an error whichever schedule is chosen.

    Args:
        optimizer: Its groups' current `lr` are the base LRs the multiplier scales.
        name: One of `SCHEDULER_NAMES`.
        num_training_steps: Total optimizer steps (not micro-batches).
        warmup_steps: Warmup length in optimizer steps; exclusive with `warmup_ratio`.
        warmup_ratio: Warmup as a fraction of `num_training_steps`, rounded up.
        **options: warmup_start_factor, warmup_type ("linear" or "constant"), min_lr_ratio
            (the floor reached at the end, a fraction of the base LR), num_cycles
            (cosine_with_restarts), power (polynomial), decay_ratio (share of the steps in
            warmup_stable_decay's final decay), step_size and gamma (step: gamma every
            step_size steps; exponential: gamma every step; reduce_lr_on_plateau: the factor
            per plateau), patience (evaluations without improvement before a plateau decay).

    Returns:
        A LambdaLR to step once after every `optimizer.step()`, or for reduce_lr_on_plateau a
        ReduceLROnPlateau to step as `scheduler.step(eval_loss)` after each evaluation.

    Raises:
        ValueError: unknown name (with a did-you-mean) or option, both warmup_steps and
            warmup_ratio, warmup longer than training, an out-of-range value, step without
            step_size, or warmup with reduce_lr_on_plateau.
    """
    from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown schedule option(s) {', '.join(unknown)}; options: "
                         f"{', '.join(DEFAULTS)}")
    if name not in METRIC_SCHEDULERS:
        return LambdaLR(optimizer, lr_lambda(name, num_training_steps, warmup_steps,
                                             warmup_ratio, **options))
    o = {**DEFAULTS, **options, "warmup_steps": warmup_steps, "warmup_ratio": warmup_ratio}
    _raise_on(check_options(name, o))
    # Scales every group's LR by the same factor, so the group ratios hold here too.
    return ReduceLROnPlateau(optimizer, mode="min", factor=o["gamma"], patience=o["patience"])


def recipe_options(schedule_config) -> dict[str, Any]:
    """The options of a recipe's `schedule` section as `build_scheduler` keyword arguments."""
    return {key: getattr(schedule_config, key) for key in DEFAULTS}
