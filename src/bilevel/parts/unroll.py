"""Unrolled differentiation: which lower steps the hypergradient is back-propagated through,
and how much of their graph is kept in memory."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from .. import tree as T
from ..problem import Problem
from ..state import EmptyState, part_state
from ..tree import Tree
from ..validation import check_bool, check_count

__all__ = ["Unroll", "UnrollState", "check_checkpoint"]


@part_state
class UnrollState(NamedTuple):
    """The lower variable every upper iteration restarts from (a cold-started unroll)."""

    y_init: Tree


def check_checkpoint(owner: str, name: str, value: Any) -> Any:
    """``None``, ``"sqrt"`` or a segment length (an integer >= 1)."""
    if value is None or value == "sqrt":
        return value
    if isinstance(value, str):
        raise ValueError(f"{owner}({name}={value!r}) must be None, 'sqrt' or a segment length (an integer >= 1)")
    return check_count(owner, name, value)


@dataclass(frozen=True)
class Unroll:
    """The hypergradient ``d/dx f(x, y_T(x))`` of T lower steps (``lower.steps``) from
    ``y_0``, by back-propagation through the last K of them.

    Memory. Back-propagation through K steps keeps each step's graph — ``∇_y g`` built
    with ``create_graph`` and what it saved — so memory grows as O(K · dim y · c), with
    c the activations of one gradient evaluation. With ``checkpoint = S`` the K steps run
    in segments of S (gradient checkpointing, :func:`torch.utils.checkpoint.checkpoint`):
    only the lower variable at the start of each segment is kept during the forward pass,
    and a segment's steps are recomputed, one segment at a time, when the backward pass
    reaches it. Memory is then O((K/S + S) · dim y · c) — O(√K) at ``S = ⌈√K⌉``
    (``checkpoint="sqrt"``) — for about one extra forward per step (each differentiated
    ``∇_y g`` is evaluated twice). The hypergradient is the same up to rounding (exactly
    the same operations, recomputed).

    Args:
        truncate: K, the number of differentiated steps (``None``: all of them, full RHG;
            K < T is T-RHG).
        warm_start: start the lower steps from the previous ``y_T`` instead of the
            initial y. A cold start keeps the initial y in :class:`UnrollState`.
        checkpoint: ``None`` (default: keep every step's graph), ``"sqrt"`` (segments of
            ``⌈√K⌉`` steps) or a segment length S.

    Example:
        >>> import torch, bilevel as bl
        >>> from bilevel.parts import LowerGD, Unroll
        >>> problem = bl.problems.T1(n=3)                                  # g = ½‖y‖² − xᵀy
        >>> x = {"x": torch.ones(3, dtype=torch.float64, requires_grad=True)}
        >>> y0 = {"y": torch.zeros(3, dtype=torch.float64, requires_grad=True)}
        >>> with torch.enable_grad():
        ...     y, _ = Unroll(checkpoint="sqrt").differentiate(LowerGD(lr=0.5, steps=4), problem, x, y0, None, 0, 4)
        ...     (dx,) = torch.autograd.grad(y["y"].sum(), x["x"])
        >>> dx                                                             # d y_4 / dx = 1 − 0.5⁴
        tensor([0.9375, 0.9375, 0.9375], dtype=torch.float64)

    References: Griewank & Walther, "Algorithm 799: revolve" (ACM TOMS 2000); Chen, Xu,
    Zhang & Guestrin, "Training Deep Nets with Sublinear Memory Cost" (2016).
    """

    truncate: int | None = None
    warm_start: bool = False
    checkpoint: int | str | None = None

    def __post_init__(self) -> None:
        check_count("Unroll", "truncate", self.truncate, minimum=1, allow_none=True)
        check_bool("Unroll", "warm_start", self.warm_start)
        check_checkpoint("Unroll", "checkpoint", self.checkpoint)

    def init(self, y: Tree) -> EmptyState | UnrollState:
        return EmptyState() if self.warm_start else UnrollState(y_init=T.clone(y))

    def start(self, y: Tree, state: Any) -> Tree:
        """Where the lower steps of an upper iteration start: the previous y or y_init."""
        return y if self.warm_start else state.y_init

    def differentiated(self, steps: int) -> int:
        """K, for T = ``steps`` lower steps."""
        return steps if self.truncate is None else self.truncate

    def segment(self, differentiated: int) -> int | None:
        """S, the steps per checkpointed segment for K = ``differentiated`` (``None``: no checkpointing)."""
        if self.checkpoint is None:
            return None
        if self.checkpoint == "sqrt":
            return max(1, math.ceil(math.sqrt(differentiated)))
        return int(self.checkpoint)

    def differentiate(
        self, lower: Any, problem: Problem, x: Tree, y: Tree, batch: Any, first: int, last: int, k: int = 0
    ) -> tuple[Tree, Tree]:
        """Steps ``first, …, last − 1`` of ``lower`` with their graph (call under
        ``torch.enable_grad()``, with ``x`` and ``y`` requiring gradients).

        Returns ``(y_last, ∇_y g)``, the gradient of the last step (detached).
        """
        size = self.segment(last - first)
        if size is None or size >= last - first:
            grad: Tree = None
            for t in range(first, last):
                y, grad = lower.differentiable_step(problem, x, y, batch, t, k)
            return y, grad
        grad = None
        for start in range(first, last, size):
            stop = min(start + size, last)
            leaves = T.leaves(y)

            def run(*ys: torch.Tensor, start: int = start, stop: int = stop, like: Tree = y) -> tuple[torch.Tensor, ...]:
                current, g = T.unflatten_like(list(ys), like), None
                for t in range(start, stop):
                    current, g = lower.differentiable_step(problem, x, current, batch, t, k)
                return (*T.leaves(current), *T.leaves(g))

            out = _checkpoint(run, *leaves, use_reentrant=False)
            y = T.unflatten_like(list(out[: len(leaves)]), y)
            grad = T.unflatten_like(list(out[len(leaves) :]), y)
        return y, grad
