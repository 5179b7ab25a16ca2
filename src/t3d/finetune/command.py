"""``t3d finetune {seg,cls}``: downstream fine-tuning commands (docs/method.md §6).

Each task module exposes ``add_parser(subparsers)`` and registers itself under ``finetune`` here, as top-level
commands do in ``t3d.cli``.
"""

from __future__ import annotations

import importlib

# Task modules that register a ``t3d finetune <task>`` sub-command, in help order.
TASK_MODULES = [
    "t3d.finetune.seg",
    "t3d.finetune.cls",
]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a pre-trained encoder on a downstream task (seg, cls)",
        description="Downstream fine-tuning from a pre-training checkpoint, or from random initialisation.",
    )
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    tasks.required = True
    for name in TASK_MODULES:
        importlib.import_module(name).add_parser(tasks)
