"""Upper-direction estimators: what the upper optimizer is given at iteration k.

A direction estimator turns the hypergradient estimate of iteration k (``∇_x f − J v`` or
the derivative of the unrolled map) into the direction handed to the upper optimizer:
``init(x) -> state`` and ``update(estimate, state, k) -> (direction, state)``. The
deterministic methods use :class:`PlainDirection`, the estimate itself; moving averages
and variance-reduced estimators of the stochastic methods are further implementations of
the same protocol (:class:`~bilevel.parts.DirectionEstimator`), with their running
averages as a typed state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..state import EmptyState
from ..tree import Tree

__all__ = ["PlainDirection"]


@dataclass(frozen=True)
class PlainDirection:
    """The hypergradient estimate itself, ``d_k = ĥ_k``. Stateless.

    Example:
        >>> import torch, bilevel as bl
        >>> part = bl.parts.PlainDirection()
        >>> part.update({"x": torch.ones(2)}, part.init(None), 0)[0]
        {'x': tensor([1., 1.])}
    """

    def init(self, x: Tree) -> EmptyState:
        return EmptyState()

    def update(self, estimate: Tree, state: Any, k: int) -> tuple[Tree, Any]:
        return estimate, state
