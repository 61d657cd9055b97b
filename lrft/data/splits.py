"""Which rows a run uses: train and eval splits, where-filters, hold-outs and seeded subsets.

    load_splits(cfg, seed, task, columns) -> (train, evals)

in this order, so each step sees what the one before left:

1. the source's splits (`sources.load_raw`): `train_split` and the eval split(s) — `eval_split`,
   `eval_files`' validation, GLUE's dev split(s) (MNLI: matched and mismatched), else the
   source's "validation" if it has one;
2. the named columns checked in every split, then `where` (keep rows whose column equals a value);
3. `eval_fraction`: hold out a seeded share of train as "validation" (only without an eval split);
4. `holdout_fraction`: carve a seeded share of what train has left as the `holdout` split
   (`HOLDOUT_SPLIT`). It comes before the subsets, so its rows do not depend on
   `max_train_samples`: runs that train on 1k or 10k rows select on the same rows;
5. `max_train_samples` / `max_eval_samples`: seeded subsets; the holdout counts as an eval split.

The same seed gives the same rows at every step. `check_text_columns`, the value check both task
kinds make, lives here too.
"""

from __future__ import annotations

import datasets

from lrft.data.sources import STRING_DTYPES, load_raw
from lrft.errors import DataError
from lrft.evaluation import HOLDOUT_SPLIT  # the evals key of the holdout_fraction split
from lrft.glue import GlueTask


def load_splits(cfg, seed: int, task: GlueTask | None, columns: dict[str, list[str]]):
    """Load, check columns, filter, hold out and subsample: the part both task kinds share.

    Args:
        cfg: the recipe's `DataConfig`; its `split_seed`, when set, seeds the hold-outs and the
            eval subsets instead of `seed`, so every seed of a comparison sees the same dev and
            holdout rows while its training rows still vary.
        seed: the run's seed: the training subset, and the hold-outs unless `split_seed` is set.
        task: the GLUE task, or None.
        columns: {role: column names} each split must have, e.g. {"text": ["sentence"]}.

    Returns:
        (train, evals): raw datasets, all non-empty; evals keyed "validation" (or GLUE's dev split
        names), then `HOLDOUT_SPLIT` when `holdout_fraction` is set.

    Raises:
        DataError: a missing split or column, a filter or hold-out that leaves a split empty,
            conflicting settings, or any problem of the source.
    """
    split_seed = seed if cfg.split_seed is None else cfg.split_seed
    raw = load_raw(cfg, task)
    eval_names = _eval_split_names(cfg, raw, task)
    splits = {split: _split(raw, split) for split in [cfg.train_split, *eval_names.values()]}
    where = dict(cfg.where or {})
    for role, cols in {**columns, "where": list(where)}.items():
        _check_columns(splits, role, cols)
    if where:
        splits = _apply_where(splits, where)
    train = splits[cfg.train_split]
    evals = {key: splits[split] for key, split in eval_names.items()}
    if cfg.eval_fraction is not None:
        train, evals["validation"] = _hold_out(train, cfg.eval_fraction, split_seed,
                                               "eval_fraction")
    if cfg.holdout_fraction is not None:
        train, evals[HOLDOUT_SPLIT] = _hold_out(train, cfg.holdout_fraction, split_seed,
                                                "holdout_fraction")
    train = _subset(train, cfg.max_train_samples, seed)
    evals = {key: _subset(ds, cfg.max_eval_samples, split_seed) for key, ds in evals.items()}
    for name, ds in named_splits(cfg.train_split, train, evals)[0].items():
        if len(ds) == 0:
            raise DataError(f"{name} split is empty (after where / eval_fraction / max_*_samples); "
                            f"expected at least one row: relax data.where or raise max_*_samples")
    return train, evals


def named_splits(train_split: str, train: datasets.Dataset, evals: dict[str, datasets.Dataset]):
    """All splits under the names errors show, and each eval key's name.

    Args:
        train_split: the train split's name (`data.train_split`).
        train: the train rows.
        evals: eval rows by key.

    Returns:
        ({name: dataset} with train first, {eval key: name}); an eval key equal to the train
        split's name shows as "<name> (eval)".
    """
    eval_names = {k: k if k != train_split else f"{k} (eval)" for k in evals}
    return {train_split: train, **{eval_names[k]: ds for k, ds in evals.items()}}, eval_names


def check_text_columns(splits: dict[str, datasets.Dataset], columns) -> None:
    """Every named column of every split holds strings, none missing.

    Args:
        splits: {name: dataset}, as `named_splits` gives them.
        columns: the text column names.

    Raises:
        DataError: a column of another type, or with missing (null) values.
    """
    for name, ds in splits.items():
        for col in columns:
            missing = ds.with_format("arrow")[col].null_count
            if missing and missing == len(ds):
                raise DataError(f"text column {col!r} of {name} split is empty: all {missing} values are "
                                f"missing; expected strings: fill the column or name another one")
            feature = ds.features[col]
            dtype = getattr(feature, "dtype", type(feature).__name__)
            if dtype not in STRING_DTYPES:
                raise DataError(f"text column {col!r} of {name} split holds {dtype} values; expected strings")
            if missing:
                raise DataError(f"text column {col!r} of {name} split has {missing} missing (null) values; "
                                f"expected a string in every row: fill them or filter those rows out")


# --------------------------------------------------------------------------- steps


def _eval_split_names(cfg, raw: datasets.DatasetDict, task: GlueTask | None) -> dict[str, str]:
    """Map eval key -> split of `raw` to evaluate on ({} when holding out or when there is none)."""
    if cfg.eval_fraction is not None:
        if cfg.eval_split or cfg.eval_files:
            raise DataError("set data.eval_fraction or an eval split/eval_files, not both")
        if not 0 < cfg.eval_fraction < 1:
            raise DataError(f"data.eval_fraction must be between 0 and 1; found {cfg.eval_fraction}")
        return {}
    if cfg.eval_files:
        return {"validation": "validation"}
    if cfg.eval_split:
        return {"validation": cfg.eval_split}
    if cfg.train_files:  # files give a validation split only through eval_files
        return {}
    if task is not None and len(task.eval_splits) > 1:
        return {split: split for split in task.eval_splits}
    if task is not None or "validation" in raw:
        return {"validation": task.eval_splits[0] if task else "validation"}
    return {}


def _split(raw: datasets.DatasetDict, split: str) -> datasets.Dataset:
    if split not in raw:
        raise DataError(f"split {split!r} does not exist; available splits: {', '.join(raw)}")
    return raw[split]


def _check_columns(splits: dict[str, datasets.Dataset], role: str, columns) -> None:
    for name, ds in splits.items():
        for col in columns:
            if col not in ds.column_names:
                raise DataError(
                    f"{role} column {col!r} not in {name} split; columns are: {', '.join(ds.column_names)}"
                )


def _where(ds: datasets.Dataset, where: dict) -> datasets.Dataset:
    def keep(batch):
        rows = len(next(iter(batch.values())))
        return [all(batch[c][i] == v for c, v in where.items()) for i in range(rows)]

    return ds.filter(keep, batched=True, desc="where")


def _apply_where(splits: dict[str, datasets.Dataset], where: dict) -> dict[str, datasets.Dataset]:
    filtered = {name: _where(ds, where) for name, ds in splits.items()}
    for name, ds in filtered.items():
        if len(ds) == 0:
            present = {c: sorted(map(str, splits[name].unique(c)))[:10] for c in where}
            values = "; ".join(f"{c}: {', '.join(v)}" for c, v in present.items())
            raise DataError(f"{name} split has no rows with where={where}; values present: {values}")
    return filtered


def _hold_out(train: datasets.Dataset, fraction: float, seed: int, key: str):
    """(the rest of train, a seeded `fraction` of it); ceil(fraction x rows) rows are held out."""
    if not 0 < fraction < 1:
        raise DataError(f"data.{key} must be between 0 and 1; found {fraction}")
    try:
        held = train.train_test_split(test_size=fraction, seed=seed)
    except ValueError as err:  # datasets refuses splits that would leave a side empty
        raise DataError(f"{key}={fraction} of {len(train)} train rows: {err}") from err
    return held["train"], held["test"]


def _subset(ds: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    # A seeded sample, not the first rows: files sorted by label (movie_reviews) would give one class.
    if limit is None or limit >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(limit))
