"""What a node gives a pilot, and what each task of a module takes from it.

Pure functions of the environment, so that they are unit-tested without Slurm: a
pilot in a Slurm job learns its cores, GPUs and memory from the variables Slurm sets
for the job step; on the local site the site config says (default: every core of
the machine). A task's GPUs reach its program as the variables CUDA, ROCm and
oneAPI read, naming its own devices only.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

#: The variables that restrict a program to its GPUs, for each vendor's runtime.
GPU_VARIABLES = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")
_CPUS_PER_NODE = re.compile(r"\d+")


@dataclass(frozen=True)
class NodeResources:
    cpus: int
    gpus: tuple[str, ...] = ()        # device ids as the node's programs must name them
    mem_mb: int | None = None         # None: not limited (nothing said)
    source: str = ""                  # where the figures came from, for the pilot's log

    def describe(self) -> str:
        mem = f"{self.mem_mb} MiB" if self.mem_mb else "memory not limited"
        gpus = f"GPUs {','.join(self.gpus)}" if self.gpus else "no GPU"
        return f"{self.cpus} cores, {gpus}, {mem} (from {self.source})"


def _device_list(value: str | None) -> tuple[str, ...] | None:
    """'0,1' or 'GPU-uuid,...' -> the ids; None when unset; () for Slurm's 'NoDevFiles'."""
    if value is None:
        return None
    value = value.strip()
    if value in ("", "NoDevFiles"):
        return ()
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _first_node_cpus(value: str) -> int | None:
    """SLURM_JOB_CPUS_PER_NODE ('64(x2),32'): the count of the first node group."""
    match = _CPUS_PER_NODE.match(value.strip())
    return int(match.group()) if match else None


def node_resources(environ: Mapping[str, str], *, cpus: int | None = None, gpus: Sequence[str] | None = None,
                   mem_mb: int | None = None) -> NodeResources:
    """A pilot's resources: in a Slurm job, what Slurm gave this node; elsewhere the
    site config's figures (``cpus``, ``gpus``, ``mem_mb``), all cores by default.

    GPU ids are those the job's programs see: CUDA_VISIBLE_DEVICES when Slurm (or the
    site) set it, else SLURM_STEP_GPUS, else SLURM_JOB_GPUS."""
    if environ.get("SLURM_JOB_ID"):
        found = environ.get("SLURM_CPUS_ON_NODE")
        n = int(found) if found and found.isdigit() else _first_node_cpus(environ.get("SLURM_JOB_CPUS_PER_NODE", ""))
        devices = None
        for name in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
            devices = _device_list(environ.get(name))
            if devices is not None:
                break
        # SLURM_MEM_PER_NODE=0 means "all of the node": then only a per-CPU figure says more.
        mem, per_cpu = environ.get("SLURM_MEM_PER_NODE", ""), environ.get("SLURM_MEM_PER_CPU", "")
        memory = None
        if mem.isdigit() and int(mem) > 0:
            memory = int(mem)
        elif per_cpu.isdigit():
            memory = int(per_cpu) * (n or 1)
        return NodeResources(cpus=max(1, n or cpus or os.cpu_count() or 1), gpus=devices or (), mem_mb=memory,
                             source=f"Slurm job {environ['SLURM_JOB_ID']}")
    if gpus is None:
        gpus = _device_list(environ.get("CUDA_VISIBLE_DEVICES")) or ()
    return NodeResources(cpus=max(1, cpus or os.cpu_count() or 1), gpus=tuple(gpus), mem_mb=mem_mb,
                         source="site config" if cpus else "this machine")


def gpu_environment(devices: Sequence[str]) -> dict[str, str]:
    """The variables that give a program these GPUs and no other (an empty list hides all)."""
    value = ",".join(devices)
    return dict.fromkeys(GPU_VARIABLES, value)


def mebibytes(value) -> int | None:
    """MiB from a number (MiB) or a size with Slurm's units (512M, 4G, 1T); None if it
    is neither."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)", str(value).strip().upper().removesuffix("B"))
    if not match:
        return None
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[match.group(2)]
    return max(1, int(float(match.group(1)) * scale))
