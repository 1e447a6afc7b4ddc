"""The protocols of the part kinds, and the argument checks shared by parts and methods.

Every part is a frozen dataclass of hyper-parameters, validated when it is built, with
pure functions over a typed state (a registered ``NamedTuple``, :mod:`bilevel.state`):
``init(...) -> state`` and ``update/run(..., state, k) -> (value, state)``. The kinds:

* :class:`LowerDynamics` — how y moves: ``run`` N steps (alternating methods), ``step`` /
  ``differentiable_step`` one step (unrolled methods), ``averaging(k)`` the weight μ of
  the objective ``φ_μ = μ f + (1 − μ) g`` it descends (0: g itself).
* :class:`MultiplierEstimator` — how ``v ≈ H⁻¹ ∇_y f`` is obtained: a linear solve
  (:class:`~bilevel.parts.LinearSolve`) or one dual correction
  (:class:`~bilevel.parts.DualCorrection`).
* :class:`DirectionEstimator` — what the upper optimizer is given, from the hypergradient
  estimate (:class:`~bilevel.parts.PlainDirection`: the estimate itself).
* :class:`~bilevel.updates.UpperOptimizer` — SGD, Adam (:mod:`bilevel.updates`).
* :class:`Projection` — onto the feasible set of x (:class:`~bilevel.Box`).
* :class:`Measure` — the products the direction needs and the stationarity measure of
  the method's paper (:class:`~bilevel.parts.DirectionNorm`,
  :class:`~bilevel.parts.ShadowResidual`, :class:`~bilevel.parts.KKTResidual`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from .. import tree as T
from ..linsolve import LinearSolveResult
from ..oracles import Oracles
from ..problem import Problem
from ..schedules import as_schedule
from ..state import EmptyState
from ..tree import Tree
from ..validation import ArgumentTypeError, check_fraction

__all__ = [
    "DirectionEstimator",
    "EmptyState",
    "LowerDynamics",
    "MatVec",
    "Measure",
    "MultiplierEstimator",
    "Projection",
    "check_oracles",
    "check_projection",
    "check_weight",
    "projected_sq",
]

MatVec = Callable[[Tree], Tree]
PartState = Any


@runtime_checkable
class LowerDynamics(Protocol):
    """How the lower variable moves (:class:`~bilevel.parts.LowerGD`,
    :class:`~bilevel.parts.LowerAggregated`).

    ``k`` is the upper iteration, ``t`` the step within it (0 … ``steps`` − 1).
    """

    @property
    def steps(self) -> int:
        """N, the lower steps of one upper iteration."""
        ...

    def init(self, y: Tree) -> PartState:
        """The state before the first upper iteration."""
        ...

    def averaging(self, k: int) -> float:
        """μ of the objective ``φ_μ = μ f + (1 − μ) g`` descended at upper iteration k (0: g)."""
        ...

    def run(
        self, problem: Problem, x: Tree, y: Tree, batch: Any, oracles: Oracles, state: PartState, k: int
    ) -> tuple[Tree, Tree, PartState]:
        """All steps of upper iteration k without a graph: ``(y_N, last step direction, state)``."""
        ...

    def step(self, problem: Problem, x: Tree, y: Tree, batch: Any, t: int, oracles: Oracles, k: int = 0) -> tuple[Tree, Tree]:
        """One step without a graph: ``(y_next, step direction)``."""
        ...

    def differentiable_step(self, problem: Problem, x: Tree, y: Tree, batch: Any, t: int, k: int = 0) -> tuple[Tree, Tree]:
        """One step as a function of ``(x, y)`` with its graph kept: ``(y_next, ∇_y g(x, y) detached)``."""
        ...

    def apply(self, y: Tree, gradient: Tree) -> Tree:
        """One step from ``∇_y φ_μ(x, y)`` that the caller already has (the Jacobi order)."""
        ...


@runtime_checkable
class MultiplierEstimator(Protocol):
    """How the multiplier ``v`` (``H v ≈ b = ∇_y f``) is obtained each upper iteration."""

    def init(self, v: Tree) -> PartState:
        """The state before the first upper iteration (``v`` is the initial multiplier, 0)."""
        ...

    def update(
        self, matvec: MatVec, b: Tree, v: Tree, state: PartState, k: int, hv: Tree | None = None
    ) -> tuple[LinearSolveResult, PartState]:
        """``(LinearSolveResult, state)``: the new multiplier from the previous one ``v``.

        ``hv = H v`` when the caller has it already (it then costs no product)."""
        ...


@runtime_checkable
class DirectionEstimator(Protocol):
    """What the upper optimizer is given, from the hypergradient estimate of iteration k
    (the identity; later moving averages and variance reduction)."""

    def init(self, x: Tree) -> PartState: ...

    def update(self, estimate: Tree, state: PartState, k: int) -> tuple[Tree, PartState]: ...


@runtime_checkable
class Projection(Protocol):
    """Projection of x onto its feasible set (e.g. :class:`~bilevel.Box`)."""

    def __call__(self, x: Tree) -> Tree: ...


@runtime_checkable
class Measure(Protocol):
    """The products the upper direction needs, and the stationarity measure reported.

    ``evaluate(point, v, solve, x, projection) -> (direction, info, hv)``: the direction
    ``∇_x f − J_φ v`` at the linearized ``point``, the diagnostics, and ``H_φ v`` when it
    was formed (``None`` otherwise; the Jacobi order hands it to the multiplier step).
    ``report(solve)``: the diagnostics of the multiplier step (e.g. its residual).
    """

    def evaluate(
        self, point: Any, v: Tree, solve: LinearSolveResult | None, x: Tree, projection: Projection | None
    ) -> tuple[Tree, dict, Tree | None]: ...

    def report(self, solve: LinearSolveResult | None) -> dict: ...


def projected_sq(projection: Projection | None, x: Tree, direction: Tree, direction_sq: torch.Tensor | None = None) -> torch.Tensor:
    """``‖x − Proj_X(x − d)‖²``: the stationarity of an upper step (``‖d‖²`` if unconstrained).

    ``direction_sq``: ``‖d‖²`` when the caller has it already (returned as is, unconstrained).
    """
    if projection is None:
        return T.sq_norm(direction) if direction_sq is None else direction_sq
    return T.sq_norm(T.sub(x, projection(T.sub(x, direction))))


def check_weight(owner: str, name: str, value: Any) -> Any:
    """An averaging weight μ: a number in [0, 1) or a schedule (callable k -> float)."""
    if callable(value):
        as_schedule(value, f"{owner}({name})")
    else:
        check_fraction(owner, name, value)
    return value


def check_projection(owner: str, name: str, value: Any) -> Any:
    """A projection (a callable ``x -> x`` such as ``bilevel.Box``) or ``None``."""
    if value is not None and not callable(value):
        raise ArgumentTypeError(f"{owner}({name}={value!r}) must be a projection such as bilevel.Box(0.0, 3.0), or None")
    return value


def check_oracles(owner: str, name: str, value: Any) -> Any:
    """A :class:`~bilevel.Oracles` or ``None`` (the default reverse-mode oracles)."""
    if value is not None and not isinstance(value, Oracles):
        raise ArgumentTypeError(f"{owner}({name}={value!r}) must be a bilevel.Oracles, or None")
    return value


def empty(_: Any = None) -> EmptyState:
    """The state of a stateless part (an ``init`` that keeps nothing)."""
    return EmptyState()
