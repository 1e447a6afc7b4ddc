"""Check a method's hypergradient against a reference: ``bl.check_hypergradient``.

A bilevel method moves x along an estimate ĥ of the hypergradient ∇Φ(x) of the value
function ``Φ(x) = f(x, y*(x))``, ``y*(x) ∈ argmin_y g(x, y)``. This module measures how
far the estimate a method actually uses at a point is from ∇Φ(x), with a reference
computed independently of the method (docs/check.md):

``"implicit"`` (strongly convex lower level)
    ŷ from a long lower solve (L-BFGS and Newton steps, to ``‖∇_y g(x, ŷ)‖ ≤ lower_tol·max(1, ‖∇_y g(x, y₀)‖)``),
    then the implicit-function-theorem gradient with a linear system solved by CG to a
    relative residual ``linear_tol``::

        ∇Φ(x) = ∇_x f(x, ŷ) − J v,    H v = ∇_y f(x, ŷ),    H = ∇²_yy g(x, ŷ),  J = ∇²_xy g(x, ŷ)

``"finite_difference"`` (any lower level)
    central differences of Φ along m directions ``u_i`` (the coordinates when x has at
    most m entries, otherwise ``u_i ~ N(0, I/m)``, so that ``Σ_i ⟨u_i, e⟩²`` estimates
    ``‖e‖²`` for any e)::

        D_i = [Φ(x + h û_i) − Φ(x − h û_i)] ‖u_i‖ / 2h ≈ ⟨∇Φ(x), u_i⟩,   û_i = u_i/‖u_i‖

    each Φ by a lower solve warm-started at ŷ; the same at 2h estimates the truncation
    error (``‖D_{2h} − D_h‖/3``). The estimate is compared through its projections
    ``⟨ĥ, u_i⟩``.

``"auto"`` (default) takes the implicit reference when CG solves ``H v = ∇_y f`` to
``linear_tol`` (H is positive definite, or singular only along directions f ignores)
or when the lower solve did not converge (finite differences would be as inexact), and
finite differences otherwise.

The result (:class:`HypergradientCheck`) holds the relative error ``‖ĥ − ∇Φ‖/‖∇Φ‖``,
the cosine between them, ‖∇_y g‖ where the method formed ĥ, the reference's own accuracy
and a verdict: ``pass`` (error ≤ ``rtol``), ``warn`` (≤ ``fail_rtol``, or the reference
is inexact) or ``fail``, with the reason in plain words.

Any :class:`~bilevel.Method` can be checked: the estimate is what
:meth:`~bilevel.Method.direction` returns (every method built from parts has it; a new
method supports the check by overriding it, docs/check.md#supporting-a-new-method).

Example:
    >>> import bilevel as bl
    >>> problem = bl.problems.T1g(n=10)
    >>> check = bl.check_hypergradient(problem, bl.AID(solver=bl.CG(steps=20)))
    >>> check.verdict, check.reference, check.relative_error < 1e-8
    ('pass', 'implicit', True)
    >>> check = bl.check_hypergradient(problem, bl.ITD(lr_lower=0.1, lower_steps=5))   # 5 unrolled steps of β = 0.1
    >>> check.verdict, round(check.relative_error, 2)                     # the series cut at (I − βH)⁵
    ('warn', 0.4)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from . import tree as T
from .linsolve import CG
from .methods.base import Method
from .oracles import Oracles
from .parts import LinearSolve
from .problem import Problem
from .state import State
from .tree import Tree
from .validation import ArgumentTypeError, check_bool, check_choice, check_count, check_positive

__all__ = [
    "REFERENCES",
    "VERDICTS",
    "HypergradientCheck",
    "Reference",
    "check_experiment",
    "check_hypergradient",
    "reference_hypergradient",
    "solve_lower",
]

REFERENCES = ("auto", "implicit", "finite_difference")
VERDICTS = ("pass", "warn", "fail")

_ORACLES = Oracles()


def _default_tol(like: Tree) -> float:
    """``max(1e-10, 100 ε)``: what a long solve reaches in the dtype of ``like``."""
    return max(1e-10, 100.0 * torch.finfo(T.leaves(like)[0].dtype).eps)


def _lower_grad_norm(problem: Problem, x: Tree, y: Tree, batch: Any) -> float:
    return float(T.norm(_ORACLES.gradient_y(problem.lower, x, y, batch)[0]))


def _lbfgs(problem: Problem, x: Tree, y: Tree, batch: Any, iters: int, target: float, history: int = 20) -> tuple[Tree, float]:
    """L-BFGS (two-loop recursion, Armijo backtracking) on ``g(x, ·)`` from y until
    ``‖∇_y g‖ ≤ target``, ``iters`` iterations, a failed line search, or 100 iterations
    without halving ‖∇_y g‖ (the Newton steps of :func:`solve_lower` then take over)."""
    grad, value = _ORACLES.gradient_y(problem.lower, x, y, batch)
    residual = float(T.norm(grad))
    resolution = 10.0 * torch.finfo(value.dtype).eps
    pairs: list[tuple[Tree, Tree, torch.Tensor]] = []
    best, since_best = residual, 0
    for _ in range(iters):
        if residual <= target or not math.isfinite(residual) or since_best >= 100:
            break
        q, alphas = grad, []
        for s, dg, rho in reversed(pairs):
            alpha = rho * T.vdot(s, q)
            q = T.axpy(-alpha, dg, q)
            alphas.append(alpha)
        if pairs:  # the initial Hessian γI with γ = sᵀŷ/ŷᵀŷ of the last pair
            s, dg, rho = pairs[-1]
            q = T.scale(1.0 / (rho * T.vdot(dg, dg)), q)
        else:
            q = T.scale(min(1.0, 1.0 / residual), q)
        for (s, dg, rho), alpha in zip(pairs, reversed(alphas), strict=True):
            q = T.axpy(alpha - rho * T.vdot(dg, q), s, q)
        slope = -T.vdot(grad, q)
        if not float(slope) < 0:  # not a descent direction: restart from the gradient
            pairs, q = [], T.scale(min(1.0, 1.0 / residual), grad)
            slope = -T.vdot(grad, q)
        step, accepted = 1.0, False
        while step >= 1e-10:
            candidate = T.axpy(-step, q, y)
            new_grad, new_value = _ORACLES.gradient_y(problem.lower, x, candidate, batch)
            if float(new_value) <= float(value) + 1e-4 * step * float(slope):
                accepted = True
                break
            step *= 0.5
        if not accepted:  # the values of g no longer resolve the descent: Newton takes over
            break
        s, dg = T.sub(candidate, y), T.sub(new_grad, grad)
        curvature = T.vdot(s, dg)
        if float(curvature) > 1e-12 * float(T.vdot(dg, dg)):
            pairs = [*pairs[-(history - 1) :], (s, dg, 1.0 / curvature)]
        decrease = float(value) - float(new_value)
        y, grad, value = candidate, new_grad, new_value
        residual = float(T.norm(grad))
        if decrease <= resolution * max(1.0, abs(float(value))):  # g's values are at rounding
            break
        if residual <= 0.5 * best:
            best, since_best = residual, 0
        else:
            since_best += 1
    return y, residual


def solve_lower(
    problem: Problem, x: Tree, y: Tree, batch: Any = None, iters: int = 1000, tol: float | None = None
) -> tuple[Tree, float, bool]:
    """``(ŷ, ‖∇_y g(x, ŷ)‖, converged)``: a long solve of ``min_y g(x, y)`` from ``y``, to
    ``‖∇_y g‖ ≤ tol · max(1, ‖∇_y g(x, y)‖)`` (``tol`` default ``max(1e-10, 100 ε)``).

    L-BFGS (at most ``iters`` iterations, while it halves ‖∇_y g‖ at least every 100),
    then up to 20 Newton steps ``y ← y − H⁻¹ ∇_y g`` with the Newton system solved by CG,
    each kept only if it lowers ‖∇_y g‖ (past the tolerance: if it halves it), so that ŷ
    is accurate to rounding where the lower level is smooth: the line search compares values of g, which stop
    resolving once ‖∇_y g‖² is below the rounding of g, while the Newton steps only need
    gradients. Nothing of the inputs is modified.
    """
    tol = _default_tol(y) if tol is None else tol
    x, y = T.detach(x), T.clone(T.detach(y))
    target = tol * max(1.0, _lower_grad_norm(problem, x, y, batch))
    solved, residual = _lbfgs(problem, x, y, batch, iters, target)
    newton = CG(steps=min(200, sum(t.numel() for t in T.leaves(y))))
    for _ in range(20):  # also past the target: the finite differences of Φ need ŷ to rounding
        if not math.isfinite(residual) or residual == 0.0:
            break
        lin = _ORACLES.linearize(problem.lower, x, solved, batch)
        candidate = T.sub(solved, newton(lin.hvp, lin.grad_y).v)
        candidate_residual = _lower_grad_norm(problem, x, candidate, batch)
        if not candidate_residual < (0.5 * residual if residual <= target else residual):
            break
        solved, residual = candidate, candidate_residual
    return solved, residual, residual <= target


@dataclass(frozen=True)
class Reference:
    """A reference for ∇Φ(x), computed once and usable for several methods
    (:func:`reference_hypergradient`; pass it as ``check_hypergradient(..., reference=ref)``).

    Attributes:
        kind: ``"implicit"`` or ``"finite_difference"``.
        x: the point; ``y``: ŷ(x), the lower solution the reference was computed at.
        lower_residual: ‖∇_y g(x, ŷ)‖.
        lower_converged: whether the lower solve reached its tolerance.
        error: the estimated relative error of the reference itself (the CG residual
            ``‖H v − ∇_y f‖/‖∇_y f‖``, or the finite differences' truncation estimate).
        note: why this kind was used or what limits it (empty when nothing does).
        gradient: ∇Φ(x) (implicit) or ``None``.
        probes: the directions ``u_i`` (finite differences), as trees shaped like x.
        derivatives: ``D_i ≈ ⟨∇Φ(x), u_i⟩`` (finite differences), a 1-d tensor.
    """

    kind: str
    x: Tree = field(repr=False)
    y: Tree = field(repr=False)
    lower_residual: float
    lower_converged: bool
    error: float
    note: str = ""
    gradient: Tree | None = field(default=None, repr=False)
    probes: tuple = field(default=(), repr=False)
    derivatives: torch.Tensor | None = field(default=None, repr=False)

    def compare(self, estimate: Tree) -> tuple[float, float, float, float]:
        """``(relative error, cosine, ‖estimate‖, ‖reference‖)`` of an estimate shaped like x
        (through its projections ``⟨estimate, u_i⟩`` for a finite-difference reference)."""
        if self.gradient is not None:
            a = torch.cat([t.reshape(-1) for t in T.leaves(estimate)])
            b = torch.cat([t.reshape(-1) for t in T.leaves(self.gradient)])
        else:
            assert self.derivatives is not None
            a = torch.stack([T.vdot(u, estimate) for u in self.probes])
            b = self.derivatives
        a, b = a.double(), b.double().to(a.device)
        a_norm, b_norm = float(a.norm()), float(b.norm())
        tiny = torch.finfo(torch.float64).tiny
        relative = float((a - b).norm()) / max(b_norm, tiny)
        cosine = float(a @ b) / max(a_norm * b_norm, tiny)
        return relative, cosine, a_norm, b_norm


def _implicit(problem: Problem, x: Tree, y: Tree, batch: Any, iters: int, tol: float) -> tuple[Tree, float]:
    """``(∇_x f − J v, ‖H v − b‖/‖b‖)`` with v from CG on ``H v = b = ∇_y f`` (chunks of
    50, restarted from the last; the v with the smallest residual is kept)."""
    grad_x_f, b, _ = _ORACLES.gradients(problem.upper, x, y, batch)
    lin = _ORACLES.linearize(problem.lower, x, y, batch)
    b_norm = float(T.norm(b))
    best, relative, done = T.zeros_like(b), 0.0 if b_norm == 0 else 1.0, 0
    v = best
    while b_norm > 0 and done < iters and relative > tol:
        steps = min(50, iters - done)
        v = CG(steps=steps)(lin.hvp, b, v if done else None).v
        done += steps
        current = float(T.norm(T.sub(lin.hvp(v), b))) / b_norm
        if not math.isfinite(current):
            break
        if current < relative:
            best, relative = v, current
    return T.sub(grad_x_f, lin.mixed(best)), relative


def _probes(x: Tree, directions: int, seed: int) -> list[Tree]:
    """The coordinates when x has at most ``directions`` entries, else ``u_i ~ N(0, I/m)``."""
    leaves = T.leaves(x)
    sizes = [t.numel() for t in leaves]
    total = sum(sizes)
    if total <= directions:
        basis = torch.eye(total, dtype=leaves[0].dtype, device=leaves[0].device)
        rows = [basis[i] for i in range(total)]
    else:
        gen = torch.Generator().manual_seed(seed)
        draw = torch.randn(directions, total, generator=gen, dtype=torch.float64) / math.sqrt(directions)
        rows = [r.to(dtype=leaves[0].dtype, device=leaves[0].device) for r in draw]
    probes = []
    for row in rows:
        parts = torch.split(row, sizes)
        probes.append(T.unflatten_like([p.reshape(t.shape).to(t.dtype) for p, t in zip(parts, leaves, strict=True)], x))
    return probes


def _finite_differences(
    problem: Problem, x: Tree, y: Tree, batch: Any, directions: int, step: float | None, seed: int, iters: int, tol: float
) -> tuple[list[Tree], torch.Tensor, float, float]:
    """``(probes, D_h, estimated relative error, largest lower residual of the solves)``."""
    probes = _probes(x, directions, seed)
    eps = torch.finfo(T.leaves(x)[0].dtype).eps
    h = step if step is not None else eps ** (1.0 / 3.0) * max(1.0, max(float(t.abs().max()) for t in T.leaves(x)))
    worst = 0.0

    def phi(point: Tree) -> float:
        nonlocal worst
        solved, residual, _ = solve_lower(problem, point, y, batch, iters, tol)
        worst = max(worst, residual)
        return float(problem.upper(T.detach(point), solved, batch).detach().double())

    estimates = {}
    for scale in (1.0, 2.0):
        values = []
        for u in probes:
            norm = float(T.norm(u))
            unit = T.scale(scale * h / norm, u)
            values.append((phi(T.add(x, unit)) - phi(T.sub(x, unit))) * norm / (2.0 * scale * h))
        estimates[scale] = torch.tensor(values, dtype=torch.float64)
    d_h, d_2h = estimates[1.0], estimates[2.0]
    error = float((d_2h - d_h).norm()) / 3.0 / max(float(d_h.norm()), torch.finfo(torch.float64).tiny)
    return probes, d_h, error, worst


def reference_hypergradient(
    problem: Problem,
    x: Tree = None,
    y: Tree = None,
    batch: Any = None,
    *,
    kind: str = "auto",
    lower_iters: int = 1000,
    lower_tol: float | None = None,
    linear_iters: int = 1000,
    linear_tol: float | None = None,
    directions: int = 16,
    fd_step: float | None = None,
    seed: int = 0,
) -> Reference:
    """A reference for ∇Φ(x) (the module docstring gives the formulas).

    Args:
        problem: the bilevel problem.
        x: the point (default ``problem.x_init``).
        y: where the lower solve starts (default ``problem.y_init``).
        batch: the batch every objective is evaluated on.
        kind: ``"auto"``, ``"implicit"`` or ``"finite_difference"``.
        lower_iters: L-BFGS iterations of each lower solve.
        lower_tol: relative gradient tolerance of each lower solve (default
            ``max(1e-10, 100 ε)`` of the dtype).
        linear_iters: CG iterations of the linear solve.
        linear_tol: relative residual of the linear solve.
        directions: m, the finite-difference directions.
        fd_step: h (default ``ε^{1/3} max(1, ‖x‖_∞)``).
        seed: seeds the random directions.

    Cost: the lower solve, then up to ``linear_iters`` Hessian products (implicit) or 4m
    warm-started lower solves (finite differences).
    """
    owner = "reference_hypergradient"
    if not isinstance(problem, Problem):
        raise ArgumentTypeError(f"{owner} expects a bilevel.Problem, got {type(problem).__name__}")
    check_choice(owner, "kind", kind, REFERENCES)
    check_count(owner, "lower_iters", lower_iters)
    check_positive(owner, "lower_tol", lower_tol, allow_none=True)
    check_count(owner, "linear_iters", linear_iters)
    check_positive(owner, "linear_tol", linear_tol, allow_none=True)
    check_count(owner, "directions", directions)
    check_positive(owner, "fd_step", fd_step, allow_none=True)
    check_count(owner, "seed", seed, minimum=0)
    x, y = problem.initial_point(x, y)
    x, y = T.detach(x), T.detach(y)
    lower_tol = _default_tol(y) if lower_tol is None else lower_tol
    linear_tol = _default_tol(y) if linear_tol is None else linear_tol
    solved, residual, converged = solve_lower(problem, x, y, batch, lower_iters, lower_tol)
    common = {"x": x, "y": solved, "lower_residual": residual, "lower_converged": converged}
    note = ""
    if not converged:
        note = f"the lower solve (L-BFGS, then Newton steps) stopped at ‖∇_y g‖ = {residual:.2g}, above its tolerance"
    if kind in ("auto", "implicit"):
        gradient, relative = _implicit(problem, x, solved, batch, linear_iters, linear_tol)
        # an unconverged lower solve makes finite differences as inexact and 4m times costlier
        if kind == "implicit" or relative <= linear_tol or not converged:
            if relative > linear_tol:
                note = "; ".join(filter(None, [note, f"CG reached only a relative residual {relative:.2g} (H singular or indefinite?)"]))
            return Reference("implicit", gradient=gradient, error=relative, note=note, **common)
        note = "; ".join(filter(None, [note, f"finite differences: CG on H v = ∇_y f reached only a relative residual {relative:.2g}"]))
    probes, derivatives, error, worst = _finite_differences(problem, x, solved, batch, directions, fd_step, seed, lower_iters, lower_tol)
    if worst > max(lower_tol, residual):
        note = "; ".join(filter(None, [note, f"a lower solve of the differences stopped at ‖∇_y g‖ = {worst:.2g}"]))
    return Reference("finite_difference", probes=tuple(probes), derivatives=derivatives, error=error, note=note, **common)


@dataclass(frozen=True)
class HypergradientCheck:
    """The outcome of :func:`check_hypergradient` (``str(check)`` is one line).

    Attributes:
        method: the method's name.
        verdict: ``"pass"``, ``"warn"`` or ``"fail"``.
        reason: the verdict in plain words.
        relative_error: ``‖ĥ − ∇Φ‖ / ‖∇Φ‖`` (through the projections for a
            finite-difference reference).
        cosine: the cosine of the angle between ĥ and ∇Φ (1: same direction).
        lower_residual: ‖∇_y g‖ at the point where the method formed ĥ.
        reference: ``"implicit"`` or ``"finite_difference"``.
        reference_error: the estimated relative error of the reference itself.
        reference_lower_residual: ‖∇_y g(x, ŷ)‖ of the reference's lower solve.
        estimate_norm, reference_norm: ‖ĥ‖ and ‖∇Φ‖ (projected for finite differences).
        directions: the finite-difference directions (0 for the implicit reference).
        estimate: ĥ, shaped like x.
        hypergradient: ∇Φ(x) for the implicit reference, else ``None``.
    """

    method: str
    verdict: str
    reason: str
    relative_error: float
    cosine: float
    lower_residual: float
    reference: str
    reference_error: float
    reference_lower_residual: float
    estimate_norm: float
    reference_norm: float
    directions: int = 0
    estimate: Tree = field(default=None, repr=False, compare=False)
    hypergradient: Tree = field(default=None, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        """``True`` unless the verdict is ``fail`` (a ``warn`` passes)."""
        return self.verdict != "fail"

    def __str__(self) -> str:
        return f"{self.method}: {self.verdict} — {self.reason}"


def _verdict(
    rel: float, cos: float, reference: Reference, lower_residual: float, rtol: float, fail_rtol: float, hints: list[str]
) -> tuple[str, str]:
    where = f"cosine {cos:.4f}, ‖∇_y g‖ = {lower_residual:.2g} where measured, {reference.kind} reference"
    trusted = reference.lower_converged and reference.error <= rtol / 4
    caveat = (
        f"the reference is inexact ({reference.note or f'its estimated relative error is {reference.error:.2g}'})" if not trusted else ""
    )
    if not math.isfinite(rel) or not math.isfinite(cos):
        return "fail", f"the method's direction is not finite (relative error {rel:.2g}; {where})"
    if not trusted:  # nothing accurate to compare with: inconclusive, whatever the error
        return "warn", f"inconclusive: relative error {rel:.2g} ({where}), but {caveat}"
    if rel <= rtol:
        return "pass", f"relative error {rel:.2g} ≤ rtol = {rtol:g} ({where})"
    if rel <= fail_rtol:
        why = f"relative error {rel:.2g} is above rtol = {rtol:g} but below fail_rtol = {fail_rtol:g} ({where}): an inexact estimate"
        return "warn", "; ".join([why, *hints])
    why = f"relative error {rel:.2g} is above fail_rtol = {fail_rtol:g} ({where})"
    if cos < 0:
        why += "; the direction points away from ∇Φ (x would move uphill)"
    return "fail", "; ".join([why, *hints])


def check_hypergradient(
    problem: Problem,
    method: Method,
    x: Tree = None,
    y: Tree = None,
    batch: Any = None,
    *,
    reference: str | Reference = "auto",
    warmup: int = 0,
    rtol: float = 0.05,
    fail_rtol: float = 0.5,
    solve_y: bool | None = None,
    **reference_options: Any,
) -> HypergradientCheck:
    """Compare the hypergradient estimate a method uses at ``(x, y)`` with ∇Φ(x).

    The method starts from ``(x, y)`` (``method.init``), takes ``warmup`` iterations with x
    held fixed (its y, multiplier and other state settle, as they do along a run where x
    moves slowly), and :meth:`~bilevel.Method.direction` gives the estimate ĥ its next
    ``step`` would use. The reference ∇Φ(x) comes from :func:`reference_hypergradient`
    (the module docstring). Verdict, with e = ``‖ĥ − ∇Φ‖/‖∇Φ‖``:

    * ``pass``: e ≤ ``rtol`` and the reference is accurate (its lower solve converged and
      its own error ≤ rtol/4);
    * ``warn``: e ≤ ``fail_rtol`` (an inexact but usable estimate: the settings — lower
      steps, solver steps — are loose), or an inexact reference, whatever e (inconclusive);
    * ``fail``: e > ``fail_rtol`` with an accurate reference, or a non-finite direction —
      a wrong hypergradient (a bug, a diverging solver) or settings far too loose here.

    Args:
        problem: the bilevel problem.
        method: any :class:`~bilevel.Method` (it must implement ``direction``).
        x: the point (default ``problem.x_init``; projected by the method's ``project_x``).
        y: where the method starts. Default (``solve_y=None``): the reference's lower
            solution ŷ(x) when ``y`` is omitted, so that the check measures the
            hypergradient estimator rather than how far the start is from y*(x); the
            given ``y`` otherwise.
        batch: the batch of every evaluation.
        reference: ``"auto"``, ``"implicit"``, ``"finite_difference"``, or a
            :class:`Reference` computed before (to check several methods at one point).
        warmup: iterations with x fixed before the estimate is taken (≥ 0). Single-loop
            methods, whose multiplier starts at zero and improves across iterations,
            need some (e.g. 200).
        rtol: the relative error below which the verdict is ``pass`` (0 < rtol < fail_rtol).
        fail_rtol: the relative error above which the verdict is ``fail``.
        solve_y: start the method from ŷ(x) (``True``) or from ``y`` / ``problem.y_init``
            (``False``); ``None``: ŷ(x) exactly when ``y`` is omitted.
        reference_options: ``lower_iters``, ``lower_tol``, ``linear_iters``, ``linear_tol``,
            ``directions``, ``fd_step``, ``seed`` of :func:`reference_hypergradient`.

    Returns:
        a :class:`HypergradientCheck`.

    Example:
        >>> import bilevel as bl
        >>> problem = bl.problems.T1g(n=10)
        >>> broken = bl.AID(solver=bl.Neumann(steps=20, lr=1.5))     # above 2/λ_max(H) ≈ 1.0
        >>> check = bl.check_hypergradient(problem, broken)
        >>> check.verdict, check.passed
        ('fail', False)
    """
    owner = "check_hypergradient"
    if not isinstance(problem, Problem):
        raise ArgumentTypeError(f"{owner} expects a bilevel.Problem, got {type(problem).__name__}")
    if not isinstance(method, Method):
        raise ArgumentTypeError(f"{owner} expects a bilevel.Method (e.g. bilevel.AID()), got {type(method).__name__}")
    check_count(owner, "warmup", warmup, minimum=0)
    check_positive(owner, "rtol", rtol)
    check_positive(owner, "fail_rtol", fail_rtol)
    if not fail_rtol > rtol:
        raise ValueError(f"{owner}(fail_rtol={fail_rtol:g}) must be larger than rtol={rtol:g}")
    check_bool(owner, "solve_y", solve_y, allow_none=True)
    if isinstance(reference, Reference):
        if reference_options:
            raise ValueError(f"{owner}: {', '.join(reference_options)} apply to a reference computed here, not to a given Reference")
    else:
        check_choice(owner, "reference", reference, REFERENCES)
    start_from_solution = (y is None) if solve_y is None else solve_y
    x0, y0 = problem.initial_point(x, y)
    problem.validate(x0, y0, batch)
    if isinstance(reference, Reference):
        ref = reference
    else:
        # the point the method will see: init projects x when the method has project_x
        x_seen = method.init(problem, x0, y0, batch, validate=False).x
        ref = reference_hypergradient(problem, x_seen, y0, batch, kind=reference, **reference_options)
    state = method.init(problem, ref.x, ref.y if start_from_solution else y0, batch, validate=False)
    x_fixed = state.x
    for _ in range(warmup):
        state, _ = method.step(problem, state, batch)
        state = state.replace(x=x_fixed)
    estimate, info = method.direction(problem, state, batch)
    _check_shape(method, estimate, ref.x)
    if "lower_grad_sq" in info:
        lower_residual = math.sqrt(max(float(info["lower_grad_sq"]), 0.0))
    else:
        lower_residual = _lower_grad_norm(problem, state.x, state.y, batch)
    rel, cos, estimate_norm, reference_norm = ref.compare(estimate)
    hints = _hints(method, state, warmup, lower_residual, ref)
    verdict, reason = _verdict(rel, cos, ref, lower_residual, rtol, fail_rtol, hints if rel > rtol else [])
    return HypergradientCheck(
        method=method.name,
        verdict=verdict,
        reason=reason,
        relative_error=rel,
        cosine=cos,
        lower_residual=lower_residual,
        reference=ref.kind,
        reference_error=ref.error,
        reference_lower_residual=ref.lower_residual,
        estimate_norm=estimate_norm,
        reference_norm=reference_norm,
        directions=len(ref.probes),
        estimate=T.detach(estimate),
        hypergradient=ref.gradient,
    )


def _check_shape(method: Method, estimate: Tree, x: Tree) -> None:
    got = [tuple(t.shape) for t in T.leaves(estimate)]
    want = [tuple(t.shape) for t in T.leaves(x)]
    if got != want:
        raise ValueError(f"{method.name}.direction returned a tree of shapes {got}, not shaped like x {want}: it must return ĥ")


def _hints(method: Method, state: State, warmup: int, lower_residual: float, ref: Reference) -> list[str]:
    """Plain-language causes worth naming when the error is large."""
    hints = []
    if lower_residual > 1e3 * max(ref.lower_residual, 1e-12) and lower_residual > 1e-6:
        hints.append(
            f"the method formed its direction where ‖∇_y g‖ = {lower_residual:.2g} (the lower solution has "
            f"{ref.lower_residual:.2g}): part of the error is the lower level's — more lower steps, or start at ŷ"
        )
    multiplier = getattr(getattr(method, "parts", None), "multiplier", None)
    solved_anew = isinstance(multiplier, LinearSolve) and not (multiplier.warm_start and multiplier.solver.uses_start)
    if warmup == 0 and multiplier is not None and not solved_anew:
        hints.append("if the multiplier improves across iterations (a single-loop method), give warmup=200")
    return hints


def check_experiment(
    config: str | dict,
    methods: list[str] | None = None,
    overrides: list[str] | tuple = (),
    *,
    warmup: int = 200,
    solve_y: bool = True,
    reference: str = "auto",
    rtol: float = 0.05,
    fail_rtol: float = 0.5,
) -> tuple[Reference, list[tuple[str, HypergradientCheck]]]:
    """Check the methods of an experiment configuration at its initial point (``bilevel check``).

    The configuration (a built-in name, a YAML file or a dict, plus ``section.key=value``
    overrides) is resolved as ``bilevel run`` resolves it; the problem is built once, the
    reference computed once at ``x = problem.x_init`` (the lower solve from
    ``problem.y_init``), and each method — the names of the configuration's ``methods``
    presets by default, else its ``method`` — is checked there with ``warmup`` iterations
    at fixed x, started from ŷ(x) (``solve_y=True``) or from ``problem.y_init``.

    Returns:
        ``(reference, [(method name as configured, HypergradientCheck), ...])``.
    """
    import copy

    from .experiments.config import ConfigError, apply_overrides, load_config, resolve
    from .experiments.runner import build_experiment, build_method

    base = load_config(config) if not isinstance(config, dict) else copy.deepcopy(config)
    base = apply_overrides(base, list(overrides))
    if not methods:
        section = base.get("method") or {}
        methods = list(base.get("methods") or [section if isinstance(section, str) else section.get("name", "")])
    configs = [resolve(apply_overrides(base, [f"method.name={name}"])) for name in methods]
    if configs[0].data["problem"]["kind"] == "stochastic":
        # one step's direction is a draw of an estimator, compared with the exact hypergradient
        # it is wrong by its noise: the check would fail every correct method
        raise ConfigError(
            "bilevel check compares one deterministic hypergradient with the exact one; a stochastic method's direction is "
            "a mini-batch estimate (its unbiasedness is tested over many draws, docs/stochastic.md): "
            "run the stochastic benchmarks with `bilevel run` or `bilevel bench`"
        )
    experiment = build_experiment(configs[0])
    problem, data = experiment.problem, experiment.data
    batch = data.batch_at(0) if data is not None else None
    episodic = configs[0].data["problem"]["kind"] == "fewshot"
    ref = reference_hypergradient(problem, problem.x_init, problem.y_init, batch, kind=reference)
    results = []
    for name, resolved in zip(methods, configs, strict=True):
        method = experiment.method if resolved is configs[0] else build_method(resolved.data["method"], episodic=episodic)
        check = check_hypergradient(
            problem, method, problem.x_init, problem.y_init, batch, reference=ref, warmup=warmup, rtol=rtol, fail_rtol=fail_rtol,
            solve_y=solve_y,
        )  # fmt: skip
        results.append((name, check))
    return ref, results
