"""Atomic checkpoints of a bilevel run (state, history, RNG, data position).

A checkpoint is written to a temporary file in the same directory, flushed to disk and
renamed over the old one (``os.replace`` is atomic on POSIX and Windows), so an
interruption at any moment leaves either the previous or the new checkpoint, never a
truncated file.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .methods.base import State

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "capture_rng", "restore_rng"]

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not match the run."""


def capture_rng() -> dict:
    """The global RNG states of torch, numpy and Python's ``random``."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def save_checkpoint(path: str | os.PathLike, state: State, history: list, meta: dict | None = None) -> Path:
    """Write ``state``, ``history`` and ``meta`` to ``path`` atomically; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "state": state.to_dict(),
        "history": history,
        "rng": capture_rng(),
        "meta": meta or {},
    }
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; ``payload["state"]`` is a :class:`State`.

    Tensors come back on the device they were saved from unless ``map_location`` says otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: give the file written by a previous run (checkpoint.pt in its run directory)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"{path} is not a readable bilevel checkpoint ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a bilevel checkpoint of format {FORMAT_VERSION}")
    payload["state"] = State.from_dict(payload["state"])
    return payload
