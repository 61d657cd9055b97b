"""The training entry point: `accelerate launch lrft/train.py recipe.yaml [key=value ...]`.

Reads top to bottom in phases:

    recipe -> accelerator -> data -> model (+LoRA) -> param groups -> optimizer -> schedule
           -> resume -> loop (eval, log, checkpoint, guard) -> save

The same code runs on one CPU (`python lrft/train.py ...`, `lrft train ...`) and on many GPUs
(`accelerate launch --config_file accelerate_configs/multi_gpu_8xa100.yaml lrft/train.py ...`).

How the schedule steps under Accelerate (decided here, tested in tests/test_train_e2e.py):
the scheduler is NOT passed to `accelerator.prepare`. A prepared scheduler steps once per
process for every optimizer step (it assumes a schedule sized for one process), so the LR at
step k would depend on the number of processes. Ours is sized in optimizer steps, stepped once
after each real optimizer step, and saved by `save_checkpoint` as JSON (not registered with
Accelerate, whose custom-object loader unpickles with `weights_only=False`); with the same
global batch the LR at optimizer step k is the same on 1 process and on N.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `lrft` importable, keep lrft/ off the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace

import torch

from lrft.recipe import Recipe, RecipeError, dump_recipe, load_recipe

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "lrft_state.json"  # written last inside a checkpoint: its presence marks it complete
SCHEDULER_FILE = "scheduler.json"  # the LR scheduler's state_dict (plain numbers and lists)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, folder gone); the previous one is intact."""


@dataclass
class RunState:
    """Where the run is: saved in every checkpoint next to Accelerate's state."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_score: float | None = None
    best_step: int | None = None
    lr_scale: float = 1.0  # product of the guard's backoffs so far
    rollbacks: int = 0
    # Losses of steps since the last train record, so a resumed run logs the same averages.
    log_loss_sum: float = 0.0
    log_loss_count: int = 0


# ---------------------------------------------------------------------------------------------
# Output folder and checkpoints
# ---------------------------------------------------------------------------------------------

def _holds_run(out: Path) -> bool:
    return out.is_dir() and any((out / n).exists() for n in ("metrics.jsonl", "results.json")) \
        or bool(list_checkpoints(out))


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first (a checkpoint is complete once renamed)."""
    if not out.is_dir():
        return []
    found = []
    for d in out.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = d.name[len(CHECKPOINT_PREFIX):]
        if d.is_dir() and suffix.isdigit() and (d / STATE_FILE).is_file():
            found.append((int(suffix), d))
    return [d for _, d in sorted(found)]


def prepare_output_dir(recipe: Recipe, is_main: bool) -> Path | None:
    """Check the output folder before any work; return the checkpoint to resume from, if any.

    Raises:
        RecipeError: the folder holds a run and neither resume nor overwrite was asked for,
            the checkpoint to resume from does not exist, or the folder is not writable.
    """
    t = recipe.train
    out = Path(t.output_dir)
    resume = None
    if t.resume_from_checkpoint == "latest":
        ckpts = list_checkpoints(out)
        resume = ckpts[-1] if ckpts else None
        if resume is None and (out / "results.json").exists() and not t.overwrite_output_dir:
            raise RecipeError([f"train.resume_from_checkpoint: {out} holds a finished run with no "
                               f"checkpoint to resume from; starting over would replace it: set "
                               f"train.overwrite_output_dir=true or choose another folder"])
    elif t.resume_from_checkpoint:
        resume = Path(t.resume_from_checkpoint)
        if not (resume / STATE_FILE).is_file():
            raise RecipeError([f"train.resume_from_checkpoint: {resume} is not a complete lrft "
                               f"checkpoint (no {STATE_FILE}); use latest or a {CHECKPOINT_PREFIX}N "
                               f"folder"])
    if resume is None and _holds_run(out) and not t.resume_from_checkpoint:
        if not t.overwrite_output_dir:
            raise RecipeError([f"train.output_dir: {out} already holds a run; resume it with "
                               f"train.resume_from_checkpoint=latest, or replace it with "
                               f"train.overwrite_output_dir=true, or choose another folder"])
        if is_main:
            shutil.rmtree(out)
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".lrft-write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise RecipeError([f"train.output_dir: cannot write to {out} ({e.strerror}); "
                               f"choose a writable folder"]) from e
        for stale in out.glob(f"{CHECKPOINT_PREFIX}*.tmp"):  # left by a crash during a save
            shutil.rmtree(stale, ignore_errors=True)
    return resume


def save_checkpoint(accelerator, out: Path, state: RunState, limit: int | None, *,
                    scheduler) -> Path:
    """Save model, optimizer, scheduler and RNG states atomically, then prune old checkpoints.

    Everything is written to `checkpoint-N.tmp`; the state file goes in last and the folder is
    renamed to `checkpoint-N` only then, so a crash mid-save leaves nothing resume would pick.
    Old checkpoints are deleted only after the new one is complete, each losing its state file
    first, so a crash mid-delete leaves no half-deleted checkpoint that looks complete.

    Raises:
        CheckpointError: the write failed (disk full, ...); the partial folder is removed and
            the previous checkpoint is left as it was.
    """
    final = out / f"{CHECKPOINT_PREFIX}{state.step}"
    tmp = out / f"{final.name}.tmp"
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()))
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(out)
        kept = (f"the previous checkpoint {previous[-1]} is intact" if previous
                else "there is no earlier checkpoint")
        raise CheckpointError(f"cannot save {final.name} in {out} ({e.strerror or e}); {kept}; "
                              f"free disk space (or fix the folder) and resume with "
                              f"train.resume_from_checkpoint=latest") from e
    if accelerator.is_main_process and limit:
        for old in list_checkpoints(out)[:-limit]:
            (old / STATE_FILE).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------

class MetricsLog:
    """Append-only metrics.jsonl, one JSON object per line, flushed per record (main process)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def truncate(self, step: int) -> None:
        """Keep only records up to optimizer step `step` (all of them gone when `step` is 0).

        A resumed run logs again the steps after its checkpoint that the interrupted run had
        logged; dropping those (and a line torn by the kill) leaves one clean curve for
        `lrft diagnose` and `lrft compare`. The start record (no step) stays.
        """
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if step and isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)


def group_lrs(optimizer, key: str = "lr") -> dict[str, float]:
    """The LR of every parameter group by group name: current (`lr`) or base (`initial_lr`)."""
    return {g.get("name", str(i)): g.get(key, g["lr"]) for i, g in enumerate(optimizer.param_groups)}


def _print(accelerator, *args) -> None:
    if accelerator.is_main_process:
        print(*args, flush=True)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_model(accelerator, model, loaders: dict, task_info) -> dict[str, float]:
    """Run every eval split; return metrics prefixed by split when there are several (MNLI)."""
    from lrft.metrics import compute_metrics, perplexity

    model.eval()
    results = {}
    for split, loader in loaders.items():
        loss_sum = torch.zeros((), device=accelerator.device)
        count = torch.zeros((), device=accelerator.device)
        preds, refs = [], []
        for batch in loader:
            out = model(**batch)
            if task_info.causal:
                # Mean token loss weighted by this batch's predicted tokens (labels != -100).
                n = (batch["labels"][:, 1:] != -100).sum()
                loss_sum += out.loss.float() * n
                count += n
                continue
            loss_sum += out.loss.float() * batch["labels"].shape[0]
            count += batch["labels"].shape[0]
            logits = out.logits.squeeze(-1) if task_info.is_regression else out.logits.argmax(-1)
            p, r = accelerator.gather_for_metrics((logits, batch["labels"]))
            preds.append(p.float().cpu())
            refs.append(r.float().cpu())
        loss = (accelerator.reduce(loss_sum, "sum") / accelerator.reduce(count, "sum")).item()
        metrics = {"eval_loss": loss}
        if task_info.causal:
            metrics["perplexity"] = perplexity(loss)
        else:
            p, r = torch.cat(preds).numpy(), torch.cat(refs).numpy()
            if not task_info.is_regression:
                p, r = p.astype(int), r.astype(int)
            metrics.update(compute_metrics(task_info.metric_task, p, r))
        prefix = "" if len(loaders) == 1 else f"{split}_"
        results.update({f"{prefix}{k}": float(v) for k, v in metrics.items()})
    model.train()
    return results


@dataclass
class TaskInfo:
    """What the loop needs to know about the task, whatever the data source."""

    causal: bool
    is_regression: bool = False
    metric_task: str | None = None  # GLUE task name, or None for generic classification
    main_metric: str = "eval_loss"
    higher_is_better: bool = False


def _task_info(recipe: Recipe, data, n_evals: int) -> TaskInfo:
    from lrft.metrics import main_metric

    if recipe.model.task == "causal_lm":
        return TaskInfo(causal=True)
    metric_task = data.task or ("regression" if data.is_regression else "classification")
    name = main_metric(metric_task)
    if n_evals > 1:  # MNLI: pick the matched split's score as the main one
        name = f"{next(iter(data.evals))}_{name}"
    return TaskInfo(causal=False, is_regression=data.is_regression, metric_task=metric_task,
                    main_metric=name, higher_is_better=True)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _make_accelerator(recipe: Recipe):
    """The run's Accelerator, and a sentence saying why it got its mixed precision."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from lrft.precision import resolve_mixed_precision

    t = recipe.train
    report_to = [r for r in recipe.log.report_to if r != "none"]
    precision, why = resolve_mixed_precision(t.mixed_precision, _device())
    _release_precision(precision)
    accelerator = Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=precision,
        log_with=report_to or None,
        project_config=ProjectConfiguration(project_dir=t.output_dir,
                                            logging_dir=str(Path(t.output_dir) / "logs")),
    )
    return accelerator, why


def _device():
    """The training device, known before the Accelerator exists (`mixed_precision: auto` needs it).

    The shared process state is created the way `AcceleratorState` creates it (ACCELERATE_USE_CPU
    forces the CPU), so the Accelerator built next reuses it unchanged.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device


def _release_precision(precision: str | None) -> None:
    """Let this run use `precision` after an earlier run in the same process used another.

    Accelerate keeps one precision per process and raises when a second Accelerator asks for a
    different one; `train()` called twice in a notebook (fp32, then auto) would hit that.
    """
    from accelerate.state import AcceleratorState

    earlier = AcceleratorState._shared_state.get("_mixed_precision")
    wanted = precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # None: the launcher's
    if earlier is not None and earlier != wanted:
        AcceleratorState._reset_state()  # the process group (PartialState) is kept


def _load_data(recipe: Recipe, tokenizer):
    """Datasets for the recipe's task, tokenised (classification) or built (causal LM)."""
    from lrft import data as lrft_data

    if recipe.model.task == "causal_lm":
        return lrft_data.load_causal_data(recipe.data, tokenizer, recipe.train.seed)
    raw = lrft_data.load_classification_data(recipe.data, recipe.train.seed)
    return lrft_data.tokenize_classification(raw, tokenizer, recipe.data.max_length)


def _effective_lr(recipe: Recipe, num_processes: int) -> tuple[float, str | None]:
    """The base LR after `optim.scale_lr`, and the sentence that explains it (or None)."""
    from lrft.presets import scaled_lr

    o, t = recipe.optim, recipe.train
    if o.scale_lr == "none":
        return o.learning_rate, None
    batch = num_processes * t.per_device_train_batch_size * t.gradient_accumulation_steps
    lr = scaled_lr(o.learning_rate, batch, o.reference_batch_size, o.scale_lr)
    note = (f"{num_processes} processes x {t.per_device_train_batch_size} x "
            f"{t.gradient_accumulation_steps} = {batch} vs reference {o.reference_batch_size}: "
            f"lr {o.learning_rate:.3g} -> {lr:.3g} ({o.scale_lr})")
    return lr, note


def _optimizer_kwargs(recipe: Recipe) -> dict:
    from lrft.recipe import BETA_OPTIMIZERS, EPS_OPTIMIZERS

    o = recipe.optim
    kwargs = dict(o.args)
    if o.name in BETA_OPTIMIZERS:
        kwargs["betas"] = (o.adam_beta1, o.adam_beta2)
    if o.name in EPS_OPTIMIZERS:
        kwargs["eps"] = o.adam_epsilon
    return kwargs


def total_training_steps(recipe: Recipe, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps in all, optimizer steps per epoch) for a per-process loader length."""
    t = recipe.train
    per_epoch = max(1, math.ceil(batches_per_epoch / t.gradient_accumulation_steps))
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * per_epoch)
    return total, per_epoch


def _build_scheduler(recipe: Recipe, optimizer, total: int):
    from lrft.schedule import build_scheduler

    s = recipe.schedule
    if s.warmup_steps is not None and s.warmup_steps > total:
        raise RecipeError([f"schedule.warmup_steps: {s.warmup_steps} is more than the run's "
                           f"{total} optimizer steps; lower it or use schedule.warmup_ratio"])
    return build_scheduler(
        optimizer, s.lr_scheduler_type, total, warmup_steps=s.warmup_steps,
        warmup_ratio=s.warmup_ratio, warmup_start_factor=s.warmup_start_factor,
        warmup_type=s.warmup_type, min_lr_ratio=s.min_lr_ratio, num_cycles=s.num_cycles,
        power=s.power, decay_ratio=s.decay_ratio, step_size=s.step_size, gamma=s.gamma,
        patience=s.patience)


@dataclass
class Run:
    """Everything `build_run` sets up: what training (and the LR range test) works on."""

    accelerator: object
    tokenizer: object
    data: object
    task_info: TaskInfo
    model: object  # prepared by Accelerate
    optimizer: object  # prepared by Accelerate
    train_loader: object
    eval_loaders: dict
    lr: float  # the base LR after optim.scale_lr
    lr_note: str | None
    trainable_params: int


def _model_config_for(recipe: Recipe, accelerator):
    """The recipe's model section, with the attention kernel that suits the run's precision."""
    from lrft.precision import attention_for

    attn, why = attention_for(recipe.model.attn_implementation, accelerator.device,
                              accelerator.mixed_precision, recipe.data.max_length)
    if why:
        _print(accelerator, why)
    return replace(recipe.model, attn_implementation=attn)


def build_run(recipe: Recipe, accelerator) -> Run:
    """The phases data -> model (+LoRA) -> param groups -> optimizer, prepared by Accelerate.

    Prints the model's trainable parameters and the param-group table on the main process.
    """
    t = recipe.train
    # ---- data -----------------------------------------------------------------------------
    from lrft.data import make_dataloader
    from lrft.models import count_parameters, load_model, load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    with accelerator.main_process_first():  # the main process tokenises and fills the cache
        data = _load_data(recipe, tokenizer)
    kind = "causal" if recipe.model.task == "causal_lm" else "classification"
    train_loader = make_dataloader(
        data.train, tokenizer, t.per_device_train_batch_size, shuffle=True, seed=t.seed,
        group_by_length=recipe.data.group_by_length, task=kind)
    # Eval batches sorted by length (longest first) when grouping is on: a fixed order whose
    # batches carry little padding; metrics do not depend on the order (bench/fixes.py).
    eval_loaders = {name: make_dataloader(ds, tokenizer, t.per_device_eval_batch_size,
                                          shuffle=False, seed=t.seed,
                                          group_by_length=recipe.data.group_by_length, task=kind)
                    for name, ds in data.evals.items()}
    task_info = _task_info(recipe, data, len(eval_loaders))

    # ---- model (+LoRA) --------------------------------------------------------------------
    model_cfg = _model_config_for(recipe, accelerator)
    model = load_model(model_cfg, recipe.lora,
                       num_labels=getattr(data, "num_labels", None),
                       is_regression=getattr(data, "is_regression", False),
                       label_names=getattr(data, "label_names", None),
                       pad_token_id=tokenizer.pad_token_id)
    trainable, total_params = count_parameters(model)
    _print(accelerator, f"model: {type(model).__name__}, {trainable:,} of {total_params:,} "
                        f"parameters trainable")
    if model_cfg.dtype in ("bfloat16", "float16"):
        _print(accelerator, f"model.dtype {model_cfg.dtype}: trainable weights and optimizer "
                            f"state kept in fp32 (master weights), frozen weights in "
                            f"{model_cfg.dtype}")

    # ---- param groups ---------------------------------------------------------------------
    from lrft.groups import format_group_table, param_groups

    lr, lr_note = _effective_lr(recipe, accelerator.num_processes)
    o = recipe.optim
    groups = param_groups(model, lr, o.weight_decay, layer_decay=o.layer_decay,
                          head_lr_scale=o.head_lr_scale, embedding_lr_scale=o.embedding_lr_scale)
    if lr_note:
        _print(accelerator, f"scale_lr: {lr_note}")
    _print(accelerator, format_group_table(groups))

    # ---- optimizer ------------------------------------------------------------------------
    from lrft.optim import build_optimizer

    optimizer = build_optimizer(groups, o.name, lr=lr, weight_decay=o.weight_decay, model=model,
                                **_optimizer_kwargs(recipe))
    model, optimizer, train_loader, *prepared_evals = accelerator.prepare(
        model, optimizer, train_loader, *eval_loaders.values())
    return Run(accelerator, tokenizer, data, task_info, model, optimizer, train_loader,
               dict(zip(eval_loaders, prepared_evals)), lr, lr_note, trainable)


def train(recipe: Recipe | str | Path, overrides: list[str] | None = None) -> dict:
    """Fine-tune a model as the recipe says; return the final results (also in results.json).

    Args:
        recipe: a loaded :class:`Recipe`, or the path of a recipe file.
        overrides: dotted `key=value` overrides, when `recipe` is a path.

    Raises:
        RecipeError, lrft.data.DataError: bad recipe, data or environment, before training.
    """
    # ---- recipe ---------------------------------------------------------------------------
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    t = recipe.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)

    # ---- accelerator ----------------------------------------------------------------------
    from accelerate.utils import set_seed

    accelerator, precision_why = _make_accelerator(recipe)
    set_seed(t.seed)
    out = Path(t.output_dir)
    resume_dir = prepare_output_dir(recipe, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    log = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process)
    _print(accelerator, f"lrft: {recipe.source or 'recipe'} -> {out}  "
                        f"({accelerator.num_processes} process(es), {accelerator.device}, "
                        f"mixed precision {accelerator.mixed_precision}: {precision_why})")

    # ---- data, model (+LoRA), param groups, optimizer ---------------------------------------
    run = build_run(recipe, accelerator)
    model, optimizer, train_loader = run.model, run.optimizer, run.train_loader

    # ---- schedule (sized in optimizer steps; not prepared: see the module docstring) -------
    total, per_epoch = total_training_steps(recipe, len(train_loader))
    scheduler = _build_scheduler(recipe, optimizer, total)
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)

    # ---- resume ---------------------------------------------------------------------------
    state = RunState()
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        scheduler.load_state_dict(json.loads((resume_dir / SCHEDULER_FILE).read_text()))
        state = RunState(**json.loads((resume_dir / STATE_FILE).read_text()))
        log.truncate(state.step)
        _print(accelerator, f"resumed from {resume_dir} at step {state.step}")
    elif t.resume_from_checkpoint == "latest":
        log.truncate(0)  # killed before its first checkpoint: its records would be repeated
        _print(accelerator, "resume_from_checkpoint: latest: no checkpoint yet, starting fresh")

    guard = None
    if recipe.guard.enabled:
        from lrft.guard import DivergenceGuard

        guard = DivergenceGuard(recipe.guard, model, optimizer, scheduler, state=state)

    if any(r != "none" for r in recipe.log.report_to):
        accelerator.init_trackers(recipe.log.project, config=_flat(recipe.to_dict()),
                                  init_kwargs=_tracker_kwargs(recipe))
    if state.step == 0:
        log.write({"kind": "start", "time": time.time(), "num_training_steps": total,
                   "steps_per_epoch": per_epoch, "groups": group_lrs(optimizer, "initial_lr"),
                   "learning_rate": run.lr, "optimizer": recipe.optim.name,
                   "lr_scheduler_type": recipe.schedule.lr_scheduler_type,
                   "warmup_steps": _warmup_steps(recipe, total),
                   "effective_batch_size": accelerator.num_processes
                   * t.per_device_train_batch_size * t.gradient_accumulation_steps,
                   "num_processes": accelerator.num_processes, "trainable_params": run.trainable_params,
                   "mixed_precision": accelerator.mixed_precision,
                   "lr_note": run.lr_note})
    if accelerator.is_main_process:
        (out / "recipe.yaml").write_text(dump_recipe(recipe))

    # ---- loop -----------------------------------------------------------------------------
    results = _loop(accelerator, recipe, model, optimizer, scheduler, plateau, train_loader,
                    run.eval_loaders, run.task_info, state, total, per_epoch, log, guard)

    # ---- save -----------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP/ZeRO-3 shards: every process
    if accelerator.is_main_process:
        # keep_fp32_wrapper=False: the model as saved, without Accelerate's autocast forward
        plain = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        save_final_model(plain, run.tokenizer, out, recipe, state_dict)
        results["output_dir"] = str(out)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
        _print(accelerator, f"saved model and results to {out}")
    accelerator.end_training()
    return results


def _tracker_kwargs(recipe: Recipe) -> dict:
    name = recipe.log.run_name or Path(recipe.train.output_dir).name
    return {"wandb": {"name": name}, "mlflow": {"run_name": name}}


def _warmup_steps(recipe: Recipe, total: int) -> int:
    s = recipe.schedule
    if s.warmup_steps is not None:
        return s.warmup_steps
    return math.ceil((s.warmup_ratio or 0.0) * total)


def _loop(accelerator, recipe, model, optimizer, scheduler, plateau, train_loader, eval_loaders,
          task_info, state: RunState, total: int, per_epoch: int, log: MetricsLog, guard) -> dict:
    """The training loop: accumulate, clip, step, schedule, log, evaluate, checkpoint."""
    from tqdm.auto import tqdm

    t = recipe.train
    out = Path(t.output_dir)
    accum = t.gradient_accumulation_steps
    max_norm = t.max_grad_norm if t.max_grad_norm is not None else float("inf")
    bar = tqdm(total=total, initial=state.step, desc="train", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    window = {"loss": state.log_loss_sum, "n": state.log_loss_count, "samples": 0, "tokens": 0,
              "t0": time.perf_counter()}
    t_start, samples_seen, start_step = time.perf_counter(), 0, state.step
    step_loss = torch.zeros((), device=accelerator.device)
    last_eval: dict = {}
    status = "completed"
    if t.eval_at_start and state.step == 0:
        _evaluate(accelerator, model, eval_loaders, task_info, state, log, None, per_epoch)
    model.train()
    while state.step < total and status == "completed":
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(state.epoch)
        loader = train_loader
        if state.batches_in_epoch:  # resuming mid-epoch: skip what was already consumed
            loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                outputs = model(**batch)
                loss = outputs.loss
                accelerator.backward(loss)
                step_loss += loss.detach().float() / accum
                window["samples"] += batch["input_ids"].shape[0]
                samples_seen += batch["input_ids"].shape[0]
                window["tokens"] += batch["attention_mask"].sum() \
                    if "attention_mask" in batch else batch["input_ids"].numel()
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            state.batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            # ---- one optimizer step is complete (gradients synchronised and clipped) ----
            # Loss, grad norm and token count stay on the device: the host reads them at logging
            # steps only (every step only for the guard), so a GPU is not synced every step.
            mean_loss = accelerator.reduce(step_loss, "mean")  # a copy: zeroing keeps it
            step_loss.zero_()
            verdict = "ok"
            if guard:
                gnorm = float(grad_norm) if grad_norm is not None else float("nan")
                verdict = guard.check(state.step + 1, mean_loss.item(), gnorm)
            if verdict in ("ok", "skip"):
                if verdict == "ok":
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if not plateau:
                    scheduler.step()
            elif verdict == "rollback":
                optimizer.zero_grad(set_to_none=True)
                guard.rollback()
                if not plateau:
                    scheduler.step()
            state.step += 1
            bar.update(1)
            if guard:
                for event in guard.drain_events():
                    log.write({"kind": "guard", **event})
                    _print(accelerator, f"guard: step {event['step']}: {event['event']}: "
                                        f"{event['detail']}")
                if verdict == "stop":
                    status = "diverged"
                    break
            finite = torch.isfinite(mean_loss)
            window["loss"] += torch.where(finite, mean_loss, 0.0)
            window["n"] += finite.long()
            if state.step % t.logging_steps == 0 or state.step == total:
                _log_train(accelerator, log, state, per_epoch, optimizer, window, grad_norm, bar)
            if t.eval_steps and state.step % t.eval_steps == 0 and state.step < total:
                last_eval = _evaluate(accelerator, model, eval_loaders, task_info, state, log,
                                      scheduler if plateau else None, per_epoch)
            if t.save_steps and state.step % t.save_steps == 0 and state.step < total:
                state.log_loss_sum, state.log_loss_count = float(window["loss"]), int(window["n"])
                save_checkpoint(accelerator, out, state, t.save_total_limit, scheduler=scheduler)
            if state.step >= total:
                break
        else:  # the epoch ran out
            state.epoch += 1
            state.batches_in_epoch = 0
    bar.close()
    train_time = time.perf_counter() - t_start
    if status == "completed" or not last_eval:
        last_eval = _evaluate(accelerator, model, eval_loaders, task_info, state, log,
                              None, per_epoch)
    log.write({"kind": "end", "step": state.step, "status": status, "time": time.time()})
    from lrft.optim import optimizer_state_bytes

    return {"status": status, "step": state.step, "final": last_eval,
            "best_score": state.best_score, "best_step": state.best_step,
            "main_metric": task_info.main_metric, "lr_scale": state.lr_scale,
            "rollbacks": state.rollbacks, "train_time_s": train_time,
            "train_steps_this_run": state.step - start_step,
            "samples_per_s": samples_seen * accelerator.num_processes / max(train_time, 1e-9),
            "peak_memory_bytes": peak_memory_bytes(accelerator.device),
            "optimizer_state_bytes": optimizer_state_bytes(getattr(optimizer, "optimizer",
                                                                   optimizer))}


def peak_memory_bytes(device) -> int:
    """Peak memory of this process: CUDA max allocated on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _log_train(accelerator, log, state, per_epoch, optimizer, window, grad_norm, bar) -> None:
    elapsed = max(time.perf_counter() - window["t0"], 1e-9)
    n = accelerator.num_processes
    count = int(window["n"])  # the window's device tensors are read here, once per record
    loss = float(window["loss"]) / count if count else float("nan")
    gnorm = float(grad_norm) if grad_norm is not None else float("nan")
    record = {"kind": "train", "step": state.step, "epoch": round(state.step / per_epoch, 4),
              "loss": loss, "lr": group_lrs(optimizer), "grad_norm": gnorm,
              "samples_per_s": window["samples"] * n / elapsed,
              "tokens_per_s": float(window["tokens"]) * n / elapsed, "time": time.time()}
    log.write(record)
    accelerator.log({"train/loss": loss, "train/grad_norm": gnorm,
                     **{f"lr/{k}": v for k, v in record["lr"].items()}}, step=state.step)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{max(record['lr'].values()):.2e}")
    window.update(loss=0.0, n=0, samples=0, tokens=0, t0=time.perf_counter())


def _evaluate(accelerator, model, eval_loaders, task_info, state, log, plateau_scheduler,
              per_epoch) -> dict:
    metrics = evaluate_model(accelerator, model, eval_loaders, task_info)
    score = metrics.get(task_info.main_metric)
    if score is not None:
        better = (state.best_score is None or (score > state.best_score if
                  task_info.higher_is_better else score < state.best_score))
        if better:
            state.best_score, state.best_step = score, state.step
    if plateau_scheduler is not None:
        plateau_scheduler.step(metrics["eval_loss"])
    log.write({"kind": "eval", "step": state.step, "epoch": round(state.step / per_epoch, 4),
               "metrics": metrics, "main_metric": task_info.main_metric,
               "higher_is_better": task_info.higher_is_better})
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    _print(accelerator, f"\neval @ step {state.step}: {shown}")
    return metrics


def save_final_model(model, tokenizer, out: Path, recipe: Recipe, state_dict=None) -> None:
    """Save the model (or LoRA adapter with its trained head) and tokenizer as safetensors.

    `state_dict` is the full one from `accelerator.get_state_dict` (under FSDP or ZeRO-3 the
    unwrapped model holds only this process's shards); None saves the model's own.
    """
    config = getattr(model, "config", None)
    if recipe.model.gguf_file and config is not None and hasattr(config, "quantization_config"):
        # GGUF weights are dequantised on load; the saved model is a plain float checkpoint.
        del config.quantization_config
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    """`python lrft/train.py recipe.yaml [key=value ...]`: train, or print a clean error."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: accelerate launch lrft/train.py RECIPE.yaml [section.key=value ...]")
        return 0 if argv else 2
    from lrft.cli import main as cli_main

    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
