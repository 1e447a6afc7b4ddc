"""Sample streams: separate mini-batch streams for the upper and the lower objective.

A stochastic run gives ``f`` and ``g`` their own data (a validation set and a training
set, say) and draws mini-batches from each. :class:`Stream` describes one stream (tensors
with a batch size, a ``torch.utils.data.Dataset`` or a ``DataLoader``), :class:`Streams`
pairs an upper and a lower stream with a seed and is a data source for
:func:`bilevel.solve`: ``Streams(...).batch_at(k)`` returns the :class:`Draws` of
iteration k, from which a method takes as many *independent* batches as it needs::

    draws = streams.batch_at(k)
    draws.lower(0), draws.lower(1)     # two independent lower batches ξ, ξ' of iteration k
    draws.upper(0)                     # one upper batch ζ
    draws.lower_block(0)               # (block id, weight, batch): SAGA tables index blocks

**Sampling is a pure function of (seed, stream, iteration, draw index)**: the t-th lower
batch of iteration k is the same whenever it is asked for, so a resumed run (which calls
``batch_at(k)`` again) continues bit for bit, and drawing costs a few integer operations
on the host (no random-number generator on the device, no wait for it).

The data are split into fixed contiguous blocks of ``batch_size`` samples (the last one
shorter when ``batch_size`` does not divide n), as in benchopt's ``benchmark_bilevel``;
a draw is one block. ``sampling="uniform"`` (default) draws each block independently with
probability ``size/n`` (so every estimate is unbiased for the full mean, and draws within
an iteration are independent); ``sampling="shuffle"`` passes over the blocks in a random
order that changes every pass, taking ``draws`` blocks per iteration (the t-th draw of
iteration k is position ``k·draws + t`` of the sequence). Shuffle the data once before
making a stream if it is sorted (the blocks are contiguous).

Objectives receive one batch. Methods written for streams (:mod:`bilevel.methods.stochastic`)
pass ``draws.upper(j)`` to ``f`` and ``draws.lower(i)`` to ``g``. The seed methods (GALET,
sl-BAMM, BAGDC, AID, ...) pass the :class:`Draws` itself to both objectives; an objective
written with :func:`upper_batch` / :func:`lower_batch` (as the library's finite-sum
problems are) takes the first draw of its own stream from it, so those methods run on the
same streams with one upper and one lower batch per iteration.

Example:
    >>> import torch, bilevel as bl
    >>> streams = bl.Streams(upper=bl.Stream(torch.arange(8.0), batch_size=4),
    ...                      lower=bl.Stream(torch.arange(100.0, 112.0), batch_size=3), seed=0)
    >>> draws = streams.batch_at(5)
    >>> torch.equal(draws.lower(1), streams.batch_at(5).lower(1))    # a pure function of (k, t)
    True
    >>> draws.lower(0).shape, draws.upper(0).shape
    (torch.Size([3]), torch.Size([4]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from .validation import ArgumentTypeError, check_choice, check_count

__all__ = ["Draws", "FullDraws", "Stream", "Streams", "as_draws", "lower_batch", "upper_batch"]

_MASK = (1 << 64) - 1


def _splitmix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def mix(*values: int) -> int:
    """A 64-bit hash of integers (SplitMix64 chained): the random number of a draw."""
    h = 0x6A09E667F3BCC909
    for value in values:
        h = _splitmix(h ^ (int(value) & _MASK))
    return h


def _tensor_leaves(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in _tensor_leaves(v)]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in _tensor_leaves(v)]
    return []


@dataclass(frozen=True, eq=False)
class Stream:
    """One stream of mini-batches: the data, the batch size and how blocks are drawn.

    Args:
        data: a tensor or a tuple/list of tensors sharing their first dimension n (a
            batch is the tuple of their rows, or the tensor itself), a map-style
            ``torch.utils.data.Dataset`` (a batch is ``collate([dataset[i] ...])``) or a
            ``DataLoader`` (its dataset, batch size and ``collate_fn`` are used; its own
            sampler is not: the stream samples as a pure function of the iteration).
        batch_size: b, samples per batch (taken from a ``DataLoader`` when omitted);
            at most n.
        sampling: ``"uniform"`` (independent blocks, probability size/n) or
            ``"shuffle"`` (passes over the blocks in a new random order every pass).
        draws: blocks one iteration takes in ``"shuffle"`` mode (asking for more raises:
            the stream runs dry); ignored in ``"uniform"`` mode.
        device: where batches of a ``Dataset`` are moved (tensors stay where they are;
            put them on the variables' device).
        collate: how a ``Dataset``'s samples make a batch (default
            ``torch.utils.data.default_collate``).

    Memory: the stream holds references only; tensor batches are views (slices), no copy.
    """

    data: Any
    batch_size: int | None = None
    sampling: str = "uniform"
    draws: int = 1
    device: Any = None
    collate: Any = None
    _tensors: tuple = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        data, batch_size, collate = self.data, self.batch_size, self.collate
        if isinstance(data, DataLoader):
            if batch_size is None:
                batch_size = data.batch_size
            if collate is None:
                collate = data.collate_fn
            data = data.dataset
        if isinstance(data, IterableDataset):
            raise ArgumentTypeError(
                "Stream(data=...) got an IterableDataset: a stream draws batches by index as a pure function of the "
                "iteration, so it needs a map-style Dataset (with __len__ and __getitem__) or tensors"
            )
        tensors: tuple = ()
        if isinstance(data, torch.Tensor):
            tensors = (data,)
        elif isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
            tensors = tuple(data)
            sizes = {t.shape[0] if t.dim() else None for t in tensors}
            if len(sizes) != 1 or None in sizes:
                raise ValueError(
                    f"Stream(data=...) tensors must share their first dimension (the samples); got sizes {sorted(map(str, sizes))}"
                )
            devices = {t.device for t in tensors}
            if len(devices) > 1:
                raise ValueError(f"Stream(data=...) tensors are on several devices {sorted(map(str, devices))}: move them to one device")
        elif not isinstance(data, Dataset):
            raise ArgumentTypeError(
                f"Stream(data=...) must be a tensor, a tuple of tensors, a torch Dataset or a DataLoader, not {type(data).__name__}"
            )
        if tensors and tensors[0].dim() == 0:
            raise ValueError("Stream(data=...) is a 0-d tensor: the first dimension must index the samples")
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "collate", collate)
        object.__setattr__(self, "_tensors", tensors)
        n = self.n
        if n == 0:
            raise ValueError("Stream(data=...) holds no sample")
        if batch_size is None:
            raise ValueError("Stream(batch_size=None): give the number of samples per batch, e.g. Stream(data, batch_size=64)")
        check_count("Stream", "batch_size", batch_size)
        if batch_size > n:
            raise ValueError(f"Stream(batch_size={batch_size}) is larger than the data ({n} samples): use batch_size <= {n}")
        object.__setattr__(self, "batch_size", int(batch_size))
        check_choice("Stream", "sampling", self.sampling, ("uniform", "shuffle"))
        check_count("Stream", "draws", self.draws)

    # -- sizes --------------------------------------------------------------------------
    @cached_property
    def n(self) -> int:
        """The number of samples."""
        if self._tensors:
            return int(self._tensors[0].shape[0])
        return len(self.data)

    @cached_property
    def n_blocks(self) -> int:
        """N = ⌈n / b⌉, the number of blocks."""
        return math.ceil(self.n / int(self.batch_size))  # type: ignore[arg-type]

    def block_range(self, block: int) -> tuple[int, int]:
        """``(start, stop)`` of the samples of a block."""
        b = int(self.batch_size)  # type: ignore[arg-type]
        return block * b, min((block + 1) * b, self.n)

    def weight(self, block: int) -> float:
        """The block's share of the data, size/n (1/N when b divides n)."""
        start, stop = self.block_range(block)
        return (stop - start) / self.n

    @property
    def tensor_device(self) -> torch.device | None:
        """The device of tensor data (``None`` for a Dataset)."""
        return self._tensors[0].device if self._tensors else None

    # -- drawing ------------------------------------------------------------------------
    def block_at(self, seed: int, salt: int, k: int, t: int) -> int:
        """The block of draw t of iteration k (a pure function of its arguments)."""
        if self.sampling == "uniform":
            # a sample index uniform in [0, n): its block has probability size/n
            return (mix(seed, salt, k, t) % self.n) // int(self.batch_size)  # type: ignore[arg-type]
        if t >= self.draws:
            raise IndexError(
                f"the stream ran dry: iteration {k} asked for draw {t} but Stream(sampling='shuffle', draws={self.draws}) "
                f"gives {self.draws} per iteration; make it Stream(..., draws={t + 1}) or more (the method's draws per iteration)"
            )
        position = k * self.draws + t
        epoch, offset = divmod(position, self.n_blocks)
        return int(self._permutation(seed, salt, epoch)[offset])

    def _permutation(self, seed: int, salt: int, epoch: int) -> list[int]:
        cache: dict[tuple[int, int, int], list[int]] = self.__dict__.setdefault("_perm_cache", {})
        key = (seed, salt, epoch)
        if key not in cache:
            if epoch == 0:
                perm = list(range(self.n_blocks))  # the first pass in order, as the benchmark's sampler
            else:
                generator = torch.Generator().manual_seed(mix(seed, salt, epoch) & ((1 << 63) - 1))
                perm = torch.randperm(self.n_blocks, generator=generator).tolist()
            if len(cache) > 4:
                cache.clear()
            cache[key] = perm
        return cache[key]

    def take(self, block: int) -> Any:
        """The batch of one block."""
        start, stop = self.block_range(block)
        return self.take_range(start, stop)

    def take_range(self, start: int, stop: int) -> Any:
        """The batch of samples ``start … stop − 1`` (views for tensor data)."""
        if self._tensors:
            rows = tuple(t[start:stop] for t in self._tensors)
            return rows[0] if isinstance(self.data, torch.Tensor) else rows
        collate = self.collate if self.collate is not None else default_collate
        batch = collate([self.data[i] for i in range(start, stop)])
        if self.device is not None:
            batch = _to_device(batch, torch.device(self.device))
        return batch

    def full(self) -> Any:
        """All the samples as one batch (SRBA's refresh; the full objective)."""
        return self.take_range(0, self.n)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


_UPPER, _LOWER = 1, 2


@dataclass(frozen=True, eq=False)
class Streams:
    """An upper and a lower stream with a seed: a data source for :func:`bilevel.solve`.

    ``batch_at(k)`` returns the :class:`Draws` of iteration k. The two streams draw
    independently (each has its own salt in the hash), and so do the draws within one
    iteration.

    Args:
        upper: the stream of the upper objective f (ζ).
        lower: the stream of the lower objective g (ξ).
        seed: the run's seed (an integer).
    """

    upper: Stream
    lower: Stream
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("upper", "lower"):
            if not isinstance(getattr(self, name), Stream):
                raise ArgumentTypeError(f"Streams({name}=...) must be a bilevel.Stream, not {type(getattr(self, name)).__name__}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ArgumentTypeError(f"Streams(seed={self.seed!r}) must be an integer")

    def batch_at(self, k: int) -> Draws:
        return Draws(self, k)

    @property
    def samples(self) -> tuple[int, int]:
        """``(n_upper, n_lower)``."""
        return self.upper.n, self.lower.n


class Draws:
    """The batches of one iteration: ``lower(t)``, ``upper(t)`` (t-th independent draw),
    ``lower_block(t)`` / ``upper_block(t)`` with the block id and weight, and the full
    data ``lower_full()`` / ``upper_full()``."""

    __slots__ = ("k", "streams")

    def __init__(self, streams: Streams, k: int):
        self.streams, self.k = streams, int(k)

    def _block(self, which: int, t: int) -> tuple[int, float, Any]:
        stream = self.streams.upper if which == _UPPER else self.streams.lower
        block = stream.block_at(self.streams.seed, which, self.k, t)
        return block, stream.weight(block), stream.take(block)

    def lower_block(self, t: int = 0) -> tuple[int, float, Any]:
        """``(block id, weight, batch)`` of the t-th lower draw."""
        return self._block(_LOWER, t)

    def upper_block(self, t: int = 0) -> tuple[int, float, Any]:
        """``(block id, weight, batch)`` of the t-th upper draw."""
        return self._block(_UPPER, t)

    def lower(self, t: int = 0) -> Any:
        """The t-th independent lower batch ξ of this iteration."""
        return self._block(_LOWER, t)[2]

    def upper(self, t: int = 0) -> Any:
        """The t-th independent upper batch ζ of this iteration."""
        return self._block(_UPPER, t)[2]

    def lower_full(self) -> Any:
        return self.streams.lower.full()

    def upper_full(self) -> Any:
        return self.streams.upper.full()

    @property
    def lower_blocks(self) -> int:
        return self.streams.lower.n_blocks

    @property
    def upper_blocks(self) -> int:
        return self.streams.upper.n_blocks

    def lower_weights(self) -> list[float]:
        return [self.streams.lower.weight(i) for i in range(self.lower_blocks)]

    def upper_weights(self) -> list[float]:
        return [self.streams.upper.weight(i) for i in range(self.upper_blocks)]

    def check_device(self, device: torch.device) -> None:
        """Raise one line when a stream's tensors are not on ``device`` (the variables')."""
        for name, stream in (("upper", self.streams.upper), ("lower", self.streams.lower)):
            found = stream.tensor_device
            if found is None:
                leaves = _tensor_leaves(stream.take(0))
                found = leaves[0].device if leaves else None
            if found is not None and found != device:
                raise ValueError(
                    f"the {name} stream's data is on {found} but the variables are on {device}: put both on one device "
                    f"(move the tensors with .to({str(device)!r}), or give Stream(..., device={str(device)!r}) for a Dataset)"
                )


class FullDraws:
    """The :class:`Draws` interface over one fixed batch (full-batch runs of the stochastic
    methods: every draw is that batch, one block of weight 1)."""

    __slots__ = ("batch", "k")

    def __init__(self, batch: Any, k: int = 0):
        self.batch, self.k = batch, k

    def lower_block(self, t: int = 0) -> tuple[int, float, Any]:
        return 0, 1.0, self.batch

    def upper_block(self, t: int = 0) -> tuple[int, float, Any]:
        return 0, 1.0, self.batch

    def lower(self, t: int = 0) -> Any:
        return self.batch

    def upper(self, t: int = 0) -> Any:
        return self.batch

    def lower_full(self) -> Any:
        return self.batch

    def upper_full(self) -> Any:
        return self.batch

    lower_blocks = 1
    upper_blocks = 1

    def lower_weights(self) -> list[float]:
        return [1.0]

    def upper_weights(self) -> list[float]:
        return [1.0]

    def check_device(self, device: torch.device) -> None:
        for leaf in _tensor_leaves(self.batch):
            if leaf.device != device:
                raise ValueError(f"the batch is on {leaf.device} but the variables are on {device}: put both on one device")
            break


def as_draws(batch: Any) -> Draws | FullDraws:
    """``batch`` if it is a :class:`Draws`, else :class:`FullDraws` over it."""
    return batch if isinstance(batch, (Draws, FullDraws)) else FullDraws(batch)


def upper_batch(batch: Any) -> Any:
    """The batch an upper objective uses: the first upper draw of a :class:`Draws`, else ``batch``."""
    return batch.upper(0) if isinstance(batch, (Draws, FullDraws)) else batch


def lower_batch(batch: Any) -> Any:
    """The batch a lower objective uses: the first lower draw of a :class:`Draws`, else ``batch``."""
    return batch.lower(0) if isinstance(batch, (Draws, FullDraws)) else batch


def tensors_of(batch: Any) -> Sequence[torch.Tensor]:
    """The tensors of a batch (for device checks)."""
    return _tensor_leaves(batch)
