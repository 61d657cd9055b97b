"""Where a recipe's rows come from: a GLUE task, a hub id or local folder, or local files.

    load_raw(cfg, task) -> datasets.DatasetDict     every split the source has, nothing filtered

A GLUE task loads `load_dataset(data.path or "nyu-mll/glue", task)`; `train_files`/`eval_files`
load local csv/json/jsonl/parquet/txt files as the `train`/`validation` splits; any other `path` is
a hub id or local folder (`load_dataset(path, data.name)`). Paths may start with `pkg:` to name a
file inside an installed Python package.

Every failure is a `DataError` naming the source, what was expected and the fix. When `datasets`
hides the reason behind "An error occurred while generating the dataset", the message gives the
reason itself: for local files, the file without rows or the column whose type or presence differs
between files (an all-empty column, ints in one file and strings in another); otherwise the
innermost exception's words.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import datasets

from lrft import glue
from lrft.config import resolve_path
from lrft.errors import DataError

FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
GLUE_TASKS = glue.TASKS  # the one table, re-exported under the name callers of lrft.data know
STRING_DTYPES = ("string", "large_string")
_CAST_WORDS = ("Failed to parse", "Couldn't cast", "Couldn't write column", "column names don't match")


def glue_task(name: str) -> glue.GlueTask:
    """Look up a GLUE task by name (`lrft.glue.glue_task` with a data error).

    Args:
        name: e.g. "sst2".

    Returns:
        Its `lrft.glue.GlueTask`.

    Raises:
        DataError: unknown name, with the closest known name or the list of tasks.
    """
    try:
        return glue.glue_task(name)
    except KeyError as err:
        raise DataError(err.args[0]) from err


def load_raw(cfg, task: glue.GlueTask | None) -> datasets.DatasetDict:
    """Load every split of the source a recipe's data section names.

    Args:
        cfg: the recipe's `DataConfig`.
        task: the GLUE task (`cfg.glue_task`), or None.

    Returns:
        The source's splits by name, as `datasets` loads them.

    Raises:
        DataError: no source or two sources, a missing path, file or package, an offline hub id,
            an unsupported or empty file, files that disagree on their columns, or any error
            `datasets` raises (with its cause).
    """
    if cfg.eval_files and not cfg.train_files:
        raise DataError("data.eval_files is set but data.train_files is not; set both, or neither")
    if cfg.train_files:
        if cfg.path:
            raise DataError(f"set data.path ({cfg.path!r}) or data.train_files, not both")
        return _load_files(list(cfg.train_files), cfg.eval_files)
    if task is not None:
        return _load_hub_or_folder(cfg.path or glue.DEFAULT_PATH, cfg.glue_task)
    if not cfg.path:
        raise DataError("the data section needs one of: glue_task, path, train_files")
    return _load_hub_or_folder(cfg.path, cfg.name)


# --------------------------------------------------------------------------- hub ids and folders


def _hub_offline() -> bool:
    flags = (os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f in ("1", "ON", "YES", "TRUE") for f in flags) or bool(datasets.config.HF_HUB_OFFLINE)


def _looks_like_hub_id(path: str) -> bool:
    # "nyu-mll/glue" or "imdb"; not "./x", "../x", "/abs", "a/b/c"
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", path) is not None


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


def _resolve(path: str) -> str:
    try:
        return resolve_path(path)
    except FileNotFoundError as err:
        raise DataError(str(err)) from err


def _load(path_or_builder: str, name: str | None, shown: str, **kwargs) -> datasets.DatasetDict:
    # load_dataset's own errors carry the detail (missing config, bad file); keep them, add what was asked.
    try:
        return datasets.load_dataset(path_or_builder, name, **kwargs)
    except Exception as err:
        hint = ""
        if _looks_like_hub_id(shown) and not os.path.exists(shown):
            hint = " (if this machine has no network, download the data elsewhere and set `path:` to a local folder)"
        raise DataError(f"could not load dataset {shown!r} (config {name!r}){hint}: {_reason(err)}") from err


def _reason(err: BaseException) -> str:
    """The error's words, followed by those of its innermost cause when `datasets` wrapped one."""
    inner = err
    while inner.__cause__ is not None or (inner.__context__ is not None and not inner.__suppress_context__):
        inner = inner.__cause__ or inner.__context__
    if inner is err:
        return str(err)
    lines = [line for line in str(inner).splitlines() if line.strip()]
    words = lines[0] if len(lines) < 3 else f"{lines[0]} ... {lines[-1]}"  # CastError prints whole schemas
    words = words.rstrip(".") if len(words) <= 300 else words[:297] + "..."
    reason = f"{err}: {type(inner).__name__}: {words}"
    if any(w in words for w in _CAST_WORDS):
        reason += ("; a column differs between files or splits (a header-only file, an all-empty "
                   "column, ints in one file and strings in another): give every file the same "
                   "columns, each with one type")
    return reason


# --------------------------------------------------------------------------- local files


def _builder_for(files: list[str]) -> str:
    builders = {FILE_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in builders or len(builders) != 1:
        raise DataError(
            f"data files must share one of the types {', '.join(FILE_BUILDERS)}; found: {', '.join(files)}"
        )
    return builders.pop()


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _load_files(train_files: list[str], eval_files: list[str] | None) -> datasets.DatasetDict:
    named = {"train": train_files, **({"validation": eval_files} if eval_files else {})}
    resolved = {split: [_resolve(f) for f in files] for split, files in named.items()}
    for split, files in resolved.items():
        for shown, f in zip(named[split], files):
            if not _is_glob(f) and not os.path.exists(f):
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
        if isinstance(err.__cause__, datasets.exceptions.DatasetGenerationError):
            found = _files_disagree(builder, named, resolved)
            if found:
                raise DataError(f"could not load dataset {', '.join(train_files)!r}: {found}") from err
        raise


def _files_disagree(builder: str, named: dict, resolved: dict) -> str | None:
    """Load each file alone and say how they differ: a file without rows, columns, or column types.

    Only called after loading them together failed. Returns None when nothing differs (or a glob
    or a file that fails alone hides it); the caller then shows datasets' own reason.
    """
    columns: dict[str, dict[str, str]] = {}  # file as the recipe names it -> {column: type}
    for split, files in resolved.items():
        for shown, path in zip(named[split], files):
            if _is_glob(path):
                return None
            try:
                ds = datasets.load_dataset(builder, data_files=[path], split="train")
            except Exception as err:  # noqa: BLE001 - a file that fails alone: datasets' reason stands
                if "corresponds to no data" in str(err):
                    return (f"{split} file {shown!r} holds no rows (a header only?); expected at least "
                            f"one row in every file: remove the file or add rows")
                return None
            columns[shown] = {c: _type_of(ds, c) for c in ds.column_names}
    first, *others = columns
    for other in others:
        if list(columns[other]) != list(columns[first]):
            return (f"the files have different columns: {first!r} has {', '.join(columns[first])}; "
                    f"{other!r} has {', '.join(columns[other])}; expected the same columns in every "
                    f"file: rename or drop the extra ones")
    for column in columns[first]:
        types = {shown: found[column] for shown, found in columns.items()}
        if len(set(types.values())) > 1:
            shown = "; ".join(f"{t} in {f!r}" for f, t in types.items())
            return (f"column {column!r} holds different types in different files ({shown}); expected "
                    f"one type in every file: write the same kind of value in each (all numbers or "
                    f"all strings), fill an all-empty column or drop it")
    return None


def _type_of(ds: datasets.Dataset, column: str) -> str:
    """A column's type as a message shows it: 'int64', 'string', 'float64 (every value empty)'."""
    feature = ds.features[column]
    dtype = getattr(feature, "dtype", type(feature).__name__)
    dtype = "string" if dtype in STRING_DTYPES else dtype
    if len(ds) and ds.with_format("arrow")[column].null_count == len(ds):
        return f"{dtype} (every value empty)"
    return dtype
