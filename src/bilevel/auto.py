"""``"auto"`` step sizes: the parts that let a method run with no step size given.

Every step-size argument of GALET, sl-BAMM, BAGDC, AID and the unrolled ITD, T-RHG and
BDA accepts ``"auto"`` (their default; the unrolled methods take one β per unroll from a
tracked curvature, :class:`TrackedLower`, and DoG for α). Each choice below is a part with a typed state (:mod:`bilevel.state`), so a
checkpoint resumes an auto run exactly; docs/auto.md gives the evidence for each.

==========================  ===============================================================  ==========================
step                        rule                                                             extra oracle calls
==========================  ===============================================================  ==========================
lower β (``lr_lower``)      :class:`AdaptiveLower`: adaptive gradient descent without descent  none (the secant reuses
                            (Malitsky & Mishchenko 2020) with the secant at fixed ``x_k``,     the gradient the
                            ``β₀ = 1/λ̂`` from 30 power products at ``init``                   linearization makes)
GALET's shadow ρ            :class:`CGLS` on ``min ½‖H v − ∇_y f‖²``: no step at all,        2 H-products more per
(``lr_shadow``)             warm-started from the previous multiplier                        iteration than ``NormalGD``
dual η (``lr_dual``)        :class:`MonitoredLineSearch`: the exact line search every         1 H-product every
                            ``period`` (2) iterations, its step kept in between, replaced by   ``period`` iterations
                            ``min(η, β)`` while the residual grows
upper α (``lr_upper``)      :class:`DoG` (distance over gradients, Ivgi, Hinder & Carmon      none
                            2023): ``α_k = r̄_k / √Σ‖d_i‖²``
guard                       a blow-up (non-finite values, or ``‖∇_y φ‖`` growing more than    none
                            ``growth`` times over one lower step) restores the state before
                            the iteration and halves β; at most ``max_retries`` in a row
==========================  ===============================================================  ==========================

The auto step sizes are diagnostics of every record: ``lr_lower`` (β), ``lr_upper``
(α), ``lr_dual`` (η, sl-BAMM and BAGDC) and ``rollbacks`` (guard restores so far).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple, TextIO

import torch

from . import tree as T
from .linsolve import LinearSolver, LinearSolveResult, _safe_divide, estimate_spectral_norm, line_search_step_size, power_start
from .oracles import Oracles
from .parts.base import MatVec, check_weight
from .parts.measure import linearize
from .problem import Problem
from .schedules import ScheduleLike, as_schedule
from .state import EmptyState, State, part_state
from .tree import Tree
from .updates import as_upper_optimizer
from .validation import ArgumentTypeError, check_count, check_number, check_positive, check_step_size, describe

__all__ = [
    "AUTO",
    "CGLS",
    "AdamDoG",
    "AdamDoGState",
    "AdaptiveLower",
    "AdaptiveLowerState",
    "AutoStepReporter",
    "AutoSteps",
    "CurvatureState",
    "CurvatureTracker",
    "DoG",
    "DoGState",
    "JointAutoSteps",
    "MonitoredLineSearch",
    "MonitoredState",
    "TrackedLower",
    "TrackedLowerState",
    "adaptive_start",
    "auto_upper",
    "check_auto_positive",
    "check_auto_step_size",
    "check_auto_upper",
    "is_auto",
    "is_distance_rule",
    "joint_dog_step",
    "undo_where",
    "upper_step",
]

#: the value of a step-size argument that asks for an automatic step
AUTO = "auto"


def is_auto(value: Any) -> bool:
    """Whether a step-size argument is ``"auto"``."""
    return isinstance(value, str) and value == AUTO


def _check_string(owner: str, name: str, value: Any) -> bool:
    if isinstance(value, str):
        if value != AUTO:
            raise ArgumentTypeError(f"{describe(owner, name, value)} must be a positive number or 'auto'")
        return True
    return False


def check_auto_positive(owner: str, name: str, value: Any) -> Any:
    """A positive number, or ``"auto"``."""
    if not _check_string(owner, name, value):
        check_positive(owner, name, value)
    return value


def check_auto_step_size(owner: str, name: str, value: Any) -> Any:
    """A positive number or a schedule, or ``"auto"``."""
    if not _check_string(owner, name, value):
        check_step_size(owner, name, value)
    return value


def check_auto_upper(owner: str, name: str, value: Any) -> Any:
    """``lr_upper``: ``"auto"`` (:class:`DoG`), a positive step, a schedule or an upper optimizer."""
    if not _check_string(owner, name, value):
        as_upper_optimizer(value, name, owner)
    return value


def auto_upper(value: Any) -> Any:
    """The upper optimizer of an ``lr_upper`` that may be ``"auto"`` (``None`` otherwise: the
    method's parts then take it from ``lr_upper`` as usual)."""
    return DoG() if is_auto(value) else None


def _like(tree: Tree) -> torch.Tensor:
    return T.leaves(tree)[0]


def _scalar(value: float, like: Tree) -> torch.Tensor:
    leaf = _like(like)
    return torch.tensor(value, dtype=leaf.dtype, device=leaf.device)


def _select(keep_old: torch.Tensor, old: Any, new: Any) -> Any:
    """``old`` where ``keep_old`` else ``new``, through tensors, trees and part states (no host sync)."""
    if isinstance(new, torch.Tensor):
        return torch.where(keep_old, old, new)
    if isinstance(new, tuple) and hasattr(new, "_fields"):
        return type(new)(*(_select(keep_old, a, b) for a, b in zip(old, new, strict=True)))
    if isinstance(new, (list, tuple)):
        return type(new)(_select(keep_old, a, b) for a, b in zip(old, new, strict=True))
    if isinstance(new, dict):
        return {key: _select(keep_old, old[key], item) for key, item in new.items()}
    return new


def undo_where(undo: torch.Tensor, old: State, new: State, lower_state: Any) -> State:
    """``new``, or ``old`` where ``undo`` (a 0-d bool, no host sync): the guards' restore of
    a whole iteration — x, y, v, the optimizer and every part state — except the lower
    step's own state, which is ``lower_state`` either way (it carries the halved step);
    the iteration counter is ``new``'s."""
    keys = [key for key in new.extra if key != "lower"]
    kept = _select(undo, {key: old.extra.get(key, EmptyState()) for key in keys}, {key: new.extra[key] for key in keys})
    return State(
        x=_select(undo, old.x, new.x),
        y=_select(undo, old.y, new.y),
        v=_select(undo, old.v, new.v),
        opt=_select(undo, old.opt, new.opt),
        k=new.k,
        extra={**kept, "lower": lower_state},
    )


# --------------------------------------------------------------------------- lower β


@part_state
class AdaptiveLowerState(NamedTuple):
    """The state of :class:`AdaptiveLower` (0-d tensors): the step ``beta``, the ratio
    ``theta`` of the last two steps, ``retries`` (guard restores in a row) and
    ``rollbacks`` (guard restores in all)."""

    beta: torch.Tensor
    theta: torch.Tensor
    retries: torch.Tensor
    rollbacks: torch.Tensor


@dataclass(frozen=True)
class AdaptiveLower:
    """Lower dynamics with an adaptive step: adaptive gradient descent without descent
    (AdGD, Malitsky & Mishchenko 2020) on ``φ_μ = μ f + (1 − μ) g`` (g when μ = 0).

    With ``∇_t = ∇_y φ_μ(x_k, y_t)`` at the fixed upper point ``x_k``::

        L_t     = ‖∇_t − ∇_{t−1}‖ / ‖y_t − y_{t−1}‖            (a local curvature estimate)
        β_t     = min(√(1 + θ_{t−1}) β_{t−1}, 1/(2 L_t)),   θ_t = β_t / β_{t−1}
        y_{t+1} = y_t − β_t ∇_t

    The secant never mixes two upper points: inside an iteration it uses consecutive lower
    steps, and after the last one the gradient at ``(x_k, y_{k+1})`` that the linearization
    of the iteration computes anyway (:meth:`observe`), so the rule costs no oracle call.
    β₀ is ``1/λ̂`` with λ̂ from 30 power-iteration products at ``init``
    (``AutoSteps.init``); AdGD needs only local smoothness, so β follows the curvature
    when it changes with x.

    Guard: a lower step after which ``‖∇_{t+1}‖ > growth ‖∇_t‖`` (or a non-finite value) is
    undone, β halved and θ reset (at most ``max_retries`` in a row; the counters are in the
    state). AdGD is not monotone: the guard is deliberately loose (10×).

    Args:
        steps: N, lower steps per upper iteration.
        mu: μ, a number in [0, 1) or a schedule of the upper iteration k (sl-BAMM's μ_k).
        growth: the gradient growth over one step that counts as a blow-up.
        max_retries: restores in a row before the guard gives up (the run then diverges
            and :func:`bilevel.solve` reports it).

    Reference: Yura Malitsky, Konstantin Mishchenko, "Adaptive Gradient Descent without
    Descent", ICML 2020, arXiv:1910.09529.
    """

    steps: int = 1
    mu: ScheduleLike = 0.0
    growth: float = 10.0
    max_retries: int = 5

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_count(owner, "steps", self.steps)
        check_weight(owner, "mu", self.mu)
        check_number(owner, "growth", self.growth, low=1.0, low_open=True)
        check_count(owner, "max_retries", self.max_retries)

    def init(self, y: Tree, beta: float = 1.0) -> AdaptiveLowerState:
        zero = _scalar(0.0, y)
        return AdaptiveLowerState(beta=_scalar(beta, y), theta=_scalar(1e9, y), retries=zero, rollbacks=zero.clone())

    def averaging(self, k: int) -> float:
        return float(as_schedule(self.mu)(k))

    def gradient(self, problem: Problem, x: Tree, y: Tree, batch: Any, oracles: Oracles, k: int) -> Tree:
        """``∇_y φ_{μ_k}(x, y)`` (one backward pass)."""
        mu = self.averaging(k)
        if mu == 0.0:
            return oracles.gradient_y(problem.lower, x, y, batch)[0]

        def phi(xx: Tree, yy: Tree, bb: Any) -> torch.Tensor:
            return mu * problem.upper(xx, yy, bb) + (1.0 - mu) * problem.lower(xx, yy, bb)

        return oracles.gradient_y(phi, x, y, batch)[0]

    def adapt(self, state: AdaptiveLowerState, y0: Tree, g0: Tree, y1: Tree, g1: Tree) -> tuple[AdaptiveLowerState, torch.Tensor]:
        """The AdGD step after the secant ``(y0, g0) → (y1, g1)`` at one upper point, and
        whether the step ``y0 → y1`` blew up (a 0-d bool: undo it, the state then holds β/2)."""
        beta, theta = state.beta, state.theta
        g1_norm, g0_norm = T.norm(g1), T.norm(g0)
        dy, dg = T.norm(T.sub(y1, y0)), T.norm(T.sub(g1, g0))
        # a step below rounding (10 eps ‖y‖) carries no curvature information (and no blow-up)
        moved = dy > 10.0 * torch.finfo(dy.dtype).eps * T.norm(y1)
        bound = _safe_divide(dy, 2.0 * dg)
        grown = torch.sqrt(1.0 + theta) * beta
        candidate = torch.where(moved & (bound > 0), torch.minimum(grown, bound), beta)
        bad = ~torch.isfinite(g1_norm) | (moved & (g1_norm > self.growth * g0_norm))
        can_retry = state.retries < self.max_retries
        undo = bad & can_retry
        new_beta = torch.where(undo, 0.5 * beta, candidate)
        new_theta = torch.where(undo, torch.zeros_like(theta), torch.where(moved, new_beta / beta, theta))
        retries = torch.where(undo, state.retries + 1, torch.zeros_like(state.retries))
        return AdaptiveLowerState(new_beta, new_theta, retries, state.rollbacks + undo.to(state.rollbacks.dtype)), undo

    def run_tracked(
        self, problem: Problem, x: Tree, y: Tree, batch: Any, oracles: Oracles, state: AdaptiveLowerState, k: int
    ) -> tuple[Tree, AdaptiveLowerState, Tree, Tree]:
        """N steps: ``(y_N, state, y_{N−1}, ∇_{N−1})`` (the start of the last step, for :meth:`observe`)."""
        prev_y: Tree = None
        prev_g: Tree = None
        for _ in range(self.steps):
            g = self.gradient(problem, x, y, batch, oracles, k)
            if prev_y is not None:
                state, undo = self.adapt(state, prev_y, prev_g, y, g)
                y, g = _select(undo, prev_y, y), _select(undo, prev_g, g)
            prev_y, prev_g = y, g
            y = T.axpy(-state.beta, g, y)
        return y, state, prev_y, prev_g

    def run(
        self, problem: Problem, x: Tree, y: Tree, batch: Any, oracles: Oracles, state: AdaptiveLowerState, k: int = 0
    ) -> tuple[Tree, Tree, AdaptiveLowerState]:
        """All steps (the :class:`~bilevel.parts.LowerDynamics` protocol): ``(y_N, last direction, state)``."""
        y, state, _, g = self.run_tracked(problem, x, y, batch, oracles, state, k)
        return y, g, state

    def _stateful(self) -> TypeError:
        return TypeError(
            "AdaptiveLower keeps its step in its state: it runs through run()/run_tracked() in the sequential "
            "alternating template; give lr_lower a number for the Jacobi order or an unrolled method"
        )

    def step(self, problem: Problem, x: Tree, y: Tree, batch: Any, t: int, oracles: Oracles, k: int = 0) -> tuple[Tree, Tree]:
        """Not available: the step lives in the state (raises ``TypeError``)."""
        raise self._stateful()

    def differentiable_step(self, problem: Problem, x: Tree, y: Tree, batch: Any, t: int, k: int = 0) -> tuple[Tree, Tree]:
        """Not available: the step lives in the state (raises ``TypeError``)."""
        raise self._stateful()

    def apply(self, y: Tree, gradient: Tree) -> Tree:
        """Not available: the step lives in the state (raises ``TypeError``)."""
        raise self._stateful()

    def observe(self, state: AdaptiveLowerState, y0: Tree, g0: Tree, y1: Tree, g1: Tree) -> tuple[AdaptiveLowerState, torch.Tensor]:
        """Adapt β from the last step's secant, with ``g1 = ∇_y φ(x_k, y_{k+1})`` from the
        linearization; returns the state and whether the iteration must be undone."""
        return self.adapt(state, y0, g0, y1, g1)


# --------------------------------------------------------------------------- unrolled β


@part_state
class TrackedLowerState(NamedTuple):
    """The state of :class:`TrackedLower`: the power-iteration vector ``u`` (unit norm,
    shaped like y), the curvature estimate ``lam`` (λ̂), the safety factor ``scale``
    (β = scale/λ̂, halved by the guard), ``retries`` (guard restores in a row) and
    ``rollbacks`` (in all); 0-d tensors but ``u``."""

    u: Tree
    lam: torch.Tensor
    scale: torch.Tensor
    retries: torch.Tensor
    rollbacks: torch.Tensor


@dataclass(frozen=True)
class TrackedLower:
    """A step for unrolled lower dynamics (ITD, T-RHG, BDA) from the curvature at the start
    of each unroll, kept current by a warm-started power iteration:

        λ̂_k = ‖H u_{k−1}‖,  u_k = H u_{k−1} / λ̂_k,  H = ∇²_yy φ_μ0(x_k, y_0)    (``power_steps`` products)
        β_k = s_k / λ̂_k                                                        (s_0 = 1)

    and the ``dynamics`` (:class:`~bilevel.parts.LowerGD` or
    :class:`~bilevel.parts.LowerAggregated`) run with β_k, one number for the whole
    unroll, so back-propagation differentiates the usual steps (β_k enters as a constant,
    like a given step). λ̂_0 comes from 30 products at ``init``. β = 1/λ̂ is half the
    stability bound 2/λ_max of a quadratic, so the estimate may be low by up to 2×. Guard:
    an iteration whose direction is not finite, or whose last lower gradient is more than
    ``growth`` times the gradient at y_0, is undone (x, y and every part state restored,
    ``torch.where``, no host sync) and s is halved, at most ``max_retries`` times in a row.

    Cost: one gradient with its graph at ``(x_k, y_0)`` and ``power_steps`` Hessian
    products per iteration (the gradient norm the guard compares with comes from it).

    Args:
        dynamics: the lower dynamics whose step is chosen (its ``lr`` is replaced).
        power_steps: power-iteration products per upper iteration.
        growth: the guard's threshold on ``‖∇_y g(y_T)‖ / ‖∇_y g(y_0)‖``.
        max_retries: consecutive guard restores before a step is accepted anyway.
    """

    dynamics: Any
    power_steps: int = 1
    growth: float = 10.0
    max_retries: int = 5

    def __post_init__(self) -> None:
        check_count("TrackedLower", "power_steps", self.power_steps)
        check_number("TrackedLower", "growth", self.growth, low=1.0, low_open=True)
        check_count("TrackedLower", "max_retries", self.max_retries, minimum=0)

    @property
    def steps(self) -> int:
        return int(self.dynamics.steps)

    def averaging(self, k: int) -> float:
        return float(self.dynamics.averaging(k))

    def hessian(self, problem: Problem, oracles: Oracles, x: Tree, y: Tree, batch: Any, k: int) -> tuple[MatVec, torch.Tensor]:
        """``(v ↦ H v, reference)`` at ``(x, y)``: H of the objective φ_μ the dynamics descend
        at their first step, and the guard's reference for ``‖∇_y g‖²`` at the end of the
        unroll: ``‖∇_y g(y)‖²``, or with μ > 0 ``(‖∇_y g‖ + μ/(1 − μ) ‖∇_y f‖)²`` (at a
        fixed point of the aggregated dynamics ``(1 − μ) ∇_y g = −μ ∇_y f``)."""
        mu = self.averaging(k)
        if mu == 0.0:
            lin = oracles.linearize(problem.lower, x, y, batch)
            return lin.hvp, T.sq_norm(lin.grad_y)
        point = linearize(oracles, problem, mu, x, y, batch)
        g_sq, f_sq = T.sq_norms(point.g.grad_y, point.grad_y_f)
        return point.phi.hvp, (g_sq.sqrt() + (mu / (1.0 - mu)) * f_sq.sqrt()).square()

    def init(self, y: Tree) -> TrackedLowerState:
        """A fixed-seed random unit vector and no estimate yet (the unrolled template then
        makes 30 power products at ``init``: :meth:`start`)."""
        u = power_start(y)
        return TrackedLowerState(u=u, lam=_scalar(0.0, y), scale=_scalar(1.0, y), retries=_scalar(0.0, y), rollbacks=_scalar(0.0, y))

    def start(self, matvec: MatVec, y: Tree, iters: int = 30) -> TrackedLowerState:
        """The state after ``iters`` power products from :meth:`init`'s vector (no host sync)."""
        return self.refresh(matvec, self.init(y), iters)

    def _outside(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "TrackedLower sets β once per unroll: it runs inside an unrolled method (bilevel.ITD, TRHG, BDA "
            "with lr_lower='auto'); elsewhere use its dynamics_at(beta) or give a number"
        )

    run = step = differentiable_step = apply = _outside

    def refresh(self, matvec: MatVec, state: TrackedLowerState, iters: int | None = None) -> TrackedLowerState:
        """``iters`` (default ``power_steps``) warm-started power products."""
        u, lam = state.u, state.lam
        for _ in range(self.power_steps if iters is None else iters):
            hu = matvec(u)
            lam = T.norm(hu)
            scaled = T.scale(1.0 / torch.clamp(lam, min=torch.finfo(lam.dtype).tiny), hu)
            u = _select(lam <= 0, u, scaled)  # H u = 0 (no curvature along u): keep u, β falls back to s
        return state._replace(u=u, lam=lam)

    def initial(self, problem: Problem, oracles: Oracles, x: Tree, y: Tree, batch: Any) -> TrackedLowerState:
        """The state at ``init``: 30 power products at the first unroll's start ``(x, y)``."""
        matvec, _ = self.hessian(problem, oracles, x, y, batch, 0)
        return self.start(matvec, y)

    def begin(
        self, problem: Problem, oracles: Oracles, x: Tree, y: Tree, batch: Any, k: int, state: TrackedLowerState
    ) -> tuple[Any, TrackedLowerState, torch.Tensor]:
        """At the start ``(x_k, y_0)`` of unroll k: the dynamics with β_k, the refreshed state
        and the guard's reference (:meth:`hessian`)."""
        matvec, reference_sq = self.hessian(problem, oracles, x, y, batch, k)
        state = self.refresh(matvec, state)
        return self.dynamics_at(self.step_size(state)), state, reference_sq

    def conclude(self, old: State, new: State, state: TrackedLowerState, reference_sq: torch.Tensor, info: dict) -> State:
        """After the iteration: :meth:`guard` on ``info``'s ``lower_grad_sq`` and ``direction_sq``,
        the iteration undone if it blew up (:func:`undo_where`), and ``lr_lower`` and
        ``rollbacks`` added to ``info``."""
        blown, state = self.guard(state, reference_sq, info["lower_grad_sq"], info["direction_sq"])
        info.update(lr_lower=self.step_size(state), rollbacks=state.rollbacks)
        return undo_where(blown, old, new, state)

    def step_size(self, state: TrackedLowerState) -> torch.Tensor:
        """β = s/λ̂ (s when λ̂ = 0)."""
        return torch.where(state.lam > 0, state.scale / torch.clamp(state.lam, min=torch.finfo(state.lam.dtype).tiny), state.scale)

    def dynamics_at(self, beta: torch.Tensor) -> Any:
        """The dynamics with the step β (a 0-d tensor) in place of their ``lr``."""
        copy = object.__new__(type(self.dynamics))
        copy.__dict__.update(self.dynamics.__dict__)  # a frozen dataclass: bypass its number check for a tensor step
        object.__setattr__(copy, "lr", beta)
        return copy

    def guard(
        self, state: TrackedLowerState, reference_sq: torch.Tensor, end_grad_sq: torch.Tensor, direction_sq: torch.Tensor
    ) -> tuple[torch.Tensor, TrackedLowerState]:
        """``(blown, next state)``: whether to undo the iteration (a non-finite direction or
        lower gradient, or ``‖∇_y g(y_T)‖² > growth² · reference``), and s halved if so."""
        bad = ~torch.isfinite(direction_sq) | ~torch.isfinite(end_grad_sq) | (end_grad_sq > self.growth**2 * reference_sq)
        blown = bad & (state.retries < self.max_retries)
        return blown, state._replace(
            scale=torch.where(blown, 0.5 * state.scale, state.scale),
            retries=torch.where(blown, state.retries + 1, torch.zeros_like(state.retries)),
            rollbacks=state.rollbacks + blown.to(state.rollbacks.dtype),
        )


# --------------------------------------------------------------------------- stochastic β


@part_state
class CurvatureState(NamedTuple):
    """The state of :class:`CurvatureTracker`: the power-iteration vector ``u`` (unit norm,
    shaped like y), the estimate ``lam`` (λ̂) and the scale ``inverse`` = 1/λ̂ the steps use
    (1 when λ̂ is 0 or not finite), 0-d tensors but ``u``."""

    u: Tree
    lam: torch.Tensor
    inverse: torch.Tensor


@dataclass(frozen=True)
class CurvatureTracker:
    """The lower curvature of a stochastic method, kept current along the run: the steps of
    y and of the multiplier become ``β_k = c_k / λ̂`` with ``c_k`` a unit-curvature shape
    (the method's, e.g. ``0.5 (k+1)^{−1/2}`` for SOBA)::

        λ̂ = ‖H(ξ) u‖,  u ← H(ξ) u / λ̂        (H = ∇²_yy g on a lower batch ξ)

    30 warm products at ``init`` on the first lower batch, then one product every ``every``
    iterations on the iteration's first lower batch, at ``(x_k, y_k)``. A batch Hessian
    varies from batch to batch; the warm-started iteration follows the top eigenvalue of
    their mean closely enough for a step that also decays or is variance-reduced. The
    scale is applied to the directions, not to g, so the multiplier v stays in the units
    of ``H v = ∇_y f`` and the SAGA/SARAH memories keep unscaled oracle values.

    Cost: one gradient with its graph and one Hessian product every ``every`` iterations
    (3 gradient units; 0.3 per iteration at ``every = 10``).

    Args:
        every: iterations between two refreshing products.
    """

    every: int = 10

    def __post_init__(self) -> None:
        check_count("CurvatureTracker", "every", self.every)

    def start(self, matvec: MatVec, y: Tree, iters: int = 30) -> CurvatureState:
        """The state after ``iters`` products from a fixed-seed random unit vector (no host sync)."""
        zero = _scalar(0.0, y)
        return self.refresh(matvec, CurvatureState(u=power_start(y), lam=zero, inverse=zero + 1.0), iters)

    def refresh(self, matvec: MatVec, state: CurvatureState, iters: int = 1) -> CurvatureState:
        """``iters`` warm-started power products."""
        u, lam = state.u, state.lam
        for _ in range(iters):
            hu = matvec(u)
            lam = T.norm(hu)
            scaled = T.scale(1.0 / torch.clamp(lam, min=torch.finfo(lam.dtype).tiny), hu)
            u = _select(~(lam > 0), u, scaled)  # H u = 0 along u: keep u
        return CurvatureState(u=u, lam=lam, inverse=self._inverse(lam))

    def due(self, k: int) -> bool:
        """Whether iteration k refreshes the estimate."""
        return k > 0 and k % self.every == 0

    @staticmethod
    def _inverse(lam: torch.Tensor) -> torch.Tensor:
        usable = (lam > 0) & torch.isfinite(lam)
        return torch.where(usable, 1.0 / torch.where(usable, lam, torch.ones_like(lam)), torch.ones_like(lam))


# --------------------------------------------------------------------------- GALET's shadow


@dataclass(frozen=True)
class CGLS(LinearSolver):
    """CGLS (conjugate gradient on the normal equations ``H² v = H b``, Hestenes & Stiefel
    1952; Paige & Saunders 1982) for ``min_v ½‖H v − b‖²`` with H symmetric: no step size.

    From ``v₀ = 0`` every iterate lies in the range of H, so on a singular H the limit is
    the minimum-norm least-squares solution, the point GALET's shadow gradient descent
    converges to (``w = −v``). Per iteration, with ``r = b − Hv``, ``s = H r``::

        q = H p,  a = ‖s‖²/‖q‖²,  v ← v + a p,  r ← r − a q,
        s' = H r,  p ← s' + (‖s'‖²/‖s‖²) p

    2T Hessian products (2T + 1 warm-started), like :class:`~bilevel.NormalGD` (2T − 1,
    2T); divisions by zero give a zero step (no host sync). ``residual_sq`` and
    ``normal_residual_sq`` (``‖Hv − b‖²``, ``‖H(Hv − b)‖²``) are the free values at the
    iterate before the last, as for ``NormalGD``.

    Args:
        steps: iterations.

    Example:
        >>> import torch, bilevel as bl
        >>> H = torch.diag(torch.tensor([2.0, 0.0], dtype=torch.float64)); b = torch.ones(2, dtype=torch.float64)
        >>> bl.auto.CGLS(steps=2)(lambda v: H @ v, b).v       # min-norm LS solution of a singular system
        tensor([0.5000, 0.0000], dtype=torch.float64)

    Reference: Christopher C. Paige, Michael A. Saunders, "LSQR: An Algorithm for Sparse
    Linear Equations and Sparse Least Squares", ACM TOMS 8(1), 1982.
    """

    steps: int = 10

    def __post_init__(self) -> None:
        check_count("CGLS", "steps", self.steps)

    def hvps(self) -> int:
        return 2 * self.steps

    def __call__(self, matvec: MatVec, b: Tree, v0: Tree | None = None) -> LinearSolveResult:
        if v0 is None:
            v, r = T.zeros_like(b), b
        else:
            v, r = v0, T.sub(b, matvec(v0))
        s = matvec(r)
        p = s
        gamma = T.sq_norm(s)
        residual_sq = T.sq_norm(r)
        for t in range(self.steps):
            q = matvec(p)
            a = _safe_divide(gamma, T.sq_norm(q))
            v = T.axpy(a, p, v)
            if t == self.steps - 1:  # the next H r would only serve the next direction
                break
            r = T.axpy(-a, q, r)
            residual_sq = T.sq_norm(r)
            s = matvec(r)
            gamma_next = T.sq_norm(s)
            p = T.axpy(_safe_divide(gamma_next, gamma), p, s)
            gamma = gamma_next
        return LinearSolveResult(v=v, residual_sq=residual_sq, normal_residual_sq=gamma)


# --------------------------------------------------------------------------- dual η


@part_state
class MonitoredState(NamedTuple):
    """The state of :class:`MonitoredLineSearch` (0-d tensors): the step ``eta`` in use, the
    squared residual ``r_sq`` of the previous iteration and ``safe``, the step taken when
    the residual grows (the method sets it to its lower step β, stable for the same Hessian)."""

    eta: torch.Tensor
    r_sq: torch.Tensor
    safe: torch.Tensor


@dataclass(frozen=True)
class MonitoredLineSearch:
    """A dual step rule: the exact line search ``η = ‖r‖²/(rᵀHr)`` every ``period``-th
    iteration; in between its step is kept, and replaced by ``min(η, safe)`` (for the rest
    of the period) on an iteration whose residual ``‖r_k‖`` exceeds ``‖r_{k−1}‖``; ``safe``
    (in the state) is the lower step β of the same Hessian, which :class:`AutoSteps` keeps
    current (otherwise ``fallback``).

    Reusing a line-search step (BAGDC's self-governed rule) is fast but can grow the
    residual without bound on ill-conditioned systems; the free residual monitor keeps
    it bounded. No host sync: the period is a Python test on k, the monitor a
    ``torch.where``. Cost: one Hessian product every ``period`` iterations.

    Args:
        period: iterations between line searches.
        fallback: the step when ``rᵀHr ≤ 0`` at a line search.
    """

    period: int = 2
    fallback: float = 0.1

    def __post_init__(self) -> None:
        check_count("MonitoredLineSearch", "period", self.period)
        check_positive("MonitoredLineSearch", "fallback", self.fallback)

    def init(self, v: Tree) -> MonitoredState:
        return MonitoredState(eta=_scalar(self.fallback, v), r_sq=_scalar(math.inf, v), safe=_scalar(self.fallback, v))

    def __call__(self, r: Tree, matvec: MatVec, k: int, state: MonitoredState) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        r_sq = T.sq_norm(r)
        if k % self.period == 0:
            eta = line_search_step_size(r_sq, T.vdot(r, matvec(r)), self.fallback, None)
        else:
            eta = torch.where(r_sq > state.r_sq, torch.minimum(state.eta, state.safe), state.eta)
        return eta, MonitoredState(eta=eta, r_sq=r_sq, safe=state.safe), r_sq


# --------------------------------------------------------------------------- upper α


@part_state
class DoGState(NamedTuple):
    """The state of :class:`DoG`: the start ``x0`` (a tree), ``rbar`` (the largest distance
    from it so far) and ``gsum`` (``Σ‖d_i‖²``), 0-d tensors."""

    x0: Tree
    rbar: torch.Tensor
    gsum: torch.Tensor


@dataclass(frozen=True)
class DoG:
    """Distance over gradients (DoG, Ivgi, Hinder & Carmon 2023), a parameter-free upper step::

        r̄_k = max(r_ε, max_{i≤k} ‖x_i − x_0‖),   G_k = Σ_{i≤k} ‖d_i‖²,
        x_{k+1} = x_k − (r̄_k / √G_k) d_k,          r_ε = r_rel (1 + ‖x_0‖)

    Scale-free in f and in x: the step grows geometrically while x travels and shrinks
    with the accumulated gradients, so no Lipschitz constant is needed. An upper optimizer
    (``init``/``update``, :mod:`bilevel.updates`) with the typed state :class:`DoGState`.

    Args:
        r_rel: the initial movement relative to ``1 + ‖x_0‖``.

    Example:
        >>> import torch, bilevel as bl
        >>> dog = bl.auto.DoG()
        >>> x = torch.tensor([3.0], dtype=torch.float64)
        >>> state = dog.init(x)
        >>> for k in range(200):
        ...     x, state = dog.update(x, 1e3 * (x - 1.0), state, k)   # f = 500 (x − 1)²
        >>> round(float(x), 6)
        1.0

    Reference: Maor Ivgi, Oliver Hinder, Yair Carmon, "DoG is SGD's Best Friend: A
    Parameter-Free Dynamic Step Size Schedule", ICML 2023, arXiv:2302.12022.
    """

    r_rel: float = 1e-6

    def __post_init__(self) -> None:
        check_positive("DoG", "r_rel", self.r_rel)

    def init(self, x: Tree) -> DoGState:
        x0 = T.clone(x)
        rbar = self.r_rel * (1.0 + T.norm(x0))
        return DoGState(x0=x0, rbar=rbar, gsum=torch.zeros_like(rbar))

    def step_size(self, state: DoGState) -> torch.Tensor:
        """``r̄ / √G`` (0 before any gradient)."""
        return _safe_divide(state.rbar, torch.sqrt(state.gsum))

    def update(self, x: Tree, d: Tree, state: DoGState, k: int, cap: Any = None) -> tuple[Tree, DoGState]:
        """``x − min(r̄/√G, cap) d`` and the state after it (``cap=None``: no bound)."""
        rbar = torch.maximum(state.rbar, T.norm(T.sub(x, state.x0)))
        gsum = state.gsum + T.sq_norm(d)
        state = DoGState(x0=state.x0, rbar=rbar, gsum=gsum)
        step = self.step_size(state)
        return T.axpy(-(step if cap is None else torch.minimum(step, cap)), d, x), state


def is_distance_rule(upper: Any) -> bool:
    """Whether an upper optimizer is a distance-based rule (:class:`DoG`, :class:`AdamDoG`),
    whose step is a state-dependent diagnostic."""
    return isinstance(upper, (DoG, AdamDoG))


def upper_step(upper: Any, state: Any) -> torch.Tensor | None:
    """The step in use of a distance-based upper rule from its state, the ``lr_upper``
    diagnostic; ``None`` for any other upper optimizer."""
    return upper.step_size(state) if is_distance_rule(upper) else None


@part_state
class AdamDoGState(NamedTuple):
    """The state of :class:`AdamDoG`: the start ``x0`` and Adam's moments ``m``, ``s``
    (trees), ``rbar`` (the largest ∞-norm distance from x0), ``gsum`` (Σ of the mean
    squared entries of the directions taken) and the step count ``t`` (0-d tensors)."""

    x0: Tree
    m: Tree
    s: Tree
    rbar: torch.Tensor
    gsum: torch.Tensor
    t: torch.Tensor


@dataclass(frozen=True)
class AdamDoG:
    """DoG's step along Adam's direction: parameter-free, per-coordinate normalised::

        m ← b₁ m + (1 − b₁) d,   s ← b₂ s + (1 − b₂) d²,   u = m̂ / √ŝ     (Adam's direction)
        r̄_k = max(r_ε, max_{i≤k} ‖x_i − x_0‖_∞),   G_k = Σ_{i≤k} mean(u_i²)
        x_{k+1} = x_k − (r̄_k / √G_k) u_k,               r_ε = r_rel (1 + ‖x_0‖_∞)

    Adam's direction moves every coordinate by about the step, so the distance that sets
    the step is the largest coordinate move (∞-norm) and the accumulated squares are means;
    with b₁ = b₂ = 0 it is DoG on the sign of the gradient. Scale-free in f (u is) and in
    x (r̄ is). Meant for upper variables whose good values lie at a coordinate scale the start
    does not reveal and whose optimum may be at infinity — per-sample weights through a
    sigmoid (hyper-cleaning), where plain :class:`DoG`'s global step follows the
    saturated coordinates and reaches lower accuracy peaks (docs/auto.md). An upper
    optimizer (``init``/``update``): ``lr_upper=bl.auto.AdamDoG()``.

    Args:
        r_rel: the first move relative to ``1 + ‖x_0‖_∞`` (DoG's default 10⁻⁶ peaked later
            and 1–2.6 points lower on hyper-cleaning than 10⁻³).
        b1: Adam's first-moment decay.
        b2: Adam's second-moment decay.

    Example:
        >>> import torch, bilevel as bl
        >>> rule = bl.auto.AdamDoG()
        >>> x = torch.tensor([3.0, -2.0], dtype=torch.float64)
        >>> state = rule.init(x)
        >>> for k in range(500):
        ...     x, state = rule.update(x, torch.tensor([1e3, 1e-3], dtype=torch.float64) * (x - 1.0), state, k)
        >>> [round(float(v), 6) for v in x]          # curvatures 1e3 and 1e-3, no step given
        [1.0, 1.0]

    References: Ivgi, Hinder, Carmon, "DoG is SGD's Best Friend", ICML 2023; Kingma, Ba,
    "Adam: A Method for Stochastic Optimization", ICLR 2015.
    """

    r_rel: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999

    def __post_init__(self) -> None:
        check_positive("AdamDoG", "r_rel", self.r_rel)
        check_number("AdamDoG", "b1", self.b1, low=0.0, high=1.0, high_open=True)
        check_number("AdamDoG", "b2", self.b2, low=0.0, high=1.0, high_open=True)

    def init(self, x: Tree) -> AdamDoGState:
        x0 = T.clone(x)
        zero = _scalar(0.0, x0)
        rinf = torch.stack([leaf.abs().max() for leaf in T.leaves(x0)]).max().to(zero.dtype)
        return AdamDoGState(x0=x0, m=T.zeros_like(x0), s=T.zeros_like(x0), rbar=self.r_rel * (1.0 + rinf), gsum=zero, t=zero.clone())

    def direction(self, d: Tree, state: AdamDoGState) -> tuple[Tree, Tree, Tree, torch.Tensor]:
        """``(u, m, s, t)``: Adam's bias-corrected direction (0 where ŝ is 0) and its moments."""
        t = state.t + 1
        m = T.tree_map(lambda a, g: self.b1 * a + (1.0 - self.b1) * g, state.m, d)
        s = T.tree_map(lambda a, g: self.b2 * a + (1.0 - self.b2) * g * g, state.s, d)
        c1, c2 = 1.0 - self.b1**t, 1.0 - self.b2**t

        def ratio(mm: torch.Tensor, ss: torch.Tensor) -> torch.Tensor:
            root = torch.sqrt(ss / c2)
            return torch.where(root > 0, (mm / c1) / torch.where(root > 0, root, torch.ones_like(root)), torch.zeros_like(mm))

        return T.tree_map(ratio, m, s), m, s, t

    def step_size(self, state: AdamDoGState) -> torch.Tensor:
        """``r̄ / √G`` (0 before any direction)."""
        return _safe_divide(state.rbar, torch.sqrt(state.gsum))

    def update(self, x: Tree, d: Tree, state: AdamDoGState, k: int) -> tuple[Tree, AdamDoGState]:
        u, m, s, t = self.direction(d, state)
        distance = torch.stack([(a - b).abs().max() for a, b in zip(T.leaves(x), T.leaves(state.x0), strict=True)]).max()
        count = sum(leaf.numel() for leaf in T.leaves(u))
        rbar = torch.maximum(state.rbar, distance.to(state.rbar.dtype))
        gsum = state.gsum + T.sq_norm(u) / count
        new = AdamDoGState(x0=state.x0, m=m, s=s, rbar=rbar, gsum=gsum, t=t)
        return T.axpy(-self.step_size(new), u, x), new


# --------------------------------------------------------------------------- first-order methods


def joint_dog_step(
    x: Tree, y: Tree, d_x: Tree, d_y: Tree, state: DoGState, k: int, projection: Any = None
) -> tuple[Tree, Tree, DoGState, torch.Tensor]:
    """One :class:`DoG` step for the pair (x, y) along (d_x, d_y): the joint descent of the
    first-order methods (BOME, PBGD) when both of their steps are auto. Returns
    ``(x_next, y_next, state, step)``; ``projection`` is applied to x."""
    dog = DoG()
    pair, state = dog.update({"x": x, "y": y}, {"x": d_x, "y": d_y}, state, k)
    x_next = pair["x"] if projection is None else projection(pair["x"])
    return x_next, pair["y"], state, dog.step_size(state)


class JointAutoSteps:
    """The auto steps of a first-order method that descends (x, y) jointly (BOME, PBGD):
    ``lr_upper``, ``lr_lower`` (one :class:`DoG` step for the pair when both are auto,
    β = α_k when only ``lr_lower`` is) and a shadow loop run by :class:`AdaptiveLower`."""

    lr_upper: Any
    lr_lower: Any

    @property
    def joint_auto(self) -> bool:
        """Whether x and y take one DoG step together (``lr_upper`` and ``lr_lower`` both auto)."""
        return is_auto(self.lr_upper) and is_auto(self.lr_lower)

    def check_joint_steps(self, owner: str) -> None:
        """``lr_lower="auto"`` takes x's step: refused with an upper optimizer (no step to take)."""
        if (
            is_auto(self.lr_lower)
            and not is_auto(self.lr_upper)
            and not callable(self.lr_upper)
            and not isinstance(self.lr_upper, (int, float))
        ):
            raise ValueError(
                f"{owner}(lr_lower='auto') takes the step of x for y (the joint descent): give lr_upper a number, "
                "a schedule or 'auto', or give lr_lower a number with an upper optimizer"
            )

    def lower_step(self, k: int) -> Any:
        """β_k: the given ``lr_lower``, or α_k with ``lr_lower="auto"`` and a number or schedule ``lr_upper``."""
        return float(as_schedule(self.lr_upper)(k)) if is_auto(self.lr_lower) else self.lr_lower

    def joint_extra(self, shadow: Any, oracles: Oracles, problem: Problem, x: Tree, y: Tree, batch: Any) -> dict:
        """The states ``init`` adds: the auto shadow's (``"lower"``) and the joint DoG's (``"joint"``)."""
        extra: dict = {}
        if isinstance(shadow, AdaptiveLower):
            extra["lower"] = adaptive_start(shadow, oracles.linearize(problem.lower, x, y, batch).hvp, y)
        if self.joint_auto:
            extra["joint"] = DoG().init({"x": x, "y": y})
        return extra


def adaptive_start(lower: AdaptiveLower, matvec: MatVec, y: Tree) -> AdaptiveLowerState:
    """The state of :class:`AdaptiveLower` at ``init``: β₀ = 1/λ̂ of the Hessian ``matvec``
    applies (30 power products, one host sync; β₀ = 1 when λ̂ is 0 or not finite)."""
    lam = estimate_spectral_norm(matvec, y)
    return lower.init(y, 1.0 / lam if lam > 0 and math.isfinite(lam) else 1.0)


# --------------------------------------------------------------------------- the template


class AutoSteps:
    """Mixin of :class:`~bilevel.methods.Alternating` methods with auto step sizes.

    ``init`` starts :class:`AdaptiveLower` at ``β₀ = 1/λ̂`` (30 power products on the
    Hessian of φ_μ at the start, one host sync; the stability check of user-given steps is
    unchanged). ``step`` runs the sequential alternating iteration with the adaptive lower
    part, adapts β from the secant the linearization makes free, and restores the whole
    state of the iteration (x, y, v, every part state), β halved, when the guard detects a
    blow-up. A method whose lower step is given runs the template's own step, bit for bit.
    """

    def check_parts(self, owner: str, parts: Any) -> None:
        super().check_parts(owner, parts)  # type: ignore[misc]
        if isinstance(parts.lower, AdaptiveLower) and parts.order != "sequential":
            raise ValueError(
                f"{owner}(lr_lower='auto') needs order='sequential' (its secant is taken at a fixed x_k); "
                f"give lr_lower a number for order={parts.order!r}"
            )

    @staticmethod
    def given_steps(steps: list[tuple[str, Any, int]]) -> list[tuple[str, float, int]]:
        """The steps of ``stability_steps`` that the user gave (auto steps are not checked)."""
        return [(name, float(step), power) for name, step, power in steps if not is_auto(step)]

    def auto_dual_correction(self) -> Any:
        """The dual correction of ``dual_step``/``lr_dual`` (:class:`MonitoredLineSearch`
        when ``dual_step="fixed"`` and ``lr_dual="auto"``)."""
        if getattr(self, "dual_step", None) == "fixed" and is_auto(getattr(self, "lr_dual", None)):
            from .parts import DualCorrection

            return DualCorrection(MonitoredLineSearch(fallback=self.dual_fallback))  # type: ignore[attr-defined]
        return self.dual_correction()  # type: ignore[attr-defined]

    def init(self, problem: Problem, x0: Tree = None, y0: Tree = None, batch: Any = None, validate: bool = True) -> State:
        state: State = super().init(problem, x0, y0, batch, validate)  # type: ignore[misc]
        lower = self.parts.lower  # type: ignore[attr-defined]
        if not isinstance(lower, AdaptiveLower):
            return state
        point = linearize(self.derivatives, problem, lower.averaging(0), state.x, state.y, batch)  # type: ignore[attr-defined]
        return state.replace(extra={**state.extra, "lower": adaptive_start(lower, point.phi.hvp, state.y)})

    def step(self, problem: Problem, state: State, batch: Any = None) -> tuple[State, dict]:
        parts = self.parts  # type: ignore[attr-defined]
        lower = parts.lower
        if not isinstance(lower, AdaptiveLower):
            new_state: State
            new_state, info = super().step(problem, state, batch)  # type: ignore[misc]
            auto_info = self._auto_info(new_state, info)
            return new_state, ({**info, **auto_info} if auto_info else info)
        oracles = self.derivatives  # type: ignore[attr-defined]
        x, k, extra = state.x, state.k, state.extra
        mu = lower.averaging(k)
        y, lower_state, y_prev, g_prev = lower.run_tracked(problem, x, state.y, batch, oracles, extra["lower"], k)
        point = linearize(oracles, problem, mu, x, y, batch)
        lower_state, undo = lower.observe(lower_state, y_prev, g_prev, y, point.phi.grad_y)
        multiplier_state = extra.get("multiplier", EmptyState())
        if isinstance(multiplier_state, MonitoredState):
            multiplier_state = multiplier_state._replace(safe=lower_state.beta)
        solve, multiplier_state = parts.multiplier.update(point.phi.hvp, point.grad_y_f, state.v, multiplier_state, k)
        estimate, info, _ = parts.measure.evaluate(point, solve.v, solve, x, parts.projection)
        info.update(parts.measure.report(solve))
        x_next, opt, direction_state = self.update_x(x, estimate, state)  # type: ignore[attr-defined]
        blown = ~torch.isfinite(info["direction_sq"]) & (lower_state.retries < lower.max_retries)
        undo = undo | blown
        lower_state = lower_state._replace(
            beta=torch.where(blown, 0.5 * lower_state.beta, lower_state.beta),
            rollbacks=lower_state.rollbacks + blown.to(lower_state.rollbacks.dtype),
            retries=torch.where(blown, lower_state.retries + 1, lower_state.retries),
        )
        new_extra = {**extra, "multiplier": multiplier_state, "direction": direction_state}
        stepped = State(x=x_next, y=y, v=solve.v, opt=opt, k=k + 1, extra=new_extra)
        new_state = undo_where(undo, state, stepped, lower_state)
        info = {**info, **self._auto_info(new_state, info), "lr_lower": lower_state.beta, "rollbacks": lower_state.rollbacks}
        return new_state, info

    def _auto_info(self, state: State, info: dict) -> dict:
        """The auto steps in use as diagnostics: ``lr_upper`` (DoG) and ``lr_dual`` (monitored)."""
        out: dict = {}
        step = upper_step(self.parts.upper, state.opt)  # type: ignore[attr-defined]
        if step is not None:
            out["lr_upper"] = step
        multiplier_state = state.extra.get("multiplier")
        if isinstance(multiplier_state, MonitoredState):
            out["lr_dual"] = multiplier_state.eta
        return out


# --------------------------------------------------------------------------- the CLI report


class AutoStepReporter:
    """A :func:`bilevel.solve` callback that prints the auto step sizes (and the constants
    they estimate, ``L ≈ 1/β``) at the first record and whenever one changed by more than
    ``factor`` since it was last printed.

    Args:
        factor: the change that is reported.
        stream: where to print (default ``sys.stderr``).
    """

    KEYS = ("lr_lower", "lr_dual", "lr_upper")

    def on_end(self, result: Any) -> None:
        """Nothing to close."""

    def __init__(self, factor: float = 2.0, stream: TextIO | None = None) -> None:
        check_number("AutoStepReporter", "factor", factor, low=1.0, low_open=True)
        self.factor = factor
        self.stream = stream
        self.printed: dict[str, float] = {}

    def on_start(self, run: dict) -> None:
        self.printed = {}

    def on_log(self, record: dict) -> None:
        values = {key: float(record[key]) for key in self.KEYS if key in record}
        changed = {
            key: value
            for key, value in values.items()
            if key not in self.printed or not (self.printed[key] / self.factor <= value <= self.printed[key] * self.factor)
        }
        if not changed:
            return
        self.printed.update(changed)
        parts = [f"{key}={value:.3g}" for key, value in values.items()]
        if values.get("lr_lower", 0.0) > 0:
            parts.append(f"(L_lower ≈ {1.0 / values['lr_lower']:.3g})")
        print(f"auto steps at iteration {record.get('iteration', '?')}: " + " ".join(parts), file=self.stream or sys.stderr)
