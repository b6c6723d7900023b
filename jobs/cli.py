"""The `dualtok` command: one subcommand per job, each defined in its own module under jobs/.

Each job module exposes `add_arguments(parser)` and `run(args) -> int`; this file only wires
them into argparse. Only the CLI prints.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import dualtok_core
from dualtok_core.errors import DualtokError
from pipelines.configuration import ConfigError
from pipelines.storage import InputListingError

# subcommand -> (module under jobs/, one-line help). Modules are imported only when chosen,
# so `dualtok --version` does not pay for importing ray and torch.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "presets": ("jobs.show_presets", "list the model presets with their parameter counts"),
    "shards": ("jobs.make_shards", "write WebDataset shards from a folder of images or a list of paths"),
    "demo": ("jobs.demo", "build sample shards from bundled photos and tokenize them locally (no arguments)"),
    "tokenize": ("jobs.tokenize", "tokenize WebDataset shards into a Parquet token corpus (Ray Data)"),
    "train": ("jobs.train", "train one stage of the tokenizer with Ray Train"),
    "audit": ("jobs.audit", "audit how faithfully a token corpus reconstructs its images: tables + HTML report"),
    "stats": ("jobs.stats", "corpus statistics: rows, errors, codebook usage, perplexity, duplicate token sequences"),
    "submit": ("jobs.submit", "submit a job file to a Ray cluster's job server, once per (job, config, day)"),
    "stack": ("jobs.local_stack", "start/stop a local Ray head with its job server and a loopback S3 endpoint"),
    "manifests": ("jobs.manifests", "render the Kubernetes manifests (KubeRay RayCluster/RayJob/RayCronJob, CronJob)"),
    "bundle": ("jobs.make_bundle", "assemble a bundle from released BLIP-2 / MoVQ / SD 1.x weights or a preset"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (the others cost nothing)."""
    parser = argparse.ArgumentParser(prog="dualtok", description=dualtok_core.__doc__)
    parser.add_argument("--version", action="version", version=f"dualtok {dualtok_core.__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args._module.run(args) or 0)
    except (ConfigError, DualtokError, InputListingError) as err:
        # the user's input is wrong: say what, without a stack trace from deep inside
        print(f"dualtok {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
