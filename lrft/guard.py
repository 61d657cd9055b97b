"""Divergence guard: catch a run that is blowing up, skip the step or roll back and lower the LR.

Checked once per optimizer step, after gradients are synchronised and clipped but before the
optimizer steps, on values every process shares (the process-mean loss and the global grad
norm), so all processes take the same decision.

Detects: a non-finite loss or gradient norm; a loss spike (loss > `loss_spike_factor` x the
mean of the last `window` accepted losses); a gradient-norm spike (likewise with
`grad_spike_factor`). Then, by `guard.action`:

- skip: drop this step's gradients; the weights do not move.
- rollback: restore the last good snapshot (trainable weights and optimizer state, kept on the
  CPU every `snapshot_steps` steps) and multiply every group's LR by `lr_backoff`. The usual
  advice for a diverging run is to lower the LR 5-10x; a backoff of 0.5 compounds on repeat
  (0.5, 0.25, 0.125) and keeps the layer-decay and head ratios because it scales each group's
  base LR. After `max_rollbacks` rollbacks the run stops with status "diverged".

The schedule and the data keep going forward after a rollback: only weights, optimizer state and
the LR scale go back, so the run ends on its planned step.

Cost and limits under a launcher: every process keeps its own snapshot of what it holds, taken
synchronously (under DDP a full copy per process, in host RAM; under FSDP2 each process's shards);
a paged optimizer's state is no longer paged once a rollback restores it. Under DeepSpeed the
guard is refused (lrft.launch.launcher_problems): the optimizer steps inside backward. Under fp16
the loss scaler's own overflows are not divergence (`loss_scaling`), and a skipped or rolled-back
step still closes the scaler's step (lrft.train).
"""

from __future__ import annotations

import math
from collections import deque

from lrft import snapshot

# A spike needs this many accepted steps of history first: the first steps of fine-tuning are
# noisy and a mean over two or three losses is no baseline.
MIN_HISTORY = 5


class DivergenceGuard:
    """Watches loss and grad norm per optimizer step; see the module docstring.

    Args:
        cfg: the recipe's `guard` section (`lrft.recipe.GuardConfig`).
        model: the (possibly wrapped) model whose trainable parameters are snapshotted.
        optimizer: the optimizer (its state is snapshotted; its groups' LRs are scaled).
        scheduler: the LR scheduler; its `base_lrs` are scaled so the schedule keeps the backoff.
        state: an object with `lr_scale` and `rollbacks` attributes, updated in place (the
            training loop's RunState, saved in checkpoints).
        loss_scaling: fp16 with a loss scaler: a non-finite gradient norm with a finite loss is
            the scaler's own overflow (it skips the step and lowers its scale, as it does a few
            times early in every fp16 run), not divergence.
    """

    def __init__(self, cfg, model, optimizer, scheduler, state, loss_scaling: bool = False):
        self.cfg, self.model, self.optimizer, self.scheduler, self.state = (
            cfg, model, optimizer, scheduler, state)
        self.loss_scaling = loss_scaling
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.grad_norms: deque[float] = deque(maxlen=cfg.window)
        self.events: list[dict] = []
        self.snapshot: snapshot.Snapshot | None = None
        self.snapshot_step = 0
        self._take_snapshot(step=0)

    # ---- decisions -------------------------------------------------------------------------

    def problem(self, loss: float, grad_norm: float) -> tuple[str, str] | None:
        """(event, detail) when this step looks divergent, else None."""
        if not math.isfinite(loss):
            return "nan_loss", f"loss is {loss}"
        if not math.isfinite(grad_norm):
            return "nan_grad", f"gradient norm is {grad_norm}"
        if len(self.losses) >= MIN_HISTORY:
            mean = sum(self.losses) / len(self.losses)
            if loss > self.cfg.loss_spike_factor * mean:
                return "loss_spike", (f"loss {loss:.4g} > {self.cfg.loss_spike_factor:g} x running "
                                      f"mean {mean:.4g}")
        if len(self.grad_norms) >= MIN_HISTORY:
            mean = sum(self.grad_norms) / len(self.grad_norms)
            if grad_norm > self.cfg.grad_spike_factor * mean:
                return "grad_spike", (f"grad norm {grad_norm:.4g} > {self.cfg.grad_spike_factor:g}"
                                      f" x running mean {mean:.4g}")
        return None

    def check(self, step: int, loss: float, grad_norm: float) -> str:
        """Decide what to do with optimizer step `step` (1-based): ok, skip, rollback or stop."""
        if self.loss_scaling and math.isfinite(loss) and not math.isfinite(grad_norm):
            return "ok"  # the loss scaler's overflow: it skips this step itself
        found = self.problem(loss, grad_norm)
        if found is None:
            if (step - 1) % self.cfg.snapshot_steps == 0 and step > 1:
                self._take_snapshot(step - 1)  # the weights now are those after step-1: good
            self.losses.append(loss)
            self.grad_norms.append(grad_norm)
            return "ok"
        event, detail = found
        self._event(step, event, detail)
        if self.cfg.action == "skip":
            self._event(step, "skip", "gradients dropped, weights unchanged")
            return "skip"
        if self.state.rollbacks >= self.cfg.max_rollbacks:
            self._event(step, "stop", f"{self.state.rollbacks} rollbacks already (max_rollbacks); "
                        f"stopping: lower optim.learning_rate 5-10x or add warmup")
            return "stop"
        return "rollback"

    # ---- actions ---------------------------------------------------------------------------

    def rollback(self) -> None:
        """Restore the last good snapshot and multiply every group's LR by `lr_backoff`."""
        snapshot.restore(self.model, self.optimizer, self.snapshot, lrs=False)
        self.scale_lr(self.cfg.lr_backoff)
        self.state.rollbacks += 1
        self.losses.clear()
        self.grad_norms.clear()
        self._event(None, "rollback",
                    f"restored step {self.snapshot_step}; LR x {self.cfg.lr_backoff:g} "
                    f"(now x {self.state.lr_scale:.3g} of the recipe's)")

    def scale_lr(self, factor: float) -> None:
        """Multiply every group's current and base LR by `factor` (ratios between groups kept)."""
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        if hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        self.state.lr_scale *= factor

    def drain_events(self) -> list[dict]:
        """Events since the last call, for metrics.jsonl and the console."""
        events, self.events = self.events, []
        return events

    # ---- internals -------------------------------------------------------------------------

    def _take_snapshot(self, step: int) -> None:
        self.snapshot = snapshot.take(self.model, self.optimizer)
        self.snapshot_step = step

    def _event(self, step: int | None, event: str, detail: str) -> None:
        step = step if step is not None else (self.events[-1]["step"] if self.events else None)
        self.events.append({"step": step, "event": event, "detail": detail,
                            "lr_scale": self.state.lr_scale})
