"""Figures: each function takes plain data and a path, draws one PNG and returns the path.

matplotlib is imported inside the functions, on its Agg canvas (no display, no global pyplot
state): importing this module costs nothing, and a run that draws no figure never loads it.

The data are plain: a figure of line panels takes ``{panel title: [Series, ...]}``; the bar
chart takes groups and one list of (mean, error) per series. What the numbers mean (which
runs, which statistic) is the caller's; the axis labels and titles it passes say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

# Series that train alike (AdamW and 8-bit AdamW) draw on top of each other: dashes keep both seen.
_STYLES = ("-", "--", ":", "-.")


@dataclass
class Series:
    """One line: x and y, an optional band (lo..hi at each x) and optional marked points."""

    label: str
    x: list[float]
    y: list[float | None]
    lo: list[float | None] | None = None
    hi: list[float | None] | None = None
    marks: list[tuple[float, float]] = field(default_factory=list)  # (x, y) drawn as stars


def _figure(n_panels: int, width: float = 5.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(n_panels, 3))
    nrows = max(1, math.ceil(n_panels / ncols))
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained", dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _nan(values):
    return [math.nan if v is None else v for v in values]


def label_styles(panels: dict[str, list[Series]]) -> dict[str, tuple[str, str]]:
    """Each series label's (colour, dash), by the label's first appearance over all panels, so
    a line keeps its look from panel to panel."""
    order = list(dict.fromkeys(s.label for series in panels.values() for s in series))
    return {label: (f"C{i % 10}", _STYLES[i % len(_STYLES)]) for i, label in enumerate(order)}


def line_panels(panels: dict[str, list[Series]], path: Path, *, title: str, xlabel: str,
                ylabel: str, log_x: bool = False, sci_y: bool = False) -> Path:
    """One panel per key, one line per series (mean), its band shaded, its marks as stars.

    Args:
        panels: panel title -> series, drawn in order; a label keeps one colour and dash in
            every panel (by its first appearance), also where other panels lack some labels.
        path: the PNG to write.
        title, xlabel, ylabel: what the figure shows.
        log_x: a log-scaled x axis (learning rates).
        sci_y: scientific notation on the y axis (small values such as LRs).
    """
    fig, axes = _figure(len(panels) or 1)
    styles = label_styles(panels)
    for ax, (name, series) in zip(axes, panels.items()):
        for s in series:
            color, dash = styles[s.label]
            ax.plot(s.x, _nan(s.y), color=color, lw=1.6, ls=dash,
                    marker="o" if log_x else None, ms=3, label=s.label)
            if s.lo is not None and s.hi is not None:
                ax.fill_between(s.x, _nan(s.lo), _nan(s.hi), color=color, alpha=0.18, lw=0)
            for x, y in s.marks:
                ax.plot([x], [y], marker="*", ms=12, color=color, mec="black", mew=0.6, ls="")
        if log_x:
            ax.set_xscale("log")
        if sci_y:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.set(title=name, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    fig.suptitle(title, wrap=True)  # a one-panel figure is narrower than the title
    fig.savefig(path)
    return Path(path)


def plot_loss(panels: dict[str, list[Series]], path: Path) -> Path:
    """Training loss against optimizer step, one panel per task (band: min..max over seeds)."""
    return line_panels(panels, path, title="Training loss: mean over seeds, band = min..max",
                       xlabel="optimizer step", ylabel="training loss")


def plot_lr(panels: dict[str, list[Series]], path: Path) -> Path:
    """The learning rate against optimizer step, one panel per task."""
    return line_panels(panels, path, title="Learning rate vs step (the head group, else the "
                                           "first group)",
                       xlabel="optimizer step", ylabel="learning rate", sci_y=True)


def plot_sensitivity(panels: dict[str, list[Series]], path: Path, *, ylabel: str) -> Path:
    """Score against LR (log axis), one line per optimizer with its seeds' band, one panel per
    task; the chosen LR of each optimizer is starred."""
    return line_panels(panels, path, title="LR sensitivity: mean over seeds, band = min..max, "
                                           "star = chosen LR",
                       xlabel="learning rate (log scale)", ylabel=ylabel, log_x=True)


def plot_bars(groups: list[str], bars: dict[str, list[tuple[float | None, float | None]]],
              path: Path, *, ylabel: str, title: str) -> Path:
    """Grouped bars with error bars, each labelled with its value.

    Args:
        groups: the x tick labels.
        bars: series label -> one (value, error) per group; None draws nothing there.
        path: the PNG to write.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(len(bars), 1)
    fig = Figure(figsize=(max(5.0, 1.3 * len(groups) * (n / 3 + 0.7)), 4.0),
                 layout="constrained", dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / n
    for i, (label, values) in enumerate(bars.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(groups))]
        means = [v if v is not None else 0.0 for v, _ in values]
        errs = [e if e is not None else 0.0 for _, e in values]
        drawn = ax.bar(xs, means, width, yerr=errs, capsize=3, color=f"C{i % 10}", label=label)
        ax.bar_label(drawn, labels=[f"{v:.1f}" if v is not None else "" for v, _ in values],
                     fontsize=7, padding=2, label_type="center")
    ax.set_xticks(range(len(groups)), groups)
    shown = [v for values in bars.values() for v, _ in values if v is not None]
    if shown:
        ax.set_ylim(max(0.0, min(shown) - 10), min(100.0, max(shown) + 8))
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# The LR doctor's figure (`lrft diagnose`)
# ---------------------------------------------------------------------------------------------

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
    _doctor_loss(ax_loss, curves)
    _doctor_lrs(ax_lr, curves)
    if diagnosis.region:
        for ax in (ax_loss, ax_lr):
            ax.axvspan(*diagnosis.region, color="tab:red", alpha=0.12, label="_region")
    ax_loss.set_title(f"LR doctor: {diagnosis.verdict}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _doctor_loss(ax, c) -> None:
    import numpy as np

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


def _doctor_lrs(ax, c) -> None:
    import numpy as np

    for name, lrs in c.group_lrs.items():
        with np.errstate(invalid="ignore"):
            ax.plot(*thin(c.steps, np.where(lrs > 0, lrs, np.nan)), label=name)  # log axis: no 0
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    if c.group_lrs:
        ax.legend(loc="best", fontsize=8, ncol=2)


def thin(x, y):
    """At most ~MAX_POINTS points of a line: each bucket of a long curve keeps its lowest and
    highest value, so spikes stay visible (an all-NaN bucket stays a gap)."""
    import numpy as np

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


# ---------------------------------------------------------------------------------------------
# The LR range test's figure (`lrft find-lr`)
# ---------------------------------------------------------------------------------------------

def _range_test_ylim(ax, smoothed) -> None:
    """Fit the y axis to the smoothed curve up to its minimum, with as much room again above:
    the descent stays readable and the blow-up runs off the top."""
    import numpy as np

    finite = smoothed[np.isfinite(smoothed)]
    if not finite.size:
        return
    low, descent_top = finite.min(), finite[:int(np.argmin(finite)) + 1].max()
    span = descent_top - low or abs(low) or 1.0
    ax.set_ylim(low - 0.05 * span, min(finite.max(), descent_top + span) + 0.05 * span)


def plot_range_test(result, path: str | Path, current_lr: float | None = None) -> Path:
    """Plot loss vs LR (log x) with both suggestions and the current LR marked.

    Uses matplotlib's Agg canvas directly (no pyplot): no display needed, no global backend change.

    Args:
        result: the range test result.
        path: the PNG to write.
        current_lr: the recipe's LR, drawn for comparison; None to leave it out.

    Returns:
        The path written.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="tab:blue", alpha=0.3, lw=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="tab:blue", lw=2, label="smoothed loss")
    marks = (("steepest", result.suggestion_steepest, "tab:green"),
             ("min / 10", result.suggestion_min_div10, "tab:orange"),
             ("current", current_lr, "tab:gray"))
    for label, lr, color in marks:
        if lr is not None:
            ax.axvline(lr, color=color, ls="--", label=f"{label}: {lr:.2g}")
    _range_test_ylim(ax, np.asarray(result.smoothed))
    ax.set_xscale("log")
    ax.set_xlabel(f"learning rate (base {result.base_lr:.2g} x multiplier; groups keep ratios)")
    ax.set_ylabel("loss")
    ax.set_title("LR range test" + (" (stopped on divergence)" if result.stopped_early else ""))
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
