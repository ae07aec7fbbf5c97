"""Exception types: one per kind of failure a user can fix.

The CLI catches ``ScaleboxError`` once and prints ``str(exc)`` as a single line;
anything else is an internal error whose traceback goes to the log.
"""
from __future__ import annotations


def first_line(error: BaseException | str) -> str:
    """The first line of an error's message (its type's name when it has none): what a
    log line or a one-line message quotes of a multi-line error from a library."""
    text = str(error).strip()
    if text:
        return text.splitlines()[0]
    return type(error).__name__ if isinstance(error, BaseException) else ""


def last_line(text: str | None, *, prefer: str | None = None, default: str = "no output") -> str:
    """The last non-blank line of a command's output, where tools put their reason
    (with ``prefer``, the last line containing it, e.g. Apptainer's 'FATAL')."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    preferred = [line for line in lines if prefer and prefer in line]
    return (preferred or lines or [default])[-1]


class ScaleboxError(Exception):
    """A failure the user can fix; ``str()`` is one line saying what and how."""


class ConfigError(ScaleboxError):
    """Bad app definition, site config, env file or settings.

    Rendered as ``FILE:LINE: KEY: message`` with the parts that are known.
    """

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None,
                 line: int | None = None):
        self.message = message
        self.file = file
        self.key = key
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        elif self.line:
            where = f"line {self.line}: "
        key = f"{self.key}: " if self.key else ""
        return f"{where}{key}{self.message}"


class TaskFileError(ScaleboxError):
    """A file a module program left in WORK_DIR is malformed (the task fails, nothing applied)."""


class DatabaseUnavailable(ScaleboxError):
    """The database cannot be reached. ``lasting``: the server answered and refused this
    address (unknown database or role, failed authentication), so waiting will not help."""

    def __init__(self, message: str, *, lasting: bool = False):
        super().__init__(message)
        self.lasting = lasting


class NotFound(ScaleboxError):
    """An app, task, module or site named on the command line does not exist."""
