"""How a module's program is started: built into the worker, on the host, or in an
Apptainer/Singularity container. ``runtime_for`` makes the one choice, from the typed
module definition; the worker then only calls the Runtime interface (runtimes.base).

Imports go one way: base <- host <- apptainer, base <- builtin; nothing here imports
the worker or the database.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..appdef import ModuleDef
from .apptainer import ContainerRuntime, ImageError, find_runtime
from .base import TASK_VARIABLES, OutputBuffer, ProgramResult, Runtime, utcnow
from .builtin import BuiltinRuntime
from .host import HostRuntime

__all__ = ["RuntimePlace", "runtime_for", "Runtime", "ProgramResult", "OutputBuffer", "ImageError",
           "TASK_VARIABLES", "utcnow"]


@dataclass
class RuntimePlace:
    """Where a worker runs its module's programs: what a runtime needs beyond the module."""
    workdir: str                       # the task's WORK_DIR on node-local scratch
    data_dir: str                      # the app's DATA_DIR on this node
    image_cache: str                   # where registry images are pulled to
    instance_name: str                 # a container instance's name, unique on the node
    binary: str | None = None          # the site's runtime: apptainer, singularity, host; None: any on PATH
    pull_timeout: float = 900.0


def runtime_for(module: ModuleDef, place: RuntimePlace) -> Runtime:
    if module.builtin:
        return BuiltinRuntime()
    if not module.in_container:
        return HostRuntime()
    return ContainerRuntime(
        binary=find_runtime(place.binary), image=module.base_image, mode=module.container_mode,
        code_path=module.code_path, workdir=place.workdir, data_dir=place.data_dir, volumes=list(module.volumes),
        cache_dir=place.image_cache, name=place.instance_name, pull_timeout=place.pull_timeout,
        variables=TASK_VARIABLES | set(module.environments))
