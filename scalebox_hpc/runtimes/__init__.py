"""How a module's program is started: built into the worker, on the host, or in an
Apptainer/Singularity container. ``runtime_for`` makes the one choice, from the typed
module definition; the worker then only calls the Runtime interface (runtimes.base).

Imports go one way: base <- host <- apptainer, base <- builtin; nothing here imports
the worker or the database.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..appdef import ModuleDef
from .apptainer import ContainerImage, ContainerRuntime, ImageError, find_runtime
from .base import TASK_VARIABLES, OutputBuffer, ProgramResult, Runtime, utcnow
from .builtin import BuiltinRuntime
from .host import HostRuntime

__all__ = ["RuntimePlace", "runtime_for", "Runtime", "ProgramResult", "OutputBuffer", "ImageError", "ContainerImage",
           "TASK_VARIABLES", "utcnow"]


@dataclass
class RuntimePlace:
    """Where a worker runs its module's programs: what a runtime needs beyond the module."""
    workdir: str                       # the task's WORK_DIR on node-local scratch
    data_dir: str                      # the app's DATA_DIR on this node
    image_cache: str                   # where registry images are pulled to
    root: str                          # the pilot's scratch directory (WORK_DIRs are under it)
    instance_prefix: str               # container instance names start so, unique on the node
    binary: str | None = None          # the site's runtime: apptainer, singularity, host; None: any on PATH
    pull_timeout: float = 900.0
    gpu_flags: tuple[str, ...] = ()    # --nv / --rocm for every container of a pilot with GPUs
    bin_dir: str | None = None         # the in-task `scalebox` command's directory (intask.install)
    # The pilot's images, shared by its lanes: one per (image, mounts), one instance each.
    images: dict = field(default_factory=dict)


def runtime_for(module: ModuleDef, place: RuntimePlace) -> Runtime:
    if module.builtin:
        return BuiltinRuntime()
    if not module.in_container:
        return HostRuntime()
    key = (module.base_image, module.code_path, place.data_dir, tuple(module.volumes))
    shared = place.images.get(key)
    if shared is None:
        shared = place.images[key] = ContainerImage(
            binary=find_runtime(place.binary), image=module.base_image, root=place.root, data_dir=place.data_dir,
            code_path=module.code_path, volumes=list(module.volumes), cache_dir=place.image_cache,
            name=f"{place.instance_prefix}-i{len(place.images)}", gpu_flags=place.gpu_flags,
            pull_timeout=place.pull_timeout, bin_dir=place.bin_dir)
    return ContainerRuntime(shared, mode=module.container_mode, workdir=place.workdir,
                            variables=TASK_VARIABLES | set(module.environments))
