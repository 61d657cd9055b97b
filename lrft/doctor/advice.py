"""What the doctor hands back: :class:`Diagnosis`, and the helpers that word its advice.

A diagnosis keeps its changes as plain setting names -> values (`{"learning_rate": "5e-06"}`);
its `overrides` are those changes written in the run's own :class:`~lrft.doctor.dialect.Dialect`
(recipe overrides for an lrft run, TrainingArguments for a Trainer run). The LR a change
proposes is always the run's own LR times a factor from :mod:`lrft.doctor.thresholds`, and is
left out when the run's LR is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lrft.doctor.curves import Curves
from lrft.doctor.dialect import RECIPE, Dialect
from lrft.doctor.thresholds import WARMUP_RATIO


@dataclass
class Diagnosis:
    """What the doctor found in one run.

    Attributes:
        verdict: one of :data:`lrft.doctor.VERDICTS`.
        evidence: one line per finding, with the steps and numbers it rests on.
        advice: what to change and why, in a sentence or three.
        changes: setting -> value to try, in order (`learning_rate`, `warmup_ratio`, ...).
        region: (first_step, last_step) of the problem, or None.
        learning_rate: the run's learning rate (from its start record), if known.
        dialect: how the run's settings are spelled; `overrides` uses it.
    """

    verdict: str
    evidence: list[str]
    advice: str
    changes: dict[str, str] = field(default_factory=dict)
    region: tuple[int, int] | None = None
    learning_rate: float | None = None
    dialect: Dialect = RECIPE

    @property
    def overrides(self) -> list[str]:
        """The changes as this run's recipe overrides (`optim.learning_rate=5e-06`) or
        TrainingArguments (`--learning_rate 5e-06`)."""
        return self.dialect.render(self.changes)


def fmt(x: float) -> str:
    return f"{x:.3g}"


def changes(r: Curves, lr_factor: float, *, warmup: bool = False, **extra: str) -> dict[str, str]:
    """The LR change (the run's LR x lr_factor), a warmup if asked and the run had none, then
    the extra settings, in that order."""
    out = {}
    if r.learning_rate:
        out["learning_rate"] = fmt(r.learning_rate * lr_factor)
        if r.lr_scaled:  # the logged LR is after optim.scale_lr: set it as is
            out["scale_lr"] = "none"
    if warmup and not r.has_warmup:
        out["warmup_ratio"] = str(WARMUP_RATIO)
    return {**out, **extra}


def lr_text(r: Curves, factor: float) -> str:
    """"(old -> new)" for the run's LR, saying where the old one came from when it matters."""
    if not r.learning_rate:
        return "(the run has no start record, so its LR is unknown)"
    scaled = "; the logged LR was batch-scaled, so scale_lr goes off" if r.lr_scaled else ""
    now = f"the peak logged LR {fmt(r.learning_rate)}" if r.lr_inferred else fmt(r.learning_rate)
    return f"({now} -> {fmt(r.learning_rate * factor)}{scaled})"


def warmup_text(r: Curves) -> str:
    if r.has_warmup:
        return ""
    (setting,) = r.dialect.render({"warmup_ratio": str(WARMUP_RATIO)})
    return f" and add warmup ({setting}; the run had none)"
