"""IAPTT-GM: initialisation auxiliary and pessimistic trajectory truncation."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, cast

import torch

from .. import tree as T
from ..auto import DoG, TrackedLower, auto_upper, check_auto_positive, check_auto_step_size, check_auto_upper, is_auto, upper_step
from ..oracles import _grads_or_zeros, _requires_grad_copy
from ..parts import LowerGD, Parts, Unroll
from ..parts.base import Projection, check_projection
from ..parts.trajectory import InitState, LearnedInit, pessimistic_step
from ..problem import Problem
from ..schedules import ScheduleLike, as_schedule
from ..state import EmptyState, State
from ..tree import Tree
from ..updates import UpperOptimizer
from ..validation import check_bool, check_choice, check_count
from .base import Assembled, option

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

    Steps left ``"auto"`` (the default; docs/auto.md): s from the curvature at the start of
    each unroll (:class:`~bilevel.auto.TrackedLower`: a warm-started power iteration on the
    Hessian of g at ``(x_k, y_0)``, one number for the whole unroll, so the differentiated
    steps are the usual ones; its guard undoes an iteration whose last lower gradient is
    more than 10× the one at y_0 and halves s), and one :class:`~bilevel.auto.DoG` step for
    the pair (x, z) (z is an upper-level variable: ``min_{x,z} max_t f``); with a number or
    schedule ``lr_upper`` z takes α_k. Numbers run the iteration above exactly.

    Args:
        lr_upper: α, the x step: ``"auto"`` (default), a number, a schedule or an upper
            optimizer (the hyper-cleaning code uses Adam 0.01).
        lr_lower: s, the lower step: ``"auto"`` (default) or a number.
        lower_steps: K.
        initialization: ``"auxiliary"``, ``"warm"`` or ``"cold"`` (see above).
        lr_init: s_z, the z step: ``"auto"`` (default), a number or a schedule (the toy:
            0.1; the hyper-cleaning code moves z with the lower optimizer, s_z = s).
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

    lr_upper: ScheduleLike | UpperOptimizer | str = option("auto", check_auto_upper, kw_only=True)  # type: ignore[assignment]
    lr_lower: float | str = option("auto", check_auto_positive)
    lower_steps: int = option(20, check_count)
    initialization: str = option("auxiliary", check_choice, choices=("auxiliary", "warm", "cold"))
    lr_init: ScheduleLike | str = option("auto", check_auto_step_size)
    project_y: Projection | None = option(None, check_projection)
    code_history: bool = option(False, check_bool)

    def build_parts(self) -> Parts:
        if self._auto_init and not is_auto(self.lr_upper) and not callable(self.lr_upper) and not isinstance(self.lr_upper, (int, float)):
            raise ValueError(
                "IAPTTGM(lr_init='auto') takes the step of x for z (z is an upper-level variable): give lr_upper a number, "
                "a schedule or 'auto', or give lr_init a number with an upper optimizer"
            )
        dynamics = LowerGD(lr=1.0 if is_auto(self.lr_lower) else cast(float, self.lr_lower), steps=self.lower_steps)
        lower = TrackedLower(dynamics) if is_auto(self.lr_lower) else dynamics
        return Parts(lower=lower, unroll=Unroll(warm_start=self.initialization == "warm"), upper=auto_upper(self.lr_upper))

    @cached_property
    def init_part(self) -> LearnedInit:
        """The initialisation auxiliary z (used when ``initialization="auxiliary"``; with
        ``lr_init="auto"`` z moves with x's step instead of this part's)."""
        return LearnedInit(lr=1.0 if is_auto(self.lr_init) else cast(ScheduleLike, self.lr_init), projection=self.project_y)

    @property
    def _auto_init(self) -> bool:
        return is_auto(self.lr_init) and self.initialization == "auxiliary"

    @property
    def joint_auto(self) -> bool:
        """Whether (x, z) take one DoG step together (``lr_upper`` and ``lr_init`` auto, z learned)."""
        return self._auto_init and is_auto(self.lr_upper)

    def _start_of_unroll(self, state: State) -> Tree:
        start_state = state.extra.get("unroll", EmptyState())
        return start_state.z if self.initialization == "auxiliary" else cast(Unroll, self.parts.unroll).start(state.y, start_state)

    def init(self, problem: Problem, x0: Tree = None, y0: Tree = None, batch: Any = None, validate: bool = True) -> State:
        state = super().init(problem, x0, y0, batch, validate)
        extra = dict(state.extra)
        lower = self.parts.lower
        if isinstance(lower, TrackedLower):  # s₀ from 30 power products at the first unroll's start
            extra["lower"] = lower.initial(problem, self.derivatives, state.x, self._start_of_unroll(state), batch)
        if self.joint_auto:
            extra["joint"] = DoG().init({"x": state.x, "z": state.extra["unroll"].z})
        return state.replace(extra=extra)

    def _move_init(self, d_z: Tree, start_state: InitState, k: int) -> InitState:
        """z's step when x does not carry it: the given s_z, or α_k (``lr_init="auto"`` with a
        number or schedule ``lr_upper``)."""
        if not self._auto_init:
            return self.init_part.update(d_z, start_state, k)
        z = T.axpy(-float(as_schedule(cast(ScheduleLike, self.lr_upper))(k)), d_z, start_state.z)
        return InitState(z=self.project_y(z) if self.project_y is not None else z)

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
        y0 = self._start_of_unroll(state)
        tracked = isinstance(lower, TrackedLower)
        if tracked:  # s from the curvature at the start of this unroll (lr_lower="auto")
            tracker = cast(TrackedLower, lower)
            lower, tracker_state, reference_sq = tracker.begin(problem, self.derivatives, x, y0, batch, k, state.extra["lower"])
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
        extra = dict(state.extra)
        auto_info: dict = {}
        if learned:
            d_z = T.unflatten_like(grads[len(T.leaves(x)) :], y0)
            d_z_sq = T.sq_norm(d_z)
            info["direction_sq"] = info["direction_sq"] + d_z_sq
            stationarity = stationarity + d_z_sq
        info["stationarity"] = stationarity
        info["selected_step"] = info["upper_loss"].new_tensor(float(selected))
        opt = state.opt
        if self.joint_auto:  # one DoG step for (x, z): the upper level of min_{x,z} max_t f
            pair, extra["joint"] = DoG().update({"x": x, "z": start_state.z}, {"x": d_x, "z": d_z}, extra["joint"], k)
            x_next = pair["x"] if self.parts.projection is None else self.parts.projection(pair["x"])
            start_state = InitState(z=self.project_y(pair["z"]) if self.project_y is not None else pair["z"])
            auto_info["lr_upper"] = auto_info["lr_init"] = DoG().step_size(extra["joint"])
        else:
            if learned:
                start_state = self._move_init(d_z, start_state, k)
            x_next, opt, extra["direction"] = self.update_x(x, d_x, state)
        extra["unroll"] = start_state
        new_state = State(x=x_next, y=T.detach(trajectory[-1]), v=None, opt=opt, k=k + 1, extra=extra)
        step = None if self.joint_auto else upper_step(self.parts.upper, opt)
        if step is not None:
            auto_info["lr_upper"] = step
        info.update(auto_info)
        if tracked:
            new_state = tracker.conclude(state, new_state, tracker_state, reference_sq, info)
        return new_state, info
