"""Data for lrft recipes: GLUE and other classification sets, causal-LM text, and batching.

The recipe's `data` section (a `DataConfig`) flows one way through this module:

    load_classification_data(cfg, seed)        raw splits, checked, labels as ids in "labels"
      -> tokenize_classification(data, tok, n)  input_ids / attention_mask (/ token_type_ids) / labels
    load_causal_data(cfg, tok, seed)           input_ids / attention_mask / labels (-100 = no loss)
      -> make_dataloader(...)                   seeded, length-grouped, dynamically padded batches

Every problem a recipe can have with its data (missing file, split or column, empty split, bad
labels, non-text values) is raised as `DataError` before the first training step, naming what was
expected and what was found.

Sources: a GLUE task (`load_dataset(path or "nyu-mll/glue", task)`), local files
(csv/json/jsonl/parquet/txt), or any other hub id or local folder (`load_dataset(path, name)`).
Paths may start with `pkg:` to name a file inside an installed Python package.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.compute as pc
import torch
from accelerate.data_loader import SeedableRandomSampler
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding
from transformers.trainer_pt_utils import get_length_grouped_indices

from lrft.recipe import resolve_path  # re-exported: pkg: paths in data files

logger = logging.getLogger(__name__)

# Columns a model's forward() takes; everything else is dropped before batching.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")
CAUSAL_FORMATS = ("text", "prompt_response", "messages")
IGNORE_INDEX = -100  # label id that torch's cross-entropy skips
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
_STRING_DTYPES = ("string", "large_string")


class DataError(ValueError):
    """The data a recipe names cannot be used; raised before training starts."""


@dataclass(frozen=True)
class GlueTask:
    """What a GLUE task's data looks like and how it is scored."""

    text_columns: tuple[str, ...]
    num_labels: int
    is_regression: bool
    eval_splits: tuple[str, ...]
    metrics: tuple[str, ...]


def _glue(text_columns, metrics, num_labels=2, eval_splits=("validation",)) -> GlueTask:
    return GlueTask(tuple(text_columns), num_labels, num_labels == 1, tuple(eval_splits), tuple(metrics))


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": _glue(["sentence"], ["matthews_correlation"]),
    "sst2": _glue(["sentence"], ["accuracy"]),
    "mrpc": _glue(["sentence1", "sentence2"], ["accuracy", "f1"]),
    "stsb": _glue(["sentence1", "sentence2"], ["pearson", "spearmanr"], num_labels=1),
    "qqp": _glue(["question1", "question2"], ["accuracy", "f1"]),
    "mnli": _glue(
        ["premise", "hypothesis"], ["accuracy"], num_labels=3,
        eval_splits=("validation_matched", "validation_mismatched"),
    ),
    "qnli": _glue(["question", "sentence"], ["accuracy"]),
    "rte": _glue(["sentence1", "sentence2"], ["accuracy"]),
    "wnli": _glue(["sentence1", "sentence2"], ["accuracy"]),
}
GLUE_DEFAULT_PATH = "nyu-mll/glue"


@dataclass
class ClassificationData:
    """Train and eval splits for sequence classification (or regression).

    Before `tokenize_classification` the datasets hold the raw text columns and "labels";
    after it, only model inputs and "labels".
    """

    train: datasets.Dataset
    evals: dict[str, datasets.Dataset]  # "validation", or mnli's two matched/mismatched splits
    num_labels: int
    is_regression: bool
    label_names: list[str] | None
    text_columns: list[str]
    task: str | None  # GLUE task name, None for other data


@dataclass
class CausalData:
    """Tokenised causal-LM splits: input_ids, attention_mask, labels (-100 where no loss)."""

    train: datasets.Dataset
    evals: dict[str, datasets.Dataset]
    format: str
    packing: bool


# --------------------------------------------------------------------------- paths and sources


def _hub_offline() -> bool:
    flags = (os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f in ("1", "ON", "YES", "TRUE") for f in flags) or bool(datasets.config.HF_HUB_OFFLINE)


def _looks_like_hub_id(path: str) -> bool:
    # "nyu-mll/glue" or "imdb"; not "./x", "../x", "/abs", "a/b/c"
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", path) is not None


def _load(path_or_builder: str, name: str | None, shown: str, **kwargs) -> datasets.DatasetDict:
    # load_dataset's own errors carry the detail (missing config, bad file); keep them, add what was asked.
    try:
        return datasets.load_dataset(path_or_builder, name, **kwargs)
    except Exception as err:
        hint = ""
        if _looks_like_hub_id(shown) and not os.path.exists(shown):
            hint = " (if this machine has no network, download the data elsewhere and set `path:` to a local folder)"
        raise DataError(f"could not load dataset {shown!r} (config {name!r}){hint}: {err}") from err


def _load_hub_or_folder(path: str, name: str | None) -> datasets.DatasetDict:
    local = _resolve(path)
    if not os.path.exists(local):
        if not _looks_like_hub_id(path):
            raise DataError(f"dataset path {path!r} does not exist (resolved to {local})")
        if _hub_offline():
            raise DataError(
                f"dataset {path!r} is not a local folder and the Hub is offline (HF_HUB_OFFLINE=1); "
                f"set `path:` to a local copy, e.g. path: ../shared/glue"
            )
    return _load(local, name, shown=path)


def _resolve(p: str) -> str:
    try:
        return resolve_path(p)
    except FileNotFoundError as err:
        raise DataError(str(err)) from err


def _builder_for(files: list[str]) -> str:
    builders = {FILE_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in builders or len(builders) != 1:
        raise DataError(
            f"data files must share one of the types {', '.join(FILE_BUILDERS)}; found: {', '.join(files)}"
        )
    return builders.pop()


def _load_files(train_files: list[str], eval_files: list[str] | None) -> datasets.DatasetDict:
    named = {"train": train_files, **({"validation": eval_files} if eval_files else {})}
    resolved = {split: [_resolve(f) for f in files] for split, files in named.items()}
    for split, files in resolved.items():
        for shown, f in zip(named[split], files):
            if not any(ch in f for ch in "*?[") and not os.path.exists(f):
                raise DataError(f"{split} file {shown!r} does not exist (resolved to {f})")
            if os.path.isfile(f) and os.path.getsize(f) == 0:
                raise DataError(f"{split} file {shown!r} is empty (0 bytes); expected rows of data")
    builder = _builder_for([f for files in resolved.values() for f in files])
    try:
        return _load(builder, None, shown=", ".join(train_files), data_files=resolved)
    except DataError as err:  # datasets' words for a split without rows: say which files
        empty = re.search(r'Instruction "([^"]+)" corresponds to no data', str(err.__cause__))
        if empty and empty.group(1) in named:
            split = empty.group(1)
            raise DataError(f"{split} split is empty: {', '.join(named[split])} hold(s) no rows; "
                            f"expected at least one example") from err
        raise


def _load_raw(cfg, glue: GlueTask | None) -> datasets.DatasetDict:
    if cfg.eval_files and not cfg.train_files:
        raise DataError("data.eval_files is set but data.train_files is not")
    if cfg.train_files:
        if cfg.path:
            raise DataError(f"set data.path ({cfg.path!r}) or data.train_files, not both")
        return _load_files(list(cfg.train_files), cfg.eval_files)
    if glue is not None:
        return _load_hub_or_folder(cfg.path or GLUE_DEFAULT_PATH, cfg.glue_task)
    if not cfg.path:
        raise DataError("the data section needs one of: glue_task, path, train_files")
    return _load_hub_or_folder(cfg.path, cfg.name)


def glue_task(name: str) -> GlueTask:
    """Look up a GLUE task by name.

    Args:
        name: e.g. "sst2".

    Returns:
        Its `GlueTask`.

    Raises:
        DataError: unknown name, with the closest known names.
    """
    if name in GLUE_TASKS:
        return GLUE_TASKS[name]
    close = difflib.get_close_matches(name.lower(), list(GLUE_TASKS), n=2)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise DataError(f"unknown GLUE task {name!r}; GLUE tasks are: {', '.join(GLUE_TASKS)}{hint}")


# --------------------------------------------------------------------------- splits and filters


def _eval_split_names(cfg, raw: datasets.DatasetDict, glue: GlueTask | None) -> dict[str, str]:
    """Map eval name -> split of `raw` to evaluate on ({} when holding out or when there is none)."""
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
    if glue is not None and len(glue.eval_splits) > 1:
        return {split: split for split in glue.eval_splits}
    if glue is not None or "validation" in raw:
        return {"validation": glue.eval_splits[0] if glue else "validation"}
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


def _hold_out(train: datasets.Dataset, fraction: float, seed: int):
    try:
        held = train.train_test_split(test_size=fraction, seed=seed)
    except ValueError as err:  # datasets refuses splits that would leave a side empty
        raise DataError(f"eval_fraction={fraction} of {len(train)} train rows: {err}") from err
    return held["train"], {"validation": held["test"]}


def _subset(ds: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    # A seeded sample, not the first rows: files sorted by label (movie_reviews) would give one class.
    if limit is None or limit >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(limit))


def _load_splits(cfg, seed: int, glue: GlueTask | None, columns: dict[str, list[str]]):
    """Load, check columns, filter, hold out and subsample: the part shared by both task kinds.

    Returns:
        (train, evals) raw datasets, all non-empty.
    """
    raw = _load_raw(cfg, glue)
    eval_names = _eval_split_names(cfg, raw, glue)
    splits = {split: _split(raw, split) for split in [cfg.train_split, *eval_names.values()]}
    where = dict(cfg.where or {})
    for role, cols in {**columns, "where": list(where)}.items():
        _check_columns(splits, role, cols)
    if where:
        splits = _apply_where(splits, where)
    train = splits[cfg.train_split]
    evals = {key: splits[split] for key, split in eval_names.items()}
    if cfg.eval_fraction is not None:
        train, evals = _hold_out(train, cfg.eval_fraction, seed)
    train = _subset(train, cfg.max_train_samples, seed)
    evals = {key: _subset(ds, cfg.max_eval_samples, seed) for key, ds in evals.items()}
    for name, ds in _named_splits(cfg.train_split, train, evals)[0].items():
        if len(ds) == 0:
            raise DataError(f"{name} split is empty (after where / eval_fraction / max_*_samples)")
    return train, evals


def _named_splits(train_split: str, train, evals):
    """All splits under the names errors show: {name: ds}, and eval key -> name."""
    eval_names = {k: k if k != train_split else f"{k} (eval)" for k in evals}
    return {train_split: train, **{eval_names[k]: ds for k, ds in evals.items()}}, eval_names


# --------------------------------------------------------------------------- classification


def _check_text(splits: dict[str, datasets.Dataset], columns) -> None:
    for name, ds in splits.items():
        for col in columns:
            feature = ds.features[col]
            dtype = getattr(feature, "dtype", type(feature).__name__)
            if dtype not in _STRING_DTYPES:
                raise DataError(f"text column {col!r} of {name} split holds {dtype} values; expected strings")
            missing = ds.with_format("arrow")[col].null_count
            if missing:
                raise DataError(f"text column {col!r} of {name} split has {missing} missing (null) values")


def _label_kind(feature) -> str:
    if isinstance(feature, datasets.ClassLabel):
        return "class"
    dtype = getattr(feature, "dtype", "")
    if dtype in _STRING_DTYPES:
        return "string"
    if dtype.startswith(("int", "uint")):
        return "int"
    if dtype.startswith("float"):
        return "float"
    raise DataError(f"labels must be integers, strings or floats; found {feature}")


def _check_present(splits: dict[str, datasets.Dataset], column: str) -> None:
    for name, ds in splits.items():
        missing = ds.with_format("arrow")[column].null_count
        if missing:
            raise DataError(f"label column {column!r} of {name} split has {missing} missing values")


def _check_label_ids(splits: dict[str, datasets.Dataset], column: str, num_labels: int) -> None:
    for name, ds in splits.items():
        bounds = pc.min_max(ds.with_format("arrow")[column])
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        if low == -1:
            raise DataError(
                f"{name} split has label -1 (unlabelled rows, as in GLUE test splits); "
                f"use a labelled split or filter them out"
            )
        if low < 0 or high >= num_labels:
            raise DataError(f"labels of {name} split span {low}..{high}; expected 0..{num_labels - 1}")


def _string_label_ids(splits: dict[str, datasets.Dataset], column: str, train_split: str):
    # Sorted unique train labels -> 0..n-1; a label only an eval split has could never be predicted.
    names = sorted(splits[train_split].unique(column))
    for name, ds in splits.items():
        unseen = sorted(set(ds.unique(column)) - set(names))
        if unseen:
            raise DataError(f"labels {unseen} of {name} split never occur in {train_split}; train labels: {names}")
    labels = datasets.ClassLabel(names=names)  # casting a string column to ClassLabel maps names to ids
    return {name: ds.cast_column(column, labels) for name, ds in splits.items()}, names


def _prepare_labels(splits: dict[str, datasets.Dataset], column: str, glue: GlueTask | None, train_split: str):
    """Check labels against the task and map them to ids.

    Float labels mean regression (a GLUE classification task refuses them); integer, string and
    ClassLabel labels mean classification.

    Returns:
        (splits, num_labels, is_regression, label_names or None)
    """
    _check_present(splits, column)
    kind = _label_kind(splits[train_split].features[column])
    if kind == "float":
        if glue is not None and not glue.is_regression:
            raise DataError(
                f"float labels in column {column!r}, but the GLUE task needs class ids 0..{glue.num_labels - 1}"
            )
        return splits, 1, True, None
    if glue is not None and glue.is_regression:
        raise DataError(f"{kind} labels in column {column!r}, but the GLUE task is regression (float scores)")
    names = splits[train_split].features[column].names if kind == "class" else None
    if kind == "string":
        splits, names = _string_label_ids(splits, column, train_split)
    if glue is not None:
        num_labels = glue.num_labels
    elif names is not None:
        num_labels = len(names)
    else:
        num_labels = pc.max(splits[train_split].with_format("arrow")[column]).as_py() + 1
    _check_label_ids(splits, column, num_labels)
    return splits, num_labels, False, names


def _as_labels(ds: datasets.Dataset, column: str, is_regression: bool) -> datasets.Dataset:
    if column != "labels":
        ds = ds.rename_column(column, "labels")
    target = datasets.Value("float32" if is_regression else "int64")
    return ds.cast_column("labels", target)


def load_classification_data(cfg, seed: int) -> ClassificationData:
    """Load, check and label-encode the classification (or regression) data a recipe names.

    Args:
        cfg: the recipe's `DataConfig`.
        seed: seeds the `eval_fraction` hold-out and the `max_*_samples` subsets.

    Returns:
        `ClassificationData` with raw text columns and integer (float for regression) "labels".

    Raises:
        DataError: any problem with the source, splits, columns, labels or text values.
    """
    glue = glue_task(cfg.glue_task) if cfg.glue_task else None
    if isinstance(cfg.text_columns, str):
        raise DataError(f"data.text_columns must be a list of column names; found {cfg.text_columns!r}")
    text_columns = list(cfg.text_columns or (glue.text_columns if glue else []))
    if not 1 <= len(text_columns) <= 2:
        raise DataError(f"data.text_columns needs 1 or 2 column names; found {text_columns}")
    columns = {"text": text_columns, "label": [cfg.label_column]}
    train, evals = _load_splits(cfg, seed, glue, columns)
    splits, eval_names = _named_splits(cfg.train_split, train, evals)
    _check_text(splits, text_columns)
    splits, num_labels, is_regression, names = _prepare_labels(splits, cfg.label_column, glue, cfg.train_split)
    splits = {name: _as_labels(ds, cfg.label_column, is_regression) for name, ds in splits.items()}
    return ClassificationData(
        train=splits[cfg.train_split],
        evals={k: splits[name] for k, name in eval_names.items()},
        num_labels=num_labels,
        is_regression=is_regression,
        label_names=list(names) if names is not None else None,
        text_columns=text_columns,
        task=cfg.glue_task,
    )


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


# --------------------------------------------------------------------------- causal LM


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("causal-LM data needs a tokenizer with an eos token; this one has none")
    return tokenizer.eos_token_id


def _with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else ids + [eos]


def _encode_text(batch, tokenizer, cfg):
    eos = _eos_id(tokenizer)
    ids = [_with_eos(x, eos) for x in tokenizer(batch[cfg.text_column])["input_ids"]]
    return {"input_ids": ids, "labels": [list(x) for x in ids]}


def _encode_prompt_response(batch, tokenizer, cfg):
    # Tokenised apart and joined, so the mask covers exactly the prompt's tokens. Put any separator
    # (space, newline) at the end of the prompt.
    eos = _eos_id(tokenizer)
    prompts = tokenizer(batch[cfg.prompt_column])["input_ids"]
    responses = tokenizer(batch[cfg.response_column], add_special_tokens=False)["input_ids"]
    ids, labels = [], []
    for prompt, response in zip(prompts, responses):
        response = _with_eos(response, eos)
        ids.append(prompt + response)
        labels.append([IGNORE_INDEX] * len(prompt) + response)
    return {"input_ids": ids, "labels": labels}


def _split_last_assistant(conversation: list[dict]) -> tuple[list[dict], list[dict]]:
    """(context before the last assistant message, conversation up to and including it)."""
    roles = [m.get("role") for m in conversation]
    if "assistant" not in roles:
        raise DataError(f"conversation has no assistant message to learn from; roles: {roles}")
    last = len(roles) - 1 - roles[::-1].index("assistant")
    if last == 0:
        raise DataError("conversation starts with the assistant message; nothing to condition on")
    return conversation[:last], conversation[: last + 1]


def _encode_messages(batch, tokenizer, cfg):
    """Template conversations; loss only on the last assistant message.

    The prompt is the conversation before that message templated with add_generation_prompt=True;
    every token before its end gets label -100. Limitations: in a multi-turn conversation earlier
    assistant turns are context only (no loss; split the conversation into one row per turn to
    train on them), messages after the last assistant turn are dropped, and the template must
    render that prompt as an exact prefix of the whole conversation (a DataError says when it
    does not). Whether the learned turn ends in eos is up to the template.
    """
    contexts, conversations = zip(*(_split_last_assistant(c) for c in batch[cfg.messages_column]))
    full = tokenizer.apply_chat_template(list(conversations), tokenize=True, return_dict=True)["input_ids"]
    prompts = tokenizer.apply_chat_template(
        list(contexts), tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    labels = []
    for ids, prompt in zip(full, prompts):
        if ids[: len(prompt)] != prompt:
            raise DataError(
                "the chat template does not render the conversation before the last assistant message "
                "(with add_generation_prompt=True) as a prefix of the whole conversation; "
                "the assistant tokens cannot be located"
            )
        labels.append([IGNORE_INDEX] * len(prompt) + ids[len(prompt):])
    return {"input_ids": full, "labels": labels}


_ENCODERS = {"text": _encode_text, "prompt_response": _encode_prompt_response, "messages": _encode_messages}


def _truncate(batch, max_length: int):
    ids = [x[:max_length] for x in batch["input_ids"]]
    return {"input_ids": ids, "labels": [x[:max_length] for x in batch["labels"]],
            "attention_mask": [[1] * len(x) for x in ids]}


def _pack(batch, max_length: int):
    # Concatenate (each row already ends in eos) and cut into full blocks; the tail of every
    # 1000-row map batch is dropped, as in transformers' run_clm. Attention crosses documents.
    ids = list(itertools.chain.from_iterable(batch["input_ids"]))
    labels = list(itertools.chain.from_iterable(batch["labels"]))
    stop = len(ids) // max_length * max_length
    blocks = range(0, stop, max_length)
    return {"input_ids": [ids[i:i + max_length] for i in blocks],
            "labels": [labels[i:i + max_length] for i in blocks],
            "attention_mask": [[1] * max_length for _ in blocks]}


def _drop_unsupervised(ds: datasets.Dataset, name: str) -> datasets.Dataset:
    # Rows whose response was cut away by truncation teach nothing (and give a NaN loss alone).
    kept = ds.filter(lambda b: [any(t != IGNORE_INDEX for t in x) for x in b["labels"]], batched=True)
    if len(kept) < len(ds):
        logger.warning("%s: dropped %d of %d rows with no label token left after truncation/packing",
                       name, len(ds) - len(kept), len(ds))
    if len(kept) == 0:
        raise DataError(f"{name} split has no token to learn from after truncation/packing (max_length too small?)")
    return kept


def _tokenize_causal(ds: datasets.Dataset, name: str, tokenizer, cfg) -> datasets.Dataset:
    encode = _ENCODERS[cfg.format]
    ds = ds.map(encode, batched=True, remove_columns=ds.column_names,
                fn_kwargs={"tokenizer": tokenizer, "cfg": cfg}, desc=f"tokenize {cfg.format}")
    if cfg.packing:
        ds = ds.map(_pack, batched=True, remove_columns=ds.column_names,
                    fn_kwargs={"max_length": cfg.max_length}, desc="pack")
        if len(ds) == 0:
            raise DataError(f"{name} split has fewer tokens than one packed block of max_length={cfg.max_length}")
    else:
        ds = ds.map(_truncate, batched=True, fn_kwargs={"max_length": cfg.max_length}, desc="truncate")
    return _drop_unsupervised(ds, name)


def _causal_columns(cfg) -> dict[str, list[str]]:
    if cfg.format not in CAUSAL_FORMATS:
        raise DataError(f"unknown data.format {cfg.format!r}; expected one of: {', '.join(CAUSAL_FORMATS)}")
    return {
        "text": {"text": [cfg.text_column]},
        "prompt_response": {"prompt": [cfg.prompt_column], "response": [cfg.response_column]},
        "messages": {"messages": [cfg.messages_column]},
    }[cfg.format]


def _check_messages(splits: dict[str, datasets.Dataset], column: str) -> None:
    for name, ds in splits.items():
        feature = ds.features[column]
        if not isinstance(feature, (datasets.List, datasets.LargeList, list)):
            raise DataError(f"messages column {column!r} of {name} split holds {feature}; expected lists of "
                            f"{{role, content}} messages")


def load_causal_data(cfg, tokenizer, seed: int) -> CausalData:
    """Load, check and tokenise causal-LM data (`text`, `prompt_response` or `messages` format).

    Labels equal input_ids except IGNORE_INDEX (-100) on prompt tokens (`prompt_response`) or on
    everything before the last assistant message (`messages`; see `_encode_messages`). With
    `packing`, rows are concatenated into blocks of exactly `max_length` tokens; otherwise each row
    is truncated to `max_length`.

    Args:
        cfg: the recipe's `DataConfig`.
        tokenizer: a Hugging Face tokenizer with an eos token (and a chat template for `messages`).
        seed: seeds the `eval_fraction` hold-out and the `max_*_samples` subsets.

    Returns:
        `CausalData` with input_ids, attention_mask and labels.

    Raises:
        DataError: any problem with the source, splits, columns, values or tokenizer.
    """
    if cfg.glue_task:
        raise DataError(
            f"glue_task ({cfg.glue_task!r}) is for classification; causal-LM data needs path or train_files"
        )
    columns = _causal_columns(cfg)
    _eos_id(tokenizer)
    if cfg.format == "messages" and not tokenizer.chat_template:
        raise DataError("data.format 'messages' needs a tokenizer with a chat_template; this one has none")
    train, evals = _load_splits(cfg, seed, None, columns)
    splits, _ = _named_splits(cfg.train_split, train, evals)
    if cfg.format == "messages":
        _check_messages(splits, cfg.messages_column)
    else:
        _check_text(splits, [c for cols in columns.values() for c in cols])
    return CausalData(
        train=_tokenize_causal(train, cfg.train_split, tokenizer, cfg),
        evals={k: _tokenize_causal(ds, k, tokenizer, cfg) for k, ds in evals.items()},
        format=cfg.format,
        packing=cfg.packing,
    )


# --------------------------------------------------------------------------- batching


class LengthGroupedSampler(Sampler[int]):
    """Random order in which each run of `batch_size` indices holds rows of similar length.

    Per epoch, with a generator seeded by `seed + epoch`: shuffle, cut into mega-batches of up to
    50 batches, sort each by length (transformers' `get_length_grouped_indices`), chunk into
    batches, and shuffle the batch order. The batch holding the longest row stays first, so an
    out-of-memory error shows at step 0, and a short last batch stays last, so DataLoader's
    re-chunking into `batch_size` finds the same batches.

    The order depends only on (seed, epoch): every process of a multi-process run, and a run
    resumed with Accelerate's `skip_first_batches`, sees the same batches. Accelerate's prepared
    loader calls `set_epoch` each epoch; without it the epoch advances after each full pass.
    (No `generator` attribute on purpose: Accelerate would re-seed such a generator itself.)
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next pass yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        if not self.lengths:
            return
        rng = torch.Generator().manual_seed(self.seed + self.epoch)
        order = get_length_grouped_indices(self.lengths, self.batch_size, generator=rng)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        last = len(batches) if len(batches[-1]) == self.batch_size else len(batches) - 1
        middle = batches[1:last]
        shuffled = [middle[i] for i in torch.randperm(len(middle), generator=rng).tolist()]
        for batch in batches[:1] + shuffled + batches[max(last, 1):]:
            yield from batch
        self.epoch += 1


def _lengths(dataset: datasets.Dataset) -> list[int]:
    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()


def _sampler(dataset, batch_size: int, shuffle: bool, seed: int, group_by_length: bool):
    if shuffle and group_by_length:
        return LengthGroupedSampler(_lengths(dataset), batch_size, seed)
    if shuffle:
        return SeedableRandomSampler(dataset, data_seed=seed)
    if group_by_length:
        # Evaluation: longest first, no randomness; predictions stay paired with their labels.
        lengths = _lengths(dataset)
        return sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    return None


def make_dataloader(
    dataset: datasets.Dataset,
    tokenizer,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    group_by_length: bool,
    task: str = "classification",
) -> DataLoader:
    """A plain DataLoader (so `accelerator.prepare` can shard it) with dynamic padding.

    Args:
        dataset: tokenised; columns other than `MODEL_INPUTS` are dropped.
        tokenizer: pads the batches; needs a pad token.
        batch_size: rows per batch (per process).
        shuffle: a new seeded order each epoch (training); False keeps a fixed order (evaluation).
        seed: seeds the order, with the epoch.
        group_by_length: batch rows of similar length to waste less padding.
        task: "classification" (scalar labels) or "causal" (label sequences padded with -100).

    Returns:
        A `torch.utils.data.DataLoader` yielding dicts of tensors, padded to each batch's own
        longest row.

    Raises:
        DataError: unknown task, untokenised dataset or a tokenizer without a pad token.
    """
    if task not in ("classification", "causal"):
        raise DataError(f"unknown task {task!r}; expected 'classification' or 'causal'")
    if "input_ids" not in dataset.column_names:
        raise DataError(f"dataset is not tokenised: no input_ids; columns are: {', '.join(dataset.column_names)}")
    if tokenizer.pad_token is None:
        raise DataError("tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    dataset = dataset.select_columns([c for c in MODEL_INPUTS if c in dataset.column_names])
    if task == "causal":
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                          pad_to_multiple_of=None)
    else:
        collator = DataCollatorWithPadding(tokenizer, padding=True, pad_to_multiple_of=None)
    sampler = _sampler(dataset, batch_size, shuffle, seed, group_by_length)
    # The loader's own generator: each `iter(loader)` draws a worker base seed from it instead of
    # from torch's global RNG, so starting an epoch, an evaluation or a resumed (skipped) pass
    # never shifts the dropout RNG, and a resumed run continues bit-identically.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                      generator=torch.Generator().manual_seed(seed))


def padding_fraction(dataloader) -> float:
    """Share of pad positions (attention_mask == 0) among all token positions of one pass.

    Args:
        dataloader: yields batches with an `attention_mask`.

    Returns:
        pad tokens / total tokens, 0.0 for an empty loader.
    """
    pad = total = 0
    for batch in dataloader:
        mask = batch["attention_mask"]
        pad += int((mask == 0).sum())
        total += mask.numel()
    return pad / total if total else 0.0
