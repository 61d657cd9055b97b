"""Trainer callbacks: every param group's LR in the Trainer's log, and lrft's divergence guard.

How they hook into `Trainer._inner_training_loop` (transformers 5.x), per optimizer step:

    micro-batches: on_step_begin, forward + backward (a forward hook records the loss)
    clip (max_grad_norm) -> on_pre_optimizer_step -> optimizer.step() -> on_optimizer_step
    -> lr_scheduler.step() -> zero_grad -> global_step += 1 -> on_step_end -> log (on_log)

`GroupLRCallback` records every group's LR in `on_pre_optimizer_step` (the LR the step uses, the
one the Trainer logs as `learning_rate` for its first group) and adds `lr/<group>` keys to each
training log in `on_log`, in the dict the trackers read and in `state.log_history` (the Trainer
appends a copy to the history before calling `on_log`, so both are updated). Trackers' callbacks
come before user callbacks in the Trainer's list: `attach` puts these first; with
`Trainer(callbacks=[...])` only the history (trainer_state.json) gets the keys.

`GuardCallback` runs `lrft.guard.DivergenceGuard` without subclassing the Trainer. The guard
decides in `on_pre_optimizer_step` and acts in `on_optimizer_step`, after the step it could not
prevent: skip puts back the weights and optimizer state as they were before the step (a CPU copy
taken only for a flagged step), rollback restores the guard's last good snapshot and multiplies
every group's LR by `lr_backoff` (ratios kept), stop does a skip and ends training. Undoing the
step works for every optimizer, where dropping the gradients would not (lion-pytorch's foreach
Lion fails on a step without gradients). The schedule keeps going, as in lrft's own loop.

What the guard sees differs from lrft's loop in one way: the Trainer clips before any callback
runs, so the gradient norm is the clipped one. A non-finite norm still shows; a gradient spike
shows only while the norm stays under `max_grad_norm` (above it, clipping already bounds the
step). The loss is each training forward's `loss` output, combined over the step's micro-batches
the way the Trainer scales them; a model whose forward returns no loss (the Trainer computes it:
`compute_loss_func`, label smoothing) leaves the guard watching the gradient norm only.

The guard's LR scale and rollback count live in the scheduler's `lrft` dict, saved in every
checkpoint, so a resumed run keeps its backoff and its remaining rollbacks.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from lrft import snapshot
from lrft.recipe import GuardConfig, Recipe, validate
from lrft.runlog import group_lrs

logger = logging.get_logger("lrft.hf")

__all__ = ["GroupLRCallback", "GuardCallback", "ScheduleFreeCallback", "add_to_log", "check_plan",
           "checked_guard_config"]


def add_to_log(state, logs: dict, values: dict, history_only: dict | None = None) -> None:
    """Add `values` to a log being reported (trackers) and to its entry in `state.log_history`."""
    logs.update(values)
    last = state.log_history[-1] if state.log_history else None
    if last is not None and last.get("step") == state.global_step:
        last.update(values)
        last.update(history_only or {})


def check_plan(lr_scheduler, state) -> None:
    """Refuse to train when the schedule was sized for another number of steps than the run's.

    Raises:
        ValueError: `lr_scheduler.lrft["num_training_steps"]` differs from `state.max_steps`.
    """
    plan = getattr(lr_scheduler, "lrft", None)
    if plan and plan.get("num_training_steps") not in (None, state.max_steps):
        raise ValueError(
            f"lrft: the schedule was sized for {plan['num_training_steps']} optimizer steps but "
            f"this Trainer runs {state.max_steps}; build the pair from the same TrainingArguments "
            f"and train dataset (lrft.hf.optimizers(args, model, train_dataset, ...)), or use "
            f"lrft.hf.attach(trainer, ...), which reads them from the trainer")


class GroupLRCallback(TrainerCallback):
    """Logs the LR of every param group as `lr/<group>` with each training log.

    Also checks, when training starts, that an lrft schedule was sized for the run's steps.
    """

    def __init__(self):
        self.lrs: dict[str, float] = {}

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        check_plan(lr_scheduler, state)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs = group_lrs(optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "learning_rate" in logs and self.lrs:
            add_to_log(state, logs, {f"lr/{name}": lr for name, lr in self.lrs.items()})


class ScheduleFreeCallback(TrainerCallback):
    """Makes the Trainer save a schedule-free optimizer's averaged weights, not its training ones.

    The Trainer switches a schedule-free optimizer to eval mode for each evaluation and back to
    train mode in every training step, but saves without switching: a checkpoint that no
    evaluation just preceded, and `trainer.save_model()` after `train()`, would hold the
    training weights y instead of the average x (Defazio et al. 2024). Placed after the Trainer's
    flow callback (`attach` appends it), this puts x in place when the step or epoch is about to
    be saved and when training ends; the next training step switches back (the Trainer's own
    `optimizer.train()`), and a resumed run does the same with the checkpoint's x.
    """

    def _eval(self, control, optimizer, now: bool = False) -> None:
        from lrft.schedule_free import eval_mode

        if now or control.should_save:
            eval_mode(optimizer)  # until the Trainer's next optimizer.train()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self._eval(control, optimizer)

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        self._eval(control, optimizer)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self._eval(control, optimizer, now=True)


def checked_guard_config(config: GuardConfig | None = None, **settings) -> GuardConfig:
    """A guard configuration, enabled, checked by the recipe's own rules.

    Raises:
        TypeError: an unknown setting.
        RecipeError: a value out of range.
    """
    from dataclasses import replace

    from lrft.errors import RecipeError

    config = replace(config or GuardConfig(), **settings, enabled=True)
    problems = [p for p in validate(Recipe(guard=config)) if p.startswith("guard.")]
    if problems:
        raise RecipeError(problems, "guard settings")
    return config


class GuardCallback(TrainerCallback):
    """lrft's divergence guard inside a Trainer run (see the module docstring).

    Args:
        config: the guard settings (a recipe's `guard` section); None for the defaults.
        **settings: `GuardConfig` fields overriding `config` (action, loss_spike_factor, ...).

    Attributes:
        events: every event of the run: dicts with step, event (nan_loss, nan_grad,
            loss_spike, grad_spike, skip, rollback, stop), detail and lr_scale.
    """

    def __init__(self, config: GuardConfig | None = None, **settings):
        self.config = checked_guard_config(config, **settings)
        self.events: list[dict] = []
        self._pending: list[dict] = []
        self._losses: list[torch.Tensor] = []
        self._summed = False  # the model normalised its loss over the whole step's items
        self._guard = self._hook = self._undo = self._state = self._scheduler = None
        self._verdict = "ok"
        self._warned_no_loss = False

    # ---- set-up ----------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       **kwargs):
        from lrft.guard import DivergenceGuard

        if getattr(lr_scheduler, "lrft", None) is None:
            lr_scheduler.lrft = {}
        saved = lr_scheduler.lrft  # restored from the checkpoint on resume
        self._state = SimpleNamespace(lr_scale=saved.get("lr_scale", 1.0),
                                      rollbacks=saved.get("rollbacks", 0))
        self._scheduler = lr_scheduler
        self._guard = DivergenceGuard(self.config, model, optimizer, lr_scheduler, self._state,
                                      loss_scaling=bool(args.fp16))
        self._hook = model.register_forward_hook(self._record_loss, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ---- watching --------------------------------------------------------------------------

    def _record_loss(self, module, args, kwargs, output):
        if not module.training or not torch.is_grad_enabled():
            return  # evaluation, or the range test's no-grad passes
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is not None:
            self._losses.append(loss.detach().float())
            self._summed = kwargs.get("num_items_in_batch") is not None

    def on_step_begin(self, args, state, control, **kwargs):
        self._losses = []

    def _step_loss(self, args) -> float:
        """The step's loss as the Trainer logs it, the same on every process."""
        if not self._losses:
            if not self._warned_no_loss:
                logger.warning("lrft GuardCallback: the model's forward returns no loss (the "
                               "Trainer computes it); watching the gradient norm only")
                self._warned_no_loss = True
            return 0.0  # finite and constant: never a loss spike
        losses = torch.stack(self._losses)
        loss = losses.sum() if self._summed else losses.mean()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss)  # the model normalised by the global item count
            if not (self._summed and args.average_tokens_across_devices):
                loss /= torch.distributed.get_world_size()
        return float(loss)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self._verdict = self._guard.check(state.global_step + 1, self._step_loss(args), grad_norm)
        if self._verdict in ("skip", "stop"):
            self._undo = snapshot.take(model, optimizer)

    # ---- acting ----------------------------------------------------------------------------

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        verdict, self._verdict = self._verdict, "ok"
        if verdict in ("skip", "stop"):
            snapshot.restore(model, optimizer, self._undo, lrs=False)
            self._undo = None
        elif verdict == "rollback":
            self._guard.rollback()
            self._scheduler.lrft.update(lr_scale=self._state.lr_scale,
                                        rollbacks=self._state.rollbacks)
        if verdict == "stop":
            control.should_training_stop = True
        for event in self._guard.drain_events():
            logger.warning(f"lrft guard: step {event['step']}: {event['event']}: "
                           f"{event['detail']}")
            self.events.append(event)
            self._pending.append(event)

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending:
            control.should_log = True  # the events go into the log at their own step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None or "loss" not in logs:
            return
        values = {f"guard/{e['event']}": 1.0 for e in self._pending}
        values.update({"guard/lr_scale": self._state.lr_scale,
                       "guard/rollbacks": float(self._state.rollbacks)})
        detail = "; ".join(f"step {e['step']}: {e['event']}: {e['detail']}"
                           for e in self._pending)
        add_to_log(state, logs, values, history_only={"guard/detail": detail})
        self._pending = []


