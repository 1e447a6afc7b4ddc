"""Step-size and averaging schedules: pure functions of the iteration counter ``k``.

A schedule is any callable ``k -> float`` (``k = 0, 1, ...``); a plain number stands for
a constant. Schedules are evaluated in Python from the integer counter kept in the
method state, so they cost no device work and no host synchronisation.

The sl-BAMM schedules (docs/algorithms.md#sl-bamm-schedules) are all polynomial in ``k + 1``:
``μ_k = μ₀ (k+1)^{-1/p}``, ``α_k = s (k+1)^{-3τ/2} μ_k^q = s μ₀^q (k+1)^{-(3τ/2 + q/p)}``,
``η_k = s (k+1)^{-τ/2} μ_k^r``; :func:`bamm_schedules` builds them, with BOAT's
strategies ``s1``/``s2``/``s3`` ((q, r) = (7, 2), (5, 1), (3, 0)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .validation import check_choice, check_count, check_fraction, check_nonnegative, check_number, check_positive

__all__ = [
    "BAMM_STRATEGIES",
    "Constant",
    "Exponential",
    "Linear",
    "Polynomial",
    "Schedule",
    "ScheduleLike",
    "as_schedule",
    "bamm_schedules",
]

Schedule = Callable[[int], float]
ScheduleLike = float | int | Schedule


@dataclass(frozen=True)
class Constant:
    """``c`` at every iteration."""

    value: float

    def __post_init__(self) -> None:
        check_number("Constant", "value", self.value)

    def __call__(self, k: int) -> float:
        return self.value


@dataclass(frozen=True)
class Polynomial:
    """``c · (k + shift)^{-power}``; ``power = 0`` is a constant."""

    value: float
    power: float
    shift: float = 1.0

    def __post_init__(self) -> None:
        check_number("Polynomial", "value", self.value)
        check_number("Polynomial", "power", self.power)
        check_number(
            "Polynomial", "shift", self.shift, low=0.0, low_open=True, expected="a positive number (so that k + shift > 0 at k = 0)"
        )

    def __call__(self, k: int) -> float:
        return float(self.value * (k + self.shift) ** (-self.power))


@dataclass(frozen=True)
class Linear:
    """Linear interpolation from ``start`` (k = 0) to ``end`` (k = ``steps``), then constant."""

    start: float
    end: float
    steps: int

    def __post_init__(self) -> None:
        check_number("Linear", "start", self.start)
        check_number("Linear", "end", self.end)
        check_count("Linear", "steps", self.steps)

    def __call__(self, k: int) -> float:
        t = min(k, self.steps) / self.steps
        return self.start + t * (self.end - self.start)


@dataclass(frozen=True)
class Exponential:
    """``c · rate^k`` (e.g. rate 0.99, the ``--exp`` option of the BAGDC code)."""

    value: float
    rate: float

    def __post_init__(self) -> None:
        check_number("Exponential", "value", self.value)
        check_positive("Exponential", "rate", self.rate)

    def __call__(self, k: int) -> float:
        return self.value * self.rate**k


def as_schedule(value: ScheduleLike, name: str = "step size") -> Schedule:
    """A schedule from a number or a callable; clear error otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a schedule (callable k -> float), got a bool")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value} must be a finite number >= 0")
        return Constant(float(value))
    if callable(value):
        return value
    raise TypeError(f"{name} must be a number or a schedule (callable k -> float), got {type(value).__name__}")


BAMM_STRATEGIES = {"s1": (7, 2), "s2": (5, 1), "s3": (3, 0)}


def bamm_schedules(
    s: float, mu0: float = 0.9, p: float = 10.0, tau: float = 1 / 40, strategy: str = "s3"
) -> tuple[Polynomial, Polynomial, Polynomial]:
    """The sl-BAMM schedules ``(μ_k, α_k, η_k)`` (docs/algorithms.md#sl-bamm-schedules).

    ``μ_k = μ₀ (k+1)^{-1/p}``, ``α_k = s (k+1)^{-3τ/2} μ_k^q``, ``η_k = s (k+1)^{-τ/2} μ_k^r``
    with ``(q, r)`` = (7, 2) for ``s1``, (5, 1) for ``s2`` and (3, 0) for ``s3`` (the
    official toy command ``--thelr --p0 10``: μ₀ = 0.9, p = 10, τ = 1/40, s = 0.1).

    Args:
        s: the lower-level step (``y_lr`` in the code), which also scales α and η.
        mu0: μ₀, the initial averaging weight.
        p: μ decays as (k+1)^{-1/p}.
        tau: τ, the small exponent of the step-size decay.
        strategy: ``"s1"``, ``"s2"`` or ``"s3"`` (BOAT's names).

    Returns:
        ``(mu, alpha, eta)`` as :class:`Polynomial` schedules.
    """
    check_choice("bamm_schedules", "strategy", strategy, sorted(BAMM_STRATEGIES))
    check_positive("bamm_schedules", "s", s)
    check_fraction("bamm_schedules", "mu0", mu0, low_open=True)
    check_positive("bamm_schedules", "p", p)
    check_nonnegative("bamm_schedules", "tau", tau)
    q, r = BAMM_STRATEGIES[strategy]
    mu = Polynomial(mu0, 1.0 / p)
    alpha = Polynomial(s * mu0**q, 1.5 * tau + q / p)
    eta = Polynomial(s * mu0**r, 0.5 * tau + r / p)
    return mu, alpha, eta
