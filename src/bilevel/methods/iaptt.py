"""IAPTT-GM: initialisation auxiliary and pessimistic trajectory truncation."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, cast

import torch

from .. import tree as T
from ..oracles import _grads_or_zeros, _requires_grad_copy
from ..parts import LowerGD, Parts, Unroll
from ..parts.base import Projection, check_projection
from ..parts.trajectory import LearnedInit, pessimistic_step
from ..problem import Problem
from ..schedules import ScheduleLike
from ..state import EmptyState, State
from ..tree import Tree
from ..updates import UpperOptimizer
from ..validation import check_bool, check_choice, check_count, check_positive, check_step_size
from .base import Assembled, option, upper_option

__all__ = ["IAPTTGM"]


@dataclass(frozen=True)
class IAPTTGM(Assembled):
    """IAPTT-GM (Liu, Liu, Zeng & Zhang, NeurIPS 2021) for lower levels with several
    minimisers (no lower-level convexity or uniqueness needed): K differentiable lower
    steps from a learned initialisation z, differentiated at the iterate where f is worst.

    Per iteration k (the paper writes F = upper, f = lower)::

        y_0 = z,   y_t = Proj_Y(y_{t−1} − s ∇_y g(x_k, y_{t−1})),   t = 1 … K   (with their graph)
        k̃   = argmax_{1 ≤ t ≤ K} f(x_k, y_t)                                     (first maximiser)
        (d_x, d_z) = ∇_{(x, z)} f(x, y_k̃(x, z))                                  (reverse mode, k̃ steps)
        x_{k+1} = Proj_X(x_k − α d_x),   z_{k+1} = Proj_Y(z_k − s_z d_z)

    The max over the trajectory makes the method solve ``min_{x,z} max_t f(x, y_t(x, z))``,
    whose solutions approach the optimistic bilevel solutions as K grows when the lower
    iterates approach the solution set; learning z lets the upper level choose among the
    lower minimisers (on T2 it reaches x* = 1 where a plain unroll stops at 0.505).

    ``initialization``: ``"auxiliary"`` (default, the learned z above), ``"warm"`` (``y_0 =
    y_K`` of the previous iteration: BOAT's ``PTT`` with ``copy_last_param``) or ``"cold"``
    (``y_0`` = the initial y every iteration).

    Stationarity reported: ``‖x − Proj(x − d_x)‖² (+ ‖d_z‖²)``, with ``selected_step`` = k̃.
    ``result.y`` is the last iterate y_K.

    Parts (``method.parts``): ``lower`` = ``LowerGD(lr_lower, lower_steps)``, ``unroll`` =
    ``Unroll(warm_start=initialization == "warm")``, the initialisation auxiliary
    ``method.init_part`` = :class:`~bilevel.parts.LearnedInit` (``lr_init``, ``project_y``),
    ``PlainDirection()``, the upper optimizer of ``lr_upper``.

    Args:
        lr_upper: α, the x step (a number, a schedule or an upper optimizer; the
            hyper-cleaning code uses Adam 0.01).
        lr_lower: s, the lower step.
        lower_steps: K.
        initialization: ``"auxiliary"``, ``"warm"`` or ``"cold"`` (see above).
        lr_init: s_z, the z step (the toy: 0.1; the hyper-cleaning code moves z with the
            lower optimizer, s_z = s).
        project_y: ``Proj_Y`` (e.g. ``bilevel.Box(-2, 2)`` on the authors' toy), applied
            inside the differentiated steps and to z; ``None``: Y is the whole space.
        code_history: reproduce the authors' toy, where ``higher`` records the clamp of each
            step as a second trajectory entry, so the code differentiates f at entry k̃ of
            the doubled history — ``y_{k̃/2}`` (k̃ even) or the unprojected step
            ``y_{(k̃+1)/2}`` (k̃ odd). For the side-by-side check only.
        project_x: optional projection of x (the toy: ``Box(1, 10)``).

    Cost per iteration: K gradients of g with a graph, K evaluations of f without
    gradient, one evaluation of f with gradient and a backward through k̃ steps (≈ k̃
    ``(J u, H u)`` products); memory O(K · dim y). One host synchronisation (k̃).

    Example:
        >>> import bilevel as bl
        >>> method = bl.IAPTTGM(lr_upper=0.5, lr_lower=0.5, lower_steps=10, lr_init=0.5)
        >>> result = bl.solve(bl.problems.T2(n=5), method, max_iters=300)
        >>> round(float(result.x["x"][0]), 3)     # the optimistic x* = 1 of T2
        1.0

    Reference: Risheng Liu, Yaohua Liu, Shangzhi Zeng, Jin Zhang, "Towards Gradient-based
    Bilevel Optimization with Non-convex Followers and Beyond", NeurIPS 2021, arXiv:2110.00455.
    """

    name: ClassVar[str] = "IAPTT-GM"
    stationarity_doc: ClassVar[str] = "‖x − Proj(x − d_x)‖² + ‖d_z‖² at the pessimistic iterate y_k̃"
    uses_multiplier: ClassVar[bool] = False

    lr_upper: ScheduleLike | UpperOptimizer = upper_option(0.1)
    lr_lower: float = option(0.1, check_positive)
    lower_steps: int = option(20, check_count)
    initialization: str = option("auxiliary", check_choice, choices=("auxiliary", "warm", "cold"))
    lr_init: ScheduleLike = option(0.1, check_step_size)
    project_y: Projection | None = option(None, check_projection)
    code_history: bool = option(False, check_bool)

    def build_parts(self) -> Parts:
        return Parts(lower=LowerGD(lr=self.lr_lower, steps=self.lower_steps), unroll=Unroll(warm_start=self.initialization == "warm"))

    @cached_property
    def init_part(self) -> LearnedInit:
        """The initialisation auxiliary z (used when ``initialization="auxiliary"``)."""
        return LearnedInit(lr=self.lr_init, projection=self.project_y)

    def initial_state(self, x: Tree, y: Tree) -> State:
        state = super().initial_state(x, y)
        if self.initialization == "auxiliary":
            start: Any = self.init_part.init(y)
        else:
            start = cast(Unroll, self.parts.unroll).init(y)
        return state.replace(extra={**state.extra, "unroll": start})

    def step(self, problem: Problem, state: State, batch: Any = None) -> tuple[State, dict]:
        k, x, lower = state.k, state.x, self.parts.lower
        start_state = state.extra.get("unroll", EmptyState())
        learned = self.initialization == "auxiliary"
        y0 = start_state.z if learned else cast(Unroll, self.parts.unroll).start(state.y, start_state)
        x_req = _requires_grad_copy(x)
        z_req = _requires_grad_copy(y0)
        inputs = T.leaves(x_req) + (T.leaves(z_req) if learned else [])
        trajectory, unprojected, values = [], [], []
        with torch.enable_grad():
            y, grad_g = z_req, None
            for t in range(self.lower_steps):
                y, grad_g = lower.differentiable_step(problem, x_req, y, batch, t, k)
                unprojected.append(y)
                if self.project_y is not None:
                    y = self.project_y(y)
                trajectory.append(y)
                with torch.no_grad():
                    values.append(problem.upper(x_req, y, batch))
            selected = pessimistic_step(values)
            if self.code_history:
                y_sel = trajectory[selected // 2 - 1] if selected % 2 == 0 else unprojected[(selected + 1) // 2 - 1]
            else:
                y_sel = trajectory[selected - 1]
            upper_loss = problem.upper(x_req, y_sel, batch)
            grads = _grads_or_zeros(upper_loss, inputs)
        d_x = T.unflatten_like(grads[: len(T.leaves(x))], x)
        stationarity = self.projected_direction_sq(x, d_x)
        info = {"upper_loss": upper_loss.detach(), "lower_grad_sq": T.sq_norm(grad_g), "direction_sq": T.sq_norm(d_x)}
        if learned:
            d_z = T.unflatten_like(grads[len(T.leaves(x)) :], y0)
            d_z_sq = T.sq_norm(d_z)
            info["direction_sq"] = info["direction_sq"] + d_z_sq
            stationarity = stationarity + d_z_sq
            start_state = self.init_part.update(d_z, start_state, k)
        info["stationarity"] = stationarity
        info["selected_step"] = info["upper_loss"].new_tensor(float(selected))
        x_next, opt, direction_state = self.update_x(x, d_x, state)
        extra = {**state.extra, "unroll": start_state, "direction": direction_state}
        return State(x=x_next, y=T.detach(trajectory[-1]), v=None, opt=opt, k=k + 1, extra=extra), info
