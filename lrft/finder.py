"""LR range test (Smith 2017) that keeps the ratios between param groups.

The test trains for ``num_steps`` optimizer steps while ramping ONE multiplier ``m`` from
``start_mult`` to ``end_mult`` and setting every group's LR to *its own* base LR x ``m``. Layer-wise
decay and head/backbone ratios therefore survive, and the curve describes the recipe as it will
train. (Lightning's ``lr_find`` and torch-lr-finder sweep one ``min_lr``..``max_lr`` range for the
whole optimizer, which throws those ratios away.) The curve is reported on the scale of the
recipe's learning rate: ``lrs = base_lr x m``, so a suggestion is a value for
``optim.learning_rate`` and the groups follow it as the recipe says.

The model (its trainable parameters and buffers: frozen weights never move), the optimizer (state,
``lr`` and ``initial_lr`` of each group), the fp16 loss scaler and the torch RNG are restored
afterwards, so training can start right after. Under Accelerate the loss is averaged
across processes, so every rank sees the same curve and takes the same early-stop decision, and
only the main process writes files.
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import send_to_device

from lrft import plots, snapshot
from lrft.doctor import DIVERGED_LOSS_FACTOR, smooth_loss
from lrft.schedule_free import train_mode

# The default sweep multiplies each group's base LR by 1e-3..1e3: six decades around the recipe's
# LR. A recipe at 5e-5 is swept from 5e-8 (nothing moves) to 5e-2 (any transformer diverges), so
# the curve has both the flat start and the blow-up Smith's test needs; the same holds for LoRA
# (1e-4 -> 1e-7..1e-1).
START_MULT = 1e-3
END_MULT = 1e3
# 100 steps, the default of fastai, Lightning and torch-lr-finder: ~17 points per decade.
NUM_STEPS = 100
# EMA decay of the smoothed loss. fastai uses 0.98, whose ~50-step window is half of a 100-step
# sweep and reports the blow-up late; 0.9 (~10 steps) keeps the lag under a tenth of the sweep.
SMOOTH_BETA = 0.9
# Early stop when the smoothed loss exceeds 4x its minimum (fastai, Lightning's
# early_stop_threshold); the doctor uses the same factor for a diverged run.
DIVERGE_FACTOR = DIVERGED_LOSS_FACTOR
# The steepest-slope search skips the first 10% of points, where the EMA has seen few losses
# (torch-lr-finder's skip_start=10 of its 100 steps).
STEEPEST_SKIP_FRACTION = 0.1
# fastai's "lr_min": the LR at the smoothed minimum divided by 10, a step back from the edge.
MIN_DIVISOR = 10.0
MODES = ("exp", "linear")


@dataclass
class RangeTestResult:
    """The curve of one range test.

    Attributes:
        multipliers: the multiplier m of each step taken.
        lrs: the reported LR of each step, ``base_lr x m``.
        losses: the loss of each step (averaged across processes), before its update.
        smoothed: the debiased EMA of ``losses``.
        base_lr: the reference LR the curve is reported on (the recipe's learning rate).
        group_base_lrs: each group's base LR (group name -> LR); its LR at a step is base x m.
        suggestion_steepest: LR of the steepest descent of the smoothed loss vs log LR, before the
            minimum; None when the curve is too short to tell. The aggressive pick: on short,
            noisy fine-tuning sweeps the loss often plunges just before it blows up, and the
            steepest point then sits at the minimum itself.
        suggestion_min_div10: LR at the smoothed minimum / 10, the conservative pick (fastai's
            ``lr_min``); below the tested range when the minimum is at the very start (widen
            ``start_mult`` then).
        stopped_early: whether the sweep stopped on divergence (non-finite or smoothed loss above
            ``diverge_factor`` x its minimum).
        mode: "exp" (geometric multipliers) or "linear".
    """

    multipliers: list[float]
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    base_lr: float
    group_base_lrs: dict[str, float]
    suggestion_steepest: float | None
    suggestion_min_div10: float | None
    stopped_early: bool
    mode: str = "exp"


def lr_range_test(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    *,
    loss_fn: Callable | None = None,
    base_lr: float | None = None,
    start_mult: float = START_MULT,
    end_mult: float = END_MULT,
    num_steps: int = NUM_STEPS,
    mode: str = "exp",
    smooth: float = SMOOTH_BETA,
    diverge_factor: float = DIVERGE_FACTOR,
    max_grad_norm: float | None = None,
    accelerator=None,
    output_dir: str | Path | None = None,
) -> RangeTestResult:
    """Run an LR range test that scales every param group by one multiplier.

    Args:
        model: the model; trained during the test, restored afterwards.
        optimizer: built over the recipe's param groups. Each group's base LR is its
            ``initial_lr`` if a scheduler set one, else its ``lr``.
        loader: an iterable of batches, re-iterated if shorter than ``num_steps``.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default ``model(**batch).loss``.
        base_lr: the LR the curve is reported on (the recipe's ``optim.learning_rate``);
            default the largest group base LR.
        start_mult: the first multiplier.
        end_mult: the last multiplier.
        num_steps: optimizer steps in the sweep (one batch each).
        mode: "exp" (geometric steps, the usual choice) or "linear".
        smooth: EMA decay of the smoothed loss, in [0, 1).
        diverge_factor: stop when the smoothed loss exceeds this x its minimum (or is non-finite).
        max_grad_norm: clip gradients as the training loop does; None for no clipping.
        accelerator: an ``accelerate.Accelerator`` when model, optimizer and loader were prepared.
        output_dir: if given, the main process writes ``lr_range_test.csv`` and ``.png`` there.

    Returns:
        The :class:`RangeTestResult`.

    Raises:
        ValueError: on a bad range, mode, smoothing or factor, or an empty loader.
        RecipeError: the accelerator runs DeepSpeed (the sweep cannot restore its state there).
    """
    _check_args(start_mult, end_mult, num_steps, mode, smooth, diverge_factor)
    _refuse_deepspeed(accelerator)
    groups = optimizer.param_groups
    bases = [g.get("initial_lr", g["lr"]) for g in groups]
    names = [g.get("name", f"group{i}") for i, g in enumerate(groups)]
    base_lr = base_lr if base_lr is not None else max(bases)
    mults = _multipliers(start_mult, end_mult, num_steps, mode)
    scaler = getattr(accelerator, "scaler", None)
    saved = snapshot.take(model, optimizer)
    saved_scaler = snapshot.cpu_copy(scaler.state_dict()) if scaler is not None else None
    train_mode(optimizer)  # schedule-free: sweep its training weights; the restore undoes it
    try:
        with torch.random.fork_rng():  # the sweep's dropout and shuffling leave no trace
            step = functools.partial(_train_step, model, optimizer, loss_fn=loss_fn,
                                     accelerator=accelerator, max_grad_norm=max_grad_norm)
            losses, stopped = _sweep(model, optimizer, _cycle(loader), mults, bases, step,
                                     smooth, diverge_factor)
    finally:
        snapshot.restore(model, optimizer, saved, lrs=True)
        if scaler is not None:  # fp16 under Accelerate: the sweep moved the loss scale
            scaler.load_state_dict(saved_scaler)
    result = _result(mults[:len(losses)], losses, base_lr, dict(zip(names, bases)), smooth,
                     stopped, mode)
    if output_dir is not None and (accelerator is None or accelerator.is_main_process):
        plots.plot_range_test(result, Path(output_dir) / "lr_range_test.png", current_lr=base_lr)
        save_range_test_csv(result, Path(output_dir) / "lr_range_test.csv")
    return result


def _refuse_deepspeed(accelerator) -> None:
    """The sweep steps the optimizer itself and restores a snapshot afterwards; under DeepSpeed
    the step happens inside backward and the snapshot cannot be loaded back.

    Raises:
        RecipeError: the accelerator runs DeepSpeed.
    """
    if accelerator is not None and accelerator.distributed_type == "DEEPSPEED":
        from lrft.errors import RecipeError

        raise RecipeError(["distributed_type: DEEPSPEED (the launcher config): the LR range test "
                           "cannot run under DeepSpeed; run `lrft find-lr` on one GPU or with DDP "
                           "(accelerate_configs/multi_gpu_8xa100.yaml), then train under "
                           "DeepSpeed with the LR it suggests"])


def _check_args(start_mult, end_mult, num_steps, mode, smooth, diverge_factor) -> None:
    problems = []
    if not 0 < start_mult < end_mult:
        problems.append(f"need 0 < start_mult < end_mult, got {start_mult}, {end_mult}")
    if num_steps < 2:
        problems.append(f"num_steps must be >= 2, got {num_steps}")
    if mode not in MODES:
        problems.append(f"mode must be one of {MODES}, got {mode!r}")
    if not 0 <= smooth < 1:
        problems.append(f"smooth must be in [0, 1), got {smooth}")
    if not diverge_factor > 1:
        problems.append(f"diverge_factor must be > 1, got {diverge_factor}")
    if problems:
        raise ValueError("lr_range_test: " + "; ".join(problems))


def _multipliers(start: float, end: float, num_steps: int, mode: str) -> np.ndarray:
    """num_steps multipliers from start to end, geometric ("exp") or evenly spaced ("linear")."""
    if mode == "exp":
        return np.geomspace(start, end, num_steps)
    return np.linspace(start, end, num_steps)


def _cycle(loader: Iterable) -> Iterator:
    """Yield batches forever, re-iterating the loader (a fresh shuffle each pass)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("lr_range_test: the loader yielded no batches")


def _sweep(model, optimizer, batches, mults, bases, step, smooth, diverge_factor):
    """Set every group's LR to base x m and take one step per multiplier.

    Returns:
        (losses, stopped_early).
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)  # no stale gradients in the first step
    losses: list[float] = []
    for m, batch in zip(mults, batches):
        for group, base in zip(optimizer.param_groups, bases):
            group["lr"] = base * float(m)
        losses.append(step(batch))
        smoothed = smooth_loss(losses, smooth)
        if not math.isfinite(losses[-1]) or smoothed[-1] > diverge_factor * smoothed.min():
            return losses, True
    return losses, False


def _train_step(model, optimizer, batch, loss_fn, accelerator, max_grad_norm) -> float:
    """One optimizer step; returns the loss averaged across processes (same on every rank)."""
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    batch = send_to_device(batch, device)
    loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
    value = loss.detach().float()
    if accelerator is not None:
        value = accelerator.reduce(value, reduction="mean")
    if torch.isfinite(value):  # decided on the shared mean, so no rank skips a collective alone
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        if max_grad_norm is not None:
            _clip(model, max_grad_norm, accelerator)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(value)


def _clip(model, max_norm: float, accelerator) -> None:
    if accelerator is not None:
        accelerator.clip_grad_norm_(model.parameters(), max_norm)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


# ---------------------------------------------------------------------------------------------
# Saving and restoring the state
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# Suggestions and output
# ---------------------------------------------------------------------------------------------

def _result(mults, losses, base_lr, group_base_lrs, smooth, stopped, mode) -> RangeTestResult:
    lrs = base_lr * np.asarray(mults, dtype=float)
    smoothed = smooth_loss(losses, smooth)
    steepest, min_div10 = _suggestions(lrs, smoothed)
    return RangeTestResult(
        multipliers=[float(m) for m in mults], lrs=lrs.tolist(), losses=[float(x) for x in losses],
        smoothed=smoothed.tolist(), base_lr=float(base_lr), group_base_lrs=group_base_lrs,
        suggestion_steepest=steepest, suggestion_min_div10=min_div10, stopped_early=stopped,
        mode=mode,
    )


def _suggestions(lrs: np.ndarray, smoothed: np.ndarray) -> tuple[float | None, float | None]:
    """(steepest, min / 10) over the finite part of the curve.

    The steepest point is the most negative d(smoothed)/d(log10 lr), from numpy.gradient over the
    points before the minimum, after skipping the first STEEPEST_SKIP_FRACTION of them.
    """
    finite = np.isfinite(smoothed)
    n = len(smoothed) if finite.all() else int(np.argmin(finite))  # up to the first non-finite
    if n == 0:
        return None, None
    i_min = int(np.argmin(smoothed[:n]))
    skip = int(len(smoothed) * STEEPEST_SKIP_FRACTION)
    lo = skip if i_min - skip >= 2 else 0
    steepest = None
    if i_min - lo >= 2:  # np.gradient needs points on both sides to mean anything
        slope = np.gradient(smoothed[lo:i_min + 1], np.log10(lrs[lo:i_min + 1]))
        steepest = float(lrs[lo + int(np.argmin(slope))])
    if i_min == 0:  # the loss never fell below where it started: nothing to suggest
        return None, None
    return steepest, float(lrs[i_min] / MIN_DIVISOR)


def save_range_test_csv(result: RangeTestResult, path: str | Path) -> Path:
    """Write the curve as CSV: step, multiplier, lr, loss, smoothed, then one LR column per group.

    Args:
        result: the range test result.
        path: the CSV file to write.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = result.group_base_lrs
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "multiplier", "lr", "loss", "smoothed"]
                        + [f"lr_{name}" for name in groups])
        rows = zip(result.multipliers, result.lrs, result.losses, result.smoothed)
        for step, (m, lr, loss, smoothed) in enumerate(rows, 1):
            writer.writerow([step, m, lr, loss, smoothed] + [base * m for base in groups.values()])
    return path


def find_lr_for_recipe(recipe_path: str | Path, overrides: list[str] | None = None, *,
                       num_steps: int = NUM_STEPS, start_mult: float | None = None,
                       end_mult: float | None = None, apply: bool = False) -> RangeTestResult:
    """`lrft find-lr`: the range test on the recipe's own model, data, groups and optimizer.

    Writes `lr_range_test.csv` and `.png` to `<train.output_dir>/find_lr/` and prints both
    suggestions next to the recipe's LR. With `apply`, writes a new recipe beside the original
    (`<name>.lr-<value>.yaml`, extending it through `base:`) with the conservative suggestion.
    """
    from accelerate.utils import set_seed

    from lrft.recipe import load_recipe
    from lrft.setup import build_run, make_accelerator

    recipe = load_recipe(recipe_path, overrides)
    accelerator, _ = make_accelerator(recipe)
    _refuse_deepspeed(accelerator)  # before the model loads
    set_seed(recipe.train.seed)
    run = build_run(recipe, accelerator)
    out = Path(recipe.train.output_dir) / "find_lr"
    result = lr_range_test(
        run.model, run.optimizer, run.train_loader, base_lr=run.lr,
        start_mult=START_MULT if start_mult is None else start_mult,
        end_mult=END_MULT if end_mult is None else end_mult, num_steps=num_steps,
        max_grad_norm=recipe.train.max_grad_norm, accelerator=accelerator, output_dir=out)
    if accelerator.is_main_process:
        print(format_suggestions(result, run.lr, out))
        if apply:
            pick = result.suggestion_min_div10 or result.suggestion_steepest
            if pick is None:
                print("--apply: no suggestion to write (the curve never fell); recipe unchanged")
            else:
                print(f"wrote {write_recipe_with_lr(Path(recipe_path), overrides or [], pick)}")
    return result


def format_suggestions(result: RangeTestResult, current_lr: float, out: Path) -> str:
    """The range test's verdict for the console."""
    def show(x):
        return "none (the loss never fell)" if x is None else f"{x:.2e}"

    stop = "stopped early: the loss diverged" if result.stopped_early else "ran the full sweep"
    return "\n".join([
        f"LR range test: {len(result.losses)} steps, {result.lrs[0]:.1e} .. {result.lrs[-1]:.1e} "
        f"({stop}); every group kept its ratio to the base LR",
        f"  recipe's optim.learning_rate  {current_lr:.2e}",
        f"  suggestion (min loss / 10)    {show(result.suggestion_min_div10)}   (--apply writes this one)",
        f"  suggestion (steepest descent) {show(result.suggestion_steepest)}",
        f"  curve: {out / 'lr_range_test.png'}, {out / 'lr_range_test.csv'}"])


def write_recipe_with_lr(path: Path, overrides: list[str], lr: float) -> Path:
    """A new recipe beside `path` that extends it (`base:`) with the overrides and `lr`."""
    import yaml

    data: dict = {"base": path.name}
    for item in [*overrides, f"optim.learning_rate={lr:.2e}"]:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        data.setdefault(section, {})[name] = yaml.safe_load(value)
    target = path.with_name(f"{path.stem}.lr-{lr:.0e}.yaml")
    n = 2
    while target.exists():  # never over an existing file, the original least of all
        target = path.with_name(f"{path.stem}.lr-{lr:.0e}-{n}.yaml")
        n += 1
    header = (f"# {path.name} with the LR suggested by `lrft find-lr` (min loss / 10).\n"
              f"# Run: accelerate launch lrft/train.py {target}\n")
    target.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return target
