"""Robust statistics of a logged curve: the debiased EMA, start and end levels, spread, direction
changes, and grad-norm spikes.

Plain functions of 1-D numpy arrays (oldest first), vectorised: a million-record log costs a
fraction of a second here. The thresholds they use are in :mod:`lrft.doctor.thresholds`.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.signal import lfilter
from scipy.stats import iqr

from lrft.doctor.thresholds import (EMA_BETA, FINAL_FRACTION, GRAD_SPIKE_FACTOR,
                                    GRAD_SPIKE_WINDOW, INITIAL_RECORDS)


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
    # the bias 1 - beta**i reaches 1 (in float64) after a few hundred records: correct those only
    k = min(x.size, int(math.log(1e-17) / math.log(beta)) + 1) if 0 < beta < 1 else x.size
    ema[:k] /= 1 - beta ** np.arange(1, k + 1)
    return ema


def initial_level(loss: np.ndarray) -> float:
    """The median of the first INITIAL_RECORDS values: one odd first batch cannot decide."""
    return float(np.median(loss[:INITIAL_RECORDS]))


def final_level(loss: np.ndarray) -> float:
    """The median of the last FINAL_FRACTION of the values."""
    return float(np.median(loss[-max(1, int(len(loss) * FINAL_FRACTION)):]))


def relative_drop(loss: np.ndarray) -> float:
    """How far the final level is below the initial one, as a fraction of the initial."""
    initial = initial_level(loss)
    return (initial - final_level(loss)) / abs(initial) if initial else 0.0


def robust_cv(values: np.ndarray) -> float:
    """Robust coefficient of variation: the IQR scaled to a normal standard deviation, over the
    median. (The IQR, unlike the MAD, still sees a loss that bounces between a few levels.)"""
    median = float(np.median(values))
    return float(iqr(values, scale="normal")) / abs(median) if median else math.inf


def robust_sd(values: np.ndarray) -> float:
    """The IQR scaled to a normal standard deviation."""
    return float(iqr(values, scale="normal"))


def sign_change_rate(smoothed: np.ndarray) -> float:
    """Share of consecutive smoothed differences that change sign (0 = monotone)."""
    signs = np.sign(np.diff(smoothed))
    signs = signs[signs != 0]
    return float(np.mean(signs[1:] != signs[:-1])) if signs.size > 1 else 0.0


def grad_spikes(steps: np.ndarray, grad_norm: np.ndarray) -> list[tuple[int, float, float]]:
    """(step, grad_norm, running median) for each grad norm above GRAD_SPIKE_FACTOR x the median
    of the previous GRAD_SPIKE_WINDOW finite norms (at least INITIAL_RECORDS of them).

    Args:
        steps: the logged steps, shape (n,).
        grad_norm: the grad norm at each, shape (n,); NaN where not logged (skipped).
    """
    finite = np.isfinite(grad_norm)
    norms, at = grad_norm[finite], steps[finite]
    # A spike exceeds GRAD_SPIKE_FACTOR x its window's median, so also x the window's minimum:
    # a cheap rolling minimum picks the few candidates whose median is worth computing.
    idx = np.arange(INITIAL_RECORDS, norms.size)
    idx = idx[norms[idx] > GRAD_SPIKE_FACTOR * _rolling_min(norms)[idx]]
    medians = _window_medians(norms, idx)
    keep = norms[idx] > GRAD_SPIKE_FACTOR * medians
    return [(int(at[i]), float(norms[i]), float(m)) for i, m in zip(idx[keep], medians[keep])]


def _rolling_min(x: np.ndarray) -> np.ndarray:
    """Element i: the minimum of the GRAD_SPIKE_WINDOW values before it (inf for i = 0)."""
    out = np.full(x.size, np.inf)
    for lag in range(1, min(GRAD_SPIKE_WINDOW, x.size - 1) + 1):  # one vectorised pass per lag
        np.minimum(out[lag:], x[:-lag], out=out[lag:])
    return out


def _window_medians(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The median of the GRAD_SPIKE_WINDOW values before x[i] (all of them, early on), i in idx."""
    out = np.empty(idx.size)
    early = idx < GRAD_SPIKE_WINDOW
    out[early] = [np.median(x[:i]) for i in idx[early]]
    if not early.all():
        windows = sliding_window_view(x, GRAD_SPIKE_WINDOW)  # row k = x[k:k+W], no copy
        out[~early] = np.median(windows[idx[~early] - GRAD_SPIKE_WINDOW], axis=1)
    return out
