"""Parts of IAPTT-GM: a learned initialisation of the lower steps, and the pessimistic
trajectory truncation that picks the iterate to differentiate.

* :class:`LearnedInit` — the lower steps start from ``y_0 = z``, an auxiliary variable of
  the upper level moved by the hypergradient ``∇_z f(x, y_k̃(x, z))`` (the
  "initialisation auxiliary"); its state is :class:`InitState`.
* :func:`pessimistic_step` — ``k̃ = argmax_{1 ≤ k ≤ K} f(x, y_k)``, the first maximiser.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch

from .. import tree as T
from ..schedules import Schedule, ScheduleLike, as_schedule
from ..state import part_state
from ..tree import Tree
from ..validation import check_step_size
from .base import Projection, check_projection

__all__ = ["InitState", "LearnedInit", "pessimistic_step"]


@part_state
class InitState(NamedTuple):
    """The learned initialisation z of the lower steps (a tree shaped like y)."""

    z: Tree


@dataclass(frozen=True)
class LearnedInit:
    """The initialisation auxiliary: ``y_0 = z`` and ``z ← Proj_Y(z − s_z ∇_z F)``.

    Args:
        lr: s_z, the step on z (a number or a schedule of the upper iteration k).
        projection: ``Proj_Y`` applied after each step (e.g. :class:`~bilevel.Box`), or ``None``.

    Example:
        >>> import torch, bilevel as bl
        >>> part = bl.parts.LearnedInit(lr=0.5, projection=bl.Box(-1.0, 1.0))
        >>> state = part.init({"y": torch.zeros(2)})
        >>> part.update({"y": torch.tensor([1.0, -4.0])}, state, 0).z["y"]
        tensor([-0.5000,  1.0000])
    """

    lr: ScheduleLike = 0.1
    projection: Projection | None = None

    def __post_init__(self) -> None:
        check_step_size("LearnedInit", "lr", self.lr)
        check_projection("LearnedInit", "projection", self.projection)

    @cached_property
    def schedule(self) -> Schedule:
        return as_schedule(self.lr)

    def init(self, y: Tree) -> InitState:
        return InitState(z=T.clone(y))

    def update(self, gradient: Tree, state: InitState, k: int) -> InitState:
        z = T.axpy(-self.schedule(k), gradient, state.z)
        return InitState(z=self.projection(z) if self.projection is not None else z)


def pessimistic_step(values: list[torch.Tensor]) -> int:
    """``k̃ ∈ {1, …, K}``: the first step whose upper value ``values[k − 1] = f(x, y_k)`` is
    largest (one host synchronisation)."""
    return int(torch.argmax(torch.stack(values))) + 1
