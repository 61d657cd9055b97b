"""Loading a comparison spec: read YAML, apply `key=value` overrides, convert, validate.

    read_yaml -> overrides (comparison keys here, `section.key=value` to every cell) -> typed
              -> validated Comparison (lrft.compare.rules)

`load_comparison` reports every problem at once (unknown keys with a did-you-mean), before
anything is planned or trained. What the keys mean: `lrft.compare.spec`.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from lrft.compare.rules import validate
from lrft.compare.spec import (FIELDS, ClusterConfig, Comparison, LauncherConfig, LRGrid,
                               Reference, Selection, TaskDef)
from lrft.config import (ConversionError, build_dataclass, convert, parse_override, parse_value,
                         read_yaml, show, suggest, type_name)
from lrft.errors import RecipeError
from lrft.recipe import SECTIONS, DataConfig

_SECTION_TYPES = {"launcher": LauncherConfig, "lr_grid": LRGrid, "selection": Selection,
                  "cluster": ClusterConfig, "reference": Reference}
_ALWAYS_SET = ("selection", "cluster")  # sections that are never None: `key:` gives the defaults
# How deep `head.a.b=value` may go under each mapping key (optimizers.LABEL.KEY is 2 deep).
_NESTED = {"optimizers": 3, "launcher": 1, "lr_grid": 1, "selection": 1, "task_overrides": 1,
           "learning_rates": 1, "custom_tasks": 3, "cluster": 1, "reference": 2}


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------

def apply_overrides(raw: dict, overrides: list[str], problems: list[str]) -> list[str]:
    """Apply `key=value` overrides of comparison keys to `raw`; return the section.key ones.

    `tasks=[rte,mrpc]` and `tasks=rte,mrpc` both give a list; `optimizers=[adamw,lion]` keeps a
    subset of the optimizers; `optimizers.lion.learning_rate=3e-6`, `lr_grid.points=3` and
    `selection.split=holdout` set one nested key; `section.key=value` goes to every cell.
    """
    cell_overrides = []
    for item in overrides:
        try:
            parts, value = parse_override(item)
        except ConversionError as e:
            problems.append(f"{e}; e.g. tasks=[rte,mrpc] or optim.weight_decay=0.1")
            continue
        head, rest = parts[0], parts[1:]
        if head in SECTIONS:
            cell_overrides.append(item)
        elif head not in FIELDS:
            problems.append(f"override {item!r}: unknown key '{head}'; "
                            f"{suggest(head, [*FIELDS, *SECTIONS])}")
        elif not rest:
            raw[head] = _top_value(head, value, raw, problems)
        elif head not in _NESTED or len(rest) > _NESTED[head]:
            shape = "has no sub-keys; use " + head + "=VALUE" if head not in _NESTED else \
                f"goes {_NESTED[head]} key(s) deep"
            problems.append(f"override {item!r}: '{head}' {shape}")
        elif head == "optimizers" and (len(rest) == 1 or len(rest) == 3 and rest[1] != "schedule"):
            problems.append(f"override {item!r}: expected optimizers.LABEL.KEY=VALUE, e.g. "
                            f"optimizers.lion.learning_rate=3e-6 (or "
                            f"optimizers.LABEL.schedule.KEY=VALUE)")
        elif head == "optimizers" and rest[0] not in (raw.get("optimizers") or {}):
            problems.append(f"override {item!r}: no optimizer {rest[0]!r} in this comparison; "
                            f"{suggest(rest[0], list(raw.get('optimizers') or {}), 'it has')}")
        else:
            _set_nested(raw, [head, *rest], value, item, problems)
    return cell_overrides


def _top_value(head: str, value: Any, raw: dict, problems: list[str]) -> Any:
    if head in ("tasks", "seeds"):
        if isinstance(value, str) and "," in value:
            return [parse_value(v) for v in value.split(",") if v.strip()]
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return [value]  # seeds=1, tasks=rte
    if head == "optimizers" and isinstance(value, (list, str)):
        kept = _select_optimizers(raw.get("optimizers"), value, problems)
        lrs = raw.get("learning_rates")
        if isinstance(lrs, dict) and isinstance(kept, dict):  # the dropped ones' LRs go with them
            raw["learning_rates"] = {k: v for k, v in lrs.items() if k in kept}
        return kept
    return value


def _select_optimizers(current: Any, names: list | str, problems: list[str]) -> Any:
    names = [names] if isinstance(names, str) else names
    if not isinstance(current, dict):
        return current
    for name in names:
        if name not in current:
            problems.append(f"optimizers: no optimizer {name!r} in this comparison; "
                            f"{suggest(str(name), list(current), 'it has')}")
    return {k: v for k, v in current.items() if k in names}


def _set_nested(raw: dict, path: list[str], value: Any, item: str, problems: list[str]) -> None:
    """raw[a][b][c] = value, copying each mapping on the way (the file's dicts stay intact)."""
    container = raw
    for depth, key in enumerate(path[:-1]):
        child = container.get(key)
        if child is None:
            child = {}
        if not isinstance(child, dict):
            problems.append(f"override {item!r}: {'.'.join(path[:depth + 1])} is not a mapping")
            return
        container[key] = child = dict(child)
        container = child
    container[path[-1]] = value


# --------------------------------------------------------------------------------------------
# Typed conversion
# --------------------------------------------------------------------------------------------

def _typed(raw: dict, problems: list[str], failed: set[str], source: str) -> Comparison:
    """The typed Comparison; the key paths whose value failed conversion go into `failed` (they
    keep their defaults) so the rules about them are skipped."""
    hints = typing.get_type_hints(Comparison)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        n = len(problems)
        if key not in FIELDS:
            problems.append(f"{key}: unknown key; {suggest(str(key), FIELDS)}")
        elif key in _SECTION_TYPES:
            kwargs[key] = None if value is None and key not in _ALWAYS_SET else \
                build_dataclass(_SECTION_TYPES[key], value, key, problems)
        elif key == "custom_tasks":
            kwargs[key] = _custom_tasks(value, problems)
        else:
            try:
                kwargs[key] = convert(value, hints[key])
            except ConversionError:
                problems.append(f"{key}: expected {type_name(hints[key])}, got {show(value)}")
        failed.update(m.split(":")[0] for m in problems[n:])
    return Comparison(**kwargs, source=source)


def _custom_tasks(value: Any, problems: list[str]) -> dict[str, TaskDef]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"custom_tasks: expected a mapping of name -> {{title, data}}, "
                        f"got {show(value)}")
        return {}
    out = {}
    for name, entry in value.items():
        where = f"custom_tasks.{name}"
        task = build_dataclass(TaskDef, entry, where, problems)
        build_dataclass(DataConfig, task.data, f"{where}.data", problems)  # keys and types
        out[str(name)] = task
    return out


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _about(message: str, paths: set[str]) -> bool:
    """Whether a problem is about one of the key paths (or below one)."""
    where = message.split(":")[0]
    return any(where == p or where.startswith(p + ".") for p in paths)


def load_comparison(path: str | Path, overrides: list[str] | None = None
                    ) -> tuple[Comparison, list[str]]:
    """Read, override and validate a comparison spec (not yet its cells).

    Args:
        path: the comparison YAML file.
        overrides: `key=value` strings: comparison keys (`tasks=[rte,mrpc]`,
            `optimizers.lion.learning_rate=3e-6`, `selection.split=holdout`) or training-recipe
            keys (`train.max_steps=10`), which go to every cell.

    Returns:
        The comparison, and the `section.key=value` overrides meant for every cell.

    Raises:
        RecipeError: every problem at once, unknown keys with a did-you-mean.
    """
    problems: list[str] = []
    raw = read_yaml(Path(path), problems, start="recipes/glue/compare-cpu.yaml")
    if raw is None:
        raise RecipeError(problems, str(path))
    cell_overrides = apply_overrides(raw, list(overrides or []), problems)
    failed: set[str] = set()
    comparison = _typed(raw, problems, failed, str(path))
    problems += [m for m in validate(comparison, cell_overrides) if not _about(m, failed)]
    if problems:
        raise RecipeError(problems, str(path))
    return comparison, cell_overrides


def is_comparison(path: str | Path) -> bool:
    """Whether `path` reads as a comparison spec: `tasks:`, `optimizers:` or `seeds:` at its top
    and none of a training recipe's sections (so `lrft check` can validate either kind)."""
    raw = read_yaml(Path(path), [])
    return (isinstance(raw, dict) and bool({"tasks", "optimizers", "seeds"} & raw.keys())
            and not set(SECTIONS) & raw.keys())
