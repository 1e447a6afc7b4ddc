"""Unrolled differentiation: which lower steps the hypergradient is back-propagated through,
and how much of their graph is kept in memory."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

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
    the same operations, recomputed). The segments are differentiated once (the
    hypergradient's backward pass); a second differentiation through them is not supported.

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
        x_leaves = T.leaves(x)
        for start in range(first, last, size):
            segment = _SegmentSpec(lower, problem, batch, k, start, min(start + size, last), x, y)
            y_leaves = T.leaves(y)
            out = _Segment.apply(segment, len(x_leaves), *x_leaves, *y_leaves)
            y = T.unflatten_like(list(out[: len(y_leaves)]), y)
            grad = T.unflatten_like(list(out[len(y_leaves) :]), y)
        return y, grad


class _SegmentSpec:
    """Steps ``start, …, stop − 1`` of ``lower`` (the trees give the leaves their structure)."""

    def __init__(self, lower: Any, problem: Problem, batch: Any, k: int, start: int, stop: int, x_like: Tree, y_like: Tree):
        self.lower, self.problem, self.batch, self.k = lower, problem, batch, k
        self.start, self.stop, self.x_like, self.y_like = start, stop, x_like, y_like

    def run(self, x_leaves: list[torch.Tensor], y_leaves: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(y_stop leaves, ∇_y g leaves of the last step)`` with the graph of the steps."""
        x, y = T.unflatten_like(x_leaves, self.x_like), T.unflatten_like(y_leaves, self.y_like)
        grad: Tree = None
        for t in range(self.start, self.stop):
            y, grad = self.lower.differentiable_step(self.problem, x, y, self.batch, t, self.k)
        return T.leaves(y), T.leaves(grad)


class _Segment(torch.autograd.Function):
    """A checkpointed segment: forward keeps only its inputs; backward recomputes the steps
    with their graph and back-propagates through them (one extra forward per step).

    The steps differentiate g inside (``create_graph``), so the segment cannot run under
    :func:`torch.utils.checkpoint.checkpoint`: its saved-tensor hooks would discard the
    tensors that inner gradient needs and recompute the segment at every step.
    """

    @staticmethod
    def forward(ctx: Any, spec: _SegmentSpec, nx: int, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.spec, ctx.nx = spec, nx
        ctx.save_for_backward(*leaves)
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in leaves]
            y_out, grad = spec.run(inputs[:nx], inputs[nx:])
        outputs = [t.detach() for t in y_out] + [g.detach() for g in grad]
        ctx.mark_non_differentiable(*outputs[len(y_out) :])
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *cotangents: torch.Tensor) -> tuple[Any, ...]:
        leaves = ctx.saved_tensors
        ny = len(leaves) - ctx.nx
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in leaves]
            y_out, _ = ctx.spec.run(inputs[: ctx.nx], inputs[ctx.nx :])
            wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
            pairs = [(o, c) for o, c in zip(y_out, cotangents[:ny], strict=True) if o.requires_grad]
            grads: list[torch.Tensor | None] = [None] * len(inputs)
            if pairs and wanted:
                found = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [c for _, c in pairs], allow_unused=True)
                for i, g in zip(wanted, found, strict=True):
                    grads[i] = g
        return (None, None, *grads)
