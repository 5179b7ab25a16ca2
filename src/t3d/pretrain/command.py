"""``t3d pretrain``: the command-line parser. The run is ``t3d.pretrain.main.command``, imported when it runs, so
``t3d pretrain --help`` loads no torch."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        description="Pre-train with docs/method.md §2-§5. Any config value can be overridden: --train.lr 1e-4.",
    )
    p.add_argument("--config", help="YAML config (see configs/); defaults apply where it is silent")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.set_defaults(func="t3d.pretrain.main:command", accepts_overrides=True)
