"""BOME: bilevel optimization made easy — value-function constraint, dynamic barrier, first order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import tree as T
from ..parts import LowerGD, Parts
from ..parts.value import Shadow, value_gap
from ..problem import Problem
from ..schedules import ScheduleLike
from ..state import EmptyState, State
from ..updates import UpperOptimizer
from ..validation import check_choice, check_count, check_fraction, check_nonnegative, check_positive
from .base import Assembled, option, upper_option

__all__ = ["BOME"]


@dataclass(frozen=True)
class BOME(Assembled):
    """BOME (Liu, Ye, Wright, Stone & Liu, NeurIPS 2022): the bilevel problem as
    ``min_{x,y} f(x, y)  s.t.  q(x, y) = g(x, y) − g*(x) ≤ 0`` solved by dynamic-barrier
    gradient descent, with ``g*(x)`` estimated by T lower steps. First order: no Hessian
    or mixed product.

    Per iteration k, at ``(x_k, y_k)``::

        ŷ_0 = y_k,  ŷ_{t+1} = ŷ_t − β_ŷ ∇_y g(x_k, ŷ_t),  t < T       (restarted, then discarded)
        q̂   = g(x, y) − g(x, ŷ_T),   ∇q̂ = (∇_x g(x, y) − ∇_x g(x, ŷ_T),  ∇_y g(x, y))    (ŷ_T constant)
        λ_k = max(η − ⟨∇f, ∇q̂⟩ / (‖∇q̂‖² + ε), 0)                     (phi="gradient": φ = η‖∇q̂‖²)
           or max((η q̂ − ⟨∇f, ∇q̂⟩) / (‖∇q̂‖² + ε), 0)                 (phi="value":    φ = η q̂)
        d   = ∇f + λ_k ∇q̂
        x_{k+1} = Proj_X(x_k − α d_x),   y_{k+1} = y_k − β d_y

    ``⟨d, ∇q̂⟩ ≥ φ`` (up to ε): the step never increases the estimated gap faster than the
    barrier allows, and λ = 0 (a plain descent step on f) whenever ∇f already decreases q̂.

    Stationarity reported: BOME's KKT-type measure ``‖d‖² + max(q̂, 0)`` (``‖d_x‖`` projected
    when ``project_x``), with ``constraint`` = q̂ and ``multiplier`` = λ_k.

    Parts (``method.parts``): ``lower`` = :class:`~bilevel.parts.Shadow` (``lr_shadow``,
    ``shadow_steps``, ``start="restart"``, ``momentum=shadow_momentum``) — the ŷ steps; the
    value-gap gradient :func:`~bilevel.parts.value_gap`; ``PlainDirection()``, the upper
    optimizer of ``lr_upper``.

    Args:
        lr_upper: α, the x step (a number, a schedule or an upper optimizer).
        lr_lower: β, the y step of the joint descent.
        lr_shadow: β_ŷ, the step of the T steps that estimate g*.
        shadow_steps: T.
        eta: η > 0, the barrier parameter (the code's grid: 0.1, 0.5, 0.9).
        phi: ``"gradient"`` (φ = η‖∇q̂‖², the paper's default) or ``"value"`` (φ = η q̂, the
            authors' data-cleaning code and BOAT's ``VFO``).
        eps: ε ≥ 0 in the denominator (the authors use 1e-4 in the toy, 1e-8 in data
            cleaning; 0 gives NaN where ∇q̂ = 0).
        shadow_momentum: heavy-ball weight on the ŷ steps, restarted each iteration (0: the
            paper; BOAT's ``VFO`` uses 0.5).
        lower_steps: plain gradient steps ``y ← y − β ∇_y g`` taken before the barrier step
            (0: the paper; BOAT's ``VFO`` takes T).
        project_x: optional projection of x.

    Cost per iteration: T + ``lower_steps`` gradients of g in y, one gradient of f, one
    backward of the value gap (two forwards of g). No second-order product.

    Example:
        >>> import bilevel as bl
        >>> method = bl.BOME(lr_upper=0.2, lr_lower=0.5, lr_shadow=0.5, shadow_steps=20, eta=0.5)
        >>> result = bl.solve(bl.problems.T1(n=5), method, max_iters=1000)
        >>> round(float(result.x["x"][0]), 3)
        0.5

    Reference: Bo Liu, Mao Ye, Stephen Wright, Peter Stone, Qiang Liu, "BOME! Bilevel
    Optimization Made Easy: A Simple First-Order Approach", NeurIPS 2022, arXiv:2209.08709.
    """

    name: ClassVar[str] = "BOME"
    stationarity_doc: ClassVar[str] = "‖∇f + λ∇q̂‖² + q̂ (KKT-type measure of min f s.t. q ≤ 0)"
    uses_multiplier: ClassVar[bool] = False

    lr_upper: ScheduleLike | UpperOptimizer = upper_option(0.05)
    lr_lower: float = option(0.05, check_positive)
    lr_shadow: float = option(0.05, check_positive)
    shadow_steps: int = option(10, check_count)
    eta: float = option(0.5, check_positive)
    phi: str = option("gradient", check_choice, choices=("gradient", "value"))
    eps: float = option(1e-8, check_nonnegative)
    shadow_momentum: float = option(0.0, check_fraction)
    lower_steps: int = option(0, check_count, minimum=0)

    def build_parts(self) -> Parts:
        return Parts(lower=Shadow(lr=self.lr_shadow, steps=self.shadow_steps, start="restart", momentum=self.shadow_momentum))

    def step(self, problem: Problem, state: State, batch: Any = None) -> tuple[State, dict]:
        oracles, k, x, y = self.derivatives, state.k, state.x, state.y
        if self.lower_steps:
            y, _, _ = LowerGD(lr=self.lr_lower, steps=self.lower_steps).run(problem, x, y, batch, oracles)
        shadow = self.parts.lower
        y_hat, _, shadow_state = shadow.run(problem, x, y, batch, oracles, state.extra.get("lower", EmptyState()), k)
        grad_x_f, grad_y_f, upper_loss = oracles.gradients(problem.upper, x, y, batch)
        grad_x_q, grad_y_q, gap = value_gap(oracles, problem.lower, x, y, y_hat, batch)
        gap_sq = T.sq_norm(grad_x_q) + T.sq_norm(grad_y_q)
        dot = T.vdot(grad_x_f, grad_x_q) + T.vdot(grad_y_f, grad_y_q)
        if self.phi == "gradient":
            lam = torch.clamp(self.eta - dot / (gap_sq + self.eps), min=0.0)
        else:
            lam = torch.clamp((self.eta * gap - dot) / (gap_sq + self.eps), min=0.0)
        d_x = T.axpy(lam, grad_x_q, grad_x_f)
        d_y = T.axpy(lam, grad_y_q, grad_y_f)
        d_y_sq = T.sq_norm(d_y)
        direction_sq = T.sq_norm(d_x) + d_y_sq
        stationarity = self.projected_direction_sq(x, d_x) + d_y_sq + torch.clamp(gap, min=0.0)
        info = {
            "upper_loss": upper_loss,
            "lower_grad_sq": T.sq_norm(grad_y_q),
            "direction_sq": direction_sq,
            "constraint": gap,
            "multiplier": lam,
            "stationarity": stationarity,
        }
        x_next, opt, direction_state = self.update_x(x, d_x, state)
        y_next = T.axpy(-self.lr_lower, d_y, y)
        extra = {**state.extra, "lower": shadow_state, "direction": direction_state}
        return State(x=x_next, y=y_next, v=None, opt=opt, k=k + 1, extra=extra), info
