"""Checking YAML files that people write: app definitions and site configs.

A line-aware loader (every mapping remembers the line of each key; a key given twice is
an error), and ``Checker``: the helpers both file kinds build their checks from, so that
every error is one line naming the file, the line and the key path, and an unknown key
says which are known and which one was probably meant.
"""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import ConfigError

class LineMap(dict):
    """A YAML mapping that remembers the line of each of its keys."""

    def __init__(self, line: int = 0):
        super().__init__()
        self.line = line
        self.key_lines: dict[Any, int] = {}

    def line_of(self, key: Any) -> int:
        return self.key_lines.get(key, self.line)


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class LineLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue   # keys merged in with '<<' may be overridden
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue   # unhashable key: the base class reports it
                if first is not None:
                    raise _DuplicateKey(None, None, f"duplicate key '{key}' (first at line {first})",
                                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)

    def construct_line_map(self, node):
        data = LineMap(node.start_mark.line + 1)
        yield data
        data.update(self.construct_mapping(node))
        # node.value is flattened by now: merged keys first, so the map's own keys win.
        for key_node, _ in node.value:
            data.key_lines[self.construct_object(key_node)] = key_node.start_mark.line + 1


LineLoader.add_constructor("tag:yaml.org,2002:map", LineLoader.construct_line_map)


def parse_yaml(text: str, file: str) -> Any:
    try:
        return yaml.load(text, Loader=LineLoader)
    except _DuplicateKey as exc:
        raise ConfigError(exc.problem, file=file, line=exc.problem_mark.line + 1) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "malformed"
        context = f" ({exc.context})" if exc.context else ""
        raise ConfigError(f"invalid YAML: {problem}{context}", file=file,
                          line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=file) from None



@dataclass
class Entry:
    value: Any
    key: str        # full key path, as written
    line: int
    written: str    # the key as written (an alias, maybe)


def describe(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean (quote it if you mean a string)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


class Checker:
    """Turns a parsed YAML document into checked values; ``file`` names it in errors, relative
    paths resolve against ``base_dir``."""

    def __init__(self, file: str, base_dir: str):
        self.file = file
        self.base_dir = base_dir

    def error(self, message: str, key: str | None = None, line: int | None = None) -> ConfigError:
        return ConfigError(message, file=self.file, key=key, line=line)

    # -- structure

    def collect(self, mapping: LineMap, prefix: str, accepted: Mapping[str, str | None],
                into: dict[str, Entry]) -> dict[str, Entry]:
        """Map each key of `mapping` to its canonical name; unknown keys and aliases given twice are errors."""
        for key, value in mapping.items():
            line = mapping.line_of(key)
            path = f"{prefix}.{key}" if prefix else str(key)
            if not isinstance(key, str) or key not in accepted:
                raise self.unknown_key(str(key), accepted, path, line)
            canonical = accepted[key]
            if canonical is None:
                continue
            if canonical in into:
                previous = into[canonical]
                raise self.error(f"also given as '{previous.key}' (line {previous.line}): keep one",
                                 path, line)
            into[canonical] = Entry(value, path, line, key)
        return into

    def unknown_key(self, key: str, accepted: Mapping[str, str | None], path: str,
                    line: int) -> ConfigError:
        # List canonical names only; aliases are still accepted and suggested.
        known = sorted(k for k, canonical in accepted.items() if canonical in (k, None))
        message = f"unknown key '{key}' (known: {', '.join(known)})"
        close = difflib.get_close_matches(key, list(accepted), n=1)
        if close:
            message += f"; did you mean '{close[0]}'?"
        return self.error(message, path, line)

    def mapping(self, entry: Entry) -> LineMap:
        if entry.value is None:
            return LineMap(entry.line)
        if not isinstance(entry.value, LineMap):
            raise self.error(f"expected a mapping, got {describe(entry.value)}", entry.key, entry.line)
        return entry.value

    # -- scalar conversions

    def scalar(self, value: Any, entry: Entry) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(f"expected a string, got {describe(value)}", entry.key, entry.line)
        return str(value)

    def text(self, entry: Entry) -> str | None:
        return None if entry.value is None else self.scalar(entry.value, entry)

    def integer(self, entry: Entry, minimum: int) -> int | None:
        value = entry.value
        if value is None:
            return None
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(f"expected an integer >= {minimum}, got {describe(value)}",
                             entry.key, entry.line)
        return value

    def number(self, entry: Entry, minimum: float) -> float | None:
        value = entry.value
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
            raise self.error(f"expected a number >= {minimum:g}, got {describe(value)}",
                             entry.key, entry.line)
        return float(value)

    def string_list(self, entry: Entry, *, split_commas: bool) -> list[str]:
        value = entry.value
        if value is None:
            return []
        if isinstance(value, str):
            items = value.split(",") if split_commas else [value]
        elif isinstance(value, list):
            items = [self.scalar(item, entry) for item in value]
        else:
            raise self.error(f"expected a list of strings, got {describe(value)}", entry.key, entry.line)
        return [item.strip() for item in items if item.strip()]

    def resolve(self, path: str, base: str | None = None) -> str:
        return os.path.normpath(os.path.join(base or self.base_dir, os.path.expanduser(path)))


    def choice(self, entry: Entry, choices: Sequence[str], default: str | None = None) -> str:
        value = (self.text(entry) or default or "").strip()
        if value not in choices:
            raise self.error(f"unknown value '{value}' (use {' or '.join(choices)})", entry.key, entry.line)
        return value

