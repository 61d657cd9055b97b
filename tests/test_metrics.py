"""Tests for lrft.metrics: GLUE scores against hand-computed values, through the local evaluate module, offline."""

import math

import evaluate
import numpy as np
import pytest

from lrft import metrics
from lrft.metrics import (compute_metrics, glue_score, load_metric, main_metric, perplexity,
                          score_metrics)

# mrpc/qqp: preds [1,1,1,0] vs refs [1,0,1,0]: TP 2, FP 1, FN 0 -> accuracy 3/4, F1 2*(2/3)*1/(2/3+1) = 0.8
BINARY = ([1, 1, 1, 0], [1, 0, 1, 0])
# stsb: preds [1,2,3,10] vs refs [1,3,2,4]: Pearson 13/sqrt(50*5), Spearman (ranks 1234 vs 1324) 0.8
SCORES = ([1.0, 2.0, 3.0, 10.0], [1.0, 3.0, 2.0, 4.0])
PEARSON = 13 / math.sqrt(250)


def test_cola_matthews_correlation():
    # TP 1, FP 1, TN 2, FN 0 -> (1*2 - 1*0) / sqrt(2*1*3*2)
    scores = compute_metrics("cola", [1, 1, 0, 0], [1, 0, 0, 0])
    assert scores == {"matthews_correlation": pytest.approx(2 / math.sqrt(12))}


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "wnli", "mnli_matched", "mnli_mismatched"])
def test_accuracy_tasks(task):
    assert compute_metrics(task, [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_f1_and_accuracy_tasks(task):
    scores = compute_metrics(task, *BINARY)
    assert scores == {"accuracy": 0.75, "f1": pytest.approx(0.8), "combined_score": pytest.approx(0.775)}


def test_mnli_accepts_logits():
    logits = np.array([[2.0, 0.1, 0.0], [0.0, 3.0, 1.0], [0.0, 0.2, 0.1], [0.1, 0.0, 0.9]])
    assert compute_metrics("mnli", logits, [0, 1, 2, 2]) == {"accuracy": 0.75}


def test_stsb_pearson_spearman():
    scores = compute_metrics("stsb", np.array(SCORES[0]).reshape(-1, 1), SCORES[1])
    assert scores["pearson"] == pytest.approx(PEARSON, rel=1e-5)
    assert scores["spearmanr"] == pytest.approx(0.8)
    assert scores["combined_score"] == pytest.approx((PEARSON + 0.8) / 2, rel=1e-5)


def test_non_glue_classification_and_regression():
    # per-class F1: class 0 -> 1, class 1 -> 2/3, class 2 -> 2/3
    scores = compute_metrics("classification", [0, 1, 2, 2], [0, 1, 1, 2])
    assert scores == {"accuracy": 0.75, "macro_f1": pytest.approx(7 / 9)}
    assert compute_metrics("regression", *SCORES)["pearson"] == pytest.approx(PEARSON, rel=1e-5)


def test_main_metric_and_glue_score():
    assert main_metric("cola") == "matthews_correlation"
    assert main_metric("sst2") == main_metric("mnli") == main_metric("classification") == "accuracy"
    assert main_metric("mrpc") == main_metric("qqp") == main_metric("stsb") == "combined_score"
    assert glue_score("mrpc", {"f1": 0.9, "accuracy": 0.8}) == pytest.approx(0.85)
    assert glue_score("stsb", {"pearson": 0.9, "spearmanr": 0.7}) == pytest.approx(0.8)
    assert glue_score("cola", {"matthews_correlation": 0.4}) == 0.4
    assert score_metrics("mnli_mismatched") == score_metrics("mnli") == ("accuracy",)
    assert score_metrics("regression") == ("pearson", "spearmanr")
    scores = compute_metrics("qqp", *BINARY)
    assert scores[main_metric("qqp")] == glue_score("qqp", scores)


def test_scores_go_through_the_local_evaluate_module():
    module = load_metric("sst2")
    assert isinstance(module, evaluate.EvaluationModule)
    assert module.config_name == "sst2"
    assert load_metric("sst2") is module  # loaded once per task
    assert metrics.METRIC_MODULE.is_file() and metrics.METRIC_MODULE.parent.name == "metrics_glue"


def test_works_offline(monkeypatch):
    for var in ("HF_EVALUATE_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    # evaluate reads the variable when imported; set the flag it read as well.
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    load_metric.cache_clear()
    try:
        assert compute_metrics("rte", [0, 1], [0, 0]) == {"accuracy": 0.5}
    finally:
        load_metric.cache_clear()


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown metric task 'sst'"):
        compute_metrics("sst", [0], [0])
    with pytest.raises(ValueError, match="2 predictions for 3 references"):
        compute_metrics("sst2", [0, 1], [0, 1, 1])


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(20.0)) == pytest.approx(20.0)
    assert perplexity(1e6) == math.inf
