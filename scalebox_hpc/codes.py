"""Task status codes (SPEC section 5) by name and meaning, for what the CLI and the report print."""
from __future__ import annotations

STATUS_NAMES = {-9: "INITIAL", -1: "READY", -2: "QUEUED", -3: "RUNNING", 0: "OK"}

# What a code says beyond "the program exited with it" (README, "Task states and codes").
MEANINGS = {
    0: "ok", 123: "lease lost (worker died or its job was stopped)", 124: "timeout (task_max_seconds)",
    126: "program not executable", 127: "program not found", -101: "malformed task file",
    -102: "output message with no destination", -103: "WORK_DIR could not be made",
    -104: "container image not found / not pulled / not started", -105: "node-local scratch full",
    -106: "the task's to_host is gone", -107: "forward to another site failed",
    -108: "path in a message refused (leaves its directory)",
}


def status_name(code: int) -> str:
    return STATUS_NAMES.get(code, f"FAILED({code})")


def is_failure(code: int) -> bool:
    """A final failed status: an exit code, or a system code (-100 and below)."""
    return code > 0 or code < -9


def parse_status(text: str) -> tuple[int | None, bool]:
    """A --status value: a code or a name (FAILED = any failure) -> (code, failed)."""
    name = text.strip().upper()
    if name == "FAILED":
        return None, True
    for code, known in STATUS_NAMES.items():
        if known == name:
            return code, False
    try:
        return int(text), False
    except ValueError:
        raise ValueError(f"unknown status {text!r}: a code or one of "
                         f"{', '.join([*STATUS_NAMES.values(), 'FAILED'])}") from None
