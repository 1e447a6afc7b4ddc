"""The unrolled template: the hypergradient by back-propagation through the lower steps.

One upper iteration of an :class:`Unrolled` method with parts ``P``: T = ``P.lower.steps``
steps of the lower dynamics from ``y_0`` (``P.unroll.start``: the previous y or the
initial one), the first T − K without a graph and the last K = ``P.unroll.differentiated(T)``
with it, then

    ĥ_k = d/dx f(x, y_T(x)) |_{x = x_k},     x_{k+1} = Proj_X(P.upper.update(x_k, P.direction.update(ĥ_k)))

Memory grows as O(K · dim y), or O(√K · dim y) with gradient checkpointing
(``Unroll(checkpoint="sqrt")``). Stationarity reported: ``‖x − Proj(x − ĥ)‖²``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch

from .. import tree as T
from ..auto import TrackedLower
from ..oracles import _grads_or_zeros, _requires_grad_copy
from ..parts import EmptyState, Parts, Unroll, projected_sq
from ..problem import Problem
from ..state import State
from ..tree import Tree
from .base import Assembled

__all__ = ["Unrolled"]


@dataclass(frozen=True, kw_only=True)
class Unrolled(Assembled):
    """Base of the methods that differentiate through their lower iterations.

    ``build_parts`` must give ``lower`` (with ``step`` and ``differentiable_step``) and
    ``unroll``.
    """

    uses_multiplier: ClassVar[bool] = False

    def check_parts(self, owner: str, parts: Parts) -> None:
        if parts.unroll is None:
            raise ValueError(f"{owner}: an unrolled method needs Parts.unroll (bilevel.parts.Unroll)")
        truncate = parts.unroll.truncate
        if truncate is not None and truncate > parts.lower.steps:
            raise ValueError(f"{owner}(truncate={truncate}) cannot exceed lower_steps={parts.lower.steps}")

    def initial_state(self, x: Tree, y: Tree) -> State:
        state = super().initial_state(x, y)
        return state.replace(extra={**state.extra, "unroll": cast(Unroll, self.parts.unroll).init(y)})

    def init(self, problem: Problem, x0: Tree = None, y0: Tree = None, batch: Any = None, validate: bool = True) -> State:
        state = super().init(problem, x0, y0, batch, validate)
        lower = self.parts.lower
        if not isinstance(lower, TrackedLower):
            return state
        y_start = cast(Unroll, self.parts.unroll).start(state.y, state.extra.get("unroll", EmptyState()))
        return state.replace(extra={**state.extra, "lower": lower.initial(problem, self.derivatives, state.x, y_start, batch)})

    def step(self, problem: Problem, state: State, batch: Any = None) -> tuple[State, dict]:
        parts, oracles = self.parts, self.derivatives
        lower, unroll, k = parts.lower, cast(Unroll, parts.unroll), state.k  # present: check_parts
        steps = lower.steps
        differentiated = unroll.differentiated(steps)
        y = unroll.start(state.y, state.extra.get("unroll", EmptyState()))
        tracked = isinstance(lower, TrackedLower)
        if tracked:  # β from the curvature at the start of this unroll (lr_lower="auto")
            tracker = cast(TrackedLower, lower)
            lower, tracker_state, reference_sq = tracker.begin(problem, oracles, state.x, y, batch, k, state.extra["lower"])
        for t in range(steps - differentiated):
            y, _ = lower.step(problem, state.x, y, batch, t, oracles, k)
        x_req = _requires_grad_copy(state.x)
        x_leaves = T.leaves(x_req)
        with torch.enable_grad():
            y = _requires_grad_copy(y)
            y, grad_g = unroll.differentiate(lower, problem, x_req, y, batch, steps - differentiated, steps, k)
            upper_loss = problem.upper(x_req, y, batch)
            estimate = T.unflatten_like(_grads_or_zeros(upper_loss, x_leaves), state.x)
        direction_sq = T.sq_norm(estimate)
        info = {
            "upper_loss": upper_loss.detach(),
            "lower_grad_sq": T.sq_norm(grad_g),
            "direction_sq": direction_sq,
            "stationarity": projected_sq(parts.projection, state.x, estimate, direction_sq),
        }
        x_next, opt, direction_state = self.update_x(state.x, estimate, state)
        extra = {**state.extra, "direction": direction_state}
        new_state = State(x=x_next, y=T.detach(y), v=None, opt=opt, k=k + 1, extra=extra)
        if tracked:
            new_state = tracker.conclude(state, new_state, tracker_state, reference_sq, info)
        return new_state, info
