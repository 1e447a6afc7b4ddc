"""MEHA: Moreau-envelope based single-loop Hessian-free bilevel algorithm."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, cast

import torch

from .. import tree as T
from ..parts import Parts
from ..parts.value import Shadow
from ..problem import Problem
from ..schedules import Polynomial, ScheduleLike
from ..state import EmptyState, State
from ..tree import Tree
from ..updates import UpperOptimizer
from ..validation import check_choice, check_count, check_number, check_positive
from .base import Assembled, option, upper_option

__all__ = ["MEHA"]


def _check_power(owner: str, name: str, value: Any) -> Any:
    return check_number(
        owner, name, value, low=0.0, high=0.5, high_open=True, expected="a number in [0, 0.5) (c_k = c0 (k+1)^p; the theory needs p < 1/2)"
    )


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

    Args:
        lr_upper: α, the x step (a number, a schedule or an upper optimizer).
        lr_lower: β, the y step.
        lr_shadow: η, the θ step.
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

    lr_upper: ScheduleLike | UpperOptimizer = upper_option(0.01)
    lr_lower: float = option(0.01, check_positive)
    lr_shadow: float = option(0.01, check_positive)
    shadow_steps: int = option(1, check_count)
    gamma: float = option(10.0, check_positive)
    c0: float = option(0.2, check_positive)
    p: float = option(0.25, _check_power)
    order: str = option("jacobi", check_choice, choices=("jacobi", "y_first", "x_first"))

    def build_parts(self) -> Parts:
        return Parts(lower=Shadow(lr=self.lr_shadow, steps=self.shadow_steps, start="persistent", gamma=self.gamma))

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
        theta, _, shadow_state = self.parts.lower.run(problem, x, y, batch, self.derivatives, state.extra.get("lower", EmptyState()), k)
        y_minus_theta = T.sub(y, theta)  # the proximal term's direction, and (negated) the gap's θ − y
        if self.order == "jacobi":
            d_x, grad_y, (upper_loss, g_y, g_theta) = self._gradients(problem, x, y, theta, batch, c, "xy")
            d_y = T.axpy(-inv_gamma, y_minus_theta, grad_y)
            y_next = T.axpy(-self.lr_lower, d_y, y)
            x_next, opt, direction_state = self.update_x(x, d_x, state)
        elif self.order == "y_first":
            _, grad_y, (upper_loss, g_y, _) = self._gradients(problem, x, y, theta, batch, c, "y")
            d_y = T.axpy(-inv_gamma, y_minus_theta, grad_y)
            y_next = T.axpy(-self.lr_lower, d_y, y)
            d_x, _, (_, _, g_theta) = self._gradients(problem, x, y_next, theta, batch, c, "x")  # g(x_k, θ): the gap's term
            x_next, opt, direction_state = self.update_x(x, d_x, state)
        else:
            d_x, _, (upper_loss, g_y, g_theta) = self._gradients(problem, x, y, theta, batch, c, "x")
            x_next, opt, direction_state = self.update_x(x, d_x, state)
            _, grad_y, _ = self._gradients(problem, x_next, y, theta, batch, c, "y")
            d_y = T.axpy(-inv_gamma, y_minus_theta, grad_y)
            y_next = T.axpy(-self.lr_lower, d_y, y)
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
        extra = {**state.extra, "lower": shadow_state, "direction": direction_state}
        return State(x=x_next, y=y_next, v=None, opt=opt, k=k + 1, extra=extra), info
