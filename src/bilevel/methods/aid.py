"""Approximate implicit differentiation (AID) with a matrix-free linear solver."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar, cast

from ..auto import AdaptiveLower, AutoSteps, auto_upper, check_auto_positive, check_auto_upper, is_auto
from ..finite_difference import HessianFree
from ..linsolve import CG, LinearSolver, check_solver
from ..oracles import Oracles
from ..parts import DirectionNorm, LinearSolve, LowerGD, Parts
from ..schedules import ScheduleLike
from ..updates import UpperOptimizer
from ..validation import check_bool, check_count, check_positive
from .alternating import Alternating
from .base import option

__all__ = ["AID"]


@dataclass(frozen=True)
class AID(AutoSteps, Alternating):
    """AID: lower-level steps, then the implicit hypergradient through a linear solve.

    Per upper iteration k (warm-started ``y``):

        y_{k+1} = N steps of  y ← y − β ∇_y g(x_k, y)          from y_k
        v_{k+1} ≈ H⁻¹ ∇_y f,   H = ∇²_yy g(x_k, y_{k+1})        (``solver``, from 0 or v_k)
        d_k = ∇_x f(x_k, y_{k+1}) − J v_{k+1},   J = ∇²_xy g(x_k, y_{k+1})
        x_{k+1} = Proj_X(x_k − α d_k)

    ``d_k`` is the implicit-function-theorem hypergradient ``∇Φ(x_k)`` when ``y_{k+1} =
    y*(x_k)`` and the solve is exact (strongly convex lower level).

    Steps left ``"auto"`` (the default; docs/auto.md): β by adaptive gradient descent
    (:class:`~bilevel.auto.AdaptiveLower`, no extra oracle call), α by
    :class:`~bilevel.auto.DoG`; CG needs no step. Given numbers run the iteration above.

    Parts (``method.parts``): ``LowerGD(lr_lower, lower_steps)`` (``AdaptiveLower`` when
    auto), ``LinearSolve(solver, warm_start_v)``, ``DirectionNorm()``, ``PlainDirection()``,
    the upper optimizer of ``lr_upper`` (``DoG()`` when auto).

    Args:
        lr_upper: α: ``"auto"`` (default), a number, a schedule or an upper optimizer.
        lr_lower: β: ``"auto"`` (default) or a number.
        lower_steps: N.
        solver: :class:`~bilevel.CG` (default, K = 10), :class:`~bilevel.Neumann`,
            :class:`~bilevel.FixedPoint`, :class:`~bilevel.NormalGD` or
            :class:`~bilevel.LineSearchStep`.
        warm_start_v: start the solver from the previous ``v`` instead of 0.
        hessian_free: r, to form every ``H v`` and ``J v`` by central differences of
            gradients at ``y ± (r/‖v‖) v`` (DARTS's Hessian-free products,
            :class:`bilevel.finite_difference.HessianFree`; 2 gradients per product, error
            O(r²)); ``None`` (default): exact products from ``oracles``. With
            ``solver=bilevel.finite_difference.OneTerm(τ)`` it is the DARTS approximation.
        project_x: optional projection of x.

    Cost: N gradients of g, one gradient of f, one gradient of g with a graph, the
    solver's Hessian-vector products, one mixed product. Stationarity reported: ``‖d‖²``.

    Example:
        >>> import bilevel as bl
        >>> result = bl.solve(bl.problems.T1(n=5), bl.AID(lr_upper=0.5, lr_lower=0.5, lower_steps=30), max_iters=60)
        >>> round(float(result.x["x"][0]), 4)
        0.5
        >>> result = bl.solve(bl.problems.T1(n=5), bl.AID(), max_iters=200)   # no step size given
        >>> round(float(result.x["x"][0]), 6)
        0.5

    References: Pedregosa (ICML 2016, CG); Lorraine, Vicol & Duvenaud (AISTATS 2020,
    Neumann); Grazzi, Franceschi, Pontil & Salzo (ICML 2020, fixed point).
    """

    name: ClassVar[str] = "AID"

    lr_upper: ScheduleLike | UpperOptimizer | str = option("auto", check_auto_upper, kw_only=True)  # type: ignore[assignment]
    lr_lower: float | str = option("auto", check_auto_positive)
    lower_steps: int = option(10, check_count)
    solver: LinearSolver = field(default=CG(steps=10), metadata={"check": (check_solver, {})})
    warm_start_v: bool = option(False, check_bool)
    hessian_free: float | None = option(None, check_positive, allow_none=True)

    @cached_property
    def derivatives(self) -> Oracles:
        """``oracles``; with ``hessian_free=r``, central differences of their gradients."""
        base = self.oracles if self.oracles is not None else Oracles()
        if self.hessian_free is None:
            return base
        return HessianFree(r=self.hessian_free, gradients_from=base.gradients_from if isinstance(base, HessianFree) else base)

    def build_parts(self) -> Parts:
        steps = self.lower_steps
        return Parts(
            lower=AdaptiveLower(steps=steps) if is_auto(self.lr_lower) else LowerGD(lr=cast(float, self.lr_lower), steps=steps),
            multiplier=LinearSolve(self.solver, warm_start=self.warm_start_v),
            measure=DirectionNorm(),
            upper=auto_upper(self.lr_upper),
        )
