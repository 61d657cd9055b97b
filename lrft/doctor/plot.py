"""The doctor's figure: loss, validation and each group's LR, with the problem region shaded.

It takes data only (the curves and the diagnosis, read through their attributes) and draws on
matplotlib's Agg canvas, imported inside the function: no display, no global backend change, and
`import lrft.doctor` stays free of matplotlib.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_POINTS = 4000  # per line, more than the pixels: a longer curve is drawn as its envelope


def plot_diagnosis(curves, diagnosis, path: str | Path) -> Path:
    """Plot loss (raw + smoothed), validation, and each group's LR with the problem shaded.

    The top panel has the training loss, the eval loss as points, and the score on a twin axis;
    the bottom panel each group's LR on a log axis.

    Args:
        curves: the run's :class:`lrft.doctor.Curves` (`lrft.doctor.read_curves(run_dir)`).
        diagnosis: the :class:`lrft.doctor.Diagnosis` to show (verdict and shaded region).
        path: the PNG to write (its folder is created).

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    _plot_loss(ax_loss, curves)
    _plot_lrs(ax_lr, curves)
    if diagnosis.region:
        for ax in (ax_loss, ax_lr):
            ax.axvspan(*diagnosis.region, color="tab:red", alpha=0.12, label="_region")
    ax_loss.set_title(f"LR doctor: {diagnosis.verdict}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _plot_loss(ax, c) -> None:
    ax.plot(*thin(c.steps, c.loss), color="tab:blue", alpha=0.3, lw=1, label="train loss")
    ax.plot(*thin(c.fsteps, c.fsmooth), color="tab:blue", lw=2, label="smoothed (debiased EMA)")
    for step in c.steps[~np.isfinite(c.loss)][:1]:
        ax.axvline(step, color="tab:red", ls="--", label="non-finite loss")
    ev = c.evals
    if np.isfinite(ev.eval_loss).any():
        ax.plot(ev.steps, ev.eval_loss, "s", color="tab:orange", label=ev.eval_loss_name)
    ax.set_ylabel("loss")
    ax.legend(loc="upper left", fontsize=8)
    if ev.score_name and ev.score_name != "eval_loss" and np.isfinite(ev.score).any():
        twin = ax.twinx()
        twin.plot(ev.steps, ev.score, "o-", color="tab:green", label=ev.score_name)
        twin.set_ylabel(ev.score_name, color="tab:green")
        twin.legend(loc="upper right", fontsize=8)


def _plot_lrs(ax, c) -> None:
    for name, lrs in c.group_lrs.items():
        with np.errstate(invalid="ignore"):
            ax.plot(*thin(c.steps, np.where(lrs > 0, lrs, np.nan)), label=name)  # log axis: no 0
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    if c.group_lrs:
        ax.legend(loc="best", fontsize=8, ncol=2)


def thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most ~MAX_POINTS points of a line: each bucket of a long curve keeps its lowest and
    highest value, so spikes stay visible (an all-NaN bucket stays a gap)."""
    if len(y) <= MAX_POINTS:
        return x, y
    size = -(-len(y) // (MAX_POINTS // 2))  # ceil: buckets of this many points
    pad = (-len(y)) % size
    low = np.pad(np.where(np.isnan(y), np.inf, y), (0, pad), constant_values=np.inf)
    high = np.pad(np.where(np.isnan(y), -np.inf, y), (0, pad), constant_values=-np.inf)
    base = np.arange(0, len(y) + pad, size)
    keep = np.concatenate([base + low.reshape(-1, size).argmin(1),
                           base + high.reshape(-1, size).argmax(1)])
    keep = np.unique(np.minimum(keep, len(y) - 1))
    return x[keep], y[keep]
