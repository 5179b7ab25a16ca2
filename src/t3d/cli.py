"""The ``t3d`` command. Each sub-command lives next to what it drives and registers itself here.

A command module exposes ``add_parser(subparsers)``; the parser it adds carries ``func`` (called with the
parsed namespace, returns an exit code). ``main([...])`` is what tests call.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from t3d import __version__
from t3d.config import ConfigError

# Modules that register sub-commands, in the order they appear in `t3d --help`.
COMMAND_MODULES = [
    "t3d.demo",
    "t3d.data.synthetic.command",
    "t3d.data.preprocess",
    "t3d.pretrain.main",
    "t3d.finetune.command",
    "t3d.predict",
    "t3d.export",
    "t3d.evaluate.command",
    "t3d.embed",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t3d",
        description="Text-informed vision-language pre-training on full-resolution 3D CT.",
    )
    parser.add_argument("--version", action="version", version=f"t3d {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted config overrides (--train.lr 1e-4) are only accepted by commands that take a config.
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        # Errors meant for people: print the message, not a traceback (use -v for one).
        if args.verbose:
            raise
        print(f"t3d {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
