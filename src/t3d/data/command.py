"""``t3d preprocess``: the command-line parser. The run is ``t3d.data.preprocess.run_command``, imported when it
runs, so ``t3d preprocess --help`` loads no torch or MONAI."""

from __future__ import annotations

from typing import Any


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "preprocess",
        description=(
            "Preprocess a manifest (JSONL/CSV, or the CT-RATE reports CSV) into an int16 HU crop cache. "
            "Unchanged studies are skipped; bad ones go to CACHE/quarantine.json. Settings come from the "
            "'preprocess:' section of --config and dotted overrides such as '--preprocess.spacing=[1,1,1.5]' or "
            "--preprocess.spacing native. Exit code 0 when the run finished and at least one study is cached."
        ),
    )
    parser.add_argument("--manifest", help="JSONL/CSV manifest (default: data.manifest of --config)")
    parser.add_argument("--out", help="cache folder (default: data.cache of --config)")
    parser.add_argument("--root", help="data root for relative paths (default: data.root, else the manifest's folder)")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument("--config", help="YAML config; its 'preprocess:' and 'data:' sections are used")
    parser.add_argument("--label-key", help="manifest column holding label paths (default: 'label' if present)")
    parser.add_argument("--verify", action="store_true", help="hash every source, ignoring the size+mtime shortcut")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func="t3d.data.preprocess:run_command", accepts_overrides=True)
