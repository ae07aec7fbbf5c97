"""Programs built into the worker ('@name'): no process, no container."""
from __future__ import annotations

from ..appdef import BUILTINS
from ..states import Code
from .base import ProgramResult, Runtime, utcnow


class BuiltinRuntime(Runtime):
    """Programs built into the worker, named '@name'. '@noop' does nothing and exits 0:
    it measures the queue itself, with no process start in the way. '@pass' does the
    same and sends its body on to the module's sink modules (the worker routes it): a
    pipeline stage of no cost, to measure routing."""

    def run(self, program, body, headers_json, *, env, cwd, timeout, stdout, stderr):
        now = utcnow()
        if program not in BUILTINS:
            return ProgramResult(Code.NOT_FOUND, now, now, "", f"scalebox-hpc: unknown builtin program {program}\n")
        return ProgramResult(Code.OK, now, now, "", "")
