"""``Parts``: the parts a method is assembled from, as ``method.parts`` shows them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..updates import UpperOptimizer
from ..validation import ArgumentTypeError, check_choice
from .base import DirectionEstimator, LowerDynamics, Measure, MultiplierEstimator, Projection
from .direction import PlainDirection
from .measure import DirectionNorm
from .unroll import Unroll

__all__ = ["Parts"]

ORDERS = ("sequential", "jacobi")


@dataclass(frozen=True)
class Parts:
    """The parts of a method (a frozen record; ``dataclasses.replace`` gives variants).

    Attributes:
        lower: the lower dynamics (:class:`~bilevel.parts.LowerGD`, :class:`~bilevel.parts.LowerAggregated`).
        multiplier: the multiplier estimator of an alternating method
            (:class:`~bilevel.parts.LinearSolve`, :class:`~bilevel.parts.DualCorrection`).
        unroll: the differentiated steps of an unrolled method (:class:`~bilevel.parts.Unroll`).
        direction: the upper-direction estimator (default :class:`~bilevel.parts.PlainDirection`).
        upper: the upper optimizer (``None`` in ``build_parts``: from the method's ``lr_upper``).
        projection: projection of x (``None`` in ``build_parts``: the method's ``project_x``).
        measure: products and stationarity measure of an alternating method (default
            :class:`~bilevel.parts.DirectionNorm`).
        order: ``"sequential"`` (lower steps, then the multiplier at the new y, then x with
            the new multiplier) or ``"jacobi"`` (everything at ``(x_k, y_k, v_k)``, x with the
            old multiplier, one lower step from the gradient the products built).
    """

    lower: LowerDynamics
    multiplier: MultiplierEstimator | None = None
    unroll: Unroll | None = None
    direction: DirectionEstimator = field(default_factory=PlainDirection)
    upper: UpperOptimizer | None = None
    projection: Projection | None = None
    measure: Measure = field(default_factory=DirectionNorm)
    order: str = "sequential"

    def __post_init__(self) -> None:
        for name, kind in (("lower", LowerDynamics), ("direction", DirectionEstimator), ("measure", Measure)):
            self._check_kind(name, kind)
        if self.multiplier is not None:
            self._check_kind("multiplier", MultiplierEstimator)
        if self.unroll is not None and not isinstance(self.unroll, Unroll):
            raise ArgumentTypeError(f"Parts(unroll={self.unroll!r}) must be a bilevel.parts.Unroll")
        check_choice("Parts", "order", self.order, ORDERS)

    def _check_kind(self, name: str, kind: type) -> None:
        value = getattr(self, name)
        if not isinstance(value, kind):
            raise ArgumentTypeError(f"Parts({name}={value!r}) must be a {kind.__name__} (see bilevel.parts)")

    def replace(self, **changes: Any) -> Parts:
        return dataclasses.replace(self, **changes)
