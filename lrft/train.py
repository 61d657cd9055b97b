"""The training entry point: `accelerate launch lrft/train.py recipe.yaml [key=value ...]`.

Reads top to bottom in phases:

    recipe -> accelerator, output folder -> data, model (+LoRA), param groups, optimizer
           -> schedule -> resume -> loop (step, guard, log, evaluate, checkpoint) -> save

The same code runs on one CPU (`python -m lrft.train ...`, `lrft train ...`) and on many GPUs
(`accelerate launch --config_file accelerate_configs/multi_gpu_8xa100.yaml -m lrft.train ...`;
`accelerate launch lrft/train.py ...` works as well). Set-up lives in lrft/setup.py (including
how the schedule steps under Accelerate), checkpoints in lrft/checkpoint.py, the run log in
lrft/runlog.py, evaluation in lrft/evaluation.py; this file is the entry point and the loop.
Evaluations, checkpoints and the final model see a schedule-free optimizer's averaged weights
(`lrft.schedule_free.eval_weights`); a resumed run switches back to its training weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `lrft` importable, keep lrft/ off the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import json
import math
import time

import torch

from lrft.checkpoint import (RunState, hold_run_folder, load_checkpoint, prepare_output_dir,
                             save_checkpoint)
from lrft.evaluation import HOLDOUT_SPLIT, evaluate_model
from lrft.models import save_final_model
from lrft.schedule_free import eval_weights, train_mode
from lrft.recipe import Recipe, dump_recipe, load_recipe
from lrft.runlog import LogWindow, MetricsLog, group_lrs, resume_record, start_record
from lrft.setup import Run, Schedule, build_run, build_schedule, make_accelerator, say

__all__ = ["train", "train_loop", "main", "save_final_model", "group_lrs"]


def train(recipe: Recipe | str | Path, overrides: list[str] | None = None) -> dict:
    """Fine-tune a model as the recipe says; return the final results (also in results.json).

    Args:
        recipe: a loaded :class:`Recipe`, or the path of a recipe file.
        overrides: dotted `key=value` overrides, when `recipe` is a path.

    Raises:
        RecipeError, DataError: bad recipe, data or environment, before training.
        CheckpointError: a checkpoint could not be written (the previous one is intact).
    """
    # ---- recipe ---------------------------------------------------------------------------
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    t = recipe.train

    # ---- accelerator; the run folder is held for the life of the run -------------------------
    accelerator, precision_why = make_accelerator(recipe)
    with hold_run_folder(accelerator, Path(t.output_dir)) as lock_note:
        if lock_note:
            say(accelerator, f"lrft: {lock_note}")
        return _train(recipe, accelerator, precision_why)


def _train(recipe: Recipe, accelerator, precision_why: str) -> dict:
    """The phases of `train` once the run folder is held."""
    from accelerate.utils import set_seed

    t = recipe.train
    set_seed(t.seed)
    out = Path(t.output_dir)
    resume_dir = prepare_output_dir(t, accelerator.is_main_process)
    changes = _recipe_changes(out, recipe) if resume_dir is not None else {}
    accelerator.wait_for_everyone()
    log = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process)
    say(accelerator, f"lrft: {recipe.source or 'recipe'} -> {out}  ({accelerator.num_processes} "
                     f"process(es), {accelerator.device}, mixed precision "
                     f"{accelerator.mixed_precision}: {precision_why})")

    # ---- data, model (+LoRA), param groups, optimizer ---------------------------------------
    run = build_run(recipe, accelerator)

    # ---- schedule (sized in optimizer steps; how it steps: lrft/setup.py) -------------------
    schedule = build_schedule(recipe, run.optimizer, len(run.train_loader))

    # ---- resume -----------------------------------------------------------------------------
    state, window = RunState(), LogWindow()
    if resume_dir is not None:
        state, log_state = load_checkpoint(accelerator, resume_dir, schedule.scheduler)
        train_mode(run.optimizer)  # saved with a schedule-free optimizer's averaged weights
        window.load_state_dict(log_state)
        log.truncate(state.step)
        say(accelerator, f"resumed from {resume_dir} at step {state.step}")
        _apply_changes(run, schedule, state, changes, log, resume_dir)
    elif t.resume_from_checkpoint == "latest":
        log.truncate(0)  # killed before its first checkpoint: its records would be repeated
        say(accelerator, "resume_from_checkpoint: latest: no checkpoint yet, starting fresh")

    # ---- guard, trackers, start record ------------------------------------------------------
    guard = None
    if recipe.guard.enabled:
        from lrft.guard import DivergenceGuard

        guard = DivergenceGuard(recipe.guard, run.model, run.optimizer, schedule.scheduler,
                                state=state, loss_scaling=accelerator.scaler is not None)
    if any(r != "none" for r in recipe.log.report_to):
        accelerator.init_trackers(recipe.log.project, config=_flat(recipe.to_dict()),
                                  init_kwargs=_tracker_kwargs(recipe))
    if state.step == 0:
        log.write(start_record(run, schedule))
    if accelerator.is_main_process:
        (out / "recipe.yaml").write_text(dump_recipe(recipe))

    # ---- loop -------------------------------------------------------------------------------
    results = train_loop(run, schedule, state, log, guard=guard, window=window)

    # ---- save -------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    with eval_weights(run.optimizer):  # schedule-free: the averaged weights are the model
        state_dict = _final_state_dict(run)  # gathers FSDP/ZeRO-3 shards: every process
        if accelerator.is_main_process:
            # keep_fp32_wrapper=False: the model as saved, without Accelerate's autocast forward
            plain = accelerator.unwrap_model(run.model, keep_fp32_wrapper=False)
            save_final_model(plain, run.tokenizer, out, recipe, state_dict)
    if accelerator.is_main_process:
        results["output_dir"] = str(out)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
        say(accelerator, f"saved model and results to {out}")
    # Tear the process group down together: a process that left while the main one still saved
    # aborted now and then under FSDP2 on gloo ("terminate called without an active exception").
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _final_state_dict(run: Run) -> dict:
    """The weights to save, gathered from every process's shards (every process calls this).

    Under FSDP2 a LoRA run gathers only its trainable tensors (adapters, head): the adapter is
    saved without the frozen base, and gathering the base too would put the whole model in rank
    0's host memory. A full fine-tune gathers every weight there, in fp32.
    """
    acc = run.accelerator
    if acc.is_fsdp2 and run.recipe.lora.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True,
                                   ignore_frozen_params=True)
        return get_model_state_dict(run.model, options=options)
    return acc.get_state_dict(run.model)


def _recipe_changes(out: Path, recipe: Recipe) -> dict[str, list]:
    """What differs from the recipe the run started with; refuses what must not (lrft/resume.py)."""
    import yaml

    from lrft.resume import check_changes, recipe_changes

    saved_file = out / "recipe.yaml"
    saved = yaml.safe_load(saved_file.read_text()) if saved_file.is_file() else {}
    changes = recipe_changes(saved if isinstance(saved, dict) else {}, recipe.to_dict())
    check_changes(changes, done_steps=0, total_steps=0)
    return changes


def _apply_changes(run: Run, schedule: Schedule, state: RunState, changes: dict, log: MetricsLog,
                   checkpoint: Path) -> None:
    """Apply the safe changes of a resumed recipe for real, and record them."""
    from lrft.resume import apply_lr_change, check_changes, describe

    check_changes(changes, done_steps=state.step, total_steps=schedule.total)
    if "optim.learning_rate" in changes:
        old, new = changes["optim.learning_rate"]
        apply_lr_change(run.optimizer, schedule.scheduler, old, new)
    shown = describe(changes)
    for line in shown:
        say(run.accelerator, line)
    if shown:
        log.write(resume_record(run, schedule, state.step, checkpoint.name, changes))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _tracker_kwargs(recipe: Recipe) -> dict:
    name = recipe.log.run_name or Path(recipe.train.output_dir).name
    return {"wandb": {"name": name}, "mlflow": {"run_name": name}}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def train_loop(run: Run, schedule: Schedule, state: RunState, log: MetricsLog, *,
               guard=None, window: LogWindow | None = None) -> dict:
    """Train until `schedule.total` optimizer steps (or the guard stops the run); evaluate last.

    Each optimizer step: accumulate micro-batches (forward, backward), clip, then apply the
    guard's verdict (step, skip, roll back, stop), step the schedule, and run the hooks: log every
    `logging_steps`, evaluate every `eval_steps`, checkpoint every `save_steps`.

    Returns:
        The results (as in results.json, without `output_dir`).
    """
    from tqdm.auto import tqdm

    acc, t = run.accelerator, run.recipe.train
    window = window or LogWindow()
    window.t0 = time.perf_counter()  # a resumed window's losses count, not its wall time
    bar = tqdm(total=schedule.total, initial=state.step, desc="train", unit="step",
               disable=not acc.is_main_process, dynamic_ncols=True)
    step_loss = torch.zeros((), device=acc.device)  # the micro-batch losses of this step
    t_start, samples, start_step = time.perf_counter(), 0, state.step
    last_eval, status = None, "completed"
    if t.eval_at_start and state.step == 0:
        _evaluate(run, schedule, state, log)
    run.model.train()
    for batch in _batches(run, state):
        # ---- one micro-batch: forward, backward; clip when the step is complete -------------
        with acc.accumulate(run.model):
            loss = run.model(**batch).loss
            acc.backward(loss)
            step_loss += loss.detach().float() / t.gradient_accumulation_steps
            grad_norm = _clip(run) if acc.sync_gradients else None
        samples += batch["input_ids"].shape[0]
        window.count_batch(batch)
        if not acc.sync_gradients:
            continue
        # ---- one optimizer step: the guard's verdict, then the schedule --------------------
        # Loss, grad norm and token count stay on the device; the host reads them at logging
        # steps only (every step only with the guard on): no GPU sync per step.
        mean_loss = acc.reduce(step_loss, "mean")  # a copy: zeroing keeps it
        step_loss.zero_()
        verdict = _apply_step(run, schedule, guard, state, mean_loss, grad_norm, log)
        state.step += 1
        bar.update(1)
        if verdict == "stop":
            status = "diverged"
            break
        window.add_loss(mean_loss)
        # ---- hooks: log, evaluate, checkpoint ---------------------------------------------
        if state.step % t.logging_steps == 0 or state.step == schedule.total:
            _log_train(run, schedule, state, log, window, grad_norm, bar)
        if _due(t.eval_steps, state.step, schedule.total):
            last_eval = _evaluate(run, schedule, state, log)
            schedule.after_eval(_eval_loss(last_eval))  # a plateau schedule steps here
        if _due(t.save_steps, state.step, schedule.total):
            with eval_weights(run.optimizer):  # schedule-free: checkpoint the averaged weights
                save_checkpoint(acc, Path(t.output_dir), state, t.save_total_limit,
                                scheduler=schedule.scheduler, log_state=window.state_dict())
        if state.step >= schedule.total:
            break
    bar.close()
    train_time = time.perf_counter() - t_start
    if status == "completed" or last_eval is None:
        last_eval = _evaluate(run, schedule, state, log)
    log.write({"kind": "end", "step": state.step, "status": status, "time": time.time()})
    return _results(run, state, status, last_eval, train_time, samples, start_step)


def _batches(run: Run, state: RunState):
    """Training micro-batches, epoch after epoch, from where `state` says the run is.

    The epoch's order depends only on (seed, epoch), so a resumed run skips the batches it
    already consumed and continues with the very same ones.
    """
    acc, loader = run.accelerator, run.train_loader
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(state.epoch)
        epoch = acc.skip_first_batches(loader, state.batches_in_epoch) \
            if state.batches_in_epoch else loader
        for batch in epoch:
            state.batches_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batches_in_epoch = 0


def _clip(run: Run):
    max_norm = run.recipe.train.max_grad_norm
    return run.accelerator.clip_grad_norm_(run.model.parameters(),
                                           max_norm if max_norm is not None else math.inf)


def _apply_step(run: Run, schedule: Schedule, guard, state: RunState, loss, grad_norm,
                log: MetricsLog) -> str:
    """The one place a step's fate is decided: ok (step), skip, rollback, or stop the run."""
    acc, optimizer = run.accelerator, run.optimizer
    verdict = "ok"
    if guard is not None:
        gnorm = float(grad_norm) if grad_norm is not None else math.nan
        verdict = guard.check(state.step + 1, loss.item(), gnorm)
    scaler_skipped = False
    if verdict == "ok":
        scale = acc.scaler.get_scale() if acc.scaler is not None else None
        optimizer.step()
        # The fp16 scaler lowers its scale exactly when it skipped the step (an overflow).
        # Accelerate's `step_was_skipped` misses the skips a fused optimizer (torch's AdamW, the
        # default) makes inside its own kernel, so the scale is what tells.
        scaler_skipped = scale is not None and acc.scaler.get_scale() < scale
    else:
        if verdict == "rollback":
            guard.rollback()
        if acc.scaler is not None:  # gradients were unscaled for clipping: close the scaler's step
            acc.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if verdict != "stop":
        schedule.after_step(scaler_skipped)
    for event in guard.drain_events() if guard is not None else ():
        log.write({"kind": "guard", **event})
        say(acc, f"guard: step {event['step']}: {event['event']}: {event['detail']}")
    return verdict


def _due(every: int | None, step: int, total: int) -> bool:
    """Whether an every-N-steps hook runs at `step` (the end has its own evaluation and save)."""
    return bool(every) and step % every == 0 and step < total


def _log_train(run: Run, schedule: Schedule, state: RunState, log: MetricsLog,
               window: LogWindow, grad_norm, bar) -> None:
    acc = run.accelerator
    elapsed = max(time.perf_counter() - window.t0, 1e-9)
    n = acc.num_processes
    loss = window.mean_loss()  # the window's device tensors are read here, once per record
    gnorm = float(grad_norm) if grad_norm is not None else math.nan
    record = {"kind": "train", "step": state.step,
              "epoch": round(state.step / schedule.per_epoch, 4), "loss": loss,
              "lr": group_lrs(run.optimizer), "grad_norm": gnorm,
              "samples_per_s": window.samples * n / elapsed,
              "tokens_per_s": float(window.tokens) * n / elapsed, "time": time.time()}
    log.write(record)
    acc.log({"train/loss": loss, "train/grad_norm": gnorm,
             **{f"lr/{k}": v for k, v in record["lr"].items()}}, step=state.step)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{_base_lr(run, record['lr']):.2e}")
    window.reset()


def _base_lr(run: Run, lrs: dict[str, float]) -> float:
    """`optim.learning_rate` as the schedule scales it now, for the progress bar: the groups'
    own LRs are multiples of it (head_lr_scale, layer_decay); all of them are in metrics.jsonl."""
    group = run.optimizer.param_groups[0]
    if group.get("initial_lr"):  # LambdaLR's start: the multiplier is lr / initial_lr
        return run.recipe.optim.learning_rate * group["lr"] / group["initial_lr"]
    return max(lrs.values())  # a metric-driven schedule: the largest group's LR


def _evaluate(run: Run, schedule: Schedule, state: RunState, log: MetricsLog) -> dict:
    """Evaluate every split; log it; track the best score. Returns the eval record."""
    info = run.task_info
    with eval_weights(run.optimizer):  # schedule-free: evaluate the averaged weights, not y
        splits = evaluate_model(run.accelerator, run.model, run.eval_loaders, info)
    scored = {k: v for k, v in splits.items() if k != HOLDOUT_SPLIT}
    score = info.score(scored) if scored else None
    holdout = info.score({HOLDOUT_SPLIT: splits[HOLDOUT_SPLIT]}) \
        if HOLDOUT_SPLIT in splits else None
    if info.better(score, state.best_score):
        state.best_score, state.best_step = score, state.step
    record = {"kind": "eval", "step": state.step,
              "epoch": round(state.step / schedule.per_epoch, 4), "splits": splits,
              "score": score, "holdout_score": holdout, "score_name": info.score_name,
              "higher_is_better": info.higher_is_better}
    log.write(record)
    run.accelerator.log({f"eval/{split}/{k}": v for split, metrics in splits.items()
                         for k, v in metrics.items()}, step=state.step)
    shown = "; ".join(f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
                      for split, m in splits.items())
    say(run.accelerator, f"\neval @ step {state.step}: {shown}")
    return record


def _eval_loss(record: dict) -> float | None:
    losses = [m["eval_loss"] for k, m in record["splits"].items()
              if k != HOLDOUT_SPLIT and "eval_loss" in m]
    return sum(losses) / len(losses) if losses else None


def _results(run: Run, state: RunState, status: str, last_eval: dict, train_time: float,
             samples: int, start_step: int) -> dict:
    from lrft.optim import optimizer_state_bytes

    acc, info = run.accelerator, run.task_info
    return {"status": status, "step": state.step, "final": last_eval["splits"],
            "score": last_eval["score"], "holdout_score": last_eval["holdout_score"],
            "best_score": state.best_score, "best_step": state.best_step,
            "score_name": info.score_name, "main_metric": info.score_name,
            "higher_is_better": info.higher_is_better, "lr_scale": state.lr_scale,
            "rollbacks": state.rollbacks, "train_time_s": train_time,
            "train_steps_this_run": state.step - start_step,
            "samples_per_s": samples * acc.num_processes / max(train_time, 1e-9),
            "peak_memory_bytes": peak_memory_bytes(acc.device),
            "optimizer_state_bytes": optimizer_state_bytes(
                getattr(run.optimizer, "optimizer", run.optimizer))}


def peak_memory_bytes(device) -> int:
    """Peak memory of this process: CUDA max allocated on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# Save and entry point
# ---------------------------------------------------------------------------------------------

USAGE = "usage: accelerate launch lrft/train.py RECIPE.yaml [section.key=value ...]"


def main(argv: list[str] | None = None) -> int:
    """`python -m lrft.train recipe.yaml [key=value ...]`: train, or print a clean error (exit 2)."""
    from lrft.errors import run_command

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    def body() -> int:
        train(argv[0], argv[1:])
        return 0

    return run_command("train", body)


if __name__ == "__main__":
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
