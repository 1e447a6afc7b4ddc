"""The single-loop multiplier iteration shared by sl-BAMM and BAGDC.

Both methods keep the multiplier ``v`` (Liu et al.'s ``z``; ``H v ≈ ∇_y f``) as a
variable of the iteration and correct it by one step per upper iteration, on an
objective ``φ_μ = μ f + (1 − μ) g`` (``μ = 0``: the lower objective itself):

sequential order (the papers' form)::

    y_{k+1} = y_k − β ∇_y φ_μ(x_k, y_k)                      (N steps)
    r_k     = H_φ v_k − ∇_y f            at (x_k, y_{k+1})
    v_{k+1} = v_k − η_k r_k                                   (dual correction)
    x_{k+1} = Proj_X(x_k − α_k (∇_x f − J_φ v_{k+1}))

Jacobi order (the official ``*_mp`` / ``BAMM_CG`` code): every quantity at
``(x_k, y_k, v_k)``, the upper direction uses the old ``v_k`` and the lower step reuses
the gradient ``∇_y φ_μ(x_k, y_k)`` already built for the products.

The step η_k is a schedule (``"fixed"``), the exact line search ``‖r‖²/(rᵀ H_φ r)``
(``"linesearch"``, guarded: fallback when ``rᵀHr ≤ 0``, optional clip), or the
self-governed ``"periodic"`` rule: a line search every ``period`` iterations whose step
is kept for the following ones.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import tree as T
from ..linsolve import estimate_spectral_norm, line_search_step_size
from ..oracles import Linearization, Oracles, WeightedLinearization
from ..schedules import as_schedule
from ..validation import check_choice, check_count
from .base import (
    LowerAggregated,
    LowerGD,
    State,
    check_stability_option,
    check_step_bound,
)

DUAL_RULES = ("fixed", "linesearch", "periodic")
ORDERS = ("sequential", "jacobi")


def check_dual_options(owner: str, order: str, dual_step: str, lower_steps: int, period: int, stability_check: str = "warn") -> None:
    check_stability_option(owner, stability_check)
    check_choice(owner, "order", order, ORDERS)
    check_choice(owner, "dual_step", dual_step, DUAL_RULES)
    if order == "jacobi" and lower_steps != 1:
        raise ValueError(
            f"{owner}(order='jacobi') takes exactly one lower step per iteration (it reuses the gradient at "
            f"(x_k, y_k)); got lower_steps={lower_steps}: use order='sequential' for several lower steps"
        )
    check_count(owner, "period", period)


def check_stability(method, problem, state: State, batch, mu: float) -> None:
    """Check the lower step β and a constant dual step η against ``2/λ_max(H_φ)`` at the start.

    Both the lower gradient step and the fixed-step dual correction are gradient steps on
    quadratics with Hessian ``H_φ`` near the solution, so each diverges when its step
    exceeds ``2/λ_max(H_φ)``. λ_max is estimated by power iteration (30 products).
    """
    if method.stability_check == "off":
        return
    lin_phi = linearize_parts(method._oracles(), problem, mu, state.x, state.y, batch)[0]
    lam = estimate_spectral_norm(lin_phi.hvp, state.y)
    if lam <= 0:
        return
    which = "H" if mu == 0.0 else "∇²_yy φ_μ"
    detail = f"2/λ_max({which}) with λ_max ≈ {lam:.4g}"
    owner = type(method).__name__
    check_step_bound(owner, "lr_lower", method.lr_lower, 2.0 / lam, detail, method.stability_check)
    if method.dual_step == "fixed":
        check_step_bound(owner, "lr_dual", float(as_schedule(method.lr_dual)(0)), 2.0 / lam, detail, method.stability_check)


def linearize_parts(oracles: Oracles, problem, mu: float, x, y, batch):
    """``(lin_phi, lin_f_or_None, lin_g, grad_x_f, grad_y_f, upper_loss)`` at ``(x, y)``."""
    lin_g = oracles.linearize(problem.lower, x, y, batch)
    if mu == 0.0:
        grad_x_f, grad_y_f, upper_loss = oracles.gradients(problem.upper, x, y, batch)
        return lin_g, None, lin_g, grad_x_f, grad_y_f, upper_loss
    lin_f = oracles.linearize(problem.upper, x, y, batch, with_grad_x=True)
    lin_phi = WeightedLinearization([(mu, lin_f), (1.0 - mu, lin_g)])
    return lin_phi, lin_f, lin_g, lin_f.grad_x, lin_f.grad_y, lin_f.value


def _products(lin_f: Optional[Linearization], lin_g: Linearization, mu: float, v):
    """``(J_φ v, H_φ v, J_g v, H_g v)`` with one pass per objective."""
    jg, hg = lin_g.both(v)
    if lin_f is None:
        return jg, hg, jg, hg
    jf, hf = lin_f.both(v)
    return T.axpy(mu, jf, T.scale(1.0 - mu, jg)), T.axpy(mu, hf, T.scale(1.0 - mu, hg)), jg, hg


def dual_step_size(rule, eta_fixed, period, k, state_eta, r, lin_phi, fallback, max_step):
    """``(η_k, new stored η)`` for the dual correction (may cost one Hessian product)."""
    if rule == "fixed":
        return torch.as_tensor(eta_fixed, dtype=T.leaves(r)[0].dtype, device=T.leaves(r)[0].device), state_eta
    if rule == "periodic" and k % period != 0:
        return state_eta, state_eta
    r_sq = T.sq_norm(r)
    eta = line_search_step_size(r_sq, T.vdot(r, lin_phi.hvp(r)), fallback, max_step)
    return eta, eta


def multiplier_iteration(method, problem, state: State, batch, *, mu: float, lower_lr: float, eta_fixed: float):
    """One iteration of the sequential or Jacobi multiplier scheme (see the module docstring).

    ``method`` provides ``order``, ``dual_step``, ``period``, ``lower_steps``,
    ``dual_fallback``, ``max_dual_step``, the upper update and the projection.
    """
    oracles = method._oracles()
    x, v, k = state.x, state.v, state.k
    if method.order == "sequential":
        dynamics = LowerAggregated(lr=lower_lr, steps=method.lower_steps, mu=mu) if mu else LowerGD(lr=lower_lr, steps=method.lower_steps)
        y_eval, _ = dynamics.run(problem, x, state.y, batch, oracles)
    else:
        y_eval = state.y
    lin_phi, lin_f, lin_g, grad_x_f, grad_y_f, upper_loss = linearize_parts(oracles, problem, mu, x, y_eval, batch)

    if method.order == "sequential":
        h_v = lin_phi.hvp(v)
        r = T.sub(h_v, grad_y_f)
        eta, stored = dual_step_size(method.dual_step, eta_fixed, method.period, k, state.extra.get("eta"), r, lin_phi, method.dual_fallback, method.max_dual_step)
        v_new = T.axpy(-eta, r, v)
        j_phi, h_phi, j_g, h_g = _products(lin_f, lin_g, mu, v_new)
        y_new = y_eval
    else:
        j_phi, h_phi, j_g, h_g = _products(lin_f, lin_g, mu, v)
        r = T.sub(h_phi, grad_y_f)
        eta, stored = dual_step_size(method.dual_step, eta_fixed, method.period, k, state.extra.get("eta"), r, lin_phi, method.dual_fallback, method.max_dual_step)
        v_new = T.axpy(-eta, r, v)
        y_new = T.axpy(-lower_lr, lin_phi.grad_y, y_eval)

    direction = T.sub(grad_x_f, j_phi)
    new_x, opt = method.update_x(state, direction)
    kkt_upper = method.projected_direction_sq(x, T.sub(grad_x_f, j_g))
    kkt_multiplier = T.sq_norm(T.sub(grad_y_f, h_g))
    kkt_lower = T.sq_norm(lin_g.grad_y)
    direction_sq = T.sq_norm(direction)
    info = {
        "upper_loss": upper_loss,
        "lower_grad_sq": kkt_lower,
        "direction_sq": direction_sq,
        "dual_residual_sq": T.sq_norm(T.sub(h_phi, grad_y_f)),
        "dual_step": eta,
        "kkt_upper": kkt_upper,
        "kkt_multiplier": kkt_multiplier,
        "kkt_lower": kkt_lower,
        "stationarity": kkt_upper + kkt_multiplier + kkt_lower,
    }
    if lin_f is not None:
        info["kkt_phi"] = (
            method.projected_direction_sq(x, direction, direction_sq)
            + T.sq_norm(T.sub(grad_y_f, h_phi))
            + T.sq_norm(lin_phi.grad_y)
        )
    extra = dict(state.extra)
    if stored is not None:
        extra["eta"] = stored
    return state.replace(x=new_x, y=y_new, v=v_new, opt=opt, k=k + 1, extra=extra), info
