"""Typed dataclasses built from YAML data, with errors that name the file and line of the bad value.

`read_yaml` returns the data and where each value was written; `merge_yaml` lays one file's data over
another's (what a recipe's `extends` does) keeping both files' lines; `Builder` turns the data into nested
dataclasses by their type hints (Literal, list, optional, bool/int/float/str), naming unknown keys with the
closest valid one. It knows nothing of recipes: `config.py` declares those.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

import yaml

from parallel_r1.settings import ConfigError

Location = tuple[Any, ...]


def location_name(path: Location) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "recipe"


# Where each value of a recipe was written: location in the data -> (file, line). A recipe that extends
# another holds values of both files.
Lines = dict[Location, tuple[str, int]]


class Builder:
    def __init__(self, source: str, lines: Lines):
        self.source = source
        self.lines = lines

    def error(self, path: Location, message: str) -> ConfigError:
        for cut in range(len(path), -1, -1):
            written = self.lines.get(tuple(path[:cut]))
            if written is not None:
                return ConfigError(f"{written[0]}:{written[1]}: {message}")
        return ConfigError(f"{self.source}: {message}")

    def build(self, tp: Any, value: Any, path: Location) -> Any:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            options = typing.get_args(tp)
            if value is None and type(None) in options:
                return None
            (inner,) = [o for o in options if o is not type(None)]
            return self.build(inner, value, path)
        if origin is Literal:
            choices = typing.get_args(tp)
            if isinstance(value, bool) and ("on" if value else "off") in choices:
                value = "on" if value else "off"  # YAML 1.1 reads a bare on / off as a boolean
            if value not in choices:
                hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise self.error(path, f"{location_name(path)}: {value!r} is not one of {list(choices)}{extra}")
            return value
        if origin is list:
            (inner,) = typing.get_args(tp)
            if not isinstance(value, list):
                raise self.error(path, f"{location_name(path)}: expected a list, got {type(value).__name__}")
            return [self.build(inner, v, (*path, i)) for i, v in enumerate(value)]
        if dataclasses.is_dataclass(tp):
            return self.build_dataclass(tp, value, path)
        return self.scalar(tp, value, path)

    def scalar(self, tp: type, value: Any, path: Location) -> Any:
        bad = self.error(path, f"{location_name(path)}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
        if tp is bool:
            if not isinstance(value, bool):
                raise bad
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad
            return value
        if tp is float:
            # PyYAML reads "1e-5" (no dot) as a string, so numeric strings are accepted here.
            if isinstance(value, bool):
                raise bad
            try:
                return float(value)
            except (TypeError, ValueError):
                raise bad from None
        if tp is str:
            if not isinstance(value, str):
                raise bad
            return value
        raise TypeError(f"unsupported config type {tp}")

    def build_dataclass(self, cls: type, value: Any, path: Location) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.error(path, f"{location_name(path)}: expected a mapping of settings, got {value!r}")
        hints = typing.get_type_hints(cls)
        known = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, item in value.items():
            if key not in known:
                hint = difflib.get_close_matches(str(key), known, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else f" (valid: {', '.join(known)})"
                raise self.error((*path, key), f"{location_name(path)}: unknown key {key!r}{extra}")
            kwargs[key] = self.build(hints[key], item, (*path, key))
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise self.error(path, f"{location_name(path)}: missing required key(s) {', '.join(missing)}")
        try:
            return cls(**kwargs)
        except ValueError as exc:  # ConfigError, or the checks of a class shared with the code (SamplingSettings)
            raise self.error(path, f"{location_name(path)}: {exc}") from None


def _line_numbers(node: yaml.Node, source: str, path: Location, out: Lines) -> None:
    out[path] = (source, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*path, key_node.value)
            _line_numbers(value_node, source, key, out)
            out[key] = (source, key_node.start_mark.line + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_numbers(item, source, (*path, i), out)


def read_yaml(text: str, source: str) -> tuple[Any, Lines]:
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    lines: Lines = {}
    if node is not None:
        _line_numbers(node, source, (), lines)
    return data, lines


def _below(lines: Lines, prefix: Location) -> Lines:
    """The entries of `lines` under `prefix`, relative to it."""
    n = len(prefix)
    return {loc[n:]: where for loc, where in lines.items() if loc[:n] == prefix}


def _under(prefix: Location, lines: Lines) -> Lines:
    return {(*prefix, *loc): where for loc, where in lines.items()}


def merge_yaml(base: Any, base_lines: Lines, top: Any, top_lines: Lines, path: Location = ()) -> tuple[Any, Lines]:
    """`top` over `base`, with their lines: mappings merge key by key, the recipe's stages stage by stage
    (matched by name; a new name is appended), and any other value or list of `top` replaces the base's."""
    if isinstance(base, dict) and isinstance(top, dict):
        merged, lines = dict(base), {loc: w for loc, w in base_lines.items() if loc[:1] and loc[0] not in top}
        places = [(key, key) for key in top]
    elif path == ("stages",) and isinstance(base, list) and isinstance(top, list):
        merged, lines = list(base), dict(base_lines)
        names = [stage.get("name") if isinstance(stage, dict) else None for stage in base]
        places = []  # (index in top, index in the merged list)
        for i, stage in enumerate(top):
            name = stage.get("name") if isinstance(stage, dict) else None
            places.append((i, names.index(name) if name is not None and name in names else len(merged)))
            if places[-1][1] == len(merged):
                merged.append(None)
    else:
        return top, top_lines
    for key, place in places:
        value, sub = top[key], _below(top_lines, (key,))
        if isinstance(merged, dict) and key in base or isinstance(merged, list) and place < len(base):
            value, sub = merge_yaml(base[place], _below(base_lines, (place,)), value, sub, (*path, place))
            lines = {loc: w for loc, w in lines.items() if loc[:1] != (place,)}
        merged[place] = value
        lines.update(_under((place,), sub))
    if () in top_lines or () in base_lines:
        lines[()] = top_lines.get((), base_lines.get(()))
    return merged, lines
