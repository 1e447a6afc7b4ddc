"""Lower dynamics: how the lower variable y moves within an upper iteration."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from .. import tree as T
from ..oracles import Oracles, _grads_or_zeros
from ..problem import Problem
from ..schedules import Schedule, ScheduleLike, as_schedule
from ..state import EmptyState
from ..tree import Tree
from ..validation import check_choice, check_count, check_positive
from .base import check_weight

__all__ = ["LowerAggregated", "LowerGD"]

_EMPTY = EmptyState()


@dataclass(frozen=True)
class LowerGD:
    """Lower-level dynamics: ``steps`` gradient steps ``y ← y − β ∇_y g(x, y)``.

    Stateless (its state is :class:`~bilevel.state.EmptyState`); it descends g itself
    (``averaging(k) = 0``).

    Args:
        lr: β, the lower-level step (≤ 1/L_g for a guaranteed decrease).
        steps: N, steps per upper iteration.

    Example:
        >>> import torch, bilevel as bl
        >>> problem = bl.problems.T1(n=2)                    # g = ½‖y‖² − xᵀy: ∇_y g = y − x
        >>> x, y = {"x": torch.ones(2, dtype=torch.float64)}, {"y": torch.zeros(2, dtype=torch.float64)}
        >>> y1, _, _ = bl.parts.LowerGD(lr=0.5, steps=2).run(problem, x, y, None, bl.Oracles(), bl.parts.EmptyState(), 0)
        >>> y1["y"]                                          # 1 − (1 − 0.5)²
        tensor([0.7500, 0.7500], dtype=torch.float64)
    """

    lr: float = 0.1
    steps: int = 1

    def __post_init__(self) -> None:
        check_count(type(self).__name__, "steps", self.steps, minimum=1)
        check_positive(type(self).__name__, "lr", self.lr)

    def init(self, y: Tree) -> EmptyState:
        return EmptyState()

    def averaging(self, k: int) -> float:
        return 0.0

    def step(self, problem: Problem, x: Tree, y: Tree, batch: Any, t: int, oracles: Oracles, k: int = 0) -> tuple[Tree, Tree]:
        """One step without a graph: ``(y_next, ∇_y g(x, y))``."""
        grad_g, _ = oracles.gradient_y(problem.lower, x, y, batch)
        return T.axpy(-self.lr, grad_g, y), grad_g

    def run(
        self, problem: Problem, x: Tree, y: Tree, batch: Any, oracles: Oracles, state: EmptyState = _EMPTY, k: int = 0
    ) -> tuple[Tree, Tree, EmptyState]:
        """All steps without a graph: ``(y_N, last step direction, state)``."""
        direction: Tree = None
        for t in range(self.steps):
            y, direction = self.step(problem, x, y, batch, t, oracles, k)
        return y, direction, state

    def differentiable_step(self, problem: Problem, x: Tree, y: Tree, batch: Any, t: int, k: int = 0) -> tuple[Tree, Tree]:
        """One step as a function of ``(x, y)`` with its graph kept (for unrolling).

        Returns ``(y_next, ∇_y g(x, y))``, the gradient detached.
        """
        yl = T.leaves(y)
        grads = _create_graph_grad(problem.lower(x, y, batch), yl)
        y_next = [p - self.lr * gr for p, gr in zip(yl, grads, strict=True)]
        return T.unflatten_like(y_next, y), T.unflatten_like([gr.detach() for gr in grads], y)

    def apply(self, y: Tree, gradient: Tree) -> Tree:
        """``y − β ∇``: one step from a gradient of the descended objective the caller has."""
        return T.axpy(-self.lr, gradient, y)


def _create_graph_grad(value: torch.Tensor, inputs: list) -> list:
    return _grads_or_zeros(value, inputs, create_graph=True)


@dataclass(frozen=True)
class LowerAggregated(LowerGD):
    """Aggregated lower dynamics of BDA (Liu et al., ICML 2020) and sl-BAMM:

        y ← y − [(1 − μ) β ∇_y g(x, y) + μ β_u ∇_y f(x, y)]

    With ``lr_lower_upper = lr`` (the default) this is a gradient step on the averaged
    objective ``φ_μ = μ f + (1 − μ) g``.

    Args:
        lr: β, step on the lower objective.
        steps: number of steps per upper iteration.
        mu: μ, aggregation weight in [0, 1): a number or a schedule.
        lr_lower_upper: β_u, step on the upper objective (default: ``lr``); BDA's name.
        index: what the schedule ``mu`` is a function of: ``"inner"`` (default; the step
            t within an upper iteration, BDA's μ_t) or ``"outer"`` (the upper iteration
            k, constant over its steps: sl-BAMM's μ_k).

    Reference: Liu, Mu, Yuan, Zeng, Zhang, "A Generic First-Order Algorithmic Framework
    for Bi-Level Programming Beyond Lower-Level Singleton", ICML 2020.
    """

    mu: ScheduleLike = 0.1
    lr_lower_upper: float | None = None
    index: str = "inner"

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_weight(owner, "mu", self.mu)
        check_positive(owner, "lr_lower_upper", self.lr_lower_upper, allow_none=True)
        check_choice(owner, "index", self.index, ("inner", "outer"))

    @cached_property
    def mu_schedule(self) -> Schedule:
        """``mu`` as a schedule (built once)."""
        return as_schedule(self.mu)

    def coefficients(self, t: int, k: int = 0) -> tuple[float, float]:
        """``((1 − μ) β, μ β_u)``: the weights on ``∇_y g`` and ``∇_y f`` of step t of iteration k."""
        mu = self.mu_schedule(t if self.index == "inner" else k)
        beta_u = self.lr if self.lr_lower_upper is None else self.lr_lower_upper
        # μ = 0 gives the number 0.0 even for a tensor step (auto), so step() tests it without a host sync
        return (1.0 - mu) * self.lr, (mu * beta_u if mu != 0.0 else 0.0)

    def averaging(self, k: int) -> float:
        """μ_k (``index="outer"``) or μ of the first step (``"inner"``)."""
        return float(self.mu_schedule(k if self.index == "outer" else 0))

    def step(self, problem: Problem, x: Tree, y: Tree, batch: Any, t: int, oracles: Oracles, k: int = 0) -> tuple[Tree, Tree]:
        a, b = self.coefficients(t, k)
        lower, upper = problem.lower, problem.upper
        if b == 0.0:  # μ = 0: a plain gradient step on g, f not evaluated
            grad_g, _ = oracles.gradient_y(lower, x, y, batch)
            return T.axpy(-a, grad_g, y), grad_g

        def weighted(xx: Tree, yy: Tree, bb: Any) -> torch.Tensor:
            return a * lower(xx, yy, bb) + b * upper(xx, yy, bb)

        # one backward pass for the aggregated direction a ∇_y g + b ∇_y f
        direction, _ = oracles.gradient_y(weighted, x, y, batch)
        return T.axpy(-1.0, direction, y), direction

    def differentiable_step(self, problem: Problem, x: Tree, y: Tree, batch: Any, t: int, k: int = 0) -> tuple[Tree, Tree]:
        a, b = self.coefficients(t, k)
        yl = T.leaves(y)
        grads_g = _create_graph_grad(problem.lower(x, y, batch), yl)
        grads_f = _create_graph_grad(problem.upper(x, y, batch), yl)
        y_next = [p - a * gg - b * gf for p, gg, gf in zip(yl, grads_g, grads_f, strict=True)]
        return T.unflatten_like(y_next, y), T.unflatten_like([gg.detach() for gg in grads_g], y)

    def apply(self, y: Tree, gradient: Tree) -> Tree:
        """``y − β ∇_y φ_μ``: valid as the aggregated step when ``lr_lower_upper`` is ``lr``."""
        if self.lr_lower_upper is not None and self.lr_lower_upper != self.lr:
            raise ValueError(
                f"{type(self).__name__}.apply needs lr_lower_upper = lr (a step on φ_μ); got {self.lr_lower_upper} != {self.lr}"
            )
        return T.axpy(-self.lr, gradient, y)
