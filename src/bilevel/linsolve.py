"""Solvers for the multiplier's linear system ``H v = b``.

Implicit hypergradients need ``v ≈ H⁻¹ b`` with ``H = ∇²_yy g`` (or ``∇²_yy φ_μ``) and
``b = ∇_y f``; the hypergradient is then ``∇_x f − J v``. All solvers here are
matrix-free (they only call ``matvec(v) = H v``), run a fixed number of iterations
(no host synchronisation, no data-dependent Python branching) and return a
:class:`LinearSolveResult` with the residual they have for free.

Sign convention of the library: ``v`` solves ``H v = ∇_y f`` and the direction is
``d = ∇_x f − J v``. GALET's shadow variable is ``w = −v``; Liu et al.'s ``z`` equals ``v``.

========================  =============================================  ===============
solver                    update                                         H-products/iter
========================  =============================================  ===============
:class:`CG`               conjugate gradient on ``H v = b``              1
:class:`Neumann`          ``v = s Σ_{i=0}^{K} (I − sH)^i b``             1
:class:`FixedPoint`       Richardson ``v ← v − s (H v − b)`` from v₀     1
:class:`NormalGD`         GD on ``½‖H v − b‖²``: ``v ← v − ρ H (H v − b)`` 2
:class:`LineSearchStep`   ``v ← v − η r``, ``η = ‖r‖²/(rᵀHr)``, r = Hv − b 2
========================  =============================================  ===============

``NormalGD`` is GALET's shadow-implicit-gradient loop (it converges to the minimum-norm
least-squares solution from ``v₀ = 0`` even when ``H`` is singular); ``LineSearchStep``
repeats the "CG-type" dual correction of sl-BAMM/BAGDC, with guards the official code
lacks (docs/algorithms.md#sl-bamm-official-code-quirks). In a method, a solver is a
multiplier estimator through :class:`bilevel.parts.LinearSolve`; the single-loop methods'
one correction per iteration is :class:`bilevel.parts.DualCorrection`, whose line-search
step is :func:`line_search_step_size`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, cast

import torch

from . import tree as T
from .tree import Tree
from .validation import ArgumentTypeError, check_count, check_positive, describe

MatVec = Callable[[Tree], Tree]
LeafMatVec = Callable[[T.Leaves], T.Leaves]

__all__ = [
    "CG",
    "FixedPoint",
    "LineSearchStep",
    "LinearSolveResult",
    "LinearSolver",
    "Neumann",
    "NormalGD",
    "check_solver",
    "estimate_spectral_norm",
    "line_search_step_size",
]


@dataclass(frozen=True)
class LinearSolveResult:
    """Outcome of a linear solve.

    Attributes:
        v: the approximate solution.
        residual_sq: ``‖H v' − b‖²`` at the last iterate ``v'`` whose residual was formed
            (the final iterate for CG; the one before the last update for the
            stationary iterations, where it is free); ``None`` when it was not formed
            (a fixed-step dual correction).
        step: the last step size used (line-search solvers), else ``None``.
        normal_residual_sq: ``‖H (H v' − b)‖²`` at the same iterate, for :class:`NormalGD`
            (the gradient of its least-squares objective; GALET's third stationarity term).
        residual: the residual tree ``H v' − b`` itself, when a solver keeps it (the dual
            correction: its ``v'`` is the previous multiplier), else ``None``.
        hv: ``H v`` at the returned ``v`` when it came for free (the line-search dual
            correction: ``H v_k − η H r``), else ``None``.
        previous: the iterate ``v'`` whose residual was formed, when a solver keeps it (the
            dual correction: the previous multiplier ``v_k``), else ``None``.
    """

    v: Tree
    residual_sq: torch.Tensor | None
    step: torch.Tensor | None = None
    normal_residual_sq: torch.Tensor | None = None
    residual: Tree | None = None
    hv: Tree | None = None
    previous: Tree | None = None


class LinearSolver:
    """Protocol: ``solver(matvec, b, v0) -> LinearSolveResult``.

    ``v0`` is the starting point: ``None`` for a cold start from zero (which costs no
    product), the previous multiplier for a warm start; ``Neumann``, defined from zero,
    ignores it.
    """

    steps: int
    #: whether the solver starts from ``v0`` (``False``: it is defined from zero and ignores it)
    uses_start: ClassVar[bool] = True

    def __call__(self, matvec: MatVec, b: Tree, v0: Tree | None = None) -> LinearSolveResult:  # pragma: no cover - protocol
        raise NotImplementedError

    def hvps(self) -> int:
        """Hessian-vector products per call."""
        return self.steps


def check_solver(owner: str, name: str, value: object) -> LinearSolver:
    """A linear solver of this module (an instance of :class:`LinearSolver`)."""
    if not isinstance(value, LinearSolver):
        raise ArgumentTypeError(
            f"{describe(owner, name, value)} must be a linear solver such as bilevel.CG(steps=10), not a {type(value).__name__}"
        )
    return value


_TINY: dict = {}


def _tiny(dtype: torch.dtype) -> float:
    """``torch.finfo(dtype).tiny``, cached (it is looked up several times per solver step)."""
    tiny = _TINY.get(dtype)
    if tiny is None:
        tiny = _TINY[dtype] = torch.finfo(dtype).tiny
    return tiny


def _safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den > 0``, else 0 (no host sync)."""
    # the quotient where den ≤ tiny (inf or nan) is computed but never selected: no clamp kernel
    return torch.where(den > _tiny(den.dtype), num / den, 0.0)


def _leaf_matvec(matvec: MatVec, like: Tree) -> LeafMatVec:
    """``matvec`` on the leaf lists of trees shaped like ``like`` (the solvers iterate on lists)."""
    return lambda leaves: T.leaves_like(matvec(T.unflatten_like(leaves, like)), like)


@dataclass(frozen=True)
class CG(LinearSolver):
    """Conjugate gradient on ``H v = b`` for symmetric positive (semi)definite ``H``.

    ``r₀ = b − H v₀, p₀ = r₀``; for t < K:
    ``α = ‖r‖²/(pᵀHp), v ← v + αp, r' = r − αHp, β = ‖r'‖²/‖r‖², p ← r' + βp``.
    When ``pᵀHp ≤ 0`` (a nonconvex or exactly solved system) the step is zero instead
    of a division by zero, so later iterations leave ``v`` unchanged.

    Args:
        steps: K, number of iterations (= Hessian-vector products, plus one for a warm start).

    Reference: Hestenes & Stiefel (1952); as an AID solver, Pedregosa (2016),
    Grazzi et al. (2020).
    """

    steps: int = 10

    def __post_init__(self) -> None:
        check_count("CG", "steps", self.steps)

    def __call__(self, matvec: MatVec, b: Tree, v0: Tree | None = None) -> LinearSolveResult:
        mv, bl = _leaf_matvec(matvec, b), T.leaves(b)
        v: T.Leaves = [torch.zeros_like(t) for t in bl] if v0 is None else T.leaves_like(v0, b)
        r = bl if v0 is None else torch._foreach_sub(bl, mv(v))
        p = r
        rr = T.sq_norm_leaves(r)
        # once ‖r‖ ≤ ε‖b‖ the system is solved to rounding; further steps on a singular H
        # would divide rounding noise by a vanishing curvature and make v drift
        solved_below = (torch.finfo(rr.dtype).eps ** 2) * T.sq_norm_leaves(bl)
        for _ in range(self.steps):
            hp = mv(p)
            alpha = torch.where(rr > solved_below, _safe_divide(rr, T.vdot_leaves(p, hp)), 0.0)
            v = T.axpy_leaves(alpha, p, v)
            r = T.axpy_leaves(-alpha, hp, r)
            rr_new = T.sq_norm_leaves(r)
            beta = _safe_divide(rr_new, rr)
            p = T.axpy_leaves(beta, p, r)
            rr = rr_new
        return LinearSolveResult(v=T.unflatten_like(v, b), residual_sq=rr)


def _residual_leaves(mv: LeafMatVec, b: T.Leaves, v: T.Leaves | None) -> T.Leaves:
    """``H v − b`` on leaf lists; ``v = None`` stands for zero and costs no product."""
    return torch._foreach_mul(b, -1.0) if v is None else torch._foreach_sub(mv(v), b)


def _start_leaves(b: T.Leaves, v0: T.Leaves | None) -> T.Leaves:
    return [torch.zeros_like(t) for t in b] if v0 is None else v0


@dataclass(frozen=True)
class Neumann(LinearSolver):
    """Truncated Neumann series ``v = s Σ_{i=0}^{K} (I − sH)^i b`` (ignores ``v0``).

    Converges to ``H⁻¹ b`` when ``0 < s < 2/λ_max(H)`` and ``H`` is positive definite.

    Args:
        steps: K, number of Hessian-vector products.
        lr: s, the series step.

    Reference: Lorraine, Vicol & Duvenaud (AISTATS 2020).
    """

    steps: int = 10
    lr: float = 0.1
    uses_start: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_count("Neumann", "steps", self.steps)
        check_positive("Neumann", "lr", self.lr)

    def __call__(self, matvec: MatVec, b: Tree, v0: Tree | None = None) -> LinearSolveResult:
        mv, bl = _leaf_matvec(matvec, b), T.leaves(b)
        term: T.Leaves = bl
        v: T.Leaves = torch._foreach_mul(bl, self.lr)
        for _ in range(self.steps):
            term = T.axpy_leaves(-self.lr, mv(term), term)
            v = T.axpy_leaves(self.lr, term, v)
        # b − H v = (I − sH)^{K+1} b would cost one more product; the last term
        # ‖(I − sH)^K b‖² bounds it within a factor ‖I − sH‖ and is free
        return LinearSolveResult(v=T.unflatten_like(v, b), residual_sq=T.sq_norm_leaves(term))


@dataclass(frozen=True)
class FixedPoint(LinearSolver):
    """Richardson / fixed-point iteration ``v ← v − s (H v − b)`` from ``v0``.

    With ``v0 = 0`` and K steps it equals :class:`Neumann` with K − 1 terms; with a
    warm start it is one step of a dual correction per call.

    Args:
        steps: K, number of iterations (= Hessian-vector products).
        lr: s, the step; stable when ``0 < s < 2/λ_max(H)``.

    Reference: Grazzi et al., "On the Iteration Complexity of Hypergradient
    Computation" (ICML 2020).
    """

    steps: int = 10
    lr: float = 0.1

    def __post_init__(self) -> None:
        check_count("FixedPoint", "steps", self.steps)
        check_positive("FixedPoint", "lr", self.lr)

    def __call__(self, matvec: MatVec, b: Tree, v0: Tree | None = None) -> LinearSolveResult:
        mv, bl = _leaf_matvec(matvec, b), T.leaves(b)
        v: T.Leaves | None = None if v0 is None else T.leaves_like(v0, b)
        r: T.Leaves = []
        for _ in range(self.steps):  # steps ≥ 1, so v is set
            r = _residual_leaves(mv, bl, v)
            v = T.axpy_leaves(-self.lr, r, _start_leaves(bl, v))
        # the residual of the last iterate that formed one (‖H v' − b‖², v' the previous
        # iterate): one norm after the loop, not one per iteration kept only at the end
        return LinearSolveResult(v=T.unflatten_like(cast(T.Leaves, v), b), residual_sq=T.sq_norm_leaves(r))


@dataclass(frozen=True)
class NormalGD(LinearSolver):
    """Gradient descent on the least-squares problem ``½‖H v − b‖²``.

    ``r = H v − b;  v ← v − ρ H r``. From ``v0 = 0`` the iterates stay in Range(H) and
    converge to the minimum-norm solution ``H^† b`` even when ``H`` is singular
    (a PL but not strongly convex lower level). Stable iff ``ρ < 2/λ_max(H)²``.
    This is GALET's shadow-implicit-gradient subproblem (in GALET's sign, ``w = −v``
    minimises ``½‖∇_y f + H w‖²``).

    Args:
        steps: T, number of iterations (2T Hessian-vector products).
        lr: ρ, the step.

    Reference: Xiao, Lu & Chen, "A Generalized Alternating Method for Bilevel Learning
    under the Polyak-Łojasiewicz Condition", NeurIPS 2023.
    """

    steps: int = 10
    lr: float = 0.1

    def __post_init__(self) -> None:
        check_count("NormalGD", "steps", self.steps)
        check_positive("NormalGD", "lr", self.lr)

    def hvps(self) -> int:
        return 2 * self.steps

    def __call__(self, matvec: MatVec, b: Tree, v0: Tree | None = None) -> LinearSolveResult:
        mv, bl = _leaf_matvec(matvec, b), T.leaves(b)
        v: T.Leaves | None = None if v0 is None else T.leaves_like(v0, b)
        r: T.Leaves = []
        hr: T.Leaves = []
        for _ in range(self.steps):  # steps ≥ 1, so v is set
            r = _residual_leaves(mv, bl, v)
            hr = mv(r)
            v = T.axpy_leaves(-self.lr, hr, _start_leaves(bl, v))
        # the norms of the last iteration only (computed once, after the loop)
        return LinearSolveResult(
            v=T.unflatten_like(cast(T.Leaves, v), b), residual_sq=T.sq_norm_leaves(r), normal_residual_sq=T.sq_norm_leaves(hr)
        )


def line_search_step_size(r_sq: torch.Tensor, r_h_r: torch.Tensor, fallback: float, max_step: float | None) -> torch.Tensor:
    """The exact line-search step ``η = ‖r‖²/(rᵀHr)`` of a quadratic, with guards.

    If ``rᵀHr ≤ 0`` (negative curvature, or ``r = 0``) the step is ``fallback``;
    the step is clipped to ``[0, max_step]`` when ``max_step`` is given. No host sync.
    """
    # where rᵀHr > tiny the clamp of the denominator changes nothing, and elsewhere the quotient
    # is not selected: dividing by rᵀHr itself gives the same step with one kernel less
    exact = r_sq / r_h_r
    eta = torch.where(r_h_r > _tiny(r_h_r.dtype), exact, torch.full_like(exact, fallback))
    if max_step is not None:
        eta = torch.clamp(eta, min=0.0, max=max_step)
    return eta


@dataclass(frozen=True)
class LineSearchStep(LinearSolver):
    """Steepest descent with exact line search on ``½ vᵀHv − bᵀv``.

    ``r = H v − b;  η = ‖r‖²/(rᵀ H r);  v ← v − η r`` (``steps`` times). This is the
    "CG-type" dual correction of sl-BAMM's and BAGDC's official code. Guards (unlike the
    official code): if ``rᵀHr ≤ 0`` the step falls back to ``fallback``, and the step
    is clipped to ``[0, max_step]``.

    Args:
        steps: number of line-search steps (2 Hessian-vector products each).
        fallback: step used when the curvature along ``r`` is not positive.
        max_step: optional upper bound on η.

    Reference: Liu et al., ICML 2023 (sl-BAMM), official code ``BAMM_CG``.
    """

    steps: int = 1
    fallback: float = 0.1
    max_step: float | None = None

    def __post_init__(self) -> None:
        check_count("LineSearchStep", "steps", self.steps)
        check_positive("LineSearchStep", "fallback", self.fallback)
        if self.max_step is not None:
            check_positive("LineSearchStep", "max_step", self.max_step)

    def hvps(self) -> int:
        return 2 * self.steps

    def __call__(self, matvec: MatVec, b: Tree, v0: Tree | None = None) -> LinearSolveResult:
        mv, bl = _leaf_matvec(matvec, b), T.leaves(b)
        v: T.Leaves | None = None if v0 is None else T.leaves_like(v0, b)
        residual_sq, eta = None, None
        for _ in range(self.steps):  # steps ≥ 1, so v is set
            r = _residual_leaves(mv, bl, v)
            residual_sq = T.sq_norm_leaves(r)
            eta = line_search_step_size(residual_sq, T.vdot_leaves(r, mv(r)), self.fallback, self.max_step)
            v = T.axpy_leaves(-eta, r, _start_leaves(bl, v))
        return LinearSolveResult(v=T.unflatten_like(cast(T.Leaves, v), b), residual_sq=residual_sq, step=eta)


def power_start(like: Tree, seed: int = 0) -> Tree:
    """The start vector of a power iteration: a unit-norm tree shaped like ``like``, drawn
    on the CPU from a fixed seed (the same on every device), then moved to ``like``'s device."""
    gen = torch.Generator().manual_seed(seed)
    v = T.tree_map(lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device), like)
    return T.scale(1.0 / T.norm(v), v)


def estimate_spectral_norm(matvec: MatVec, like: Tree, iters: int = 30, seed: int = 0) -> float:
    """Estimate ``max |λ(H)|`` by power iteration (``iters`` products, one host sync).

    Used to check step sizes against stability bounds at the initial point; the start
    vector is drawn from a fixed seed so the estimate is reproducible (:func:`power_start`).
    """
    v = power_start(like, seed)
    estimate = torch.zeros(())
    for _ in range(iters):
        hv = matvec(v)
        estimate = T.norm(hv)
        if not bool(estimate > 0):
            return 0.0
        v = T.scale(1.0 / estimate, hv)
    return float(estimate)
