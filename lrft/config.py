"""Typed YAML configuration: read, inherit (`base:`), override (`key=value`), convert, suggest.

The machinery under both kinds of lrft file, the training recipe (`lrft.recipe`) and the
comparison spec (`lrft.compare.spec`). Every function *reports* problems into a list instead of
raising, so a caller can show every problem of a file at once:

    read_yaml(path) -> resolve_bases (base: chain, deep merge) -> apply overrides -> build_dataclass

Conversion is strict: a YAML value must already have the annotated type, with two exceptions
users rely on: floats accept strings like "5e-5" (PyYAML reads 5e-5 without a dot as a string)
and a choice that includes "no" accepts the false YAML makes of an unquoted `no`. A key that
appears twice in one mapping is an error, not "the last one wins" (a second `train:` section
would silently replace the first).

Imports only PyYAML and the standard library: `lrft check` and `lrft --help` stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConversionError(Exception):
    """A value that does not have (and cannot be read as) the annotated type."""


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------

_REPR = reprlib.Repr()  # bounded: a YAML alias bomb or a long value must not flood a message
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3


def show(value: Any) -> str:
    """A short, bounded repr of a user's value for an error message."""
    return _REPR.repr(value)


def suggest(name: str, choices, what: str = "valid keys") -> str:
    """"did you mean 'x'?" for a close match, else the list of choices."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else f"{what}: " + ", ".join(map(str, choices))


def type_name(tp) -> str:
    """How an annotation reads in an error message: 'a list of str', "'linear' | 'sqrt'"."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


# ---------------------------------------------------------------------------------------------
# Reading YAML
# ---------------------------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key that appears twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (first on line {first.line + 1}); "
                                    f"keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str) -> Any:
    """Parse YAML with the safe loader; duplicate keys raise `yaml.YAMLError`."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Path, problems: list[str], start: str = "recipes/bert/standard.yaml"
              ) -> dict | None:
    """Read one YAML mapping; report (don't raise) an unreadable, invalid or non-mapping file.

    Args:
        path: the file.
        problems: where problems are appended.
        start: a file to suggest when this one is empty.

    Returns:
        The mapping, or None when a problem was reported.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        problems.append(f"{path}: no such file")
        return None
    except UnicodeDecodeError as e:  # before ValueError, its base class
        problems.append(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8")
        return None
    except (OSError, ValueError) as e:  # a directory, no permission, a symlink loop, a NUL byte
        problems.append(f"{path}: cannot read ({e.__class__.__name__})")
        return None
    try:
        data = load_yaml_text(text)
    except yaml.YAMLError as e:
        problems.append(f"{path}: not valid YAML ({' '.join(str(e).split())})")
        return None
    except RecursionError:  # PyYAML composes nested collections recursively
        problems.append(f"{path}: nested too deeply to be read")
        return None
    if data is None:
        problems.append(f"{path}: the file is empty; start from {start}")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a mapping of sections (model:, data:, ...), "
                        f"got a {type(data).__name__}")
        return None
    return data


def merge(base: dict, top: dict, sections: tuple[str, ...]) -> dict:
    """Deep-merge two mappings one level down: `top` wins; the named sections merge key by key."""
    out = dict(base)
    for key, value in top.items():
        if key in sections and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def resolve_bases(path: Path, problems: list[str], sections: tuple[str, ...],
                  seen: tuple[Path, ...] = ()) -> dict | None:
    """Read `path` and everything it inherits through `base:` (a path relative to the file).

    Returns:
        The merged mapping without `base:`, or None when the file itself could not be read.
    """
    try:
        path = path.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte in the name
        problems.append(f"{path}: not a usable path ({e.__class__.__name__})")
        return None
    if path in seen:
        problems.append(f"base: inheritance cycle: {' -> '.join(map(str, (*seen, path)))}")
        return None
    data = read_yaml(path, problems)
    if data is None:
        return None
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        problems.append(f"base: expected a path to another file, got {show(base)}")
        return data
    parent = resolve_bases(path.parent / base, problems, sections, (*seen, path))
    return data if parent is None else merge(parent, data, sections)


# ---------------------------------------------------------------------------------------------
# Overrides: `a.b=value`
# ---------------------------------------------------------------------------------------------

def parse_override(item: Any) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], value), the value read as YAML.

    A plain string that is not YAML (a path with a colon) stays a string; text that opens a
    list or mapping but does not close it (`[none`) is an error, not the string '[none'.

    Raises:
        ConversionError: no `=`, an empty key part, or a broken list/mapping value.
    """
    if not isinstance(item, str) or "=" not in item:
        raise ConversionError(f"override {item!r}: expected key=value, e.g. "
                              f"optim.learning_rate=3e-5")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(p.strip() for p in parts):
        raise ConversionError(f"override {item!r}: the key has an empty part")
    return [p.strip() for p in parts], parse_value(text, item)


def parse_value(text: str, item: str | None = None) -> Any:
    """One override value as YAML; see :func:`parse_override`."""
    if not text.strip():
        return None
    try:
        return load_yaml_text(text)
    except (yaml.YAMLError, RecursionError):
        if text.strip()[:1] in "[{":
            raise ConversionError(f"override {item or text!r}: {text.strip()!r} opens a "
                                  f"{'list' if text.strip()[0] == '[' else 'mapping'} that "
                                  f"does not close; e.g. [a, b]") from None
        return text  # a plain string such as a path with a colon


# ---------------------------------------------------------------------------------------------
# Typed conversion
# ---------------------------------------------------------------------------------------------

def _is_tree(value: Any, max_nodes: int = 10_000, max_depth: int = 32) -> bool:
    """Nested mappings/lists small enough to copy and print: YAML anchors can build cycles
    (`&a {x: *a}`) and alias bombs, which would hang or overflow a dump."""
    stack, nodes = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes or depth > max_depth:
            return False
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return True


def convert(value: Any, tp) -> Any:
    """Convert a YAML value to the annotated type.

    Raises:
        ConversionError: the value does not have the type (see the module docstring).
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return convert(value, arg)
            except ConversionError:
                continue
        raise ConversionError
    if origin is Literal:
        if value is False and "no" in typing.get_args(tp):
            return "no"  # YAML 1.1 reads an unquoted `no` as false: mixed_precision: no
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise ConversionError
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            return [value]  # one name where a list is expected: text_columns: sentence
        if not isinstance(value, list):
            raise ConversionError
        return [convert(v, item) for v in value]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value) \
                or not _is_tree(value):
            raise ConversionError
        return dict(value)
    return _convert_scalar(value, tp)


def _convert_scalar(value: Any, tp) -> Any:
    if tp is Any:
        return value
    if tp is type(None) and value is None:
        return None
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    if tp is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            return float(value)
        except (ValueError, OverflowError):  # not a number; an int beyond float range
            raise ConversionError from None
    raise ConversionError


def build_dataclass(cls, raw: Any, where: str, problems: list[str]):
    """Build dataclass `cls` from a mapping, reporting every unknown key and bad value.

    Args:
        cls: a dataclass whose fields all have defaults.
        raw: the mapping (None gives the defaults).
        where: the key path shown in messages, e.g. `optim`.
        problems: where problems are appended.

    Returns:
        The instance; keys that failed keep their defaults.
    """
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of keys, got {show(raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            problems.append(f"{where}.{key}: unknown key; {suggest(str(key), names)}")
            continue
        try:
            kwargs[key] = convert(value, hints[key])
        except ConversionError:
            problems.append(f"{where}.{key}: expected {type_name(hints[key])}, got {show(value)}")
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------

def resolve_path(path: str) -> str:
    """Turn ``pkg:<package>/<sub/path>`` into a path inside an installed Python package.

    The package is located with `importlib.util.find_spec`, without importing it: some packages
    that ship models import unrelated dependencies on import. Other paths get `~` expanded.

    Raises:
        FileNotFoundError: the named package is not installed.
    """
    import importlib.util

    if not path.startswith("pkg:"):
        return str(Path(path).expanduser()) if path.startswith("~") else path
    package, _, sub = path[len("pkg:"):].partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{path}: Python package {package!r} is not installed; "
                                f"pip install {package.replace('_', '-')}")
    root = Path(list(spec.submodule_search_locations)[0])
    return str(root / sub) if sub else str(root)
