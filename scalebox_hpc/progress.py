"""Terminal output: live progress bars per module and plain tables (rich)."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table


class ProgressView:
    """One bar per module: finished (ok + failed) out of known tasks, with counts."""

    def __init__(self):
        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description:<14}"), BarColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), console=self.console,
            disable=not self.live)
        self.bars: dict[str, int] = {}
        self.last_line = ""
        if self.live:
            self.progress.start()

    def update(self, counts: dict[str, dict[str, int]]) -> None:
        for module, c in counts.items():
            text = f"ok {c['ok']}  failed {c['failed']}  running {c['running']}  ready {c['ready']}"
            if module not in self.bars:
                self.bars[module] = self.progress.add_task(module, total=c["total"], counts=text)
            self.progress.update(self.bars[module], total=c["total"], completed=c["ok"] + c["failed"],
                                 counts=text)
        if not self.live:
            # Not a terminal (a log, CI): one line per change, not a redraw storm.
            line = "; ".join(f"{m} {c['ok'] + c['failed']}/{c['total']}" for m, c in counts.items())
            if line != self.last_line:
                print(f"progress: {line}", file=sys.stderr, flush=True)
                self.last_line = line

    def close(self) -> None:
        if self.live:
            self.progress.stop()


def table(headers: list[str], rows: list[list]) -> None:
    t = Table(*headers, box=None, pad_edge=False)
    for row in rows:
        t.add_row(*(str(v) for v in row))
    Console().print(t)
