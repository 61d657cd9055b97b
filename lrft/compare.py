"""`lrft compare`: optimizers x GLUE tasks x seeds (x LRs), aggregated into tables and plots.

A comparison recipe (``recipes/glue/compare-*.yaml``) names a training recipe (`base:`), the
optimizers with their settings, the tasks and the seeds. It expands into a grid of *cells*, one
training run each, in ``OUTPUT_DIR/<optimizer>[-lr<lr>]/<task>/seed<seed>/``:

    load comparison -> plan (validate every cell's recipe) -> run cells -> cell records
                    -> aggregate -> results.{md,csv,json}, loss.png, lr.png, scores.png

Design decisions:

- **Every cell runs in a fresh child process**: ``python -m lrft.cli train BASE overrides...``, or
  ``accelerate launch lrft/train.py BASE overrides...`` when a launcher is set. Peak memory
  (``ru_maxrss`` on CPU) is a per-process high-water mark that never goes down, so in-process runs
  would report the largest cell so far for every later cell; a child process also isolates
  library caches and crashes. The parent stays light (it never imports torch): on Linux a child
  inherits its parent's high-water mark at spawn, which must stay below the child's own.
- **A cell is the base recipe plus overrides**, in this order: the comparison's `overrides`, the
  optimizer's `optim.*` settings, `task_overrides[task]`, `section.key=value` overrides from the
  command line, the LR of the LR axis, then the cell's own task, seed and output folder. Each cell's
  ``cell.json`` keeps the exact ``lrft train`` command that reproduces it.
- **Resume**: a cell whose ``results.json`` exists (status completed, or diverged: the guard
  stopped it, a result too) is skipped. A folder without ``results.json`` is an interrupted cell:
  it resumes from its latest complete checkpoint if it has one, else its folder is deleted and the
  cell runs from scratch. A failed cell stops the comparison (the error is usually systematic: a
  data path, memory); rerunning the command resumes from that cell.
- **Scores** are GLUE scores on the validation split, 0..1 in records and x100 in tables:
  `lrft.metrics.glue_score` per task, and for MNLI the mean of matched and mismatched accuracy.
  ``final`` is the last evaluation, ``best`` the best evaluation of the run (an oracle checkpoint
  pick on the validation set). Spread is the sample standard deviation (ddof=1) over seeds.

Paths: `base:` is relative to the comparison file; `output_dir`, the launcher's `config_file` and
the training recipe's own paths (`data.path`) are relative to the working directory, as for
``lrft train``: run from the repository root.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# lrft.recipe's own conversion and suggestion helpers: one validator, the same messages.
from lrft.recipe import (OPTIMIZERS, SECTIONS, OptimConfig, RecipeError, _Bad, _build_section,
                         _convert, _read_yaml, _show, _suggest, _type_name, load_recipe)

# The nine GLUE tasks: the metric configs minus MNLI's two split-specific ones (lrft.metrics
# imports only numpy; lrft.data, which also lists them, would pull torch into this process).
GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
TASK_TITLES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP",
               "mnli": "MNLI", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
# Keys each cell sets itself; an override of them would make cells collide or lie about their seed.
CELL_KEYS = ("data.glue_task", "train.seed", "train.output_dir", "train.overwrite_output_dir",
             "train.resume_from_checkpoint")
FINISHED = ("completed", "diverged")  # results.json statuses that count as a finished cell
PLAN_FILE, CELL_FILE, LOG_FILE = "comparison.json", "cell.json", "train.log"
_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.]*")


# --------------------------------------------------------------------------------------------
# The comparison recipe
# --------------------------------------------------------------------------------------------

@dataclass
class LauncherConfig:
    config_file: str | None = None  # e.g. accelerate_configs/multi_gpu_8xa100.yaml
    num_processes: int | None = None


@dataclass
class Comparison:
    base: str = ""  # the training recipe every cell starts from, relative to this file
    output_dir: str = "runs/compare"
    tasks: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [42])
    optimizers: dict[str, Any] = field(default_factory=dict)  # label -> {optim.* keys}
    # LR axis: a list of multipliers of each optimizer's own LR, or {label: [absolute LRs]}.
    learning_rates: list[float] | dict[str, Any] | None = None
    launcher: LauncherConfig | None = None  # None: `python -m lrft.cli train` per cell
    overrides: list[str] = field(default_factory=list)  # section.key=value, every cell
    task_overrides: dict[str, Any] = field(default_factory=dict)  # task -> [section.key=value]
    keep_models: bool = False  # keep each cell's saved weights (bert-base: 440 MB a cell)
    source: str | None = field(default=None, repr=False, compare=False)


_FIELDS = [f.name for f in dataclasses.fields(Comparison) if f.name != "source"]


@dataclass
class Cell:
    """One training run of the grid."""

    row: str  # table row: the optimizer label, with -lr<lr> on an LR axis
    optimizer: str  # the optimizer label in the comparison recipe
    task: str
    seed: int
    dir: Path
    base: Path
    overrides: list[str]
    learning_rate: float | None = None

    @property
    def name(self) -> str:
        return f"{self.row}/{self.task}/seed{self.seed}"

    def command(self, extra: tuple[str, ...] = ()) -> list[str]:
        """The `lrft train` command line that reproduces the cell."""
        return ["lrft", "train", _shown_path(self.base), *self.overrides, *extra]


@dataclass
class Plan:
    comparison: Comparison
    cells: list[Cell]
    rows: list[str]


def _shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it, else absolute."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _yaml_value(value: Any) -> str:
    """A value as override text that reads back as the same YAML value (5e-05 -> 5.0e-05)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else None
    except (yaml.YAMLError, RecursionError):
        return text


def _apply_comparison_overrides(raw: dict, overrides: list[str], problems: list[str]) -> list[str]:
    """Apply `key=value` overrides of comparison keys to `raw`; return the section.key ones.

    `tasks=[rte,mrpc]` and `tasks=rte,mrpc` both give a list; `optimizers=[adamw,lion]` keeps a
    subset of the optimizers; `optimizers.lion.learning_rate=3e-6` and `launcher.num_processes=2`
    set one nested key; `section.key=value` goes to every cell's training recipe.
    """
    cell_overrides = []
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.strip()
        head, _, rest = key.partition(".")
        if not eq or not key:
            problems.append(f"override {item!r}: expected key=value, e.g. tasks=[rte,mrpc] or "
                            f"optim.weight_decay=0.1")
        elif head in SECTIONS:
            cell_overrides.append(item)
        elif head not in _FIELDS:
            problems.append(f"override {item!r}: unknown key '{head}'; "
                            f"{_suggest(head, [*_FIELDS, *SECTIONS])}")
        elif not rest:
            value = _parse_value(text)
            if head in ("tasks", "seeds") and isinstance(value, str) and "," in value:
                value = [_parse_value(v) for v in value.split(",") if v.strip()]
            elif head in ("tasks", "seeds") and isinstance(value, (str, int)):
                value = [value]  # seeds=1, tasks=rte
            if head == "optimizers" and isinstance(value, (list, str)):
                value = _select_optimizers(raw.get("optimizers"), value, problems)
            raw[head] = value
        elif head in ("optimizers", "launcher", "task_overrides"):
            _set_nested(raw, head, rest, _parse_value(text), item, problems)
        else:
            problems.append(f"override {item!r}: '{head}' has no sub-keys; use {head}=VALUE")
    return cell_overrides


def _select_optimizers(current: Any, names: list | str, problems: list[str]) -> Any:
    names = [names] if isinstance(names, str) else names
    if not isinstance(current, dict):
        return current
    for name in names:
        if name not in current:
            problems.append(f"optimizers: no optimizer {name!r} in this comparison; "
                            f"{_suggest(str(name), list(current)).replace('valid keys', 'it has')}")
    return {k: v for k, v in current.items() if k in names}


def _set_nested(raw: dict, head: str, rest: str, value: Any, item: str, problems: list[str]):
    parts = rest.split(".")
    container = raw.get(head)
    if container is None:
        container = {}
    if not isinstance(container, dict):
        problems.append(f"override {item!r}: {head} is not a mapping")
        return
    container = raw[head] = dict(container)
    if head == "optimizers":
        if len(parts) != 2:
            problems.append(f"override {item!r}: expected optimizers.LABEL.KEY=VALUE, e.g. "
                            f"optimizers.lion.learning_rate=3e-6")
            return
        label, key = parts
        if label not in container:
            problems.append(f"override {item!r}: no optimizer {label!r} in this comparison; "
                            f"{_suggest(label, list(container))}")
            return
        entry = container[label]
        container[label] = {**(entry if isinstance(entry, dict) else {}), key: value}
    elif len(parts) == 1:
        container[parts[0]] = value
    else:
        problems.append(f"override {item!r}: expected {head}.KEY=VALUE")


def _comparison_from_dict(raw: dict, problems: list[str], source: str) -> Comparison:
    """Typed conversion with lrft.recipe's helpers: unknown keys and wrong types are problems."""
    hints = typing.get_type_hints(Comparison)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _FIELDS:
            problems.append(f"{key}: unknown key; {_suggest(str(key), _FIELDS)}")
        elif key == "launcher":
            kwargs[key] = None if value is None else _build_section(
                LauncherConfig, value, "launcher", problems)
        else:
            try:
                kwargs[key] = _convert(value, hints[key])
            except _Bad:
                problems.append(f"{key}: expected {_type_name(hints[key])}, got {_show(value)}")
    return Comparison(**kwargs, source=source)


def _check_override_list(where: str, items: list[str], problems: list[str]) -> None:
    for item in items:
        key = item.partition("=")[0].strip()
        if key in CELL_KEYS:
            hint = {"data.glue_task": "tasks: [...]", "train.seed": "seeds: [...]",
                    "train.output_dir": "output_dir:"}.get(key, "nothing: the comparison resumes "
                                                               "interrupted cells itself")
            problems.append(f"{where}: {key} is set per cell by the comparison; use {hint}")


def _validate(c: Comparison, cli_cell_overrides: list[str]) -> list[str]:
    """Problems of the comparison itself (each cell's training recipe is checked in `plan`)."""
    p: list[str] = []
    if not c.base:
        p.append("base: missing; name the training recipe every cell starts from, "
                 "e.g. base: ../bert/standard.yaml")
    if not c.output_dir:
        p.append("output_dir: missing; e.g. runs/compare-optimizers")
    if not c.tasks:
        p.append(f"tasks: empty; name GLUE tasks, e.g. [rte, mrpc] (all: {', '.join(GLUE_TASKS)})")
    for task in c.tasks:
        if task not in GLUE_TASKS:
            p.append(f"tasks: unknown GLUE task {task!r}; "
                     f"{_suggest(task, GLUE_TASKS).replace('valid keys', 'choose from')}")
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
    p += _validate_learning_rates(c)
    if c.launcher is not None:
        if c.launcher.config_file and not Path(c.launcher.config_file).is_file():
            p.append(f"launcher.config_file: {c.launcher.config_file} does not exist (relative "
                     f"to the working directory {Path.cwd()}); e.g. "
                     f"accelerate_configs/single_gpu.yaml")
        if c.launcher.num_processes is not None and c.launcher.num_processes < 1:
            p.append(f"launcher.num_processes: {c.launcher.num_processes} must be >= 1")
    for task, items in c.task_overrides.items():
        if task not in GLUE_TASKS:
            p.append(f"task_overrides.{task}: unknown GLUE task; {_suggest(task, GLUE_TASKS)}")
        try:
            _convert(items, list[str])
        except _Bad:
            p.append(f"task_overrides.{task}: expected a list of section.key=value, got "
                     f"{_show(items)}")
            continue
        _check_override_list(f"task_overrides.{task}", _convert(items, list[str]), p)
    _check_override_list("overrides", c.overrides, p)
    _check_override_list("command-line override", cli_cell_overrides, p)
    return p


def _validate_optimizer(label: str, settings: Any) -> list[str]:
    p: list[str] = []
    if not isinstance(label, str) or not _LABEL_RE.fullmatch(label):
        p.append(f"optimizers.{label}: a label names folders; use letters, digits, _ and .")
    if settings is None:
        settings = {}
    problems: list[str] = []
    _build_section(OptimConfig, settings, f"optimizers.{label}", problems)
    p += problems
    named = isinstance(settings, dict) and "name" in settings
    name = settings["name"] if named else label
    if isinstance(name, str) and name not in OPTIMIZERS and not problems:
        why = "" if named else " (the label is the name when name: is unset)"
        p.append(f"optimizers.{label}.name: unknown optimizer {name!r}{why}; "
                 f"{_suggest(name, OPTIMIZERS).replace('valid keys', 'choose from')}")
    return p


def _validate_learning_rates(c: Comparison) -> list[str]:
    lrs = c.learning_rates
    if lrs is None:
        return []
    if isinstance(lrs, list):
        if not lrs:
            return ["learning_rates: empty list; give multipliers such as [0.5, 1, 2], or null"]
        return [f"learning_rates: multiplier {m} must be > 0" for m in lrs if not m > 0]
    p = []
    for label, values in lrs.items():
        if label not in c.optimizers:
            p.append(f"learning_rates.{label}: no such optimizer; "
                     f"{_suggest(str(label), list(c.optimizers))}")
        try:
            values = _convert(values, list[float])
        except _Bad:
            p.append(f"learning_rates.{label}: expected a list of learning rates, got "
                     f"{_show(values)}")
            continue
        p += [f"learning_rates.{label}: {v} must be in (0, 1]" for v in values if not 0 < v <= 1]
    return p


def load_comparison(path: str | Path, overrides: list[str] | None = None
                    ) -> tuple[Comparison, list[str]]:
    """Read, override and validate a comparison recipe (not yet its cells).

    Args:
        path: the comparison YAML file.
        overrides: `key=value` strings: comparison keys (`tasks=[rte,mrpc]`,
            `optimizers.lion.learning_rate=3e-6`) or training-recipe keys (`train.max_steps=10`).

    Returns:
        The comparison, and the `section.key=value` overrides meant for every cell.

    Raises:
        RecipeError: every problem at once, unknown keys with a did-you-mean.
    """
    problems: list[str] = []
    raw = _read_yaml(Path(path), problems)
    if raw is None:
        raise RecipeError(problems, str(path))
    cell_overrides = _apply_comparison_overrides(raw, list(overrides or []), problems)
    typed: list[str] = []
    comparison = _comparison_from_dict(raw, typed, str(path))
    # A key that failed conversion holds its default now: skip the rules about it.
    bad = tuple(f"{msg.split(':')[0].split('.')[0]}{end}" for msg in typed for end in ":.")
    problems += typed + [msg for msg in _validate(comparison, cell_overrides)
                         if not msg.startswith(bad)]
    if problems:
        raise RecipeError(problems, str(path))
    return comparison, cell_overrides


# --------------------------------------------------------------------------------------------
# The plan: the grid of cells, each a validated training recipe
# --------------------------------------------------------------------------------------------

def _optimizer_overrides(label: str, settings: dict | None) -> list[str]:
    settings = {"name": label, **(settings or {})}
    return [f"optim.{k}={_yaml_value(v)}" for k, v in settings.items()]


def _lr_axis(c: Comparison, label: str, base_lr: float) -> list[float | None]:
    if c.learning_rates is None:
        return [None]
    if isinstance(c.learning_rates, list):
        return [float(f"{base_lr * m:.4g}") for m in c.learning_rates]
    values = c.learning_rates.get(label)
    return [float(v) for v in _convert(values, list[float])] if values else [base_lr]


def _row_label(label: str, lr: float | None) -> str:
    return label if lr is None else f"{label}-lr{lr:.3g}"


def plan(path: str | Path, overrides: list[str] | None = None) -> Plan:
    """Expand a comparison recipe into its cells and validate every cell's training recipe.

    Nothing is trained. Rows are ordered optimizer by optimizer (then LR), cells row by row,
    then task, then seed.

    Raises:
        RecipeError: problems of the comparison or of any cell (each shown once, with the cells
            it occurs in).
    """
    c, cli_cell_overrides = load_comparison(path, overrides)
    base = (Path(path).resolve().parent / c.base).resolve()
    cells: list[Cell] = []
    found: dict[str, list[str]] = {}
    for label, settings in c.optimizers.items():
        for task in c.tasks:
            common = [*c.overrides, *_optimizer_overrides(label, settings),
                      *c.task_overrides.get(task, []), *cli_cell_overrides]
            for seed in c.seeds:
                _plan_seed(c, base, label, task, seed, common, cells, found)
    if found:
        total = len(c.optimizers) * len(c.tasks) * len(c.seeds)
        problems = [msg + _where(names, total) for msg, names in found.items()]
        raise RecipeError(problems, str(path))
    rows = list(dict.fromkeys(cell.row for cell in cells))
    return Plan(c, cells, rows)


def _plan_seed(c: Comparison, base: Path, label: str, task: str, seed: int, common: list[str],
               cells: list[Cell], found: dict[str, list[str]]) -> None:
    """Add the cells of one (optimizer, task, seed), one per LR of the LR axis."""
    ident = [f"data.glue_task={task}", f"train.seed={seed}"]
    probe = f"{label}/{task}/seed{seed}"
    try:
        recipe = load_recipe(base, [*common, *ident, "train.output_dir=probe"])
    except RecipeError as e:
        for msg in e.problems:
            found.setdefault(msg, []).append(probe)
        return
    for lr in _lr_axis(c, label, recipe.optim.learning_rate):
        row = _row_label(label, lr)
        out = Path(c.output_dir) / row / task / f"seed{seed}"
        lr_override = [] if lr is None else [f"optim.learning_rate={_yaml_value(lr)}"]
        cell_overrides = [*common, *lr_override, *ident, f"train.output_dir={out.as_posix()}"]
        try:
            if lr is not None:
                load_recipe(base, cell_overrides)
        except RecipeError as e:
            for msg in e.problems:
                found.setdefault(msg, []).append(f"{row}/{task}/seed{seed}")
            continue
        cells.append(Cell(row, label, task, seed, out, base, cell_overrides, lr))


def _where(names: list[str], total: int) -> str:
    if len(names) >= total:
        return " (every cell)"
    shown = ", ".join(names[:3])
    return f" (cells {shown}{f', +{len(names) - 3} more' if len(names) > 3 else ''})"


# --------------------------------------------------------------------------------------------
# Running the cells
# --------------------------------------------------------------------------------------------

def cell_state(cell_dir: Path) -> str:
    """`finished` (results.json with a finished status), `partial` (a folder without one), `new`."""
    results = cell_dir / "results.json"
    if results.is_file():
        try:
            if json.loads(results.read_text()).get("status") in FINISHED:
                return "finished"
        except (OSError, ValueError):
            pass
        return "partial"
    return "partial" if cell_dir.exists() else "new"


def _child_command(cell: Cell, launcher: LauncherConfig | None, extra: list[str]) -> list[str]:
    base = _shown_path(cell.base)
    if launcher is None:
        return [sys.executable, "-m", "lrft.cli", "train", base, *cell.overrides, *extra]
    from lrft.cli import TRAIN_SCRIPT

    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if launcher.config_file:
        cmd += ["--config_file", launcher.config_file]
    if launcher.num_processes:
        cmd += ["--num_processes", str(launcher.num_processes)]
    return [*cmd, str(TRAIN_SCRIPT), base, *cell.overrides, *extra]


def _run_process(cmd: list[str], log_path: Path) -> int:
    """Run one cell's training process, its output appended to the cell's train.log."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with log_path.open("a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _resume_args(cell_dir: Path) -> tuple[list[str], str]:
    """Extra overrides and a word for how the cell starts: resume its checkpoint or start clean.

    The folder of an interrupted cell without a complete checkpoint is deleted here rather than
    with train.overwrite_output_dir, so the train.log opened below survives.
    """
    checkpoints = sorted(
        (int(d.name.split("-")[1]), d) for d in cell_dir.glob("checkpoint-*")
        if d.is_dir() and d.name.split("-")[1].isdigit() and (d / "lrft_state.json").is_file())
    if checkpoints:
        return ["train.resume_from_checkpoint=latest"], f"resuming from {checkpoints[-1][1].name}"
    if cell_dir.exists():
        shutil.rmtree(cell_dir)
        return [], "restarting (interrupted, no checkpoint)"
    return [], "starting"


def _fmt_duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    kept = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(f"    {ln}" for ln in kept[-lines:])


def run_comparison(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Run every unfinished cell of a comparison, one after another, then write the report.

    Args:
        path: the comparison recipe.
        overrides: `key=value` overrides (see `load_comparison`).

    Returns:
        The aggregate (as in results.json), plus `failed`: the cell that failed, or None.

    Raises:
        RecipeError: the comparison or a cell's recipe is invalid (before any training).
    """
    p = plan(path, overrides)
    out = Path(p.comparison.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_plan_file(p, path, overrides)
    states = {cell.name: cell_state(cell.dir) for cell in p.cells}
    skipped = [c.name for c in p.cells if states[c.name] == "finished"]
    todo = [c for c in p.cells if states[c.name] != "finished"]
    print(f"lrft compare: {len(p.cells)} cells ({len(p.rows)} rows x {len(p.comparison.tasks)} "
          f"tasks x {len(p.comparison.seeds)} seeds) in {out}; {len(todo)} to run", flush=True)
    if skipped:
        print(f"skipping {len(skipped)} finished cell(s): {', '.join(skipped)}", flush=True)
    failed = None
    durations: list[float] = []
    t_all = time.perf_counter()
    index = {c.name: i + 1 for i, c in enumerate(p.cells)}
    for k, cell in enumerate(todo):
        extra, how = _resume_args(cell.dir)
        cell.dir.mkdir(parents=True, exist_ok=True)
        print(f"[cell {index[cell.name]}/{len(p.cells)}] {cell.name}: {how} "
              f"(log: {cell.dir / LOG_FILE})", flush=True)
        t0 = time.perf_counter()
        code = _run_process(_child_command(cell, p.comparison.launcher, extra), cell.dir / LOG_FILE)
        wall = time.perf_counter() - t0
        if code != 0 or cell_state(cell.dir) != "finished":
            failed = cell.name
            print(f"[cell {index[cell.name]}/{len(p.cells)}] {cell.name}: FAILED (exit {code}) "
                  f"after {_fmt_duration(wall)}; last lines of {cell.dir / LOG_FILE}:\n"
                  f"{_log_tail(cell.dir / LOG_FILE)}\n"
                  f"reproduce: {shlex.join(cell.command(tuple(extra)))}\n"
                  f"rerun the comparison to resume from this cell", flush=True)
            break
        durations.append(wall)
        record = write_cell_record(cell.dir, cell.row, cell.task, cell.seed, wall_time_s=wall,
                                   command=cell.command(), optimizer=cell.optimizer)
        _clean_cell(cell.dir, p.comparison.keep_models)
        left = len(todo) - k - 1
        eta = f"; ETA {_fmt_duration(statistics.mean(durations) * left)} for {left} more" \
            if left else ""
        print(f"[cell {index[cell.name]}/{len(p.cells)}] {cell.name}: done in "
              f"{_fmt_duration(wall)}: {_cell_summary(record)}{eta}", flush=True)
    if todo and failed is None:
        print(f"trained {len(todo)} cell(s) in {_fmt_duration(time.perf_counter() - t_all)}",
              flush=True)
    cells = [c for c in (_load_cell(cell.dir) for cell in p.cells) if c is not None]
    summary = _write_report(out, cells, p.comparison.tasks, p.rows)
    summary["failed"] = failed
    return summary


def _write_plan_file(p: Plan, path: str | Path, overrides: list[str] | None) -> None:
    c = p.comparison
    data = {"source": str(path), "overrides": list(overrides or []), "tasks": c.tasks,
            "seeds": c.seeds, "rows": p.rows,
            "cells": [{"name": cell.name, "dir": cell.dir.as_posix(),
                       "command": shlex.join(cell.command())} for cell in p.cells]}
    (Path(c.output_dir) / PLAN_FILE).write_text(json.dumps(data, indent=2))


def _clean_cell(cell_dir: Path, keep_models: bool) -> None:
    """Drop what only served the run: checkpoints (resume), and weights unless kept."""
    for ckpt in cell_dir.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)
    if not keep_models:
        for weights in [*cell_dir.glob("*.safetensors"), *cell_dir.glob("*.bin"),
                        *cell_dir.glob("*.safetensors.index.json")]:
            weights.unlink(missing_ok=True)


def _cell_summary(record: dict) -> str:
    score = record["score"]["final"]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in record["metrics"]["final"].items())
    losses = [v for v in record["loss_curve"]["loss"] if v is not None and not math.isnan(v)]
    first, last = (losses[0], losses[-1]) if losses else (math.nan, math.nan)
    return (f"score {score * 100:.1f} ({shown}); loss {first:.3f} -> {last:.3f}; "
            f"{record['samples_per_s']:.1f} samples/s" if score is not None else
            f"no score (status {record['status']})")


# --------------------------------------------------------------------------------------------
# Cell records: built from a finished cell's results.json, metrics.jsonl and recipe.yaml
# --------------------------------------------------------------------------------------------

def task_score(task: str, metrics: dict[str, float]) -> float | None:
    """The task's GLUE score from one evaluation's metrics (0..1); None when missing.

    MNLI evaluates two splits (keys prefixed `validation_matched_`/`validation_mismatched_`);
    its score is the mean of the two accuracies, the GLUE rule for a task with several numbers.
    """
    from lrft.metrics import glue_score

    try:
        if task == "mnli":
            return statistics.mean(
                glue_score("mnli", _unprefixed(metrics, f"validation_{split}_"))
                for split in ("matched", "mismatched"))
        return float(glue_score(task, metrics))
    except KeyError:
        return None


def _unprefixed(metrics: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}


def official_metrics(task: str, metrics: dict[str, float]) -> dict[str, float]:
    """The task's official GLUE metric(s) from one evaluation (no loss, no combined score)."""
    out = {}
    for key, value in metrics.items():
        name = key.removeprefix("validation_")
        if name.endswith(("eval_loss", "combined_score")):
            continue
        out[name] = float(value)
    return out


def _read_metrics_log(path: Path) -> tuple[dict[int, dict], list[dict]]:
    """Train records by step (a resumed run re-logs steps: the later line wins) and eval records."""
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    if not path.is_file():
        return {}, []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if record.get("kind") == "train":
            train[int(record["step"])] = record
        elif record.get("kind") == "eval":
            evals[int(record["step"])] = record
    return dict(sorted(train.items())), [evals[s] for s in sorted(evals)]


def _head_group(lrs: dict[str, float]) -> str:
    return "head" if "head" in lrs else next(iter(lrs))


def build_cell_record(cell_dir: Path, row: str, task: str, seed: int, **extra) -> dict:
    """The compact record of one finished cell (what cell.json holds).

    Args:
        cell_dir: the cell's output folder, holding results.json and metrics.jsonl.
        row, task, seed: where the cell sits in the grid.
        **extra: stored as is (wall_time_s, command, optimizer).

    Returns:
        Scores and official metrics (final and best), loss and LR curves, time, memory and
        optimizer-state bytes.
    """
    results = json.loads((cell_dir / "results.json").read_text())
    recipe_path = cell_dir / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text()) if recipe_path.is_file() else {}
    optim = (recipe or {}).get("optim", {})
    train, evals = _read_metrics_log(cell_dir / "metrics.jsonl")
    final = results.get("final") or {}
    best_eval = max((e for e in evals if task_score(task, e["metrics"]) is not None),
                    key=lambda e: task_score(task, e["metrics"]), default=None)
    best = best_eval["metrics"] if best_eval else final
    group = _head_group(next(iter(train.values()))["lr"]) if train else None
    record = {
        "row": row, "task": task, "seed": seed, "status": results.get("status"),
        "optim": {k: optim.get(k) for k in ("name", "learning_rate", "weight_decay",
                                            "adam_beta1", "adam_beta2")},
        "score": {"final": task_score(task, final), "best": task_score(task, best),
                  "best_step": best_eval["step"] if best_eval else results.get("step")},
        "metrics": {"final": official_metrics(task, final), "best": official_metrics(task, best)},
        "evaluations": len(evals), "steps": results.get("step"),
        "train_time_s": results.get("train_time_s"), "wall_time_s": None,
        "samples_per_s": results.get("samples_per_s"),
        "peak_memory_bytes": results.get("peak_memory_bytes"),
        "optimizer_state_bytes": results.get("optimizer_state_bytes"),
        "loss_curve": {"step": list(train), "loss": [r["loss"] for r in train.values()]},
        "lr_curve": {"group": group, "step": list(train),
                     "lr": [r["lr"].get(group) for r in train.values()]},
    }
    record.update(extra)
    return record


def write_cell_record(cell_dir: Path, row: str, task: str, seed: int, **extra) -> dict:
    record = build_cell_record(cell_dir, row, task, seed, **extra)
    # One key a line, each value on one line: the curves stay compact, the rest readable.
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()]
    (cell_dir / CELL_FILE).write_text("{\n" + ",\n".join(lines) + "\n}\n")
    return record


def _load_cell(cell_dir: Path) -> dict | None:
    """A finished cell's record: cell.json, rebuilt from the run's files when missing."""
    if cell_state(cell_dir) != "finished":
        return None
    path = cell_dir / CELL_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    seed = cell_dir.name.removeprefix("seed")
    return write_cell_record(cell_dir, cell_dir.parent.parent.name, cell_dir.parent.name,
                             int(seed) if seed.isdigit() else seed)


# --------------------------------------------------------------------------------------------
# Aggregation: one row per optimizer (x LR)
# --------------------------------------------------------------------------------------------

def mean_std(values: list[float]) -> dict:
    """{"n", "mean", "std"}: std is the sample standard deviation (ddof=1), None for n < 2."""
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "mean": None, "std": None}
    return {"n": len(values), "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None}


def aggregate(cells: list[dict], tasks: list[str] | None = None,
              rows: list[str] | None = None) -> dict:
    """Mean +- std over seeds, per row and task; the GLUE average; the best row per task.

    Args:
        cells: cell records (see `build_cell_record`).
        tasks, rows: column and row order; default: as first seen in `cells`.

    Returns:
        {"tasks", "rows": [{"row", "optimizer", "tasks": {task: {"score", "best_score",
        "metrics", "is_best"}}, "glue_avg", "is_best_avg", "train_time_s", ...}], "best": {task:
        [rows]}}. The GLUE average is taken per seed over the tasks (seeds that finished every
        task), then mean +- std over those seeds.
    """
    tasks = list(tasks or dict.fromkeys(c["task"] for c in cells))
    rows = list(rows or dict.fromkeys(c["row"] for c in cells))
    rows += [r for r in dict.fromkeys(c["row"] for c in cells) if r not in rows]
    out_rows = []
    for row in rows:
        mine = [c for c in cells if c["row"] == row and c["task"] in tasks]
        if not mine:
            continue
        out_rows.append(_aggregate_row(row, mine, tasks))
    best = {}
    for task in [*tasks, "glue_avg"]:
        means = {r["row"]: (r["glue_avg"] if task == "glue_avg" else r["tasks"][task]["score"])
                 ["mean"] for r in out_rows}
        top = max((m for m in means.values() if m is not None), default=None)
        best[task] = [row for row, m in means.items() if m is not None and m >= top - 1e-12]
        for r in out_rows:
            flag = r["row"] in best[task]
            if task == "glue_avg":
                r["is_best_avg"] = flag
            else:
                r["tasks"][task]["is_best"] = flag
    return {"tasks": tasks, "rows": out_rows, "best": best,
            "std": "sample standard deviation over seeds (ddof=1)"}


def _aggregate_row(row: str, cells: list[dict], tasks: list[str]) -> dict:
    per_task = {}
    for task in tasks:
        mine = sorted((c for c in cells if c["task"] == task), key=lambda c: str(c["seed"]))
        names = list(dict.fromkeys(k for c in mine for k in c["metrics"]["final"]))
        per_task[task] = {
            "score": mean_std([c["score"]["final"] for c in mine]),
            "best_score": mean_std([c["score"]["best"] for c in mine]),
            "metrics": {k: mean_std([c["metrics"]["final"].get(k) for c in mine]) for k in names},
            "seeds": [c["seed"] for c in mine],
            "diverged": sum(c["status"] == "diverged" for c in mine),
        }
    by_seed: dict[Any, dict[str, float]] = {}
    for c in cells:
        if c["score"]["final"] is not None:
            by_seed.setdefault(c["seed"], {})[c["task"]] = c["score"]["final"]
    complete = [statistics.mean(s[t] for t in tasks) for s in by_seed.values()
                if all(t in s for t in tasks)]
    first = cells[0]
    return {
        "row": row, "optimizer": first.get("optimizer", first["optim"].get("name")),
        "optim": first["optim"], "tasks": per_task, "glue_avg": mean_std(complete),
        "cells": len(cells),
        "train_time_s": sum(c.get("train_time_s") or 0.0 for c in cells),
        "wall_time_s": sum(c.get("wall_time_s") or 0.0 for c in cells),
        "samples_per_s": mean_std([c.get("samples_per_s") for c in cells])["mean"],
        "peak_memory_bytes": max((c.get("peak_memory_bytes") or 0 for c in cells), default=0),
        "optimizer_state_bytes": max((c.get("optimizer_state_bytes") or 0 for c in cells),
                                     default=0),
    }


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

def _pct(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    text = f"{stat['mean'] * 100:.1f}"
    return text + (f" ± {stat['std'] * 100:.1f}" if stat["std"] is not None else "")


def _mib(n: float) -> str:
    if n < 2**20:
        return f"{n / 2**10:,.0f} KiB"
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _lr_text(row: dict) -> str:
    return _num(row["optim"].get("learning_rate"))


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _seed_note(agg: dict) -> str:
    ns = {s["n"] for r in agg["rows"] for s in (t["score"] for t in r["tasks"].values())}
    if len(ns) > 1:
        return f"{min(ns)}-{max(ns)} seeds"
    return "1 seed" if ns == {1} else f"{max(ns)} seeds"


def format_markdown(agg: dict) -> str:
    """results.md: scores table, best-evaluation table (when runs evaluated more than once),
    official metrics per task, and a footer saying what the numbers are."""
    tasks = agg["tasks"]
    head = ["optimizer", "lr", "wd", *[TASK_TITLES.get(t, t) for t in tasks], "GLUE avg",
            "train time", "samples/s", "peak memory", "optimizer state"]
    lines = [f"## Validation scores (final checkpoint, x100; mean ± std over {_seed_note(agg)})",
             "", _md_row(head), _md_row(["---"] * len(head))]
    for r in agg["rows"]:
        cells = [_bold(_pct(r["tasks"][t]["score"]), r["tasks"][t].get("is_best")) for t in tasks]
        lines.append(_md_row([
            r["row"], _lr_text(r), _num(r["optim"].get("weight_decay")), *cells,
            _bold(_pct(r["glue_avg"]), r.get("is_best_avg")),
            _fmt_duration(r["train_time_s"]),
            f"{r['samples_per_s']:.1f}" if r["samples_per_s"] is not None else "-",
            _mib(r["peak_memory_bytes"]), _mib(r["optimizer_state_bytes"])]))
    multi = any(t["best_score"]["mean"] != t["score"]["mean"]
                for r in agg["rows"] for t in r["tasks"].values())
    if multi:
        lines += ["", "## Best evaluation of each run (x100; an oracle pick on the validation set)",
                  "", _md_row(["optimizer", *[TASK_TITLES.get(t, t) for t in tasks]]),
                  _md_row(["---"] * (len(tasks) + 1))]
        lines += [_md_row([r["row"], *[_pct(r["tasks"][t]["best_score"]) for t in tasks]])
                  for r in agg["rows"]]
    lines += ["", "## Official metrics (final checkpoint, x100)"]
    for t in tasks:
        names = list(dict.fromkeys(k for r in agg["rows"] for k in r["tasks"][t]["metrics"]))
        lines += ["", f"**{TASK_TITLES.get(t, t)}**", "", _md_row(["optimizer", *names]),
                  _md_row(["---"] * (len(names) + 1))]
        lines += [_md_row([r["row"], *[_pct(r["tasks"][t]["metrics"].get(n, mean_std([])))
                                       for n in names]]) for r in agg["rows"]]
    lines += ["", _footer(agg), ""]
    return "\n".join(lines)


def _footer(agg: dict) -> str:
    diverged = sum(t["diverged"] for r in agg["rows"] for t in r["tasks"].values())
    note = (f" {diverged} run(s) were stopped by the divergence guard; their last evaluation "
            f"counts." if diverged else "")
    return ("Scores are GLUE scores on the validation split x100: Matthews correlation for CoLA, "
            "the mean of F1 and accuracy for MRPC and QQP, of Pearson and Spearman for STS-B, of "
            "matched and mismatched accuracy for MNLI, accuracy otherwise. ± is the sample "
            "standard deviation (ddof=1) over seeds, left out with one seed. GLUE avg: the mean "
            "over the tasks run, per seed, then mean ± std over the seeds that finished every "
            "task. **Bold**: the best mean in its column. Train time: the sum over the row's "
            "cells (training loop only); samples/s: their mean; peak memory (process RSS on CPU, "
            "CUDA max allocated on GPU) and optimizer state: their maximum." + note)


def _bold(text: str, flag: bool | None) -> str:
    return f"**{text}**" if flag and text != "-" else text


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def format_csv(agg: dict) -> str:
    """results.csv: one row per optimizer (x LR); scores on a 0..1 scale; `best_in` lists the
    tasks (and glue_avg) where the row has the best mean."""
    tasks = agg["tasks"]
    metric_names = {t: list(dict.fromkeys(k for r in agg["rows"] for k in r["tasks"][t]["metrics"]))
                    for t in tasks}
    header = ["optimizer", "name", "learning_rate", "weight_decay"]
    for t in tasks:
        header += [f"{t}_mean", f"{t}_std", f"{t}_n", f"{t}_best_eval_mean"]
        header += [f"{t}_{m}_{s}" for m in metric_names[t] for s in ("mean", "std")]
    header += ["glue_avg_mean", "glue_avg_std", "glue_avg_n", "best_in", "train_time_s",
               "wall_time_s", "samples_per_s", "peak_memory_bytes", "optimizer_state_bytes"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in agg["rows"]:
        line = [r["row"], r["optim"].get("name"), r["optim"].get("learning_rate"),
                r["optim"].get("weight_decay")]
        for t in tasks:
            s = r["tasks"][t]
            line += [s["score"]["mean"], s["score"]["std"], s["score"]["n"],
                     s["best_score"]["mean"]]
            for m in metric_names[t]:
                stat = s["metrics"].get(m, mean_std([]))
                line += [stat["mean"], stat["std"]]
        best_in = [t for t in tasks if r["tasks"][t].get("is_best")]
        best_in += ["glue_avg"] if r.get("is_best_avg") else []
        line += [r["glue_avg"]["mean"], r["glue_avg"]["std"], r["glue_avg"]["n"],
                 ";".join(best_in), r["train_time_s"], r["wall_time_s"], r["samples_per_s"],
                 r["peak_memory_bytes"], r["optimizer_state_bytes"]]
        w.writerow(["" if v is None else v for v in line])
    return buf.getvalue()


def format_terminal(agg: dict) -> str:
    """The table printed at the end: scores x100, `*` marks the best mean per column."""
    tasks = agg["tasks"]
    head = ["optimizer", *[TASK_TITLES.get(t, t) for t in tasks], "GLUE avg", "time",
            "peak mem", "opt state"]
    body = []
    for r in agg["rows"]:
        body.append([r["row"],
                     *[_pct(r["tasks"][t]["score"]) + ("*" if r["tasks"][t].get("is_best")
                                                       else " ") for t in tasks],
                     _pct(r["glue_avg"]) + ("*" if r.get("is_best_avg") else " "),
                     _fmt_duration(r["train_time_s"]), _mib(r["peak_memory_bytes"]),
                     _mib(r["optimizer_state_bytes"])])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = [lambda s, w: s.ljust(w)] + [lambda s, w: s.rjust(w)] * (len(head) - 1)
    lines = ["  ".join(f(c, w) for f, c, w in zip(fmt, x, widths)).rstrip() for x in [head, *body]]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("scores x100 on the validation split (final checkpoint); ± = sample std "
                 "(ddof=1) over seeds; * = best mean")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas, imported only here)
# --------------------------------------------------------------------------------------------

# Rows that train alike (AdamW and 8-bit AdamW) draw on top of each other: dashes keep both seen.
_STYLES = ("-", "--", ":", "-.")


def _curve_stats(curves: list[tuple[list[int], list[float]]]):
    """Mean, min and max over seeds at each logged step (steps any seed logged)."""
    by_step: dict[int, list[float]] = {}
    for steps, values in curves:
        for s, v in zip(steps, values):
            if v is not None and not math.isnan(v):
                by_step.setdefault(s, []).append(v)
    steps = sorted(by_step)
    return (steps, [statistics.mean(by_step[s]) for s in steps],
            [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps])


def _figure(n_panels: int, width: float = 5.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained", dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def plot_loss(cells: list[dict], tasks: list[str], rows: list[str], path: Path) -> Path:
    """Training loss vs step, one panel per task: the mean over seeds, a band from min to max."""
    fig, axes = _figure(len(tasks))
    for ax, task in zip(axes, tasks):
        for i, row in enumerate(rows):
            mine = [c for c in cells if c["row"] == row and c["task"] == task]
            if not mine:
                continue
            steps, mean, lo, hi = _curve_stats(
                [(c["loss_curve"]["step"], c["loss_curve"]["loss"]) for c in mine])
            color = f"C{i % 10}"
            ax.plot(steps, mean, color=color, lw=1.6, ls=_STYLES[i % len(_STYLES)],
                    label=f"{row} (n={len(mine)})")
            if len(mine) > 1:
                ax.fill_between(steps, lo, hi, color=color, alpha=0.18, lw=0)
        ax.set(title=TASK_TITLES.get(task, task), xlabel="optimizer step", ylabel="training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Training loss: mean over seeds, band = min..max")
    fig.savefig(path)
    return path


def plot_lr(cells: list[dict], tasks: list[str], rows: list[str], path: Path) -> Path:
    """The LR of the head group (else the first group) vs step, per row, one panel per task."""
    fig, axes = _figure(len(tasks))
    for ax, task in zip(axes, tasks):
        for i, row in enumerate(rows):
            mine = [c for c in cells if c["row"] == row and c["task"] == task]
            if mine:
                curve = mine[0]["lr_curve"]
                ax.plot(curve["step"], curve["lr"], color=f"C{i % 10}", lw=1.6,
                        ls=_STYLES[i % len(_STYLES)], label=f"{row} ({curve['group']} group)")
        ax.set(title=TASK_TITLES.get(task, task), xlabel="optimizer step", ylabel="learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Learning rate vs step (the head group, else the first group)")
    fig.savefig(path)
    return path


def plot_scores(agg: dict, path: Path) -> Path:
    """Grouped bars: the mean score per task (and GLUE avg) per row, error bars = sample std."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [*agg["tasks"], "glue_avg"] if len(agg["tasks"]) > 1 else list(agg["tasks"])
    n = max(len(agg["rows"]), 1)
    fig = Figure(figsize=(max(5.0, 1.3 * len(groups) * (n / 3 + 0.7)), 4.0), layout="constrained",
                 dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / n
    for i, r in enumerate(agg["rows"]):
        stats = [r["glue_avg"] if g == "glue_avg" else r["tasks"][g]["score"] for g in groups]
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(groups))]
        means = [100 * s["mean"] if s["mean"] is not None else 0 for s in stats]
        errs = [100 * s["std"] if s["std"] is not None else 0 for s in stats]
        bars = ax.bar(xs, means, width, yerr=errs, capsize=3, color=f"C{i % 10}",
                      label=r["row"])
        ax.bar_label(bars, labels=[f"{m:.1f}" if s["mean"] is not None else ""
                                   for m, s in zip(means, stats)],
                     fontsize=7, padding=2, label_type="center")
    ax.set_xticks(range(len(groups)),
                  [TASK_TITLES.get(g, "GLUE avg" if g == "glue_avg" else g) for g in groups])
    values = [100 * s["mean"] for r in agg["rows"]
              for s in [r["glue_avg"], *[t["score"] for t in r["tasks"].values()]]
              if s["mean"] is not None]
    if values:
        ax.set_ylim(max(0.0, min(values) - 10), min(100.0, max(values) + 8))
    ax.set(ylabel="validation score x100", title="Scores: mean over seeds, error bar = sample std")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _write_report(out: Path, cells: list[dict], tasks: list[str] | None,
                  rows: list[str] | None) -> dict:
    if not cells:
        print(f"no finished cells in {out}: nothing to report", flush=True)
        return {"tasks": list(tasks or []), "rows": [], "best": {}, "files": []}
    agg = aggregate(cells, tasks, rows)
    tasks = agg["tasks"]
    rows = [r["row"] for r in agg["rows"]]
    (out / "results.md").write_text(format_markdown(agg))
    (out / "results.csv").write_text(format_csv(agg))
    (out / "results.json").write_text(json.dumps(agg, indent=1))
    used = [c for c in cells if c["task"] in tasks]
    files = [out / "results.md", out / "results.csv", out / "results.json",
             plot_loss(used, tasks, rows, out / "loss.png"),
             plot_lr(used, tasks, rows, out / "lr.png"),
             plot_scores(agg, out / "scores.png")]
    agg["files"] = [str(f) for f in files]
    print("\n" + format_terminal(agg), flush=True)
    print(f"\nwrote {', '.join(f.name for f in files)} to {out}", flush=True)
    return agg


def report(out_dir: str | Path) -> dict:
    """Rebuild results.{md,csv,json} and the plots from the finished cells under `out_dir`.

    No training. Row and task order come from the comparison.json the last run wrote, when there
    is one; cells found on disk but not in it are added after.

    Raises:
        FileNotFoundError: `out_dir` does not exist.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such comparison folder")
    rows = tasks = None
    plan_file = out / PLAN_FILE
    if plan_file.is_file():
        saved = json.loads(plan_file.read_text())
        rows, tasks = saved.get("rows"), saved.get("tasks")
    cells = [c for c in (_load_cell(d.parent) for d in sorted(out.glob("*/*/seed*/results.json")))
             if c is not None]
    found_tasks = list(dict.fromkeys(c["task"] for c in cells))
    tasks = [t for t in (tasks or []) if t in found_tasks] + \
        [t for t in found_tasks if t not in (tasks or [])]
    return _write_report(out, cells, tasks, rows)
