"""Where a job's Ray cluster is, and connecting to it (or starting a local one sized to the job)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RayConfig:
    """Where the job's Ray cluster is: None starts a local one (or uses RAY_ADDRESS, as ray.init does)."""

    address: str | None = None  # a running cluster (ray://host:10001 or host:6379, "auto"); None: local or RAY_ADDRESS
    num_cpus: int | None = None  # only for a local cluster started by the job
    # Ray's dashboard (http://127.0.0.1:8265) beside a local cluster started by the job: 11 more
    # processes, ~1 CPU-s to start and ~1.5 % of a core while the job runs; a cluster's is its own
    dashboard: bool = False



def init_ray(config: RayConfig, min_cpus: float = 0) -> None:
    """Connect to the configured cluster, or start a local one with at least `min_cpus` logical CPUs.

    A local cluster gets max(cores, min_cpus) logical CPUs: a pipeline whose stages reserve more
    CPUs than the machine has cores would otherwise wait forever (a 2-core laptop running a read
    task beside two encoder actors). Actors set their own torch threads, so this oversubscribes
    logical slots, not cores.
    """
    import os

    import ray

    if ray.is_initialized():
        return
    if config.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=config.address) if config.address else ray.init()
        return
    ray.init(num_cpus=config.num_cpus or max(os.cpu_count() or 1, math.ceil(min_cpus)),
             include_dashboard=config.dashboard)
