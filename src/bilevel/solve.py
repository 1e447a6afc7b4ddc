"""The front door: :func:`solve` runs a method on a problem and returns a :class:`Result`."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import tree as T
from .checkpoint import load_checkpoint, restore_rng, save_checkpoint
from .methods.base import Method, State
from .problem import Problem

__all__ = ["solve", "Result", "Status", "DivergenceError", "FixedBatch", "as_data_source"]


class Status(str, enum.Enum):
    """How a run ended."""

    CONVERGED = "converged"          #: the stopping measure fell below ``tol``
    MAX_ITERS = "max_iters"          #: ``max_iters`` iterations done
    MAX_TIME = "max_time"            #: the time budget ran out
    DIVERGED = "diverged"            #: NaN/Inf or a quantity above ``divergence_threshold``
    INTERRUPTED = "interrupted"      #: Ctrl-C (a checkpoint was written if one was configured)


class DivergenceError(FloatingPointError):
    """A run produced NaN/Inf or exceeded the divergence threshold."""


@dataclass(frozen=True)
class Result:
    """The outcome of :func:`solve`.

    Attributes:
        status: a :class:`Status`.
        state: the final method :class:`~bilevel.methods.base.State`.
        history: one dict of floats per logged iteration (``iteration``, ``time`` in
            seconds of step time, and the method's diagnostics).
        iterations: total completed iterations.
        wall_time: seconds spent in ``method.step`` (excludes logging and checkpoints).
        message: a human-readable summary.
    """

    status: Status
    state: State
    history: list
    iterations: int
    wall_time: float
    message: str = ""

    @property
    def x(self):
        return self.state.x

    @property
    def y(self):
        return self.state.y

    @property
    def v(self):
        return self.state.v

    @property
    def final(self) -> dict:
        """The last history record (empty dict if nothing was logged)."""
        return self.history[-1] if self.history else {}

    def series(self, key: str) -> list:
        """The logged values of one diagnostic, e.g. ``result.series("stationarity")``."""
        return [record[key] for record in self.history if key in record]


@dataclass(frozen=True)
class FixedBatch:
    """The same batch at every iteration (full-batch, deterministic problems)."""

    batch: Any = None

    def batch_at(self, k: int) -> Any:
        return self.batch


def as_data_source(data: Any):
    """An object with ``batch_at(k)``: ``data`` itself if it has one, else :class:`FixedBatch`."""
    if hasattr(data, "batch_at"):
        return data
    return FixedBatch(data)


def _to_floats(info: dict) -> dict:
    if not info:
        return {}
    keys = list(info)
    tensors = [torch.as_tensor(info[k]).detach().reshape(()) for k in keys]
    device = tensors[0].device
    # stack on the device, then one host transfer for all diagnostics instead of one .item() each
    values = torch.stack([t.to(device=device, dtype=torch.float64) for t in tensors]).tolist()
    return dict(zip(keys, values))


def _check_divergence(k: int, record: dict, state: State, threshold: float) -> Optional[str]:
    for key, value in record.items():
        if key in ("iteration", "time"):
            continue
        if not math.isfinite(value):
            return f"iteration {k}: {key} is {value}"
        if abs(value) > threshold:
            return f"iteration {k}: {key} = {value:.3e} exceeds the divergence threshold {threshold:.1e}"
    for name, tree in (("x", state.x), ("y", state.y), ("v", state.v)):
        if tree is not None and not bool(T.all_finite(tree)):
            return f"iteration {k}: the variable {name} contains NaN/Inf"
    return None


def solve(
    problem: Problem,
    method: Method,
    x0=None,
    y0=None,
    *,
    data: Any = None,
    max_iters: int = 1000,
    tol: Optional[float] = None,
    stop_on: str = "stationarity",
    max_time: Optional[float] = None,
    callbacks: Sequence = (),
    log_every: int = 1,
    on_divergence: str = "raise",
    divergence_threshold: float = 1e12,
    checkpoint: Optional[str | Path] = None,
    checkpoint_every: int = 0,
    resume: Optional[str | Path | dict] = None,
    validate: bool = True,
    meta: Optional[dict] = None,
    compile: bool = False,
) -> Result:
    """Run ``method`` on ``problem`` from ``(x0, y0)`` and return a :class:`Result`.

    Args:
        problem: a :class:`~bilevel.Problem`.
        method: a method configuration (:class:`~bilevel.GALET`, :class:`~bilevel.SlBAMM`,
            :class:`~bilevel.BAGDC`, :class:`~bilevel.AID`, :class:`~bilevel.ITD`, ...).
        x0, y0: starting point (default: the problem's ``x_init``/``y_init``).
        data: the batch passed to the objectives: a fixed object (default ``None``), or a
            source with ``batch_at(k)`` giving the batch of iteration k (a pure function
            of k makes resumed runs exact).
        max_iters: total iterations (a resumed run continues up to this count).
        tol: stop with ``Status.CONVERGED`` when the diagnostic ``stop_on`` falls below it.
        stop_on: the diagnostic compared with ``tol`` (default: the method's stationarity measure).
        max_time: stop with ``Status.MAX_TIME`` after this many seconds of step time.
        callbacks: objects with optional ``on_start(run)``, ``on_log(record)``,
            ``on_end(result)`` (see :mod:`bilevel.callbacks`); ``run["state"]`` holds the
            current state when ``on_log`` is called, and ``on_end`` is called on divergence
            too (before the error is raised), so loggers close their files.
        log_every: record diagnostics every this many iterations (and at the last one);
            each record costs one device-to-host transfer.
        on_divergence: ``"raise"`` (default: :class:`DivergenceError` naming the iteration
            and the quantity) or ``"status"`` (return with ``Status.DIVERGED``).
        divergence_threshold: a logged diagnostic above this in absolute value counts as
            divergence.
        checkpoint: path of a checkpoint file written atomically every
            ``checkpoint_every`` iterations (if > 0), at the end, and on Ctrl-C; a diverged
            state is never written over it.
        resume: a checkpoint path (or loaded payload) to continue from; the state,
            history, RNG and iteration counter are restored.
        validate: check the problem at the starting point (shapes, dtypes, finite, scalar).
        meta: extra JSON-serialisable information stored in checkpoints.
        compile: opt-in: run the method with :class:`bilevel.compile.CompiledOracles`
            (``torch.compile`` of the forward-mode oracles of ``problem``); same iterates
            within float tolerance, pays the compile time on the first steps.

    Example:
        >>> import bilevel as bl
        >>> result = bl.solve(bl.problems.T1(n=10), bl.AID(lr_upper=0.5, lr_lower=0.5), max_iters=100, tol=1e-20)
        >>> result.status, round(float(result.x["x"].mean()), 6)
        (<Status.CONVERGED: 'converged'>, 0.5)
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"solve() expects a bilevel.Problem as first argument, got {type(problem).__name__}")
    if not isinstance(method, Method):
        raise TypeError(f"solve() expects a bilevel method (e.g. bilevel.GALET()), got {type(method).__name__}")
    if on_divergence not in ("raise", "status"):
        raise ValueError(f"on_divergence={on_divergence!r} must be 'raise' or 'status'")
    if not isinstance(max_iters, int) or max_iters < 0:
        raise ValueError(f"max_iters={max_iters!r} must be a non-negative integer")
    if not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every={log_every!r} must be a positive integer")
    source = as_data_source(data)
    if compile:
        from .compile import compiled

        method = compiled(method, problem)

    history: list = []
    elapsed = 0.0
    if resume is not None:
        payload = resume if isinstance(resume, dict) else load_checkpoint(resume)
        state = payload["state"]
        history = list(payload["history"])
        elapsed = float(payload.get("meta", {}).get("wall_time", history[-1]["time"] if history else 0.0))
        restore_rng(payload["rng"])
    else:
        state = method.init(problem, x0, y0, source.batch_at(0), validate=validate)

    run = {"problem": problem, "method": method, "state": state, "max_iters": max_iters, "start": state.k}
    for cb in callbacks:
        if hasattr(cb, "on_start"):
            cb.on_start(run)

    def save(st: State, status: str):
        if checkpoint is not None:
            save_checkpoint(checkpoint, st, history, {**(meta or {}), "wall_time": elapsed, "status": status, "method": method.name})

    status, message = Status.MAX_ITERS, ""
    try:
        while state.k < max_iters:
            k = state.k
            batch = source.batch_at(k)
            start = time.perf_counter()
            state, info = method.step(problem, state, batch)
            if _on_cuda(state):
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - start
            if state.k % log_every == 0 or state.k == max_iters:
                record = {"iteration": state.k, "time": elapsed, **_to_floats(info)}
                problem_msg = _check_divergence(state.k, record, state, divergence_threshold)
                if problem_msg is not None:
                    message = f"{method.name} diverged at {problem_msg}; reduce the step sizes (e.g. lr_upper/lr_lower) or check the problem"
                    history.append(record)
                    status = Status.DIVERGED
                    break
                history.append(record)
                run["state"] = state
                for cb in callbacks:
                    if hasattr(cb, "on_log"):
                        cb.on_log(record)
                if tol is not None:
                    if stop_on not in record:
                        raise KeyError(f"stop_on={stop_on!r} is not a diagnostic of {method.name}; available: {sorted(record)}")
                    if record[stop_on] <= tol:
                        status, message = Status.CONVERGED, f"{stop_on} = {record[stop_on]:.3e} <= tol = {tol:.1e}"
                        break
            if max_time is not None and elapsed >= max_time:
                status, message = Status.MAX_TIME, f"time budget of {max_time} s spent"
                break
            if checkpoint is not None and checkpoint_every and state.k % checkpoint_every == 0:
                save(state, "running")
    except KeyboardInterrupt:
        status, message = Status.INTERRUPTED, f"interrupted at iteration {state.k}"
    if not message:
        message = f"{state.k} iterations done"
    if status is not Status.DIVERGED:
        # a diverged state must not overwrite the last good checkpoint
        save(state, status.value)
    result = Result(status=status, state=state, history=history, iterations=state.k, wall_time=elapsed, message=message)
    for cb in callbacks:
        if hasattr(cb, "on_end"):
            cb.on_end(result)
    if status is Status.DIVERGED and on_divergence == "raise":
        raise DivergenceError(message)
    return result


def _on_cuda(state: State) -> bool:
    leaves = T.leaves(state.x)
    return bool(leaves) and leaves[0].is_cuda
