"""The doctor's view of one run: its curves as numpy arrays and the few facts the rules read.

:class:`Curves` is built from a :class:`lrft.runlog.RunLog`, whoever wrote it: lrft's own
metrics.jsonl (`lrft.runlog.read_log`) or a Hugging Face Trainer's `trainer_state.json`
(:mod:`lrft.doctor.trainer`). The rules see only this object, so both give the same verdict on
the same curve.

Every value comes through `lrft.runlog.number`: a missing, non-numeric or non-finite number is
NaN here, never a crash. Steps are int64; records whose step does not fit are left out with a note.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from lrft.doctor.dialect import RECIPE, TRAINING_ARGUMENTS, Dialect
from lrft.doctor.stats import grad_spikes, smooth_loss
from lrft.doctor.trainer import TRAINER_STATE
from lrft.runlog import RunLog, number

_MAX_STEP = 2**62  # larger "steps" are not optimizer steps, and do not fit an int64


@dataclass
class Evals:
    """The evaluations, one entry per evaluated step (ascending).

    `eval_loss` is the mean of the splits' `eval_loss` (NaN where a split lacks it), the loss
    counterpart of the score, which averages the splits too.
    """

    steps: np.ndarray  # int64
    eval_loss: np.ndarray
    eval_loss_name: str  # "eval_loss", or "eval_loss (mean of a, b)" with several splits
    score: np.ndarray
    score_name: str | None
    higher_is_better: bool

    def __len__(self) -> int:
        return len(self.steps)


@dataclass
class GuardEvent:
    step: int | None
    event: str
    detail: str


@dataclass
class Curves:
    """One run's curves; the `f*` arrays hold only the train records with a finite loss."""

    steps: np.ndarray  # int64, ascending
    loss: np.ndarray  # NaN where the logged loss was missing, non-numeric or non-finite
    grad_norm: np.ndarray  # NaN where not logged
    group_lrs: dict[str, np.ndarray]  # group -> LR at each step
    evals: Evals
    guards: list[GuardEvent]
    learning_rate: float | None  # the run's base LR, None when unknown
    lr_scaled: bool  # optim.scale_lr changed the recipe's LR (lrft.train logs a note then)
    lr_inferred: bool  # learning_rate is the peak logged LR, not a setting (a Trainer log)
    has_warmup: bool
    end_status: str | None
    end_step: int | None
    dialect: Dialect = RECIPE  # how this run's settings are spelled in advice
    notes: list[str] = field(default_factory=list)  # about records left out
    fsteps: np.ndarray = field(init=False)
    floss: np.ndarray = field(init=False)
    fsmooth: np.ndarray = field(init=False)
    flr: np.ndarray = field(init=False)  # the largest group LR at each finite record

    def __post_init__(self):
        finite = np.isfinite(self.loss)
        if self.group_lrs:  # the largest group LR per record; fmax skips NaN without a warning
            peak = np.fmax.reduce(np.stack(list(self.group_lrs.values())), axis=0)
        else:
            peak = np.full(len(self.steps), np.nan)
        self.fsteps, self.floss, self.flr = self.steps[finite], self.loss[finite], peak[finite]
        self.fsmooth = smooth_loss(self.floss)

    @cached_property
    def spikes(self) -> list[tuple[int, float, float]]:
        """(step, grad_norm, running median) of each grad-norm spike (`stats.grad_spikes`)."""
        return grad_spikes(self.steps, self.grad_norm)


def curves_from_log(log: RunLog) -> Curves:
    """The doctor's :class:`Curves` of a run log (lrft's, or a Trainer's: told by its file)."""
    notes: list[str] = []
    train = log.train
    steps, keep = _steps(train.step, notes, f"{log.path}: train record")
    start = log.start or {}
    learning_rate = number(start.get("learning_rate"))
    end = log.end or {}
    return Curves(
        steps=steps,
        loss=_column(train.loss, keep),
        grad_norm=_column(train.grad_norm, keep),
        group_lrs={str(g): _column(v, keep) for g, v in train.lr.items()},
        evals=_evals(log.evals, notes, f"{log.path}: eval record"),
        guards=[_guard(g) for g in log.guards],
        learning_rate=learning_rate if 0 < learning_rate < math.inf else None,  # NaN: False
        lr_scaled=bool(start.get("lr_note")),
        lr_inferred=bool(start.get("learning_rate_from")),
        has_warmup=number(start.get("warmup_steps")) > 0,
        end_status=end.get("status") if isinstance(end.get("status"), str) else None,
        end_step=_int(end.get("step")),
        dialect=TRAINING_ARGUMENTS if log.path.name == TRAINER_STATE else RECIPE,
        notes=notes,
    )


def _column(values, keep: np.ndarray | None) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    return x if keep is None else x[keep]


def _steps(values, notes: list[str], what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The steps as int64, and the mask of those kept (None: all) when some do not fit."""
    try:
        steps = np.asarray(values, dtype=np.int64)
        if steps.size == 0 or np.abs(steps).max() < _MAX_STEP:
            return steps, None
    except OverflowError:
        pass
    keep = np.abs(np.asarray(values, dtype=float)) < _MAX_STEP
    notes.append(f"{what}(s) with a step beyond 2**62 left out: {int((~keep).sum())}")
    return np.asarray([s for s, k in zip(values, keep) if k], dtype=np.int64), keep


def _evals(evals: list[dict], notes: list[str], what: str) -> Evals:
    steps, keep = _steps([e["step"] for e in evals], notes, what)
    kept = [e for e, k in zip(evals, keep if keep is not None else [True] * len(evals)) if k]
    splits = [e.get("splits") if isinstance(e.get("splits"), dict) else {} for e in kept]
    names = sorted({name for s in splits for name in s})
    first = kept[0] if kept else {}
    loss_name = "eval_loss" if len(names) < 2 else f"eval_loss (mean of {', '.join(names)})"
    return Evals(
        steps=steps,
        eval_loss=np.array([_mean_eval_loss(s) for s in splits]),
        eval_loss_name=loss_name,
        score=np.array([number(e.get("score")) for e in kept]),
        score_name=first.get("score_name") if isinstance(first.get("score_name"), str) else None,
        higher_is_better=bool(first.get("higher_is_better", True)),
    )


def _mean_eval_loss(splits: dict) -> float:
    losses = [number(m.get("eval_loss")) if isinstance(m, dict) else np.nan
              for m in splits.values()]
    return float(np.mean(losses)) if losses else np.nan  # NaN if any split lacks it


def _guard(record: dict) -> GuardEvent:
    event, detail = record.get("event"), record.get("detail")
    return GuardEvent(_int(record.get("step")), event if isinstance(event, str) else "?",
                      detail if isinstance(detail, str) else "")


def _int(value) -> int | None:
    x = number(value)
    return int(x) if abs(x) < _MAX_STEP else None  # NaN compares False
