"""scalebox-hpc: Scalebox-style streaming pipelines on HPC batch sites."""
__version__ = "0.1.0"
