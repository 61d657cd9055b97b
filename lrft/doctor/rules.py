"""The doctor's rules: one check per verdict, most severe first; the first that fires wins.

Order: diverged, insufficient data, exploding, oscillating, a collapse to a flat loss (reported
as diverged), stalled, overfitting; else healthy. So a run that spikes *and* stalls is called
exploding, and a flat loss after an early jump (a classifier knocked to the label prior by a
too-high LR) is called diverged, not stalled: raising the LR, the stalled advice, would make it
worse. Each check reads :class:`~lrft.doctor.curves.Curves` only and returns a
:class:`~lrft.doctor.advice.Diagnosis` or None; its thresholds and their sources are in
:mod:`lrft.doctor.thresholds`.

A loss that is missing or not a number is no evidence: the loss going non-finite counts as a
blow-up only after a finite loss and to the end of the log (lrft logs NaN once every step of a
logging window was non-finite, and a blown-up model does not come back by itself). A log with
no finite loss at all is `insufficient_data`, unless the loop itself said the run diverged.
"""

from __future__ import annotations

import math

import numpy as np

from lrft.doctor.advice import Diagnosis, changes, fmt, lr_text, warmup_text
from lrft.doctor.curves import Curves
from lrft.doctor.stats import (final_level, initial_level, relative_drop, robust_cv, robust_sd,
                               sign_change_rate)
from lrft.doctor.thresholds import (CHANCE_MAX_CLASSES, CHANCE_TOLERANCE, CLIP_NORM,
                                    COLLAPSE_EARLY_RISE, COLLAPSE_RISE_SDS, DIVERGED_LOSS_FACTOR,
                                    DIVERGED_LR_DIVISOR, EXPLODING_LR_DIVISOR,
                                    GRAD_SPIKE_FACTOR, GRAD_SPIKE_MIN_COUNT,
                                    GRAD_SPIKE_MIN_FRACTION, GUARD_INSTABILITY_EVENTS,
                                    HIGH_LR_FRACTION, INITIAL_RECORDS, LOSS_RISE_FACTOR,
                                    LOSS_RISE_MIN_OF_INITIAL, MIN_TRAIN_RECORDS, OSC_LR_DIVISOR,
                                    OSC_MAX_DROP, OSC_MIN_CV, OSC_MIN_SIGN_CHANGE_RATE,
                                    OVERFIT_LR_DIVISOR, OVERFIT_MIN_WORSENING, OVERFIT_PATIENCE,
                                    OVERFIT_WEIGHT_DECAY, STALL_CAUTION_LR, STALL_LR_FACTOR,
                                    STALL_MAX_DROP)


def diagnose_curves(r: Curves) -> Diagnosis:
    """The first diagnosis whose rule fires (see the module docstring), else healthy."""
    for check in _CHECKS:
        found = check(r)
        if found is not None:
            return found
    return _healthy(r)


def _found(r: Curves, verdict: str, evidence: list[str], advice: str,
           settings: dict[str, str] | None = None, region=None) -> Diagnosis:
    return Diagnosis(verdict, evidence, advice, settings or {}, region, r.learning_rate, r.dialect)


# ---------------------------------------------------------------------------------------------
# diverged, insufficient data
# ---------------------------------------------------------------------------------------------

def _check_diverged(r: Curves) -> Diagnosis | None:
    evidence, onsets = _blow_up_signs(r)
    initial = initial_level(r.floss) if r.floss.size else math.nan
    if len(r.floss) > INITIAL_RECORDS and r.fsmooth[-1] > DIVERGED_LOSS_FACTOR * initial:
        i_min = int(np.argmin(r.fsmooth))
        evidence.append(f"smoothed loss {fmt(r.fsmooth[-1])} at step {r.fsteps[-1]} is "
                        f"{r.fsmooth[-1] / initial:.1f}x the initial {fmt(initial)} "
                        f"(> {DIVERGED_LOSS_FACTOR:g}x); it was lowest at step {r.fsteps[i_min]}")
        onsets.append(int(r.fsteps[i_min]))
    if not evidence:
        return None
    ends = onsets + ([int(r.steps[-1])] if r.steps.size else [])
    advice = (f"The learning rate is too high for this model and batch: lower it "
              f"{DIVERGED_LR_DIVISOR:g}x {lr_text(r, 1 / DIVERGED_LR_DIVISOR)}{warmup_text(r)}. "
              "Run `lrft find-lr` to pick it from a range test; if it still blows up, look for "
              "bad inputs or labels.")
    return _found(r, "diverged", evidence, advice,
                  changes(r, 1 / DIVERGED_LR_DIVISOR, warmup=True),
                  (min(onsets), max(ends)) if onsets else None)


def _blow_up_signs(r: Curves) -> tuple[list[str], list[int]]:
    """Evidence of a blow-up: the loss non-finite from some step to the end of the log after a
    finite one, a diverged end, a guard stop; with the step each one starts at."""
    evidence, onsets = [], []
    finite = np.isfinite(r.loss)
    if finite.any() and not finite[-1]:
        last = len(finite) - 1 - int(np.argmax(finite[::-1]))  # the last finite loss
        evidence.append(f"loss is non-finite or missing at {len(finite) - 1 - last} logged "
                        f"step(s), first at step {r.steps[last + 1]}, to the end of the log "
                        f"(last finite: {fmt(r.loss[last])} at step {r.steps[last]})")
        onsets.append(int(r.steps[last]))  # it blew up after the last finite loss
    if r.end_status == "diverged":
        evidence.append(f"the run ended with status 'diverged'{_at(r.end_step)}")
        onsets += [r.end_step] if r.end_step is not None else []
    stops = [g for g in r.guards if g.event == "stop"]
    if stops:
        detail = stops[0].detail
        evidence.append(f"the guard stopped the run{_at(stops[0].step)}"
                        + (f": {detail}" if detail else ""))
        onsets += [stops[0].step] if stops[0].step is not None else []
    return evidence, onsets


def _at(step: int | None) -> str:
    return f" at step {step}" if step is not None else ""


def _check_insufficient(r: Curves) -> Diagnosis | None:
    if len(r.floss) >= MIN_TRAIN_RECORDS:
        return None
    if r.steps.size and not r.floss.size:
        evidence = [f"none of the {r.steps.size} training record(s) has a finite loss "
                    "(missing, not a number, or NaN from the first one)"]
        advice = ("There is no training loss to judge the LR by. If the loss was NaN from the "
                  "first step, look at the inputs and the precision (fp16 overflow) before the LR.")
        return _found(r, "insufficient_data", evidence, advice)
    evidence = [f"only {len(r.floss)} finite training record(s); the doctor needs "
                f"{MIN_TRAIN_RECORDS}"]
    advice = (f"Log more often (a smaller {r.dialect.key('logging_steps')}) or train longer, "
              "then ask again.")
    return _found(r, "insufficient_data", evidence, advice)


# ---------------------------------------------------------------------------------------------
# exploding, oscillating
# ---------------------------------------------------------------------------------------------

def _check_exploding(r: Curves) -> Diagnosis | None:
    evidence, region = [], None
    spikes = r.spikes
    needed = max(GRAD_SPIKE_MIN_COUNT, math.ceil(GRAD_SPIKE_MIN_FRACTION * len(r.steps)))
    if len(spikes) >= needed:
        shown = ", ".join(f"{s} ({fmt(n)} vs median {fmt(m)})" for s, n, m in spikes[:5])
        evidence.append(f"grad_norm above {GRAD_SPIKE_FACTOR:g}x its running median at "
                        f"{len(spikes)} logged steps: {shown}{', ...' if len(spikes) > 5 else ''}")
        region = (spikes[0][0], spikes[-1][0])
    events = [g for g in r.guards if g.event in GUARD_INSTABILITY_EVENTS]
    if len(events) >= GRAD_SPIKE_MIN_COUNT or any(g.event == "nan_loss" for g in events):
        evidence.append(f"the guard logged {len(events)} instability event(s): " + ", ".join(
            f"{g.event}@{g.step}" for g in events[:5]))
        steps = [g.step for g in events if g.step is not None]
        region = region or ((min(steps), max(steps)) if steps else None)
    rise = _loss_rise(r)
    if rise:
        evidence.append(rise[0])
        region = region or rise[1]
    if not evidence:
        return None
    advice = (f"The LR is at the edge of stability: lower it {EXPLODING_LR_DIVISOR:g}x "
              f"{lr_text(r, 1 / EXPLODING_LR_DIVISOR)}, clip gradients at {CLIP_NORM:g} "
              f"(if not yet){warmup_text(r)}.{r.dialect.guard_hint}")
    return _found(r, "exploding", evidence, advice,
                  changes(r, 1 / EXPLODING_LR_DIVISOR, warmup=True, max_grad_norm=str(CLIP_NORM)),
                  region)


def _loss_rise(r: Curves) -> tuple[str, tuple[int, int]] | None:
    """Evidence and region when the smoothed loss ends LOSS_RISE_FACTOR above its minimum (by more
    than LOSS_RISE_MIN_OF_INITIAL of the initial loss) and the LR at the minimum was high
    (>= HIGH_LR_FRACTION of the run's peak)."""
    i_min = int(np.argmin(r.fsmooth))
    peak = float(np.fmax.reduce(r.flr)) if r.flr.size else math.nan
    rise = r.fsmooth[-1] - r.fsmooth[i_min]
    if not (r.fsmooth[-1] > LOSS_RISE_FACTOR * r.fsmooth[i_min]
            and rise > LOSS_RISE_MIN_OF_INITIAL * initial_level(r.floss)):
        return None
    if np.isfinite(peak) and not r.flr[i_min] >= HIGH_LR_FRACTION * peak:
        return None
    text = (f"smoothed loss rose from {fmt(r.fsmooth[i_min])} at step {r.fsteps[i_min]} to "
            f"{fmt(r.fsmooth[-1])} at step {r.fsteps[-1]} "
            f"({r.fsmooth[-1] / r.fsmooth[i_min]:.1f}x) "
            f"while the LR was {fmt(r.flr[i_min])} (peak {fmt(peak)})")
    return text, (int(r.fsteps[i_min]), int(r.fsteps[-1]))


def _check_oscillating(r: Curves) -> Diagnosis | None:
    half = len(r.floss) // 2
    drop, cv = relative_drop(r.floss), robust_cv(r.floss[half:])
    rate = sign_change_rate(r.fsmooth[half:])
    if not (drop < OSC_MAX_DROP and cv >= OSC_MIN_CV and rate >= OSC_MIN_SIGN_CHANGE_RATE):
        return None
    evidence = [
        f"loss is not trending down: final level {fmt(final_level(r.floss))} vs initial "
        f"{fmt(initial_level(r.floss))} ({-drop:+.0%}; a trend needs a drop of {OSC_MAX_DROP:.0%})",
        f"from step {r.fsteps[half]} the loss swings with a robust CV of {cv:.0%} "
        f"(>= {OSC_MIN_CV:.0%}) and the smoothed curve changes direction at {rate:.0%} of steps",
    ]
    advice = (f"The steps overshoot: lower the LR {OSC_LR_DIVISOR:g}x, inside the usual 2-5x "
              f"{lr_text(r, 1 / OSC_LR_DIVISOR)}. A larger batch also damps the noise.")
    return _found(r, "oscillating", evidence, advice, changes(r, 1 / OSC_LR_DIVISOR),
                  (int(r.fsteps[half]), int(r.fsteps[-1])))


# ---------------------------------------------------------------------------------------------
# collapsed (reported as diverged), stalled
# ---------------------------------------------------------------------------------------------

def _check_collapsed(r: Curves) -> Diagnosis | None:
    """A flat loss that follows an early bump: the LR broke the model (verdict "diverged")."""
    half = len(r.floss) // 2
    drop, settled = relative_drop(r.floss), r.floss[half:]
    final, spread = final_level(r.floss), robust_sd(settled)
    peak_i = int(np.argmax(r.floss[:half]))
    rise = r.floss[peak_i] - final
    if not (abs(drop) < STALL_MAX_DROP and robust_cv(settled) < OSC_MIN_CV
            and rise > COLLAPSE_EARLY_RISE * final and rise > COLLAPSE_RISE_SDS * spread):
        return None
    evidence = [f"loss jumped to {fmt(r.floss[peak_i])} at step {r.fsteps[peak_i]}, then settled "
                f"flat at {fmt(final)} ({-drop:+.1%} over the run, robust SD {fmt(spread)})"]
    k = _chance_classes(final)
    if k:
        evidence.append(f"{fmt(final)} ~ ln {k} = {math.log(k):.3f}: the chance-level loss of {k} "
                        "balanced classes, i.e. the model predicts the label prior")
    advice = (f"A flat loss after an early bump is a collapse, not a too-small LR: lower it "
              f"{DIVERGED_LR_DIVISOR:g}x {lr_text(r, 1 / DIVERGED_LR_DIVISOR)}{warmup_text(r)}, "
              "and confirm with `lrft find-lr`.")
    return _found(r, "diverged", evidence, advice,
                  changes(r, 1 / DIVERGED_LR_DIVISOR, warmup=True),
                  (int(r.fsteps[peak_i]), int(r.fsteps[-1])))


def _chance_classes(loss: float) -> int | None:
    """k if loss is within CHANCE_TOLERANCE of ln k for some k in 2..CHANCE_MAX_CLASSES."""
    for k in range(2, CHANCE_MAX_CLASSES + 1):
        if abs(loss - math.log(k)) <= CHANCE_TOLERANCE * math.log(k):
            return k
    return None


def _check_stalled(r: Curves) -> Diagnosis | None:
    drop, cv = relative_drop(r.floss), robust_cv(r.floss[len(r.floss) // 2:])
    if not (abs(drop) < STALL_MAX_DROP and cv < OSC_MIN_CV):
        return None
    evidence = [f"loss barely moved: {fmt(initial_level(r.floss))} -> {fmt(final_level(r.floss))} "
                f"({-drop:+.1%}, less than {STALL_MAX_DROP:.0%} either way) over steps "
                f"{r.fsteps[0]}-{r.fsteps[-1]}",
                f"with little noise (robust CV {cv:.1%})"]
    advice = (f"The steps are too small to make progress: raise the LR {STALL_LR_FACTOR:g}x, "
              f"the low end of the usual 3-5x {lr_text(r, STALL_LR_FACTOR)}{warmup_text(r)}.")
    if r.learning_rate and r.learning_rate >= STALL_CAUTION_LR:
        advice += (f" Caution: at an LR of {fmt(r.learning_rate)} a flat loss (often at chance "
                   "level, e.g. ln 2 = 0.693) can also mean a collapsed model: run "
                   "`lrft find-lr` before raising it.")
    return _found(r, "stalled", evidence, advice, changes(r, STALL_LR_FACTOR, warmup=True),
                  (int(r.fsteps[0]), int(r.fsteps[-1])))


# ---------------------------------------------------------------------------------------------
# overfitting, healthy
# ---------------------------------------------------------------------------------------------

def _monitored(r: Curves) -> tuple[str, np.ndarray, bool] | None:
    """The validation series to watch (name, values, higher_is_better): the eval loss if logged
    at every evaluation, else the score."""
    ev = r.evals
    for name, values, higher in ((ev.eval_loss_name, ev.eval_loss, False),
                                 (ev.score_name or "score", ev.score, ev.higher_is_better)):
        if np.isfinite(values).all():
            return name, values, higher
    return None


def _check_overfitting(r: Curves) -> Diagnosis | None:
    watched = _monitored(r) if len(r.evals) > OVERFIT_PATIENCE else None
    if watched is None:
        return None
    name, values, higher = watched
    score = -values if higher else values  # lower is better
    best = int(np.argmin(score))
    worsening = (score[-1] - score[best]) / abs(score[best]) if score[best] else math.inf
    if best > len(values) - 1 - OVERFIT_PATIENCE or worsening < OVERFIT_MIN_WORSENING:
        return None
    steps = [int(s) for s in r.evals.steps]
    train_then = r.fsmooth[max(0, np.searchsorted(r.fsteps, steps[best], side="right") - 1)]
    if not r.fsmooth[-1] < train_then:
        return None  # training loss not going down: not overfitting
    later = ", ".join(f"{fmt(v)}@{s}" for v, s in zip(values[best + 1:], steps[best + 1:]))
    evidence = [
        f"{name} was best at step {steps[best]} ({fmt(values[best])}), then worse at each of "
        f"the last {len(values) - 1 - best} evaluations: {later} ({worsening:.0%} worse)",
        f"meanwhile the smoothed training loss kept falling: {fmt(train_then)} -> "
        f"{fmt(r.fsmooth[-1])}",
    ]
    advice = (f"The model memorises the training set after step {steps[best]}: stop there, "
              f"raise weight decay (to {OVERFIT_WEIGHT_DECAY:g}) and halve the LR "
              f"{lr_text(r, 1 / OVERFIT_LR_DIVISOR)}.")
    settings = changes(r, 1 / OVERFIT_LR_DIVISOR, weight_decay=str(OVERFIT_WEIGHT_DECAY),
                       max_steps=str(steps[best]))
    return _found(r, "overfitting", evidence, advice, settings, (steps[best], steps[-1]))


def _healthy(r: Curves) -> Diagnosis:
    drop = relative_drop(r.floss)
    evidence = [f"loss {'fell' if drop > 0 else 'changed'} {abs(drop):.0%}: "
                f"{fmt(initial_level(r.floss))} -> {fmt(final_level(r.floss))} over steps "
                f"{r.fsteps[0]}-{r.fsteps[-1]}",
                f"{len(r.spikes)} grad-norm spike(s), "
                f"{len(r.guards)} guard event(s)"]
    advice = ("Nothing to fix: keep the LR. To squeeze out more, compare 0.5x and 2x of it, or run "
              "`lrft find-lr`.")
    if drop <= 0:  # no LR rule fired, yet the loss did not go down: not the LR's signature
        advice = ("No LR problem shows, but the loss did not go down: check the data (labels, "
                  "shuffling, truncation) before changing the LR.")
    return _found(r, "healthy", evidence, advice)


_CHECKS = (_check_diverged, _check_insufficient, _check_exploding, _check_oscillating,
           _check_collapsed, _check_stalled, _check_overfitting)
