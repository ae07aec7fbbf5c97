"""Slurm through its command-line tools: the commands this package runs (sbatch, squeue,
scancel, scontrol, sinfo) and the parsing of their output, nothing else.

The commands go through a runner (transport.py: this machine, or the site's login node
over SSH). A PBS site would add one such adapter beside this one; the pool policy
(pool.py) and the job script (jobscript.py) stay.
"""
from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass

from ...backoff import Backoff
from ...transport import CommandError, LocalRunner, TransportError

log = logging.getLogger(__name__)


class SchedulerError(CommandError):
    """Slurm answered something this package cannot use (or nothing)."""


@dataclass
class Job:
    id: str
    name: str
    state: str


class SlurmCLI:
    """Slurm through its command-line tools."""

    ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
              "SIGNALING", "STAGE_OUT", "REQUEUE_HOLD", "REQUEUE_FED"}
    # Node states (sinfo %T, prefixes: drained, draining, failing ...) that take no new job.
    UNUSABLE = ("down", "drain", "fail", "inval")
    # What sbatch says when a --nodelist job can never run on that node.
    NODE_REFUSALS = ("Invalid node name specified", "Requested node configuration is not available")

    def __init__(self, runner=None):
        self.run = runner or LocalRunner()

    def submit(self, script: str) -> str:
        # The comment marks this very submission: if the connection drops while sbatch
        # runs, the queue tells whether it went in, so it is neither lost nor made twice.
        token = f"sbx-{uuid.uuid4().hex[:20]}"
        try:
            out = self.run(["sbatch", "--parsable", f"--comment={token}"], input=script).strip()
        except TransportError as exc:
            if not exc.unsure:
                raise
            job_id = self._submitted(token, exc)
            log.warning("sbatch's answer was lost (%s); the queue shows it submitted job %s", exc, job_id)
            return job_id
        job_id = out.split(";")[0]               # "ID" or "ID;cluster"
        if not re.fullmatch(r"\d+", job_id):
            raise SchedulerError(f"sbatch answered {out!r}, not a job id")
        return job_id

    def _submitted(self, token: str, cause: Exception, tries: int = 4) -> str:
        """The job sbatch made with this comment, asked of the queue after a lost answer.
        Raises SchedulerError when it is not there (nothing was submitted)."""
        backoff = Backoff(1.0, 8.0)
        for _ in range(tries):
            time.sleep(backoff.failed())
            try:
                out = self.run(["squeue", "--me", "-h", "-t", "all", "-o", "%A|%k"])
            except TransportError:
                continue
            for line in out.splitlines():
                job, _, comment = line.strip().partition("|")
                if comment == token:
                    return job
            raise SchedulerError(f"{cause}; no job with comment {token} is in the queue, so nothing was submitted")
        # Whether it went in is unknown: if it did, its workers find their rows released and leave.
        raise SchedulerError(f"{cause}; the queue could not be asked whether it was submitted")

    def jobs(self, name_prefix: str) -> dict[str, Job]:
        """Our active jobs, array elements one by one (``-r``), in one squeue call."""
        out = self.run(["squeue", "--me", "-h", "-r", "-o", "%i|%j|%T"])
        found = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[1].startswith(name_prefix):
                found[parts[0]] = Job(*parts)
        return found

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            self.run(["scancel", *job_ids])

    def partition(self, name: str | None) -> str:
        """A partition's state and nodes ('UP, nodes n[1-2]'); None: the default one.
        Raises SchedulerError when it does not exist or is not up."""
        out = self.run(["scontrol", "show", "-o", "partition", *([name] if name else [])])
        for line in out.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if (name and fields.get("PartitionName") == name) or (not name and fields.get("Default") == "YES"):
                state = fields.get("State", "?")
                summary = f"{fields.get('PartitionName')} {state}, nodes {fields.get('Nodes', '?')}, " \
                          f"time limit {fields.get('MaxTime', '?')}"
                if state != "UP":
                    raise SchedulerError(f"partition {summary}: not UP")
                return summary
        raise SchedulerError(f"partition {name or '(default)'} not found")

    def nodes(self, partition: str | None) -> dict[str, tuple[str, str]]:
        """The nodes of a partition (None: the default one) as {name: (state, reason)}, in
        one sinfo call; empty when there is no such partition."""
        out = self.run(["sinfo", "-h", "-N", "-o", "%N|%P|%T|%E"])
        found = {}
        for line in out.splitlines():
            parts = line.strip().split("|", 3)
            if len(parts) != 4:
                continue
            node, part, state, reason = parts
            if (part.rstrip("*") == partition) if partition else part.endswith("*"):
                found[node] = (state, "" if reason == "none" else reason)
        return found

    @classmethod
    def node_unusable(cls, state: str) -> bool:
        """Whether a node in this sinfo state takes no new job ('idle*', not responding
        yet, still may: Slurm marks it down itself after SlurmdTimeout)."""
        return any(re.sub(r"[^a-z_]", "", word).startswith(cls.UNUSABLE) for word in state.lower().split("+"))

    @classmethod
    def refuses_node(cls, message: str) -> bool:
        return any(text in message for text in cls.NODE_REFUSALS)

    def max_array_size(self) -> int:
        out = self.run(["scontrol", "show", "config"])
        m = re.search(r"^\s*MaxArraySize\s*=\s*(\d+)", out, re.M)
        return int(m.group(1)) if m else 1001
