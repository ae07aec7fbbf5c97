"""The worker job script: its '#SBATCH' options and its rendering from the Jinja2
template (the project's templates/ folder, shipped as the package scalebox_hpc.templates;
a site may name its own with 'template:').

Every value that ends up in the script was checked when the site config was loaded and
is shell-quoted here, so a config value can never become shell code; only
``worker_init`` lines, written by the site admin, are inserted verbatim. The script is
written to disk and shown in logs: it never holds a secret.
"""
from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import jinja2
from psycopg.conninfo import conninfo_to_dict

from ...errors import ConfigError
from ...siteconfig import SiteConfig

WORKER_TEMPLATE = "worker.sbatch.j2"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def worker_dsn(config: SiteConfig, controller_dsn: str) -> str:
    """The database address a site's workers use: the site's own (as seen from its
    compute nodes), else the controller's. It goes into job scripts, so it must hold no
    password: that belongs in a passfile or a libpq service."""
    db = config.database
    dsn = db.dsn or (f"service={db.service}" if db.service else controller_dsn)
    if "password" in conninfo_to_dict(dsn):
        raise ConfigError("the database address for this site's workers holds a password, which would "
                          "end up in job scripts: set database.passfile or database.service in the site config",
                          file=config.path or None, key="database")
    return dsn


def sbatch_options(site: SiteConfig, *, job_name: str, array: str | None = None,
                   nodelist: str | None = None, log_dir: str) -> list[str]:
    """The '#SBATCH' options for a worker job, each value shell-quoted."""
    slurm, q = site.slurm, shlex.quote
    log_name = "%x-%A_%a" if array else "%x-%j"
    options = [f"--job-name={q(job_name)}"]
    if array:
        options.append(f"--array={q(array)}")
    for flag, value in (("partition", slurm.partition), ("account", slurm.account), ("qos", slurm.qos)):
        if value:
            options.append(f"--{flag}={q(value)}")
    options += [f"--time={q(slurm.walltime)}", f"--nodes={int(slurm.nodes)}", "--ntasks-per-node=1"]
    if slurm.cpus_per_task:
        options.append(f"--cpus-per-task={int(slurm.cpus_per_task)}")
    for flag, value in (("mem", slurm.mem), ("gres", slurm.gres), ("gpus", slurm.gpus)):
        if value:
            options.append(f"--{flag}={q(value)}")
    if nodelist:
        options.append(f"--nodelist={q(nodelist)}")
    options += [f"--output={q(os.path.join(log_dir, log_name + '.out'))}",
                f"--error={q(os.path.join(log_dir, log_name + '.err'))}",
                f"--signal=B:USR1@{int(slurm.drain_seconds)}",
                *slurm.extra_sbatch]
    # A line break would end the '#SBATCH' comment and turn the rest into shell code; sbatch
    # reads a backslash as an escape even inside quotes, unlike the shell quoting used here.
    for option in options:
        if any(char in option for char in "\n\r\\"):
            raise ValueError(f"line break or backslash in sbatch option {option!r}")
    return options


def _packaged(name: str):
    """A template shipped with the package (templates/ at the top of the source tree,
    installed as scalebox_hpc.templates): (source, filename, uptodate), or None."""
    path = resources.files("scalebox_hpc.templates") / name
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8"), str(path), lambda: True


def _template(site: SiteConfig) -> jinja2.Template:
    if site.template:
        folder, name = str(Path(site.template).parent), Path(site.template).name
        loader = jinja2.FileSystemLoader(folder)
    else:
        folder, name = "the package's templates", WORKER_TEMPLATE
        loader = jinja2.FunctionLoader(_packaged)
    environment = jinja2.Environment(
        loader=loader, undefined=jinja2.StrictUndefined,
        autoescape=False, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    environment.filters["q"] = shlex.quote
    try:
        return environment.get_template(name)
    except jinja2.TemplateNotFound:
        raise ConfigError(f"job script template {name} not found in {folder}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"invalid template: {exc.message}", file=exc.filename or os.path.join(folder, name),
                          line=exc.lineno) from None


def render_worker_script(site: SiteConfig, *, job_name: str, worker_argv: Sequence[str],
                         env: Mapping[str, str], log_dir: str, array: str | None = None,
                         nodelist: str | None = None) -> str:
    """The Slurm batch script that runs ``worker_argv`` once per node of the job.

    `env` adds to (and overrides) the site's `env`; no value may be a secret.
    """
    if not worker_argv:
        raise ValueError("worker_argv is empty")
    exports = {**site.env, **env}
    for key in exports:
        if not _ENV_NAME.fullmatch(key):
            raise ValueError(f"invalid environment variable name {key!r}")
    template = _template(site)
    try:
        return template.render(
            site=site, job_name=job_name, array=array, nodelist=nodelist,
            sbatch_lines=sbatch_options(site, job_name=job_name, array=array, nodelist=nodelist,
                                        log_dir=log_dir),
            worker_argv=list(worker_argv), env=exports, worker_init=site.slurm.worker_init,
            passfile=site.database.passfile, service=site.database.service, nodes=site.slurm.nodes)
    except jinja2.TemplateError as exc:
        raise ConfigError(f"cannot render template: {exc}", file=template.filename) from None
