"""Task metrics through the `evaluate` API, offline.

Scores come from the package's own `evaluate` module (`lrft/metrics_glue/glue.py`, scikit-learn and
scipy underneath), loaded with `evaluate.load(<file>, config_name)`, so nothing is fetched from the
Hub. Metric names are a GLUE task (`cola` ... `wnli`, `mnli_matched`, `mnli_mismatched`),
`classification` (accuracy, macro-F1) or `regression` (Pearson, Spearman).

The single number used to pick the best checkpoint follows the GLUE leaderboard: the mean of F1 and
accuracy for MRPC/QQP, the mean of Pearson and Spearman for STS-B (and any regression), Matthews
correlation for CoLA, accuracy otherwise; on a 0..1 scale.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import evaluate

METRIC_MODULE = Path(__file__).resolve().parent / "metrics_glue" / "glue.py"

GLUE_METRIC_NAMES = (
    "cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte",
    "wnli",
)
METRIC_NAMES = GLUE_METRIC_NAMES + ("classification", "regression")

# tasks whose leaderboard score is the mean of two metrics, and which two
_COMBINED = {
    "mrpc": ("f1", "accuracy"),
    "qqp": ("f1", "accuracy"),
    "stsb": ("pearson", "spearmanr"),
    "regression": ("pearson", "spearmanr"),
}
_REGRESSION = {"stsb", "regression"}


def metric_name(task: str | None, is_regression: bool = False) -> str:
    """Name of the metric config for a data set.

    Args:
        task: a GLUE task name, or None for other data.
        is_regression: whether non-GLUE labels are real-valued.

    Returns:
        `task` itself for GLUE, else `regression` or `classification`.
    """
    if task is not None:
        return task
    return "regression" if is_regression else "classification"


def _check_name(task: str) -> None:
    if task not in METRIC_NAMES:
        raise ValueError(f"unknown metric task {task!r}; expected one of: {', '.join(METRIC_NAMES)}")


@functools.lru_cache(maxsize=None)
def load_metric(task: str) -> "evaluate.EvaluationModule":
    """Load (once per task) the local `evaluate` module configured for `task`.

    Args:
        task: a name from `METRIC_NAMES`.

    Returns:
        The `evaluate.EvaluationModule`; kept in memory, so concurrent runs write no cache files.

    Raises:
        ValueError: `task` is not a known metric name.
    """
    _check_name(task)
    # evaluate imports transformers.pipelines (~10 s on a busy CPU): pay for it only when scoring.
    import evaluate

    return evaluate.load(str(METRIC_MODULE), config_name=task, keep_in_memory=True)


def _as_predictions(task: str, predictions) -> np.ndarray:
    # Accept logits (n, num_labels) as well as class ids; regression heads give (n, 1).
    predictions = np.asarray(predictions)
    if task in _REGRESSION:
        return predictions.reshape(-1).astype(np.float32)
    if predictions.ndim == 2:
        return predictions.argmax(-1)
    return predictions


def compute_metrics(task: str, predictions, references) -> dict[str, float]:
    """Score predictions for a task.

    Args:
        task: a GLUE task, `classification` or `regression` (see `metric_name`).
        predictions: class ids or logits of shape (n, num_labels); scores for regression.
        references: gold labels, same length.

    Returns:
        The metric's scores (official GLUE key names), plus `combined_score` (the leaderboard
        mean) for MRPC, QQP, STS-B and regression.

    Raises:
        ValueError: unknown task, or predictions and references of different lengths.
    """
    _check_name(task)
    predictions = _as_predictions(task, predictions)
    references = np.asarray(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scores = load_metric(task).compute(predictions=predictions, references=references)
    if task in _COMBINED:
        scores["combined_score"] = glue_score(task, scores)
    return scores


def main_metric(task: str) -> str:
    """Key of `compute_metrics(task, ...)` used to rank checkpoints (higher is better).

    Args:
        task: a GLUE task, `classification` or `regression`.

    Returns:
        `matthews_correlation` for CoLA, `combined_score` for MRPC/QQP/STS-B/regression,
        `accuracy` otherwise.
    """
    _check_name(task)
    if task == "cola":
        return "matthews_correlation"
    if task in _COMBINED:
        return "combined_score"
    return "accuracy"


def glue_score(task: str, metrics: dict[str, float]) -> float:
    """The task's single leaderboard number, on a 0..1 scale.

    Args:
        task: a GLUE task, `classification` or `regression`.
        metrics: scores as returned by the metric module (`combined_score` not needed).

    Returns:
        Mean of the two scores for MRPC/QQP (F1, accuracy) and STS-B (Pearson, Spearman);
        otherwise the `main_metric` score.

    Raises:
        KeyError: a score the task needs is missing from `metrics`.
    """
    if task in _COMBINED:
        first, second = _COMBINED[task]
        return (metrics[first] + metrics[second]) / 2
    return metrics[main_metric(task)]


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy), `inf` when it overflows a float.

    Args:
        mean_loss: mean negative log-likelihood per token, in nats.

    Returns:
        The perplexity.
    """
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf
