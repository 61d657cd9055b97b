"""Task metrics through the `evaluate` API, offline.

Scores come from the package's own `evaluate` module (`lrft/metrics_glue/glue.py`, scikit-learn and
scipy underneath), loaded with `evaluate.load(<file>, config_name)`, so nothing is fetched from the
Hub. Metric names are a GLUE task (`cola` ... `wnli`, `mnli_matched`, `mnli_mismatched`),
`classification` (accuracy, macro-F1) or `regression` (Pearson, Spearman).

A task's score, the single number best checkpoints are picked on, follows the GLUE leaderboard
(`lrft.glue`): the mean of F1 and accuracy for MRPC/QQP, of Pearson and Spearman for STS-B (and
any regression), Matthews correlation for CoLA, accuracy otherwise; on a 0..1 scale.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lrft import glue

if TYPE_CHECKING:
    import evaluate

METRIC_MODULE = Path(__file__).resolve().parent / "metrics_glue" / "glue.py"

# Configs of the metric module: every GLUE task, MNLI's two splits, and two for other data.
GLUE_METRIC_NAMES = (*glue.NAMES, "mnli_matched", "mnli_mismatched")
METRIC_NAMES = GLUE_METRIC_NAMES + ("classification", "regression")
_OTHER_SCORES = {"classification": ("accuracy",), "regression": ("pearson", "spearmanr")}


def _check_name(task: str) -> None:
    if task not in METRIC_NAMES:
        raise ValueError(f"unknown metric task {task!r}; expected one of: {', '.join(METRIC_NAMES)}")


def score_metrics(task: str) -> tuple[str, ...]:
    """The metrics whose mean is a task's score (see the module docstring).

    Raises:
        ValueError: not a metric name.
    """
    _check_name(task)
    if task in _OTHER_SCORES:
        return _OTHER_SCORES[task]
    return glue.TASKS[task.split("_")[0]].metrics


def is_regression(task: str) -> bool:
    return task in ("stsb", "regression")


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
    if is_regression(task):
        return predictions.reshape(-1).astype(np.float32)
    if predictions.ndim == 2:
        return predictions.argmax(-1)
    return predictions


def compute_metrics(task: str, predictions, references) -> dict[str, float]:
    """Score predictions for a task.

    Args:
        task: a GLUE task, `classification` or `regression`.
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
    if len(score_metrics(task)) > 1:
        scores["combined_score"] = glue_score(task, scores)
    return scores


def main_metric(task: str) -> str:
    """The key of `compute_metrics(task, ...)` that holds the task's score (higher is better).

    Returns:
        The score metric itself (`matthews_correlation` for CoLA, `accuracy` for most), or
        `combined_score` for a task scored by the mean of two (MRPC, QQP, STS-B, regression).
    """
    names = score_metrics(task)
    return names[0] if len(names) == 1 else "combined_score"


def glue_score(task: str, metrics: dict[str, float]) -> float:
    """A task's score from one split's metrics, on a 0..1 scale: the mean of `score_metrics`.

    Raises:
        KeyError: a metric the task needs is missing from `metrics`.
    """
    return glue.split_score(score_metrics(task), metrics)


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
