"""Terminal output: live progress bars per module, the app view of 'app show'/'app watch', and plain tables (rich)."""
from __future__ import annotations

import sys
import time

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .states import AppStatus


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


def app_view(summary: dict) -> Group:
    """An app's state as one frame: status line, then per module a progress bar, counts
    by state, rate and ETA, and its failures by code."""
    from .report import duration_text

    took = f"  elapsed {duration_text(summary['elapsed_seconds'])}" if summary["elapsed_seconds"] is not None else ""
    head = Text.assemble((f"app {summary['id']} ({summary['name']}) ", "bold"), (summary["status"], "bold cyan"),
                         took)
    lines: list = [head]
    if summary["message"]:
        lines.append(Text(f"  {summary['message']}"))
    t = Table("module", "progress", "done", "ok", "failed", "running", "ready", "tasks/s", "ETA",
              box=None, pad_edge=False)
    ended = summary["status"] in AppStatus.TERMINAL
    for module, c in summary["modules"].items():
        done = c["ok"] + c["failed"]
        eta = "" if ended else "-" if c["eta_seconds"] is None else duration_text(c["eta_seconds"])
        t.add_row(module, ProgressBar(total=max(c["total"], 1), completed=done, width=28),
                  f"{done}/{c['total']}", str(c["ok"]), str(c["failed"]), str(c["running"]), str(c["ready"]),
                  f"{c['rate']:.1f}", eta)
    lines.append(t)
    for module, c in summary["modules"].items():
        if c["codes"]:
            codes = ", ".join(f"{n} with code {code}" for code, n in sorted(c["codes"].items(), key=lambda kv: -kv[1]))
            lines.append(Text(f"  {module} failed: {codes}", style="red"))
    if summary["result"] is not None:
        lines.append(Text(f"result: {summary['result']}"))
    return Group(*lines)


def print_app(summary: dict) -> None:
    Console().print(app_view(summary))


def watch_app(fetch, *, interval: float, once: bool, ended) -> None:
    """Redraw app_view(fetch()) every interval seconds until ended(summary) or Ctrl-C.
    One frame only with once, or when stdout is not a terminal (a log, a pipe)."""
    console = Console()
    summary = fetch()
    if once or not console.is_terminal:
        console.print(app_view(summary))
        return
    try:
        with Live(app_view(summary), console=console, auto_refresh=False) as live:
            while not ended(summary):
                time.sleep(interval)
                summary = fetch()
                live.update(app_view(summary), refresh=True)
    except KeyboardInterrupt:
        pass
