"""Classification labels: class ids or regression scores, and ids 0..k-1 for every split.

    prepare_labels(splits, column, task, train_split, num_labels) -> Labels

The rule, checked on the raw label column of every split:

- A GLUE task fixes its labels: class ids 0..k-1 (k from `lrft.glue`), or STS-B's float scores.
- `ClassLabel` columns keep their ids and names; string labels are mapped to ids 0..k-1 in sorted
  order of the train split's labels (the names keep the strings).
- Numeric labels are regression scores when a value has a fraction (0.37), or when the recipe asks
  for one output (`model.num_labels: 1`, passed as `num_labels`). Otherwise they are class ids:
  ints, and floats that are all whole numbers (0.0/1.0 is what pandas writes for an int column that
  held a missing value); such floats are read as ids, with a note.
- Class ids that cover 0..max across the splits are used as they are (k = the train split's
  max + 1). Ids with a gap ({1, ..., 5}, {0, 1000}) are values, not ids: they are mapped in sorted
  order to 0..k-1 like strings, with a note, so no head gets outputs that no row carries.
- A classifier needs two classes in the train split; one is an error, not a 1-output head.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from lrft.data.sources import STRING_DTYPES
from lrft.errors import DataError
from lrft.glue import GlueTask

logger = logging.getLogger(__name__)
_REGRESSION_HINT = "for regression scores give float labels, or set model.num_labels: 1"


class Labels(NamedTuple):
    """What `prepare_labels` found: the splits with label ids (or scores) and the head they need."""

    splits: dict[str, datasets.Dataset]
    num_labels: int  # 1 for regression
    is_regression: bool
    names: list[str] | None  # id -> name, None for plain integer ids and regression
    notes: list[str]  # one line each: how labels were read when that was a choice


def prepare_labels(splits: dict[str, datasets.Dataset], column: str, task: GlueTask | None,
                   train_split: str, num_labels: int | None = None) -> Labels:
    """Check the labels of every split against the task and map them to ids 0..k-1.

    Args:
        splits: {name: dataset} with the raw label column, train first.
        column: the label column (`data.label_column`).
        task: the GLUE task, or None.
        train_split: the name of the train split in `splits`.
        num_labels: the head size the recipe asks for (`model.num_labels`), or None; 1 makes
            numeric labels regression scores.

    Returns:
        `Labels`; each note is also logged as a warning.

    Raises:
        DataError: missing labels, a kind the task cannot take, ids out of range or unlabelled
            (-1) rows, eval labels the train split never has, or a single class.
    """
    _check_present(splits, column)
    kind = _kind(splits[train_split].features[column])
    if task is not None:
        _check_glue_kind(splits, column, task, kind, train_split)
    if _is_regression(splits, column, task, kind, num_labels):
        return Labels(splits, 1, True, None, [])
    notes = []
    if kind == "float":  # whole numbers only: class ids written as floats
        notes.append(f"labels in column {column!r} are floats with whole values only "
                     f"({_preview(splits[train_split], column)}): read as class ids; if they are "
                     f"regression scores, set model.num_labels: 1")
        splits = {name: ds.cast_column(column, datasets.Value("int64")) for name, ds in splits.items()}
    names = splits[train_split].features[column].names if kind == "class" else None
    if kind == "string":
        splits, names = _map_to_ids(splits, column, train_split)
    if task is not None:
        count = task.num_labels
    elif names is not None:
        count = len(names)
    else:
        splits, count, names, note = _integer_ids(splits, column, train_split)
        notes += [note] if note else []
    _check_ids(splits, column, count, task)
    _check_two_classes(splits[train_split], column, train_split, names)
    for note in notes:
        logger.warning(note)
    return Labels(splits, count, False, list(names) if names is not None else None, notes)


def _is_regression(splits, column: str, task: GlueTask | None, kind: str, num_labels: int | None) -> bool:
    """The rule: a GLUE task decides; else numeric labels with a fraction, or one output asked for."""
    if task is not None:
        return task.is_regression
    if kind not in ("int", "float"):
        return False
    return num_labels == 1 or (kind == "float" and not _all_whole(splits, column))


def _check_glue_kind(splits, column: str, task: GlueTask, kind: str, train_split: str) -> None:
    if task.is_regression and kind != "float":
        raise DataError(f"{kind} labels in column {column!r}, but the GLUE task is regression (float scores)")
    if not task.is_regression and kind == "float" and not _all_whole(splits, column):
        raise DataError(f"float labels in column {column!r}, but the GLUE task needs class ids "
                        f"0..{task.num_labels - 1}; found {_preview(splits[train_split], column)}")


def _kind(feature) -> str:
    if isinstance(feature, datasets.ClassLabel):
        return "class"
    dtype = getattr(feature, "dtype", "")
    if dtype in STRING_DTYPES:
        return "string"
    if dtype.startswith(("int", "uint")):
        return "int"
    if dtype.startswith("float"):
        return "float"
    raise DataError(f"labels must be integers, strings or floats; found {feature}")


def _preview(ds: datasets.Dataset, column: str, most: int = 5) -> str:
    values = sorted(ds.unique(column), key=lambda v: (isinstance(v, str), v))
    shown = ", ".join(map(str, values[:most]))
    return shown + (f", ... ({len(values)} values)" if len(values) > most else "")


def _check_present(splits: dict[str, datasets.Dataset], column: str) -> None:
    for name, ds in splits.items():
        missing = ds.with_format("arrow")[column].null_count
        if missing:
            raise DataError(f"label column {column!r} of {name} split has {missing} missing values")


def _all_whole(splits: dict[str, datasets.Dataset], column: str) -> bool:
    """True when every float label of every split is a finite whole number (1.0, not 1.5)."""
    for ds in splits.values():
        values = ds.with_format("arrow")[column]
        if pa.types.is_floating(values.type):
            finite = pc.all(pc.is_finite(values)).as_py()
            if not finite or not pc.all(pc.equal(pc.floor(values), values)).as_py():
                return False
    return True


def _map_to_ids(splits: dict[str, datasets.Dataset], column: str, train_split: str):
    """Sorted unique train labels -> 0..n-1 (strings, or integers that are not ids); names as strings."""
    values = sorted(splits[train_split].unique(column))
    for name, ds in splits.items():
        unseen = sorted(set(ds.unique(column)) - set(values))
        if unseen:
            raise DataError(f"labels {unseen} of {name} split never occur in {train_split}; "
                            f"train labels: {values}; a model cannot predict a class it never saw: "
                            f"filter those rows out or add them to {train_split}")
    names = [str(v) for v in values]
    labels = datasets.ClassLabel(names=names)  # casting a string column to ClassLabel maps names to ids
    to_str = datasets.Value("string")
    return {name: ds.cast_column(column, to_str).cast_column(column, labels) for name, ds in splits.items()}, names


def _integer_ids(splits: dict[str, datasets.Dataset], column: str, train_split: str):
    """(splits, num_labels, names, note): ids as they are, or mapped when they leave a gap."""
    present = set().union(*(ds.unique(column) for ds in splits.values()))
    top = pc.max(splits[train_split].with_format("arrow")[column]).as_py()
    if min(present) < 0 or present == set(range(max(present) + 1)):
        return splits, top + 1, None, None  # ids (negative ones fail the range check)
    shown = _preview(splits[train_split], column)
    splits, names = _map_to_ids(splits, column, train_split)
    note = (f"integer labels in column {column!r} ({shown}) are not the class ids 0..{len(names) - 1}: "
            f"mapped in sorted order to ids 0..{len(names) - 1} (their names keep the values), "
            f"not a {max(present) + 1}-class head")
    return splits, len(names), names, note


def _check_ids(splits: dict[str, datasets.Dataset], column: str, num_labels: int, task: GlueTask | None):
    for name, ds in splits.items():
        bounds = pc.min_max(ds.with_format("arrow")[column])
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        if low == -1:
            raise DataError(
                f"{name} split has label -1 (unlabelled rows, as in GLUE test splits); "
                f"use a labelled split or filter them out"
            )
        if low < 0 or high >= num_labels:
            whose = f"the GLUE task has {num_labels} classes" if task else "the train split's classes"
            raise DataError(f"labels of {name} split span {low}..{high}; expected 0..{num_labels - 1} "
                            f"({whose}): fix those labels or filter their rows out (data.where)")


def _check_two_classes(train: datasets.Dataset, column: str, train_split: str, names) -> None:
    present = train.unique(column)
    if len(present) < 2:
        label = names[present[0]] if names is not None else present[0]
        raise DataError(f"{train_split} split has one class only: all {len(train)} rows have label "
                        f"'{label}'; expected at least two classes for a classifier: check the label "
                        f"column, data.where and max_train_samples; {_REGRESSION_HINT}")
