"""The LR doctor: read a run's ``metrics.jsonl`` and say what its learning rate did.

:func:`diagnose` classifies a run as one of ``diverged``, ``exploding``, ``oscillating``,
``stalled``, ``overfitting``, ``healthy`` (or ``insufficient_data``) from robust statistics of the
logged curves (medians, a debiased EMA), and returns the evidence (steps and numbers), advice, and
recipe overrides computed from the run's own learning rate. The checks run from the most severe to
the least and the first that fires wins, so a run that spikes *and* stalls is called exploding. A
flat loss that follows an early jump (a classifier collapsed to the label prior by a too-high LR)
is reported as diverged, not stalled: raising the LR, the stalled advice, would make it worse.
:func:`plot_diagnosis` draws the curves with the problem region shaded; :func:`format_diagnosis`
renders a diagnosis for ``lrft diagnose``.

The records follow the training loop's format (``kind`` = start, train, eval, guard, end). This
module imports neither torch nor transformers (matplotlib only inside :func:`plot_diagnosis`), so
``lrft diagnose`` starts fast.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.signal import lfilter
from scipy.stats import iqr

METRICS_FILE = "metrics.jsonl"

# --- Smoothing and robust levels -------------------------------------------------------------
# Debiased EMA (the bias correction of Adam, Kingma & Ba 2015; TensorBoard's smoothing slider).
# beta = 0.9 averages ~10 logged records (1 / (1 - beta)): it sees through minibatch noise
# without lagging a blow-up by more than a few logging windows.
EMA_BETA = 0.9
# Below this many finite training records no rule can tell a trend from noise.
MIN_TRAIN_RECORDS = 8
# The initial loss is the median of the first few records, so one odd first batch cannot decide.
INITIAL_RECORDS = 5
# The final loss level is the median of the last quarter of the records.
FINAL_FRACTION = 0.25

# --- diverged --------------------------------------------------------------------------------
# Smoothed loss ending above 4x the initial loss: the blow-up threshold of the LR range test
# (Smith 2017, "Cyclical Learning Rates for Training Neural Networks"; fastai's lr_find and
# Lightning's early_stop_threshold=4.0 stop there).
DIVERGED_LOSS_FACTOR = 4.0
# "A diverging run: lower the LR 5-10x" (the common rule of thumb); a blow-up takes the 10x end.
DIVERGED_LR_DIVISOR = 10.0

# --- exploding -------------------------------------------------------------------------------
# A grad norm above 10x the median of the previous 20 logged norms is a spike: the default
# factor of lrft.guard (guard.grad_spike_factor), which acts on the same signal online, in the
# spirit of the spike handling large runs report (PaLM, Chowdhery et al. 2022, sec. 5.1). Lower
# factors flag the hard batches of a converged classifier, whose typical grad norm is tiny.
GRAD_SPIKE_FACTOR = 10.0
GRAD_SPIKE_WINDOW = 20
# "Many" spikes: at least 3, and at least 2% of the logged steps on long runs.
GRAD_SPIKE_MIN_COUNT = 3
GRAD_SPIKE_MIN_FRACTION = 0.02
# Guard events that mean the loop already caught an instability (lrft.guard).
GUARD_INSTABILITY_EVENTS = ("nan_loss", "loss_spike", "grad_spike", "rollback", "skip")
# A loss rising trend: the smoothed loss ends 1.5x above its minimum, by at least a tenth of the
# initial loss (near zero loss a 1.5x move is noise)...
LOSS_RISE_FACTOR = 1.5
LOSS_RISE_MIN_OF_INITIAL = 0.1
# ...and the LR where the rise began was at least half the run's peak LR (a rise at the tail of
# a decayed schedule is not the LR's doing).
HIGH_LR_FRACTION = 0.5
# Not blown up yet: the 5x end of the same "lower it 5-10x" advice.
EXPLODING_LR_DIVISOR = 5.0
# Global-norm clipping at 1.0: BERT's and the HF Trainer's default max_grad_norm.
CLIP_NORM = 1.0

# --- oscillating -----------------------------------------------------------------------------
# "Too large an LR: the learning curve shows violent oscillations" (Goodfellow, Bengio &
# Courville, Deep Learning, sec. 8.3.1). Not trending down = the final level is less than 20%
# below the initial one...
OSC_MAX_DROP = 0.2
# ...while the raw loss in the second half swings by a robust CV of 15% or more...
OSC_MIN_CV = 0.15
# ...and the smoothed loss changes direction often (a trend has ~0 sign changes, noise ~0.5).
OSC_MIN_SIGN_CHANGE_RATE = 0.3
# "Lower it 2-5x": the best LR is usually within ~2x of the largest stable one (Bengio 2012,
# "Practical Recommendations for Gradient-Based Training"), so a bouncing LR needs a few-fold cut.
OSC_LR_DIVISOR = 3.0

# --- collapsed (reported as diverged) --------------------------------------------------------
# A flat loss is not always a too-small LR: a too-large one can knock a classifier into predicting
# the label prior, after which the loss sits flat at chance level (ln 2 = 0.693 for two balanced
# classes) and "raise the LR" would be the wrong advice. Failed BERT fine-tuning runs look like
# this (Mosbach et al. 2021, "On the Stability of Fine-tuning BERT"). The tell is an early bump:
# the loss first rose 10% above the level it later settled at...
COLLAPSE_EARLY_RISE = 0.1
# ...by more than 6 robust standard deviations of the settled loss (a real jump, not a noisy record).
COLLAPSE_RISE_SDS = 6.0
# Evidence only: a settled loss within 1% of ln(k), k = 2..10, is the chance level of k classes.
CHANCE_MAX_CLASSES = 10
CHANCE_TOLERANCE = 0.01

# --- stalled ---------------------------------------------------------------------------------
# "Too low an LR: learning is slow and may stay stuck at a high cost" (Deep Learning, sec. 8.3.1).
# Stalled = the loss moved by less than 5% over the whole run, with low noise (CV < OSC_MIN_CV).
STALL_MAX_DROP = 0.05
# "Raise it 3-5x": the conservative end, since the LR that diverges is unknown (run find-lr).
STALL_LR_FACTOR = 3.0
# Above this LR a flat loss is as likely a collapse as a too-small step: BERT fine-tunes at
# 2e-5..5e-5 (Devlin et al. 2019) and failed fine-tuning runs sit at a flat, chance-level training
# loss (Mosbach et al. 2021, "On the Stability of Fine-tuning BERT"). LoRA runs legitimately go
# higher, so this only adds a caution to the advice.
STALL_CAUTION_LR = 1e-4

# --- overfitting -----------------------------------------------------------------------------
# Validation worse than its best for the last 3 evaluations: Prechelt's UP_s / patience rule
# ("Early Stopping - But When?", 1998; HF EarlyStoppingCallback's early_stopping_patience).
OVERFIT_PATIENCE = 3
# ...and the last evaluation at least 2% worse than the best (smaller moves are eval noise).
OVERFIT_MIN_WORSENING = 0.02
# "Regularize: weight decay, early stopping" (Karpathy, "A Recipe for Training Neural
# Networks", 2019). 0.1 is the usual AdamW step up from the 0.01 BERT-style default.
OVERFIT_WEIGHT_DECAY = 0.1
# A smaller LR fits the training set more slowly; halve it.
OVERFIT_LR_DIVISOR = 2.0

# --- remedies shared by several verdicts -----------------------------------------------------
# Warmup for a run that had none: 10%, the top of the usual 6-10% fine-tuning range
# (RoBERTa used 6%; Goyal et al. 2017 introduced gradual warmup for large-LR stability).
WARMUP_RATIO = 0.1

VERDICTS = ("diverged", "exploding", "oscillating", "stalled", "overfitting", "healthy",
            "insufficient_data")


@dataclass
class Diagnosis:
    """What the doctor found in one run.

    Attributes:
        verdict: one of :data:`VERDICTS`.
        evidence: one line per finding, with the steps and numbers it rests on.
        advice: what to change and why, in a sentence or three.
        overrides: ``section.key=value`` recipe overrides to try (computed from ``learning_rate``).
        region: (first_step, last_step) of the problem, or None.
        learning_rate: the run's learning rate from its start record, if it had one.
    """

    verdict: str
    evidence: list[str]
    advice: str
    overrides: list[str] = field(default_factory=list)
    region: tuple[int, int] | None = None
    learning_rate: float | None = None


@dataclass
class _Run:
    """The curves of one run as arrays; ``f*`` arrays hold only the finite-loss train records."""

    steps: np.ndarray
    loss: np.ndarray  # NaN where the logged loss was missing or non-finite
    grad_norm: np.ndarray  # NaN where not logged
    group_lrs: dict[str, np.ndarray]
    evals: list[dict]
    guards: list[dict]
    start: dict
    end: dict | None
    fsteps: np.ndarray = field(init=False)
    floss: np.ndarray = field(init=False)
    fsmooth: np.ndarray = field(init=False)
    flr: np.ndarray = field(init=False)  # the largest group LR at each finite record

    def __post_init__(self):
        finite = np.isfinite(self.loss)
        lrs = np.array(list(self.group_lrs.values())) if self.group_lrs else None
        # the largest group LR per record; fmax skips NaN without an all-NaN warning
        peak = np.fmax.reduce(lrs, axis=0) if lrs is not None else np.full(len(self.steps), np.nan)
        self.fsteps, self.floss, self.flr = self.steps[finite], self.loss[finite], peak[finite]
        self.fsmooth = smooth_loss(self.floss)

    @property
    def learning_rate(self) -> float | None:
        return self.start.get("learning_rate")

    @property
    def lr_scaled(self) -> bool:
        """Whether optim.scale_lr changed the recipe's LR (lrft.train logs a note then)."""
        return bool(self.start.get("lr_note"))

    @property
    def has_warmup(self) -> bool:
        return bool(self.start.get("warmup_steps"))


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def read_metrics(run_dir: str | Path) -> list[dict]:
    """Read ``metrics.jsonl`` from a run directory (or the file itself).

    A line cut off mid-write is skipped with a warning: the last line after a crash, or a middle
    line when the run crashed mid-write and was then resumed (the resumed run appends after it).

    Args:
        run_dir: the run's output directory, or the path of its metrics file.

    Returns:
        The records in file order.

    Raises:
        FileNotFoundError: if there is no metrics file.
        ValueError: if the file has lines but none of them is a JSON object.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for number, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            what = "truncated last line" if number == lines[-1][0] else "corrupt line"
            warnings.warn(f"{path}:{number}: skipping a {what} (a crash mid-write?): "
                          f"{line[:60]!r}", stacklevel=2)
    if lines and (not records or not all(isinstance(r, dict) for r in records)):
        raise ValueError(f"{path}: not a metrics.jsonl file (expected one JSON object per line)")
    return records


def smooth_loss(values, beta: float = EMA_BETA) -> np.ndarray:
    """Debiased exponential moving average (Adam-style bias correction).

    Args:
        values: the raw values, oldest first.
        beta: the EMA decay; 1 / (1 - beta) records is the effective window.

    Returns:
        The smoothed values, same length; element i averages values[0..i].
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return x
    ema = lfilter([1 - beta], [1, -beta], x)  # avg_i = beta avg_{i-1} + (1 - beta) x_i, avg_-1 = 0
    return ema / (1 - beta ** np.arange(1, x.size + 1))


def _as_float(value) -> float:
    """The value as a float; NaN for None, strings, booleans (a missing or unlogged number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _parse(records: list[dict]) -> _Run:
    """Split records by kind into a :class:`_Run` (train records sorted by step)."""
    by_kind: dict[str, list[dict]] = {}
    for rec in records:
        by_kind.setdefault(rec.get("kind"), []).append(rec)
    train = sorted(by_kind.get("train", []), key=lambda r: r.get("step", 0))
    names = sorted({name for r in train if isinstance(r.get("lr"), dict) for name in r["lr"]})
    group_lrs = {name: np.array([_as_float(_lr_dict(r).get(name)) for r in train])
                 for name in names or (["lr"] if any("lr" in r for r in train) else [])}
    return _Run(
        steps=np.array([r.get("step", i + 1) for i, r in enumerate(train)], dtype=int),
        loss=np.array([_as_float(r.get("loss")) for r in train]),
        grad_norm=np.array([_as_float(r.get("grad_norm")) for r in train]),
        group_lrs=group_lrs,
        evals=sorted(by_kind.get("eval", []), key=lambda r: r.get("step", 0)),
        guards=by_kind.get("guard", []),
        start=(by_kind.get("start") or [{}])[-1],
        end=(by_kind.get("end") or [None])[-1],
    )


def _lr_dict(record: dict) -> dict:
    lr = record.get("lr")
    return lr if isinstance(lr, dict) else {"lr": lr}


def _load(run_dir_or_records) -> list[dict]:
    if isinstance(run_dir_or_records, (str, Path)):
        return read_metrics(run_dir_or_records)
    return list(run_dir_or_records)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def _initial(r: _Run) -> float:
    return float(np.median(r.floss[:INITIAL_RECORDS]))


def _final(r: _Run) -> float:
    return float(np.median(r.floss[-max(1, int(len(r.floss) * FINAL_FRACTION)):]))


def _relative_drop(r: _Run) -> float:
    """How far the final loss level is below the initial one, as a fraction of the initial."""
    initial = _initial(r)
    return (initial - _final(r)) / abs(initial) if initial else 0.0


def _robust_cv(values: np.ndarray) -> float:
    """Robust coefficient of variation: the IQR scaled to a normal standard deviation, over the
    median. (The IQR, unlike the MAD, still sees a loss that bounces between a few levels.)"""
    median = float(np.median(values))
    return float(iqr(values, scale="normal")) / abs(median) if median else math.inf


def _sign_change_rate(smoothed: np.ndarray) -> float:
    """Share of consecutive smoothed differences that change sign (0 = monotone)."""
    signs = np.sign(np.diff(smoothed))
    signs = signs[signs != 0]
    return float(np.mean(signs[1:] != signs[:-1])) if signs.size > 1 else 0.0


def _grad_spikes(r: _Run) -> list[tuple[int, float, float]]:
    """(step, grad_norm, running median) for each grad norm above GRAD_SPIKE_FACTOR x the median
    of the previous GRAD_SPIKE_WINDOW finite norms."""
    spikes, history = [], []
    for step, norm in zip(r.steps, r.grad_norm):
        if not np.isfinite(norm):
            continue
        window = history[-GRAD_SPIKE_WINDOW:]
        if len(window) >= INITIAL_RECORDS and norm > GRAD_SPIKE_FACTOR * np.median(window):
            spikes.append((int(step), float(norm), float(np.median(window))))
        history.append(norm)
    return spikes


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _overrides(r: _Run, lr_factor: float, *extra: str, warmup: bool = False) -> list[str]:
    """The LR override (the run's LR x lr_factor), a warmup if asked and the run had none,
    then extra overrides."""
    out = [f"optim.learning_rate={_fmt(r.learning_rate * lr_factor)}"] if r.learning_rate else []
    if out and r.lr_scaled:  # the logged LR is after optim.scale_lr: set it as is
        out.append("optim.scale_lr=none")
    if warmup and not r.has_warmup:
        out.append(f"schedule.warmup_ratio={WARMUP_RATIO}")
    return out + list(extra)


def _lr_text(r: _Run, factor: float) -> str:
    if not r.learning_rate:
        return "(the run has no start record, so its LR is unknown)"
    scaled = "; the logged LR was batch-scaled, so scale_lr goes off" if r.lr_scaled else ""
    return f"({_fmt(r.learning_rate)} -> {_fmt(r.learning_rate * factor)}{scaled})"


def _warmup_text(r: _Run) -> str:
    if r.has_warmup:
        return ""
    return f" and add warmup (warmup_ratio {WARMUP_RATIO}; the run had none)"


# ---------------------------------------------------------------------------------------------
# The checks, most severe first; each returns a Diagnosis or None
# ---------------------------------------------------------------------------------------------

def _check_diverged(r: _Run) -> Diagnosis | None:
    evidence, onsets = _non_finite_signs(r)
    if len(r.floss) > INITIAL_RECORDS and r.fsmooth[-1] > DIVERGED_LOSS_FACTOR * _initial(r):
        i_min = int(np.argmin(r.fsmooth))
        evidence.append(f"smoothed loss {_fmt(r.fsmooth[-1])} at step {r.fsteps[-1]} is "
                        f"{r.fsmooth[-1] / _initial(r):.1f}x the initial {_fmt(_initial(r))} "
                        f"(> {DIVERGED_LOSS_FACTOR:g}x); it was lowest at step {r.fsteps[i_min]}")
        onsets.append(int(r.fsteps[i_min]))
    if not evidence:
        return None
    last = max(onsets + ([int(r.steps[-1])] if r.steps.size else []))
    advice = (f"The learning rate is too high for this model and batch: lower it "
              f"{DIVERGED_LR_DIVISOR:g}x {_lr_text(r, 1 / DIVERGED_LR_DIVISOR)}{_warmup_text(r)}. "
              "Run `lrft find-lr` to pick it from a range test; if it still blows up, look for "
              "bad inputs or labels.")
    return Diagnosis("diverged", evidence, advice,
                     _overrides(r, 1 / DIVERGED_LR_DIVISOR, warmup=True),
                     (min(onsets), last) if onsets else None, r.learning_rate)


def _non_finite_signs(r: _Run) -> tuple[list[str], list[int]]:
    """Evidence of a blow-up the loop recorded: non-finite losses, a diverged end, a guard stop;
    with the step each one starts at."""
    evidence, onsets = [], []
    bad = ~np.isfinite(r.loss)
    if bad.any():
        first = int(np.argmax(bad))
        evidence.append(f"loss is non-finite or missing at {int(bad.sum())} logged step(s), "
                        f"first at step {r.steps[first]}")
        onsets.append(int(r.steps[max(0, first - 1)]))  # it blew up after the last finite loss
    if r.end and r.end.get("status") == "diverged":
        evidence.append(f"the run ended with status 'diverged' at step {r.end.get('step')}")
        onsets.append(int(r.end.get("step", 0)))
    stops = [g for g in r.guards if g.get("event") == "stop"]
    if stops:
        detail = stops[0].get("detail")
        evidence.append(f"the guard stopped the run at step {stops[0].get('step')}"
                        + (f": {detail}" if detail else ""))
        onsets.append(int(stops[0].get("step", 0)))
    return evidence, onsets


def _check_insufficient(r: _Run) -> Diagnosis | None:
    if len(r.floss) >= MIN_TRAIN_RECORDS:
        return None
    evidence = [f"only {len(r.floss)} finite training record(s); the doctor needs "
                f"{MIN_TRAIN_RECORDS}"]
    advice = "Log more often (a smaller train.logging_steps) or train longer, then ask again."
    return Diagnosis("insufficient_data", evidence, advice, [], None, r.learning_rate)


def _check_exploding(r: _Run) -> Diagnosis | None:
    evidence, region = [], None
    spikes = _grad_spikes(r)
    needed = max(GRAD_SPIKE_MIN_COUNT, math.ceil(GRAD_SPIKE_MIN_FRACTION * len(r.steps)))
    if len(spikes) >= needed:
        shown = ", ".join(f"{s} ({_fmt(n)} vs median {_fmt(m)})" for s, n, m in spikes[:5])
        evidence.append(f"grad_norm above {GRAD_SPIKE_FACTOR:g}x its running median at "
                        f"{len(spikes)} logged steps: {shown}{', ...' if len(spikes) > 5 else ''}")
        region = (spikes[0][0], spikes[-1][0])
    events = [g for g in r.guards if g.get("event") in GUARD_INSTABILITY_EVENTS]
    if len(events) >= GRAD_SPIKE_MIN_COUNT or any(g.get("event") == "nan_loss" for g in events):
        evidence.append(f"the guard logged {len(events)} instability event(s): " + ", ".join(
            f"{g.get('event')}@{g.get('step')}" for g in events[:5]))
        steps = [int(g.get("step", 0)) for g in events]
        region = region or (min(steps), max(steps))
    rise = _loss_rise(r)
    if rise:
        evidence.append(rise[0])
        region = region or rise[1]
    if not evidence:
        return None
    advice = (f"The LR is at the edge of stability: lower it {EXPLODING_LR_DIVISOR:g}x "
              f"{_lr_text(r, 1 / EXPLODING_LR_DIVISOR)}, clip gradients at {CLIP_NORM:g} (if not yet)"
              f"{_warmup_text(r)}. Enabling the guard (guard.enabled=true) rolls spikes back.")
    overrides = _overrides(r, 1 / EXPLODING_LR_DIVISOR, f"train.max_grad_norm={CLIP_NORM}",
                           warmup=True)
    return Diagnosis("exploding", evidence, advice, overrides, region, r.learning_rate)


def _loss_rise(r: _Run) -> tuple[str, tuple[int, int]] | None:
    """Evidence and region when the smoothed loss ends LOSS_RISE_FACTOR above its minimum (by more
    than LOSS_RISE_MIN_OF_INITIAL of the initial loss) and the LR at the minimum was high
    (>= HIGH_LR_FRACTION of the run's peak)."""
    i_min = int(np.argmin(r.fsmooth))
    peak = float(np.fmax.reduce(r.flr)) if r.flr.size else math.nan
    rise = r.fsmooth[-1] - r.fsmooth[i_min]
    if not (r.fsmooth[-1] > LOSS_RISE_FACTOR * r.fsmooth[i_min]
            and rise > LOSS_RISE_MIN_OF_INITIAL * _initial(r)):
        return None
    if np.isfinite(peak) and not r.flr[i_min] >= HIGH_LR_FRACTION * peak:
        return None
    text = (f"smoothed loss rose from {_fmt(r.fsmooth[i_min])} at step {r.fsteps[i_min]} to "
            f"{_fmt(r.fsmooth[-1])} at step {r.fsteps[-1]} "
            f"({r.fsmooth[-1] / r.fsmooth[i_min]:.1f}x) "
            f"while the LR was {_fmt(r.flr[i_min])} (peak {_fmt(peak)})")
    return text, (int(r.fsteps[i_min]), int(r.fsteps[-1]))


def _check_oscillating(r: _Run) -> Diagnosis | None:
    half = len(r.floss) // 2
    drop, cv = _relative_drop(r), _robust_cv(r.floss[half:])
    rate = _sign_change_rate(r.fsmooth[half:])
    if not (drop < OSC_MAX_DROP and cv >= OSC_MIN_CV and rate >= OSC_MIN_SIGN_CHANGE_RATE):
        return None
    evidence = [
        f"loss is not trending down: final level {_fmt(_final(r))} vs initial {_fmt(_initial(r))} "
        f"({-drop:+.0%}; a trend needs a drop of {OSC_MAX_DROP:.0%})",
        f"from step {r.fsteps[half]} the loss swings with a robust CV of {cv:.0%} "
        f"(>= {OSC_MIN_CV:.0%}) and the smoothed curve changes direction at {rate:.0%} of steps",
    ]
    advice = (f"The steps overshoot: lower the LR {OSC_LR_DIVISOR:g}x, inside the usual 2-5x "
              f"{_lr_text(r, 1 / OSC_LR_DIVISOR)}. A larger batch also damps the noise.")
    return Diagnosis("oscillating", evidence, advice, _overrides(r, 1 / OSC_LR_DIVISOR),
                     (int(r.fsteps[half]), int(r.fsteps[-1])), r.learning_rate)


def _check_collapsed(r: _Run) -> Diagnosis | None:
    """A flat loss that follows an early bump: the LR broke the model (verdict "diverged")."""
    half = len(r.floss) // 2
    drop, settled = _relative_drop(r), r.floss[half:]
    final, spread = _final(r), float(iqr(settled, scale="normal"))
    peak_i = int(np.argmax(r.floss[:half]))
    rise = r.floss[peak_i] - final
    if not (abs(drop) < STALL_MAX_DROP and _robust_cv(settled) < OSC_MIN_CV
            and rise > COLLAPSE_EARLY_RISE * final and rise > COLLAPSE_RISE_SDS * spread):
        return None
    evidence = [f"loss jumped to {_fmt(r.floss[peak_i])} at step {r.fsteps[peak_i]}, then settled "
                f"flat at {_fmt(final)} ({-drop:+.1%} over the run, robust SD {_fmt(spread)})"]
    k = _chance_classes(final)
    if k:
        evidence.append(f"{_fmt(final)} ~ ln {k} = {math.log(k):.3f}: the chance-level loss of {k} "
                        "balanced classes, i.e. the model predicts the label prior")
    advice = (f"A flat loss after an early bump is a collapse, not a too-small LR: lower it "
              f"{DIVERGED_LR_DIVISOR:g}x {_lr_text(r, 1 / DIVERGED_LR_DIVISOR)}{_warmup_text(r)}, "
              "and confirm with `lrft find-lr`.")
    return Diagnosis("diverged", evidence, advice,
                     _overrides(r, 1 / DIVERGED_LR_DIVISOR, warmup=True),
                     (int(r.fsteps[peak_i]), int(r.fsteps[-1])), r.learning_rate)


def _chance_classes(loss: float) -> int | None:
    """k if loss is within CHANCE_TOLERANCE of ln k for some k in 2..CHANCE_MAX_CLASSES."""
    for k in range(2, CHANCE_MAX_CLASSES + 1):
        if abs(loss - math.log(k)) <= CHANCE_TOLERANCE * math.log(k):
            return k
    return None


def _check_stalled(r: _Run) -> Diagnosis | None:
    drop, cv = _relative_drop(r), _robust_cv(r.floss[len(r.floss) // 2:])
    if not (abs(drop) < STALL_MAX_DROP and cv < OSC_MIN_CV):
        return None
    evidence = [f"loss barely moved: {_fmt(_initial(r))} -> {_fmt(_final(r))} ({-drop:+.1%}, "
                f"less than {STALL_MAX_DROP:.0%} either way) over steps "
                f"{r.fsteps[0]}-{r.fsteps[-1]}",
                f"with little noise (robust CV {cv:.1%})"]
    advice = (f"The steps are too small to make progress: raise the LR {STALL_LR_FACTOR:g}x, "
              f"the low end of the usual 3-5x {_lr_text(r, STALL_LR_FACTOR)}{_warmup_text(r)}.")
    if r.learning_rate and r.learning_rate >= STALL_CAUTION_LR:
        advice += (f" Caution: at an LR of {_fmt(r.learning_rate)} a flat loss (often at chance "
                   "level, e.g. ln 2 = 0.693) can also mean a collapsed model: run "
                   "`lrft find-lr` before raising it.")
    overrides = _overrides(r, STALL_LR_FACTOR, warmup=True)
    return Diagnosis("stalled", evidence, advice, overrides,
                     (int(r.fsteps[0]), int(r.fsteps[-1])), r.learning_rate)


def _eval_loss_key(evals: list[dict]) -> str | None:
    """The logged validation-loss key: ``eval_loss``, or with several eval splits (MNLI) the
    ``<split>_eval_loss`` of the split the main metric comes from."""
    keys = evals[0].get("metrics", {}) if evals else {}
    if "eval_loss" in keys:
        return "eval_loss"
    main = (evals[0].get("main_metric") or "") if evals else ""
    split_losses = [k for k in keys if k.endswith("_eval_loss")]
    same_split = [k for k in split_losses if main.startswith(k[:-len("eval_loss")])]
    return (same_split or split_losses or [None])[0]


def _series(evals: list[dict], key: str | None) -> np.ndarray:
    return np.array([_as_float(e.get("metrics", {}).get(key)) for e in evals])


def _monitored(evals: list[dict]) -> tuple[str, np.ndarray, bool] | None:
    """The validation series to watch (name, values, higher_is_better): the validation loss if
    logged at every evaluation, else the main metric."""
    loss_key, main = _eval_loss_key(evals), evals[0].get("main_metric")
    for name, higher in ((loss_key, False), (main, evals[0].get("higher_is_better", True))):
        values = _series(evals, name)
        if name and np.isfinite(values).all():
            return name, values, bool(higher)
    return None


def _check_overfitting(r: _Run) -> Diagnosis | None:
    watched = _monitored(r.evals) if len(r.evals) > OVERFIT_PATIENCE else None
    if watched is None:
        return None
    name, values, higher = watched
    score = -values if higher else values  # lower is better
    best = int(np.argmin(score))
    worsening = (score[-1] - score[best]) / abs(score[best]) if score[best] else math.inf
    if best > len(values) - 1 - OVERFIT_PATIENCE or worsening < OVERFIT_MIN_WORSENING:
        return None
    steps = [int(e.get("step", 0)) for e in r.evals]
    train_then = r.fsmooth[max(0, np.searchsorted(r.fsteps, steps[best], side="right") - 1)]
    if not r.fsmooth[-1] < train_then:
        return None  # training loss not going down: not overfitting
    later = ", ".join(f"{_fmt(v)}@{s}" for v, s in zip(values[best + 1:], steps[best + 1:]))
    evidence = [
        f"{name} was best at step {steps[best]} ({_fmt(values[best])}), then worse at each of "
        f"the last {len(values) - 1 - best} evaluations: {later} ({worsening:.0%} worse)",
        f"meanwhile the smoothed training loss kept falling: {_fmt(train_then)} -> "
        f"{_fmt(r.fsmooth[-1])}",
    ]
    advice = (f"The model memorises the training set after step {steps[best]}: stop there, "
              f"raise weight decay (to {OVERFIT_WEIGHT_DECAY:g}) and halve the LR "
              f"{_lr_text(r, 1 / OVERFIT_LR_DIVISOR)}.")
    overrides = _overrides(r, 1 / OVERFIT_LR_DIVISOR, f"optim.weight_decay={OVERFIT_WEIGHT_DECAY}",
                           f"train.max_steps={steps[best]}")
    return Diagnosis("overfitting", evidence, advice, overrides, (steps[best], steps[-1]),
                     r.learning_rate)


def _healthy(r: _Run) -> Diagnosis:
    drop = _relative_drop(r)
    evidence = [f"loss {'fell' if drop > 0 else 'changed'} {abs(drop):.0%}: {_fmt(_initial(r))} "
                f"-> {_fmt(_final(r))} over steps {r.fsteps[0]}-{r.fsteps[-1]}",
                f"{len(_grad_spikes(r))} grad-norm spike(s), {len(r.guards)} guard event(s)"]
    advice = ("Nothing to fix: keep the LR. To squeeze out more, compare 0.5x and 2x of it, or run "
              "`lrft find-lr`.")
    if drop <= 0:  # no LR rule fired, yet the loss did not go down: not the LR's signature
        advice = ("No LR problem shows, but the loss did not go down: check the data (labels, "
                  "shuffling, truncation) before changing the LR.")
    return Diagnosis("healthy", evidence, advice, [], None, r.learning_rate)


_CHECKS = (_check_diverged, _check_insufficient, _check_exploding, _check_oscillating,
           _check_collapsed, _check_stalled, _check_overfitting)


def diagnose(run_dir_or_records) -> Diagnosis:
    """Diagnose a run's learning rate from its metrics.

    Args:
        run_dir_or_records: a run directory (or metrics.jsonl path), or the records themselves.

    Returns:
        The first :class:`Diagnosis` whose rule fires, checked from the most severe
        (diverged, then insufficient data, exploding, oscillating, a collapse to a flat loss
        (reported as diverged), stalled, overfitting), else ``healthy``.
    """
    run = _parse(_load(run_dir_or_records))
    for check in _CHECKS:
        found = check(run)
        if found is not None:
            return found
    return _healthy(run)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def format_diagnosis(d: Diagnosis, recipe: str = "RECIPE") -> str:
    """Render a diagnosis for the terminal: verdict, evidence, advice, a ready command.

    Args:
        d: the diagnosis.
        recipe: the recipe path to put in the suggested command.

    Returns:
        The text, several lines.
    """
    where = f" (steps {d.region[0]}-{d.region[1]})" if d.region else ""
    lines = [f"LR doctor: {d.verdict.upper()}{where}"]
    lines += [f"  - {e}" for e in d.evidence]
    lines += ["", f"Advice: {d.advice}"]
    if d.overrides:
        lines += ["", "Try:", f"  lrft train {recipe} {' '.join(d.overrides)}"]
    return "\n".join(lines)


def diagnose_run(run_dir: str | Path, plot: bool = True) -> int:
    """``lrft diagnose RUN_DIR``: print the diagnosis and write ``RUN_DIR/doctor.png``.

    The suggested command names the run's saved ``recipe.yaml`` when there is one.

    Args:
        run_dir: the run's output directory.
        plot: also write the plot.

    Returns:
        0, the exit status (a diagnosis was made, whatever it says).

    Raises:
        FileNotFoundError: if the directory has no metrics.jsonl.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    d = diagnose(records)
    recipe = run_dir / "recipe.yaml" if run_dir.is_dir() else None
    if d.overrides and recipe is not None:  # the retry must not collide with this run's folder
        d.overrides.append(f"train.output_dir={run_dir.as_posix().rstrip('/')}-retry")
    print(format_diagnosis(d, str(recipe) if recipe and recipe.exists() else "RECIPE"))
    if plot and run_dir.is_dir():
        print(f"\nplot: {plot_diagnosis(records, d, run_dir / 'doctor.png')}")
    return 0


def plot_diagnosis(records, diagnosis: Diagnosis, path: str | Path) -> Path:
    """Plot loss (raw + smoothed), validation, and each group's LR with the problem shaded.

    The top panel has the training loss, eval_loss as points, and the main validation metric on a
    twin axis; the bottom panel each group's LR on a log axis. Uses matplotlib's Agg canvas
    directly (no pyplot), so it neither needs a display nor changes the global backend.

    Args:
        records: a run directory, a metrics.jsonl path, or the records.
        diagnosis: the diagnosis to show (title and shaded region).
        path: the PNG to write.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r = _parse(_load(records))
    fig = Figure(figsize=(9, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    _plot_loss(ax_loss, r)
    _plot_lrs(ax_lr, r)
    if diagnosis.region:
        for ax in (ax_loss, ax_lr):
            ax.axvspan(*diagnosis.region, color="tab:red", alpha=0.12, label="_region")
    ax_loss.set_title(f"LR doctor: {diagnosis.verdict}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _plot_loss(ax, r: _Run) -> None:
    ax.plot(r.steps, r.loss, color="tab:blue", alpha=0.3, lw=1, label="train loss")
    ax.plot(r.fsteps, r.fsmooth, color="tab:blue", lw=2, label=f"smoothed (EMA {EMA_BETA})")
    for step in r.steps[~np.isfinite(r.loss)][:1]:
        ax.axvline(step, color="tab:red", ls="--", label="non-finite loss")
    steps = [e.get("step") for e in r.evals]
    loss_key = _eval_loss_key(r.evals)
    if loss_key:
        ax.plot(steps, _series(r.evals, loss_key), "s", color="tab:orange", label=loss_key)
    ax.set_ylabel("loss")
    ax.legend(loc="upper left", fontsize=8)
    main = r.evals[0].get("main_metric") if r.evals else None
    if main and main != loss_key:
        twin = ax.twinx()
        twin.plot(steps, _series(r.evals, main), "o-", color="tab:green", label=main)
        twin.set_ylabel(main, color="tab:green")
        twin.legend(loc="upper right", fontsize=8)


def _plot_lrs(ax, r: _Run) -> None:
    for name, lrs in r.group_lrs.items():
        ax.plot(r.steps, np.where(lrs > 0, lrs, np.nan), label=name)  # log axis: hide LR 0
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    if r.group_lrs:
        ax.legend(loc="best", fontsize=8, ncol=2)
