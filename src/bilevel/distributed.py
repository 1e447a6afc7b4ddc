"""Data-parallel bilevel optimisation on ``torch.distributed`` (launched with ``torchrun``).

Every process holds the same ``x``, ``y`` and multiplier ``v`` (replicated) and evaluates
the objectives on its own shard of the batch. For ``P`` processes with equal shards ``B_r``
of a global batch ``B``, the objectives the methods see are the global ones,

    f(x, y; B) = (1/P) Σ_r f(x, y; B_r),      g(x, y; B) = (1/P) Σ_r g(x, y; B_r),

exactly when ``f`` and ``g`` are means over their batch (plus terms that do not depend on
it, such as a ridge penalty). :class:`DataParallel` rewrites the two objectives of a
:class:`~bilevel.Problem` so that *every derivative of them is already reduced*:

    f̄(x, y) = R( f(I(x), I(y); B_r) ) / P

where ``I`` is the identity whose backward sums the cotangents of all processes
(``all_reduce``), and ``R`` sums its input over the processes and passes its cotangent
back unchanged. Both are :class:`torch.autograd.Function` s whose backward is the other
one, so derivatives of any order go through them: the gradient ``∇_y ḡ``, the Hessian
product ``H v = ∇²_yy ḡ v``, the mixed product ``J v``, and the back-propagation through
unrolled lower steps (ITD, T-RHG, BDA) all come out as the global quantities, identical on
every process. Norms, line-search inner products and stopping measures are computed from
those replicated tensors, so they agree on every process without a reduction of their own,
and every method — the presets and any method assembled from :mod:`bilevel.parts` —
runs the single-process iteration on the global batch with no change to its code.
Communication: one ``all_reduce`` of the loss value per evaluation and one of the x or y
sized buffer per backward pass (the leaves are flattened into one buffer per dtype).

:func:`bilevel.solve` applies it when ``distributed=True``, or when a process group of
more than one process is initialised (``distributed=None``, the default). Checkpoints are
written by rank 0 only (atomically, :func:`bilevel.checkpoint.save_checkpoint`) and read
by every process; a failed collective (a process died, or the group's timeout passed)
raises :class:`DistributedError` naming the rank and the fix instead of hanging.

Example:
    >>> import torch, bilevel as bl
    >>> from bilevel.distributed import DataParallel, shard
    >>> batch = {"a": torch.arange(6.0)}
    >>> shard(batch, rank=1, world_size=2)["a"]           # the second half of dim 0
    tensor([3., 4., 5.])
    >>> DataParallel().world_size                          # no process group: one process
    1

References:
    Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training",
    VLDB 2020 (the all-reduce data parallelism this follows); Shoeybi et al.,
    "Megatron-LM", 2019 (the identity / all-reduce pair of conjugate operators).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import tree as T
from .problem import Objective, Problem
from .tree import Tree

__all__ = [
    "DataParallel",
    "DistributedError",
    "ShardedSource",
    "check_shards",
    "data_parallel",
    "is_active",
    "shard",
    "traffic",
]


class DistributedError(RuntimeError):
    """A collective operation failed: a process died, or the group's timeout passed."""


def is_active(group: Any = None) -> bool:
    """``True`` when a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


_TRAFFIC = {"all_reduces": 0, "bytes": 0}


def traffic(reset: bool = False) -> dict[str, int]:
    """The ``all_reduce`` calls and the bytes each process contributed to them since the
    last reset (the communication volume: a ring all-reduce of b bytes sends about
    ``2 b (P − 1)/P`` bytes per process)."""
    out = dict(_TRAFFIC)
    if reset:
        _TRAFFIC.update(all_reduces=0, bytes=0)
    return out


def _count(*tensors: torch.Tensor) -> None:
    _TRAFFIC["all_reduces"] += 1
    _TRAFFIC["bytes"] += sum(t.numel() * t.element_size() for t in tensors)


def _collective(what: str, fn: Callable[[], Any], group: Any = None) -> Any:
    """Run one collective; turn the backend's failure into a :class:`DistributedError`."""
    try:
        return fn()
    except (RuntimeError, ValueError) as err:
        if isinstance(err, DistributedError):
            raise
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedError(
            f"rank {rank}: the {what} across processes failed ({first}): another process died or did not reach "
            f"the same step within the process group's timeout; see that process's error, then restart the run "
            f"(a checkpoint resumes it)"
        ) from err


def _all_reduce_flat(tensors: Sequence[torch.Tensor], group: Any, what: str) -> list[torch.Tensor]:
    """The sums over processes of ``tensors``, one ``all_reduce`` per dtype (new tensors)."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault((t.dtype, t.device), []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        _count(flat)
        _collective(what, functools.partial(dist.all_reduce, flat, op=dist.ReduceOp.SUM, group=group), group)
        for i, piece in zip(idx, torch.split(flat, [tensors[i].numel() for i in idx]), strict=True):
            out[i] = piece.view_as(tensors[i])
    return [t for t in out if t is not None]


class _Identity(torch.autograd.Function):
    """``I``: identity forward; backward sums the cotangents of every process (``R``)."""

    @staticmethod
    def forward(group: Any, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.group = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        return (None, *_SumOverProcesses.apply(ctx.group, *grads))

    @staticmethod
    def jvp(ctx: Any, _group: Any, *tangents: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.view_as(t) for t in tangents)


class _SumOverProcesses(torch.autograd.Function):
    """``R``: the sum over processes forward; backward passes the cotangent on (``I``)."""

    @staticmethod
    def forward(group: Any, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_all_reduce_flat(tensors, group, "sum of derivatives"))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.group = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        return (None, *_Identity.apply(ctx.group, *grads))

    @staticmethod
    def jvp(ctx: Any, _group: Any, *tangents: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_all_reduce_flat(tangents, ctx.group, "sum of derivatives"))


def _replicated(tree: Tree, group: Any) -> Tree:
    """``I(tree)``: the same values, with the backward that reduces over processes."""
    leaves = T.leaves(tree)
    if not any(t.requires_grad for t in leaves) or not torch.is_grad_enabled():
        return tree
    return T.unflatten_like(list(_Identity.apply(group, *leaves)), tree)


def _global_sum(value: torch.Tensor, group: Any) -> torch.Tensor:
    """``R(value)``: the sum over processes (differentiable when ``value`` needs a gradient)."""
    if value.requires_grad and torch.is_grad_enabled():
        summed: torch.Tensor = _SumOverProcesses.apply(group, value)[0]
        return summed
    total = value.detach().clone()
    _count(total)
    _collective("sum of objective values", lambda: dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group), group)
    return total


@dataclass(frozen=True)
class DataParallel:
    """Data parallelism over a ``torch.distributed`` process group.

    Args:
        group: the process group (``None``: the default group, or a single process when
            none is initialised).

    Each process passes its own shard of every batch to the objectives (see :func:`shard`
    and :class:`ShardedSource`); the shards must have equal sizes for the average of the
    shard means to be the global mean.
    """

    group: Any = None

    @property
    def world_size(self) -> int:
        """P, the number of processes (1 without an initialised group)."""
        return dist.get_world_size(self.group) if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        """This process's rank (0 without an initialised group)."""
        return dist.get_rank(self.group) if dist.is_available() and dist.is_initialized() else 0

    def objective(self, fn: Objective) -> Objective:
        """``(x, y, batch) ↦ (1/P) Σ_r fn(x, y, batch_r)`` with reduced derivatives (module docstring)."""
        world, group = self.world_size, self.group
        if world == 1:
            return fn

        def reduced(x: Tree, y: Tree, batch: Any) -> torch.Tensor:
            value = fn(_replicated(x, group), _replicated(y, group), batch)
            if not isinstance(value, torch.Tensor):
                return value  # Problem.validate reports the type
            return _global_sum(value, group) / world

        reduced.__qualname__ = getattr(fn, "__qualname__", "objective")
        reduced.__wrapped__ = fn  # type: ignore[attr-defined]
        return reduced

    def problem(self, problem: Problem) -> Problem:
        """``problem`` with both objectives reduced over the processes (same class and fields)."""
        if self.world_size == 1 or problem.metadata.get("data_parallel"):
            return problem
        return dataclasses.replace(
            problem,
            upper=self.objective(problem.upper),
            lower=self.objective(problem.lower),
            metadata={**problem.metadata, "data_parallel": self.world_size},
        )

    def prepare(self, problem: Problem, source: Any) -> tuple[Problem, Any]:
        """The problem with reduced objectives and the data source of this process.

        The built-in problems and sources are split here: a
        :class:`~bilevel.problems.hyperclean.HypercleanProblem` (its data live in the
        problem) gets the equal shard ``r`` of its training and validation sets, x staying
        the whole weight vector; an :class:`~bilevel.problems.fewshot.EpisodeSource` gives
        every task's shard of its support and query examples. Any other problem or source
        is taken to be this process's shard already (:class:`ShardedSource`).
        """
        if self.world_size == 1 or problem.metadata.get("data_parallel"):
            return problem, source
        from .problems.fewshot import EpisodeSource
        from .problems.hyperclean import HypercleanProblem

        if isinstance(problem, HypercleanProblem):
            problem = _shard_hyperclean(problem, self.rank, self.world_size)
        if isinstance(source, EpisodeSource):
            dims = {"support_x": 1, "support_y": 1, "query_x": 1, "query_y": 1}
            source = _EpisodeShards(source, dims, self.rank, self.world_size)
        return self.problem(problem), source

    def all_reduce_scalar(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """A 0-d tensor reduced over the processes (``"sum"``, ``"max"`` or ``"min"``); for
        quantities a user's code computes from *unreduced* local data."""
        reduce_ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if op not in reduce_ops:
            raise ValueError(f"DataParallel.all_reduce_scalar(op={op!r}) must be one of {sorted(reduce_ops)}")
        if self.world_size == 1:
            return value
        out = value.detach().clone()
        _count(out)
        _collective(f"{op} of a scalar", lambda: dist.all_reduce(out, op=reduce_ops[op], group=self.group), self.group)
        return out

    def agree(self, what: str, values: Sequence[float]) -> None:
        """Check that every process holds the same ``values`` (one ``all_gather``); raise a
        :class:`DistributedError` naming the first process that differs."""
        if self.world_size == 1:
            return
        mine = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if dist.get_backend(self.group) == "nccl":
            mine = mine.cuda()
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        _collective(f"check of {what}", lambda: dist.all_gather(gathered, mine, group=self.group), self.group)
        for rank, theirs in enumerate(gathered):
            if not torch.equal(theirs, gathered[0]):
                raise DistributedError(
                    f"rank {rank} has {what} {theirs.tolist()} but rank 0 has {gathered[0].tolist()}: every process must "
                    f"start from the same point (resume the same checkpoint on every process, or none)"
                )

    def barrier(self) -> None:
        """Wait for every process (a :class:`DistributedError` if one is gone)."""
        if self.world_size > 1:
            _collective("barrier", lambda: dist.barrier(group=self.group), self.group)


def _shard_hyperclean(problem: Any, rank: int, world_size: int) -> Problem:
    """Hyper-cleaning on shard ``rank`` of the training and validation sets (x stays whole)."""
    from .problems.hyperclean import hyperclean_problem

    data = problem.data
    n_train, n_val = len(data.y_train_noisy), len(data.y_val)
    for what, n in (("n_train", n_train), ("n_val", n_val)):
        if n < world_size or n % world_size:
            raise ValueError(
                f"hyper-cleaning's {what}={n} cannot be split into {world_size} equal shards: run on a number of "
                f"processes (--nproc) that divides {n} (at most {n}), or change problem.{what}"
            )
    lo, hi = rank * (n_train // world_size), (rank + 1) * (n_train // world_size)
    vlo, vhi = rank * (n_val // world_size), (rank + 1) * (n_val // world_size)
    part = dataclasses.replace(
        data,
        x_train=data.x_train[lo:hi],
        y_train_noisy=data.y_train_noisy[lo:hi],
        y_train_true=data.y_train_true[lo:hi],
        clean_mask=data.clean_mask[lo:hi],
        x_val=data.x_val[vlo:vhi],
        y_val=data.y_val[vlo:vhi],
    )
    inner = hyperclean_problem(part, model=problem.model, reg=problem.reg, hidden=1)  # hidden: only the unused start

    def lower(x: Tree, y: Tree, batch: Any) -> torch.Tensor:
        return inner.lower({**x, "weights": x["weights"][lo:hi]}, y, batch)

    def upper(x: Tree, y: Tree, batch: Any) -> torch.Tensor:
        return inner.upper(x, y, batch)

    sharded: Problem = dataclasses.replace(problem, upper=upper, lower=lower)
    return sharded


@dataclass(frozen=True)
class _EpisodeShards:
    """Every task's shard of the support and query examples of ``source.batch_at(k)``."""

    source: Any
    dims: Mapping[str, int | None]
    rank: int
    world_size: int

    @property
    def sampler(self) -> Any:
        return self.source.sampler

    def batch_at(self, k: int) -> Any:
        batch = self.source.batch_at(k)
        return shard(batch, self.rank, self.world_size, {key: self.dims.get(key) for key in batch})


def data_parallel(problem: Problem, group: Any = None) -> Problem:
    """``DataParallel(group).problem(problem)``: the problem whose objectives are reduced."""
    return DataParallel(group).problem(problem)


def check_shards(problem: Problem, source: Any, world_size: int) -> None:
    """Refuse, in one line, a number of processes the data of the library's own problems and
    sources cannot be split into equal shards (what ``DataParallel.prepare`` splits);
    other problems and sources are the user's shards already."""
    if world_size <= 1:
        return
    from .problems.fewshot import EpisodeSource
    from .problems.hyperclean import HypercleanProblem

    if isinstance(problem, HypercleanProblem):
        _shard_hyperclean(problem, 0, world_size)
    if isinstance(source, EpisodeSource):
        dims = {"support_x": 1, "support_y": 1, "query_x": 1, "query_y": 1}
        _EpisodeShards(source, dims, 0, world_size).batch_at(0)


def check_world_size(group: Any = None) -> None:
    """Refuse a process group whose size differs from torchrun's ``WORLD_SIZE`` (one line)."""
    expected = os.environ.get("WORLD_SIZE")
    if expected is None or not (dist.is_available() and dist.is_initialized()):
        return
    actual = dist.get_world_size(group)
    if int(expected) != actual:
        raise DistributedError(
            f"the process group has {actual} processes but WORLD_SIZE={expected}: initialise the group with "
            f"torch.distributed.init_process_group() under torchrun (it reads WORLD_SIZE and RANK), not with a fixed size"
        )


def _split(value: torch.Tensor, dim: int, rank: int, world_size: int, where: str) -> torch.Tensor:
    size = value.shape[dim]
    if size < world_size or size % world_size:
        raise ValueError(
            f"{where} has {size} entries along dim {dim}, which cannot be split into {world_size} equal shards: "
            f"use a number of processes that divides {size} (at most {size}), or a batch size divisible by {world_size}"
        )
    step = size // world_size
    return value.narrow(dim, rank * step, step)


def shard(batch: Any, rank: int | None = None, world_size: int | None = None, dims: int | Mapping[str, int | None] = 0) -> Any:
    """This process's equal shard of ``batch`` (a tensor, or a dict / list / tuple of tensors).

    Args:
        batch: the global batch.
        rank: this process's rank (default: the default process group's; 0 without one).
        world_size: the number of processes (default: the default process group's; 1 without one).
        dims: the dimension split for every tensor (an int), or for each key of a dict
            batch (``None``: the entry is not split, e.g. a lookup table).

    Raises ``ValueError`` naming the entry when it cannot be split into equal shards.
    """
    group = DataParallel()
    rank = group.rank if rank is None else rank
    world_size = group.world_size if world_size is None else world_size
    if world_size == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        if not isinstance(dims, int):
            raise TypeError("shard(dims=...) must be an int for a tensor batch")
        return _split(batch, dims, rank, world_size, "the batch")
    if isinstance(batch, Mapping):
        out = {}
        for key, value in batch.items():
            dim = dims.get(key, 0) if isinstance(dims, Mapping) else dims
            split = isinstance(value, torch.Tensor) and dim is not None
            out[key] = _split(value, int(dim or 0), rank, world_size, f"batch[{key!r}]") if split else value
        return out
    if isinstance(batch, (list, tuple)):
        if isinstance(dims, Mapping):
            raise TypeError("shard(dims=...) must be an int for a list or tuple batch")
        return type(batch)(_split(v, dims, rank, world_size, f"batch[{i}]") for i, v in enumerate(batch))
    raise TypeError(f"shard() splits tensors and dicts / lists / tuples of tensors, got {type(batch).__name__}")


@dataclass(frozen=True)
class ShardedSource:
    """A data source for :func:`bilevel.solve` that gives this process its shard of
    ``source.batch_at(k)`` (:func:`shard` with ``dims``); ``source`` may also be a fixed batch."""

    source: Any
    dims: int | Mapping[str, int | None] = 0
    rank: int | None = None
    world_size: int | None = None

    def batch_at(self, k: int) -> Any:
        batch = self.source.batch_at(k) if hasattr(self.source, "batch_at") else self.source
        return shard(batch, self.rank, self.world_size, self.dims)


# -- the command line: `bilevel run CONFIG --nproc N`, `bilevel resume FOLDER --nproc N` -----------
WORKER_ENV = "BILEVEL_DISTRIBUTED_WORKER"
TIMEOUT_ENV = "BILEVEL_DIST_TIMEOUT"


def launched_by_torchrun() -> bool:
    """``True`` in a process started by ``torchrun`` with more than one process in all."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run ``python -m bilevel ARGS`` in ``nproc`` processes on this machine through
    ``torchrun`` (rendezvous on 127.0.0.1); returns its exit status."""
    import socket
    import subprocess
    import sys

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc={nproc!r} must be a positive number of processes")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        "bilevel",
        *args,
    ]
    return subprocess.call(command, env={**os.environ, WORKER_ENV: "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def init_from_environment(device: str | None = None) -> DataParallel:
    """Initialise the default process group from torchrun's environment (``gloo`` on CPU,
    ``nccl`` for CUDA tensors) with the timeout ``$BILEVEL_DIST_TIMEOUT`` seconds (default
    300): a process that dies makes the others fail within it."""
    import datetime

    if not dist.is_initialized():
        timeout = float(os.environ.get(TIMEOUT_ENV, "300"))
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    check_world_size()
    return DataParallel()


def _run_in_torchrun_group(nproc: int, main: Callable[[DataParallel], int], other: Callable[[DataParallel, Path], int]) -> int:
    """In a process torchrun started: check ``--nproc`` against its world size, join the
    group, and run ``main(dp)`` on rank 0 or ``other(dp, scratch)`` on the other ranks (a
    scratch folder of their own, removed at the end); the group is destroyed in every case."""
    import shutil
    import tempfile

    world = int(os.environ["WORLD_SIZE"])
    if nproc not in (1, world):
        raise ValueError(f"--nproc={nproc} differs from torchrun's WORLD_SIZE={world}: drop --nproc under torchrun")
    dp = init_from_environment()
    try:
        if dp.rank == 0:
            return main(dp)
        scratch = tempfile.mkdtemp(prefix=f"bilevel-rank{dp.rank}-")
        try:
            return other(dp, Path(scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_command(
    args: Any,
    overrides: Sequence[str],
    run: Callable[[Any, bool], dict],
    report: Callable[[dict], None],
    status: Callable[[dict], int],
) -> int:
    """``bilevel run --nproc N``: launch through torchrun, or — in a process torchrun
    started — join the group and ``run(out, progress)``. Rank 0 writes the run directory
    and prints the summary; the others run into a scratch folder removed at the end."""
    if not launched_by_torchrun():
        relaunch = ["run", args.config, *overrides]
        if args.out is not None:
            relaunch += ["--out", args.out]
        if args.overwrite:
            relaunch.append("--overwrite")
        if args.no_progress:
            relaunch.append("--no-progress")
        return launch(args.nproc, relaunch)

    def main(dp: DataParallel) -> int:
        summary = run(args.out, not args.no_progress)
        report(summary)
        return status(summary)

    return _run_in_torchrun_group(args.nproc, main, lambda dp, scratch: status(run(str(scratch / "run"), False)))


def resume_command(args: Any, check: Callable[[], None], resume: Callable[[str, bool], int]) -> int:
    """``bilevel resume FOLDER --nproc N``: check the request (``check()``: one line for a bad
    one, before any process starts) and launch through torchrun; or — in a process torchrun
    started — join the group and ``resume(folder, main)``.

    Any number of processes resumes any checkpoint: the checkpoint holds the replicated
    state, which every process reads, and the data are split again for the new count. Rank 0
    resumes the user's folder (``main=True``: it writes the checkpoint, the log and the
    summary, and prints); every other process first copies the folder into a scratch folder
    (removed at the end), and only then — after a barrier — does rank 0 touch the original.
    """
    import shutil

    if not launched_by_torchrun():
        if isinstance(args.nproc, bool) or not isinstance(args.nproc, int) or args.nproc < 1:
            raise ValueError(f"--nproc={args.nproc!r} must be a positive number of processes")
        check()
        relaunch = ["resume", args.run_dir]
        if args.max_iters is not None:
            relaunch += ["--max-iters", str(args.max_iters)]
        if args.data_dir is not None:
            relaunch += ["--data-dir", str(args.data_dir)]
        if args.no_progress:
            relaunch.append("--no-progress")
        return launch(args.nproc, relaunch)

    def main(dp: DataParallel) -> int:
        dp.barrier()  # the others hold their copies of the folder before it changes
        return resume(args.run_dir, True)

    def other(dp: DataParallel, scratch: Path) -> int:
        copy = scratch / Path(args.run_dir).name
        shutil.copytree(args.run_dir, copy)
        dp.barrier()
        return resume(str(copy), False)

    return _run_in_torchrun_group(args.nproc, main, other)
