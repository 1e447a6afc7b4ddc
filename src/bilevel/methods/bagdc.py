"""BAGDC: bilevel alternating gradient with dual correction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch

from .. import tree as T
from ..oracles import Oracles
from ..schedules import ScheduleLike, as_schedule
from ..updates import Box, UpperOptimizer, as_upper_optimizer
from ..validation import check_choice, check_count, check_fraction, check_positive, check_step_size
from .base import Method, State, check_common
from .dual import check_dual_options, check_stability, multiplier_iteration

__all__ = ["BAGDC"]


@dataclass(frozen=True)
class BAGDC(Method):
    """BAGDC (Liu, Liu, Yao, Zeng & Zhang, arXiv:2205.10054): alternating gradient steps
    with the dual multiplier as a variable and one dual-correction step per iteration.

    Sequential order (default)::

        y_{k+1} = T_k(x_k, y_k)          N gradient steps on g  (lower="gd")
                                         or on φ_μ = μ f + (1 − μ) g  (lower="bda")
        r_k     = H v_k − ∇_y f          at (x_k, y_{k+1})
        v_{k+1} = v_k − η_k r_k          dual correction
        x_{k+1} = Proj_X(x_k − α_k (∇_x f − J v_{k+1}))

    ``order="jacobi"`` evaluates everything at ``(x_k, y_k, v_k)`` and uses ``v_k`` in the
    x-step (the code's ``*_mp`` modes; less stable: on an ill-conditioned quadratic it
    needs α ≈ 0.1/L_Φ where the sequential order converges with 1/L_Φ).

    Dual step η_k (``dual_step``):
    ``"fixed"`` — ``lr_dual`` (a number or schedule: RHG-type correction);
    ``"linesearch"`` — ``‖r‖²/(rᵀHr)`` (CG-type, self-tuned; two Hessian products);
    ``"periodic"`` — self-governed: a line search every ``period`` iterations whose step
    is kept for the next ``period − 1`` ones (one Hessian product on most iterations).

    Without the dual variable, a warm-started one-step unroll converges to the wrong
    point (x = 1/(1+β) on T1); the dual correction makes the fixed point exact.

    Stationarity reported: the KKT residual ``‖∇_x f − Jv‖² + ‖∇_y f − Hv‖² + ‖∇_y g‖²``
    with g (``kkt_upper``, ``kkt_multiplier``, ``kkt_lower``).

    Args:
        lr_upper: α_k (a number, a schedule or an upper optimizer).
        lr_lower: β, the lower step.
        lower_steps: N (1 in the code; the Jacobi order needs 1).
        lower: ``"gd"`` (g) or ``"bda"``: lower steps, H and J on φ_μ (the code's ``--BDA``).
        lower_mu: μ of ``"bda"`` (0.1 in the code).
        dual_step, lr_dual, period: see above.
        order: ``"sequential"`` or ``"jacobi"``.
        max_dual_step, dual_fallback: guards of the line search.
        project_x: optional projection of x.
        stability_check: ``"warn"`` (default), ``"error"`` or ``"off"``: at ``init``, estimate
            λ_max of the lower Hessian (of φ_μ) by power iteration and check ``lr_lower``
            and a fixed ``lr_dual`` against the bound ``2/λ_max``.

    Cost per iteration (sequential, fixed η): N gradients of g, one gradient of f, one
    gradient of g with a graph, one Hessian product, one pass for ``(J v, H v)``.

    Example:
        >>> import bilevel as bl
        >>> method = bl.BAGDC(lr_upper=0.5, lr_lower=0.5, lr_dual=0.5)
        >>> result = bl.solve(bl.problems.T1(n=5), method, max_iters=300)
        >>> round(float(result.x["x"][0]), 4)
        0.5

    Reference: Risheng Liu, Xuan Liu, Wei Yao, Shangzhi Zeng, Jin Zhang, "Towards
    Extremely Fast Bilevel Optimization with Self-governed Convergence Guarantees",
    arXiv:2205.10054, 2022.
    """

    name: ClassVar[str] = "BAGDC"
    stationarity_doc: ClassVar[str] = "KKT residual ‖∇_x f − Jv‖² + ‖∇_y f − Hv‖² + ‖∇_y g‖²"

    lr_upper: Union[ScheduleLike, UpperOptimizer] = 0.01
    lr_lower: float = 0.2
    lower_steps: int = 1
    lower: str = "gd"
    lower_mu: float = 0.1
    dual_step: str = "fixed"
    lr_dual: ScheduleLike = 0.5
    period: int = 10
    order: str = "sequential"
    max_dual_step: Optional[float] = None
    dual_fallback: float = 0.1
    project_x: Optional[Box] = None
    stability_check: str = "warn"
    oracles: Optional[Oracles] = None

    def __post_init__(self):
        as_upper_optimizer(self.lr_upper, "lr_upper", "BAGDC")
        check_positive("BAGDC", "lr_lower", self.lr_lower)
        check_count("BAGDC", "lower_steps", self.lower_steps)
        check_choice("BAGDC", "lower", self.lower, ("gd", "bda"))
        check_fraction("BAGDC", "lower_mu", self.lower_mu, low_open=True)
        check_step_size("BAGDC", "lr_dual", self.lr_dual)
        check_dual_options("BAGDC", self.order, self.dual_step, self.lower_steps, self.period, self.stability_check)
        check_positive("BAGDC", "max_dual_step", self.max_dual_step, allow_none=True)
        check_positive("BAGDC", "dual_fallback", self.dual_fallback)
        check_common(self)

    def init(self, problem, x0=None, y0=None, batch=None, validate=True):
        state = super().init(problem, x0, y0, batch, validate)
        check_stability(self, problem, state, batch, self.lower_mu if self.lower == "bda" else 0.0)
        return state

    def _upper(self):
        return as_upper_optimizer(self.lr_upper, "lr_upper", "BAGDC")

    def init_extra(self, x, y):
        if self.dual_step != "periodic":
            return {}
        leaf = T.leaves(y)[0]
        return {"eta": torch.tensor(self.dual_fallback, dtype=leaf.dtype, device=leaf.device)}

    def step(self, problem, state: State, batch=None):
        mu = self.lower_mu if self.lower == "bda" else 0.0
        return multiplier_iteration(
            self, problem, state, batch, mu=mu, lower_lr=self.lr_lower, eta_fixed=as_schedule(self.lr_dual)(state.k)
        )
