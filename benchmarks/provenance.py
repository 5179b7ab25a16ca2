"""Where a benchmark result comes from: the git revision of the tree that produced it (shared by the scripts)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_revision() -> str:
    """``git rev-parse HEAD`` plus ``-dirty`` when the tree differs from it (changed or new, not ignored, files
    outside ``benchmarks/results``)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        # Result files are outputs, not code: a results JSON written by an earlier benchmark leaves the code clean.
        status = ["git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"]
        dirty = subprocess.run(status, cwd=ROOT, capture_output=True, text=True)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
