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
    except (ConfigError, ValueError, OSError) as err:
        # Errors meant for people (bad input, a file that is missing, read-only or of the wrong kind): the message
        # names the file and the fix; no traceback unless -v.
        if args.verbose:
            raise
        print(f"t3d {args.command}: error: {_for_people(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.verbose:
            raise
        print(f"t3d {args.command}: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130


def _for_people(err: Exception) -> str:
    """The message of ``err``; OS errors get the file and what to do, as other errors already carry them."""
    if not isinstance(err, OSError) or isinstance(err, FileNotFoundError) and not err.filename:
        return str(err)
    where = f"{err.filename}: " if err.filename else ""
    hints = {
        PermissionError: "not allowed here: choose a writable location or fix the permissions",
        IsADirectoryError: "a folder where a file is expected: pass a file",
        NotADirectoryError: "a file where a folder is expected: pass a folder",
        FileExistsError: "exists and is not what is expected here: choose another path",
        FileNotFoundError: "does not exist: check the path",
    }
    hint = next((text for kind, text in hints.items() if isinstance(err, kind)), err.strerror or str(err))
    return f"{where}{hint} ({err.strerror or type(err).__name__})"


if __name__ == "__main__":
    raise SystemExit(main())
