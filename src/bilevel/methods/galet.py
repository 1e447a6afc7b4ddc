"""GALET: generalized alternating method for bilevel problems with a PL lower level."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

from .. import tree as T
from ..linsolve import NormalGD, estimate_spectral_norm
from ..oracles import Oracles
from ..schedules import ScheduleLike
from ..updates import Box, UpperOptimizer, as_upper_optimizer
from ..validation import check_bool, check_choice, check_count, check_positive
from .base import (
    LowerGD,
    Method,
    State,
    check_common,
    check_stability_option,
    check_step_bound,
)

__all__ = ["GALET"]


@dataclass(frozen=True)
class GALET(Method):
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
    ``exact_metric=True`` (default) the third term is evaluated at ``w_{k+1}``: the mixed
    product and ``H w_{k+1}`` come from one pass, plus one Hessian product. With
    ``exact_metric=False`` it is the free value at ``w^{(T−1)}``.

    Args:
        lr_upper: α (a number, a schedule or an upper optimizer).
        lr_lower: β, lower step; stable for β < 2/λ_max(H) (use ≤ 1/L_g).
        lower_steps: N.
        lr_shadow: ρ, shadow step; stable for ρ < 2/λ_max(H)² (use ≤ 1/L_g²).
        shadow_steps: T.
        shadow_start: ``"zero"`` (w⁽⁰⁾ = 0, the paper's analysis; biased for small T:
            on T1 with ρ = 0.5, T = 5 the fixed point is 1/(1 + (1 − 0.5⁵)) = 0.507937) or
            ``"warm"`` (w⁽⁰⁾ = w_k, a library option that removes most of that bias).
        project_x: optional projection of x (the paper's x is unconstrained; the
            nonconvex toy T3 lives on [0, 3]).
        exact_metric: see above.
        stability_check: ``"warn"`` (default), ``"error"`` or ``"off"``: at ``init``, estimate
            λ_max(H) by power iteration (30 products) and check β and ρ against their bounds.

    Cost per iteration: N gradients of g, one gradient of f, one gradient of g with a
    graph, 2T Hessian products, one mixed product (+1 Hessian product for the exact metric).

    Example:
        >>> import bilevel as bl
        >>> method = bl.GALET(lr_upper=0.1, lr_lower=0.5, lower_steps=5, lr_shadow=0.5, shadow_steps=5)
        >>> result = bl.solve(bl.problems.T1(n=5), method, max_iters=500)
        >>> round(float(result.x["x"][0]), 6)   # cold-start bias: 1/(1 + (1 − 0.5⁵))
        0.507937

    Reference: Quan Xiao, Songtao Lu, Tianyi Chen, "A Generalized Alternating Method for
    Bilevel Learning under the Polyak-Łojasiewicz Condition", NeurIPS 2023, arXiv:2306.02422.
    """

    name: ClassVar[str] = "GALET"
    stationarity_doc: ClassVar[str] = "R = ‖∇_x f + Jw‖² + ‖∇_y g‖² + ‖H(∇_y f + Hw)‖²"

    lr_upper: Union[ScheduleLike, UpperOptimizer] = 0.1
    lr_lower: float = 0.5
    lower_steps: int = 5
    lr_shadow: float = 0.25
    shadow_steps: int = 10
    shadow_start: str = "zero"
    project_x: Optional[Box] = None
    exact_metric: bool = True
    stability_check: str = "warn"
    oracles: Optional[Oracles] = None

    def __post_init__(self):
        as_upper_optimizer(self.lr_upper, "lr_upper", "GALET")
        check_positive("GALET", "lr_lower", self.lr_lower)
        check_count("GALET", "lower_steps", self.lower_steps)
        check_positive("GALET", "lr_shadow", self.lr_shadow)
        check_count("GALET", "shadow_steps", self.shadow_steps)
        check_choice("GALET", "shadow_start", self.shadow_start, ("zero", "warm"))
        check_bool("GALET", "exact_metric", self.exact_metric)
        check_stability_option("GALET", self.stability_check)
        check_common(self)

    def _upper(self):
        return as_upper_optimizer(self.lr_upper, "lr_upper", "GALET")

    def init(self, problem, x0=None, y0=None, batch=None, validate=True):
        state = super().init(problem, x0, y0, batch, validate)
        if self.stability_check != "off":
            lin = self._oracles().linearize(problem.lower, state.x, state.y, batch)
            lam = estimate_spectral_norm(lin.hvp, state.y)
            if lam > 0:
                check_step_bound("GALET", "lr_lower", self.lr_lower, 2.0 / lam, f"2/λ_max(H) with λ_max(H) ≈ {lam:.4g}", self.stability_check)
                check_step_bound("GALET", "lr_shadow", self.lr_shadow, 2.0 / lam**2, f"2/λ_max(H)² with λ_max(H) ≈ {lam:.4g}", self.stability_check)
        return state

    def step(self, problem, state: State, batch=None):
        oracles = self._oracles()
        x = state.x
        y, _ = LowerGD(lr=self.lr_lower, steps=self.lower_steps).run(problem, x, state.y, batch, oracles)
        grad_x_f, grad_y_f, upper_loss = oracles.gradients(problem.upper, x, y, batch)
        lin = oracles.linearize(problem.lower, x, y, batch)
        v0 = state.v if self.shadow_start == "warm" else None
        shadow = NormalGD(steps=self.shadow_steps, lr=self.lr_shadow)(lin.hvp, grad_y_f, v0)
        v = shadow.v
        if self.exact_metric:
            jv, hv = lin.both(v)
            shadow_term = T.sq_norm(lin.hvp(T.sub(hv, grad_y_f)))
        else:
            jv = lin.mixed(v)
            shadow_term = shadow.normal_residual_sq
        direction = T.sub(grad_x_f, jv)
        new_x, opt = self.update_x(state, direction)
        direction_sq = T.sq_norm(direction)
        upper_term = self.projected_direction_sq(x, direction, direction_sq)
        lower_term = T.sq_norm(lin.grad_y)
        info = {
            "upper_loss": upper_loss,
            "lower_grad_sq": lower_term,
            "direction_sq": direction_sq,
            "linsys_residual_sq": shadow.residual_sq,
            "R_upper": upper_term,
            "R_lower": lower_term,
            "R_shadow": shadow_term,
            "stationarity": upper_term + lower_term + shadow_term,
        }
        return state.replace(x=new_x, y=y, v=v, opt=opt, k=state.k + 1), info
