"""The dual-correction options that sl-BAMM and BAGDC share.

Both methods keep the multiplier ``v`` (Liu et al.'s ``z``; ``H v ≈ ∇_y f``) as a
variable of the iteration and correct it by one step per upper iteration (the part
:class:`~bilevel.parts.DualCorrection`), run by the :class:`~bilevel.methods.Alternating`
template in the sequential (paper) or Jacobi (official code) order. The step η_k is a
schedule (``dual_step="fixed"``: :class:`~bilevel.parts.FixedStep`), the exact line
search ``‖r‖²/(rᵀ H_φ r)`` (``"linesearch"``: :class:`~bilevel.parts.LineSearch`, guarded:
``dual_fallback`` when ``rᵀHr ≤ 0``, optional clip ``max_dual_step``), or the
self-governed ``"periodic"`` rule (:class:`~bilevel.parts.Periodic`): a line search every
``period`` iterations whose step is kept for the following ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..auto import auto_upper, is_auto
from ..parts import DualCorrection, FixedStep, KKTResidual, LineSearch, Parts, Periodic
from ..parts.assembly import ORDERS
from ..parts.multiplier import NUMERATORS
from ..schedules import ScheduleLike, as_schedule
from ..validation import check_bool, check_choice, check_count, check_positive, check_step_size
from .base import option

__all__ = ["DUAL_RULES", "DualOptions"]

DUAL_RULES = ("fixed", "linesearch", "periodic")


@dataclass(frozen=True, kw_only=True)
class DualOptions:
    """The options of a one-step dual correction (a mixin of sl-BAMM and BAGDC).

    Args:
        dual_step: ``"fixed"`` (η_k = ``lr_dual``), ``"linesearch"`` or ``"periodic"``.
        lr_dual: η_k of ``dual_step="fixed"``: a number or a schedule.
        period: iterations between line searches of ``dual_step="periodic"``.
        order: ``"sequential"`` (paper) or ``"jacobi"`` (official code).
        max_dual_step: optional clip of the line-search step.
        dual_fallback: the step used when the curvature along r is not positive.
        line_search_numerator: ``"residual"`` (``‖r‖²``, the exact line search) or
            ``"tensorwise"`` (``(Σ_i ‖r_i‖)²`` over y's tensors: the official scripts'
            reproduction quirk, docs/algorithms.md#sl-bamm-official-code-quirks).
        exact_kkt: ``False`` (default): the KKT diagnostics cost no product of their own
            (``kkt_multiplier`` and ``dual_residual_sq`` at ``v_{k+1}`` from the line
            search's ``H v_k − η H r``, or at ``v_k`` from the residual of a fixed step);
            ``True``: every term at ``v_{k+1}`` from one ``(J v, H v)`` pass per objective
            (:class:`~bilevel.parts.KKTResidual`).
    """

    dual_step: str = option("fixed", check_choice, choices=DUAL_RULES)
    lr_dual: ScheduleLike = option(0.5, check_step_size)
    period: int = option(10, check_count)
    order: str = option("sequential", check_choice, choices=ORDERS)
    max_dual_step: float | None = option(None, check_positive, allow_none=True)
    dual_fallback: float = option(0.1, check_positive)
    line_search_numerator: str = option("residual", check_choice, choices=NUMERATORS)
    exact_kkt: bool = option(False, check_bool)

    def dual_correction(self) -> DualCorrection:
        """The multiplier part these options describe."""
        if self.dual_step == "fixed":
            return DualCorrection(FixedStep(self.lr_dual))
        search = LineSearch(fallback=self.dual_fallback, max_step=self.max_dual_step, numerator=self.line_search_numerator)
        return DualCorrection(search if self.dual_step == "linesearch" else Periodic(self.period, search))

    def dual_stability_steps(self) -> list[tuple[str, float, int]]:
        """A fixed η_0 is checked against ``2/λ_max(H_φ)`` like the lower step."""
        return [("lr_dual", float(as_schedule(self.lr_dual)(0)), 1)] if self.dual_step == "fixed" else []

    # sl-BAMM and BAGDC differ only in their lower dynamics: the rest of their parts and the
    # steps they check for stability are these (self is also an AutoSteps method)
    def dual_method_parts(self, lower: Any) -> Parts:
        """The parts around ``lower``: the dual correction of these options (monitored when
        ``lr_dual="auto"``), the KKT measure, the order and the upper step."""
        me: Any = self
        return Parts(
            lower=lower,
            multiplier=me.auto_dual_correction(),
            measure=KKTResidual(exact=self.exact_kkt),
            order=self.order,
            upper=auto_upper(me.lr_upper),
        )

    def lower_and_dual_stability_steps(self) -> list[tuple[str, float, int]]:
        """β and a fixed η_0 below ``2/λ_max`` of the lower Hessian (of g or φ_μ); auto steps are not checked."""
        me: Any = self
        dual = [] if is_auto(self.lr_dual) else self.dual_stability_steps()
        steps: list[tuple[str, float, int]] = me.given_steps([("lr_lower", me.lr_lower, 1), *dual])
        return steps
