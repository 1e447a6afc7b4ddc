"""The method protocol, its explicit state, and the lower-level dynamics shared by methods.

A method is a frozen configuration with two pure functions::

    state = method.init(problem, x0, y0, batch)
    state, info = method.step(problem, state, batch)

``state`` (:class:`State`) holds everything a run needs to continue: the variables, the
multiplier, the upper optimizer's moments, the iteration counter and method-specific
extras. ``info`` is a dict of 0-d tensors (diagnostics); ``step`` never calls
``.item()``, so it never waits for the device.

Diagnostics every method reports (keys of ``info``):

* ``upper_loss`` — f at the point where the direction was evaluated;
* ``lower_grad_sq`` — ‖∇_y g‖² there (lower-level optimality);
* ``direction_sq`` — ‖d‖², the squared norm of the upper direction;
* ``stationarity`` — the stationarity measure of the method's paper (see each method).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch

from .. import tree as T
from ..oracles import Oracles
from ..problem import Problem
from ..schedules import ScheduleLike, as_schedule
from ..tree import Tree
from ..updates import Box, UpperOptimizer
from ..validation import ArgumentTypeError, check_choice, check_count, check_fraction, check_positive

__all__ = [
    "State", "Method", "LowerGD", "LowerAggregated", "StabilityWarning",
    "check_step_bound", "check_stability_option", "check_weight", "check_common",
]


@dataclass(frozen=True)
class State:
    """Explicit state of a bilevel method.

    Attributes:
        x: upper-level variables.
        y: lower-level variables.
        v: the multiplier / adjoint (solves ``H v ≈ ∇_y f``; GALET's ``w = −v``), or
            ``None`` for methods without one.
        opt: the upper optimizer's state (e.g. Adam moments).
        k: number of completed iterations.
        extra: method-specific tensors (e.g. BAGDC's self-governed step size).
    """

    x: Tree
    y: Tree
    v: Optional[Tree] = None
    opt: dict = field(default_factory=dict)
    k: int = 0
    extra: dict = field(default_factory=dict)

    def replace(self, **changes) -> "State":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain nested dict (for ``torch.save`` with ``weights_only=True``)."""
        return {"x": self.x, "y": self.y, "v": self.v, "opt": self.opt, "k": self.k, "extra": self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> "State":
        return cls(x=d["x"], y=d["y"], v=d["v"], opt=d["opt"], k=int(d["k"]), extra=d.get("extra", {}))


@dataclass(frozen=True)
class LowerGD:
    """Lower-level dynamics: ``steps`` gradient steps ``y ← y − β ∇_y g(x, y)``.

    Args:
        lr: β, the lower-level step (≤ 1/L_g for a guaranteed decrease).
        steps: N, steps per upper iteration.
    """

    lr: float = 0.1
    steps: int = 1

    def __post_init__(self):
        check_count(type(self).__name__, "steps", self.steps, minimum=1)
        check_positive(type(self).__name__, "lr", self.lr)

    def step(self, problem: Problem, x, y, batch, t: int, oracles: Oracles):
        """One step without a graph: ``(y_next, step direction)`` (``∇_y g(x, y)`` here)."""
        grad_g, _ = oracles.gradient_y(problem.lower, x, y, batch)
        return T.axpy(-self.lr, grad_g, y), grad_g

    def run(self, problem: Problem, x, y, batch, oracles: Oracles):
        """All steps without a graph: ``(y_N, last step direction)``."""
        grad_g = None
        for t in range(self.steps):
            y, grad_g = self.step(problem, x, y, batch, t, oracles)
        return y, grad_g

    def differentiable_step(self, problem: Problem, x, y, batch, t: int):
        """One step as a function of ``(x, y)`` with its graph kept (for unrolling).

        Returns ``(y_next, ∇_y g(x, y))``, the gradient detached.
        """
        yl = T.leaves(y)
        grads = _create_graph_grad(problem.lower(x, y, batch), yl)
        y_next = [p - self.lr * gr for p, gr in zip(yl, grads)]
        return T.unflatten_like(y_next, y), T.unflatten_like([gr.detach() for gr in grads], y)


def _create_graph_grad(value: torch.Tensor, inputs: list) -> list:
    return list(torch.autograd.grad(value, inputs, create_graph=True, allow_unused=True, materialize_grads=True))


@dataclass(frozen=True)
class LowerAggregated(LowerGD):
    """BDA's aggregated lower dynamics (Liu et al., ICML 2020):

        y ← y − [(1 − μ_t) β ∇_y g(x, y) + μ_t β_u ∇_y f(x, y)]

    With ``lr_upper = lr`` this is a gradient step on ``φ_μ = μ f + (1 − μ) g``, the
    averaged objective of sl-BAMM.

    Args:
        lr: β, step on the lower objective.
        steps: number of steps per upper iteration.
        mu: μ_t, aggregation weight in [0, 1): a number or a schedule of the inner index t.
        lr_upper: β_u, step on the upper objective (default: ``lr``).

    Reference: Liu, Mu, Yuan, Zeng, Zhang, "A Generic First-Order Algorithmic Framework
    for Bi-Level Programming Beyond Lower-Level Singleton", ICML 2020.
    """

    mu: ScheduleLike = 0.1
    lr_upper: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        check_weight("LowerAggregated", "mu", self.mu)
        check_positive("LowerAggregated", "lr_upper", self.lr_upper, allow_none=True)

    def coefficients(self, t: int) -> tuple[float, float]:
        """``((1 − μ_t) β, μ_t β_u)``: the weights on ``∇_y g`` and ``∇_y f`` of step ``t``."""
        mu = as_schedule(self.mu)(t)
        beta_u = self.lr if self.lr_upper is None else self.lr_upper
        return (1.0 - mu) * self.lr, mu * beta_u

    def step(self, problem, x, y, batch, t, oracles):
        a, b = self.coefficients(t)
        lower, upper = problem.lower, problem.upper

        def weighted(xx, yy, bb):
            return a * lower(xx, yy, bb) + b * upper(xx, yy, bb)

        # one backward pass for the aggregated direction a ∇_y g + b ∇_y f
        direction, _ = oracles.gradient_y(weighted, x, y, batch)
        return T.axpy(-1.0, direction, y), direction

    def differentiable_step(self, problem, x, y, batch, t):
        a, b = self.coefficients(t)
        yl = T.leaves(y)
        grads_g = _create_graph_grad(problem.lower(x, y, batch), yl)
        grads_f = _create_graph_grad(problem.upper(x, y, batch), yl)
        y_next = [p - a * gg - b * gf for p, gg, gf in zip(yl, grads_g, grads_f)]
        return T.unflatten_like(y_next, y), T.unflatten_like([gg.detach() for gg in grads_g], y)




class StabilityWarning(UserWarning):
    """A step size violates a stability bound estimated at the initial point."""


def check_step_bound(owner: str, what: str, step: float, bound: float, detail: str, action: str) -> None:
    """Warn (``action="warn"``) or raise (``"error"``) when ``step ≥ bound``."""
    if action == "off" or not step >= bound:
        return
    message = (
        f"{owner}({what}={step:g}) is at or above the stability bound {bound:.4g} = {detail} estimated at the "
        f"initial point: the iteration diverges; use {what} <= {bound / 2:.4g}"
    )
    if action == "error":
        raise ValueError(message)
    warnings.warn(message, StabilityWarning, stacklevel=3)


def check_stability_option(owner: str, value: str) -> None:
    """Validate a ``stability_check`` option at construction."""
    check_choice(owner, "stability_check", value, ("warn", "error", "off"))


def check_weight(owner: str, name: str, value) -> None:
    """An averaging weight μ: a number in [0, 1) or a schedule (callable k -> float)."""
    if callable(value):
        as_schedule(value, f"{owner}({name})")
    else:
        check_fraction(owner, name, value)


def check_common(method) -> None:
    """The options every method shares: ``project_x`` (a projection or None) and ``oracles``."""
    owner = type(method).__name__
    projection = getattr(method, "project_x", None)
    if projection is not None and not callable(projection):
        raise ArgumentTypeError(f"{owner}(project_x={projection!r}) must be a projection such as bilevel.Box(0.0, 3.0), or None")
    oracles = getattr(method, "oracles", None)
    if oracles is not None and not isinstance(oracles, Oracles):
        raise ArgumentTypeError(f"{owner}(oracles={oracles!r}) must be a bilevel.Oracles, or None")


@dataclass(frozen=True)
class Method:
    """Base of all methods: shared fields, ``init`` and the upper-level update.

    Subclasses set ``name``, ``uses_multiplier`` and implement ``step``.
    """

    name: ClassVar[str] = "method"
    uses_multiplier: ClassVar[bool] = True
    stationarity_doc: ClassVar[str] = "‖d‖²"

    def _upper(self) -> UpperOptimizer:  # pragma: no cover - overridden by fields
        raise NotImplementedError

    def _oracles(self) -> Oracles:
        return getattr(self, "oracles", None) or Oracles()

    def _projection(self) -> Optional[Box]:
        return getattr(self, "project_x", None)

    def init(self, problem: Problem, x0=None, y0=None, batch: Any = None, validate: bool = True) -> State:
        """The initial state at ``(x0, y0)`` (the problem's defaults when omitted).

        Validates the problem there (shapes, dtypes, finite values, scalar losses)
        unless ``validate=False``. ``v₀ = 0``.
        """
        if not isinstance(problem, Problem):
            raise TypeError(f"{self.name}.init expects a bilevel.Problem, got {type(problem).__name__}")
        x0, y0 = problem.initial_point(x0, y0)
        if validate:
            problem.validate(x0, y0, batch)
        x, y = T.clone(x0), T.clone(y0)
        projection = self._projection()
        if projection is not None:
            x = projection(x)
        v = T.zeros_like(y) if self.uses_multiplier else None
        return State(x=x, y=y, v=v, opt=self._upper().init(x), k=0, extra=self.init_extra(x, y))

    def init_extra(self, x, y) -> dict:
        return {}

    def step(self, problem: Problem, state: State, batch: Any = None) -> tuple[State, dict]:  # pragma: no cover
        raise NotImplementedError

    def update_x(self, state: State, direction: Tree) -> tuple[Tree, dict]:
        """Upper step ``x ← Proj_X(update(x, d))`` with the method's optimizer."""
        x, opt = self._upper().update(state.x, direction, state.opt, state.k)
        projection = self._projection()
        if projection is not None:
            x = projection(x)
        return x, opt

    def projected_direction_sq(self, x: Tree, direction: Tree, direction_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``‖x − Proj_X(x − d)‖²``: the stationarity of the upper step (``‖d‖²`` if unconstrained).

        ``direction_sq``: ``‖d‖²`` when the caller has it already (returned as is, unconstrained)."""
        projection = self._projection()
        if projection is None:
            return T.sq_norm(direction) if direction_sq is None else direction_sq
        return T.sq_norm(T.sub(x, projection(T.sub(x, direction))))

    def replace(self, **changes):
        """A copy with some options changed."""
        return dataclasses.replace(self, **changes)
