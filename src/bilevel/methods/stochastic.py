"""The stochastic bilevel family: SOBA, MA-SOBA, SABA, SRBA (single loop), StocBiO, AmIGO
(double loop) and F2SA (fully first order), on separate upper and lower sample streams.

Each method draws its mini-batches from the :class:`~bilevel.streams.Draws` of the
iteration (``solve(problem, method, data=bl.Streams(upper=..., lower=...))``): ξ, ξ', …
independent lower batches, ζ upper batches. Without streams (``data=None`` or a fixed
batch) every draw is that batch: the full-batch (deterministic) versions.

The library's sign: the multiplier solves ``H v = ∇_y f`` and the hypergradient estimate
is ``∇_x f − J v`` (SOBA's paper and benchopt's code store ``−v``). Steps: β (lower and
multiplier), α (upper); benchopt's ``step_size`` is β₀ and ``outer_ratio`` r gives
α₀ = β₀ / r (:func:`benchmark_steps` converts). All single-loop oracles are taken at
``(x_k, y_k, v_k)`` and all variables then move (the Jacobi order of the papers' code).

Steps left ``"auto"`` (the default of every method of the family; docs/auto.md):
``β_k = c_k/λ̂`` with λ̂ the top eigenvalue of the lower Hessian, tracked by a warm-started
power iteration on lower batches (:class:`~bilevel.auto.CurvatureTracker`: 30 products at
``init``, one every 10 iterations, every 2 for the double loop) and ``c_k`` the method's
unit-curvature shape (SOBA ``0.5 (k+1)^{−1/2}``, the others 0.5); the multiplier's step
follows β; α by :class:`~bilevel.auto.DoG`. F2SA's β^z and β^y take ``0.5 (k+1)^{−4/7}`` and
``0.5 (k+1)^{−5/7}`` over the curvature of g at z and of ``f + λ_k g`` at y, both estimated
from differences of gradients, so F2SA stays first order.

Diagnostics: ``upper_loss`` (f on the upper batch), ``lower_grad_sq`` (‖∇_y g‖² on the
lower batch), ``direction_sq`` and ``stationarity`` (‖D_x‖², the squared norm of the
stochastic hypergradient estimate; the true ‖∇F‖² needs the problem's closed form).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, NamedTuple, cast

import torch

from .. import tree as T
from ..auto import (
    CurvatureTracker,
    auto_upper,
    check_auto_positive,
    check_auto_step_size,
    check_auto_upper,
    is_auto,
    is_distance_rule,
    upper_step,
)
from ..oracles import Oracles
from ..parts import DirectionNorm, DualCorrection, FixedStep, Parts, PlainDirection
from ..parts.stochastic import (
    AveragedDirection,
    DualSteps,
    LowerSGD,
    LowerShadowState,
    PenaltyIncrements,
    PenaltyState,
    PlainEstimate,
    SagaEstimate,
    SarahEstimate,
    StochasticNeumann,
    evaluate,
)
from ..problem import Problem, check_scalar_loss, check_variables
from ..schedules import Polynomial, ScheduleLike, as_schedule
from ..state import EmptyState, State
from ..streams import as_draws
from ..tree import Tree
from ..validation import check_choice, check_count, check_fraction, check_nonnegative, check_positive
from .base import Assembled, option

__all__ = ["F2SA", "MASOBA", "SABA", "SOBA", "SRBA", "AmIGO", "DoubleLoop", "SingleLoop", "StocBiO", "Stochastic", "benchmark_steps"]


def benchmark_steps(step_size: float, outer_ratio: float = 1.0, power: float = 0.0, upper_power: float | None = None) -> dict:
    """benchopt's parameterisation as this library's options: ``lr_lower = β₀ (k+1)^{−power}``,
    ``lr_upper = (β₀ / outer_ratio) (k+1)^{−upper_power}`` (the ratio divides).

    Example:
        >>> steps = benchmark_steps(0.1, outer_ratio=1e-2, power=0.5)
        >>> steps["lr_upper"](0), round(steps["lr_lower"](3), 4)
        (10.0, 0.05)
    """
    upper_power = power if upper_power is None else upper_power
    lower = step_size if power == 0 else Polynomial(step_size, power)
    upper = step_size / outer_ratio if upper_power == 0 else Polynomial(step_size / outer_ratio, upper_power)
    return {"lr_lower": lower, "lr_upper": upper}


class _BothBatches(NamedTuple):
    """An upper and a lower batch handed to one objective (F2SA's f + λ g)."""

    upper: Any
    lower: Any


def _no_product(v: Tree) -> Tree:
    raise RuntimeError("the single-loop dual step is given D_v; it forms no product")  # pragma: no cover


def _check_auto_or_none(owner: str, name: str, value: Any) -> Any:
    return value if value is None else check_auto_positive(owner, name, value)


def _check_step_or_none(owner: str, name: str, value: Any) -> Any:
    return value if value is None else check_auto_step_size(owner, name, value)


@dataclass(frozen=True, kw_only=True)
class Stochastic(Assembled):
    """Base of the stochastic methods: validation on the streams' first draws and the
    device check at ``init``, the oracles of a point on separate batches."""

    stationarity_doc: ClassVar[str] = "‖D_x‖² (the stochastic hypergradient estimate)"
    #: the unit-curvature shape c_k = c (k+1)^{−p} of the auto lower and dual steps, β_k = c_k / λ̂
    auto_lower_scale: ClassVar[float] = 0.5
    auto_lower_power: ClassVar[float] = 0.0
    #: iterations between two refreshes of λ̂ (:class:`~bilevel.auto.CurvatureTracker`)
    curvature_every: ClassVar[int] = 10

    lr_upper: Any = option("auto", check_auto_upper, kw_only=True)

    @property
    def auto_lower(self) -> bool:
        """Whether y's step is auto (``lr_lower="auto"``)."""
        return is_auto(getattr(self, "lr_lower", None))

    @property
    def auto_dual(self) -> bool:
        """Whether the multiplier's step is auto (given as ``"auto"``, or left to follow an auto β)."""
        dual = getattr(self, self.dual_option, None) if self.dual_option else None
        return is_auto(dual) or (dual is None and self.auto_lower and self.dual_option is not None)

    #: the name of the method's multiplier-step option (``None``: no multiplier)
    dual_option: ClassVar[str | None] = None

    @cached_property
    def auto_lower_shape(self) -> ScheduleLike:
        """The unit-curvature shape ``c (k+1)^{−p}`` of the auto steps (a number when p = 0)."""
        power = self.auto_lower_power
        return Polynomial(self.auto_lower_scale, power) if power else self.auto_lower_scale

    @cached_property
    def auto_shape_schedule(self) -> Any:
        """:attr:`auto_lower_shape` as a schedule (built once)."""
        return as_schedule(self.auto_lower_shape)

    @property
    def tracks_curvature(self) -> bool:
        """Whether a step is auto, so that the lower curvature is tracked."""
        return self.auto_lower or self.auto_dual

    @cached_property
    def curvature(self) -> CurvatureTracker | None:
        """The lower-curvature tracker of the auto steps (``None`` when every step is given)."""
        return CurvatureTracker(every=self.curvature_every) if self.tracks_curvature else None

    def lower_shape(self) -> ScheduleLike:
        """β's schedule for :class:`~bilevel.parts.LowerSGD`: the unit-curvature shape when auto."""
        return self.auto_lower_shape if self.auto_lower else cast(ScheduleLike, cast(Any, self).lr_lower)

    def track_curvature(self, fn: Any, x: Tree, y: Tree, batch: Callable[[], Any], state: Any, k: int) -> tuple[Any, torch.Tensor | None]:
        """``(curvature state, 1/λ̂)`` for iteration k: refreshed by one product of ``∇²_yy fn``
        on ``batch()`` when due (``(state, None)`` when no step is auto)."""
        tracker = self.curvature
        if tracker is None:
            return state, None
        if tracker.due(k):
            state = tracker.refresh(self.curvature_matvec(fn, x, y, batch()), state)
        return state, state.inverse

    @cached_property
    def reports_auto(self) -> bool:
        """Whether any step is auto: a method with every step given skips the auto bookkeeping."""
        return self.curvature is not None or is_distance_rule(self.parts.upper)

    def conclude_auto(self, new_state: State, info: dict, curvature: Any, inverse: torch.Tensor | None, k: int) -> State:
        """The curvature state kept in ``new_state`` and the auto steps added to ``info``."""
        if not self.reports_auto:
            return new_state
        if curvature is not None:
            new_state = new_state.replace(extra={**new_state.extra, "curvature": curvature})
        info.update(self.auto_info(new_state, inverse, k))
        return new_state

    def curvature_matvec(self, fn: Any, x: Tree, y: Tree, batch: Any) -> Any:
        """``u ↦ ∇²_yy fn(x, y) u`` on one batch, the product the curvature tracker iterates."""
        return self.derivatives.linearize(fn, x, y, batch).hvp

    def auto_info(self, state: State, inverse: torch.Tensor | None, k: int) -> dict:
        """The auto steps in use, in the problem's units: ``lr_lower``, ``lr_dual``, ``lr_upper``."""
        info: dict = {}
        if inverse is not None:
            beta = float(self.auto_shape_schedule(k)) * inverse
            if self.auto_lower:
                info["lr_lower"] = beta
            if self.auto_dual:
                info["lr_dual"] = beta
        alpha = upper_step(self.parts.upper, state.opt)
        if alpha is not None:
            info["lr_upper"] = alpha
        return info

    def init(self, problem: Problem, x0: Tree = None, y0: Tree = None, batch: Any = None, validate: bool = True) -> State:
        """The initial state; checks x, y, the objectives on the first upper and lower
        draws, and that the streams' data are on the variables' device."""
        if not isinstance(problem, Problem):
            raise TypeError(f"{self.name}.init expects a bilevel.Problem, got {type(problem).__name__}")
        x0, y0 = problem.initial_point(x0, y0)
        draws = as_draws(batch)
        if validate:
            check_variables("x", x0)
            check_variables("y", y0)
            device = T.leaves(x0)[0].device
            if T.leaves(y0)[0].device != device:
                raise ValueError(f"x is on {device} but y is on {T.leaves(y0)[0].device}: put both on the same device")
            draws.check_device(device)
            with torch.no_grad():
                check_scalar_loss("upper", problem.upper(x0, y0, draws.upper(0)))
                check_scalar_loss("lower", problem.lower(x0, y0, draws.lower(0)))
        x, y = T.clone(x0), T.clone(y0)
        if self.parts.projection is not None:
            x = self.parts.projection(x)
        state = self.start(problem, self.initial_state(x, y), draws)
        if self.curvature is not None:  # λ̂ from 30 products on the first lower batch
            curvature = self.curvature.start(self.curvature_matvec(problem.lower, x, y, draws.lower(0)), y)
            state = state.replace(extra={**state.extra, "curvature": curvature})
        return self.start_auto(problem, state, draws)

    def start_auto(self, problem: Problem, state: State, draws: Any) -> State:
        """Further auto-step states that need the problem (none by default)."""
        return state

    def start(self, problem: Problem, state: State, draws: Any) -> State:
        """The states that need the data (SAGA tables); none by default."""
        return state

    def evaluator(self, problem: Problem) -> Any:
        oracles = self.derivatives
        return lambda x, y, v, lower, upper: evaluate(oracles, problem, x, y, v, lower, upper)

    def report(self, upper_loss: torch.Tensor, grad_y_g: Tree, x: Tree, direction: Tree) -> dict:
        direction_sq, lower_grad_sq = T.sq_norms(direction, grad_y_g)
        return {
            "upper_loss": upper_loss,
            "lower_grad_sq": lower_grad_sq,
            "direction_sq": direction_sq,
            "stationarity": self.projected_direction_sq(x, direction, direction_sq),
        }


@dataclass(frozen=True, kw_only=True)
class SingleLoop(Stochastic):
    """The single-loop template: per iteration the estimator gives ``(D_y, D_v, D_x)`` at
    ``(x_k, y_k, v_k)``, then ``y ← y − β_k D_y``, ``v ← v − η_k D_v`` (a
    :class:`~bilevel.parts.DualCorrection`), ``x ← x − α_k P.direction(D_x)``.

    Subclasses give ``lr_lower``, ``lr_dual`` and implement :meth:`build_estimator`
    (:class:`~bilevel.parts.PlainEstimate`, :class:`~bilevel.parts.SagaEstimate`,
    :class:`~bilevel.parts.SarahEstimate`) and, optionally, :meth:`build_direction`.
    """

    dual_option: ClassVar[str | None] = "lr_dual"

    lr_lower: ScheduleLike | str = option("auto", check_auto_step_size)
    lr_dual: ScheduleLike | str | None = option(None, _check_step_or_none)

    def build_estimator(self) -> Any:
        return PlainEstimate()

    def build_direction(self) -> Any:
        return PlainDirection()

    @cached_property
    def estimator(self) -> Any:
        """The direction estimator of (D_y, D_v, D_x) (built once)."""
        return self.build_estimator()

    def build_parts(self) -> Parts:
        dual = self.auto_lower_shape if self.auto_dual else (self.lr_lower if self.lr_dual is None else self.lr_dual)
        return Parts(
            lower=LowerSGD(lr=self.lower_shape(), steps=1),
            multiplier=DualCorrection(FixedStep(cast(ScheduleLike, dual))),
            direction=self.build_direction(),
            measure=DirectionNorm(),
            order="jacobi",
            upper=auto_upper(self.lr_upper),
        )

    def initial_state(self, x: Tree, y: Tree) -> State:
        state = super().initial_state(x, y)
        v = T.zeros_like(y)
        multiplier = cast(DualCorrection, self.parts.multiplier)
        return state.replace(v=v, extra={**state.extra, "multiplier": multiplier.init(v)})

    def start(self, problem: Problem, state: State, draws: Any) -> State:
        estimator_state = self.estimator.init(state.x, state.y, state.v, draws, self.evaluator(problem))
        return state.replace(extra={**state.extra, "estimator": estimator_state})

    def step(self, problem: Problem, state: State, batch: Any = None) -> tuple[State, dict]:
        parts, k, extra = self.parts, state.k, state.extra
        draws = as_draws(batch)
        curvature, inverse = self.track_curvature(problem.lower, state.x, state.y, lambda: draws.lower(0), extra.get("curvature"), k)
        (d_y, d_v, d_x), o, estimator_state = self.estimator.estimate(
            self.evaluator(problem), state.x, state.y, state.v, draws, extra["estimator"], k
        )
        y = cast(LowerSGD, parts.lower).apply_at(state.y, d_y, k, inverse if self.auto_lower else None)
        if inverse is not None and self.auto_dual:  # η_k = c_k/λ̂: the scale on D_v
            d_v = T.scale(inverse, d_v)
        # v − η_k D_v: the dual correction with D_v given as its residual "H v − b" (b = 0)
        solve, multiplier_state = cast(DualCorrection, parts.multiplier).update(_no_product, None, state.v, extra["multiplier"], k, hv=d_v)
        info = self.report(o.upper_loss, o.grad_y_g, state.x, d_x)
        x, opt, direction_state = self.update_x(state.x, d_x, state)
        extra = {**extra, "multiplier": multiplier_state, "direction": direction_state, "estimator": estimator_state}
        new_state = State(x=x, y=y, v=solve.v, opt=opt, k=k + 1, extra=extra)
        return self.conclude_auto(new_state, info, curvature, inverse, k), info


@dataclass(frozen=True, kw_only=True)
class SOBA(SingleLoop):
    """SOBA: stochastic single-loop bilevel optimization (Dagréou, Ablin, Vaiter & Moreau, 2022).

    Iteration k, with independent draws ξ_k (lower) and ζ_k (upper), all oracles at
    ``(x_k, y_k, v_k)``, ``v_0 = 0``::

        D_y = ∇_y g(x_k, y_k; ξ_k)
        D_v = H(ξ_k) v_k − ∇_y f(x_k, y_k; ζ_k)
        D_x = ∇_x f(x_k, y_k; ζ_k) − J(ξ_k) v_k
        y_{k+1} = y_k − β_k D_y,   v_{k+1} = v_k − η_k D_v,   x_{k+1} = x_k − α_k D_x

    (v takes one SGD step on ``½ vᵀHv − vᵀ∇_y f``; the paper stores −v.)

    Parts: :class:`~bilevel.parts.LowerSGD` (β), :class:`~bilevel.parts.DualCorrection`
    with :class:`~bilevel.parts.FixedStep` (η), :class:`~bilevel.parts.PlainEstimate`,
    :class:`~bilevel.parts.PlainDirection`, SGD (α).

    Cost per iteration: ``1 Gy + 1 HJ + 1 Gf`` (∇_y g and the joint (Hv, Jv) share one
    forward of g on ξ_k; ∇_x f, ∇_y f one backward of f on ζ_k): one lower and one upper
    batch. Memory: x, y, v.

    Args:
        lr_lower: β_k: ``"auto"`` (default: ``0.5 (k+1)^{−1/2}/λ̂``, λ̂ the tracked lower
            curvature, docs/auto.md), a number or a schedule (the benchmark's: ``0.1 (k+1)^{−1/2}``).
        lr_dual: η_k (default: β_k, as the benchmark; ``"auto"`` alone is accepted).
        lr_upper: α_k: ``"auto"`` (default, DoG), a number, a schedule or an upper optimizer.

    Guarantee (paper): ``(1/K) Σ E‖∇F(x_k)‖² = O(log K/√K)`` with steps ∝ k^{−1/2}, under
    third-order smoothness. With constant steps it stalls at an O(step) noise floor.

    Example:
        >>> import bilevel as bl
        >>> p = bl.problems.finite_sum_quadratic(n_lower=64, n_upper=32, dim_x=3, dim_y=4, mu=0.5, seed=0)
        >>> r = bl.solve(p, bl.SOBA(lr_lower=0.5, lr_upper=0.5), data=None, max_iters=200)   # full batch
        >>> float((r.x["x"] - p.x_star["x"]).norm()) < 1e-8
        True

    Reference: M. Dagréou, P. Ablin, S. Vaiter, T. Moreau, "A framework for bilevel
    optimization that enables stochastic and global variance reduction algorithms",
    NeurIPS 2022.
    """

    name: ClassVar[str] = "SOBA"
    auto_lower_power: ClassVar[float] = 0.5


@dataclass(frozen=True, kw_only=True)
class MASOBA(SingleLoop):
    """MA-SOBA: SOBA with a moving average of the upper direction (Chen, Xiao &
    Balasubramanian, 2023).

    Iteration k (oracles as :class:`SOBA`, at ``(x_k, y_k, v_k)``)::

        y_{k+1} = y_k − β D_y,   v_{k+1} = v_k − η D_v
        w_k = ∇_x f(ζ_k) − J(ξ_k) v_k,   h_{k+1} = (1 − θ) h_k + θ w_k   (h_0 = w_0)
        x_{k+1} = x_k − α h_{k+1}

    Parts: SOBA's, with :class:`~bilevel.parts.AveragedDirection` (θ) as the direction.
    Cost per iteration: as SOBA (``1 Gy + 1 HJ + 1 Gf``), plus one d_x buffer h.

    Args:
        lr_lower: β: ``"auto"`` (default: ``0.5/λ̂``, constant as the paper) or a number.
        lr_dual: η (default β).
        lr_upper: α: ``"auto"`` (default, DoG) or given (keep α small relative to θ:
            averaging adds lag; the paper's experiments: 0.01).
        theta: θ in (0, 1] (default 0.1).

    Guarantee (paper): ``(1/K) Σ E‖∇F(x_k)‖² = O(K^{−1/2})`` with constant steps of order
    K^{−1/2}, under first- and second-order smoothness only (no third-order condition):
    the optimal sample complexity O(ε^{−2}).

    Example:
        >>> import bilevel as bl
        >>> p = bl.problems.finite_sum_quadratic(n_lower=64, n_upper=32, dim_x=3, dim_y=4, mu=0.5, seed=0)
        >>> r = bl.solve(p, bl.MASOBA(lr_lower=0.5, lr_upper=0.2, theta=0.5), max_iters=300)
        >>> float((r.x["x"] - p.x_star["x"]).norm()) < 1e-8
        True

    Reference: X. Chen, T. Xiao, K. Balasubramanian, "Optimal algorithms for stochastic
    bilevel optimization under relaxed smoothness conditions", arXiv:2306.12067, 2023.
    """

    name: ClassVar[str] = "MASOBA"
    theta: float = option(0.1, check_fraction, low_open=True, high_open=False)

    def build_direction(self) -> Any:
        return AveragedDirection(theta=self.theta)


@dataclass(frozen=True, kw_only=True)
class SABA(SingleLoop):
    """SABA: SOBA with SAGA variance reduction on all five oracles (Dagréou et al., 2022).

    Iteration k: draw a lower block i and an upper block j independently; compute the
    five oracles ``o`` at ``(x_k, y_k, v_k)`` as in :class:`SOBA`; each goes through its
    SAGA memory (:class:`~bilevel.parts.SagaEstimate`)::

        out = o − m_block + m̄,   m̄ ← m̄ + w_block (o − m_block),   m_block ← o
        D_y = out(∇_y g),   D_v = out(H v) − out(∇_y f),   D_x = out(∇_x f) − out(J v)

    then the steps of SOBA with constant β, η, α. Converges with constant steps, linearly
    when F is strongly convex (a finite-sum quadratic: to machine precision).

    Cost per iteration: ``1 Gy + 1 HJ + 1 Gf`` and five row writes; one lower and one
    upper batch. Memory: ``(2 d_y + d_x)`` numbers per lower block and ``(d_y + d_x)`` per
    upper block, i.e. ``8 (2 d_y + d_x) / b`` bytes per lower sample in float64 (4 in
    float32). The tables are updated in place, so a state is stepped once: a second step from
    the same state is refused with a clear error (it would bias the means for good);
    ``copy.deepcopy(state)`` branches a run.

    Args:
        lr_lower: β: ``"auto"`` (default: ``0.5/λ̂``) or a number.  lr_dual: η (default β).
        lr_upper: α: ``"auto"`` (default, DoG) or given.
        init_memory: ``"zero"`` (the benchmark's) or ``"full"`` (a pass at the start).

    Example:
        >>> import bilevel as bl
        >>> p = bl.problems.finite_sum_quadratic(n_lower=64, n_upper=32, dim_x=3, dim_y=4, mu=0.5, seed=0)
        >>> r = bl.solve(p, bl.SABA(lr_lower=0.3, lr_upper=0.3), data=p.streams(batch_size=16, seed=1), max_iters=600)
        >>> float((r.x["x"] - p.x_star["x"]).norm()) < 1e-8
        True

    Reference: Dagréou, Ablin, Vaiter, Moreau, NeurIPS 2022 (as :class:`SOBA`).
    """

    name: ClassVar[str] = "SABA"
    init_memory: str = option("zero", check_choice, choices=("zero", "full"))

    def build_estimator(self) -> Any:
        return SagaEstimate(init_memory=self.init_memory)


@dataclass(frozen=True, kw_only=True)
class SRBA(SingleLoop):
    """SRBA: SOBA with SARAH recursive variance reduction (Dagréou, Moreau, Vaiter & Ablin, 2024).

    Every q iterations the directions are computed on the full data; in between, with one
    draw (ξ_k, ζ_k) used at both the current and the previous point
    (:class:`~bilevel.parts.SarahEstimate`)::

        D ← D + d(x_k, y_k, v_k; ξ_k, ζ_k) − d(x_{k−1}, y_{k−1}, v_{k−1}; ξ_k, ζ_k),   D ∈ {D_y, D_v, D_x}

    then the steps of SOBA with constant β, η, α. q = ``period`` or
    ``max(1, int((n + m)·period_frac / b))``.

    Cost per iteration: ``2 (Gy + HJ) + 2 Gf`` on one lower and one upper batch; every q
    iterations ``Gy + HJ + Gf`` on all n + m samples instead. Memory: the previous
    (x, y, v) and three directions (nothing per sample).

    Args:
        lr_lower: β: ``"auto"`` (default: ``0.5/λ̂``) or a number.  lr_dual: η (default β).
        lr_upper: α: ``"auto"`` (default, DoG) or given.
        period_frac: the benchmark's ``period_frac`` (default 0.5).  period: q itself.

    Guarantee (paper): O((n + m)^{1/2} ε^{−1}) oracle calls to an ε-stationary point,
    matching the lower bound proved there.

    Example:
        >>> import bilevel as bl
        >>> p = bl.problems.finite_sum_quadratic(n_lower=64, n_upper=32, dim_x=3, dim_y=4, mu=0.5, seed=0)
        >>> r = bl.solve(p, bl.SRBA(lr_lower=0.3, lr_upper=0.3), data=p.streams(batch_size=16, seed=1), max_iters=300)
        >>> float((r.x["x"] - p.x_star["x"]).norm()) < 1e-8
        True

    Reference: M. Dagréou, T. Moreau, S. Vaiter, P. Ablin, "A lower bound and a
    near-optimal algorithm for bilevel empirical risk minimization", AISTATS 2024.
    """

    name: ClassVar[str] = "SRBA"
    period_frac: float = option(0.5, check_positive)
    period: int | None = option(None, check_count, allow_none=True)

    def build_estimator(self) -> Any:
        return SarahEstimate(period_frac=self.period_frac, period=self.period)


@dataclass(frozen=True, kw_only=True)
class DoubleLoop(Stochastic):
    """The double-loop template (StocBiO, AmIGO): T lower SGD steps on fresh batches
    (warm start), ∇f on one upper batch, a multiplier from fresh Hessian batches, the mixed
    product on one more fresh batch, one upper step. Lower draws of iteration k:
    0 … T−1 (y steps), T … T+K−1 (Hessian products), T+K (J v)."""

    curvature_every: ClassVar[int] = 2

    lr_lower: ScheduleLike | str = option("auto", check_auto_step_size)
    lower_steps: int = option(10, check_count)

    def build_multiplier(self) -> Any:  # pragma: no cover - implemented by the presets
        raise NotImplementedError

    def build_parts(self) -> Parts:
        return Parts(
            lower=LowerSGD(lr=self.lower_shape(), steps=self.lower_steps),
            multiplier=self.build_multiplier(),
            measure=DirectionNorm(),
            upper=auto_upper(self.lr_upper),
        )

    def dual_step(self, k: int, given: Any, inverse: torch.Tensor | None) -> Any:
        """The multiplier's step: the given number, β_k (``None``), or c_k/λ̂ (auto)."""
        if self.auto_dual:
            return float(self.auto_shape_schedule(k)) * cast(torch.Tensor, inverse)
        return cast(LowerSGD, self.parts.lower).schedule(k) if given is None else given

    def initial_state(self, x: Tree, y: Tree) -> State:
        state = super().initial_state(x, y)
        return state.replace(v=T.zeros_like(y), extra={**state.extra, "multiplier": EmptyState()})

    def multiplier_of(self, matvec_at: Any, b: Tree, v: Tree, k: int, inverse: torch.Tensor | None = None) -> Tree:  # pragma: no cover
        raise NotImplementedError

    def step(self, problem: Problem, state: State, batch: Any = None) -> tuple[State, dict]:
        parts, oracles, k, x = self.parts, self.derivatives, state.k, state.x
        draws = as_draws(batch)
        lower = cast(LowerSGD, parts.lower)
        curvature, inverse = self.track_curvature(problem.lower, x, state.y, lambda: draws.lower(0), state.extra.get("curvature"), k)
        scale = inverse if self.auto_lower else None
        y, grad_y_g = state.y, None
        for t in range(lower.steps):
            y, grad_y_g = lower.step(problem, x, y, draws, t, oracles, k, scale)
        grad_x_f, grad_y_f, value = oracles.gradients(problem.upper, x, y, draws.upper(0))
        first = lower.steps

        def matvec_at(q: int) -> Any:
            return oracles.linearize(problem.lower, x, y, draws.lower(first + q)).hvp

        v = self.multiplier_of(matvec_at, grad_y_f, state.v, k, inverse)
        jv = oracles.linearize(problem.lower, x, y, draws.lower(first + self.hessian_draws)).mixed(v)
        direction = T.sub(grad_x_f, jv)
        info = self.report(value, grad_y_g, x, direction)
        x_next, opt, direction_state = self.update_x(x, direction, state)
        extra = {**state.extra, "direction": direction_state}
        new_state = State(x=x_next, y=y, v=v, opt=opt, k=k + 1, extra=extra)
        return self.conclude_auto(new_state, info, curvature, inverse, k), info

    @property
    def hessian_draws(self) -> int:
        return int(cast(Any, self.parts.multiplier).steps)

    @property
    def lower_draws(self) -> int:
        """Lower batches one iteration draws: T + K + 1 (``Stream(draws=...)`` in shuffle mode)."""
        return self.lower_steps + self.hessian_draws + 1


@dataclass(frozen=True, kw_only=True)
class StocBiO(DoubleLoop):
    """StocBiO: stochastic bilevel optimizer with a Neumann-series multiplier (Ji, Yang & Liang, 2021).

    Outer iteration k::

        y ← y − β ∇_y g(x_k, y; ξ_{k,t}),  t = 0 … T−1          (warm start, fresh batches)
        u = ∇_y f(x_k, y; ζ_k),  ∇_x f(x_k, y; ζ_k)            (one upper batch)
        r_0 = u,  r_q = (I − η H(ξ'_q)) r_{q−1},  v = η Σ_{q=0}^{K} r_q   (fresh batch per factor)
        d = ∇_x f − J(ξ'') v,   x ← x − α d

    E[v] = H⁻¹(I − (I − ηH)^{K+1}) u: a bias ∝ (1 − ημ)^{K+1} in the fixed point.

    Parts: :class:`~bilevel.parts.LowerSGD` (β, T), :class:`~bilevel.parts.StochasticNeumann`
    (K, η), :class:`~bilevel.parts.PlainDirection`, SGD (α).

    Cost per iteration: ``T Gy + 1 Gf + K H + 1 J`` (each product on a fresh batch costs
    one gradient of g with graph and one vector–Jacobian product); T + K + 1 lower
    batches and 1 upper batch.

    Args:
        lr_lower: β: ``"auto"`` (default: ``0.5/λ̂``), a number or a schedule.  lower_steps: T (default 10).
        neumann_steps: K (default 10).  lr_neumann: η (default β_k, as the benchmark).
        lr_upper: α: ``"auto"`` (default, DoG) or given.

    Example:
        >>> import bilevel as bl
        >>> p = bl.problems.finite_sum_quadratic(n_lower=64, n_upper=32, dim_x=3, dim_y=4, mu=0.5, seed=0)
        >>> r = bl.solve(p, bl.StocBiO(lr_lower=0.5, lower_steps=2, neumann_steps=40, lr_upper=0.5), max_iters=60)
        >>> float((r.x["x"] - p.x_star["x"]).norm()) < 1e-4                # the (1 − ημ)^{K+1} bias
        True

    Reference: K. Ji, J. Yang, Y. Liang, "Bilevel optimization: convergence analysis and
    enhanced design", ICML 2021.
    """

    name: ClassVar[str] = "StocBiO"
    dual_option: ClassVar[str | None] = "lr_neumann"
    neumann_steps: int = option(10, check_count, minimum=0)
    lr_neumann: float | str | None = option(None, _check_auto_or_none)

    def build_multiplier(self) -> Any:
        return StochasticNeumann(steps=self.neumann_steps, lr=None if is_auto(self.lr_neumann) else cast(float | None, self.lr_neumann))

    def multiplier_of(self, matvec_at: Any, b: Tree, v: Tree, k: int, inverse: torch.Tensor | None = None) -> Tree:
        eta = self.dual_step(k, self.lr_neumann, inverse)
        return cast(StochasticNeumann, self.parts.multiplier).solve(matvec_at, b, eta)


@dataclass(frozen=True, kw_only=True)
class AmIGO(DoubleLoop):
    """AmIGO: amortized implicit gradient optimization (Arbel & Mairal, 2022).

    Outer iteration k::

        y ← y − β ∇_y g(x_k, y; ξ_{k,t}),  t = 0 … T−1          (warm start)
        u = ∇_y f(x_k, y; ζ_k),  ∇_x f(x_k, y; ζ_k)
        v ← v − η (H(ξ'_n) v − u),  n = 1 … N                  (warm start, fresh batches)
        d = ∇_x f − J(ξ'') v,   x ← x − α d

    Warm-starting y and v (the amortization) lets small fixed T, N suffice; at rest
    ``v = H⁻¹ ∇_y f`` exactly (no truncation bias).

    Parts: :class:`~bilevel.parts.LowerSGD` (β, T), :class:`~bilevel.parts.DualSteps`
    (N, η), :class:`~bilevel.parts.PlainDirection`, SGD (α).

    Cost per iteration: ``T Gy + 1 Gf + N H + 1 J``; T + N + 1 lower batches, 1 upper.

    Args:
        lr_lower: β: ``"auto"`` (default: ``0.5/λ̂``), a number or a schedule.  lower_steps: T (default 10).
        dual_steps: N (default 10).  lr_dual: η (default β_k, as the benchmark).
        lr_upper: α: ``"auto"`` (default, DoG) or given.

    Example:
        >>> import bilevel as bl
        >>> p = bl.problems.finite_sum_quadratic(n_lower=64, n_upper=32, dim_x=3, dim_y=4, mu=0.5, seed=0)
        >>> r = bl.solve(p, bl.AmIGO(lr_lower=0.5, lower_steps=2, dual_steps=2, lr_upper=0.5), max_iters=100)
        >>> float((r.x["x"] - p.x_star["x"]).norm()) < 1e-8
        True

    Reference: M. Arbel, J. Mairal, "Amortized implicit differentiation for stochastic
    bilevel optimization", ICLR 2022.
    """

    name: ClassVar[str] = "AmIGO"
    dual_option: ClassVar[str | None] = "lr_dual"
    dual_steps: int = option(10, check_count)
    lr_dual: float | str | None = option(None, _check_auto_or_none)

    def build_multiplier(self) -> Any:
        return DualSteps(steps=self.dual_steps, lr=None if is_auto(self.lr_dual) else cast(float | None, self.lr_dual))

    def multiplier_of(self, matvec_at: Any, b: Tree, v: Tree, k: int, inverse: torch.Tensor | None = None) -> Tree:
        eta = self.dual_step(k, self.lr_dual, inverse)
        return cast(DualSteps, self.parts.multiplier).solve(matvec_at, b, eta, v)


@dataclass(frozen=True, kw_only=True)
class F2SA(Stochastic):
    """F2SA: fully first-order stochastic approximation (Kwon, Kwon, Wright & Nowak, 2023).

    The penalty ``L_λ(x, y) = f(x, y) + λ (g(x, y) − g*(x))`` with ``∇g*(x) = ∇_x g(x, y*(x))``;
    a shadow z tracks y*(x) and y tracks argmin_y (f + λ g). Outer iteration k, for
    t = 0 … T−1 with independent draws::

        z ← z − β^z_k ∇_y g(x_k, z; ξ_{k,2t})
        y ← y − β^y_k [∇_y f(x_k, y; ζ_{k,t}) + λ_k ∇_y g(x_k, y; ξ_{k,2t+1})]

    then ``d_k = ∇_x f(x_k, y; ζ_{k,T}) + λ_k [∇_x g(x_k, y; ξ_{k,2T}) − ∇_x g(x_k, z; ξ_{k,2T+1})]``,
    ``x ← x − α_k d_k`` and ``λ_{k+1} = λ_k + δ_k`` (:class:`~bilevel.parts.PenaltyIncrements`).
    No second derivative. At a fixed λ the rest point solves ∇_x min_y L_λ = 0: on a
    quadratic, the implicit gradient with ``H_λ = A + ∇²_yy f / λ`` (an O(1/λ) bias that
    the growing λ removes).

    Cost per iteration: ``T (2 Gy + 1 ∇_y f) + 1 Gf + 2 Gx``; 2T + 2 lower and T + 1 upper
    batches. Memory: x, y, z. The y step is stable while ``β^y_k λ_k L_g < 2``.

    Args:
        lr_lower: β^y_k: ``"auto"`` (default: ``0.5 (k+1)^{−5/7}/λ̂_y``, λ̂_y the tracked
            curvature of ``f + λ_k g`` at y from differences of gradients) or given (the
            benchmark's ``0.1 (k+1)^{−5/7}``).  lr_shadow: β^z_k: ``"auto"`` (default:
            ``0.5 (k+1)^{−4/7}/λ̂_g``) or given (``0.1 (k+1)^{−4/7}``).  lr_upper: α_k:
            ``"auto"`` (default, DoG) or given (``0.1 (k+1)^{−4/7}``).
        lower_steps: T (default 10).  lambda0: λ_0 (default 1).  delta0: δ_0 (default
            0.01; 0 keeps λ fixed).  delta_power: δ_k = δ_0 (k+1)^{−delta_power} (1/7).

    State: ``extra["shadow"] = LowerShadowState(z)``, ``extra["penalty"] = PenaltyState(λ)``;
    ``v`` is unused (``None``).

    Example:
        >>> import bilevel as bl
        >>> p = bl.problems.finite_sum_quadratic(n_lower=64, n_upper=32, dim_x=3, dim_y=4, mu=0.5, seed=0)
        >>> r = bl.solve(p, bl.F2SA(lr_lower=0.04, lr_shadow=0.5, lr_upper=0.5, lambda0=20.0, delta0=0.0, lower_steps=5), max_iters=100)
        >>> 0.005 < float((r.x["x"] - p.x_star["x"]).norm()) < 0.05      # the O(1/λ) bias
        True

    Reference: J. Kwon, D. Kwon, S. Wright, R. Nowak, "A fully first-order method for
    stochastic bilevel optimization", ICML 2023.
    """

    name: ClassVar[str] = "F2SA"
    uses_multiplier: ClassVar[bool] = False
    auto_lower_power: ClassVar[float] = 5 / 7
    auto_shadow_power: ClassVar[float] = 4 / 7
    lr_lower: ScheduleLike | str = option("auto", check_auto_step_size)
    lr_shadow: ScheduleLike | str = option("auto", check_auto_step_size)
    lower_steps: int = option(10, check_count)
    lambda0: float = option(1.0, check_positive)
    delta0: float = option(0.01, check_nonnegative)
    delta_power: float = option(1 / 7, check_nonnegative)

    def build_parts(self) -> Parts:
        lower = LowerSGD(lr=self.lower_shape(), steps=self.lower_steps)
        return Parts(lower=lower, measure=DirectionNorm(), upper=auto_upper(self.lr_upper))

    @property
    def auto_shadow(self) -> bool:
        """Whether z's step is auto (``lr_shadow="auto"``)."""
        return is_auto(self.lr_shadow)

    @property
    def tracks_curvature(self) -> bool:
        """One tracker serves both auto steps: of g at z (β^z) and of f + λ_k g at y (β^y)."""
        return self.auto_lower or self.auto_shadow

    @cached_property
    def finite_differences(self) -> Oracles:
        """F2SA stays first order with auto steps: its curvature products are differences of gradients."""
        return Oracles(mode="finite_difference", fd_eps=1e-4)

    def curvature_matvec(self, fn: Any, x: Tree, y: Tree, batch: Any) -> Any:
        return self.finite_differences.linearize(fn, x, y, batch).hvp

    def _penalised(self, problem: Problem, lam: float) -> Any:
        """``f(·; ζ) + λ g(·; ξ)``, the objective of y, on a :class:`_BothBatches` (ζ, ξ)."""
        return lambda xx, yy, both: problem.upper(xx, yy, both.upper) + lam * problem.lower(xx, yy, both.lower)

    def start_auto(self, problem: Problem, state: State, draws: Any) -> State:
        if self.curvature is None:
            return state
        lam = float(cast(PenaltyState, state.extra["penalty"]).lam)
        both = _BothBatches(draws.upper(0), draws.lower(0))
        matvec = self.curvature_matvec(self._penalised(problem, lam), state.x, state.y, both)
        return state.replace(extra={**state.extra, "curvature_y": self.curvature.start(matvec, state.y)})

    @cached_property
    def shadow_schedule(self) -> Any:
        shape = Polynomial(self.auto_lower_scale, self.auto_shadow_power)
        return as_schedule(shape if self.auto_shadow else cast(ScheduleLike, self.lr_shadow))

    @cached_property
    def penalty(self) -> PenaltyIncrements:
        return PenaltyIncrements(lambda0=self.lambda0, delta0=self.delta0, power=self.delta_power)

    def initial_state(self, x: Tree, y: Tree) -> State:
        state = super().initial_state(x, y)
        return state.replace(extra={**state.extra, "shadow": LowerShadowState(z=T.clone(y)), "penalty": self.penalty.init()})

    def step(self, problem: Problem, state: State, batch: Any = None) -> tuple[State, dict]:
        oracles, k, x = self.derivatives, state.k, state.x
        draws = as_draws(batch)
        lower = cast(LowerSGD, self.parts.lower)
        lam = cast(PenaltyState, state.extra["penalty"]).lam
        z, y = cast(LowerShadowState, state.extra["shadow"]).z, state.y
        beta_y: Any = lower.schedule(k)
        beta_z: Any = self.shadow_schedule(k)
        # β^z = c_k/λ̂(∇²g at z), β^y = c_k/λ̂(∇²(f + λ_k g) at y), both first order
        curvature_z, inverse_z = self.track_curvature(problem.lower, x, z, lambda: draws.lower(0), state.extra.get("curvature"), k)
        both = lambda: _BothBatches(draws.upper(0), draws.lower(1))  # built only when a refresh is due
        curvature_y, inverse_y = self.track_curvature(self._penalised(problem, float(lam)), x, y, both, state.extra.get("curvature_y"), k)
        if inverse_z is not None and self.auto_shadow:
            beta_z = beta_z * inverse_z
        if inverse_y is not None and self.auto_lower:
            beta_y = beta_y * inverse_y
        grad_y_g = None
        for t in range(lower.steps):
            gz, _ = oracles.gradient_y(problem.lower, x, z, draws.lower(2 * t))
            z = T.axpy(-beta_z, gz, z)
            fy, _ = oracles.gradient_y(problem.upper, x, y, draws.upper(t))
            grad_y_g, _ = oracles.gradient_y(problem.lower, x, y, draws.lower(2 * t + 1))
            y = T.axpy(-beta_y, T.axpy(lam, grad_y_g, fy), y)
        steps = lower.steps
        fx, _, value = oracles.gradients(problem.upper, x, y, draws.upper(steps))
        gx_y, _, _ = oracles.gradients(problem.lower, x, y, draws.lower(2 * steps))
        gx_z, _, _ = oracles.gradients(problem.lower, x, z, draws.lower(2 * steps + 1))
        direction = T.axpy(lam, T.sub(gx_y, gx_z), fx)
        info = self.report(value, grad_y_g, x, direction)
        info["penalty"] = torch.as_tensor(lam)
        x_next, opt, direction_state = self.update_x(x, direction, state)
        extra = {
            **state.extra,
            "direction": direction_state,
            "shadow": LowerShadowState(z=z),
            "penalty": self.penalty.update(cast(PenaltyState, state.extra["penalty"]), k),
        }
        if curvature_y is not None:
            extra["curvature_y"] = curvature_y
        if self.auto_shadow:
            info["lr_shadow"] = torch.as_tensor(beta_z)
        new_state = State(x=x_next, y=y, v=None, opt=opt, k=k + 1, extra=extra)
        return self.conclude_auto(new_state, info, curvature_z, inverse_y, k), info
