"""GALET: generalized alternating method for bilevel problems with a PL lower level."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, cast

from ..auto import CGLS, AdaptiveLower, AutoSteps, auto_upper, check_auto_positive, check_auto_upper, is_auto
from ..linsolve import LinearSolver, NormalGD
from ..parts import LinearSolve, LowerGD, Parts, ShadowResidual
from ..schedules import ScheduleLike
from ..updates import UpperOptimizer
from ..validation import check_bool, check_choice, check_count
from .alternating import Alternating
from .base import StabilityChecked, option

__all__ = ["GALET"]


@dataclass(frozen=True)
class GALET(AutoSteps, StabilityChecked, Alternating):
    """GALET (Xiao, Lu & Chen, NeurIPS 2023) for a lower level satisfying the PL condition.

    Per upper iteration k (in GALET's sign ``w = −v``):

        y_{k+1} = N steps of  y ← y − β ∇_y g(x_k, y)                    from y_k
        w_{k+1} = T steps of  w ← w − ρ H (∇_y f + H w)                  from 0 (or w_k)
                  i.e. gradient descent on the shadow problem ½‖∇_y f + H w‖²,
                  H = ∇²_yy g(x_k, y_{k+1}),  ∇_y f = ∇_y f(x_k, y_{k+1})
        d_k     = ∇_x f(x_k, y_{k+1}) + J w_{k+1},   J = ∇²_xy g(x_k, y_{k+1})
        x_{k+1} = Proj_X(x_k − α d_k)

    The library stores ``v = −w`` (``H v ≈ ∇_y f``, ``d = ∇_x f − J v``) like every other
    method. When H is singular (PL, not strongly convex) the shadow iteration from 0
    converges to the minimum-norm least-squares solution.

    Stationarity reported (GALET's metric R, docs/algorithms.md#galet-stationarity-measure),
    at ``(x_k, y_{k+1}, w_{k+1})``:

        R = ‖∇_x f + J w‖²  +  ‖∇_y g‖²  +  ‖H (∇_y f + H w)‖²

    as ``stationarity`` with its terms ``R_upper``, ``R_lower``, ``R_shadow``. With
    ``exact_metric=False`` (default) the third term is the free value at ``w^{(T−1)}``,
    the shadow iterate before the last (what the last shadow step computed); with
    ``exact_metric=True`` it is evaluated at ``w_{k+1}``: the mixed product becomes a
    ``(J w, H w)`` pass plus one more Hessian product (+5–8 % of a step on linear
    hyper-cleaning, docs/performance.md).

    Step sizes left ``"auto"`` (the default, docs/auto.md; :mod:`bilevel.auto`): β by
    adaptive gradient descent (:class:`~bilevel.auto.AdaptiveLower`, β₀ = 1/λ̂ from 30
    power products at ``init``, then the secant at fixed x_k, no extra oracle call); the
    shadow problem by T iterations of :class:`~bilevel.auto.CGLS` (no ρ; the same
    minimum-norm solution from w = 0, 2 products per iteration like the gradient loop);
    α by :class:`~bilevel.auto.DoG`, ``α_k = max_i ‖x_i − x_0‖ / √Σ‖d_i‖²``. A guard
    restores the iteration and halves β on a blow-up. Given numbers run the paper's
    iteration above bit for bit.

    Parts (``method.parts``): ``LowerGD(lr_lower, lower_steps)`` (``AdaptiveLower`` when
    auto), ``LinearSolve(NormalGD(shadow_steps, lr_shadow), warm_start=shadow_start ==
    "warm")`` (``CGLS(shadow_steps)`` when auto), ``ShadowResidual(exact_metric)``,
    ``PlainDirection()``, the upper optimizer of ``lr_upper`` (``DoG()`` when auto).

    Args:
        lr_upper: α: ``"auto"`` (default), a number, a schedule or an upper optimizer.
        lr_lower: β: ``"auto"`` (default) or a lower step, stable for β < 2/λ_max(H)
            (use ≤ 1/L_g).
        lower_steps: N.
        lr_shadow: ρ: ``"auto"`` (default: CGLS, no step) or a shadow step, stable for
            ρ < 2/λ_max(H)² (use ≤ 1/L_g²).
        shadow_steps: T.
        shadow_start: ``"zero"`` (w⁽⁰⁾ = 0, the paper's analysis; biased for small T:
            on T1 with ρ = 0.5, T = 5 the fixed point is 1/(1 + (1 − 0.5⁵)) = 0.507937) or
            ``"warm"`` (w⁽⁰⁾ = w_k, a library option that removes most of that bias).
        project_x: optional projection of x (the paper's x is unconstrained; the
            nonconvex toy T3 lives on [0, 3]).
        exact_metric: see above.
        stability_check: ``"warn"`` (default), ``"error"`` or ``"off"``: at ``init``, estimate
            λ_max(H) by power iteration (30 products) and check a given β and ρ against
            their bounds.

    Cost per iteration: N gradients of g, one gradient of f, one gradient of g with a
    graph, 2T − 1 Hessian products (2T warm-started), one mixed product (``exact_metric=True``: the
    mixed product is a ``(J w, H w)`` pass, +1 Hessian product). Auto: the same per
    iteration (CGLS: 2T products, 2T + 1 warm-started), plus 30 products once at ``init``.

    Example:
        >>> import bilevel as bl
        >>> method = bl.GALET(lr_upper=0.1, lr_lower=0.5, lower_steps=5, lr_shadow=0.5, shadow_steps=5)
        >>> result = bl.solve(bl.problems.T1(n=5), method, max_iters=500)
        >>> round(float(result.x["x"][0]), 6)   # cold-start bias: 1/(1 + (1 − 0.5⁵))
        0.507937
        >>> result = bl.solve(bl.problems.T1(n=5), bl.GALET(), max_iters=300)   # no step size given
        >>> round(float(result.x["x"][0]), 6)
        0.5

    Reference: Quan Xiao, Songtao Lu, Tianyi Chen, "A Generalized Alternating Method for
    Bilevel Learning under the Polyak-Łojasiewicz Condition", NeurIPS 2023, arXiv:2306.02422.
    """

    name: ClassVar[str] = "GALET"
    stationarity_doc: ClassVar[str] = "R = ‖∇_x f + Jw‖² + ‖∇_y g‖² + ‖H(∇_y f + Hw)‖²"

    lr_upper: ScheduleLike | UpperOptimizer | str = option("auto", check_auto_upper, kw_only=True)  # type: ignore[assignment]
    lr_lower: float | str = option("auto", check_auto_positive)
    lower_steps: int = option(5, check_count)
    lr_shadow: float | str = option("auto", check_auto_positive)
    shadow_steps: int = option(10, check_count)
    shadow_start: str = option("auto", check_choice, choices=("auto", "zero", "warm"))
    exact_metric: bool = option(False, check_bool)

    def build_parts(self) -> Parts:
        steps = self.lower_steps
        lower = AdaptiveLower(steps=steps) if is_auto(self.lr_lower) else LowerGD(lr=cast(float, self.lr_lower), steps=steps)
        auto_shadow = is_auto(self.lr_shadow)
        solver: LinearSolver = CGLS(self.shadow_steps) if auto_shadow else NormalGD(self.shadow_steps, lr=cast(float, self.lr_shadow))
        return Parts(
            lower=lower,
            multiplier=LinearSolve(solver, warm_start=self.shadow_start == "warm" or (self.shadow_start == "auto" and auto_shadow)),
            measure=ShadowResidual(exact=self.exact_metric),
            upper=auto_upper(self.lr_upper),
        )

    def stability_steps(self) -> list[tuple[str, float, int]]:
        """β < 2/λ_max(H) and ρ < 2/λ_max(H)²."""
        steps = [("lr_lower", self.lr_lower, 1), ("lr_shadow", self.lr_shadow, 2)]
        return [(name, float(step), power) for name, step, power in steps if not is_auto(step)]
