"""Sites: where worker processes run and how they are started.

A site kind is one small class: ``launch`` starts workers for rows the controller
already created in the database, ``dead`` tells which of the site's live workers are
known to be gone (faster than waiting for their leases to expire). Slurm and remote
sites implement the same two calls.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LiveWorker:
    id: int
    module_id: int
    status: str
    host: str | None
    pid: int | None
    slurm_job_id: str | None


class Site:
    name: str
    kind: str
    #: how long a new worker may take to register before it is declared lost
    start_timeout: float = 60.0

    def launch(self, worker_ids: list[int], module: dict) -> None:
        raise NotImplementedError

    def dead(self, workers: list[LiveWorker]) -> list[int]:
        return []

    def close(self) -> None:
        pass


def make_sites(settings) -> dict[str, Site]:
    from .local import LocalSite

    return {"local": LocalSite(settings)}
