"""What every job's config shares: storage credentials, the Ray address, and the CLI plumbing.

Jobs take `dualtok <job> [-c job.yaml] [key=value ...]`: the YAML file and the overrides map onto
the job's one root dataclass through `pipelines.configuration.load_config`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, TypeVar

from pipelines.configuration import ConfigError, SecretStr, load_config, secret

T = TypeVar("T")


@dataclass(frozen=True)
class StorageConfig:
    """Object-store access. Credentials normally come from the standard AWS chain (env vars,
    profile, instance/service-account role); `key`/`secret` exist for stores without one. They stay
    `SecretStr`s inside `storage_options()` (so every plan, stage and Ray Train run state holding
    the options shows "***") and are revealed only where the store client is built
    (`pipelines.storage.filesystem`)."""

    endpoint_url: str | None = None  # any S3-compatible endpoint (MinIO, R2, a loopback moto server)
    region: str | None = None
    profile: str | None = None
    anon: bool = False
    key: SecretStr | None = secret()
    secret: SecretStr | None = secret()

    def __post_init__(self) -> None:
        for name in ("key", "secret"):  # built in code with a plain string: wrap it all the same
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, SecretStr(getattr(self, name)))

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs keyword arguments, credentials still wrapped; empty when the defaults apply."""
        options: dict[str, Any] = {}
        client: dict[str, Any] = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            options["client_kwargs"] = client
        if self.profile:
            options["profile"] = self.profile
        if self.anon:
            options["anon"] = True
        if self.key or self.secret:
            options.update(key=self.key, secret=self.secret)
        return options


@dataclass(frozen=True)
class RayConfig:
    """Where the job's Ray cluster is: None starts a local one (or uses RAY_ADDRESS, as ray.init does)."""

    address: str | None = None
    num_cpus: int | None = None  # only for a local cluster started by the job


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="YAML job config (keys as in the job's config type)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override config keys, nested with dots: output=s3://b/corpus guide.batch_size=64")


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    return load_config(cls, args.config, args.overrides)


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
    ray.init(num_cpus=config.num_cpus or max(os.cpu_count() or 1, math.ceil(min_cpus)))


__all__ = ["ConfigError", "RayConfig", "StorageConfig", "add_config_arguments", "config_from_args", "init_ray"]
