"""Step-size and averaging schedules: pure functions of the iteration counter ``k``.

A schedule is any callable ``k -> float`` (``k = 0, 1, ...``); a plain number stands for
a constant. Schedules are evaluated in Python from the integer counter kept in the
method state, so they cost no device work and no host synchronisation.

The sl-BAMM schedules (ALGORITHMS.md §3.4) are all polynomial in ``k + 1``:
``μ_k = μ₀ (k+1)^{-1/p}``, ``α_k = s (k+1)^{-3τ/2} μ_k^q = s μ₀^q (k+1)^{-(3τ/2 + q/p)}``,
``η_k = s (k+1)^{-τ/2} μ_k^r``; :func:`bamm_schedules` builds them, with BOAT's
strategies ``s1``/``s2``/``s3`` ((q, r) = (7, 2), (5, 1), (3, 0)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

__all__ = [
    "Schedule",
    "ScheduleLike",
    "Constant",
    "Polynomial",
    "Linear",
    "Exponential",
    "as_schedule",
    "bamm_schedules",
    "BAMM_STRATEGIES",
]

Schedule = Callable[[int], float]
ScheduleLike = Union[float, int, Schedule]


@dataclass(frozen=True)
class Constant:
    """``c`` at every iteration."""

    value: float

    def __call__(self, k: int) -> float:
        return self.value


@dataclass(frozen=True)
class Polynomial:
    """``c · (k + shift)^{-power}``; ``power = 0`` is a constant."""

    value: float
    power: float
    shift: float = 1.0

    def __post_init__(self):
        if self.shift <= 0:
            raise ValueError(f"Polynomial(shift={self.shift}) must be positive so that (k + shift) > 0 at k = 0")

    def __call__(self, k: int) -> float:
        return self.value * (k + self.shift) ** (-self.power)


@dataclass(frozen=True)
class Linear:
    """Linear interpolation from ``start`` (k = 0) to ``end`` (k = ``steps``), then constant."""

    start: float
    end: float
    steps: int

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"Linear(steps={self.steps}) must be >= 1")

    def __call__(self, k: int) -> float:
        t = min(k, self.steps) / self.steps
        return self.start + t * (self.end - self.start)


@dataclass(frozen=True)
class Exponential:
    """``c · rate^k`` (e.g. rate 0.99, the ``--exp`` option of the BAGDC code)."""

    value: float
    rate: float

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
    """The sl-BAMM schedules ``(μ_k, α_k, η_k)`` of ALGORITHMS.md §3.4.

    ``μ_k = μ₀ (k+1)^{-1/p}``, ``α_k = s (k+1)^{-3τ/2} μ_k^q``, ``η_k = s (k+1)^{-τ/2} μ_k^r``
    with ``(q, r)`` = (7, 2) for ``s1``, (5, 1) for ``s2`` and (3, 0) for ``s3`` (the
    official toy command ``--thelr --p0 10``: μ₀ = 0.9, p = 10, τ = 1/40, s = 0.1).

    Args:
        s: the lower-level step (``y_lr`` in the code), which also scales α and η.
        mu0, p: initial averaging weight μ₀ and its decay exponent 1/p.
        tau: τ, the small exponent of the step-size decay.
        strategy: ``"s1"``, ``"s2"`` or ``"s3"`` (BOAT's names).

    Returns:
        ``(mu, alpha, eta)`` as :class:`Polynomial` schedules.
    """
    if strategy not in BAMM_STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {sorted(BAMM_STRATEGIES)}")
    if not 0 < mu0 < 1:
        raise ValueError(f"mu0={mu0} must lie in (0, 1)")
    if p <= 0 or tau < 0 or s <= 0:
        raise ValueError(f"need p > 0, tau >= 0 and s > 0 (got p={p}, tau={tau}, s={s})")
    q, r = BAMM_STRATEGIES[strategy]
    mu = Polynomial(mu0, 1.0 / p)
    alpha = Polynomial(s * mu0**q, 1.5 * tau + q / p)
    eta = Polynomial(s * mu0**r, 0.5 * tau + r / p)
    return mu, alpha, eta
