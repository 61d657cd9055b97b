"""The GLUE task table: columns, labels, eval splits, metrics, titles and the one GLUE score.

The single source for every module that knows GLUE: data loading (`lrft.data`), metrics
(`lrft.metrics`), recipe validation and the comparison's tables (`lrft.compare`). Plain data, no
torch: `lrft check` and `lrft compare --report` read it without loading a model.

A task's *score* is its one leaderboard number on a 0..1 scale: the mean of its official metrics
when it has two (MRPC and QQP: F1 and accuracy; STS-B: Pearson and Spearman), the mean over its
eval splits when it has several (MNLI: matched and mismatched accuracy), otherwise its metric.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from lrft.config import suggest

DEFAULT_PATH = "nyu-mll/glue"  # the hub data set; `data.path` may name a local copy instead


@dataclass(frozen=True)
class GlueTask:
    """What a GLUE task's data looks like and how it is scored.

    Attributes:
        name: the config name, e.g. "sst2".
        title: how tables show it, e.g. "SST-2".
        text_columns: one or two text columns.
        num_labels: classes, 1 for regression (STS-B).
        eval_splits: the dev splits (MNLI: matched and mismatched).
        metrics: the official metric keys; the score is their mean.
    """

    name: str
    title: str
    text_columns: tuple[str, ...]
    num_labels: int
    eval_splits: tuple[str, ...]
    metrics: tuple[str, ...]

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


def _task(name, title, columns, metrics, num_labels=2, eval_splits=("validation",)) -> GlueTask:
    return GlueTask(name, title, tuple(columns), num_labels, tuple(eval_splits), tuple(metrics))


_PAIR = ("sentence1", "sentence2")
TASKS: dict[str, GlueTask] = {t.name: t for t in (
    _task("cola", "CoLA", ["sentence"], ["matthews_correlation"]),
    _task("sst2", "SST-2", ["sentence"], ["accuracy"]),
    _task("mrpc", "MRPC", _PAIR, ["f1", "accuracy"]),
    _task("stsb", "STS-B", _PAIR, ["pearson", "spearmanr"], num_labels=1),
    _task("qqp", "QQP", ["question1", "question2"], ["f1", "accuracy"]),
    _task("mnli", "MNLI", ["premise", "hypothesis"], ["accuracy"], num_labels=3,
          eval_splits=("validation_matched", "validation_mismatched")),
    _task("qnli", "QNLI", ["question", "sentence"], ["accuracy"]),
    _task("rte", "RTE", _PAIR, ["accuracy"]),
    _task("wnli", "WNLI", _PAIR, ["accuracy"]),
)}
NAMES: tuple[str, ...] = tuple(TASKS)


def glue_task(name: str) -> GlueTask:
    """Look up a GLUE task by name.

    Raises:
        KeyError: unknown name; the message lists the tasks or the closest one.
    """
    if name in TASKS:
        return TASKS[name]
    raise KeyError(f"unknown GLUE task {name!r}; {suggest(str(name).lower(), NAMES, 'GLUE tasks')}")


def title(name: str) -> str:
    """The table title of a task: "SST-2" for "sst2"; other names as they are."""
    return TASKS[name].title if name in TASKS else name


def split_score(metrics: tuple[str, ...], values: dict[str, float]) -> float:
    """The mean of the named metrics of one eval split (KeyError when one is missing)."""
    return statistics.mean(float(values[m]) for m in metrics)


def score(name: str, splits: dict[str, dict[str, float]]) -> float:
    """The GLUE score of one evaluation of task `name`, on a 0..1 scale.

    Args:
        name: a GLUE task.
        splits: metrics by eval split, e.g. {"validation": {"accuracy": 0.9, "eval_loss": ...}}.

    Raises:
        KeyError: a split or metric the task needs is missing.
    """
    task = glue_task(name)
    return statistics.mean(split_score(task.metrics, splits[s]) for s in task.eval_splits)
