"""Approximate implicit differentiation (AID) with a matrix-free linear solver."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

from .. import tree as T
from ..linsolve import CG, LinearSolver
from ..oracles import Oracles
from ..schedules import ScheduleLike
from ..updates import Box, UpperOptimizer, as_upper_optimizer
from ..validation import ArgumentTypeError, check_bool, check_count, check_positive, describe
from .base import LowerGD, Method, State, check_common

__all__ = ["AID"]


@dataclass(frozen=True)
class AID(Method):
    """AID: lower-level steps, then the implicit hypergradient through a linear solve.

    Per upper iteration k (warm-started ``y``):

        y_{k+1} = N steps of  y ← y − β ∇_y g(x_k, y)          from y_k
        v_{k+1} ≈ H⁻¹ ∇_y f,   H = ∇²_yy g(x_k, y_{k+1})        (``solver``, from 0 or v_k)
        d_k = ∇_x f(x_k, y_{k+1}) − J v_{k+1},   J = ∇²_xy g(x_k, y_{k+1})
        x_{k+1} = Proj_X(x_k − α d_k)

    ``d_k`` is the implicit-function-theorem hypergradient ``∇Φ(x_k)`` when ``y_{k+1} =
    y*(x_k)`` and the solve is exact (strongly convex lower level).

    Args:
        lr_upper: α, a number, a schedule or an upper optimizer.
        lr_lower: β.
        lower_steps: N.
        solver: :class:`~bilevel.CG` (default, K = 10), :class:`~bilevel.Neumann`,
            :class:`~bilevel.FixedPoint`, :class:`~bilevel.NormalGD` or
            :class:`~bilevel.LineSearchStep`.
        warm_start_v: start the solver from the previous ``v`` instead of 0.
        project_x: optional projection of x.

    Cost: N gradients of g, one gradient of f, one gradient of g with a graph, the
    solver's Hessian-vector products, one mixed product. Stationarity reported: ``‖d‖²``.

    Example:
        >>> import bilevel as bl
        >>> result = bl.solve(bl.problems.T1(n=5), bl.AID(lr_upper=0.5, lr_lower=0.5, lower_steps=30), max_iters=60)
        >>> round(float(result.x["x"][0]), 4)
        0.5

    References: Pedregosa (ICML 2016, CG); Lorraine, Vicol & Duvenaud (AISTATS 2020,
    Neumann); Grazzi, Franceschi, Pontil & Salzo (ICML 2020, fixed point).
    """

    name: ClassVar[str] = "AID"

    lr_upper: Union[ScheduleLike, UpperOptimizer] = 0.1
    lr_lower: float = 0.1
    lower_steps: int = 10
    solver: LinearSolver = CG(steps=10)
    warm_start_v: bool = False
    project_x: Optional[Box] = None
    oracles: Optional[Oracles] = None

    def __post_init__(self):
        as_upper_optimizer(self.lr_upper, "lr_upper", "AID")
        check_positive("AID", "lr_lower", self.lr_lower)
        check_count("AID", "lower_steps", self.lower_steps)
        if not isinstance(self.solver, LinearSolver):
            raise ArgumentTypeError(
                f"{describe('AID', 'solver', self.solver)} must be a linear solver such as bilevel.CG(steps=10), "
                f"not a {type(self.solver).__name__}"
            )
        check_bool("AID", "warm_start_v", self.warm_start_v)
        check_common(self)

    def _upper(self):
        return as_upper_optimizer(self.lr_upper, "lr_upper", "AID")

    def step(self, problem, state: State, batch=None):
        oracles = self._oracles()
        x = state.x
        y, _ = LowerGD(lr=self.lr_lower, steps=self.lower_steps).run(problem, x, state.y, batch, oracles)
        grad_x_f, grad_y_f, upper_loss = oracles.gradients(problem.upper, x, y, batch)
        lin = oracles.linearize(problem.lower, x, y, batch)
        solve = self.solver(lin.hvp, grad_y_f, state.v if self.warm_start_v else None)
        direction = T.sub(grad_x_f, lin.mixed(solve.v))
        new_x, opt = self.update_x(state, direction)
        direction_sq = T.sq_norm(direction)
        info = {
            "upper_loss": upper_loss,
            "lower_grad_sq": T.sq_norm(lin.grad_y),
            "direction_sq": direction_sq,
            "linsys_residual_sq": solve.residual_sq,
            "stationarity": self.projected_direction_sq(x, direction, direction_sq),
        }
        return state.replace(x=new_x, y=y, v=solve.v, opt=opt, k=state.k + 1), info
