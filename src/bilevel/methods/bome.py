"""BOME: bilevel optimization made easy — value-function constraint, dynamic barrier, first order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch

from .. import tree as T
from ..auto import AdaptiveLower, JointAutoSteps, auto_upper, check_auto_positive, check_auto_upper, is_auto, joint_dog_step
from ..parts import LowerGD, Parts
from ..parts.value import Shadow, value_gap
from ..problem import Problem
from ..schedules import ScheduleLike
from ..state import EmptyState, State
from ..updates import UpperOptimizer
from ..validation import check_choice, check_count, check_fraction, check_nonnegative, check_positive
from .base import Assembled, option

__all__ = ["BOME"]


@dataclass(frozen=True)
class BOME(JointAutoSteps, Assembled):
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

    Steps left ``"auto"`` (the default; docs/auto.md): the shadow steps by adaptive
    gradient descent at fixed x_k (:class:`~bilevel.auto.AdaptiveLower`, β₀ = 1/λ̂ from 30
    products at ``init``, no oracle call per iteration beyond the T gradients), and one
    :class:`~bilevel.auto.DoG` step for the pair (x, y) along (d_x, d_y), the paper's joint
    descent; ``lr_lower="auto"`` with a given ``lr_upper`` (a number or schedule) takes
    β = α_k. Given numbers run the iteration above exactly.

    Args:
        lr_upper: α, the x step: ``"auto"`` (default), a number, a schedule or an upper
            optimizer (with an optimizer, give ``lr_lower`` a number).
        lr_lower: β, the y step of the joint descent: ``"auto"`` (default) or a number.
        lr_shadow: β_ŷ, the step of the T steps that estimate g*: ``"auto"`` (default) or
            a number.
        shadow_steps: T.
        eta: η > 0, the barrier parameter (the code's grid: 0.1, 0.5, 0.9).
        phi: ``"gradient"`` (φ = η‖∇q̂‖², the paper's default) or ``"value"`` (φ = η q̂, the
            authors' data-cleaning code and BOAT's ``VFO``).
        eps: ε ≥ 0 in the denominator (the authors use 1e-4 in the toy, 1e-8 in data
            cleaning; 0 gives NaN where ∇q̂ = 0).
        shadow_momentum: heavy-ball weight on the ŷ steps, restarted each iteration (0: the
            paper; BOAT's ``VFO`` uses 0.5).
        lower_steps: plain gradient steps ``y ← y − β ∇_y g`` taken before the barrier step
            (0: the paper; BOAT's ``VFO`` takes T; with ``lr_lower="auto"`` their step is
            the shadow's).
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

    lr_upper: ScheduleLike | UpperOptimizer | str = option("auto", check_auto_upper, kw_only=True)  # type: ignore[assignment]
    lr_lower: float | str = option("auto", check_auto_positive)
    lr_shadow: float | str = option("auto", check_auto_positive)
    shadow_steps: int = option(10, check_count)
    eta: float = option(0.5, check_positive)
    phi: str = option("gradient", check_choice, choices=("gradient", "value"))
    eps: float = option(1e-8, check_nonnegative)
    shadow_momentum: float = option(0.0, check_fraction)
    lower_steps: int = option(0, check_count, minimum=0)

    def build_parts(self) -> Parts:
        if is_auto(self.lr_shadow):
            if self.shadow_momentum:
                raise ValueError("BOME(lr_shadow='auto') takes no shadow_momentum (AdGD has no heavy-ball term): give lr_shadow a number")
            shadow: Any = AdaptiveLower(steps=self.shadow_steps)
        else:
            shadow = Shadow(lr=cast(float, self.lr_shadow), steps=self.shadow_steps, start="restart", momentum=self.shadow_momentum)
        self.check_joint_steps("BOME")
        # with lr_lower auto too, the step uses one DoG for the pair (x, y) instead (state "joint")
        return Parts(lower=shadow, upper=auto_upper(self.lr_upper))

    def init(self, problem: Problem, x0: Any = None, y0: Any = None, batch: Any = None, validate: bool = True) -> State:
        state = super().init(problem, x0, y0, batch, validate)
        extra = {**state.extra, **self.joint_extra(self.parts.lower, self.derivatives, problem, state.x, state.y, batch)}
        return state.replace(extra=extra)

    def step(self, problem: Problem, state: State, batch: Any = None) -> tuple[State, dict]:
        oracles, k, x, y = self.derivatives, state.k, state.x, state.y
        shadow = self.parts.lower
        if self.lower_steps:
            if is_auto(self.lr_lower):  # plain steps on g: the shadow's step, stable for g at x_k
                beta = state.extra["lower"].beta if isinstance(shadow, AdaptiveLower) else cast(float, self.lr_shadow)
                for _ in range(self.lower_steps):
                    y = T.axpy(-beta, oracles.gradient_y(problem.lower, x, y, batch)[0], y)
            else:
                y, _, _ = LowerGD(lr=cast(float, self.lr_lower), steps=self.lower_steps).run(problem, x, y, batch, oracles)
        y_hat, _, shadow_state = shadow.run(problem, x, y, batch, oracles, state.extra.get("lower", EmptyState()), k)
        grad_x_f, grad_y_f, upper_loss = oracles.gradients(problem.upper, x, y, batch)
        grad_x_q, grad_y_q, gap = value_gap(oracles, problem.lower, x, y, y_hat, batch)
        grad_x_q_sq, grad_y_q_sq = T.sq_norms(grad_x_q, grad_y_q)  # one fused kernel
        gap_sq = grad_x_q_sq + grad_y_q_sq
        dot = T.vdot(grad_x_f, grad_x_q) + T.vdot(grad_y_f, grad_y_q)
        if self.phi == "gradient":
            lam = torch.clamp(self.eta - dot / (gap_sq + self.eps), min=0.0)
        else:
            lam = torch.clamp((self.eta * gap - dot) / (gap_sq + self.eps), min=0.0)
        d_x, d_y = T.axpys(lam, (grad_x_q, grad_x_f), (grad_y_q, grad_y_f))
        d_x_sq, d_y_sq = T.sq_norms(d_x, d_y)
        direction_sq = d_x_sq + d_y_sq
        stationarity = self.projected_direction_sq(x, d_x, d_x_sq) + d_y_sq + torch.clamp(gap, min=0.0)
        info = {
            "upper_loss": upper_loss,
            "lower_grad_sq": grad_y_q_sq,
            "direction_sq": direction_sq,
            "constraint": gap,
            "multiplier": lam,
            "stationarity": stationarity,
        }
        extra = {**state.extra, "lower": shadow_state}
        if self.joint_auto:  # one DoG step along (d_x, d_y): the paper's joint descent, scale-free
            x_next, y_next, extra["joint"], step = joint_dog_step(x, y, d_x, d_y, state.extra["joint"], k, self.parts.projection)
            opt = state.opt
            info["lr_upper"] = info["lr_lower"] = step
        else:
            x_next, opt, extra["direction"] = self.update_x(x, d_x, state)
            beta = self.lower_step(k)
            y_next = T.axpy(-beta, d_y, y)
        if isinstance(shadow, AdaptiveLower):
            info["lr_shadow"] = shadow_state.beta
        return State(x=x_next, y=y_next, v=None, opt=opt, k=k + 1, extra=extra), info
