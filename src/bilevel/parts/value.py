"""Parts of the value-function and penalty methods (BOME, V-/G-PBGD, MEHA).

These methods never form a multiplier ``v ≈ H⁻¹∇_y f``. They move ``(x, y)`` jointly
along the gradient of a penalised objective (or a barrier combination) in which the lower
level enters through a **shadow** variable ``z`` that approximates a lower solution:

==================  ======================================================  ====================
shadow              dynamics                                                 method
==================  ======================================================  ====================
``"restart"``       T steps ``z ← z − β_z ∇_y g(x, z)`` from ``z = y_k``,    BOME (ŷ)
                    discarded afterwards
``"persistent"``    T steps from the previous ``z`` (warm start)            V-PBGD (ω)
``gamma=γ``         steps on ``g(x, z) + ‖z − y_k‖²/(2γ)`` (proximal):       MEHA (θ)
                    ``z → θ*_γ(x, y_k)``, the Moreau-envelope point
==================  ======================================================  ====================

With ``z`` held constant, the value gap ``q(x, y) = g(x, y) − g(x, z)`` has the gradient
``(∇_x g(x, y) − ∇_x g(x, z), ∇_y g(x, y))`` — a difference of gradients that replaces
the mixed product ``−J v`` of implicit differentiation (:func:`value_gap` computes it
with one backward pass). :class:`Penalty` is the penalty controller γ_k (nondecreasing,
optionally normalised by ``s(γ) = min(1, 1/γ)``) and :func:`check_penalty` the check of a
penalty schedule. The joint steps themselves are written in the methods
(:mod:`bilevel.methods.bome`, :mod:`bilevel.methods.pbgd`, :mod:`bilevel.methods.meha`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import torch

from .. import tree as T
from ..oracles import Oracles
from ..problem import Problem
from ..schedules import Constant, Exponential, Linear, Polynomial, Schedule, ScheduleLike, as_schedule
from ..state import EmptyState, part_state
from ..tree import Tree
from ..validation import ArgumentTypeError, check_choice, check_fraction, check_positive, describe, is_number
from .lower import LowerGD

__all__ = ["Penalty", "Shadow", "ShadowState", "check_penalty", "value_gap"]

#: the iterations at which a schedule given as a plain callable is checked to be nondecreasing
_PROBE = (0, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 100_000, 1_000_000)


@part_state
class ShadowState(NamedTuple):
    """The persistent shadow variable ``z`` (PBGD's ω, MEHA's θ), a tree shaped like y."""

    z: Tree


@dataclass(frozen=True)
class Shadow(LowerGD):
    """Shadow lower dynamics: T gradient steps on ``g(x, ·)`` (or on its proximal version)
    from y (restart) or from the previous shadow (persistent).

        z ← z − β_z [∇_y g(x_k, z) + (z − y_k)/γ] + m (z − z_prev)      T times

    (the proximal term only with ``gamma``; the heavy-ball term only with ``momentum``).
    ``run`` returns the shadow ``z_T``; ``step`` and ``differentiable_step`` are those of
    :class:`~bilevel.parts.LowerGD` (a step from y anchored at y has no proximal term).

    Args:
        lr: β_z, the shadow step.
        steps: T.
        start: ``"restart"`` (``z₀ = y_k`` every iteration; BOME's ŷ) or ``"persistent"``
            (``z₀`` = the previous shadow, kept in :class:`ShadowState`; PBGD's ω, MEHA's θ).
        momentum: heavy-ball weight m ∈ [0, 1), restarted every iteration (BOAT's VFO
            uses 0.5; 0 is the papers' plain gradient step).
        gamma: γ of the proximal term ``‖z − y_k‖²/(2γ)`` (MEHA), or ``None``.

    Example:
        >>> import torch, bilevel as bl
        >>> problem = bl.problems.T1(n=2)                    # ∇_y g = y − x
        >>> x, y = {"x": torch.ones(2, dtype=torch.float64)}, {"y": torch.zeros(2, dtype=torch.float64)}
        >>> shadow = bl.parts.Shadow(lr=0.5, steps=2)
        >>> z, _, _ = shadow.run(problem, x, y, None, bl.Oracles(), shadow.init(y), 0)
        >>> z["y"]                                           # 1 − (1 − 0.5)²
        tensor([0.7500, 0.7500], dtype=torch.float64)
    """

    start: str = "restart"
    momentum: float = 0.0
    gamma: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_choice(owner, "start", self.start, ("restart", "persistent"))
        check_fraction(owner, "momentum", self.momentum)
        check_positive(owner, "gamma", self.gamma, allow_none=True)

    def init(self, y: Tree) -> EmptyState | ShadowState:  # type: ignore[override]
        return ShadowState(z=T.clone(y)) if self.start == "persistent" else EmptyState()

    def run(
        self, problem: Problem, x: Tree, y: Tree, batch: Any, oracles: Oracles, state: Any = None, k: int = 0
    ) -> tuple[Tree, Tree, Any]:
        """``(z_T, last step direction, state)``: T steps from y or from the kept shadow."""
        z = state.z if self.start == "persistent" else y
        previous = z
        direction: Tree = None
        for _ in range(self.steps):
            direction, _ = oracles.gradient_y(problem.lower, x, z, batch)
            if self.gamma is not None:
                direction = T.axpy(1.0 / self.gamma, T.sub(z, y), direction)
            z_next = T.axpy(-self.lr, direction, z)
            if self.momentum:
                z_next = T.axpy(self.momentum, T.sub(z, previous), z_next)
            previous, z = z, z_next
        return z, direction, (ShadowState(z=z) if self.start == "persistent" else state)


def value_gap(oracles: Oracles, lower: Callable, x: Tree, y: Tree, z: Tree, batch: Any) -> tuple[Tree, Tree, torch.Tensor]:
    """``(∇_x q, ∇_y q, q)`` of the value gap ``q(x, y) = g(x, y) − g(x, z)`` with z constant,
    by one backward pass: ``∇_x q = ∇_x g(x, y) − ∇_x g(x, z)``, ``∇_y q = ∇_y g(x, y)``.

    Example:
        >>> import torch, bilevel as bl
        >>> problem = bl.problems.T1(n=1)                    # g = ½y² − xy
        >>> one = lambda v: {"x": torch.tensor([v], dtype=torch.float64)}
        >>> gx, gy, q = bl.parts.value_gap(bl.Oracles(), problem.lower, one(1.0), {"y": torch.tensor([3.0], dtype=torch.float64)},
        ...                                {"y": torch.tensor([1.0], dtype=torch.float64)}, None)
        >>> float(q), float(gx["x"][0]), float(gy["y"][0])  # q = (4.5 − 3) − (0.5 − 1); ∇_x q = −3 + 1; ∇_y q = 3 − 1
        (2.0, -2.0, 2.0)
    """
    shadow = T.detach(z)

    def gap(xx: Tree, yy: Tree, bb: Any) -> torch.Tensor:
        difference: torch.Tensor = lower(xx, yy, bb) - lower(xx, shadow, bb)
        return difference

    return oracles.gradients(gap, x, y, batch)


def _library_schedule_trend(value: Any) -> tuple[float, float, int] | None:
    """``(first, later, k_later)`` showing the trend of a library schedule, or ``None``."""
    if isinstance(value, Linear):
        return value.start, value.end, value.steps
    if isinstance(value, Polynomial):
        return value(0), value(1000), 1000
    if isinstance(value, Exponential):
        return value(0), value(1000), 1000
    return None


def check_penalty(owner: str, name: str, value: Any, *, allow_zero_start: bool = True) -> Any:
    """A penalty γ (or c): a number ≥ 0, or a nondecreasing schedule ``k -> γ_k ≥ 0``.

    A decreasing schedule fails with one line that shows two of its values: a penalty
    method's bias falls like 1/γ only if γ does not fall. Plain callables are probed at
    ``k = 0, 1, 2, …, 10⁶``; the library's schedules (:mod:`bilevel.schedules`) are read
    from their fields.
    """
    label = describe(owner, name, value)
    if isinstance(value, bool) or not (is_number(value) or callable(value)):
        raise ArgumentTypeError(
            f"{label} must be a number >= 0 or a nondecreasing schedule (callable k -> float), not {type(value).__name__}"
        )
    if is_number(value):
        number = float(value)
        if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero_start):
            raise ValueError(f"{label} must be a {'number >= 0' if allow_zero_start else 'positive number'} (finite)")
        return value
    trend = _library_schedule_trend(value)
    if trend is not None:
        first, later, k_later = trend
        if later < first:
            raise ValueError(
                f"{label} decreases ({first:g} at k = 0, {later:g} at k = {k_later}): a penalty must be nondecreasing, "
                f"e.g. bilevel.schedules.Linear(0.0, 10.0, 1000)"
            )
        probes: tuple[int, ...] = (0,)
    elif isinstance(value, Constant):
        probes = (0,)
    else:
        probes = _PROBE
    previous: tuple[int, float] | None = None
    for k in probes:
        gamma = value(k)
        if not (is_number(gamma) and math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"{label} gives {gamma!r} at k = {k}: a penalty must be a finite number >= 0")
        if k == 0 and gamma == 0 and not allow_zero_start:
            raise ValueError(f"{label} gives 0 at k = 0: this penalty divides the upper objective, it must be positive")
        if previous is not None and gamma < previous[1]:
            raise ValueError(
                f"{label} decreases ({previous[1]:g} at k = {previous[0]}, {gamma:g} at k = {k}): a penalty must be "
                f"nondecreasing, e.g. bilevel.schedules.Linear(0.0, 10.0, 1000)"
            )
        previous = (k, float(gamma))
    return value


@dataclass(frozen=True)
class Penalty:
    """The penalty controller γ_k of a penalty method: nondecreasing, ≥ 0.

    ``scale(k)`` is PBGD's normaliser ``s(γ_k) = min(1, 1/γ_k)`` (with the code's 1e-8
    guard) when ``normalise``, else 1: the penalised objective ``s(γ)(f + γ p)`` then has
    gradients of size O(1) however large γ grows.

    Args:
        value: γ, a number ≥ 0 or a nondecreasing schedule (e.g.
            ``bilevel.schedules.Linear(0, 0.2, 30000)``, PBGD's linear ramp).
        normalise: apply ``s(γ)``.

    Example:
        >>> import bilevel as bl
        >>> penalty = bl.parts.Penalty(bl.schedules.Linear(0.0, 10.0, 10), normalise=True)
        >>> penalty(5), round(penalty.scale(5), 6), penalty(50)
        (5.0, 0.2, 10.0)
    """

    value: ScheduleLike = 1.0
    normalise: bool = False

    def __post_init__(self) -> None:
        check_penalty("Penalty", "value", self.value)

    @cached_property
    def schedule(self) -> Schedule:
        """γ as a schedule (built once)."""
        return as_schedule(self.value, "Penalty(value)")

    def __call__(self, k: int) -> float:
        return float(self.schedule(k))

    def scale(self, k: int) -> float:
        """``min(1, 1/(γ_k + 1e-8))`` when ``normalise``, else 1."""
        return min(1.0, 1.0 / (self(k) + 1e-8)) if self.normalise else 1.0
