"""The plan: a comparison expanded into its cells, each a validated training recipe.

One cell is one training run: (optimizer, LR, task, seed), in its own folder
``OUTPUT_DIR/<row>/<task>/seed<seed>/``, where the row is the optimizer's label, with
``-lr<lr>`` when the comparison has an LR axis. A cell is the base recipe plus overrides, in
this order: the comparison's `overrides`, the task's data (a custom task's `data:`), the
optimizer's `optim.*` settings, `task_overrides[task]`, `section.key=value` overrides from the
command line, the cell's LR, then what the cell sets itself (task, seed, holdout, folder).

Each optimizer's LRs (the LR axis), around its *centre*: the optimizer's `learning_rate` when its
entry sets one, else the LR that matches the recipe's AdamW LR by the optimizer's published rule
(`lrft.presets.equivalent_lr`: Lion ~5.5x smaller, SGD ~300x larger):
- `lr_grid: {points, width}`: `points` LRs evenly spaced in log(LR) over centre x 10**±width;
- `learning_rates: [0.5, 1, 2]`: multipliers of the centre;
- `learning_rates: {lion: [1e-5, 3e-5]}`: one optimizer's LRs, as given.
Without an LR axis each optimizer runs once, at its centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lrft import glue
from lrft.compare.load import load_comparison
from lrft.compare.spec import Comparison
from lrft.config import convert
from lrft.errors import RecipeError
from lrft.presets import equivalent_lr
from lrft.recipe import DataConfig, load_recipe

# The data keys that say which rows a task has: a custom task's definition replaces all of them
# (a GLUE-wide `data.path` in `overrides` must not leak into a task read from files).
SOURCE_KEYS = ("glue_task", "path", "name", "train_files", "eval_files", "train_split",
               "eval_split", "eval_fraction", "where", "text_columns", "label_column")


@dataclass
class Cell:
    """One training run of the grid."""

    row: str  # table row: the optimizer label, with -lr<lr> on an LR axis
    optimizer: str  # the optimizer label in the comparison
    task: str
    seed: int
    dir: Path
    base: Path
    overrides: list[str]
    learning_rate: float | None = None  # the LR of the LR axis; None: the optimizer's centre
    title: str = ""

    @property
    def name(self) -> str:
        return f"{self.row}/{self.task}/seed{self.seed}"

    def command(self, extra: tuple[str, ...] = ()) -> list[str]:
        """The `lrft train` command line that reproduces the cell."""
        return ["lrft", "train", shown_path(self.base), *self.overrides, *extra]


@dataclass
class Plan:
    comparison: Comparison
    cells: list[Cell]
    rows: list[str]

    @property
    def titles(self) -> dict[str, str]:
        return {t: self.comparison.title(t) for t in self.comparison.tasks}


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it, else absolute."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def yaml_value(value: Any) -> str:
    """A value as override text that reads back as the same YAML value (5e-05 -> 5.0e-05)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def centre_lr(adamw_lr: float, optimizer: str) -> float:
    """The LR of `optimizer` that matches AdamW at `adamw_lr` by its published rule.

    The one call of the rule (`lrft.presets.equivalent_lr`); optimizers without a rule
    (adagrad, adafactor) keep `adamw_lr`.
    """
    try:
        return equivalent_lr(adamw_lr, optimizer)
    except ValueError:
        return adamw_lr


def grid_lrs(centre: float, points: int, width: float) -> list[float]:
    """`points` LRs evenly spaced in log(LR) over centre x 10**(-width .. +width), 3 digits."""
    if points == 1:
        return [float(f"{centre:.3g}")]
    exps = [-width + 2 * width * i / (points - 1) for i in range(points)]
    return [float(f"{centre * 10 ** e:.3g}") for e in exps]


def lr_axis(c: Comparison, label: str, centre: float) -> list[float | None]:
    """The LRs optimizer `label` runs at; [None] without an LR axis (it runs at its centre)."""
    lrs = c.learning_rates
    if isinstance(lrs, dict) and lrs.get(label):
        return [float(v) for v in convert(lrs[label], list[float])]
    if isinstance(lrs, list):
        return [float(f"{centre * m:.4g}") for m in lrs]
    if c.lr_grid is not None:
        return grid_lrs(centre, c.lr_grid.points, c.lr_grid.width)
    return [centre] if isinstance(lrs, dict) else [None]


def row_label(label: str, lr: float | None) -> str:
    return label if lr is None else f"{label}-lr{lr:.3g}"


def optimizer_overrides(label: str, settings: dict | None) -> list[str]:
    """An optimizer entry as cell overrides: its `optim.*` keys, and the `schedule.*` keys of its
    own `schedule:` mapping (an optimizer that needs another schedule, e.g. schedule-free's
    constant one, brings it)."""
    settings = {"name": label, **(settings or {})}
    schedule = settings.pop("schedule", None) or {}
    return [f"optim.{k}={yaml_value(v)}" for k, v in settings.items()] + \
        [f"schedule.{k}={yaml_value(v)}" for k, v in schedule.items()]


def task_overrides(c: Comparison, task: str) -> list[str]:
    """What makes a cell run `task`: a GLUE task's name, or a custom task's whole data source."""
    custom = c.custom_tasks.get(task)
    if custom is None:
        return [f"data.glue_task={task}"]
    defaults = DataConfig()
    source = {k: getattr(defaults, k) for k in SOURCE_KEYS}
    return [f"data.{k}={yaml_value(v)}" for k, v in {**source, **custom.data}.items()]


def glue_task_of(c: Comparison, task: str) -> str | None:
    """The GLUE task whose score a task reports: itself, a custom task's glue_task, or None."""
    if task in glue.TASKS:
        return task
    custom = c.custom_tasks.get(task)
    return custom.data.get("glue_task") if custom else None


def plan(path: str | Path, overrides: list[str] | None = None) -> Plan:
    """Expand a comparison into its cells and validate every cell's training recipe.

    Nothing is trained. Rows are ordered optimizer by optimizer (then LR), cells row by row,
    then task, then seed.

    Raises:
        RecipeError: problems of the comparison or of any cell (each shown once, with the cells
            it occurs in).
    """
    c, cli_cell_overrides = load_comparison(path, overrides)
    base = (Path(path).resolve().parent / c.base).resolve()
    selection = [] if c.selection.split == "dev" else \
        [f"data.holdout_fraction={yaml_value(c.selection.holdout_fraction)}"]
    cells: list[Cell] = []
    found: dict[str, list[str]] = {}
    for label, settings in c.optimizers.items():
        for task in c.tasks:
            common = [*c.overrides, *task_overrides(c, task), *optimizer_overrides(label, settings),
                      *c.task_overrides.get(task, []), *cli_cell_overrides]
            for seed in c.seeds:
                ident = [*selection, f"train.seed={seed}"]
                _plan_seed(c, base, label, settings or {}, task, seed, common, ident, cells, found)
    if found:
        total = len(c.optimizers) * len(c.tasks) * len(c.seeds)
        problems = [msg + _where(names, total) for msg, names in found.items()]
        raise RecipeError(problems, str(path))
    rows = list(dict.fromkeys(cell.row for cell in cells))
    cells.sort(key=lambda x: (rows.index(x.row), c.tasks.index(x.task), c.seeds.index(x.seed)))
    return Plan(c, cells, rows)


def _plan_seed(c: Comparison, base: Path, label: str, settings: dict, task: str, seed: int,
               common: list[str], ident: list[str], cells: list[Cell],
               found: dict[str, list[str]]) -> None:
    """Add the cells of one (optimizer, task, seed), one per LR of its LR axis."""
    try:
        recipe = load_recipe(base, [*common, *ident, "train.output_dir=probe"])
    except RecipeError as e:
        for msg in e.problems:
            found.setdefault(msg, []).append(f"{label}/{task}/seed{seed}")
        return
    lr = recipe.optim.learning_rate
    centre = lr if "learning_rate" in settings else centre_lr(lr, recipe.optim.name)
    for cell_lr in lr_axis(c, label, centre):
        row = row_label(label, cell_lr)
        out = Path(c.output_dir) / row / task / f"seed{seed}"
        run_lr = centre if cell_lr is None else cell_lr  # no LR axis: the centre itself
        lr_override = [] if run_lr == lr else [f"optim.learning_rate={yaml_value(run_lr)}"]
        cell_overrides = [*common, *lr_override, *ident, f"train.output_dir={out.as_posix()}"]
        try:
            if lr_override:
                load_recipe(base, cell_overrides)
        except RecipeError as e:
            for msg in e.problems:
                found.setdefault(msg, []).append(f"{row}/{task}/seed{seed}")
            continue
        cells.append(Cell(row, label, task, seed, out, base, cell_overrides, cell_lr,
                          c.title(task)))


def _where(names: list[str], total: int) -> str:
    if len(names) >= total:
        return " (every cell)"
    shown = ", ".join(names[:3])
    return f" (cells {shown}{f', +{len(names) - 3} more' if len(names) > 3 else ''})"
