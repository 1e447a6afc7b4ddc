"""Callbacks for :func:`bilevel.solve`: progress bar and loggers.

A callback is any object with some of ``on_start(run)``, ``on_log(record)`` and
``on_end(result)``; ``record`` is the dict of floats appended to the history.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .solve import Result

_T = TypeVar("_T")


def _started(handle: _T | None, owner: object) -> _T:
    """``handle`` once ``on_start`` has opened it; a clear error for a callback used before ``on_start``."""
    if handle is None:
        raise RuntimeError(f"{type(owner).__name__}.on_start(run) must be called before on_log(record)")
    return handle


__all__ = ["CSVLogger", "JSONLinesLogger", "ProgressBar", "TensorBoardLogger"]


class ProgressBar:
    """A tqdm progress bar showing the iteration and the current values of a few diagnostics.

    Args:
        keys: record entries shown next to the bar, with their latest value (default:
            stationarity and upper loss); an entry missing from a record keeps its last
            shown value, so an evaluation metric logged every few records stays visible.
        desc: the bar's label (default: the method's name); a bench labels each run
            "GALET seed 0 (1/6)" so the reader knows which run of how many is running.
        disable: turn the bar off (e.g. in tests).
    """

    def __init__(
        self, keys: Sequence[str] = ("stationarity", "upper_loss"), desc: str | None = None, disable: bool = False, leave: bool = True
    ):
        self.keys, self.desc, self.disable, self.leave = tuple(keys), desc, disable, leave
        self._bar: Any = None  # a tqdm bar once on_start has run
        self._last = 0
        self.shown: dict = {}

    def on_start(self, run: dict[str, Any]) -> None:
        from tqdm.auto import tqdm

        self._last = run["start"]
        self.shown = {}
        self._bar = tqdm(
            total=run["max_iters"],
            initial=run["start"],
            desc=self.desc or run["method"].name,
            disable=self.disable,
            leave=self.leave,
            dynamic_ncols=True,
        )

    def on_log(self, record: dict[str, float]) -> None:
        bar = _started(self._bar, self)
        it = int(record["iteration"])
        bar.update(it - self._last)
        self._last = it
        updated = {k: f"{record[k]:.4g}" for k in self.keys if k in record}
        if updated:
            self.shown.update(updated)
            bar.set_postfix(self.shown, refresh=False)

    def on_end(self, result: Result | None) -> None:
        if self._bar is not None:
            self._bar.close()


class JSONLinesLogger:
    """Append each record as one JSON line to ``path`` (flushed every ``flush_every`` lines).

    On a resumed run, records already in the file (iteration ≤ the resume point) are kept
    and the run appends after them.
    """

    def __init__(self, path: str | os.PathLike[str], flush_every: int = 50):
        self.path = Path(path)
        self.flush_every = flush_every
        self._handle: IO[str] | None = None
        self._count = 0

    def on_start(self, run: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if run["start"] > 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["iteration"] <= run["start"]]
            self.path.write_text("".join(line + "\n" for line in kept))
            self._handle = self.path.open("a")
        else:
            self._handle = self.path.open("w")

    def on_log(self, record: dict[str, float]) -> None:
        handle = _started(self._handle, self)
        handle.write(json.dumps(record) + "\n")
        self._count += 1
        if self._count % self.flush_every == 0:
            handle.flush()

    def on_end(self, result: Result | None) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class CSVLogger:
    """Write the records to a CSV file (columns from the first record).

    On a resumed run, rows up to the resume point are kept and the run appends after them.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._handle: IO[str] | None = None
        self._writer: csv.DictWriter[str] | None = None

    def on_start(self, run: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if run.get("start", 0) > 0 and self.path.exists():
            # a resumed run keeps the rows up to the resume point and appends after them
            with self.path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                fields, kept = reader.fieldnames, [row for row in reader if float(row["iteration"]) <= run["start"]]
            self._handle = self.path.open("w", newline="")
            if fields:
                self._writer = csv.DictWriter(self._handle, fieldnames=fields, extrasaction="ignore")
                self._writer.writeheader()
                self._writer.writerows(kept)
            return
        self._handle = self.path.open("w", newline="")

    def on_log(self, record: dict[str, float]) -> None:
        if self._writer is None:
            self._writer = csv.DictWriter(_started(self._handle, self), fieldnames=list(record), extrasaction="ignore")
            self._writer.writeheader()
        self._writer.writerow(record)

    def on_end(self, result: Result | None) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class TensorBoardLogger:
    """Log every diagnostic as a TensorBoard scalar (needs ``pip install tensorboard``)."""

    def __init__(self, log_dir: str | os.PathLike[str]):
        self.log_dir = str(log_dir)
        self._writer: Any = None  # a torch.utils.tensorboard.SummaryWriter once on_start has run

    def on_start(self, run: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from err
        self._writer = SummaryWriter(self.log_dir)

    def on_log(self, record: dict[str, float]) -> None:
        writer = _started(self._writer, self)
        step = int(record["iteration"])
        for key, value in record.items():
            if key != "iteration":
                writer.add_scalar(key, value, step)

    def on_end(self, result: Result | None) -> None:
        if self._writer is not None:
            self._writer.close()
