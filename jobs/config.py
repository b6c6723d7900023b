"""The CLI plumbing every job shares: `-c FILE`, `KEY=VALUE` overrides, `--print-config`, `--help`.

Jobs take `dualtok <job> [-c job.yaml] [key=value | --key value ...] [--print-config]`: the YAML
file and the overrides map onto the job's one root dataclass through
`dualtok.pipelines.config.load_config`; the job's `--help` lists its keys from that dataclass.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import TypeVar

from dualtok.pipelines.config import ConfigKey, config_keys, load_config

T = TypeVar("T")


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


__all__ = ["add_config_arguments", "config_from_args"]
