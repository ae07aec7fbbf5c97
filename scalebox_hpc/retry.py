"""Retry rules: parsed once from the app definition, evaluated here and nowhere else.

A module's ``retry_rules`` say how often a task may run again after an attempt ended
with a code: ``['1:3', '2:2', '*']`` retries code 1 three times, code 2 twice and any
other failure once. The first rule naming a code wins, else the first ``*``. A lost
lease (the worker or its node died) is not the task's fault, so a ``*`` written for
program failures does not decide it: only a rule naming 123 does, else
``Code.LEASE_LOST_DEFAULT_RETRIES``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .states import Code

_RULE = re.compile(r"(\*|[+-]?\d+)\s*:\s*(\d+)")


@dataclass(frozen=True)
class RetryRules:
    rules: tuple[tuple[str, int], ...] = ()

    @classmethod
    def parse(cls, value: Any, *, file: str | None = None, key: str | None = None,
              line: int | None = None) -> RetryRules:
        """['1:3', '2:2', '*'], "['1:3','2:2','*']" or "1:3,2:2,*"; ConfigError naming
        file, line and key otherwise."""
        if value is None:
            return cls()
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            items: list[Any] = [item.strip().strip("'\"") for item in text.split(",")]
            items = [item for item in items if item]
        elif isinstance(value, list):
            items = value
        else:
            raise ConfigError("expected a list of retry rules, e.g. ['1:3', '*']", file=file, key=key, line=line)
        rules: list[tuple[str, int]] = []
        for item in items:
            text = str(item).strip() if isinstance(item, (str, int)) and not isinstance(item, bool) else None
            match = _RULE.fullmatch(text) if text else None
            if text == "*":
                rule = ("*", 1)
            elif match:
                code = match.group(1)
                rule = (code if code == "*" else str(int(code)), int(match.group(2)))
            else:
                raise ConfigError(f"invalid retry rule {str(item)!r}: use CODE:RETRIES, e.g. '1:3', or '*'",
                                  file=file, key=key, line=line)
            if any(code == rule[0] for code, _ in rules):
                raise ConfigError(f"retry rule for code {rule[0]} given twice", file=file, key=key, line=line)
            rules.append(rule)
        return cls(tuple(rules))

    @classmethod
    def from_json(cls, data: Any) -> RetryRules:
        """As stored in a module definition: [["1", 3], ["*", 1]]."""
        return cls(tuple((str(code), int(n)) for code, n in data or ()))

    def to_json(self) -> list[list]:
        return [list(rule) for rule in self.rules]

    def retries(self, code: int) -> int:
        """How many retries the rules grant after an attempt that ended with ``code``."""
        if code == Code.OK:
            return 0
        wildcard = None
        for rule_code, n in self.rules:
            if rule_code == "*":
                if wildcard is None:
                    wildcard = n
            elif int(rule_code) == code:
                return n
        if code == Code.LEASE_LOST:
            return Code.LEASE_LOST_DEFAULT_RETRIES
        return wildcard or 0

    def allows(self, code: int, attempts_with_code: int) -> bool:
        """Whether the task runs again after an attempt ended with ``code``;
        ``attempts_with_code`` counts its attempts that ended so, the last one included
        (a rule 'code:n' thus allows n + 1 runs)."""
        return attempts_with_code <= self.retries(code)

    def __bool__(self) -> bool:
        return bool(self.rules)
