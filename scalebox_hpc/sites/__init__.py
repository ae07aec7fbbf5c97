"""Sites: where worker processes run and how they are started.

A site kind is one small class: ``launch`` starts workers for rows the controller
already created in the database, ``dead`` tells which of the site's live workers are
known to be gone (faster than waiting for their leases to expire). The local site
(local.py) and Slurm sites (slurm/), on this machine or over SSH, implement the same
calls; all of them start workers with the command line of ``launch.WorkerLaunch``, and
``forward_target`` is what other sites' workers need to send files here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..db.rows import LiveWorker

if TYPE_CHECKING:                       # a worker imports sites.launch: keep paramiko and jinja2 out of it
    from ..siteconfig import SiteConfig
    from ..transfer import ForwardTarget


class Site:
    name: str
    kind: str
    #: the site's config file (None: the built-in local site)
    config: SiteConfig | None = None
    #: how long a new worker may take to register before it is declared lost
    start_timeout: float = 60.0
    #: OK or DEGRADED, and why
    status: str = "OK"
    reason: str | None = None
    #: why the last launch() left some rows out
    refusal: str | None = None

    def admit(self, wanted: int, live: int, pending: int) -> int:
        """How many of ``wanted`` new workers may start now, given the site's live
        workers and those of them still waiting to start."""
        return wanted

    @property
    def pilot_cpus(self) -> int:
        """The cores one pilot (one node of a worker job) has here."""
        return 1

    @property
    def pilot_gpus(self) -> int:
        return 0

    @property
    def pilot_mem_mb(self) -> int | None:
        """Memory of one pilot in MiB; None: not known (task_mem is not checked)."""
        return None

    def unfit(self, module: dict) -> str | None:
        """Why this module's tasks could never run here, or None: a task that needs more
        cores, GPUs or memory than any pilot of the site has."""
        where = f"site {self.name}" + (f" ({self.config.path})" if self.config and self.config.path else "")
        for key, need, have, what in (("task_cpus", module.get("task_cpus") or 1, self.pilot_cpus, "cores"),
                                      ("task_gpus", module.get("task_gpus") or 0, self.pilot_gpus, "GPUs"),
                                      ("task_mem", module.get("task_mem") or 0, self.pilot_mem_mb, "MiB")):
            if have is not None and need > have:
                return (f"{key} {need} is more than a worker of {where} ever has ({have} {what}): lower {key} "
                        f"or give the site's jobs more ({'cpus' if key == 'task_cpus' else key[5:]} in its config"
                        f"{', slurm.cpus_per_task / gpus / mem' if self.kind == 'slurm' else ''})")
        per_host = module.get("host_slots")
        if per_host:
            # Upstream's per-host form ['h0:4']: a host the site does not have would
            # leave the module's tasks waiting for ever.
            unknown = self.unknown_hosts(set(per_host))
            if unknown:
                return (f"slots: {'; '.join(unknown[h] for h in sorted(unknown))}: "
                        "name hosts of the site in slots, or give slots as a number")
        return None

    def unknown_hosts(self, hosts: set[str]) -> dict[str, str]:
        """Which of these hosts the site does not have at all, and why (a host that is
        only down or drained is not unknown)."""
        return {}

    def launch(self, worker_ids: list[int], module: dict, host: str | None = None) -> dict[int, str | None]:
        """Start workers for these rows (on ``host``, when given); returns the batch job
        id (None for none) of each one started. Rows left out were not started."""
        raise NotImplementedError

    def gone_hosts(self, hosts: set[str]) -> dict[str, str]:
        """Which of these hosts can take no worker of this site, and why. A host the
        site knows nothing about is not declared gone on a guess."""
        return {}

    def dead(self, workers: list[LiveWorker]) -> list[int]:
        return []

    def cancel(self, workers: list[LiveWorker]) -> None:
        """Stop workers that have not started (their app ended meanwhile)."""

    def close(self) -> None:
        pass

    def forward_target(self) -> ForwardTarget:
        """What workers elsewhere need to forward files to this site (stored in the
        sites table): its inbox, its python and how to reach its login node."""
        from ..transfer import ForwardTarget
        config = self.config
        if config is None:
            return ForwardTarget(self.name)
        return ForwardTarget(self.name, inbox=config.inbox, python=config.python, ssh=config.ssh)


def make_sites(settings) -> dict[str, Site]:
    """The built-in local site plus every site config in the sites directory."""
    from ..siteconfig import load_sites
    from ..transport import SSHRunner
    from .local import LocalSite
    from .slurm import BatchSite, SlurmCLI

    sites: dict[str, Site] = {"local": LocalSite(settings)}
    for name, config in load_sites(settings.sites_dir).items() if settings.sites_dir else ():
        if config.scheduler != "slurm":
            sites[name] = LocalSite(settings, config)
            continue
        scheduler = None
        if config.ssh:
            from ..ssh import connect
            scheduler = SlurmCLI(SSHRunner(connect(config.ssh, site=name)))
        sites[name] = BatchSite(config, settings, scheduler)
    return sites
