"""Load and validate an app definition: the app model (AppDef, ModuleDef).

Everything is checked here, before anything is written anywhere, and every error
names the file, the line and the key path so the user can go straight to it.
Upstream Scalebox spellings (jobs, sink_jobs, start_message, hosts, ...) are
accepted so that upstream apps port with few edits.
"""
from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import ConfigError
from .resources import mebibytes
from .retry import RetryRules
from .yamlcheck import Checker, Entry, LineMap, describe, parse_yaml

APP_FILE_NAMES = ("app.yaml", "app.yml", "scalebox.yaml")
SCALEBOX_ENV = "scalebox.env"
log = logging.getLogger(__name__)
HOST = "host"
HOOKS = ("check", "setup", "teardown")
BUILTINS = ("@noop", "@pass")     # programs built into the worker (runtimes/builtin.py)
DIST_MODES = ("DEFAULT", "HOST-BOUND")
# What the tasks of a HOST-BOUND module do when the host their to_host names is gone.
HOST_FALLBACKS = ("fail", "anywhere")
CONTAINER_MODES = ("exec", "instance")     # one 'apptainer exec' per task, or one instance per worker
FORWARD_MODES = ("stream", "sftp")         # files for other sites: one tar stream over ssh, or sftp per file
# Upstream location modes we do not implement; such modules simply run as DEFAULT.
_UPSTREAM_DIST_MODES = ("SLOT-BOUND", "GROUP-BOUND")

_MODULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class ModuleDef:
    name: str
    base_image: str = HOST
    command: str | None = None
    code_path: str | None = None
    start_tasks: list[str] = field(default_factory=list)
    sink_modules: list[str] = field(default_factory=list)
    slots: int = 1                         # most tasks of this module running at once across the app
    host_slots: dict[str, int] = field(default_factory=dict)   # upstream 'hosts: [h0:4]': per host instead
    min_workers: int = 0
    task_cpus: int = 1                     # cores each task gets (OMP_NUM_THREADS unless set)
    task_gpus: int = 0                     # GPUs each task gets, its own (CUDA_VISIBLE_DEVICES ...)
    task_mem: int | None = None            # MiB of memory each task needs, when it matters
    task_max_seconds: int | None = None
    retry_rules: RetryRules = field(default_factory=RetryRules)
    task_dist_mode: str = "DEFAULT"
    host_fallback: str = "fail"            # HOST-BOUND tasks whose to_host is gone: fail, or run anywhere
    environments: dict[str, str] = field(default_factory=dict)
    volumes: list[str] = field(default_factory=list)
    container_mode: str = "exec"           # exec: one 'apptainer exec' per task; instance: one instance per worker
    free_space_gb: float | None = None     # claim only with this much free on scratch
    dir_quota_gb: float | None = None      # claim only while DATA_DIR holds less than this
    site: str | None = None
    forward_mode: str = "stream"           # files for other sites: one tar stream over ssh, or sftp per file
    forward_retries: int = 3               # tries of a forward after the first, before the attempt fails (-107)
    task_batch_size: int | None = None
    idle_seconds: float | None = None
    check: str | None = None
    setup: str | None = None
    teardown: str | None = None
    hooks_in_image: bool = False           # no command given: /app/bin/{check,setup,teardown}.sh if the image has them
    stdout_limit: int | None = None
    label: str | None = None
    line: int = 0

    @property
    def host_bound(self) -> bool:
        return self.task_dist_mode == "HOST-BOUND"

    @property
    def builtin(self) -> bool:
        """The program is built into the worker ('@noop'): no process, no container."""
        return (self.command or "").startswith("@")

    @property
    def in_container(self) -> bool:
        return self.base_image != HOST and not self.builtin

    def to_json(self) -> dict:
        data = asdict(self)
        data["retry_rules"] = self.retry_rules.to_json()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModuleDef:
        """A module as stored in the database (modules.definition); keys it does not know
        (written by another version) are left out."""
        known = {f.name for f in fields(cls)} - {"retry_rules"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   retry_rules=RetryRules.from_json(data.get("retry_rules")))


@dataclass
class AppDef:
    name: str
    path: str
    app_dir: str
    site: str = "local"
    main_router: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    modules: dict[str, ModuleDef] = field(default_factory=dict)
    label: str | None = None

    def to_json(self) -> dict:
        """As stored in the database (apps.definition); from_json reads it back."""
        data = asdict(self)
        data["modules"] = {name: module.to_json() for name, module in self.modules.items()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AppDef:
        data = dict(data)
        modules = {name: ModuleDef.from_json(m) for name, m in data.pop("modules").items()}
        return cls(**data, modules=modules)


# ---------------------------------------------------------------- env files and ${VAR}

_ENV_LINE = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)")


def load_env_file(path: str | os.PathLike) -> dict[str, str]:
    """Read KEY=VALUE lines (shell-like: comments, 'export ', quotes)."""
    file = os.fspath(path)
    try:
        with open(file, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError("env file not found", file=file) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read env file: {exc}", file=file) from None
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENV_LINE.fullmatch(line)
        value = _env_value(match.group(2)) if match else None
        if value is None:
            raise ConfigError(f"expected NAME=VALUE, got {line!r}", file=file, line=number)
        values[match.group(1)] = value
    return values


def _env_value(text: str) -> str | None:
    """The value part of an env line, or None if it is malformed."""
    if text[:1] in ("'", '"'):
        end = text.find(text[0], 1)
        rest = text[end + 1:].strip() if end > 0 else None
        if rest is None or (rest and not rest.startswith("#")):
            return None
        return text[1:end]
    # Unquoted: like the shell, ' #' starts a comment.
    return re.split(r"\s+#", text, maxsplit=1)[0].strip()


_PLACEHOLDER = re.compile(r"\$\$\{|\$\{([^}\n]*)(\}?)")
_VAR_EXPR = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.S)


def _substitute(text: str, variables: Mapping[str, str], file: str) -> str:
    """Fill ${VAR} / ${VAR:-default} line by line, so YAML line numbers stay true."""
    lines = text.split("\n")
    for index, line in enumerate(lines):
        # Whole-line comments are skipped so commenting out a line never breaks the file.
        if "${" in line and not line.lstrip().startswith("#"):
            lines[index] = _PLACEHOLDER.sub(
                lambda m, n=index + 1: _expand(m, variables, file, n), line)
    return "\n".join(lines)


def _expand(match: re.Match, variables: Mapping[str, str], file: str, line: int) -> str:
    if match.group(0) == "$${":
        return "${"
    expr, closed = match.group(1), match.group(2)
    parsed = _VAR_EXPR.fullmatch(expr)
    if not closed or not parsed:
        raise ConfigError(
            f"malformed placeholder '${{{expr}{closed}': use ${{NAME}} or ${{NAME:-default}}"
            " (write $${ for a literal ${)", file=file, line=line)
    name, default = parsed.groups()
    value = variables.get(name)
    if not value and default is not None:   # shell ':-': unset or empty
        value = default
    if value is None:
        raise ConfigError(
            f"undefined variable ${{{name}}}: set it in the shell, {SCALEBOX_ENV} or an -e FILE",
            file=file, line=line)
    if "\n" in value or "\r" in value:
        raise ConfigError(f"value of ${{{name}}} contains a line break, which is not allowed",
                          file=file, line=line)
    return value



# ---------------------------------------------------------------- the app definition

_TOP_KEYS: dict[str, str | None] = {
    "name": "name", "label": "label", "description": None, "version": None,
    "site": "site", "cluster": "site", "parameters": "parameters",
    "modules": "modules", "jobs": "modules",
}
_MODULE_KEYS: dict[str, str | None] = {
    **{f.name: f.name for f in fields(ModuleDef)
       if f.name not in ("name", "line", "hooks_in_image", "host_slots")},     # the last two are derived
    "start_task": "start_tasks", "start_message": "start_tasks",
    "sink_jobs": "sink_modules", "sink_module": "sink_modules",
    "cluster": "site", "hosts": "slots", "task_timeout_seconds": "task_max_seconds",
    "parameters": "parameters", "variables": "variables",
    "description": None,
}
_MODULE_PARAMETER_KEYS: dict[str, str | None] = {
    "start_message": "start_tasks", "start_task": "start_tasks", "retry_rules": "retry_rules",
    "task_max_seconds": "task_max_seconds", "task_timeout_seconds": "task_max_seconds",
    "slots": "slots", "task_dist_mode": "task_dist_mode", "task_batch_size": "task_batch_size",
    "free_space_gb": "free_space_gb", "dir_quota_gb": "dir_quota_gb",
}
_MODULE_VARIABLE_KEYS: dict[str, str | None] = {"repeatable": None, "repeated": None, "always_running": None}
# Upstream module variables with no meaning here: accepted, with a one-line warning saying why.
_VARIABLES_NO_EFFECT = {
    "repeatable": "a message runs again only when it has the header repeatable: yes",
    "repeated": "a message runs again only when it has the header repeatable: yes",
    "always_running": "pilot lanes stay up while tasks are ready and leave when idle (idle_seconds)",
}
# Upstream's agent images run /app/bin/run.sh, and /app/bin/check.sh, setup.sh and
# teardown.sh when the image has them (else those of /app/share/bin). The variables
# ACTION_RUN, ACTION_CHECK, ... name other programs.
IMAGE_PROGRAM = "/app/bin/run.sh"
IMAGE_DIRS = ("/app/bin", "/app/share/bin")
ACTION_VARIABLES = {"command": "ACTION_RUN", **{hook: f"ACTION_{hook.upper()}" for hook in HOOKS}}
# Upstream keys that mean nothing on a batch site: accepted, with a one-line warning saying why.
_NO_EFFECT: dict[str, str] = {
    "slot_on_head": "a pilot runs in a batch job on a compute node, never on the head node",
    "schedule_mode": "pilots claim their tasks from PostgreSQL themselves; there is no scheduler to place",
    "slot_options": "pilot lanes always stay up while tasks are ready and leave when idle "
                    "(idle_seconds); reserved slots are not needed",
    "task_min_seconds": "a lane is never marked GREEDY; short tasks are claimed in batches instead",
    "sleep_interval_seconds": "idle lanes wake on NOTIFY at once; they do not poll",
    "poll_interval_seconds": "idle lanes wake on NOTIFY at once; they do not poll",
    "max_sleep_count": "a pilot leaves after idle_seconds without work",
    "max_idle_polls": "a pilot leaves after idle_seconds without work",
    "heartbeat_seconds": "the pilot's lease is the site's lease_seconds",
    "text_trunc_mode": "stdout and stderr keep their tail (stdout_limit bytes)",
    "text_tranc_mode": "stdout and stderr keep their tail (stdout_limit bytes)",
    "timezone_mode": "times are stored as timestamptz (UTC)",
    "local_ip_index": "LOCAL_IP is the address the node reaches the database from",
    "grpc_server": "there is no gRPC server: pilots talk to PostgreSQL",
    "tasks_per_queue": "one queue table serves every module",
    "task_queue_length": "one queue table serves every module",
    "initial_task_status": "tasks start READY",
    "initial_slot_status": "pilots start when tasks are ready",
    "slot_recoverable": "a lost pilot's tasks are always recovered (code 123) and the pool refilled",
    "slot_max_retries": "a lost pilot's tasks are always recovered (code 123) and the pool refilled",
    "slot_timeout_seconds": "a pilot is lost when its lease expires",
    "slot_timeout_minutes": "a pilot is lost when its lease expires",
    "task_global_timeout_scale": "task_max_seconds is enforced by the pilot itself (124); a lost pilot's "
                                 "tasks come back when its lease expires (123)",
    "task_cache_expired_minutes": "a (module, body) pair runs once per app unless the message is repeatable",
    "task_dedup_cache_ttl_minutes": "a (module, body) pair runs once per app unless the message is repeatable",
    "max_tasks_per_minute": "a fast lane is not an error here; tasks are claimed in batches",
    "key_group_regex": "GROUP-BOUND placement is not supported; tasks run wherever a lane is free",
    "key_group_index": "GROUP-BOUND placement is not supported; tasks run wherever a lane is free",
    "enable_default_retries": "only retry_rules and the lost-worker default (123) retry a task",
    "message_router_index": "the main router is parameters.main_router",
    "router_index": "the main router is parameters.main_router",
    "visible": "every module is shown",
    "priority": "modules are chosen by the claim policy (downstream first)",
    "task_id_in_headers": "headers carry from_module, from_host and from_ip",
    "app_id_in_headers": "headers carry from_module, from_host and from_ip",
}
_APP_PARAMETERS_NO_EFFECT = {
    "initial_status": "an app starts RUNNING; 'scalebox-hpc app pause' pauses it",
    "default_sleep_count": "a pilot leaves after idle_seconds without work",
    "default_idle_polls": "a pilot leaves after idle_seconds without work",
    "slot_group": "pilots are sized by the controller from the tasks ready",
    "slot_config": "pilots are sized by the controller from the tasks ready",
    "is_cluster_admin": "sites are configured in site files",
}
_MODULE_KEYS.update({"arguments": "arguments", **{k: k for k in _NO_EFFECT}})
# Upstream's older spellings of keys we implement.
_UPSTREAM_ALIASES = {"max_seconds_per_task": "task_max_seconds", "output_text_size": "stdout_limit",
                     "bulk_message_size": "task_batch_size", "batch_message_size": "task_batch_size",
                     "paths": "volumes", "environmens": "environments"}
_MODULE_KEYS.update(_UPSTREAM_ALIASES)
_MODULE_PARAMETER_KEYS.update({"code_path": "code_path", "environments": "environments",
                               "stdout_limit": "stdout_limit", **_UPSTREAM_ALIASES,
                               **{k: k for k in _NO_EFFECT}})



def _is_within(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


class _AppParser(Checker):
    # -- the app

    def app(self, doc: Any, path: str) -> AppDef:
        if not isinstance(doc, LineMap):
            raise self.error("expected a mapping with 'name' and 'modules' at the top level",
                             line=1 if doc is None else None)
        entries = self.collect(doc, "", _TOP_KEYS, {})

        name = self.text(entries["name"]) if "name" in entries else None
        if not name or not name.strip():
            entry = entries.get("name")
            raise self.error("the app needs a non-empty 'name'", "name", entry.line if entry else None)

        app = AppDef(name=name.strip(), path=path, app_dir=self.base_dir)
        if "label" in entries:
            app.label = self.text(entries["label"])
        if "site" in entries:
            app.site = self.text(entries["site"]) or app.site
        router_entry = None
        if "parameters" in entries:
            params = self.mapping(entries["parameters"])
            for key, value in params.items():
                entry = Entry(value, f"{entries['parameters'].key}.{key}", params.line_of(key), str(key))
                if key == "message_router":   # upstream's older name
                    key = "main_router"
                app.parameters[str(key)] = "" if value is None else self.scalar(value, entry)
                if key == "main_router":
                    router_entry = entry
                else:
                    why = _APP_PARAMETERS_NO_EFFECT.get(str(key), "it is not an app parameter here (only main_router)")
                    log.warning("%s line %s: %s has no effect here: %s", self.file, entry.line, entry.key, why)
            app.main_router = app.parameters.get("main_router") or None

        modules_entry = entries.get("modules")
        modules = self.mapping(modules_entry) if modules_entry else LineMap()
        if not modules:
            raise self.error("the app has no modules: add a 'modules' section", "modules",
                             modules_entry.line if modules_entry else None)
        settings: dict[str, Any] = {}
        for key, raw in modules.items():
            module_key = f"{modules_entry.key}.{key}"
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise self.error("a module name must be a string", module_key, modules.line_of(key))
            settings[str(key)] = raw
            app.modules[str(key)] = self.module(str(key), raw, module_key, modules.line_of(key))

        for module in app.modules.values():
            for sink in module.sink_modules:
                if sink not in app.modules:
                    key, line = self._sink_location(settings[module.name], modules_entry.key, module)
                    raise self.error(f"unknown sink module '{sink}' ({self._names(app, sink)})", key, line)
        if app.main_router and app.main_router not in app.modules:
            raise self.error(f"unknown module '{app.main_router}' ({self._names(app, app.main_router)})",
                             router_entry.key, router_entry.line)
        return app

    def _sink_location(self, raw: Any, modules_key: str, module: ModuleDef) -> tuple[str, int]:
        """Key path and line of a module's sink_modules setting, for error messages."""
        for written in ("sink_modules", "sink_jobs", "sink_module"):
            if isinstance(raw, LineMap) and written in raw:
                return f"{modules_key}.{module.name}.{written}", raw.line_of(written)
        return f"{modules_key}.{module.name}", module.line

    @staticmethod
    def _names(app: AppDef, wanted: str) -> str:
        text = f"modules: {', '.join(app.modules)}"
        close = difflib.get_close_matches(wanted, list(app.modules), n=1)
        return f"{text}; did you mean '{close[0]}'?" if close else text

    # -- one module

    def module(self, name: str, raw: Any, key: str, line: int) -> ModuleDef:
        if not _MODULE_NAME.fullmatch(name):
            raise self.error(f"invalid module name '{name}': use letters, digits, '_', '.', '-' "
                             "(not first)", key, line)
        settings = self.mapping(Entry(raw, key, line, name))
        entries = self.collect(settings, key, _MODULE_KEYS, {})
        # Upstream's 'arguments:' and 'parameters:' blocks hold module keys too.
        for block in ("arguments", "parameters"):
            if block in entries:
                params = entries.pop(block)
                self.collect(self.mapping(params), params.key, _MODULE_PARAMETER_KEYS, entries)
        for upstream_key, why in _NO_EFFECT.items():
            if upstream_key in entries:
                entry = entries.pop(upstream_key)
                log.warning("%s line %s: %s has no effect here: %s", self.file, entry.line, entry.key, why)
        if "variables" in entries:
            variables = entries.pop("variables")
            mapping = self.mapping(variables)
            self.collect(mapping, variables.key, _MODULE_VARIABLE_KEYS, entries)
            for variable in mapping:
                log.warning("%s line %s: %s.%s has no effect here: %s", self.file, mapping.line_of(variable),
                            variables.key, variable, _VARIABLES_NO_EFFECT[variable])

        module = ModuleDef(name=name, line=line)
        converters = {
            "base_image": self.image,
            "code_path": self.directory,
            "start_tasks": self.start_tasks,
            "sink_modules": lambda e: self.string_list(e, split_commas=True),
            "slots": self.slots,
            "min_workers": lambda e: self.integer(e, 0),
            "task_cpus": lambda e: self.integer(e, 1),
            "task_gpus": lambda e: self.integer(e, 0),
            "task_mem": self.memory,
            "task_max_seconds": lambda e: self.integer(e, 1),
            "retry_rules": lambda e: RetryRules.parse(e.value, file=self.file, key=e.key, line=e.line),
            "task_dist_mode": self.dist_mode,
            "host_fallback": lambda e: self.choice(e, HOST_FALLBACKS, "fail"),
            "environments": self.environments,
            "volumes": self.volumes,
            "container_mode": lambda e: self.choice(e, CONTAINER_MODES, "exec"),
            "free_space_gb": lambda e: self.number(e, 0),
            "dir_quota_gb": lambda e: self.number(e, 0),
            "site": self.text,
            "forward_mode": lambda e: self.choice(e, FORWARD_MODES, "stream"),
            "forward_retries": lambda e: self.integer(e, 0),
            "task_batch_size": lambda e: self.integer(e, 1),
            "idle_seconds": lambda e: self.number(e, 0),
            "stdout_limit": lambda e: self.integer(e, 0),
            "label": self.text,
        }
        for attr, convert in converters.items():
            if attr in entries:
                value = convert(entries[attr])
                if attr == "slots" and isinstance(value, dict):
                    module.host_slots, value = value, sum(value.values())
                if value is not None:
                    setattr(module, attr, value)
        if module.min_workers > module.slots:
            entry = entries["min_workers"]
            raise self.error(f"min_workers ({module.min_workers}) is more than slots ({module.slots})",
                             entry.key, entry.line)
        if "host_fallback" in entries and module.task_dist_mode != "HOST-BOUND":
            entry = entries["host_fallback"]
            raise self.error("host_fallback only applies to a module with task_dist_mode: HOST-BOUND "
                             f"(this one is {module.task_dist_mode})", entry.key, entry.line)
        self.programs(module, entries, key)
        return module

    def image(self, entry: Entry) -> str:
        value = (self.text(entry) or "").strip()
        if not value or value == HOST:
            return HOST
        if "://" in value:
            return value
        path = self.resolve(value)
        if not os.path.exists(path):
            raise self.error(f"image not found: {path} (a .sif file or sandbox directory; "
                             f"for a registry image write docker://{value})", entry.key, entry.line)
        return path

    def directory(self, entry: Entry) -> str | None:
        value = self.text(entry)
        if not value:
            return None
        path = self.resolve(value)
        if not os.path.isdir(path):
            what = "not a directory" if os.path.exists(path) else "directory not found"
            raise self.error(f"{what}: {path}", entry.key, entry.line)
        return path

    def start_tasks(self, entry: Entry) -> list[str]:
        items = entry.value if isinstance(entry.value, list) else [entry.value]
        bodies: list[str] = []
        for item in items:
            if item is None:
                continue
            body = self.scalar(item, entry)
            if body.startswith("FILE:"):
                bodies.extend(self.bodies_from_file(body[len("FILE:"):].strip(), entry))
            elif body:
                bodies.append(body)
        return bodies

    def bodies_from_file(self, name: str, entry: Entry) -> list[str]:
        path = self.resolve(name)
        try:
            with open(path, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise self.error(f"cannot read start-task file {path}: {reason}", entry.key, entry.line) from None
        return [line.strip() for line in lines if line.strip()]

    def slots(self, entry: Entry) -> int | dict[str, int] | None:
        if entry.written != "hosts" and not isinstance(entry.value, list):
            return self.integer(entry, 1)
        # Upstream 'hosts: ["h0:4", "h1:2"]' (newer: the same list under 'slots'): at most 4 at
        # once on h0 and 2 on h1, nowhere else.
        value = entry.value
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise self.error("expected a list like ['h0:4', 'h1:2']", entry.key, entry.line)
        per_host: dict[str, int] = {}
        for item in items:
            text = self.scalar(item, entry).strip()
            host, sep, count = text.rpartition(":")
            if not sep:
                host, count = text, "1"
            if not host or not count.isdigit() or int(count) < 1:
                raise self.error(f"invalid host entry '{text}': use HOST or HOST:SLOTS, e.g. 'h0:4'",
                                 entry.key, entry.line)
            per_host[host] = per_host.get(host, 0) + int(count)
        return per_host

    def memory(self, entry: Entry) -> int | None:
        """MiB, from a number (MiB) or a size with a unit: 512M, 4G, 1T (Slurm's units)."""
        if entry.value is None:
            return None
        mib = mebibytes(entry.value)
        if mib is None:
            raise self.error(f"invalid memory size {entry.value!r}: use MiB as a number, or 512M, 4G, 1T",
                             entry.key, entry.line)
        return mib

    def dist_mode(self, entry: Entry) -> str:
        value = (self.text(entry) or "").strip()
        mode = value.upper().replace("_", "-") or "DEFAULT"
        if mode in DIST_MODES:
            return mode
        if mode in _UPSTREAM_DIST_MODES:
            log.warning("%s line %s: %s: %s has no effect here, DEFAULT is used: tasks run wherever a lane is "
                        "free", self.file, entry.line, entry.key, mode)
            return "DEFAULT"
        raise self.error(f"unknown task_dist_mode '{value}' (use {' or '.join(DIST_MODES)})",
                         entry.key, entry.line)

    def environments(self, entry: Entry) -> dict[str, str]:
        value = entry.value
        if value is None:
            return {}
        if isinstance(value, dict):
            pairs = [(str(k), "" if v is None else self.scalar(v, entry)) for k, v in value.items()]
        elif isinstance(value, list):
            pairs = []
            for item in value:
                name, sep, val = self.scalar(item, entry).partition("=")
                if not sep:
                    raise self.error(f"invalid entry '{item}': use NAME=VALUE", entry.key, entry.line)
                pairs.append((name.strip(), val))
        else:
            raise self.error(f"expected a list of NAME=VALUE or a mapping, got {describe(value)}",
                             entry.key, entry.line)
        for name, _ in pairs:
            if not _ENV_NAME.fullmatch(name):
                raise self.error(f"invalid variable name '{name}'", entry.key, entry.line)
        return dict(pairs)

    def volumes(self, entry: Entry) -> list[str]:
        value = entry.value
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise self.error(f"expected a list of volumes, got {describe(value)}", entry.key, entry.line)
        volumes = []
        for item in items:
            text = self.scalar(item, entry).strip() if item is not None else ""
            if not text:
                raise self.error("empty volume entry: use SRC:DEST[:ro]", entry.key, entry.line)
            volumes.append(text)
        return volumes

    # -- program and hooks (need base_image and code_path first)

    def programs(self, module: ModuleDef, entries: dict[str, Entry], key: str) -> None:
        command = entries.get("command")
        text = self.text(command) if command else None
        action = module.environments.get(ACTION_VARIABLES["command"])
        if text and text.strip():
            module.command = self.program_path(text.strip(), module)
        elif action:
            module.command = self.program_path(action, module)
        elif module.code_path:
            module.command = os.path.join(module.code_path, "run.sh")
        elif module.base_image == HOST:
            raise self.error("no program: set 'command' (or 'code_path' with a run.sh in it)",
                             f"{key}.command", module.line)
        else:
            module.command = IMAGE_PROGRAM
            module.hooks_in_image = True
        if action and not (text and text.strip()):
            self.check_program(module, module.command, f"{key}.environments.{ACTION_VARIABLES['command']}",
                               module.line)
        if module.command:
            self.check_program(module, module.command,
                               command.key if command else f"{key}.command",
                               command.line if command else module.line)

        for hook in HOOKS:
            entry = entries.get(hook)
            text = self.text(entry) if entry else None
            action = module.environments.get(ACTION_VARIABLES[hook])
            if text and text.strip():
                path = self.program_path(text.strip(), module)
                self.check_program(module, path, entry.key, entry.line)
                setattr(module, hook, path)
            elif action:
                path = self.program_path(action, module)
                self.check_program(module, path, f"{key}.environments.{ACTION_VARIABLES[hook]}", module.line)
                setattr(module, hook, path)
            elif module.code_path and module.command and not module.command.startswith("@"):
                for name in (hook, f"{hook}.sh"):      # ours, and upstream's spelling
                    beside = os.path.join(os.path.dirname(module.command), name)
                    if _executable(beside):
                        setattr(module, hook, beside)
                        break

    def program_path(self, text: str, module: ModuleDef) -> str:
        if text.startswith("@"):    # builtin, e.g. '@noop'
            return text
        return self.resolve(text, module.code_path)

    def check_program(self, module: ModuleDef, path: str, key: str, line: int) -> None:
        if path.startswith("@"):
            if path not in BUILTINS:
                raise self.error(f"unknown builtin program {path} (builtins: {', '.join(BUILTINS)})", key, line)
            return
        on_host = module.base_image == HOST or (
            module.code_path is not None and _is_within(path, module.code_path))
        if not on_host:
            return      # lives inside the container image
        if not os.path.isfile(path):
            raise self.error(f"program not found: {path}", key, line)
        if not os.access(path, os.X_OK):
            raise self.error(f"program is not executable: {path} (chmod +x it)", key, line)


# ---------------------------------------------------------------- entry point

def _find_app_file(path: str | os.PathLike) -> str:
    given = os.fspath(path)
    if os.path.isdir(given):
        for name in APP_FILE_NAMES:
            candidate = os.path.join(given, name)
            if os.path.isfile(candidate):
                return candidate
        raise ConfigError(f"no app definition in this directory (looked for {', '.join(APP_FILE_NAMES)})",
                          file=given)
    if not os.path.exists(given):
        raise ConfigError("app definition not found", file=given)
    return given


def load_app(path: str | os.PathLike, env_files: Sequence[str] = (),
             environ: Mapping[str, str] | None = None,
             site_defaults: Mapping[str, str] | None = None) -> AppDef:
    """Read, substitute, parse and validate an app definition; raise ConfigError on any problem."""
    file = _find_app_file(path)
    absolute = os.path.abspath(file)
    app_dir = os.path.dirname(absolute)

    variables: dict[str, str] = dict(site_defaults or {})
    scalebox_env = os.path.join(app_dir, SCALEBOX_ENV)
    if os.path.isfile(scalebox_env):
        variables.update(load_env_file(scalebox_env))
    for env_file in env_files:
        variables.update(load_env_file(env_file))
    variables.update(os.environ if environ is None else environ)

    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read app definition: {exc}", file=file) from None
    doc = parse_yaml(_substitute(text, variables, file), file)
    return _AppParser(file, app_dir).app(doc, absolute)
