"""`dualtok presets`: the named presets and their parameter counts (built on the meta device)."""

from __future__ import annotations

import argparse

from dualtok_core.presets import get_preset, parameter_counts, preset_names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", help="presets to show (default: all)")


def run(args: argparse.Namespace) -> int:
    for name in args.names or preset_names():
        preset = get_preset(name)
        counts = parameter_counts(name)
        total = sum(counts.values())
        parts = ", ".join(f"{part} {n / 1e6:,.1f}M" for part, n in counts.items())
        print(f"{name:6s} {total / 1e6:10,.1f}M params  ({parts})")
        print(f"       {preset.description}")
    return 0
