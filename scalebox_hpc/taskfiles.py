"""Read what a module program leaves in its WORK_DIR.

Pure functions: no database, no subprocess. Every parse error is a ``TaskFileError``
whose message is one line naming the file, the 1-based line (or the key, for
``task-exec.json``), what is wrong and what format is expected.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import yaml

from .errors import TaskFileError

SINK_FORMATS = ('body, body,{headers}, module,body, module,body,{headers} '
                'or {"module":..,"body":..,"headers":{..}}')
HEADERS_FORMAT = 'body,{"key":"value"} (a JSON object of strings, numbers, booleans or null)'
SEMAPHORE_FORMAT = "name +N, name -N or name =N (N a non-negative integer)"
TIMESTAMP_FORMAT = ("label,ISO-8601 or a bare ISO-8601 date-time "
                    "(e.g. program-start,2024-05-01T12:00:00Z)")


def _quote(text: str, limit: int = 80) -> str:
    """Quote user text for a one-line error message."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return json.dumps(text, ensure_ascii=False)


def _show(value: Any, limit: int = 80) -> str:
    """A JSON value as one line of text for an error message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."


def _line_error(filename: str, lineno: int, problem: str, expected: str) -> TaskFileError:
    return TaskFileError(f"{filename} line {lineno}: {problem}; expected {expected}")


def _json_problem(exc: json.JSONDecodeError) -> str:
    return f"{exc.msg} at column {exc.colno}"


def _lines(text: str) -> Iterable[tuple[int, str]]:
    """Yield (1-based line number, line) with a trailing \\r removed.

    Splits on \\n only: str.splitlines() would also split on characters such as
    U+2028 that may legitimately appear inside a body.
    """
    for lineno, line in enumerate(text.split("\n"), start=1):
        yield lineno, line.removesuffix("\r")


# ---------------------------------------------------------------------------
# sink-tasks.txt

@dataclass
class SinkMessage:
    module: str | None  # None: to the producing module's sink_modules, else main_router
    body: str
    headers: dict = field(default_factory=dict)


FILES_HEADER = "files"


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _check_headers(headers: Any, filename: str, lineno: int) -> dict:
    if not isinstance(headers, dict):
        raise _line_error(filename, lineno,
                          f"headers are a JSON {type(headers).__name__}, not an object",
                          HEADERS_FORMAT)
    for key, value in headers.items():
        if key == FILES_HEADER:
            # The files a message hands on (forwarded when its module is at another site).
            if isinstance(value, str):
                headers[key] = value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise _line_error(filename, lineno, f"header \"files\" must be a path or a list of paths, "
                                  f"got {_show(value)}", '"files": ["out/a.dat", "b.dat"]')
        elif not _is_scalar(value):
            raise _line_error(filename, lineno,
                              f"header {_quote(key)} has a non-scalar value {_show(value)}",
                              HEADERS_FORMAT)
    return headers


def _parse_json_line(line: str, known_modules: Collection[str], filename: str, lineno: int) -> SinkMessage:
    """A line that starts with '{': our JSON message ({"module":..,"body":..,"headers":..};
    one with "module" or "headers", or only "body"), or upstream's JSON body, alone or
    followed by ,{headers}: the JSON text is the body."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        if "module" in obj or "headers" in obj or set(obj) == {"body"}:
            return _parse_json_message(line, known_modules, filename, lineno)
        return SinkMessage(module=None, body=line)
    if obj is None and "},{" in line:
        rest, headers = _split_headers(line, filename, lineno)
        try:
            body_obj = json.loads(rest)
        except json.JSONDecodeError:
            body_obj = None
        if isinstance(body_obj, dict):
            return SinkMessage(module=None, body=rest, headers=headers)
    return _parse_json_message(line, known_modules, filename, lineno)


def _parse_json_message(line: str, known_modules: Collection[str],
                        filename: str, lineno: int) -> SinkMessage:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _line_error(filename, lineno, f"invalid JSON message: {_json_problem(exc)}",
                          SINK_FORMATS) from None
    unknown = sorted(set(obj) - {"module", "body", "headers"})
    if unknown:
        raise _line_error(filename, lineno,
                          f"unknown key(s) {', '.join(_quote(k) for k in unknown)} in JSON message",
                          '{"module":..,"body":..,"headers":{..}}')
    if "body" not in obj:
        raise _line_error(filename, lineno, 'JSON message has no "body"',
                          '{"module":..,"body":..,"headers":{..}}')
    body = obj["body"]
    if isinstance(body, bool) or not isinstance(body, (str, int, float)):
        raise _line_error(filename, lineno,
                          f'"body" is a JSON {type(body).__name__}', 'a string or number "body"')
    module = obj.get("module")
    if module is not None:
        if not isinstance(module, str):
            raise _line_error(filename, lineno,
                              f'"module" is a JSON {type(module).__name__}', 'a module name string')
        if module not in known_modules:
            names = ", ".join(sorted(known_modules)) or "(none)"
            raise _line_error(filename, lineno, f"unknown module {_quote(module)}",
                              f"one of: {names}")
    headers = obj.get("headers")
    headers = {} if headers is None else _check_headers(headers, filename, lineno)
    return SinkMessage(module=module, body=str(body), headers=headers)


def _split_headers(line: str, filename: str, lineno: int) -> tuple[str, dict]:
    """Split 'X,{headers}' into (X, headers); (line, {}) when there is no ',{'.

    Tries each ',{' from the right so that a header value containing ',{' still works.
    """
    starts = [m.start() for m in re.finditer(",{", line)]
    if not starts:
        return line, {}
    problem = ""
    for pos in reversed(starts):
        try:
            headers = json.loads(line[pos + 1:])
        except json.JSONDecodeError as exc:
            # Report the rightmost candidate: that is where headers are expected to start.
            problem = problem or f"{_json_problem(exc)} in {_quote(line[pos + 1:])}"
        else:
            return line[:pos], _check_headers(headers, filename, lineno)
    raise _line_error(filename, lineno, f"headers are not a JSON object: {problem}", HEADERS_FORMAT)


def parse_sink_tasks(text: str, *, known_modules: Collection[str],
                     filename: str = "sink-tasks.txt") -> list[SinkMessage]:
    """Parse sink-tasks.txt (alias messages.txt): one message per line.

    ``module,body`` is only recognised when the first field is a known module name, so a
    body with commas stays intact when its first field is not a module.
    """
    messages = []
    for lineno, line in _lines(text):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            messages.append(_parse_json_line(line, known_modules, filename, lineno))
            continue
        rest, headers = _split_headers(line, filename, lineno)
        module, sep, body = rest.partition(",")
        if sep and module in known_modules:
            messages.append(SinkMessage(module=module, body=body, headers=headers))
        else:
            messages.append(SinkMessage(module=None, body=rest, headers=headers))
    return messages


# ---------------------------------------------------------------------------
# .scalebox/: what the in-task `scalebox` command wrote (scalebox_hpc/intask/scalebox)

INTASK_DIR = ".scalebox"


@dataclass
class InTask:
    messages: list[SinkMessage] = field(default_factory=list)
    app_result: str | None = None          # None: set-finished was not called
    semaphores: list["SemaphoreOp"] = field(default_factory=list)


def read_intask_dir(path: str, *, known_modules: Collection[str]) -> InTask:
    """What the in-task command left in ``path``: the messages of `scalebox task add`
    (N.body byte for byte, or N.lines in the sink-tasks.txt format; N.meta: the module on
    its first line, then k=v headers) in the order they were added, the text of
    `scalebox app set-finished`, and the semaphore changes (a semaphores.txt of its own)."""
    try:
        names = set(os.listdir(path))
    except FileNotFoundError:
        return InTask()
    messages = []
    numbers = sorted(int(n[:-5]) for n in names if n.endswith(".meta") and n[:-5].isdigit())
    for number in numbers:
        where = f"{INTASK_DIR}/{number}"
        lines = f"{number}.lines" in names
        try:
            with open(os.path.join(path, f"{number}.lines" if lines else f"{number}.body"), "rb") as fh:
                body = fh.read().decode()
            with open(os.path.join(path, f"{number}.meta"), "rb") as fh:
                meta = fh.read().decode()
        except (OSError, UnicodeDecodeError) as exc:
            raise TaskFileError(f"scalebox task add: message {where} cannot be read: {exc}") from None
        module, _, header_lines = meta.partition("\n")
        if module and module not in known_modules:
            choices = ", ".join(sorted(known_modules)) or "(none)"
            raise TaskFileError(f"scalebox task add: unknown sink module {_quote(module)}; "
                                f"expected one of: {choices}")
        headers: dict[str, Any] = {}
        for line in header_lines.split("\n"):
            if line.startswith("{"):   # --headers '{"k":"v"}'
                try:
                    more = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TaskFileError(f"scalebox task add --headers {_quote(line)}: {_json_problem(exc)}; "
                                        f"expected a JSON object") from None
                headers.update(_check_headers(more, where, 1))
            elif line:
                key, _, value = line.partition("=")
                headers[key] = value
        headers = _check_headers(headers, where, 1)
        if not lines:
            messages.append(SinkMessage(module=module or None, body=body, headers=headers))
            continue
        # --task-file / stdin: lines as in sink-tasks.txt; the flags' module and headers apply to each.
        for message in parse_sink_tasks(body, known_modules=known_modules, filename=f"scalebox task add ({where})"):
            messages.append(SinkMessage(module=message.module or module or None, body=message.body,
                                        headers={**headers, **message.headers}))
    found = InTask(messages)
    if "app-result" in names:
        with open(os.path.join(path, "app-result"), errors="replace") as fh:
            found.app_result = fh.read().strip()
    if "semaphores" in names:
        with open(os.path.join(path, "semaphores"), errors="replace") as fh:
            found.semaphores = parse_semaphores(fh.read(), f"{INTASK_DIR}/semaphores")
    return found


# ---------------------------------------------------------------------------
# semaphores.txt

@dataclass
class SemaphoreOp:
    name: str
    op: str  # '+', '-' or '='
    value: int


# Non-greedy name so 'a-b +3' is ('a-b', '+', 3) and 'x-1' is ('x', '-', 1).
_SEMAPHORE_RE = re.compile(r"(\S+?)\s*([+\-=])\s*([0-9]+)")


def parse_semaphores(text: str, filename: str = "semaphores.txt") -> list[SemaphoreOp]:
    ops = []
    for lineno, line in _lines(text):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _SEMAPHORE_RE.fullmatch(stripped)
        if not match:
            raise _line_error(filename, lineno, f"cannot parse {_quote(stripped)}", SEMAPHORE_FORMAT)
        name, op, value = match.groups()
        ops.append(SemaphoreOp(name=name, op=op, value=int(value)))
    return ops


# ---------------------------------------------------------------------------
# timestamps (timestamps.txt and task-exec.json)

def _check_iso(value: str) -> None:
    """Raise ValueError unless value is an ISO-8601 date-time (a comma before the
    fraction of a second, as `date --iso-8601=ns` writes it, included)."""
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    datetime.fromisoformat(value)


def _is_iso(value: str) -> bool:
    try:
        _check_iso(value)
    except ValueError:
        return False
    return True


def _label_and_stamp(text: str) -> tuple[str, str, bool]:
    """Split one user timestamp: 'label,ISO-8601', or a bare ISO-8601 date-time (as
    upstream's timestamps.txt has them), whose label is ''. Returns (label, stamp,
    had_comma)."""
    text = text.strip()
    if _is_iso(text):
        return "", text, False
    label, sep, stamp = (part.strip() for part in text.partition(","))
    return label, stamp, bool(sep)


def parse_timestamps(text: str, filename: str = "timestamps.txt") -> list[tuple[str, str]]:
    """Parse 'label,ISO-8601' lines, or bare ISO-8601 lines (label ''); the
    timestamp string is kept as given."""
    stamps = []
    for lineno, line in _lines(text):
        if not line.strip() or line.lstrip().startswith("#"):      # '#': a comment, as upstream
            continue
        label, stamp, sep = _label_and_stamp(line)
        if sep and not label:
            raise _line_error(filename, lineno, f"no label before a comma in {_quote(line)}",
                              TIMESTAMP_FORMAT)
        try:
            _check_iso(stamp)
        except ValueError:
            raise _line_error(filename, lineno, f"invalid ISO-8601 date-time {_quote(stamp)}",
                              TIMESTAMP_FORMAT) from None
        stamps.append((label, stamp))
    return stamps


# ---------------------------------------------------------------------------
# task-exec.json

@dataclass
class TaskExecInfo:
    status_code: int | None = None
    input_bytes: int | None = None
    output_bytes: int | None = None
    input_files: list[str] | None = None
    output_files: list[str] | None = None
    timestamps: list[tuple[str, str]] = field(default_factory=list)
    user_text: str | None = None
    sink_module: str | None = None              # upstream's sinkJob: where messageBody goes
    message_body: list[str] | None = None       # upstream's messageBody: one body or a list

    def messages(self, known_modules: Collection[str], filename: str = "task-exec.json") -> list[SinkMessage]:
        """The messages of messageBody, to sinkJob (else the module's sink_modules)."""
        module = self.sink_module or None
        if module is not None and module not in known_modules:
            names = ", ".join(sorted(known_modules)) or "(none)"
            raise TaskFileError(f"{filename}: key \"sinkJob\": unknown module {_quote(module)}; "
                                f"expected one of: {names}")
        return [SinkMessage(module=module, body=body) for body in self.message_body or []]


# JSON key (camelCase as in the spec) -> TaskExecInfo field; snake_case is accepted too.
_EXEC_KEYS = {
    "statusCode": "status_code",
    "inputBytes": "input_bytes",
    "outputBytes": "output_bytes",
    "inputFiles": "input_files",
    "outputFiles": "output_files",
    "timestamps": "timestamps",
    "userText": "user_text",
    "sinkJob": "sink_module",
    "messageBody": "message_body",
}
_EXEC_FIELD_BY_KEY = {**_EXEC_KEYS, **{f: f for f in _EXEC_KEYS.values()},
                      "sinkModule": "sink_module", "sink_job": "sink_module"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _exec_timestamps(value: Any, key_error) -> list[tuple[str, str]]:
    expected = ('a list of "label,ISO-8601" or ISO-8601 strings, a list of [label, ISO-8601] '
                'pairs or an object label -> ISO-8601')
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list):
        pairs = []
        for item in value:
            if isinstance(item, str):
                label, stamp, sep = _label_and_stamp(item)
                if sep and not label or not sep and label:
                    raise key_error(f"bad entry {_show(item)}", expected)
                pairs.append((label, stamp))
            elif isinstance(item, list) and len(item) == 2:
                pairs.append(tuple(item))
            else:
                raise key_error(f"bad entry {_show(item)}", expected)
    else:
        raise key_error(f"is a JSON {type(value).__name__}", expected)
    stamps = []
    for label, stamp in pairs:
        if not isinstance(label, str) or not isinstance(stamp, str):
            raise key_error(f"bad entry {_show([label, stamp])}",
                            expected)
        try:
            _check_iso(stamp)
        except ValueError:
            raise key_error(f"invalid ISO-8601 date-time {_quote(stamp)} for {_quote(label)}",
                            expected) from None
        stamps.append((label, stamp))
    return stamps


def parse_task_exec_json(text: str, filename: str = "task-exec.json") -> TaskExecInfo:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _line_error(filename, exc.lineno, f"invalid JSON: {_json_problem(exc)}",
                          "a JSON object") from None
    if not isinstance(obj, dict):
        raise TaskFileError(f"{filename}: top level is a JSON {type(obj).__name__}; "
                            "expected a JSON object")
    return _task_exec(obj, filename)


class _PlainLoader(yaml.SafeLoader):
    """YAML with date-times kept as the text written (a user timestamp stays as given)."""


_PlainLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _load_yaml_mapping(text: str, filename: str) -> dict:
    try:
        obj = yaml.load(text, Loader=_PlainLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise TaskFileError(f"{filename}{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}; "
                            "expected a YAML mapping") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise TaskFileError(f"{filename}: top level is a YAML {type(obj).__name__}; expected a mapping")
    return obj


def parse_task_exec_yaml(text: str, filename: str = "task-exec.yaml") -> TaskExecInfo:
    """Upstream's newer task-exec.yaml: the keys of task-exec.json, in YAML."""
    return _task_exec(_load_yaml_mapping(text, filename), filename)


def parse_extra_attrs(text: str, filename: str = "extra-attrs.yaml") -> dict:
    """Upstream's extra-attrs.yaml: a mapping kept with the attempt as it is (JSON)."""
    obj = _load_yaml_mapping(text, filename)
    try:
        json.dumps(obj)
    except (TypeError, ValueError) as exc:
        raise TaskFileError(f"{filename}: cannot be kept as JSON ({exc}); expected plain "
                            "strings, numbers, lists and mappings") from None
    return obj


def _task_exec(obj: dict, filename: str) -> TaskExecInfo:

    def key_error(key: str):
        def make(problem: str, expected: str) -> TaskFileError:
            return TaskFileError(f"{filename}: key {_quote(key)}: {problem}; expected {expected}")
        return make

    info = TaskExecInfo()
    seen: dict[str, str] = {}
    for key, value in obj.items():
        error = key_error(key)
        name = _EXEC_FIELD_BY_KEY.get(key)
        if name is None:
            raise error("unknown key", f"one of {', '.join(_EXEC_KEYS)} (or their snake_case forms)")
        if name in seen:
            raise error(f"given twice (also as {_quote(seen[name])})", "each key once")
        seen[name] = key
        if value is None:
            continue
        if name == "status_code":
            if not _is_int(value):
                raise error(f"is {_show(value)}", "an integer")
        elif name in ("input_bytes", "output_bytes"):
            if not _is_int(value) or value < 0:
                raise error(f"is {_show(value)}", "a non-negative integer")
        elif name in ("input_files", "output_files"):
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise error(f"is {_show(value)}", "a list of path strings")
        elif name == "timestamps":
            value = _exec_timestamps(value, error)
        elif name in ("user_text", "sink_module"):
            if not isinstance(value, str):
                raise error(f"is {_show(value)}", "a string")
        elif name == "message_body":
            if isinstance(value, str):
                value = [value]
            elif not isinstance(value, list) or not all(isinstance(b, str) for b in value):
                raise error(f"is {_show(value)}", "a string or a list of strings")
        setattr(info, name, value)
    return info


# ---------------------------------------------------------------------------
# input-files.txt / output-files.txt

def parse_file_list(text: str, filename: str) -> list[str]:
    """One path per non-empty line, surrounding whitespace removed."""
    return [line.strip() for _, line in _lines(text) if line.strip()]


def _path_size(path: str) -> int:
    try:
        if os.path.isdir(path):
            return sum(os.path.getsize(os.path.join(root, name))
                       for root, _, names in os.walk(path) for name in names
                       if os.path.isfile(os.path.join(root, name)))
        return os.path.getsize(path)
    except OSError:
        return 0


def sum_file_sizes(paths: Iterable[str], base_dir: str) -> int:
    """Total size of the listed paths (a directory counts its files).

    Missing paths count 0: a program may list files it later removed or that live on
    a file system this node cannot see, which must not fail the task.
    """
    return sum(_path_size(os.path.join(base_dir, path)) for path in paths)
