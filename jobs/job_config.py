"""What every job's config shares: storage credentials, the Ray address, and the CLI plumbing.

Jobs take `dualtok <job> [-c job.yaml] [key=value | --key value ...] [--print-config]`: the YAML
file and the overrides map onto the job's one root dataclass through
`pipelines.configuration.load_config`; the job's `--help` lists its keys from that dataclass.
"""

from __future__ import annotations

import argparse
import math
import textwrap
from dataclasses import dataclass
from typing import Any, TypeVar

from pipelines.configuration import ConfigError, ConfigKey, SecretStr, config_keys, load_config, secret

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


def add_config_arguments(parser: argparse.ArgumentParser, config_type: type,
                         variants: dict[str, type] | None = None) -> None:
    """`-c FILE`, `KEY=VALUE` overrides and `--print-config`; the help lists every key of
    `config_type` (and what each of `variants`, e.g. the training stages, adds or changes).
    The CLI turns `--key value` into `key=value` for these keys (`config_flag_keys`)."""
    keys = config_keys(config_type)
    example = " ".join(f"{k.key}={_example_value(k)}" for k in _example_keys(keys))
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _keys_help(config_type, variants)
    parser.add_argument("-c", "--config", help="YAML job config (keys as in the list below; overrides win)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML (secrets ***) and exit without running")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"config keys listed below, nested with dots, e.g. {example}; "
                             "--KEY VALUE and --KEY=VALUE work too")
    every = [k for cls in [config_type, *(variants or {}).values()] for k in config_keys(cls)]
    parser.set_defaults(_config_type=config_type, _config_flag_keys={k.key: k.is_bool for k in every})


def _example_keys(keys: list[ConfigKey]) -> list[ConfigKey]:
    plain = next((k for k in keys if k.key == "output"), keys[0])
    sized = next((k for k in keys if k.key.endswith("batch_size")), None)
    return [plain, sized] if sized else [plain]


def _example_value(key: ConfigKey) -> str:
    return "s3://bucket/out" if key.key == "output" else str(int(key.default) * 2) if key.default.isdigit() else "VALUE"


def _keys_help(config_type: type, variants: dict[str, type] | None) -> str:
    lines = ["config keys (KEY=VALUE or --KEY VALUE; values are YAML-typed; a list key given twice",
             "appends, any other key given twice is an error):"]
    base = {k.key: k for k in config_keys(config_type)}
    lines += [line for k in base.values() for line in _key_lines(k)]
    for name, variant in (variants or {}).items():
        changed = [k for k in config_keys(variant) if base.get(k.key) != k]
        if changed:
            lines.append(f"\n{name}: keys it adds or whose defaults differ:")
            lines += [line for k in changed for line in _key_lines(k)]
    return "\n".join(lines)


def _key_lines(key: ConfigKey) -> list[str]:
    head = f"  {key.key} ({key.type_name}, default {key.default})"
    if not key.meaning:
        return [head]
    return [head, *textwrap.wrap(key.meaning, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)]


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
