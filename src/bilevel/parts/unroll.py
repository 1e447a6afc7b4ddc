"""Unrolled differentiation: which lower steps the hypergradient is back-propagated through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from .. import tree as T
from ..state import EmptyState, part_state
from ..tree import Tree
from ..validation import check_bool, check_count

__all__ = ["Unroll", "UnrollState"]


@part_state
class UnrollState(NamedTuple):
    """The lower variable every upper iteration restarts from (a cold-started unroll)."""

    y_init: Tree


@dataclass(frozen=True)
class Unroll:
    """The hypergradient ``d/dx f(x, y_T(x))`` of T lower steps (``lower.steps``) from
    ``y_0``, by back-propagation through the last K of them.

    Args:
        truncate: K, the number of differentiated steps (``None``: all of them, full RHG;
            K < T is T-RHG).
        warm_start: start the lower steps from the previous ``y_T`` instead of the
            initial y. A cold start keeps the initial y in :class:`UnrollState`.
    """

    truncate: int | None = None
    warm_start: bool = False

    def __post_init__(self) -> None:
        check_count("Unroll", "truncate", self.truncate, minimum=1, allow_none=True)
        check_bool("Unroll", "warm_start", self.warm_start)

    def init(self, y: Tree) -> EmptyState | UnrollState:
        return EmptyState() if self.warm_start else UnrollState(y_init=T.clone(y))

    def start(self, y: Tree, state: Any) -> Tree:
        """Where the lower steps of an upper iteration start: the previous y or y_init."""
        return y if self.warm_start else state.y_init

    def differentiated(self, steps: int) -> int:
        """K, for T = ``steps`` lower steps."""
        return steps if self.truncate is None else self.truncate
