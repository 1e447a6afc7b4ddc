"""The alternating template: lower steps, a multiplier, the implicit upper direction.

One upper iteration of an :class:`Alternating` method with parts ``P`` (``method.parts``),
μ = ``P.lower.averaging(k)`` and φ_μ = μ f + (1 − μ) g (g when μ = 0):

sequential order (AID, GALET, the papers' sl-BAMM and BAGDC)::

    y_{k+1} = P.lower.run(x_k, y_k)                              lower steps on φ_μ
    v_{k+1} = P.multiplier.update(H_φ, ∇_y f, v_k)               at (x_k, y_{k+1})
    ĥ_k     = ∇_x f − J_φ v_{k+1}                                P.measure (products, stationarity)
    x_{k+1} = Proj_X(P.upper.update(x_k, P.direction.update(ĥ_k)))

Jacobi order (the official ``*_mp`` / ``BAMM_CG`` code): every quantity at
``(x_k, y_k, v_k)``; the direction uses the old ``v_k``, the multiplier step reuses the
product ``H_φ v_k`` the measure formed, and the one lower step reuses ``∇_y φ_μ(x_k, y_k)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from .. import tree as T
from ..parts import EmptyState, MultiplierEstimator, Parts, linearize
from ..problem import Problem
from ..state import State
from ..tree import Tree
from .base import Assembled

__all__ = ["Alternating"]


@dataclass(frozen=True, kw_only=True)
class Alternating(Assembled):
    """Base of the methods that alternate lower steps, a multiplier estimate and an upper step.

    ``build_parts`` must give ``lower`` and ``multiplier`` (and usually a ``measure``);
    see the module docstring for the iteration and docs/extending.md for an example.
    """

    def check_parts(self, owner: str, parts: Parts) -> None:
        if parts.multiplier is None:
            raise ValueError(f"{owner}: an alternating method needs a multiplier estimator (Parts.multiplier)")
        if parts.order == "jacobi" and parts.lower.steps != 1:
            raise ValueError(
                f"{owner}(order='jacobi') takes exactly one lower step per iteration (it reuses the gradient at "
                f"(x_k, y_k)); got lower_steps={parts.lower.steps}: use order='sequential' for several lower steps"
            )

    def initial_state(self, x: Tree, y: Tree) -> State:
        state = super().initial_state(x, y)
        v = T.zeros_like(y)
        return state.replace(v=v, extra={**state.extra, "multiplier": cast(MultiplierEstimator, self.parts.multiplier).init(v)})

    def step(self, problem: Problem, state: State, batch: Any = None) -> tuple[State, dict]:
        parts, oracles = self.parts, self.derivatives
        multiplier = cast(MultiplierEstimator, parts.multiplier)  # present: check_parts
        x, k, extra = state.x, state.k, state.extra
        lower_state = extra.get("lower", EmptyState())
        multiplier_state = extra.get("multiplier", EmptyState())
        mu = parts.lower.averaging(k)
        if parts.order == "sequential":
            y, _, lower_state = parts.lower.run(problem, x, state.y, batch, oracles, lower_state, k)
            point = linearize(oracles, problem, mu, x, y, batch)
            solve, multiplier_state = multiplier.update(point.phi.hvp, point.grad_y_f, state.v, multiplier_state, k)
            estimate, info, _ = parts.measure.evaluate(point, solve.v, solve, x, parts.projection)
        else:
            point = linearize(oracles, problem, mu, x, state.y, batch)
            estimate, info, hv = parts.measure.evaluate(point, state.v, None, x, parts.projection)
            solve, multiplier_state = multiplier.update(point.phi.hvp, point.grad_y_f, state.v, multiplier_state, k, hv=hv)
            y = parts.lower.apply(state.y, point.phi.grad_y)
        info.update(parts.measure.report(solve))
        x_next, opt, direction_state = self.update_x(x, estimate, state)
        extra = {**extra, "lower": lower_state, "multiplier": multiplier_state, "direction": direction_state}
        return State(x=x_next, y=y, v=solve.v, opt=opt, k=k + 1, extra=extra), info
