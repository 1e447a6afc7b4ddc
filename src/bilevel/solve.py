"""The front door: :func:`solve` runs a method on a problem and returns a :class:`Result`."""

from __future__ import annotations

import dataclasses
import enum
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from . import tree as T
from .checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, probe_writable, restore_rng, save_checkpoint
from .methods.base import Method, State
from .precision import as_precision, check_autocast_variables
from .problem import Problem
from .tree import Tree
from .validation import check_choice, check_count, check_nonnegative, check_number, check_positive

__all__ = [
    "CheckpointWriteWarning",
    "DivergenceError",
    "FixedBatch",
    "Result",
    "Status",
    "as_data_source",
    "method_spec",
    "solve",
    "spec_differences",
    "variables_spec",
]


class Status(str, enum.Enum):
    """How a run ended."""

    CONVERGED = "converged"  #: the stopping measure fell below ``tol``
    MAX_ITERS = "max_iters"  #: ``max_iters`` iterations done
    MAX_TIME = "max_time"  #: the time budget ran out
    DIVERGED = "diverged"  #: NaN/Inf or a quantity above ``divergence_threshold``
    INTERRUPTED = "interrupted"  #: Ctrl-C (a checkpoint was written if one was configured)
    STOPPED = "stopped"  #: a callback stopped the run (its ``on_log`` returned the reason)


class DivergenceError(FloatingPointError):
    """A run produced NaN/Inf, exceeded the divergence threshold or ran away.

    Attributes:
        iteration: the first iteration whose record was bad (exact, also between records).
        quantity: the diagnostic or variable that was bad (e.g. ``"upper_loss"``, ``"x"``).
        result: the :class:`Result` of the run up to that iteration (``Status.DIVERGED``).
    """

    def __init__(self, message: str, iteration: int | None = None, quantity: str | None = None, result: Result | None = None):
        super().__init__(message)
        self.iteration, self.quantity, self.result = iteration, quantity, result


class CheckpointWriteWarning(UserWarning):
    """A checkpoint could not be written (disk full, folder removed); the run went on."""


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
        checkpoint_error: why the last checkpoint write failed, or ``None`` when every
            write succeeded (or none was asked for).
    """

    status: Status
    state: State
    history: list
    iterations: int
    wall_time: float
    message: str = ""
    checkpoint_error: str | None = None

    @property
    def x(self) -> Tree:
        return self.state.x

    @property
    def y(self) -> Tree:
        return self.state.y

    @property
    def v(self) -> Tree:
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


def as_data_source(data: Any) -> Any:
    """An object with ``batch_at(k)``: ``data`` itself if it has one, else :class:`FixedBatch`."""
    if hasattr(data, "batch_at"):
        return data
    return FixedBatch(data)


def _transfer(info: dict, flags: Sequence[torch.Tensor]) -> tuple[dict, list[bool]]:
    """``info`` as floats and the 0-d boolean ``flags`` as bools, in one host transfer.

    The values are stacked on their device first, so a logged record costs one
    synchronisation with the device however many diagnostics and checks it carries.
    """
    keys = list(info)
    tensors = [torch.as_tensor(info[k]).detach().reshape(()) for k in keys]
    tensors += [f.reshape(()) for f in flags]
    if not tensors:
        return {}, []
    device = tensors[0].device
    values = torch.stack([t.to(device=device, dtype=torch.float64) for t in tensors]).tolist()
    return dict(zip(keys, values[: len(keys)], strict=True)), [bool(v) for v in values[len(keys) :]]


# not judged: the counters, and the float16 loss scale (a power of two that may exceed any threshold)
_NOT_CHECKED = ("iteration", "time", "loss_scale", "loss_scale_skipped")


class _DivergenceCheck:
    """Judges a logged record: non-finite values, an absolute threshold, and runaway
    growth of the losses relative to their value at the start of the run."""

    def __init__(self, threshold: float, factor: float | None, keys: Sequence[str], reference: dict | None):
        self.threshold, self.factor, self.keys = threshold, factor, tuple(keys)
        self.reference = dict(reference or {})

    def set_reference(self, values: dict) -> None:
        for key in self.keys:
            if key in values and key not in self.reference and math.isfinite(values[key]):
                self.reference[key] = values[key]

    def __call__(self, values: dict, finite_variables: dict) -> tuple[str, str] | None:
        """``(quantity, description)`` of the first problem found, or ``None``."""
        for key, value in values.items():
            if key in _NOT_CHECKED:
                continue
            if not math.isfinite(value):
                return key, f"{key} is {value}"
        for name, finite in finite_variables.items():
            if not finite:
                return name, f"the variable {name} contains NaN/Inf"
        for key, value in values.items():
            if key not in _NOT_CHECKED and abs(value) > self.threshold:
                return key, f"{key} = {value:.3e} exceeds the divergence threshold {self.threshold:.1e}"
        if self.factor is not None:
            for key in self.keys:
                if key in values and key in self.reference:
                    start = self.reference[key]
                    limit = self.factor * max(abs(start), 1.0)
                    if abs(values[key]) > limit:
                        return key, (
                            f"{key} = {values[key]:.3e} ran away from its start value {start:.3e} "
                            f"(more than divergence_factor = {self.factor:.0e} times max(|start|, 1))"
                        )
        return None


def _record(info: dict, state: State) -> tuple[dict, dict]:
    """The floats of ``info`` and the finiteness of x, y, v, with one host transfer."""
    names = [name for name in ("x", "y", "v") if getattr(state, name) is not None]
    values, flags = _transfer(info, [T.all_finite(getattr(state, name)) for name in names])
    return values, dict(zip(names, flags, strict=True))


def method_spec(method: Any) -> Any:
    """A plain description of a method configuration (class and every field, recursively).

    Stored in checkpoints so that :func:`solve` can refuse to resume a checkpoint with a
    different method; functions are described by their qualified name, tensors by their
    values (small ones) or shape.
    """
    if dataclasses.is_dataclass(method) and not isinstance(method, type):
        spec = {"class": type(method).__name__}
        for f in dataclasses.fields(method):
            spec[f.name] = method_spec(getattr(method, f.name))
        return spec
    if isinstance(method, (bool, int, float, str, type(None))):
        return method
    if isinstance(method, enum.Enum):
        return str(method.value)
    if isinstance(method, (list, tuple)):
        return [method_spec(v) for v in method]
    if isinstance(method, dict):
        return {str(k): method_spec(v) for k, v in method.items()}
    if isinstance(method, torch.Tensor):
        return method.detach().cpu().tolist() if method.numel() <= 16 else f"tensor{tuple(method.shape)}:{method.dtype}"
    if callable(method):
        return getattr(method, "__qualname__", type(method).__name__)
    return type(method).__name__


def variables_spec(state_or_tree: Any) -> list:
    """``[[path, shape, dtype], ...]`` of a tree (or of a state's x and y)."""
    if isinstance(state_or_tree, State):
        return [["x", variables_spec(state_or_tree.x)], ["y", variables_spec(state_or_tree.y)]]
    flat, _ = pytree.tree_flatten_with_path(state_or_tree)
    return [
        ["".join(str(k) for k in path) or "<tensor>", list(leaf.shape), str(leaf.dtype)]
        for path, leaf in flat
        if isinstance(leaf, torch.Tensor)
    ]


_ABSENT = "<absent>"


def flatten_spec(spec: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested dict (``{"a": {"b": 1}}`` → ``{"a.b": 1}``); a non-empty dict is
    entered, anything else — an empty dict too — is a value."""
    if not isinstance(spec, dict):
        return {prefix: spec}
    out: dict[str, Any] = {}
    for key, value in spec.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten_spec(value, name))
        else:
            out[name] = value
    return out


def spec_changes(
    saved: Any, current: Any, *, ignore: Callable[[str], bool] | None = None, new_keys_ok: bool = False
) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every dotted key whose value differs
    (``"<absent>"`` for a missing key), sorted by key.

    ``ignore``: keys allowed to differ; ``new_keys_ok``: keys the saved spec does not have
    (options added by a later bilevel version) are not differences.
    """
    a, b = flatten_spec(saved), flatten_spec(current)
    return [
        (key, a.get(key, _ABSENT), b.get(key, _ABSENT))
        for key in sorted(set(a) | set(b))
        if a.get(key, _ABSENT) != b.get(key, _ABSENT) and not (new_keys_ok and key not in a) and not (ignore and ignore(key))
    ]


def spec_differences(saved: Any, current: Any, new_fields_ok: bool = False) -> list[str]:
    """``key: saved → current`` for every key whose value differs between two method specs
    (:func:`spec_changes`)."""
    return [f"{key}: {old!r} → {new!r}" for key, old, new in spec_changes(saved, current, new_keys_ok=new_fields_ok)]


def _check_resumable(payload: dict, method: Method, problem: Problem, x0: Tree, y0: Tree, where: str) -> None:
    meta = payload.get("meta") or {}
    saved = meta.get("method_spec")
    if saved is not None:
        # a checkpoint of an older format predates options added since: absent keys are not differences
        older = int(payload.get("format", FORMAT_VERSION)) < FORMAT_VERSION
        diff = spec_differences(saved, method_spec(method), new_fields_ok=older)
        if diff:
            raise CheckpointError(
                f"{where} was written by a different method configuration ({'; '.join(diff[:6])}"
                f"{'; ...' if len(diff) > 6 else ''}): resume with the method that wrote it, or start a new run"
            )
    state = payload["state"]
    for name, given, default in (("x", x0, problem.x_init), ("y", y0, problem.y_init)):
        reference = given if given is not None else default
        if reference is None:
            continue
        mine, theirs = variables_spec(reference), variables_spec(getattr(state, name))
        if mine != theirs:
            raise CheckpointError(
                f"{where} holds {name} with leaves {theirs} but this problem's {name} has {mine}: "
                f"the checkpoint belongs to another problem (or data/model/dtype); start a new run"
            )


def _check_writable(path: Path) -> None:
    """Fail before the first iteration if the checkpoint's folder cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe_writable(path.parent)
    except OSError as err:
        raise OSError(err.errno, f"cannot write the checkpoint {path}: {err.strerror or err}; choose a writable folder") from None


def solve(
    problem: Problem,
    method: Method,
    x0: Tree = None,
    y0: Tree = None,
    *,
    data: Any = None,
    max_iters: int = 1000,
    tol: float | None = None,
    stop_on: str = "stationarity",
    max_time: float | None = None,
    callbacks: Sequence = (),
    log_every: int = 1,
    on_divergence: str = "raise",
    divergence_threshold: float = 1e12,
    divergence_factor: float | None = 1e4,
    divergence_keys: Sequence[str] = ("upper_loss", "lower_loss"),
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: str | Path | dict | None = None,
    validate: bool = True,
    meta: dict | None = None,
    compile: bool = False,
    distributed: bool | None = None,
    precision: Any = None,
) -> Result:
    """Run ``method`` on ``problem`` from ``(x0, y0)`` and return a :class:`Result`.

    Args:
        problem: a :class:`~bilevel.Problem`.
        method: a method configuration (:class:`~bilevel.GALET`, :class:`~bilevel.SlBAMM`,
            :class:`~bilevel.BAGDC`, :class:`~bilevel.AID`, :class:`~bilevel.ITD`, ...).
        x0: upper-level starting point (default: the problem's ``x_init``).
        y0: lower-level starting point (default: the problem's ``y_init``).
        data: the batch passed to the objectives: a fixed object (default ``None``), or a
            source with ``batch_at(k)`` giving the batch of iteration k (a pure function
            of k makes resumed runs exact).
        max_iters: total iterations (a resumed run continues up to this count).
        tol: stop with ``Status.CONVERGED`` when the diagnostic ``stop_on`` falls below it
            (a number >= 0).
        stop_on: the diagnostic compared with ``tol`` (default: the method's stationarity
            measure); a name the method does not report is rejected after its first step.
        max_time: stop with ``Status.MAX_TIME`` after this many seconds of step time (> 0).
        callbacks: objects with optional ``on_start(run)``, ``on_log(record)``,
            ``on_end(result)`` (see :mod:`bilevel.callbacks`); ``run["state"]`` holds the
            current state when ``on_log`` is called, and ``on_end`` is called on divergence
            too (before the error is raised), so loggers close their files. An ``on_log``
            that returns a string stops the run there with ``Status.STOPPED`` and that
            string as the message (early stopping on a validation metric, say).
        log_every: record diagnostics every this many iterations (and at the last one).
            Each record costs one device-to-host transfer, which carries the diagnostics
            and the finiteness checks together; between records the loop never waits
            for the device.
        on_divergence: ``"raise"`` (default: :class:`DivergenceError` naming the iteration
            and the quantity) or ``"status"`` (return with ``Status.DIVERGED``).
        divergence_threshold: a logged diagnostic above this in absolute value counts as
            divergence.
        divergence_factor: a loss in ``divergence_keys`` that exceeds this factor times
            ``max(|its value at the start of the run|, 1)`` counts as divergence (runaway);
            ``None`` turns the relative check off.
        divergence_keys: the diagnostics the relative check watches.
        checkpoint: path of a checkpoint file written atomically every
            ``checkpoint_every`` iterations (if > 0), at the end, and on Ctrl-C; a diverged
            state is never written over it. Its folder is checked for writability before
            the first iteration (``OSError`` naming it); a write that fails later does not
            lose the run: a :class:`CheckpointWriteWarning` is issued and the result is
            returned with ``Result.checkpoint_error`` set.
        checkpoint_every: iterations between checkpoints (0: only at the end and on Ctrl-C).
        resume: a checkpoint path (or loaded payload) to continue from; the state,
            history, RNG and iteration counter are restored. A checkpoint written by
            another method configuration, or whose variables do not match the problem's,
            is refused (:class:`~bilevel.checkpoint.CheckpointError` listing the differences).
        validate: check the problem at the starting point (shapes, dtypes, finite, scalar).
        meta: extra plain data (numbers, strings, lists, dicts) stored in checkpoints.
        compile: opt-in: run the method with :class:`bilevel.compile.CompiledOracles`
            (``torch.compile`` of the forward-mode oracles of ``problem``); same iterates
            within float tolerance, pays the compile time on the first steps.
        distributed: data-parallel over the ``torch.distributed`` process group
            (:mod:`bilevel.distributed`): ``True``, ``False``, or ``None`` (default) to use
            it when a group of more than one process is initialised. Every process passes
            its own equal shard of the batch as ``data`` (:class:`~bilevel.distributed.ShardedSource`)
            and runs the single-process iteration on the global batch; rank 0 alone writes
            the checkpoint, every process reads it on resume, and a process that dies makes
            the others raise :class:`~bilevel.distributed.DistributedError` within the
            group's timeout. Call it with the same arguments on every process (callbacks
            excepted: give loggers to rank 0 only).
        precision: ``None`` (default), ``"bf16"`` or ``"fp16"`` (or a
            :class:`~bilevel.precision.Autocast`): evaluate the objectives under
            ``torch.autocast`` in bfloat16 / float16 while the variables, the multiplier, the
            products as vectors and the linear solves stay float32 (:mod:`bilevel.precision`;
            float64 variables are refused in one line). float16 comes with dynamic loss
            scaling: the diagnostics ``loss_scale`` and ``loss_scale_skipped`` are logged,
            the scale is checkpointed with the state, and a step whose derivatives overflow
            is made again at half the scale.

    Divergence is reported at the exact iteration where it first happened: when a record
    shows NaN/Inf or a runaway value, the iterations since the previous record are
    replayed from its state (deterministically, one check each) to find the first bad
    one, and the message says whether the step or the objective produced it (a NaN that
    ``f`` or ``g`` returns at finite variables names the objective). For this the state of
    the last record is kept until the next one: with ``log_every > 1`` that is one extra
    copy of the variables and the optimizer state in memory, and no work per step.

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
    check_choice("solve", "on_divergence", on_divergence, ("raise", "status"))
    if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 0:
        raise ValueError(f"max_iters={max_iters!r} must be a non-negative integer")
    check_count("solve", "log_every", log_every, minimum=1)
    check_nonnegative("solve", "tol", tol, allow_none=True)
    check_positive("solve", "max_time", max_time, allow_none=True)
    check_count("solve", "checkpoint_every", checkpoint_every, minimum=0)
    check_positive("solve", "divergence_threshold", divergence_threshold)
    check_number("solve", "divergence_factor", divergence_factor, low=1.0, low_open=True, allow_none=True)
    if not isinstance(stop_on, str) or not stop_on:
        raise ValueError(f"solve(stop_on={stop_on!r}) must be the name of a diagnostic, e.g. 'stationarity'")
    source = as_data_source(data)
    spec = method_spec(method)
    dp = _data_parallel(distributed)
    if dp is not None:
        if compile:
            raise ValueError("solve(compile=True) cannot be combined with a distributed run: pass compile=False")
        problem, source = dp.prepare(problem, source)
    writer = dp is None or dp.rank == 0
    autocast = as_precision(precision)
    configured = method  # what a checkpoint records and a resume is checked against
    if autocast is not None:
        if resume is None:
            check_autocast_variables(*problem.initial_point(x0, y0), autocast.dtype)
        if compile and autocast.loss_scaling is not None:
            raise ValueError(
                "solve(compile=True) cannot be combined with float16 loss scaling (the scaled objectives are not the "
                "compiled ones): pass compile=False, or precision='bf16'"
            )
        problem = autocast.problem(problem)
        method = autocast.method(method)
    if compile:
        from .compile import compiled

        method = compiled(method, problem)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and writer:
        _check_writable(checkpoint)

    history: list = []
    elapsed = 0.0
    reference = None
    if resume is not None:
        where = str(resume) if not isinstance(resume, dict) else "the resume payload"
        payload = resume if isinstance(resume, dict) else load_checkpoint(resume)
        _check_resumable(payload, configured, problem, x0, y0, where)
        state = payload["state"]
        history = list(payload["history"])
        saved_meta = payload.get("meta") or {}
        elapsed = float(saved_meta.get("wall_time", history[-1]["time"] if history else 0.0))
        reference = saved_meta.get("divergence_reference")
        if reference is None and history:
            reference = {k: v for k, v in history[0].items() if k in divergence_keys}
        restore_rng(payload["rng"])
    else:
        state = method.init(problem, x0, y0, source.batch_at(0), validate=validate)
    check = _DivergenceCheck(divergence_threshold, divergence_factor, divergence_keys, reference)
    if dp is not None:
        dp.agree("(iteration, Σx, Σy)", [state.k, *(float(sum(t.double().sum() for t in T.leaves(v))) for v in (state.x, state.y))])

    run = {"problem": problem, "method": method, "state": state, "max_iters": max_iters, "start": state.k}
    for cb in callbacks:
        if hasattr(cb, "on_start"):
            cb.on_start(run)

    checkpoint_error: str | None = None

    def save(st: State, status: str) -> None:
        nonlocal checkpoint_error
        if checkpoint is None or not writer:
            return
        info = {
            **(meta or {}),
            "wall_time": elapsed,
            "status": status,
            "method": method.name,
            "method_spec": spec,
            "variables": variables_spec(st),
            "divergence_reference": dict(check.reference),
            **({"world_size": dp.world_size} if dp is not None else {}),
        }
        try:
            save_checkpoint(checkpoint, st, history, info)
        except OSError as err:
            checkpoint_error = f"could not write the checkpoint {checkpoint} at iteration {st.k}: {err.strerror or err}"
            warnings.warn(
                f"{checkpoint_error}; the run goes on and its result is returned, but it cannot be resumed from this point",
                CheckpointWriteWarning,
                stacklevel=3,
            )

    status, message = Status.MAX_ITERS, ""
    failure: dict | None = None
    last_good, first_info = state, None
    try:
        while state.k < max_iters:
            k = state.k
            start = time.perf_counter()
            state, info = method.step(problem, state, source.batch_at(k))
            if first_info is None:
                first_info = {key: info[key] for key in divergence_keys if key in info}
                if tol is not None and stop_on not in info:
                    raise ValueError(
                        f"solve(stop_on={stop_on!r}) is not a diagnostic of {method.name}; available: {', '.join(sorted(info))}"
                    )
            if state.k % log_every == 0 or state.k == max_iters:
                values, finite = _record({**info, **{f"__start_{key}": v for key, v in first_info.items()}}, state)
                elapsed += time.perf_counter() - start
                if first_info:
                    check.set_reference({key: values.pop(f"__start_{key}") for key in first_info})
                    first_info = {}
                record = {"iteration": state.k, "time": elapsed, **values}
                problem_found = check(values, finite)
                if problem_found is not None:
                    failure = _locate(problem, method, source, last_good, state, record, problem_found, check)
                    history.append(failure["record"])
                    state = failure["state"]
                    status, message = Status.DIVERGED, failure["message"]
                    break
                history.append(record)
                last_good = state
                run["state"] = state
                reasons = [cb.on_log(record) for cb in callbacks if hasattr(cb, "on_log")]
                reason = next((r for r in reasons if isinstance(r, str)), None)
                if dp is not None:  # callbacks may live on rank 0 only: every process stops together
                    asked = dp.all_reduce_scalar(torch.tensor(float(reason is not None), dtype=torch.float64), "max")
                    if float(asked) > 0 and reason is None:
                        reason = "stopped by a callback on another process"
                if reason is not None:
                    status, message = Status.STOPPED, reason
                    break
                if tol is not None and record[stop_on] <= tol:
                    status, message = Status.CONVERGED, f"{stop_on} = {record[stop_on]:.3e} <= tol = {tol:.1e}"
                    break
            else:
                elapsed += time.perf_counter() - start
            if max_time is not None and dp is not None:  # every process stops at the same iteration
                elapsed = float(dp.all_reduce_scalar(torch.tensor(elapsed, dtype=torch.float64), "max"))
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
    if dp is not None and status is not Status.INTERRUPTED:
        dp.barrier()  # the checkpoint rank 0 wrote exists when solve returns on any process
    result = Result(
        status=status,
        state=state,
        history=history,
        iterations=state.k,
        wall_time=elapsed,
        message=message,
        checkpoint_error=checkpoint_error,
    )
    for cb in callbacks:
        if hasattr(cb, "on_end"):
            cb.on_end(result)
    if status is Status.DIVERGED and failure is not None and on_divergence == "raise":
        raise DivergenceError(message, iteration=state.k, quantity=failure["quantity"], result=result)
    return result


def _data_parallel(distributed: bool | None) -> Any:
    """The :class:`~bilevel.distributed.DataParallel` a run uses, or ``None``."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"solve(distributed={distributed!r}) must be True, False or None (use it when a process group is initialised)")
    if distributed is False:
        return None
    from . import distributed as dist_module

    if distributed is None and not dist_module.is_active():
        return None
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        raise ValueError(
            "solve(distributed=True) needs an initialised process group: launch with torchrun and call "
            "torch.distributed.init_process_group() first (or pass distributed=False)"
        )
    dist_module.check_world_size()
    return dist_module.DataParallel()


def _locate(
    problem: Problem, method: Method, source: Any, last_good: State, state: State, record: dict, found: tuple, check: _DivergenceCheck
) -> dict:
    """The first bad iteration between the last good record and ``state``, and why.

    Replays the iterations after ``last_good`` one by one (the data source is a pure
    function of the iteration, the methods are deterministic), checking each, then looks
    at the objectives at the last finite point to tell a step that blew up from an
    objective that returned NaN/Inf by itself.
    """
    before: State | None = last_good
    bad_state, bad_record, (quantity, description) = state, record, found
    if state.k - last_good.k > 1:
        current = last_good
        elapsed = record["time"]
        for k in range(last_good.k, state.k):
            nxt, info = method.step(problem, current, source.batch_at(k))
            values, finite = _record(info, nxt)
            problem_found = check(values, finite)
            if problem_found is not None:
                before, bad_state, (quantity, description) = current, nxt, problem_found
                bad_record = {"iteration": nxt.k, "time": elapsed, **values}
                break
            current = nxt
        else:  # the replay did not reproduce it (a step that is not deterministic): the point before is unknown
            before = None
    k = bad_state.k
    message = f"{method.name} diverged at iteration {k}: {description}"
    blame = _blame_objective(problem, before, source.batch_at(k - 1)) if before is not None else None
    if before is None:
        message += (
            f"; replaying from iteration {last_good.k} did not reproduce it (the steps are not deterministic), so it happened "
            f"after iteration {last_good.k}: reduce the step sizes (e.g. lr_upper/lr_lower) or check the problem"
        )
    elif blame is not None:
        message += (
            f"; {blame} at the finite x, y of iteration {k - 1}: the objective is undefined or overflows there "
            "(log/sqrt/division out of its domain); check the objective, or reduce the step sizes if the last step moved x or y far"
        )
    else:
        message += "; the step from finite values produced it: reduce the step sizes (e.g. lr_upper/lr_lower) or check the problem"
    return {"state": bad_state, "record": bad_record, "message": message, "quantity": quantity}


def _blame_objective(problem: Problem, state: State, batch: Any) -> str | None:
    """Which objective, if any, returns a non-finite value at the (finite) ``state``."""
    if not (bool(T.all_finite(state.x)) and bool(T.all_finite(state.y))):
        return None
    with torch.no_grad():
        for name, objective in (("the upper objective f", problem.upper), ("the lower objective g", problem.lower)):
            try:
                value = objective(state.x, state.y, batch)
            except Exception:
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not bool(torch.isfinite(value)):
                return f"{name} returns {float(value)}"
    return None
