"""V-PBGD and G-PBGD: penalized bilevel gradient descent on the value gap or on ‖∇_y g‖²."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, cast

import torch

from .. import tree as T
from ..auto import AdaptiveLower, JointAutoSteps, auto_upper, check_auto_positive, check_auto_upper, is_auto, joint_dog_step
from ..parts import Parts
from ..parts.value import Penalty, Shadow, check_penalty, value_gap
from ..problem import Problem
from ..schedules import ScheduleLike
from ..state import EmptyState, State
from ..updates import UpperOptimizer
from ..validation import check_bool, check_choice, check_count
from .base import Assembled, option

__all__ = ["PBGD"]


@dataclass(frozen=True)
class PBGD(JointAutoSteps, Assembled):
    """PBGD (Shen & Chen, ICML 2023): gradient descent on the penalised problem
    ``min_{x,y} f(x, y) + γ_k p(x, y)`` whose penalty p controls the distance of y to the
    lower solution set (g PL in y, or quadratic growth).

    ``variant="value"`` (V-PBGD), ``p = g(x, y) − g*(x)`` with g* from a persistent
    shadow ω::

        ω ← T steps of  ω − β_ω ∇_y g(x_k, ω)                      (warm-started)
        d_x = s(γ_k) [∇_x f + γ_k (∇_x g(x, y) − ∇_x g(x, ω))]
        d_y = s(γ_k) [∇_y f + γ_k ∇_y g(x, y)]
        x_{k+1} = Proj_X(x_k − α d_x),   y_{k+1} = y_k − β d_y

    ``variant="gradient"`` (G-PBGD), ``p = ½‖∇_y g(x, y)‖²``, no shadow::

        d_x = s(γ_k) [∇_x f + γ_k J ∇_y g],   d_y = s(γ_k) [∇_y f + γ_k H ∇_y g]

    (one ``(J u, H u)`` pass with ``u = ∇_y g``: second order, unlike V-PBGD).
    ``s(γ) = min(1, 1/γ)`` when ``normalise`` (the code's step normaliser), else 1.

    **Bias.** The penalised problem's stationary points are O(1/γ) away from the bilevel
    solution. On a quadratic (``g = ½yᵀAy − xᵀBy``, f with ``∇²_yy f = Q_f``) the rest point
    of V-PBGD solves the implicit equation with ``A`` replaced by ``A + Q_f/γ`` and G-PBGD
    with ``A + A⁻¹Q_f/γ`` (tested on T1g, docs/methods/pbgd.md#bias-as-a-function-of-the-penalty).
    An increasing ``gamma`` schedule removes the bias; a decreasing one is refused.

    Stationarity reported: ``‖x − Proj(x − d_x)‖² + ‖d_y‖²``, the squared projected
    gradient of the (normalised) penalised objective, with ``penalty`` = γ_k,
    ``constraint`` = p (the value gap ``g(x, y) − g(x, ω)`` or ``½‖∇_y g‖²``).

    Parts (``method.parts``): ``lower`` = ``Shadow(lr_shadow, shadow_steps,
    start="persistent")`` (ω; V-PBGD — unused by G-PBGD), the penalty controller
    ``method.penalty`` = :class:`~bilevel.parts.Penalty` (``gamma``, ``normalise``),
    ``PlainDirection()``, the upper optimizer of ``lr_upper``.

    Args:
        variant: ``"value"`` (V-PBGD) or ``"gradient"`` (G-PBGD).
        gamma: γ, the penalty: a number ≥ 0 or a nondecreasing schedule (the code's linear
            ramp is ``bilevel.schedules.Linear(gamma_init, gamma_max, gamma_argmax_step)``).
        normalise: scale the step by ``s(γ) = min(1, 1/γ)`` (the code; True).
        lr_upper: α, the x step: ``"auto"`` (default), a number, a schedule or an upper
            optimizer (with an optimizer, give ``lr_lower`` a number).
        lr_lower: β, the y step: ``"auto"`` (default; β = α_k with a given ``lr_upper``,
            one :class:`~bilevel.auto.DoG` step for the pair (x, y) when both are auto)
            or a number.
        lr_shadow: β_ω, the shadow step (V-PBGD): ``"auto"`` (default: AdGD at fixed x_k,
            :class:`~bilevel.auto.AdaptiveLower`, ω kept in the state) or a number.
        shadow_steps: T, shadow steps per iteration (the code: 1).
        project_x: optional projection of x (the toy's X = [0, 3]).

    Cost per iteration: V-PBGD T gradients of g in y, one gradient of f, one backward of
    the value gap; G-PBGD one gradient of f, one gradient of g with a graph and one
    ``(J u, H u)`` pass.

    Example:
        >>> import bilevel as bl
        >>> method = bl.PBGD(gamma=100.0, lr_upper=0.5, lr_lower=0.5, lr_shadow=0.5, shadow_steps=5)
        >>> result = bl.solve(bl.problems.T1(n=5), method, max_iters=3000)
        >>> round(float(result.x["x"][0]), 4)   # the O(1/γ) bias on T1: (1 + γ)/(1 + 2γ), x* = 0.5
        0.5025

    Reference: Han Shen, Tianyi Chen, "On Penalty-based Bilevel Gradient Descent Method",
    ICML 2023, arXiv:2302.05185.
    """

    name: ClassVar[str] = "PBGD"
    stationarity_doc: ClassVar[str] = "‖x − Proj(x − d_x)‖² + ‖d_y‖² of the penalised objective"
    uses_multiplier: ClassVar[bool] = False

    variant: str = option("value", check_choice, choices=("value", "gradient"))
    gamma: ScheduleLike = option(10.0, check_penalty)
    normalise: bool = option(True, check_bool)
    lr_upper: ScheduleLike | UpperOptimizer | str = option("auto", check_auto_upper, kw_only=True)  # type: ignore[assignment]
    lr_lower: float | str = option("auto", check_auto_positive)
    lr_shadow: float | str = option("auto", check_auto_positive)
    shadow_steps: int = option(1, check_count)

    def build_parts(self) -> Parts:
        self.check_joint_steps("PBGD")
        shadow: Any
        if is_auto(self.lr_shadow) and self.variant == "value":
            shadow = AdaptiveLower(steps=self.shadow_steps)
        else:  # G-PBGD has no shadow: an auto β_ω is never used
            shadow = Shadow(lr=1.0 if is_auto(self.lr_shadow) else cast(float, self.lr_shadow), steps=self.shadow_steps, start="persistent")
        return Parts(lower=shadow, upper=auto_upper(self.lr_upper))

    def init(self, problem: Problem, x0: Any = None, y0: Any = None, batch: Any = None, validate: bool = True) -> State:
        state = super().init(problem, x0, y0, batch, validate)
        extra = {**state.extra, **self.joint_extra(self.parts.lower, self.derivatives, problem, state.x, state.y, batch)}
        if isinstance(self.parts.lower, AdaptiveLower):  # the persistent shadow ω, next to its AdGD state
            extra["omega"] = T.clone(state.y)
        return state.replace(extra=extra)

    @cached_property
    def penalty(self) -> Penalty:
        """The penalty controller γ_k (built once)."""
        return Penalty(self.gamma, normalise=self.normalise)

    def step(self, problem: Problem, state: State, batch: Any = None) -> tuple[State, dict]:
        oracles, k, x, y = self.derivatives, state.k, state.x, state.y
        gamma, scale = self.penalty(k), self.penalty.scale(k)
        shadow_state = state.extra.get("lower", EmptyState())
        shadow_info: dict = {}
        grad_x_f, grad_y_f, upper_loss = oracles.gradients(problem.upper, x, y, batch)
        extra = dict(state.extra)
        if self.variant == "value":
            if isinstance(self.parts.lower, AdaptiveLower):  # ω persists in the state next to its AdGD step
                omega, _, shadow_state = self.parts.lower.run(problem, x, state.extra["omega"], batch, oracles, shadow_state, k)
                extra["omega"] = omega
                shadow_info = {"lr_shadow": shadow_state.beta}
            else:
                omega, _, shadow_state = self.parts.lower.run(problem, x, y, batch, oracles, shadow_state, k)
            grad_x_p, grad_y_p, constraint = value_gap(oracles, problem.lower, x, y, omega, batch)
            lower_grad = grad_y_p
        else:
            lin = oracles.linearize(problem.lower, x, y, batch)
            grad_x_p, grad_y_p = lin.both(lin.grad_y)  # J ∇_y g, H ∇_y g: the gradient of ½‖∇_y g‖²
            lower_grad = lin.grad_y
        # (d_x, d_y) = scale (∇f + γ ∇p), and the squared norms of the diagnostics: one fused kernel each
        d_x, d_y = T.scales(scale, *T.axpys(gamma, (grad_x_p, grad_x_f), (grad_y_p, grad_y_f)))
        lower_grad_sq, d_x_sq, d_y_sq = T.sq_norms(lower_grad, d_x, d_y)
        if self.variant != "value":
            constraint = 0.5 * lower_grad_sq
        info = {
            "upper_loss": upper_loss,
            "lower_grad_sq": lower_grad_sq,
            "direction_sq": d_x_sq + d_y_sq,
            "constraint": constraint,
            "penalty": torch.scalar_tensor(gamma, dtype=upper_loss.dtype, device=upper_loss.device),
            "stationarity": self.projected_direction_sq(x, d_x, d_x_sq) + d_y_sq,
        }
        extra["lower"] = shadow_state
        info.update(shadow_info)
        if self.joint_auto:  # one DoG step for (x, y) along the penalised gradient
            x_next, y_next, extra["joint"], step = joint_dog_step(x, y, d_x, d_y, state.extra["joint"], k, self.parts.projection)
            opt = state.opt
            info["lr_upper"] = info["lr_lower"] = step
        else:
            x_next, opt, extra["direction"] = self.update_x(x, d_x, state)
            y_next = T.axpy(-self.lower_step(k), d_y, y)
        return State(x=x_next, y=y_next, v=None, opt=opt, k=k + 1, extra=extra), info
