"""Cell records: the compact summary of one finished cell, as `cell.json` holds it.

Built from the cell's run folder: `results.json` (status, final score, holdout score, time,
memory), `metrics.jsonl` through `lrft.runlog.read_log` (every evaluation, loss and LR curves)
and `recipe.yaml` (the optimizer settings it ran with). Scores are on a 0..1 scale:

- `score.final`: the run's score on the dev set at its last evaluation: the task's GLUE score
  for a GLUE task (MNLI: the mean of matched and mismatched), accuracy for other classification;
- `score.best`: its best evaluation (an oracle checkpoint pick on the dev set);
- `score.holdout`: the final score on the `holdout` split carved from the training rows
  (`data.holdout_fraction`), never part of `final`; None without one.

Run folders of earlier lrft versions (flat `final` metrics with prefixed keys) are read too.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import yaml

from lrft import glue
from lrft.compare.claims import claim_path
from lrft.runlog import RunLog, read_log

CELL_FILE, RESULTS_FILE = "cell.json", "results.json"
FINISHED = ("completed", "diverged")  # results.json statuses that count as a finished cell
HOLDOUT = "holdout"


def split_score(task: str | None, splits: dict[str, dict], logged: Any = None) -> float | None:
    """One evaluation's dev score: the GLUE score of a GLUE task, else the score it logged.

    Args:
        task: the GLUE task the cell ran, or None for other data.
        splits: metrics by eval split (the `holdout` split is never part of the score).
        logged: the score the run wrote for this evaluation.
    """
    if task in glue.TASKS:
        try:
            return float(glue.score(task, splits))
        except KeyError:
            return None
    if isinstance(logged, (int, float)) and not isinstance(logged, bool):
        return float(logged)
    dev = [m.get("accuracy") for s, m in splits.items() if s != HOLDOUT]
    return statistics.mean(dev) if dev and None not in dev else None


def official_metrics(splits: dict[str, dict]) -> dict[str, float]:
    """The dev metrics of one evaluation, flat: `accuracy`, MNLI's `matched_accuracy`, ...
    (no loss, no combined score, no holdout split)."""
    out = {}
    for split, metrics in splits.items():
        if split == HOLDOUT or not isinstance(metrics, dict):
            continue
        prefix = "" if split == "validation" else split.removeprefix("validation_") + "_"
        for name, value in metrics.items():
            if name not in ("eval_loss", "combined_score") and isinstance(value, (int, float)):
                out[prefix + name] = float(value)
    return out


def flat_to_splits(task: str | None, metrics: dict[str, float]) -> dict[str, dict]:
    """Earlier versions' flat metrics (MNLI's prefixed `validation_matched_...`) by split."""
    names = glue.TASKS[task].eval_splits if task in glue.TASKS else ()
    splits: dict[str, dict] = {}
    for key, value in metrics.items():
        split = next((s for s in names if key.startswith(s + "_")), "validation")
        splits.setdefault(split, {})[key.removeprefix(split + "_")] = value
    return splits


def _final_splits(results: dict, log: RunLog | None, task: str | None) -> dict[str, dict]:
    final = results.get("final") or {}
    if final and all(isinstance(v, dict) for v in final.values()):
        return final  # this version: metrics by split
    if final:
        return flat_to_splits(task, final)
    return log.evals[-1]["splits"] if log and log.evals else {}


def _head_group(log: RunLog) -> str | None:
    """The group whose LR the lr curve shows: `head`, else the first group the run declared."""
    lrs = log.train.lr
    order = [g for g in (log.start.get("groups") or {}) if g in lrs] or sorted(lrs)
    return "head" if "head" in lrs else next(iter(order), None)


def _finite_or_none(values: list[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]


def build_cell_record(cell_dir: Path, row: str, task: str, seed: Any, **extra) -> dict:
    """The compact record of one finished cell (what cell.json holds).

    Args:
        cell_dir: the cell's folder, holding results.json and metrics.jsonl.
        row, task, seed: where the cell sits in the grid.
        **extra: stored as is (optimizer, glue_task, title, learning_rate, wall_time_s, command).

    Returns:
        Scores and official metrics (final and best), loss and LR curves, time, memory and
        optimizer-state bytes.
    """
    results = json.loads((cell_dir / RESULTS_FILE).read_text())
    recipe_path = cell_dir / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text()) if recipe_path.is_file() else {}
    optim = (recipe or {}).get("optim", {})
    glue_task = extra.get("glue_task", ((recipe or {}).get("data") or {}).get("glue_task"))
    try:
        log = read_log(cell_dir)
    except FileNotFoundError:
        log = None
    evals = [(e["step"], e["splits"], split_score(glue_task, e["splits"], e.get("score")))
             for e in (log.evals if log else [])]
    final_splits = _final_splits(results, log, glue_task)
    final = results["score"] if "score" in results else split_score(glue_task, final_splits)
    scored = [e for e in evals if e[2] is not None]
    best = max(scored, key=lambda e: e[2], default=None)
    train = log.train if log else None
    group = _head_group(log) if log else None
    record = {
        "row": row, "task": task, "seed": seed, "status": results.get("status"),
        "optim": {k: optim.get(k) for k in ("name", "learning_rate", "weight_decay",
                                            "adam_beta1", "adam_beta2")},
        "score": {"final": final, "best": best[2] if best else final,
                  "best_step": best[0] if best else results.get("step"),
                  "holdout": results.get("holdout_score")},
        "metrics": {"final": official_metrics(final_splits),
                    "best": official_metrics(best[1]) if best else {}},
        "evaluations": len(evals), "steps": results.get("step"),
        "train_time_s": results.get("train_time_s"), "wall_time_s": None,
        "samples_per_s": results.get("samples_per_s"),
        "peak_memory_bytes": results.get("peak_memory_bytes"),
        "optimizer_state_bytes": results.get("optimizer_state_bytes"),
        "loss_curve": {"step": list(train.step) if train else [],
                       "loss": _finite_or_none(train.loss) if train else []},
        "lr_curve": {"group": group, "step": list(train.step) if train else [],
                     "lr": _finite_or_none(train.lr[group]) if group else []},
    }
    record.update(extra)
    return record


def write_cell_record(cell_dir: Path, row: str, task: str, seed: Any, **extra) -> dict:
    """Build the record and write it to the cell's cell.json (one key a line: curves stay
    compact, the rest readable)."""
    record = build_cell_record(cell_dir, row, task, seed, **extra)
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()]
    (cell_dir / CELL_FILE).write_text("{\n" + ",\n".join(lines) + "\n}\n")
    return record


def is_finished(cell_dir: Path) -> bool:
    """Whether the cell's results.json exists with a finished status (completed or diverged)."""
    try:
        return json.loads((cell_dir / RESULTS_FILE).read_text()).get("status") in FINISHED
    except (OSError, ValueError, AttributeError):
        return False


def load_cell(cell_dir: Path, **meta) -> dict | None:
    """A finished cell's record: cell.json, rebuilt from the run's files when missing or unreadable.

    Args:
        cell_dir: the cell's folder (`<row>/<task>/seed<seed>`).
        **meta: what the rebuilt record stores besides (optimizer, title, glue_task, ...).

    Returns:
        The record, or None when the cell has not finished.
    """
    if not is_finished(cell_dir):
        return None
    path = cell_dir / CELL_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    seed = cell_dir.name.removeprefix("seed")
    args = (cell_dir, cell_dir.parent.parent.name, cell_dir.parent.name,
            int(seed) if seed.isdigit() else seed)
    if claim_path(cell_dir).exists():  # its worker is about to write the full record: read only
        return build_cell_record(*args, **meta)
    return write_cell_record(*args, **meta)


def task_score(task: str, metrics: dict[str, float]) -> float | None:
    """A GLUE task's score (0..1) from one evaluation's flat metrics, as earlier lrft versions
    logged them (MNLI's keys prefixed `validation_matched_`/`validation_mismatched_`); None
    when a metric is missing."""
    return split_score(task, flat_to_splits(task, metrics))
