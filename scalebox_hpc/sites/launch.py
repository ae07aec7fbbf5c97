"""The worker's command line: the one contract between the sites that start workers
and ``scalebox-hpc worker``, which parses it back.

Every site builds it through ``WorkerLaunch.argv()`` (a process on this machine, one
worker per node of a Slurm job, and the probe job of ``site check``, with ``probe``
set), so the flags a site writes and the flags the worker reads cannot drift apart.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Mapping

#: seconds a worker keeps free before its batch job's walltime ends, to leave cleanly;
#: a task whose task_max_seconds does not fit in the rest is never claimed.
DRAIN_MARGIN = 10.0


def _number(value: float) -> str:
    """A number as a flag value that reads back the same (no '1e+06' rounding)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


@dataclass(frozen=True)
class WorkerLaunch:
    """What a worker process is told when it starts. A batch job carries the rows of all
    its workers (one per node and array element); each process takes its own."""

    worker_ids: tuple[int, ...]
    scratch: str | None = None             # node-local scratch root; may hold $VARS, expanded on the node
    lease_seconds: float = 30.0
    idle_seconds: float = 30.0
    walltime_seconds: float | None = None  # the batch job's time limit (None: not a batch job)
    runtime: str | None = None             # apptainer, singularity or host; None: whichever is on PATH
    image_cache: str | None = None
    container_gpu: str | None = None       # nv / rocm: the container flag for the pilot's GPUs
    probe: str | None = None               # 'site check': report to this channel and exit, run no task
    cpus: int | None = None                # outside Slurm: the pilot's cores (None: all of the machine)
    gpus: int | None = None                # outside Slurm: the pilot's GPUs, ids 0..n-1

    def argv(self, python: str | None = None) -> list[str]:
        """The command that starts this worker, one word per item (never a shell string)."""
        argv = [python or sys.executable, "-m", "scalebox_hpc", "worker",
                "--worker-ids", ",".join(map(str, self.worker_ids)),
                "--lease-seconds", _number(self.lease_seconds), "--idle-seconds", _number(self.idle_seconds)]
        if self.walltime_seconds is not None:
            argv += ["--walltime-seconds", _number(self.walltime_seconds)]
        for flag, value in (("--scratch", self.scratch), ("--runtime", self.runtime),
                            ("--image-cache", self.image_cache), ("--probe", self.probe),
                            ("--container-gpu", None if self.container_gpu == "none" else self.container_gpu),
                            ("--cpus", self.cpus and str(self.cpus)),
                            ("--gpus", None if self.gpus is None else str(self.gpus))):
            if value:
                argv += [flag, value]
        return argv

    @classmethod
    def from_options(cls, *, worker_ids: str, scratch: str | None = None, lease_seconds: float = 30.0,
                     idle_seconds: float = 30.0, walltime_seconds: float | None = None,
                     runtime: str | None = None, image_cache: str | None = None,
                     container_gpu: str | None = None, probe: str | None = None, cpus: int | None = None, gpus: int | None = None) -> WorkerLaunch:
        """The launch the worker command's options describe (the inverse of argv()).
        Raises ValueError for a malformed --worker-ids."""
        try:
            ids = tuple(int(w) for w in worker_ids.split(",") if w or not probe)
        except ValueError:
            raise ValueError(f"--worker-ids {worker_ids!r}: not a comma-separated list of numbers") from None
        return cls(ids, scratch=scratch, lease_seconds=lease_seconds, idle_seconds=idle_seconds,
                   walltime_seconds=walltime_seconds, runtime=runtime, image_cache=image_cache,
                   container_gpu=container_gpu, probe=probe,
                   cpus=cpus, gpus=gpus)

    def worker_id(self, environ: Mapping[str, str]) -> int:
        """This process's row: by array index and by node (srun task) within the job."""
        index = int(environ.get("SLURM_ARRAY_TASK_ID") or 0) * int(environ.get("SLURM_JOB_NUM_NODES") or 1) \
            + int(environ.get("SLURM_PROCID") or 0)
        if index >= len(self.worker_ids):
            raise ValueError(f"--worker-ids {','.join(map(str, self.worker_ids))}: no worker id for index "
                             f"{index} (array element and node of this job)")
        return self.worker_ids[index]
