"""MEHA: Moreau-envelope based single-loop Hessian-free bilevel algorithm."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, cast

import torch

from .. import tree as T
from ..auto import AdaptiveLower, DoG, adaptive_start, auto_upper, check_auto_positive, check_auto_upper, is_auto, upper_step
from ..parts import Parts
from ..parts.value import Shadow
from ..problem import Problem
from ..schedules import Polynomial, ScheduleLike
from ..state import EmptyState, State
from ..tree import Tree
from ..updates import UpperOptimizer
from ..validation import check_choice, check_count, check_number, check_positive
from .base import Assembled, option

__all__ = ["MEHA"]


def _check_power(owner: str, name: str, value: Any) -> Any:
    return check_number(
        owner, name, value, low=0.0, high=0.5, high_open=True, expected="a number in [0, 0.5) (c_k = c0 (k+1)^p; the theory needs p < 1/2)"
    )


class _Proximal:
    """The objective of MEHA's shadow, ``θ ↦ g(x, θ) + ‖θ − y_k‖²/(2γ)`` with the anchor
    y_k constant, as the ``lower`` of a problem (what :class:`~bilevel.auto.AdaptiveLower`
    descends when ``lr_shadow="auto"``)."""

    def __init__(self, problem: Problem, anchor: Tree, gamma: float):
        self.upper, self._lower = problem.upper, problem.lower
        self._anchor, self._half_inv_gamma = T.leaves(T.detach(anchor)), 0.5 / gamma

    def lower(self, x: Tree, theta: Tree, batch: Any) -> torch.Tensor:
        distance_sq = sum(((t - a) ** 2).sum() for t, a in zip(T.leaves(theta), self._anchor, strict=True))
        return self._lower(x, theta, batch) + self._half_inv_gamma * distance_sq


@dataclass(frozen=True)
class MEHA(Assembled):
    """MEHA (Liu, Liu, Yao, Zeng & Zhang, ICML 2024): the lower level through its Moreau
    envelope ``e_γ(x, y) = min_θ g(x, θ) + ‖θ − y‖²/(2γ)``, single loop, first order, no
    lower-level convexity assumed (g weakly convex in y, γ below the inverse modulus).

    The reformulation ``min f s.t. g(x, y) − e_γ(x, y) ≤ 0`` (feasible set: the lower
    stationary points) is penalised as ``f/c_k + g − e_γ`` with ``c_k = c₀ (k+1)^p``.
    Using ``∇_y e_γ = (y − θ*)/γ`` and ``∇_x e_γ = ∇_x g(x, θ*)``, per iteration k::

        θ_{k+1} = θ_k − η [∇_y g(x_k, θ_k) + (θ_k − y_k)/γ]                (T steps, persistent)
        d_y     = ∇_y f(x, y)/c_k + ∇_y g(x, y) − (y − θ_{k+1})/γ
        d_x     = ∇_x f(x, y)/c_k + ∇_x g(x, y) − ∇_x g(x, θ_{k+1})
        y_{k+1} = y_k − β d_y,     x_{k+1} = Proj_X(x_k − α d_x)

    ``order`` says where d_x and d_y are evaluated: ``"jacobi"`` (default; both at
    ``(x_k, y_k)``), ``"y_first"`` (d_y at ``(x_k, y_k)``, then d_x at ``(x_k, y_{k+1})``:
    BOAT's ``MESO``) or ``"x_first"`` (d_x at ``(x_k, y_k)``, then d_y at ``(x_{k+1}, y_k)``).

    **Bias.** With c fixed (``p = 0``) the rest point is a stationary point of
    ``f + c (g − e_γ)``; on a quadratic lower level ``g − e_γ = (γ/2) ∇_y gᵀ(I + γH)⁻¹∇_y g``,
    so MEHA interpolates the value-gap (γ → ∞) and gradient-norm (γ → 0) penalties, with
    an O(1/c) bias (tested on T1g, docs/methods/meha.md#bias-as-a-function-of-c). ``p > 0``
    removes it as ``c_k`` grows, while the weight of f in the step decays like ``k^{-p}``.

    Stationarity reported: ``‖x − Proj(x − d_x)‖² + ‖d_y‖²`` (the residual of the
    penalised problem with θ in place of θ*), with ``moreau_gap`` =
    ``g(x, y) − g(x, θ) − ‖θ − y‖²/(2γ)`` (≈ g − e_γ ≥ 0) and ``penalty`` = c_k.

    Parts (``method.parts``): ``lower`` = ``Shadow(lr_shadow, shadow_steps,
    start="persistent", gamma=gamma)`` (θ), the schedule ``method.penalty_schedule`` =
    ``Polynomial(c0, −p)``, ``PlainDirection()``, the upper optimizer of ``lr_upper``.

    Steps left ``"auto"`` (the default; docs/auto.md): η by adaptive gradient descent on
    the shadow's proximal objective at fixed ``(x_k, y_k)`` (:class:`~bilevel.auto.AdaptiveLower`,
    η₀ = 1/λ̂ of ``H + I/γ`` from 30 products at ``init``, θ kept in the state), and one
    :class:`~bilevel.auto.DoG` for x and one for y, y's step bounded by η (d_y holds
    ``−(y − θ)/γ``: y sees the curvature of the shadow's objective and must not outrun θ).
    Numbers run the iteration above exactly.

    Args:
        lr_upper: α, the x step: ``"auto"`` (default), a number, a schedule or an upper
            optimizer.
        lr_lower: β, the y step: ``"auto"`` (default: a DoG of its own, bounded by η) or a
            number.
        lr_shadow: η, the θ step: ``"auto"`` (default) or a number.
        shadow_steps: θ steps per iteration (1 in the paper).
        gamma: γ > 0, the Moreau-envelope parameter (BOAT's ``gamma_1`` is 1/γ).
        c0: c₀ > 0.
        p: the growth exponent of ``c_k``, in [0, 1/2) (0: a fixed penalty).
        order: ``"jacobi"``, ``"y_first"`` or ``"x_first"``.
        project_x: optional projection of x.

    Cost per iteration: T gradients of g in y (θ), then, ``"jacobi"``: one backward of
    ``f/c + g(x, y) − g(x, θ)`` (both blocks); the Gauss–Seidel orders: one backward for
    each block, into that block only (the y-block does not evaluate ``g(x, θ)``, which has no
    y-gradient). No second-order product.

    Example:
        >>> import bilevel as bl
        >>> method = bl.MEHA(lr_upper=0.3, lr_lower=0.3, lr_shadow=0.5, gamma=1.0, c0=2.0, p=0.0)
        >>> result = bl.solve(bl.problems.T1(n=5), method, max_iters=1500)
        >>> round(float(result.x["x"][0]), 4)   # the O(1/c) bias on T1: (1/c + 1/2)/(1/c + 1), x* = 0.5
        0.6667

    Reference: Risheng Liu, Zhu Liu, Wei Yao, Shangzhi Zeng, Jin Zhang, "Moreau Envelope
    for Nonconvex Bi-Level Optimization: A Single-loop and Hessian-free Solution
    Strategy", ICML 2024, arXiv:2405.09927.
    """

    name: ClassVar[str] = "MEHA"
    stationarity_doc: ClassVar[str] = "‖x − Proj(x − d_x)‖² + ‖d_y‖² of f/c_k + g − e_γ"
    uses_multiplier: ClassVar[bool] = False

    lr_upper: ScheduleLike | UpperOptimizer | str = option("auto", check_auto_upper, kw_only=True)  # type: ignore[assignment]
    lr_lower: float | str = option("auto", check_auto_positive)
    lr_shadow: float | str = option("auto", check_auto_positive)
    shadow_steps: int = option(1, check_count)
    gamma: float = option(10.0, check_positive)
    c0: float = option(0.2, check_positive)
    p: float = option(0.25, _check_power)
    order: str = option("jacobi", check_choice, choices=("jacobi", "y_first", "x_first"))

    def build_parts(self) -> Parts:
        shadow: Any
        if is_auto(self.lr_shadow):
            shadow = AdaptiveLower(steps=self.shadow_steps)
        else:
            shadow = Shadow(lr=cast(float, self.lr_shadow), steps=self.shadow_steps, start="persistent", gamma=self.gamma)
        return Parts(lower=shadow, upper=auto_upper(self.lr_upper))

    @property
    def separate_lower_dog(self) -> bool:
        """A DoG of its own for y (``lr_lower="auto"``, whatever x's step), bounded by the shadow step η."""
        return is_auto(self.lr_lower)

    def init(self, problem: Problem, x0: Any = None, y0: Any = None, batch: Any = None, validate: bool = True) -> State:
        state = super().init(problem, x0, y0, batch, validate)
        extra = dict(state.extra)
        if isinstance(self.parts.lower, AdaptiveLower):  # θ persists next to its AdGD state; η₀ = 1/λ̂(H + I/γ)
            hvp, inv_gamma = self.derivatives.linearize(problem.lower, state.x, state.y, batch).hvp, 1.0 / self.gamma
            extra["lower"] = adaptive_start(self.parts.lower, lambda u: T.axpy(inv_gamma, u, hvp(u)), state.y)
            extra["theta"] = T.clone(state.y)
        if self.separate_lower_dog:
            extra["lower_dog"] = DoG().init(state.y)
        return state.replace(extra=extra)

    def _shadow(self, problem: Problem, x: Tree, y: Tree, batch: Any, extra: dict, k: int) -> tuple[Tree, dict, dict]:
        """θ_{k+1} and the states it updates (and ``lr_shadow`` as a diagnostic when auto)."""
        lower = self.parts.lower
        if isinstance(lower, AdaptiveLower):
            proximal = cast(Problem, _Proximal(problem, y, self.gamma))  # the one objective AdaptiveLower reads: .lower
            theta, _, lower_state = lower.run(proximal, x, extra["theta"], batch, self.derivatives, extra["lower"], k)
            return theta, {"lower": lower_state, "theta": theta}, {"lr_shadow": lower_state.beta}
        theta, _, shadow_state = lower.run(problem, x, y, batch, self.derivatives, extra.get("lower", EmptyState()), k)
        return theta, {"lower": shadow_state}, {}

    def _shadow_step(self, extra: dict, like: Tree) -> torch.Tensor:
        """η, the θ step in use: the bound on an auto y step. d_y holds ``−(y − θ)/γ``, so y
        sees the curvature of θ's objective ``g + ‖θ − y‖²/(2γ)`` (at least 1/γ, whatever the
        scale of g) and must not outrun the shadow that tracks it."""
        lower = self.parts.lower
        if isinstance(lower, AdaptiveLower):
            return cast(torch.Tensor, extra["lower"].beta)
        leaf = T.leaves(like)[0]
        return torch.tensor(float(cast(float, self.lr_shadow)), dtype=leaf.dtype, device=leaf.device)

    def _move_y(self, y: Tree, d_y: Tree, extra: dict, k: int, info: dict) -> Tree:
        """y − β d_y: the given β, or y's own DoG bounded by η (``lr_lower="auto"``)."""
        if self.separate_lower_dog:
            dog, cap = DoG(), self._shadow_step(extra, d_y)
            y_next, extra["lower_dog"] = dog.update(y, d_y, extra["lower_dog"], k, cap)
            info["lr_lower"] = torch.minimum(dog.step_size(extra["lower_dog"]), cap)
            return y_next
        return T.axpy(-cast(float, self.lr_lower), d_y, y)

    @cached_property
    def penalty_schedule(self) -> Polynomial:
        """``c_k = c₀ (k+1)^p``."""
        return Polynomial(self.c0, -self.p)

    def _gradients(
        self, problem: Problem, x: Tree, y: Tree, theta: Tree, batch: Any, c: float, block: str
    ) -> tuple[Tree, Tree, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """``(∇_x h, ∇_y h, (f, g(x, y), g(x, θ)))`` of ``h = f/c + g(x, y) − g(x, θ)`` (θ
        constant) by one backward pass into the block(s) asked for: ``"xy"``, ``"x"`` (∇_y h
        is ``None``) or ``"y"`` (∇_x h is ``None``; ``g(x, θ)`` has no y-gradient, so it is
        not evaluated and its value is ``None``)."""
        values: list[torch.Tensor] = []
        shadow = T.detach(theta)

        def penalised(xx: Tree, yy: Tree, bb: Any) -> torch.Tensor:
            upper, lower = problem.upper(xx, yy, bb), problem.lower(xx, yy, bb)
            values.extend((upper.detach(), lower.detach()))
            if block == "y":
                return upper / c + lower
            lower_at_shadow = problem.lower(xx, shadow, bb)
            values.append(lower_at_shadow.detach())
            return upper / c + lower - lower_at_shadow

        oracles = self.derivatives
        if block == "y":
            grad_y, _ = oracles.gradient_y(penalised, x, y, batch)
            return None, grad_y, (values[0], values[1], None)
        if block == "x":  # y held constant: the same gradient oracle with the roles swapped
            grad_x, _ = oracles.gradient_y(lambda yy, xx, bb: penalised(xx, yy, bb), y, x, batch)
            return grad_x, None, (values[0], values[1], values[2])
        grad_x, grad_y, _ = oracles.gradients(penalised, x, y, batch)
        return grad_x, grad_y, (values[0], values[1], values[2])

    def step(self, problem: Problem, state: State, batch: Any = None) -> tuple[State, dict]:
        k, x, y = state.k, state.x, state.y
        c, inv_gamma = float(self.penalty_schedule(k)), 1.0 / self.gamma
        extra = dict(state.extra)
        theta, shadow_extra, auto_info = self._shadow(problem, x, y, batch, extra, k)
        extra.update(shadow_extra)
        y_minus_theta = T.sub(y, theta)  # the proximal term's direction, and (negated) the gap's θ − y
        opt = state.opt
        if self.order == "jacobi":
            d_x, grad_y, (upper_loss, g_y, g_theta) = self._gradients(problem, x, y, theta, batch, c, "xy")
            d_y = T.axpy(-inv_gamma, y_minus_theta, grad_y)
            y_next = self._move_y(y, d_y, extra, k, auto_info)
            x_next, opt, extra["direction"] = self.update_x(x, d_x, state)
        elif self.order == "y_first":
            _, grad_y, (upper_loss, g_y, _) = self._gradients(problem, x, y, theta, batch, c, "y")
            d_y = T.axpy(-inv_gamma, y_minus_theta, grad_y)
            y_next = self._move_y(y, d_y, extra, k, auto_info)
            d_x, _, (_, _, g_theta) = self._gradients(problem, x, y_next, theta, batch, c, "x")  # g(x_k, θ): the gap's term
            x_next, opt, extra["direction"] = self.update_x(x, d_x, state)
        else:
            d_x, _, (upper_loss, g_y, g_theta) = self._gradients(problem, x, y, theta, batch, c, "x")
            x_next, opt, extra["direction"] = self.update_x(x, d_x, state)
            _, grad_y, _ = self._gradients(problem, x_next, y, theta, batch, c, "y")
            d_y = T.axpy(-inv_gamma, y_minus_theta, grad_y)
            y_next = self._move_y(y, d_y, extra, k, auto_info)
        gap = g_y - cast(torch.Tensor, g_theta)
        # ‖θ − y‖² = ‖y − θ‖² (negation is exact); the three norms from one fused kernel
        d_x_sq, d_y_sq, distance_sq = T.sq_norms(d_x, d_y, y_minus_theta)
        info = {
            "upper_loss": upper_loss,
            "direction_sq": d_x_sq + d_y_sq,
            "moreau_gap": gap - 0.5 * inv_gamma * distance_sq,
            "penalty": torch.scalar_tensor(c, dtype=upper_loss.dtype, device=upper_loss.device),
            "stationarity": self.projected_direction_sq(x, d_x, d_x_sq) + d_y_sq,
        }
        step = upper_step(self.parts.upper, opt)
        if step is not None:
            auto_info["lr_upper"] = step
        info.update(auto_info)
        return State(x=x_next, y=y_next, v=None, opt=opt, k=k + 1, extra=extra), info
