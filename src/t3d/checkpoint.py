"""Checkpoints that survive SIGKILL and load with ``torch.load(weights_only=True)``.

A checkpoint is one ``.pt`` file written to a temporary name and atomically renamed into place; the run folder's
``latest`` file names the newest complete checkpoint and is itself replaced atomically. A run killed at any moment
therefore leaves either the previous checkpoint or the new one, never half of one.

Everything stored is a tensor or a plain Python container (no pickled objects), so ``weights_only=True`` works:
RNG states of Python and NumPy are converted to lists/tensors.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

LATEST = "latest"


class CheckpointError(ValueError):
    """A file cannot be used as a t3d checkpoint: not a torch file, truncated, or holding code objects."""


def save_checkpoint(state: dict[str, Any], run_dir: str | Path, name: str, keep: int | None = None) -> Path:
    """Write ``run_dir/checkpoints/<name>.pt`` atomically and point ``run_dir/latest`` at it.

    ``keep``: number of step checkpoints (``step_*.pt``) to keep; older ones are deleted after the new one is in place.
    """
    run_dir = Path(run_dir)
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.pt"
    tmp = folder / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    pointer_tmp = run_dir / f".{LATEST}.{uuid.uuid4().hex[:8]}.tmp"
    pointer_tmp.write_text(f"checkpoints/{path.name}\n")
    pointer_tmp.replace(run_dir / LATEST)
    if keep is not None:
        # By step number, not mtime: two saves within the file system's timestamp resolution would tie.
        steps = sorted(folder.glob("step_*.pt"), key=_step_number)
        for old in steps[:-keep] if keep > 0 else steps:
            if old != path:
                old.unlink(missing_ok=True)
    return path


def _step_number(path: Path) -> tuple[int, str]:
    digits = path.stem.removeprefix("step_")
    return (int(digits), path.name) if digits.isdigit() else (-1, path.name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint named by ``run_dir/latest``, or None when the run has none yet."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if not pointer.is_file():
        return None
    path = run_dir / pointer.read_text().strip()
    if not path.is_file():
        raise FileNotFoundError(f"{pointer} names {path}, which does not exist; delete {pointer} to start over")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code is unpickled)."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path} holds no checkpoint (no '{LATEST}' file)")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise CheckpointError(
                f"{path}: refused: contains code objects (pickled classes or functions), which a t3d checkpoint "
                "never holds; use a checkpoint written by t3d, or `t3d export` output (.safetensors)"
            ) from None
        raise CheckpointError(f"{path} is not a t3d checkpoint (not a torch file); {_WHAT_TO_PASS}") from None
    except Exception as err:  # garbage bytes fail anywhere in the unpickler (KeyError, EOFError, RuntimeError, ...)
        first = (str(err).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path} is not a t3d checkpoint (truncated or damaged torch file: {first}); {_WHAT_TO_PASS}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a t3d checkpoint (holds a {type(state).__name__}); {_WHAT_TO_PASS}")
    model_cfg = state.get("config", {}).get("model") if isinstance(state.get("config"), dict) else None
    if isinstance(model_cfg, dict) and "norm" not in model_cfg:
        model_cfg["norm"] = "batch"  # a config without model.norm was trained with BatchNorm (MONAI's default)
    return state


_WHAT_TO_PASS = "pass a run folder or a checkpoints/*.pt file written by t3d"


def intact_checkpoint(run_dir: str | Path, broken: Path) -> Path | None:
    """The newest checkpoint of ``run_dir/checkpoints`` other than ``broken`` that loads, or None."""
    folder = Path(run_dir) / "checkpoints"
    for path in sorted(folder.glob("*.pt"), key=_step_number, reverse=True):
        if path.resolve() == broken.resolve():
            continue
        try:
            load_checkpoint(path)
        except CheckpointError:
            continue
        return path
    return None


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as weights_only-safe containers."""
    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_to_lists(v) for v in value]
    return value


def _to_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuples(v) for v in value)
    return value
