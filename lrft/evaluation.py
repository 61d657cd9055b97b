"""Evaluate a model on its eval splits: metrics per split, and the run's one score.

The score is what best checkpoints are picked on and what `lrft compare` tables show:
- classification: the task's score metrics (`lrft.metrics.score_metrics`: accuracy, Matthews
  correlation for CoLA, the mean of F1 and accuracy for MRPC/QQP, of Pearson and Spearman for
  STS-B and regression), averaged over the eval splits (MNLI: matched and mismatched). For a
  GLUE task this is its GLUE score (`lrft.glue.score`). Higher is better.
- causal LM: the eval loss (mean token cross-entropy), averaged over the splits. Lower is better.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

# The split `data.holdout_fraction` carves from the training rows: evaluated beside the dev
# split(s), never part of the run's score (`lrft compare` can pick LRs on it).
HOLDOUT_SPLIT = "holdout"


@dataclass(frozen=True)
class TaskInfo:
    """What evaluation needs to know about the task, whatever the data source."""

    causal: bool
    is_regression: bool = False
    metric_task: str | None = None  # a GLUE task, "classification" or "regression"; None: causal

    @property
    def score_name(self) -> str:
        if self.causal:
            return "eval_loss"
        from lrft.metrics import main_metric

        return main_metric(self.metric_task)

    @property
    def higher_is_better(self) -> bool:
        return not self.causal

    def score(self, splits: dict[str, dict[str, float]]) -> float | None:
        """The run's score from one evaluation's metrics by split (None if one is missing)."""
        from lrft.metrics import glue_score

        try:
            if self.causal:
                return statistics.mean(m["eval_loss"] for m in splits.values())
            return statistics.mean(glue_score(self.metric_task, m) for m in splits.values())
        except (KeyError, statistics.StatisticsError):
            return None

    def better(self, score: float | None, best: float | None) -> bool:
        """Whether `score` beats the best so far."""
        if score is None:
            return False
        return best is None or (score > best if self.higher_is_better else score < best)


def task_info(task: str, data) -> TaskInfo:
    """The TaskInfo of a recipe's `model.task` and its loaded data."""
    if task == "causal_lm":
        return TaskInfo(causal=True)
    metric_task = data.task or ("regression" if data.is_regression else "classification")
    return TaskInfo(causal=False, is_regression=data.is_regression, metric_task=metric_task)


@torch.no_grad()
def evaluate_model(accelerator, model, loaders: dict, info: TaskInfo
                   ) -> dict[str, dict[str, float]]:
    """Run every eval split; return its metrics by split name (eval_loss in each).

    The model is put in eval mode and back in train mode after. Under several processes the
    predictions are gathered (`gather_for_metrics` drops the padding of the last batch) and the
    losses summed, so every process returns the same numbers.
    """
    model.eval()
    results = {}
    for split, loader in loaders.items():
        results[split] = _evaluate_split(accelerator, model, loader, info)
    model.train()
    return results


def _evaluate_split(accelerator, model, loader, info: TaskInfo) -> dict[str, float]:
    from lrft.metrics import compute_metrics, perplexity

    loss_sum = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    preds, refs = [], []
    for batch in loader:
        out = model(**batch)
        if info.causal:
            # Mean token loss weighted by this batch's predicted tokens (labels != -100).
            n = (batch["labels"][:, 1:] != -100).sum()
            loss_sum += out.loss.float() * n
            count += n
            continue
        loss_sum += out.loss.float() * batch["labels"].shape[0]
        count += batch["labels"].shape[0]
        logits = out.logits.squeeze(-1) if info.is_regression else out.logits.argmax(-1)
        p, r = accelerator.gather_for_metrics((logits, batch["labels"]))
        preds.append(p.float().cpu())
        refs.append(r.float().cpu())
    loss = (accelerator.reduce(loss_sum, "sum") / accelerator.reduce(count, "sum")).item()
    metrics = {"eval_loss": loss}
    if info.causal:
        metrics["perplexity"] = perplexity(loss)
    else:
        p, r = torch.cat(preds).numpy(), torch.cat(refs).numpy()
        if not info.is_regression:
            p, r = p.astype(int), r.astype(int)
        metrics.update(compute_metrics(info.metric_task, p, r))
    return {k: float(v) for k, v in metrics.items()}
