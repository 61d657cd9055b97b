"""GLUE and generic classification/regression metrics as a local `evaluate` module.

`evaluate.load("glue", task)` fetches its script from the Hugging Face Hub; this file is the same
metric shipped inside the package, so `evaluate.load("<this file>", task)` works offline. It
computes with scikit-learn and scipy and returns the official GLUE key names:

- cola: `matthews_correlation`
- sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, ax: `accuracy`
- mrpc, qqp: `accuracy`, `f1` (binary F1 of label 1, as the official metric)
- stsb: `pearson`, `spearmanr`

and two configs for data that is not GLUE:

- classification: `accuracy`, `macro_f1` (unweighted mean of the per-class F1)
- regression: `pearson`, `spearmanr`

`evaluate` copies this file into its module cache and imports it on its own, so it imports only
installed libraries (no `lrft` imports).
"""

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

_DESCRIPTION = "GLUE task metrics (offline copy computed with scikit-learn and scipy)."

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids (float scores for stsb and regression).
    references: gold class ids (float scores for stsb and regression).
Returns:
    dict of float, keys as listed in the module docstring for the config.
Examples:
    >>> metric = evaluate.load("lrft/metrics_glue/glue.py", "mrpc")
    >>> metric.compute(predictions=[0, 1], references=[0, 1])
    {'accuracy': 1.0, 'f1': 1.0}
"""

# config name -> which family of scores it reports
_KINDS = {
    "cola": "matthews",
    "sst2": "accuracy",
    "mnli": "accuracy",
    "mnli_matched": "accuracy",
    "mnli_mismatched": "accuracy",
    "qnli": "accuracy",
    "rte": "accuracy",
    "wnli": "accuracy",
    "ax": "accuracy",
    "mrpc": "accuracy_f1",
    "qqp": "accuracy_f1",
    "stsb": "correlation",
    "classification": "accuracy_macro_f1",
    "regression": "correlation",
}


def _correlation(predictions, references):
    return {
        "pearson": float(pearsonr(predictions, references)[0]),
        "spearmanr": float(spearmanr(predictions, references)[0]),
    }


def _score(kind, predictions, references):
    if kind == "matthews":
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
    if kind == "correlation":
        return _correlation(predictions, references)
    scores = {"accuracy": float(accuracy_score(references, predictions))}
    if kind == "accuracy_f1":
        scores["f1"] = float(f1_score(references, predictions))
    elif kind == "accuracy_macro_f1":
        scores["macro_f1"] = float(f1_score(references, predictions, average="macro"))
    return scores


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Glue(evaluate.Metric):
    """GLUE metrics; the config name (a GLUE task, `classification` or `regression`) picks the scores."""

    def _info(self):
        if self.config_name not in _KINDS:
            raise KeyError(f"unknown config {self.config_name!r}; expected one of: {', '.join(_KINDS)}")
        dtype = "float32" if _KINDS[self.config_name] == "correlation" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}
            ),
            format="numpy",
        )

    def _compute(self, predictions, references):
        return _score(_KINDS[self.config_name], predictions, references)
