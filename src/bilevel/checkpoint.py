"""Atomic, safe checkpoints of a bilevel run (state, history, RNG, metadata).

Writing: the payload goes to a temporary file in the same directory, is flushed to disk
and renamed over the old one (``os.replace`` is atomic on POSIX and Windows), so an
interruption at any moment leaves either the previous or the new checkpoint, never a
truncated file.

Reading: a checkpoint is loaded with ``torch.load(..., weights_only=True)``, PyTorch's
restricted unpickler that rebuilds tensors and plain containers and refuses everything
else. A checkpoint is a pickle, and an ordinary pickle can run any code when it is
loaded; the restricted loader makes it safe to open a checkpoint received from someone
else (a shared run folder, a results archive, a bug report). To keep that guarantee the
payload holds only plain data — dicts, lists, tuples, tensors, numbers, strings,
booleans and ``None`` — and :func:`to_plain` / :func:`from_plain` are the one place where
the library's typed objects (the method :class:`~bilevel.methods.base.State`, the RNG
states) are converted to and from it. See ``docs/security.md``.

Format versions:

* 1 (bilevel 0.1.0): the state as a plain dict, numpy's RNG state as a tuple holding a
  numpy array. Still read: the one numpy array is rebuilt by numpy's own array
  reconstruction, registered as a safe global for that load only.
* 2: numpy's RNG state stored as a tensor and numbers; the writing library's version,
  and metadata checked to be plain data at write time. Still read.
* 3 (current): the method state's typed part states (``AdamState``, ``PeriodicState``,
  ...) stored as tagged plain data by :meth:`~bilevel.state.State.to_dict` and rebuilt by
  :meth:`~bilevel.state.State.from_dict`; formats 1 and 2 held bilevel 0.1's untyped dicts, which
  ``State.from_dict(..., legacy=True)`` converts.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import zipfile
from pathlib import Path
from pickle import UnpicklingError  # the restricted unpickler's refusal; nothing is unpickled with pickle itself
from typing import Any

import numpy as np
import torch

from .methods.base import State

__all__ = [
    "FORMAT_VERSION",
    "READABLE_FORMATS",
    "CheckpointError",
    "capture_rng",
    "from_plain",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "to_plain",
]

FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)

_PLAIN_SCALARS = (bool, int, float, str, type(None))


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, is unsafe to read, or does not match the run."""


def capture_rng() -> dict:
    """The global RNG states of torch (CPU and every initialised CUDA device), numpy and
    Python's ``random``, as plain data (tensors, numbers, lists)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": [int(version), list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict) -> None:
    """Set the global RNG states captured by :func:`capture_rng` (either format)."""
    torch.set_rng_state(states["torch"].cpu())
    numpy_state = states["numpy"]
    if isinstance(numpy_state, dict):
        np.random.set_state(
            (
                numpy_state["name"],
                numpy_state["keys"].cpu().numpy().astype(np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
    else:  # format 1: numpy's own tuple
        np.random.set_state(numpy_state)
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def to_plain(value: Any, where: str = "checkpoint") -> Any:
    """``value`` as plain data that ``torch.load(weights_only=True)`` reads back.

    A :class:`State` becomes a dict; tensors are detached (an ``nn.Parameter`` becomes a
    plain tensor); dicts, lists and tuples are converted entry by entry. Anything else
    (a namedtuple, a dataclass, a function, a numpy array) raises :class:`CheckpointError`
    naming where it sits, at write time, instead of producing a file that can only be
    read by running code.
    """
    if isinstance(value, State):  # its typed part states become tagged plain data (State.to_dict)
        return {key: to_plain(item, f"{where}.{key}") for key, item in value.to_dict().items()}
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, _PLAIN_SCALARS):
        return value
    if type(value) is dict:
        for key in value:
            if not isinstance(key, (str, int)):
                raise CheckpointError(
                    f"{where} has a key {key!r} of type {type(key).__name__}: checkpoint keys must be strings or integers"
                )
        return {key: to_plain(item, f"{where}[{key!r}]") for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(to_plain(item, f"{where}[{i}]") for i, item in enumerate(value))
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise CheckpointError(
        f"{where} is a {type(value).__name__}: a checkpoint holds only tensors, numbers, strings and "
        f"dicts/lists/tuples of them (so that it can be read without running code); convert it first"
    )


def from_plain(payload: dict) -> dict:
    """The inverse of the conversion made by :func:`save_checkpoint`: ``payload["state"]``
    becomes a :class:`State` (:meth:`~bilevel.state.State.from_dict`; formats 1 and 2 as legacy states)."""
    try:
        payload["state"] = State.from_dict(payload["state"], legacy=payload.get("format", FORMAT_VERSION) < 3)
    except ValueError as err:
        raise CheckpointError(f"the checkpoint's state cannot be read: {err}") from None
    return payload


def save_checkpoint(path: str | os.PathLike, state: State, history: list, meta: dict | None = None) -> Path:
    """Write ``state``, ``history`` and ``meta`` to ``path`` atomically; return the path.

    Everything is converted with :func:`to_plain` first; ``meta`` must be plain data
    (e.g. JSON-like dicts of numbers and strings), else :class:`CheckpointError`.
    """
    import bilevel

    path = Path(path)
    payload = {
        "format": FORMAT_VERSION,
        "bilevel_version": bilevel.__version__,
        "state": to_plain(state, "state"),
        "history": to_plain(list(history), "history"),
        "rng": capture_rng(),
        "meta": to_plain(dict(meta or {}), "meta"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
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


def probe_writable(folder: str | os.PathLike) -> None:
    """Create and remove a temporary file in ``folder``: raises the ``OSError`` that a write
    there would (permissions, read-only file system, a file where the folder should be),
    before a run spends any time."""
    fd, probe = tempfile.mkstemp(prefix=".bilevel-write-test-", dir=folder)
    os.close(fd)
    os.unlink(probe)


def _numpy_array_globals() -> list:
    """The globals numpy's pickles of plain arrays need: array reconstruction and dtypes.

    They rebuild an ``ndarray`` from a dtype, a shape and raw bytes — data, not code — and
    are registered for one load at a time (format-1 checkpoints store numpy's RNG state
    as an array), never globally.
    """
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [type(np.dtype(np.uint32)), type(np.dtype(np.float64)), type(np.dtype(np.int64))]
    return allowed


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; ``payload["state"]`` is a :class:`State`.

    The file is read with ``torch.load(weights_only=True)``: a file that would need to
    run code to be loaded (a pickle of arbitrary objects) is refused with a
    :class:`CheckpointError` and nothing in it is executed. Tensors come back on the
    device they were saved from unless ``map_location`` says otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: give the file written by a previous run (checkpoint.pt in its run directory)")
    try:
        # torch < 2.5 has no scoped allow-list: format-1 files are then refused, never loaded unsafely
        scoped = getattr(torch.serialization, "safe_globals", None)
        with scoped(_numpy_array_globals()) if scoped is not None else contextlib.nullcontext():
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except UnpicklingError as err:
        lines = str(err).strip().splitlines()
        detail = next((line.strip() for line in lines if "global" in line.lower()), None)
        if detail is None:  # a malformed stream, not a forbidden object
            raise CheckpointError(
                f"{path} is not a readable bilevel checkpoint (not a PyTorch checkpoint: {' '.join(str(err).split())[:120]})"
            ) from None
        raise CheckpointError(
            f"{path} is not a safe bilevel checkpoint: loading it would run Python code that is not part of a checkpoint "
            f"({detail}); bilevel refuses to execute it. Only open checkpoints written by bilevel"
        ) from None
    except Exception as err:
        reason = " ".join(str(err).split())[:160]
        if not zipfile.is_zipfile(path):
            reason = "not a PyTorch zip archive: the file is truncated or not a checkpoint"
        raise CheckpointError(f"{path} is not a readable bilevel checkpoint ({reason})") from None
    if not isinstance(payload, dict) or "format" not in payload or "state" not in payload:
        raise CheckpointError(f"{path} is not a bilevel checkpoint (no format version and state in it)")
    version = payload["format"]
    if version not in READABLE_FORMATS:
        writer = payload.get("bilevel_version", "an unknown version")
        raise CheckpointError(
            f"{path} has checkpoint format {version} (written by bilevel {writer}); this bilevel "
            f"{_version()} reads formats {', '.join(map(str, READABLE_FORMATS))}: upgrade bilevel to resume it"
        )
    payload.setdefault("meta", {})
    payload.setdefault("bilevel_version", "0.1.0" if version == 1 else "unknown")
    return from_plain(payload)


def _version() -> str:
    import bilevel

    return bilevel.__version__
