"""The ``t3d`` command. Each sub-command lives next to what it drives and is registered here by name.

Each command is registered by a ``"module:function"`` that adds its parser to ``t3d``'s sub-parsers; the parser
carries ``func``, the function that runs it, named the same way and imported only when the command runs. Parser
modules are light and only the parser of the command on the command line is built, so ``t3d --help``,
``t3d <command> --help`` and ``import t3d.cli`` load no torch, MONAI or transformers. ``main([...])`` is what tests
call.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from t3d import __version__
from t3d.configfile import ConfigError

# name -> ("module:function" that adds its parser, one-line help), in the order they appear in `t3d --help`.
# The help lives here only: `t3d --help` lists the commands without importing their modules.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("t3d.commands:add_demo", "run the whole pipeline on a small synthetic dataset (CPU, minutes)"),
    "synth": (
        "t3d.data.synthetic.command:add_parser",
        "write a synthetic CT + report benchmark (volumes, labels, reports)",
    ),
    "preprocess": ("t3d.data.command:add_parser", "read, check, reorient and resample raw studies into the crop cache"),
    "pretrain": ("t3d.pretrain.command:add_parser", "pre-train an image encoder on (CT, report) pairs"),
    "finetune": ("t3d.finetune.command:add_parser", "fine-tune a pre-trained encoder on a downstream task (seg, cls)"),
    "predict": ("t3d.commands:add_predict", "apply a fine-tuned model to new scans (seg)"),
    "export": (
        "t3d.commands:add_export",
        "export the pre-trained encoder to safetensors (loads into MONAI SwinUNETR / ResNet)",
    ),
    "evaluate": (
        "t3d.evaluate.command:add_parser",
        "zero-shot classification and image-report retrieval of a checkpoint",
    ),
    "embed": (
        "t3d.commands:add_embed",
        "export image (and report) embeddings of a manifest from a pre-training checkpoint",
    ),
}


def chosen_command(argv: list[str]) -> str | None:
    """The sub-command named on the command line (the first argument that is one), if any."""
    return next((a for a in argv if a in COMMANDS), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``t3d`` parser; ``command``'s module is imported and adds its full parser, the others are listed only."""
    parser = argparse.ArgumentParser(
        prog="t3d",
        description="Text-informed vision-language pre-training on full-resolution 3D CT.",
    )
    parser.add_argument("--version", action="version", version=f"t3d {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (register, help_text) in COMMANDS.items():
        if name == command:
            resolve(register)(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def resolve(func: Callable | str) -> Callable:
    """A callable, or the function named ``"module:function"``, imported now."""
    if callable(func):
        return func
    module, _, name = func.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(chosen_command(argv))
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
        return int(resolve(args.func)(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        # Errors meant for people: print the message, not a traceback (use -v for one).
        if args.verbose:
            raise
        print(f"t3d {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
