"""Slurm sites, in three parts: ``scheduler`` (Slurm's commands and their output),
``jobscript`` (the #SBATCH options and the rendered worker job script) and ``pool``
(when and how many worker jobs to submit, and which are gone)."""
from .jobscript import render_worker_script, sbatch_options, worker_dsn
from .pool import BatchSite
from .scheduler import Job, SchedulerError, SlurmCLI

__all__ = ["BatchSite", "Job", "SchedulerError", "SlurmCLI", "render_worker_script", "sbatch_options",
           "worker_dsn"]
