"""`lrft diagnose`: read a run, diagnose it, print the verdict with a ready command, plot it.

The library entry point is :func:`diagnose`; :func:`diagnose_run` is the command body that
`lrft.cli` calls. Input lines that were not records are warnings (stderr in the command, Python
warnings in the library), never a traceback.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from lrft.doctor.advice import Diagnosis
from lrft.doctor.curves import Curves, curves_from_log
from lrft.plots import plot_diagnosis
from lrft.doctor.rules import diagnose_curves
from lrft.doctor.sources import input_notes, load_run
from lrft.runlog import RunLog


def read_curves(run: str | Path | RunLog) -> Curves:
    """The doctor's :class:`Curves` of a run folder, log file, Trainer folder or read RunLog.

    Lines that were not records become Python warnings (one each, and a count of the rest).

    Raises:
        FileNotFoundError, UserError: see :func:`lrft.doctor.sources.load_run`.
    """
    log = run if isinstance(run, RunLog) else load_run(run)
    curves = curves_from_log(log)
    for note in input_notes(log) + curves.notes:
        warnings.warn(note, stacklevel=3)
    return curves


def diagnose(run: str | Path | RunLog) -> Diagnosis:
    """Diagnose a run's learning rate from its logged curves.

    Args:
        run: an lrft run folder or its metrics.jsonl, a HF Trainer output folder (or checkpoint
            folder, or trainer_state.json), or a :class:`lrft.runlog.RunLog`.

    Returns:
        The first :class:`Diagnosis` whose rule fires, checked from the most severe
        (diverged, then insufficient data, exploding, oscillating, a collapse to a flat loss
        (reported as diverged), stalled, overfitting), else ``healthy``. Its `overrides` are
        recipe overrides for an lrft run and TrainingArguments for a Trainer run.

    Raises:
        FileNotFoundError: no run at that path.
        UserError: the file holds no record, or cannot be read.
    """
    return diagnose_curves(read_curves(run))


def format_diagnosis(d: Diagnosis, recipe: str = "RECIPE") -> str:
    """Render a diagnosis for the terminal: verdict, evidence, advice, a ready command.

    Args:
        d: the diagnosis.
        recipe: the recipe path to put in the suggested command (lrft runs).

    Returns:
        The text, several lines.
    """
    where = f" (steps {d.region[0]}-{d.region[1]})" if d.region else ""
    lines = [f"LR doctor: {d.verdict.upper()}{where}"]
    lines += [f"  - {e}" for e in d.evidence]
    lines += ["", f"Advice: {d.advice}"]
    try_lines = d.dialect.try_lines(d.changes, recipe)
    if try_lines:
        lines += [""] + try_lines
    return "\n".join(lines)


def diagnose_run(run_dir: str | Path, plot: bool = True) -> int:
    """``lrft diagnose RUN_DIR``: print the diagnosis and write ``RUN_DIR/doctor.png``.

    The suggested command names the run's saved ``recipe.yaml`` when there is one, and a new
    output folder (``RUN_DIR-retry``) so the retry does not collide with this run.

    Args:
        run_dir: the run's output folder (lrft's or a Trainer's), or its log file.
        plot: also write the plot (into a folder only).

    Returns:
        0, the exit status (a diagnosis was made, whatever it says).

    Raises:
        FileNotFoundError: no run at that path.
        UserError: the file holds no record, or cannot be read.
    """
    run_dir = Path(run_dir)
    log = load_run(run_dir)
    curves = curves_from_log(log)
    for note in input_notes(log) + curves.notes:
        print(f"warning: {note}", file=sys.stderr)
    d = diagnose_curves(curves)
    folder = run_dir if run_dir.is_dir() else None
    if d.overrides and folder is not None:  # the retry must not collide with this run's folder
        d.changes["output_dir"] = f"{folder.as_posix().rstrip('/')}-retry"
    recipe = folder / "recipe.yaml" if folder is not None else None
    print(format_diagnosis(d, str(recipe) if recipe and recipe.exists() else "RECIPE"))
    if plot and folder is not None:
        print(f"\nplot: {plot_diagnosis(curves, d, folder / 'doctor.png')}")
    return 0
