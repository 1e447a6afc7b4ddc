"""The linearized point of an iteration, and the measures: products and stationarity.

:func:`linearize` builds, at ``(x, y)``, the linearization of the objective the lower
dynamics descend (``φ_μ = μ f + (1 − μ) g``, or g when μ = 0) with the gradients of f —
a :class:`Point`. A measure then forms the upper direction ``∇_x f − J_φ v`` with the
products it needs and reports the stationarity measure of the method's paper:

========================  ==================================================  ==================
measure                   stationarity                                        products for v
========================  ==================================================  ==================
:class:`DirectionNorm`    ``‖x − Proj(x − d)‖²`` (AID, ITD)                   ``J v``
:class:`ShadowResidual`   GALET's R = ``‖d‖² + ‖∇_y g‖² + ‖H(∇_y f − Hv)‖²``     ``(J v, H v)`` + 1 H
:class:`KKTResidual`      ``‖∇_x f − J_g v‖² + ‖∇_y f − H_g v‖² + ‖∇_y g‖²``   ``(J v, H v)`` per objective
========================  ==================================================  ==================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .. import tree as T
from ..linsolve import LinearSolveResult
from ..oracles import Linearization, Oracles, WeightedLinearization, scaled_products
from ..problem import Problem
from ..tree import Tree
from ..validation import check_bool
from .base import Projection, projected_sq

__all__ = ["DirectionNorm", "KKTResidual", "Point", "ShadowResidual", "linearize"]


class Point(NamedTuple):
    """The derivatives of one iteration at ``(x, y)``.

    Attributes:
        phi: linearization of the descended objective φ_μ (``g`` itself when μ = 0).
        f: linearization of f (with ``∇_x f``) when μ > 0, else ``None``.
        g: linearization of g.
        grad_x_f, grad_y_f, upper_loss: ``∇_x f``, ``∇_y f`` and f at the point.
        mu: μ.
    """

    phi: Linearization
    f: Linearization | None
    g: Linearization
    grad_x_f: Tree
    grad_y_f: Tree
    upper_loss: torch.Tensor
    mu: float

    def products(self, v: Tree) -> tuple[Tree, Tree, Tree, Tree]:
        """``(J_φ v, H_φ v, J_g v, H_g v)`` from one backward pass (reverse mode)."""
        if self.f is None:
            jg, hg = self.g.both(v)
            return jg, hg, jg, hg
        (jf, hf), (jg, hg) = scaled_products([(self.f, self.mu, True, True), (self.g, None, True, True)], v)
        one_minus_mu = 1.0 - self.mu
        return T.axpy(one_minus_mu, jg, jf), T.axpy(one_minus_mu, hg, hf), jg, hg

    def direction_products(self, v: Tree, need_hvp_g: bool = True) -> tuple[Tree, Tree, Tree | None]:
        """``(J_φ v, J_g v, H_g v)`` from one backward pass (reverse mode): the direction's
        product and the g-parts of the KKT residual, never ``H_f v`` (``H_g v`` is ``None``
        with ``need_hvp_g=False``)."""
        assert self.f is not None, "direction_products needs μ > 0 (φ_μ ≠ g)"
        (jf, _), (jg, hg) = scaled_products([(self.f, self.mu, True, False), (self.g, None, True, need_hvp_g)], v)
        return T.axpy(1.0 - self.mu, jg, jf), jg, hg

    def recorded_hvp_g(self, solve: LinearSolveResult) -> tuple[Tree | None, bool]:
        """``H_g`` times the multiplier from the products a dual correction formed, free.

        Returns ``(H_g v_{k+1}, True)`` after a line search (``H_g v_k − η H_g r``),
        ``(H_g v_k, False)`` after a fixed step, ``(None, False)`` when the products were
        not recorded (another estimator, or oracles that are not a plain weighted sum).
        """
        phi = self.phi
        if not isinstance(phi, WeightedLinearization) or solve.previous is None:
            return None, False
        h_prev = phi.term_hvp(solve.previous)
        if h_prev is None or solve.hv is None or solve.residual is None or solve.step is None:
            return h_prev, False
        h_r = phi.term_hvp(solve.residual)
        if h_r is None:
            return h_prev, False
        return T.axpy(-solve.step, h_r, h_prev), True


def linearize(oracles: Oracles, problem: Problem, mu: float, x: Tree, y: Tree, batch: Any) -> Point:
    """The :class:`Point` at ``(x, y)``: one gradient-with-graph of g, and either one
    gradient of f (μ = 0) or one gradient-with-graph of f (μ > 0, for the products of φ_μ)."""
    lin_g = oracles.linearize(problem.lower, x, y, batch)
    if mu == 0.0:
        grad_x_f, grad_y_f, upper_loss = oracles.gradients(problem.upper, x, y, batch)
        return Point(lin_g, None, lin_g, grad_x_f, grad_y_f, upper_loss, 0.0)
    lin_f = oracles.linearize(problem.upper, x, y, batch, with_grad_x=True)
    lin_phi = WeightedLinearization([(mu, lin_f), (1.0 - mu, lin_g)])
    return Point(lin_phi, lin_f, lin_g, lin_f.grad_x, lin_f.grad_y, lin_f.value, mu)


def _solver_report(solve: LinearSolveResult | None) -> dict:
    return {} if solve is None or solve.residual_sq is None else {"linsys_residual_sq": solve.residual_sq}


@dataclass(frozen=True)
class DirectionNorm:
    """Stationarity ``‖x − Proj_X(x − d)‖²`` (``‖d‖²`` unconstrained), one mixed product.

    Reports ``upper_loss``, ``lower_grad_sq``, ``direction_sq``, ``stationarity`` and the
    solver's ``linsys_residual_sq``.
    """

    def evaluate(
        self, point: Point, v: Tree, solve: LinearSolveResult | None, x: Tree, projection: Projection | None
    ) -> tuple[Tree, dict, Tree | None]:
        direction = T.sub(point.grad_x_f, point.phi.mixed(v))
        direction_sq, lower_grad_sq = T.sq_norms(direction, point.g.grad_y)
        info = {
            "upper_loss": point.upper_loss,
            "lower_grad_sq": lower_grad_sq,
            "direction_sq": direction_sq,
            "stationarity": projected_sq(projection, x, direction, direction_sq),
        }
        return direction, info, None

    def report(self, solve: LinearSolveResult | None) -> dict:
        return _solver_report(solve)


@dataclass(frozen=True)
class ShadowResidual:
    """GALET's stationarity R (docs/algorithms.md#galet-stationarity-measure), in the
    library's sign ``v = −w``:

        R = ‖x − Proj(x − d)‖² + ‖∇_y g‖² + ‖H (H v − ∇_y f)‖²,   d = ∇_x f − J v

    reported as ``stationarity`` with its terms ``R_upper``, ``R_lower``, ``R_shadow``.

    Args:
        exact: evaluate the third term at the final v (one ``(J v, H v)`` pass and one
            more Hessian product); ``False`` takes the free value of the solver at its
            previous iterate (``normal_residual_sq`` of :class:`~bilevel.NormalGD`).
    """

    exact: bool = True

    def __post_init__(self) -> None:
        check_bool("ShadowResidual", "exact", self.exact)

    def evaluate(
        self, point: Point, v: Tree, solve: LinearSolveResult | None, x: Tree, projection: Projection | None
    ) -> tuple[Tree, dict, Tree | None]:
        if self.exact:
            jv, hv = point.phi.both(v)
            direction = T.sub(point.grad_x_f, jv)
            direction_sq, lower_term, shadow_term = T.sq_norms(direction, point.g.grad_y, point.phi.hvp(T.sub(hv, point.grad_y_f)))
        else:
            if solve is None or solve.normal_residual_sq is None:
                raise ValueError("ShadowResidual(exact=False) needs a solver that reports normal_residual_sq (bilevel.NormalGD)")
            jv, hv = point.phi.mixed(v), None
            shadow_term = solve.normal_residual_sq
            direction = T.sub(point.grad_x_f, jv)
            direction_sq, lower_term = T.sq_norms(direction, point.g.grad_y)
        upper_term = projected_sq(projection, x, direction, direction_sq)
        info = {
            "upper_loss": point.upper_loss,
            "lower_grad_sq": lower_term,
            "direction_sq": direction_sq,
            "R_upper": upper_term,
            "R_lower": lower_term,
            "R_shadow": shadow_term,
            "stationarity": upper_term + lower_term + shadow_term,
        }
        return direction, info, hv

    def report(self, solve: LinearSolveResult | None) -> dict:
        return _solver_report(solve)


@dataclass(frozen=True)
class KKTResidual:
    """The KKT residual of ``min f s.t. ∇_y g = 0`` with multiplier v, with g:

        ‖x − Proj(x − (∇_x f − J_g v))‖² + ‖∇_y f − H_g v‖² + ‖∇_y g‖²

    as ``stationarity`` = ``kkt_upper + kkt_multiplier + kkt_lower``; the direction is
    ``∇_x f − J_φ v``. Also ``dual_residual_sq = ‖H_φ v − ∇_y f‖²``, the multiplier step's
    ``dual_step``, and, when φ_μ ≠ g, the same residual with φ_μ as ``kkt_phi``.

    Args:
        exact: ``True``: every term at the v given, one ``(J v, H v)`` pass per objective.
            ``False`` (default): no product is formed for the diagnostics alone. After a
            dual correction (the sequential order) ``H_φ v_{k+1} = H_φ v_k − η H_φ r`` is
            at hand when the line search formed ``H_φ r``; with a fixed step (or a kept
            periodic step) the terms that need ``H_φ v`` are reported at the previous
            multiplier ``v_k`` from the residual ``r = H_φ v_k − ∇_y f`` the step formed
            (as the linear solvers report theirs). With μ > 0 the g-parts are free too:
            the products of φ_μ keep ``H_g`` separately (one backward pass gives the f- and
            g-parts), so ``kkt_multiplier`` uses ``H_g v_{k+1} = H_g v_k − η H_g r`` after
            a line search and ``H_g v_k`` after a fixed step, and ``kkt_upper`` takes
            ``J_g v_{k+1}`` from the direction's own x-only pass (``J_φ = μ J_f + (1 − μ)
            J_g``). Without a solve result (the Jacobi order, where ``H_φ v_k`` feeds the
            dual step anyway) ``exact`` makes no difference.
    """

    exact: bool = False

    def __post_init__(self) -> None:
        check_bool("KKTResidual", "exact", self.exact)

    def evaluate(
        self, point: Point, v: Tree, solve: LinearSolveResult | None, x: Tree, projection: Projection | None
    ) -> tuple[Tree, dict, Tree | None]:
        if self.exact or solve is None or solve.residual is None:
            return self._exact(point, v, x, projection)
        grad_x_f, grad_y_f = point.grad_x_f, point.grad_y_f
        if point.f is None:  # φ = g: one mixed product, H v from the dual step
            j_g = j_phi = point.g.mixed(v)
            h_g = None
        else:
            h_g, _ = point.recorded_hvp_g(solve)
            j_phi, j_g, h_formed = point.direction_products(v, need_hvp_g=h_g is None)
            h_g = h_formed if h_g is None else h_g
        # the differences in one fused kernel: d = ∇_x f − J_φ v, then H_φ v_{k+1} − ∇_y f (free
        # after a line search), then the g-parts ∇_y f − H_g v and ∇_x f − J_g v when φ_μ ≠ g
        pairs = [(grad_x_f, j_phi)]
        if solve.hv is not None:
            pairs.append((solve.hv, grad_y_f))
        if point.f is not None:
            pairs.append((grad_y_f, h_g))
            if projection is None:
                pairs.append((grad_x_f, j_g))
        differences = iter(T.differences(*pairs))
        direction = next(differences)
        # every squared norm of the diagnostics in one fused kernel: ‖d‖², ‖∇_y g‖², then
        # ‖H_φ v_{k+1} − ∇_y f‖², then the g-parts and ‖∇_y φ_μ‖² when φ_μ ≠ g
        trees = [direction, point.g.grad_y]
        if solve.hv is not None:
            trees.append(next(differences))
        elif solve.residual_sq is None:  # ‖r‖² of a fixed step, in the same kernel
            trees.append(solve.residual)
        if point.f is not None:
            trees += [next(differences), point.phi.grad_y]
            if projection is None:
                trees.append(next(differences))
        norms = iter(T.sq_norms(*trees))
        direction_sq, kkt_lower = next(norms), next(norms)
        # ‖H_φ v_{k+1} − ∇_y f‖² when the line search formed H_φ r, else the residual at v_k the step formed
        dual_sq = next(norms) if solve.residual_sq is None or solve.hv is not None else solve.residual_sq
        phi_lower: torch.Tensor | None = None
        if point.f is None:
            kkt_upper = projected_sq(projection, x, direction, direction_sq)
            kkt_multiplier = dual_sq
        else:
            kkt_multiplier, phi_lower = next(norms), next(norms)
            kkt_upper = next(norms) if projection is None else projected_sq(projection, x, T.sub(grad_x_f, j_g))
        info = {
            "upper_loss": point.upper_loss,
            "lower_grad_sq": kkt_lower,
            "direction_sq": direction_sq,
            "dual_residual_sq": dual_sq,
            "kkt_upper": kkt_upper,
            "kkt_multiplier": kkt_multiplier,
            "kkt_lower": kkt_lower,
            "stationarity": kkt_upper + kkt_multiplier + kkt_lower,
        }
        if phi_lower is not None:
            info["kkt_phi"] = projected_sq(projection, x, direction, direction_sq) + dual_sq + phi_lower
        return direction, info, None

    def _exact(self, point: Point, v: Tree, x: Tree, projection: Projection | None) -> tuple[Tree, dict, Tree | None]:
        j_phi, h_phi, j_g, h_g = point.products(v)
        grad_x_f, grad_y_f = point.grad_x_f, point.grad_y_f
        direction = T.sub(grad_x_f, j_phi)
        direction_sq, kkt_multiplier, kkt_lower, dual_sq = T.sq_norms(
            direction, T.sub(grad_y_f, h_g), point.g.grad_y, T.sub(h_phi, grad_y_f)
        )
        kkt_upper = projected_sq(projection, x, T.sub(grad_x_f, j_g))
        info = {
            "upper_loss": point.upper_loss,
            "lower_grad_sq": kkt_lower,
            "direction_sq": direction_sq,
            "dual_residual_sq": dual_sq,
            "kkt_upper": kkt_upper,
            "kkt_multiplier": kkt_multiplier,
            "kkt_lower": kkt_lower,
            "stationarity": kkt_upper + kkt_multiplier + kkt_lower,
        }
        if point.f is not None:
            info["kkt_phi"] = projected_sq(projection, x, direction, direction_sq) + dual_sq + T.sq_norm(point.phi.grad_y)
        return direction, info, h_phi

    def report(self, solve: LinearSolveResult | None) -> dict:
        return {} if solve is None or solve.step is None else {"dual_step": solve.step}
