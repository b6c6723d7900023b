"""The `dualtok` command: one subcommand per job, each defined in its own module under jobs/.

Each job module exposes `add_arguments(parser)` and `run(args) -> int`; this file only wires
them into argparse, in one dialect: a command's flags may be written `name=value` and a config
job's keys `--key value`, and the global flags go anywhere on the line (`_normalise`). Only the
CLI prints.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

import yaml

import dualtok_core
from dualtok_core.errors import DualtokError
from dualtok.pipelines.config import ConfigError, to_dict
from dualtok.pipelines.io.storage import InputListingError, StorageFault

# subcommand -> (module under jobs/, one-line help). Modules are imported only when chosen,
# so `dualtok --version` does not pay for importing ray and torch.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "presets": ("dualtok.jobs.show_presets", "list the model presets with their parameter counts"),
    "shards": ("dualtok.jobs.make_shards", "write WebDataset shards from a folder of images or a list of paths"),
    "demo": ("dualtok.jobs.demo", "build sample shards from bundled photos and tokenize them locally (no arguments)"),
    "tokenize": ("dualtok.jobs.tokenize", "tokenize WebDataset shards into a Parquet token corpus (Ray Data)"),
    "train": ("dualtok.jobs.train", "train one stage of the tokenizer with Ray Train"),
    "recipe": ("dualtok.jobs.recipe", "train every stage of a bundle in order from one config, then audit it on held-out shards"),
    "audit": ("dualtok.jobs.audit", "audit how faithfully a token corpus reconstructs its images: tables + HTML report"),
    "export": ("dualtok.jobs.export", "export a token corpus as LLM training sequences (Megatron .bin/.idx or Parquet)"),
    "stats": ("dualtok.jobs.stats", "corpus statistics: rows, errors, codebook usage, perplexity, duplicate token sequences"),
    "submit": ("dualtok.jobs.submit", "submit a job file to a Ray cluster's job server, once per (job, config, day)"),
    "stack": ("dualtok.jobs.local_stack", "start/stop a local Ray head with its job server and a loopback S3 endpoint"),
    "manifests": ("dualtok.jobs.manifests", "render the Kubernetes manifests (KubeRay RayCluster/RayJob/RayCronJob, CronJob)"),
    "bundle": ("dualtok.jobs.make_bundle", "assemble a bundle from released BLIP-2 / MoVQ / SD 1.x weights or a preset"),
}


GLOBAL_HELP = """\
one dialect everywhere: config jobs (tokenize, train, audit, stats, manifests) take KEY=VALUE
overrides and the same keys as --KEY VALUE; the other commands take --flag VALUE and the same
flags as flag=VALUE. `dualtok COMMAND --help` lists a command's flags or keys.
global flags (anywhere on the line): --log-level, -q (warnings only), -v (debug for dualtok's
loggers; -vv: for every logger, Ray's included), --json (a machine-readable summary on stdout).
exit codes: 0 success; 1 the job itself failed; 2 a config or input error (nothing ran);
3 partial failure (some shards failed, the rest committed); 4 more errors than max_error_fraction."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (the others cost nothing)."""
    parser = argparse.ArgumentParser(prog="dualtok", description=dualtok_core.__doc__, epilog=GLOBAL_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dualtok {dualtok_core.__version__}")
    parser.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level of every logger (default: INFO; -q and -v change it)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: debug logs from dualtok; -vv: from every library, Ray's progress too")
    parser.add_argument("--json", action="store_true", help="print the job's summary as one JSON object on stdout")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_module=module)
    return parser


def _command_in(argv: list[str]) -> str | None:
    return next((arg for arg in argv if arg in SUBCOMMANDS), None)


_GLOBAL_SWITCHES = {"-q", "--quiet", "--json", "--verbose"}


def _hoist_global_flags(argv: list[str]) -> list[str]:
    """Move the global flags to the front, so that they work after the subcommand too."""
    hoisted: list[str] = []
    rest: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if token in _GLOBAL_SWITCHES or (token.startswith("-v") and set(token[1:]) == {"v"}):
            hoisted.append(token)
        elif token == "--log-level":
            hoisted += [token, next(tokens, "")]
        elif token.startswith("--log-level="):
            hoisted.append(token)
        else:
            rest.append(token)
    return hoisted + rest


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _normalise(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The argv argparse sees: global flags first, then the command in its own dialect."""
    argv = _hoist_global_flags(argv)
    command = _command_in(argv)
    if command is None:
        return argv
    at = argv.index(command) + 1
    sub = _subparser(parser, command)
    flag_keys = sub.get_default("_config_flag_keys")
    if flag_keys is not None:
        return argv[:at] + _flags_to_overrides(argv[at:], flag_keys, set(sub._option_string_actions))
    return argv[:at] + _assignments_to_flags(argv[at:], sub._option_string_actions)


_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off"}


def _flags_to_overrides(tokens: list[str], keys: dict[str, bool], own_flags: set[str]) -> list[str]:
    """`--encoder.batch_size 8` and `--output=x` -> `encoder.batch_size=8`, `output=x` (a config
    key's flag; the command's own flags, --config and --help, stay as they are). A bool key's flag
    alone means true: `--storage.anon`."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name, sep, value = token[2:].partition("=")
        key = name.replace("-", "_")
        if not token.startswith("--") or token.split("=")[0] in own_flags or key not in keys:
            out.append(token)
        elif sep:
            out.append(f"{key}={value}")
        elif keys[key] and (i + 1 == len(tokens) or tokens[i + 1].lower() not in _BOOL_WORDS):
            out.append(f"{key}=true")
        elif i + 1 < len(tokens):
            out.append(f"{key}={tokens[i + 1]}")
            i += 1
        else:
            raise ConfigError(f"--{name} needs a value: --{name} VALUE or {key}=VALUE")
        i += 1
    return out


def _assignments_to_flags(tokens: list[str], flags: dict[str, argparse.Action]) -> list[str]:
    """`output=x` -> `--output x` for the command's own flags (`per_shard=8` -> `--per-shard 8`;
    `overwrite=true` -> `--overwrite`); other tokens, positionals included, stay as they are."""
    out: list[str] = []
    for token in tokens:
        name, sep, value = token.partition("=")
        flag = "--" + name.replace("_", "-")
        if token.startswith("-") or not sep or flag not in flags:
            out.append(token)
        elif flags[flag].nargs == 0:  # a switch: name=true sets it, name=false leaves it unset
            if value.lower() not in _BOOL_WORDS:
                raise ConfigError(f"{name} is a switch: {name}=true or {name}=false, not {value!r}")
            out += [flag] if value.lower() in {"true", "yes", "on"} else []
        else:
            out += [flag, value]
    return out


def _configure_logging(args: argparse.Namespace) -> None:
    """--log-level wins; else -q: WARNING, -v: DEBUG for dualtok's own loggers, -vv: for all."""
    level = args.log_level or ("WARNING" if args.quiet else "DEBUG" if args.verbose >= 2 else "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose and not args.log_level:
        for name in ("dualtok", "dualtok_core"):
            logging.getLogger(name).setLevel(logging.DEBUG)
    args.log_level = level


def _print_config(args: argparse.Namespace) -> int:
    config_type: Any = args._config_type
    cls = config_type if isinstance(config_type, type) else config_type(args)
    from dualtok.jobs.config import config_from_args

    print(yaml.safe_dump(to_dict(config_from_args(cls, args)), sort_keys=False), end="")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    """argv in either dialect, global flags anywhere -> the chosen command's arguments."""
    parser = build_parser(_command_in(argv))
    try:
        args = parser.parse_args(_normalise(parser, argv))
    except ConfigError as err:
        parser.exit(2, f"dualtok: error: {err}\n")
    if args.command is None:
        parser.print_help()
        parser.exit(2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    _configure_logging(args)
    try:
        if getattr(args, "print_config", False):
            return _print_config(args)
        return int(args._module.run(args) or 0)
    except (ConfigError, DualtokError, InputListingError, StorageFault) as err:
        # the user's input is wrong, or the store refused to list it: say what, without a stack trace
        print(f"dualtok {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
