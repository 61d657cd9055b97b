"""Sequence-classification (and regression) data: load, check, label-encode, tokenise.

    load_classification_data(cfg, seed)        raw splits, checked, labels as ids in "labels"
      -> tokenize_classification(data, tok, n)  input_ids / attention_mask (/ token_type_ids) / labels

Rows come from `splits.load_splits` (source, eval splits, where, hold-outs, subsets); labels follow
the rule in `labels` (class ids or regression scores). A GLUE task brings its text columns, label
count and dev split(s) from `lrft.glue`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import datasets

from lrft.data.labels import prepare_labels
from lrft.data.sources import glue_task
from lrft.data.splits import check_text_columns, load_splits, named_splits
from lrft.errors import DataError


@dataclass
class ClassificationData:
    """Train and eval splits for sequence classification (or regression).

    Before `tokenize_classification` the datasets hold the raw text columns and "labels";
    after it, only model inputs and "labels".
    """

    train: datasets.Dataset
    # "validation" (mnli: "validation_matched", "validation_mismatched"), then "holdout" with
    # data.holdout_fraction: rows carved from train to select on, never part of the run's score
    evals: dict[str, datasets.Dataset]
    num_labels: int
    is_regression: bool
    label_names: list[str] | None
    text_columns: list[str]
    task: str | None  # GLUE task name, None for other data
    notes: list[str] = field(default_factory=list)  # how labels were read, when that was a choice


def load_classification_data(cfg, seed: int, *, num_labels: int | None = None) -> ClassificationData:
    """Load, check and label-encode the classification (or regression) data a recipe names.

    Args:
        cfg: the recipe's `DataConfig`.
        seed: seeds the `eval_fraction` and `holdout_fraction` hold-outs and the
            `max_*_samples` subsets.
        num_labels: the head size the recipe asks for (`model.num_labels`), if any; 1 makes
            numeric labels regression scores (see `lrft.data.labels`).

    Returns:
        `ClassificationData` with raw text columns and integer (float for regression) "labels".

    Raises:
        DataError: any problem with the source, splits, columns, labels or text values.
    """
    task = glue_task(cfg.glue_task) if cfg.glue_task else None
    if isinstance(cfg.text_columns, str):
        raise DataError(f"data.text_columns must be a list of column names; found {cfg.text_columns!r}")
    text_columns = list(cfg.text_columns or (task.text_columns if task else []))
    if not 1 <= len(text_columns) <= 2:
        raise DataError(f"data.text_columns needs 1 or 2 column names; found {text_columns}")
    columns = {"text": text_columns, "label": [cfg.label_column]}
    train, evals = load_splits(cfg, seed, task, columns)
    splits, eval_names = named_splits(cfg.train_split, train, evals)
    check_text_columns(splits, text_columns)
    labels = prepare_labels(splits, cfg.label_column, task, cfg.train_split, num_labels)
    splits = {name: _as_labels(ds, cfg.label_column, labels.is_regression) for name, ds in labels.splits.items()}
    return ClassificationData(
        train=splits[cfg.train_split],
        evals={k: splits[name] for k, name in eval_names.items()},
        num_labels=labels.num_labels,
        is_regression=labels.is_regression,
        label_names=labels.names,
        text_columns=text_columns,
        task=cfg.glue_task,
        notes=labels.notes,
    )


def _as_labels(ds: datasets.Dataset, column: str, is_regression: bool) -> datasets.Dataset:
    if column != "labels":
        ds = ds.rename_column(column, "labels")
    target = datasets.Value("float32" if is_regression else "int64")
    return ds.cast_column("labels", target)


def tokenize_classification(data: ClassificationData, tokenizer, max_length: int) -> ClassificationData:
    """Tokenise text (pairs) with truncation and no padding; padding happens per batch.

    Args:
        data: from `load_classification_data`.
        tokenizer: a Hugging Face tokenizer.
        max_length: longest sequence kept, in tokens.

    Returns:
        A copy of `data` whose datasets hold only model inputs and "labels" (cached by datasets).
    """
    columns = data.text_columns

    def encode(batch):
        return tokenizer(*[batch[c] for c in columns], truncation=True, max_length=max_length)

    def run(ds: datasets.Dataset) -> datasets.Dataset:
        drop = [c for c in ds.column_names if c != "labels"]
        return ds.map(encode, batched=True, remove_columns=drop, desc="tokenize")

    return dataclasses.replace(data, train=run(data.train), evals={k: run(ds) for k, ds in data.evals.items()})
