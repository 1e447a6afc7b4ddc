"""The method protocol, the base of methods assembled from parts, and the stability check.

A method is a frozen configuration with two pure functions::

    state = method.init(problem, x0, y0, batch)
    state, info = method.step(problem, state, batch)

``state`` (:class:`~bilevel.state.State`) holds everything a run needs to continue: the
variables, the multiplier, the upper optimizer's state, the iteration counter and the
typed states of the method's other parts. ``info`` is a dict of 0-d tensors
(diagnostics); ``step`` never calls ``.item()``, so it never waits for the device.

The library's methods are :class:`Assembled`: their paper-named keyword arguments are
dataclass fields, checked when the method is built (each field declares its check with
:func:`option`), and ``build_parts`` turns them — once, at construction — into the parts
of :mod:`bilevel.parts` (``method.parts``). A template runs the parts:
:class:`~bilevel.methods.Alternating` (lower steps, a multiplier, the implicit direction:
AID, GALET, sl-BAMM, BAGDC) or :class:`~bilevel.methods.Unrolled` (differentiation
through the lower steps: ITD, T-RHG, BDA). See docs/extending.md.

Diagnostics every method reports (keys of ``info``):

* ``upper_loss`` — f at the point where the direction was evaluated;
* ``lower_grad_sq`` — ‖∇_y g‖² there (lower-level optimality);
* ``direction_sq`` — ‖d‖², the squared norm of the hypergradient estimate;
* ``stationarity`` — the stationarity measure of the method's paper (see each method).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, cast

import torch

from .. import tree as T
from ..oracles import Oracles
from ..parts import LowerAggregated, LowerGD, Parts, linearize
from ..parts.base import Projection, check_oracles, check_projection, check_weight, projected_sq
from ..problem import Problem
from ..schedules import ScheduleLike
from ..state import EmptyState, State
from ..tree import Tree
from ..updates import UpperOptimizer, as_upper_optimizer
from ..validation import check_choice

__all__ = [
    "Assembled",
    "LowerAggregated",
    "LowerGD",
    "Method",
    "StabilityChecked",
    "StabilityWarning",
    "State",
    "check_step_bound",
    "check_upper",
    "check_weight",
    "option",
]


def option(default: Any, check: Callable | None = None, *, kw_only: bool = False, **check_args: Any) -> Any:
    """A method argument: its default and the check run when the method is built.

    ``check(owner, name, value, **check_args)`` is one of :mod:`bilevel.validation`'s
    checks (or one with the same signature); ``owner`` is the method's class name, so a
    bad value fails with one line such as ``GALET(lr_lower=0) must be a positive number``.
    ``kw_only=True`` declares again, with another default, an option of a keyword-only base.
    """
    metadata = {"check": (check, check_args)} if check is not None else {}
    if kw_only:
        return field(default=default, kw_only=True, metadata=metadata)
    return field(default=default, metadata=metadata)


def check_upper(owner: str, name: str, value: Any) -> Any:
    """``lr_upper``: a positive step, a schedule or an upper optimizer (SGD, Adam, ...)."""
    as_upper_optimizer(value, name, owner)
    return value


def upper_option(default: Any) -> Any:
    """``lr_upper`` declared again by a preset whose default α differs from the base's."""
    return option(default, check_upper, kw_only=True)


# set by Method.direction while it runs ``step``: Assembled.update_x appends the estimate it is given
_DIRECTION_PROBE: ContextVar[list | None] = ContextVar("bilevel_direction_probe", default=None)


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
    warnings.warn(message, StabilityWarning, stacklevel=4)


@dataclass(frozen=True)
class Method:
    """Base of all methods: ``name``, ``init``, ``step`` and ``replace``.

    A method is a frozen dataclass whose fields are its options (what
    :func:`bilevel.solve.method_spec` records in checkpoints). Subclasses set ``name``
    and implement ``init`` and ``step``; :class:`Assembled` does both from parts.
    """

    name: ClassVar[str] = "method"
    stationarity_doc: ClassVar[str] = "‖d‖²"
    uses_multiplier: ClassVar[bool] = True

    def init(
        self, problem: Problem, x0: Tree = None, y0: Tree = None, batch: Any = None, validate: bool = True
    ) -> State:  # pragma: no cover
        raise NotImplementedError

    def step(self, problem: Problem, state: State, batch: Any = None) -> tuple[State, dict]:  # pragma: no cover
        raise NotImplementedError

    def replace(self, **changes: Any) -> Any:
        """A copy with some options changed (its parts are built again)."""
        return dataclasses.replace(self, **changes)

    def direction(self, problem: Problem, state: State, batch: Any = None) -> tuple[Tree, dict]:
        """``(ĥ, info)``: the hypergradient estimate ``step`` moves x with from ``state``, and
        ``step``'s diagnostics (``info["lower_grad_sq"]`` is ‖∇_y g‖² where ĥ was formed).

        ĥ is the estimate before the direction estimator, the upper optimizer and the
        projection (``∇_x f − J v``, or the derivative of the unrolled map), the quantity
        :func:`bilevel.check_hypergradient` compares with ∇Φ(x). The default runs ``step``
        once and records the estimate it hands to ``Assembled.update_x``, so every
        method assembled from parts has it; a method whose ``step`` moves x otherwise
        overrides this (docs/check.md#supporting-a-new-method). Pure: ``state`` is unchanged.
        """
        probe: list = []
        token = _DIRECTION_PROBE.set(probe)
        try:
            _, info = self.step(problem, state, batch)
        finally:
            _DIRECTION_PROBE.reset(token)
        if not probe:
            raise NotImplementedError(
                f"{self.name}.step does not move x through Assembled.update_x, so its direction cannot be recorded: "
                f"implement {type(self).__name__}.direction(problem, state, batch) (docs/check.md#supporting-a-new-method)"
            )
        return probe[0], info


@dataclass(frozen=True, kw_only=True)
class Assembled(Method):
    """A method assembled from parts: the options shared by every method, the checks of
    every option, ``init``, and the upper step.

    Subclasses declare their paper-named options with :func:`option` and implement
    ``build_parts`` (called once, when the method is built); the template subclass
    (:class:`~bilevel.methods.Alternating`, :class:`~bilevel.methods.Unrolled`) implements
    ``step``. ``method.parts`` shows what was built.

    Args:
        lr_upper: α, the upper step: a positive number or a schedule (plain gradient
            steps, :class:`~bilevel.SGD`), or an upper optimizer (:class:`~bilevel.Adam`).
        project_x: optional projection of x (e.g. :class:`~bilevel.Box`).
        oracles: the derivative oracles (default: reverse mode, :class:`~bilevel.Oracles`).
    """

    lr_upper: ScheduleLike | UpperOptimizer = option(0.1, check_upper)
    project_x: Projection | None = option(None, check_projection)
    oracles: Oracles | None = option(None, check_oracles)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is not None:
                check[0](owner, f.name, getattr(self, f.name), **check[1])
        self.parts  # noqa: B018 - build the parts now, once: a bad combination fails at construction

    def build_parts(self) -> Parts:  # pragma: no cover - implemented by every method
        """The parts of this configuration (``upper`` and ``projection`` left ``None``
        are filled from ``lr_upper`` and ``project_x``)."""
        raise NotImplementedError

    def check_parts(self, owner: str, parts: Parts) -> None:
        """Checks of the assembled parts that the template needs (raise ``ValueError``)."""

    @cached_property
    def parts(self) -> Parts:
        """The parts this method runs (built once, when the method is built)."""
        owner = type(self).__name__
        parts = self.build_parts()
        if not isinstance(parts, Parts):
            raise TypeError(f"{owner}.build_parts() must return a bilevel.parts.Parts, got {type(parts).__name__}")
        parts = dataclasses.replace(
            parts,
            upper=parts.upper if parts.upper is not None else as_upper_optimizer(self.lr_upper, "lr_upper", owner),
            projection=parts.projection if parts.projection is not None else self.project_x,
        )
        self.check_parts(owner, parts)
        return parts

    @cached_property
    def derivatives(self) -> Oracles:
        """The oracles used: ``oracles``, or the default :class:`~bilevel.Oracles`."""
        return self.oracles if self.oracles is not None else Oracles()

    def _oracles(self) -> Oracles:
        return self.derivatives

    def init(self, problem: Problem, x0: Tree = None, y0: Tree = None, batch: Any = None, validate: bool = True) -> State:
        """The initial state at ``(x0, y0)`` (the problem's defaults when omitted).

        Validates the problem there (shapes, dtypes, finite values, scalar losses) unless
        ``validate=False``; projects x; starts the multiplier at zero and every part
        from its ``init``.
        """
        if not isinstance(problem, Problem):
            raise TypeError(f"{self.name}.init expects a bilevel.Problem, got {type(problem).__name__}")
        x0, y0 = problem.initial_point(x0, y0)
        if validate:
            problem.validate(x0, y0, batch)
        x, y = T.clone(x0), T.clone(y0)
        parts = self.parts
        if parts.projection is not None:
            x = parts.projection(x)
        state = self.initial_state(x, y)
        self.check_stability(problem, state, batch)
        return state

    def initial_state(self, x: Tree, y: Tree) -> State:
        """The state at the (projected) starting point; templates add their parts' states."""
        parts = self.parts
        return State(
            x=x,
            y=y,
            opt=cast(UpperOptimizer, parts.upper).init(x),
            k=0,
            extra={"lower": parts.lower.init(y), "direction": parts.direction.init(x)},
        )

    def check_stability(self, problem: Problem, state: State, batch: Any) -> None:
        """Stability checks at ``init`` (none by default; see :class:`StabilityChecked`)."""

    def update_x(self, x: Tree, estimate: Tree, state: State) -> tuple[Tree, Any, Any]:
        """``(x_next, optimizer state, direction state)``: the direction estimator, the upper
        optimizer and the projection, ``x ← Proj_X(update(x, d))``."""
        probe = _DIRECTION_PROBE.get()
        if probe is not None:  # Method.direction is recording the estimate
            probe.append(estimate)
        parts, k = self.parts, state.k
        direction, direction_state = parts.direction.update(estimate, state.extra.get("direction", EmptyState()), k)
        x_next, opt = cast(UpperOptimizer, parts.upper).update(x, direction, state.opt, k)
        if parts.projection is not None:
            x_next = parts.projection(x_next)
        return x_next, opt, direction_state

    def projected_direction_sq(self, x: Tree, direction: Tree, direction_sq: torch.Tensor | None = None) -> torch.Tensor:
        """``‖x − Proj_X(x − d)‖²`` (``‖d‖²`` if unconstrained; see :func:`bilevel.parts.projected_sq`)."""
        return projected_sq(self.parts.projection, x, direction, direction_sq)


@dataclass(frozen=True, kw_only=True)
class StabilityChecked:
    """The ``stability_check`` option (a mixin of :class:`Assembled` methods).

    At ``init``, λ_max of the Hessian of the objective the lower dynamics descend (g, or
    φ_μ) is estimated by power iteration (30 products, one host sync) and each step of
    :meth:`stability_steps` is checked against ``2/λ_max^p``.

    Args:
        stability_check: ``"warn"`` (default, :class:`StabilityWarning`), ``"error"``
            (``ValueError``) or ``"off"``.
    """

    stability_check: str = option("warn", check_choice, choices=("warn", "error", "off"))

    def stability_steps(self) -> list[tuple[str, float, int]]:
        """``[(option name, step, p)]``: each step is stable below ``2/λ_max^p``."""
        return []

    def check_stability(self, problem: Problem, state: State, batch: Any) -> None:
        steps = self.stability_steps()
        if self.stability_check == "off" or not steps:
            return
        from ..linsolve import estimate_spectral_norm

        mu = self.parts.lower.averaging(0)  # type: ignore[attr-defined]
        point = linearize(self.derivatives, problem, mu, state.x, state.y, batch)  # type: ignore[attr-defined]
        lam = estimate_spectral_norm(point.phi.hvp, state.y)
        if lam <= 0:
            return
        which = "H" if mu == 0.0 else "∇²_yy φ_μ"
        owner = type(self).__name__
        for name, step, power in steps:
            detail = f"2/λ_max({which}){'²' if power == 2 else ''} with λ_max({which}) ≈ {lam:.4g}"
            check_step_bound(owner, name, step, 2.0 / lam**power, detail, self.stability_check)
