"""Iterative differentiation: RHG / ITD (full unroll), T-RHG (truncated) and BDA.

The hypergradient is the derivative of ``f(x, y_T(x))`` where ``y_T(x)`` is the result
of T lower-level steps from ``y_0``, obtained by back-propagating through the steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch

from .. import tree as T
from ..oracles import Oracles, _grads_or_zeros, _requires_grad_copy
from ..schedules import ScheduleLike
from ..updates import Box, UpperOptimizer, as_upper_optimizer
from ..validation import check_bool, check_count, check_positive
from .base import LowerAggregated, LowerGD, Method, State, check_common, check_weight

__all__ = ["ITD", "TRHG", "BDA"]


@dataclass(frozen=True)
class ITD(Method):
    """RHG / ITD: reverse-mode differentiation through the lower-level iterations.

    Per upper iteration k:

        y_0 = y_init (or y_k with ``warm_start``);  y_{t+1} = y_t − β ∇_y g(x_k, y_t),  t < T
        d_k = d/dx f(x, y_T(x)) |_{x = x_k}          (back-propagation through the T steps)
        x_{k+1} = Proj_X(x_k − α d_k)

    With ``truncate = K < T`` only the last K steps are differentiated (T-RHG). Memory
    grows as O(K · dim y); cost T gradients of g plus one backward through K steps.

    Args:
        lr_upper: α, a number, a schedule, or an upper optimizer (:class:`~bilevel.Adam`).
        lr_lower: β, the lower-level step.
        lower_steps: T.
        truncate: K, number of differentiated steps (``None`` = all, full RHG).
        warm_start: start the lower iterations from the previous ``y_T`` instead of the
            initial ``y``.
        project_x: optional projection of x (e.g. :class:`~bilevel.Box`).

    Stationarity reported: ``‖d‖²`` (projected if ``project_x``).

    Example:
        >>> import bilevel as bl
        >>> result = bl.solve(bl.problems.T1(n=5), bl.ITD(lr_upper=0.5, lr_lower=0.5, lower_steps=40), max_iters=50)
        >>> round(float(result.x["x"][0]), 4)
        0.5

    References: Maclaurin, Duvenaud & Adams (ICML 2015); Franceschi et al. (ICML 2017,
    2018); T-RHG: Shaban et al. (AISTATS 2019).
    """

    name: ClassVar[str] = "ITD"
    uses_multiplier: ClassVar[bool] = False

    lr_upper: Union[ScheduleLike, UpperOptimizer] = 0.1
    lr_lower: float = 0.1
    lower_steps: int = 100
    truncate: Optional[int] = None
    warm_start: bool = False
    project_x: Optional[Box] = None
    oracles: Optional[Oracles] = None

    def __post_init__(self):
        as_upper_optimizer(self.lr_upper, "lr_upper", self.name)
        check_positive(self.name, "lr_lower", self.lr_lower)
        check_count(self.name, "lower_steps", self.lower_steps)
        if isinstance(self, BDA):
            check_weight(self.name, "mu", self.mu)
            check_positive(self.name, "lr_lower_upper", self.lr_lower_upper, allow_none=True)
        self._dynamics()
        check_bool(self.name, "warm_start", self.warm_start)
        check_common(self)
        if self.truncate is not None:
            check_count(self.name, "truncate", self.truncate, minimum=1)
            if self.truncate > self.lower_steps:
                raise ValueError(f"{self.name}(truncate={self.truncate}) cannot exceed lower_steps={self.lower_steps}")

    def _upper(self):
        return as_upper_optimizer(self.lr_upper, "lr_upper", self.name)

    def _dynamics(self) -> LowerGD:
        return LowerGD(lr=self.lr_lower, steps=self.lower_steps)

    def differentiated_steps(self) -> int:
        """K, the number of lower steps back-propagated through."""
        return self.lower_steps if self.truncate is None else self.truncate

    def init_extra(self, x, y):
        return {} if self.warm_start else {"y_init": T.clone(y)}

    def step(self, problem, state: State, batch=None):
        dynamics, oracles = self._dynamics(), self._oracles()
        steps = self.lower_steps
        differentiated = self.differentiated_steps()
        y = state.y if self.warm_start else state.extra["y_init"]
        for t in range(steps - differentiated):
            y, _ = dynamics.step(problem, state.x, y, batch, t, oracles)
        x_req = _requires_grad_copy(state.x)
        x_leaves = T.leaves(x_req)
        with torch.enable_grad():
            y = _requires_grad_copy(y)
            grad_g = None
            for t in range(steps - differentiated, steps):
                y, grad_g = dynamics.differentiable_step(problem, x_req, y, batch, t)
            upper_loss = problem.upper(x_req, y, batch)
            direction = T.unflatten_like(_grads_or_zeros(upper_loss, x_leaves), state.x)
        y_final = T.detach(y)
        x, opt = self.update_x(state, direction)
        direction_sq = T.sq_norm(direction)
        stationarity = self.projected_direction_sq(state.x, direction, direction_sq)
        info = {
            "upper_loss": upper_loss.detach(),
            "lower_grad_sq": T.sq_norm(grad_g),
            "direction_sq": direction_sq,
            "stationarity": stationarity,
        }
        return state.replace(x=x, y=y_final, opt=opt, k=state.k + 1), info


@dataclass(frozen=True)
class TRHG(ITD):
    """T-RHG: :class:`ITD` differentiating only the last ``truncate`` of ``lower_steps`` steps.

    Default K = T/2, as in the sl-BAMM toy scripts (the PBGD repo uses K = 100 of T = 500).

    Reference: Shaban, Cheng, Hatch & Boots, "Truncated Back-propagation for Bilevel
    Optimization", AISTATS 2019.
    """

    name: ClassVar[str] = "T-RHG"

    def differentiated_steps(self) -> int:
        return max(1, self.lower_steps // 2) if self.truncate is None else self.truncate


@dataclass(frozen=True)
class BDA(ITD):
    """BDA: unrolled differentiation through aggregated lower dynamics.

        y_{t+1} = y_t − [(1 − μ) β ∇_y g(x, y_t) + μ β_u ∇_y f(x, y_t)],   t < T
        d_k = d/dx f(x, y_T(x)),   x_{k+1} = Proj_X(x_k − α d_k)

    The upper objective enters the lower dynamics, which selects the optimistic
    solution when the lower level has many (T2: reaches x* = 1 where RHG stops at 0.505).

    Args:
        mu: μ ∈ (0, 1), aggregation weight (a number or a schedule of the inner index t).
        lr_lower_upper: β_u, step on ``∇_y f`` (default β).
        (other arguments as :class:`ITD`.)

    Reference: Liu, Mu, Yuan, Zeng & Zhang, "A Generic First-Order Algorithmic Framework
    for Bi-Level Programming Beyond Lower-Level Singleton", ICML 2020.
    """

    name: ClassVar[str] = "BDA"

    mu: ScheduleLike = 0.1
    lr_lower_upper: Optional[float] = None

    def _dynamics(self):
        return LowerAggregated(lr=self.lr_lower, steps=self.lower_steps, mu=self.mu, lr_upper=self.lr_lower_upper)
