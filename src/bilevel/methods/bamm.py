"""sl-BAMM: single-loop bilevel averaged method of multipliers."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, cast

import torch

from ..auto import AdaptiveLower, AutoSteps, check_auto_positive, check_auto_step_size, check_auto_upper, is_auto
from ..parts import LowerAggregated, LowerGD, Parts
from ..problem import Problem
from ..schedules import Schedule, ScheduleLike, as_schedule, bamm_schedules
from ..state import State
from ..updates import UpperOptimizer
from ..validation import check_choice, check_fraction
from .alternating import Alternating
from .base import StabilityChecked, check_weight, option
from .dual import DUAL_RULES, DualOptions

__all__ = ["SlBAMM"]

_MU, _ALPHA, _ETA = bamm_schedules(s=0.1, mu0=0.9, p=10.0, tau=1 / 40, strategy="s3")


@dataclass(frozen=True)
class SlBAMM(AutoSteps, StabilityChecked, DualOptions, Alternating):
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

    Step sizes left ``"auto"`` (the default for ``lr_lower`` and ``lr_upper``; docs/auto.md):
    β by adaptive gradient descent on φ_μ (:class:`~bilevel.auto.AdaptiveLower`, the secant
    at fixed x_k from the linearization's gradient: no extra call), α by
    :class:`~bilevel.auto.DoG`; the default line-search dual step needs no step. A guard
    restores the iteration and halves β on a blow-up. ``lr_lower="auto"`` needs
    ``order="sequential"``. Numbers (and :meth:`from_strategy`, :meth:`official_toy`) run
    the iteration above bit for bit.

    Parts (``method.parts``): ``LowerAggregated(lr_lower, 1, mu=freeze_phi_mu or mu,
    index="outer")`` (``AdaptiveLower(1, mu)`` when auto; its μ_k also weights φ_μ in H
    and J), ``DualCorrection`` with the rule of ``dual_step``, ``KKTResidual()``,
    ``PlainDirection()``, the upper optimizer of ``lr_upper`` (``DoG()`` when auto);
    ``Parts.order = order``.

    Args:
        lr_lower: β: ``"auto"`` (default) or the lower step (``s`` / ``y_lr`` in the
            code). The official toy uses 0.1.
        mu: μ_k, a number or schedule; default ``0.9 (k+1)^{-1/10}`` (μ₀ = 0.9, p = 10).
        lr_upper: α_k: ``"auto"`` (default), a number, schedule or upper optimizer; the
            paper's ``s (k+1)^{-3τ/2} μ_k³`` (s = 0.1, τ = 1/40, strategy s3 = official
            toy) is what :meth:`from_strategy` gives.
        dual_step: ``"linesearch"`` (default; exact ``‖r‖²/(rᵀHr)`` as in the official code,
            guarded), ``"fixed"`` (η_k = ``lr_dual``), or ``"periodic"``.
        lr_dual: η_k when ``dual_step="fixed"``; default ``s (k+1)^{-τ/2}`` (s3); ``"auto"``:
            :class:`~bilevel.auto.MonitoredLineSearch`.
        order: ``"sequential"`` (paper) or ``"jacobi"`` (official code).
        freeze_phi_mu: ``None`` (default: φ uses μ_k everywhere, the paper's mathematics)
            or a number: the official scripts bind μ = 0.1 inside φ once and for all
            (only α_k sees μ_k); ``freeze_phi_mu=0.1`` reproduces them.
        max_dual_step: optional clip of the line-search step.
        dual_fallback: the step used when the curvature along r is not positive.
        line_search_numerator: ``"residual"`` (default, ``‖r‖²``: the exact line search)
            or ``"tensorwise"``, ``(Σ_i ‖r_i‖)²`` over y's tensors — what the official
            scripts compute (a reproduction quirk; :meth:`official_toy` uses it).
        period: line-search period for ``dual_step="periodic"``.
        project_x: optional projection of x.
        stability_check: ``"warn"`` (default), ``"error"`` or ``"off"``: at ``init``, estimate
            λ_max of the lower Hessian (of φ_μ) by power iteration and check ``lr_lower``
            and a fixed ``lr_dual`` against the bound ``2/λ_max``.

    Use :meth:`from_strategy` for the μ/α/η schedules of BOAT's strategies s1/s2/s3.

    Cost per iteration (sequential): one gradient of φ, one gradient-with-graph of f and
    of g, one Hessian product of φ for the residual and one for the line search, one
    ``(J_g z, H_g z)`` pass and one mixed product of f for the direction and the
    g-terms of the KKT residual. Diagnostics (``exact_kkt=False``, default):
    ``dual_residual_sq`` and ``kkt_phi`` at ``z_{k+1}`` from the line search's
    ``H z_k − η H r`` (at ``z_k`` for ``dual_step="fixed"`` and on the iterations where
    ``"periodic"`` keeps its step); ``exact_kkt=True`` forms ``H_f z_{k+1}`` too.

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

    lr_upper: ScheduleLike | UpperOptimizer | str = option("auto", check_auto_upper, kw_only=True)  # type: ignore[assignment]
    lr_lower: float | str = option("auto", check_auto_positive)
    mu: ScheduleLike = option(_MU, check_weight)
    dual_step: str = option("linesearch", check_choice, choices=DUAL_RULES, kw_only=True)
    lr_dual: ScheduleLike | str = option(_ETA, check_auto_step_size, kw_only=True)  # type: ignore[assignment]
    freeze_phi_mu: float | None = option(None, check_fraction, allow_none=True)

    @classmethod
    def from_strategy(
        cls, s: float = 0.1, mu0: float = 0.9, p: float = 10.0, tau: float = 1 / 40, strategy: str = "s3", **options: Any
    ) -> SlBAMM:
        """sl-BAMM with the schedules ``μ_k, α_k, η_k`` of strategy s1/s2/s3
        (docs/algorithms.md#sl-bamm-schedules).

        BOAT's hyper-cleaning defaults are ``s=0.01, mu0=0.9, p=100, tau=0.01, strategy="s1"``.
        """
        mu, alpha, eta = bamm_schedules(s=s, mu0=mu0, p=p, tau=tau, strategy=strategy)
        return cls(lr_lower=s, mu=mu, lr_upper=options.pop("lr_upper", alpha), lr_dual=eta, **options)

    @classmethod
    def official_toy(cls, **options: Any) -> SlBAMM:
        """The official merely-convex toy command (``strategy3.py --hg_mode BAMM_CG --BDA
        --thelr --p0 10``): Jacobi order, line-search multiplier step with the scripts'
        numerator ``(Σ_i ‖r_i‖)²`` over y's tensors (``line_search_numerator="tensorwise"``,
        a reproduction quirk: the exact step has ``‖r‖²``), μ frozen at 0.1 inside φ,
        s = 0.1, μ₀ = 0.9, p = 10, τ = 1/40, α_k = s (k+1)^{-3τ/2} μ_k³."""
        defaults = {"order": "jacobi", "dual_step": "linesearch", "freeze_phi_mu": 0.1, "line_search_numerator": "tensorwise"}
        defaults.update(options)
        return cls.from_strategy(s=0.1, mu0=0.9, p=10.0, tau=1 / 40, strategy="s3", **defaults)

    def build_parts(self) -> Parts:
        mu = self.mu if self.freeze_phi_mu is None else self.freeze_phi_mu
        lower: LowerGD | AdaptiveLower
        auto = is_auto(self.lr_lower)
        lower = AdaptiveLower(steps=1, mu=mu) if auto else LowerAggregated(lr=cast(float, self.lr_lower), steps=1, mu=mu, index="outer")
        return self.dual_method_parts(lower)

    def stability_steps(self) -> list[tuple[str, float, int]]:
        """β and a fixed η_0 below ``2/λ_max(∇²_yy φ_μ0)``."""
        return self.lower_and_dual_stability_steps()

    def averaging_weight(self, k: int) -> float:
        """μ used inside φ at iteration k (``freeze_phi_mu`` if set, else μ_k)."""
        return self.parts.lower.averaging(k)

    def step(self, problem: Problem, state: State, batch: Any = None) -> tuple[State, dict]:
        new_state, info = super().step(problem, state, batch)
        info["mu"] = torch.scalar_tensor(float(self.mu_schedule(state.k)), dtype=info["upper_loss"].dtype, device=info["upper_loss"].device)
        return new_state, info

    @cached_property
    def mu_schedule(self) -> Schedule:
        """``mu`` as a schedule (built once; ``info["mu"]`` reports μ_k even when φ's μ is frozen)."""
        return as_schedule(self.mu)
