"""sl-BAMM: single-loop bilevel averaged method of multipliers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch

from .. import tree as T
from ..oracles import Oracles
from ..schedules import ScheduleLike, as_schedule, bamm_schedules
from ..updates import Box, UpperOptimizer, as_upper_optimizer
from ..validation import check_fraction, check_positive, check_step_size
from .base import Method, State, check_common, check_weight
from .dual import check_dual_options, check_stability, multiplier_iteration

__all__ = ["SlBAMM"]

_MU, _ALPHA, _ETA = bamm_schedules(s=0.1, mu0=0.9, p=10.0, tau=1 / 40, strategy="s3")


@dataclass(frozen=True)
class SlBAMM(Method):
    """sl-BAMM (Liu, Liu, Yao, Zeng & Zhang, ICML 2023) for a merely convex lower level.

    The lower objective is averaged with the upper one, ``φ_μ = μ f + (1 − μ) g``, with
    ``μ_k → 0``; when f is strongly convex in y, ``φ_μ(x, ·)`` is strongly convex even though
    g is only convex. The multiplier ``z`` (the library's ``v``) solves
    ``∇²_yy φ_μ z = ∇_y f``. Paper form (``order="sequential"``, default)::

        y_{k+1} = y_k − β ∇_y φ_{μ_k}(x_k, y_k)
        z_{k+1} = z_k − η_k (∇²_yy φ_{μ_k}(x_k, y_{k+1}) z_k − ∇_y f(x_k, y_{k+1}))
        x_{k+1} = Proj_X(x_k − α_k (∇_x f(x_k, y_{k+1}) − ∇²_xy φ_{μ_k}(x_k, y_{k+1}) z_{k+1}))

    ``order="jacobi"`` is the official code's form: every quantity at ``(x_k, y_k, z_k)``,
    the x-step uses the old ``z_k`` (so the first x-step ignores the multiplier).

    Stationarity reported: the KKT residual of ``min f s.t. ∇_y g = 0`` (with g, not φ),

        ‖x − Proj_X(x − (∇_x f − ∇²_xy g z))‖² + ‖∇_y f − ∇²_yy g z‖² + ‖∇_y g‖²

    (``stationarity`` = ``kkt_upper + kkt_multiplier + kkt_lower``), plus the same with
    φ_μ as ``kkt_phi``.

    Args:
        lr_lower: β (``s`` / ``y_lr`` in the code), the lower step; also scales the
            default schedules. The official toy uses 0.1.
        mu: μ_k, a number or schedule; default ``0.9 (k+1)^{-1/10}`` (μ₀ = 0.9, p = 10).
        lr_upper: α_k, a number, schedule or upper optimizer; default
            ``s (k+1)^{-3τ/2} μ_k³`` with s = 0.1, τ = 1/40 (strategy s3 = official toy).
        dual_step: ``"linesearch"`` (default; exact ``‖r‖²/(rᵀHr)`` as in the official code,
            guarded), ``"fixed"`` (η_k = ``lr_dual``), or ``"periodic"``.
        lr_dual: η_k when ``dual_step="fixed"``; default ``s (k+1)^{-τ/2}`` (s3).
        order: ``"sequential"`` (paper) or ``"jacobi"`` (official code).
        freeze_phi_mu: ``None`` (default: φ uses μ_k everywhere, the paper's mathematics)
            or a number: the official scripts bind μ = 0.1 inside φ once and for all
            (only α_k sees μ_k); ``freeze_phi_mu=0.1`` reproduces them.
        max_dual_step, dual_fallback: guards of the line search (clip; step used when
            the curvature along r is not positive).
        period: line-search period for ``dual_step="periodic"``.
        project_x: optional projection of x.
        stability_check: ``"warn"`` (default), ``"error"`` or ``"off"``: at ``init``, estimate
            λ_max of the lower Hessian (of φ_μ) by power iteration and check ``lr_lower``
            and a fixed ``lr_dual`` against the bound ``2/λ_max``.

    Use :meth:`from_strategy` for the μ/α/η schedules of BOAT's strategies s1/s2/s3.

    Cost per iteration: one gradient of φ (sequential), one gradient-with-graph of f and
    of g, one pass per objective for ``(J z, H z)``, plus one Hessian product of φ for the
    line search.

    Example:
        >>> import bilevel as bl
        >>> result = bl.solve(bl.problems.T2(n=5), bl.SlBAMM.official_toy(), max_iters=6000)
        >>> round(float(result.x["x"][0]), 3)
        1.0

    Reference: Risheng Liu, Yaohua Liu, Wei Yao, Shangzhi Zeng, Jin Zhang, "Averaged
    Method of Multipliers for Bi-Level Optimization without Lower-Level Strong
    Convexity", ICML 2023, arXiv:2302.03407.
    """

    name: ClassVar[str] = "sl-BAMM"
    stationarity_doc: ClassVar[str] = "KKT residual ‖∇_x f − Jz‖² + ‖∇_y f − Hz‖² + ‖∇_y g‖²"

    lr_lower: float = 0.1
    mu: ScheduleLike = _MU
    lr_upper: Union[ScheduleLike, UpperOptimizer] = _ALPHA
    dual_step: str = "linesearch"
    lr_dual: ScheduleLike = _ETA
    order: str = "sequential"
    freeze_phi_mu: Optional[float] = None
    max_dual_step: Optional[float] = None
    dual_fallback: float = 0.1
    period: int = 10
    project_x: Optional[Box] = None
    stability_check: str = "warn"
    oracles: Optional[Oracles] = None
    lower_steps: ClassVar[int] = 1

    def __post_init__(self):
        check_positive("SlBAMM", "lr_lower", self.lr_lower)
        check_weight("SlBAMM", "mu", self.mu)
        check_step_size("SlBAMM", "lr_dual", self.lr_dual)
        as_upper_optimizer(self.lr_upper, "lr_upper", "SlBAMM")
        check_dual_options("SlBAMM", self.order, self.dual_step, 1, self.period, self.stability_check)
        check_fraction("SlBAMM", "freeze_phi_mu", self.freeze_phi_mu, allow_none=True)
        check_positive("SlBAMM", "max_dual_step", self.max_dual_step, allow_none=True)
        check_positive("SlBAMM", "dual_fallback", self.dual_fallback)
        check_common(self)

    @classmethod
    def from_strategy(
        cls, s: float = 0.1, mu0: float = 0.9, p: float = 10.0, tau: float = 1 / 40, strategy: str = "s3", **options
    ) -> "SlBAMM":
        """sl-BAMM with the schedules ``μ_k, α_k, η_k`` of strategy s1/s2/s3
        (docs/algorithms.md#sl-bamm-schedules).

        BOAT's hyper-cleaning defaults are ``s=0.01, mu0=0.9, p=100, tau=0.01, strategy="s1"``.
        """
        mu, alpha, eta = bamm_schedules(s=s, mu0=mu0, p=p, tau=tau, strategy=strategy)
        return cls(lr_lower=s, mu=mu, lr_upper=options.pop("lr_upper", alpha), lr_dual=eta, **options)

    @classmethod
    def official_toy(cls, **options) -> "SlBAMM":
        """The official merely-convex toy command (``strategy3.py --hg_mode BAMM_CG --BDA
        --thelr --p0 10``): Jacobi order, line-search multiplier step, μ frozen at 0.1
        inside φ, s = 0.1, μ₀ = 0.9, p = 10, τ = 1/40, α_k = s (k+1)^{-3τ/2} μ_k³."""
        defaults = {"order": "jacobi", "dual_step": "linesearch", "freeze_phi_mu": 0.1}
        defaults.update(options)
        return cls.from_strategy(s=0.1, mu0=0.9, p=10.0, tau=1 / 40, strategy="s3", **defaults)

    def init(self, problem, x0=None, y0=None, batch=None, validate=True):
        state = super().init(problem, x0, y0, batch, validate)
        check_stability(self, problem, state, batch, self.averaging_weight(0))
        return state

    def _upper(self):
        return as_upper_optimizer(self.lr_upper, "lr_upper", "SlBAMM")

    def init_extra(self, x, y):
        if self.dual_step != "periodic":
            return {}
        leaf = T.leaves(y)[0]
        return {"eta": torch.tensor(self.dual_fallback, dtype=leaf.dtype, device=leaf.device)}

    def averaging_weight(self, k: int) -> float:
        """μ used inside φ at iteration k (``freeze_phi_mu`` if set, else μ_k)."""
        if self.freeze_phi_mu is not None:
            return float(self.freeze_phi_mu)
        return float(as_schedule(self.mu)(k))

    def step(self, problem, state: State, batch=None):
        mu = self.averaging_weight(state.k)
        new_state, info = multiplier_iteration(
            self, problem, state, batch, mu=mu, lower_lr=self.lr_lower, eta_fixed=as_schedule(self.lr_dual)(state.k)
        )
        info["mu"] = torch.as_tensor(float(as_schedule(self.mu)(state.k)), dtype=info["upper_loss"].dtype)
        return new_state, info
