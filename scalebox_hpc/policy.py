"""Which module a pilot's free cores and GPUs go to: a small pure function.

A pilot serves every module of its site's apps whose tasks fit it. Each cycle it
knows, per module, the stage (how far downstream it sits), what a task takes, how
many tasks are ready and how many more may run under the module's ``slots``; this
decides how many tasks of each to claim:

1. no module starves: every module that can run gets one task first, the one served
   longest ago before the others;
2. then downstream stages first, so that data moves on instead of piling up on
   scratch, each taking what it has ready within its room and the budget left.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass(frozen=True)
class Candidate:
    module_id: int
    stage: int                  # 0 for the first stage; larger downstream
    ready: int                  # tasks ready for this pilot
    room: int | None            # how many more may run at once under 'slots' (None: no limit)
    cpus: int = 1
    gpus: int = 0
    mem_mb: int = 0
    last_served: float = 0.0    # when it last got a task here (monotonic); 0: never


@dataclass
class Budget:
    cpus: int
    gpus: int = 0
    mem_mb: int | None = None   # None: memory is not counted

    def fits(self, c: Candidate) -> bool:
        return c.cpus <= self.cpus and c.gpus <= self.gpus and (self.mem_mb is None or c.mem_mb <= self.mem_mb)

    def take(self, c: Candidate) -> None:
        self.cpus -= c.cpus
        self.gpus -= c.gpus
        if self.mem_mb is not None:
            self.mem_mb -= c.mem_mb


def plan(candidates: Sequence[Candidate], free: Budget) -> dict[int, int]:
    """Module id -> how many tasks to claim now out of ``free`` (modules given none left out)."""
    budget = Budget(free.cpus, free.gpus, free.mem_mb)
    want = {c.module_id: min(c.ready, c.room) if c.room is not None else c.ready for c in candidates}
    got: dict[int, int] = {}

    def give(c: Candidate) -> bool:
        if got.get(c.module_id, 0) >= want[c.module_id] or not budget.fits(c):
            return False
        budget.take(c)
        got[c.module_id] = got.get(c.module_id, 0) + 1
        return True

    for c in sorted(candidates, key=lambda c: (c.last_served, -c.stage, c.module_id)):
        give(c)
    for c in sorted(candidates, key=lambda c: (-c.stage, c.last_served, c.module_id)):
        while give(c):
            pass
    return got


def stages(sinks: Mapping[str, Sequence[str]], main_router: str | None = None) -> dict[str, int]:
    """Each module's stage: its distance from the app's first modules along the message
    routes the app declares (sink_modules; a module without any sends to main_router).
    First modules are those nothing sends to; an app whose routes all loop starts from
    its first module (the router). A module no route reaches is a first one."""
    names = list(sinks)
    edges = {name: list(targets) or ([main_router] if main_router and main_router != name else [])
             for name, targets in sinks.items()}
    targeted = {t for targets in edges.values() for t in targets}
    roots = [n for n in names if n not in targeted] or names[:1]
    depth = {n: 0 for n in roots}
    todo = deque(roots)
    while todo:
        name = todo.popleft()
        for target in edges.get(name, ()):
            if target in sinks and target not in depth:
                depth[target] = depth[name] + 1
                todo.append(target)
    return {n: depth.get(n, 0) for n in names}
