"""Iterative differentiation: RHG / ITD (full unroll), T-RHG (truncated) and BDA.

The hypergradient is the derivative of ``f(x, y_T(x))`` where ``y_T(x)`` is the result
of T lower-level steps from ``y_0``, obtained by back-propagating through the steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, cast

from ..auto import TrackedLower, auto_upper, check_auto_positive, check_auto_upper, is_auto
from ..parts import LowerAggregated, LowerGD, Parts, Unroll
from ..parts.unroll import check_checkpoint
from ..schedules import ScheduleLike
from ..updates import UpperOptimizer
from ..validation import check_bool, check_count, check_positive
from .base import check_weight, option
from .unrolled import Unrolled

__all__ = ["BDA", "ITD", "TRHG"]


@dataclass(frozen=True)
class ITD(Unrolled):
    """RHG / ITD: reverse-mode differentiation through the lower-level iterations.

    Per upper iteration k:

        y_0 = y_init (or y_k with ``warm_start``);  y_{t+1} = y_t − β ∇_y g(x_k, y_t),  t < T
        d_k = d/dx f(x, y_T(x)) |_{x = x_k}          (back-propagation through the T steps)
        x_{k+1} = Proj_X(x_k − α d_k)

    With ``truncate = K < T`` only the last K steps are differentiated (T-RHG). Memory
    grows as O(K · dim y); cost T gradients of g plus one backward through K steps.

    Parts (``method.parts``): ``LowerGD(lr_lower, lower_steps)``,
    ``Unroll(truncate, warm_start)``, ``PlainDirection()``, the upper optimizer of
    ``lr_upper``; run by the :class:`~bilevel.methods.Unrolled` template.

    Steps left ``"auto"`` (the default; docs/auto.md): β from the curvature at the start
    of each unroll (:class:`~bilevel.auto.TrackedLower`: a warm-started power iteration,
    one gradient with its graph and one Hessian product per iteration, with a guard that
    undoes a blow-up and halves β), α by :class:`~bilevel.auto.DoG`. Given numbers run the
    iteration above exactly.

    Args:
        lr_upper: α: ``"auto"`` (default), a number, a schedule, or an upper optimizer
            (:class:`~bilevel.Adam`).
        lr_lower: β: ``"auto"`` (default) or a number.
        lower_steps: T.
        truncate: K, number of differentiated steps (``None`` = all, full RHG).
        warm_start: start the lower iterations from the previous ``y_T`` instead of the
            initial ``y``.
        checkpoint: gradient checkpointing of the differentiated steps: ``None`` (keep every
            step's graph, memory O(K)), ``"sqrt"`` (segments of ⌈√K⌉ steps, memory O(√K)
            for about one extra gradient evaluation per step) or a segment length
            (:class:`~bilevel.parts.Unroll`).
        project_x: optional projection of x (e.g. :class:`~bilevel.Box`).

    Stationarity reported: ``‖d‖²`` (projected if ``project_x``).

    Example:
        >>> import bilevel as bl
        >>> result = bl.solve(bl.problems.T1(n=5), bl.ITD(lr_upper=0.5, lr_lower=0.5, lower_steps=40), max_iters=50)
        >>> round(float(result.x["x"][0]), 4)
        0.5

    References: Maclaurin, Duvenaud & Adams (ICML 2015); Franceschi et al. (ICML 2017,
    2018); T-RHG: Shaban et al. (AISTATS 2019).
    """

    name: ClassVar[str] = "ITD"

    lr_upper: ScheduleLike | UpperOptimizer | str = option("auto", check_auto_upper, kw_only=True)  # type: ignore[assignment]
    lr_lower: float | str = option("auto", check_auto_positive)
    lower_steps: int = option(100, check_count)
    truncate: int | None = option(None, check_count, allow_none=True)
    warm_start: bool = option(False, check_bool)
    checkpoint: int | str | None = option(None, check_checkpoint)

    def build_parts(self) -> Parts:
        unroll = Unroll(truncate=self.differentiated_steps(), warm_start=self.warm_start, checkpoint=self.checkpoint)
        dynamics = self.lower_dynamics(1.0 if is_auto(self.lr_lower) else cast(float, self.lr_lower))
        lower = TrackedLower(dynamics) if is_auto(self.lr_lower) else dynamics
        return Parts(lower=lower, unroll=unroll, upper=auto_upper(self.lr_upper))

    def lower_dynamics(self, lr: float) -> LowerGD:
        """The lower steps that are unrolled, with step ``lr`` (with ``lr_lower="auto"`` a
        placeholder: :class:`~bilevel.auto.TrackedLower` sets β each iteration)."""
        return LowerGD(lr=lr, steps=self.lower_steps)

    def differentiated_steps(self) -> int:
        """K, the number of lower steps back-propagated through."""
        return self.lower_steps if self.truncate is None else self.truncate


@dataclass(frozen=True)
class TRHG(ITD):
    """T-RHG: :class:`ITD` differentiating only the last ``truncate`` of ``lower_steps`` steps.

    Default K = T/2, as in the sl-BAMM toy scripts (the PBGD repo uses K = 100 of T = 500).

    Reference: Shaban, Cheng, Hatch & Boots, "Truncated Back-propagation for Bilevel
    Optimization", AISTATS 2019.
    """

    name: ClassVar[str] = "T-RHG"

    def differentiated_steps(self) -> int:
        return max(1, self.lower_steps // 2) if self.truncate is None else self.truncate


@dataclass(frozen=True)
class BDA(ITD):
    """BDA: unrolled differentiation through aggregated lower dynamics.

        y_{t+1} = y_t − [(1 − μ) β ∇_y g(x, y_t) + μ β_u ∇_y f(x, y_t)],   t < T
        d_k = d/dx f(x, y_T(x)),   x_{k+1} = Proj_X(x_k − α d_k)

    The upper objective enters the lower dynamics, which selects the optimistic
    solution when the lower level has many (T2: reaches x* = 1 where RHG stops at 0.505).

    Args:
        mu: μ ∈ (0, 1), aggregation weight (a number or a schedule of the inner index t).
        lr_lower_upper: β_u, step on ``∇_y f`` (default β); the same name as on
            :class:`~bilevel.parts.LowerAggregated`, its lower dynamics.

    The other arguments are those of :class:`ITD`.

    Reference: Liu, Mu, Yuan, Zeng & Zhang, "A Generic First-Order Algorithmic Framework
    for Bi-Level Programming Beyond Lower-Level Singleton", ICML 2020.
    """

    name: ClassVar[str] = "BDA"

    mu: ScheduleLike = option(0.1, check_weight)
    lr_lower_upper: float | None = option(None, check_positive, allow_none=True)

    def lower_dynamics(self, lr: float) -> LowerAggregated:
        return LowerAggregated(lr=lr, steps=self.lower_steps, mu=self.mu, lr_lower_upper=self.lr_lower_upper)
