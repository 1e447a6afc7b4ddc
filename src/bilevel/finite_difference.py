"""Hessian-free hypergradients: second-order products by central differences of gradients
(the DARTS approximation).

DARTS (Liu, Simonyan & Yang, ICLR 2019) never builds a second-order graph: the mixed
product its hypergradient needs is two first-order gradients of the lower objective at
points moved along the vector,

    J u ≈ [∇_x g(x, y + εu) − ∇_x g(x, y − εu)] / 2ε,        ε = r / ‖u‖,

with ``r = 0.01`` and ‖u‖ the norm over all tensors of y together (so the points stay at
distance r from y whatever the scale of u). The same differences of ``∇_y g`` give
``H u``. The error is O(ε²) (a central difference; exact when g is quadratic in y), and
ε must not be so small that rounding cancels the difference (float32 above all).

Two parts make the DARTS approximation available to AID-type methods:

* :class:`HessianFree` — derivative oracles whose every ``H v`` and ``J v`` are such
  differences (``AID(hessian_free=r)`` uses them; any method takes them as ``oracles``):
  a product costs two gradients and no second-order graph;
* :class:`OneTerm` — the multiplier ``v = τ ∇_y f``, the Neumann series
  ``τ Σ_i (I − τH)^i ∇_y f`` cut after its first term (no product): DARTS's
  ``H⁻¹ ≈ τ I``, τ being the lower learning rate.

``AID(solver=OneTerm(τ), hessian_free=0.01, lower_steps=1, lr_lower=τ)`` is the DARTS
second-order step in the sequential order: one lower step ``y' = y − τ ∇_y g``, then
``d = ∇_x f(x, y') − J(x, y') τ ∇_y f(x, y')``. DARTS's first release differenced around
the unrolled point y' as here; its later fix ("better hessian-vector multiplication")
differences around the original y, which makes ``d`` the exact derivative of
``x ↦ f(x, y − τ ∇_y g(x, y))`` — that is ``ITD(lower_steps=1, lr_lower=τ,
warm_start=True)``. The two coincide when J does not depend on y (a bilinear coupling,
as on the toys T1 and T1g). At a lower solution (y' = y*) the DARTS direction is
``∇_x f − τ J ∇_y f``: unbiased only when ``H = I/τ`` (docs/check.md measures its error).

Example:
    >>> import torch, bilevel as bl
    >>> from bilevel.finite_difference import HessianFree
    >>> g = lambda x, y, b: (x["a"] * y["w"] ** 2).sum()       # H = diag(2a), quadratic in y: exact
    >>> x, y = {"a": torch.tensor([1.0, 2.0], dtype=torch.float64)}, {"w": torch.tensor([3.0, 4.0], dtype=torch.float64)}
    >>> lin = HessianFree().linearize(g, x, y, None)
    >>> lin.hvp({"w": torch.ones(2, dtype=torch.float64)})["w"].round(decimals=9)   # to rounding
    tensor([2., 4.], dtype=torch.float64)

Reference: Liu, Simonyan & Yang, "DARTS: Differentiable Architecture Search", ICLR 2019.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from . import tree as T
from .linsolve import LinearSolver, LinearSolveResult, MatVec
from .oracles import Linearization, Oracles
from .tree import Tree
from .validation import ArgumentTypeError, check_positive, describe

__all__ = ["HessianFree", "OneTerm", "central_difference_step"]


def central_difference_step(r: float, v: Tree) -> torch.Tensor:
    """DARTS's step ``ε = r / ‖v‖`` (0-d tensor; ‖v‖ over all tensors of v, never 0)."""
    v_norm = T.norm(v)
    return r / torch.clamp(v_norm, min=torch.finfo(v_norm.dtype).tiny)


class _CentralDifferenceLinearization(Linearization):
    """``H v`` and ``J v`` of ``h`` at ``(x, y)`` from gradients at ``y ± εv``."""

    def __init__(self, oracles: Oracles, fn: Callable, x: Tree, y: Tree, batch: Any, with_grad_x: bool, r: float):
        self._oracles, self._fn, self._batch, self._r = oracles, fn, batch, r
        self._x, self._y = T.detach(x), T.detach(y)
        if with_grad_x:
            grad_x, self.grad_y, self.value = oracles.gradients(fn, self._x, self._y, batch)
            self.grad_x = grad_x
        else:
            self.grad_y, self.value = oracles.gradient_y(fn, self._x, self._y, batch)
            self.grad_x = None

    def both(self, v: Tree, need_mixed: bool = True, need_hvp: bool = True) -> tuple[Tree, Tree]:
        eps = central_difference_step(self._r, v)
        oracles, fn, x, batch = self._oracles, self._fn, self._x, self._batch
        if need_mixed:  # ∇_x and ∇_y from one pass at each point
            plus_x, plus_y, _ = oracles.gradients(fn, x, T.axpy(eps, v, self._y), batch)
            minus_x, minus_y, _ = oracles.gradients(fn, x, T.axpy(-eps, v, self._y), batch)
        else:
            (plus_y, _), (minus_y, _) = (oracles.gradient_y(fn, x, T.axpy(s * eps, v, self._y), batch) for s in (1.0, -1.0))
        inv = 0.5 / eps
        jv = T.scale(inv, T.sub(plus_x, minus_x)) if need_mixed else None
        hv = T.scale(inv, T.sub(plus_y, minus_y)) if need_hvp else None
        return jv, hv


def _check_gradient_oracles(owner: str, name: str, value: Any) -> Any:
    if value is not None and (not isinstance(value, Oracles) or isinstance(value, HessianFree)):
        raise ArgumentTypeError(
            f"{describe(owner, name, value)} must be a bilevel.Oracles (where the gradients come from, e.g. "
            f"bilevel.CountingOracles()), or None"
        )
    return value


@dataclass(frozen=True)
class HessianFree(Oracles):
    """Derivative oracles without a second-order graph: central differences of gradients.

    At a point ``(x, y)`` of an objective h (the lower g, or φ_μ), for a vector v:

        ε = r / ‖v‖
        H v ≈ [∇_y h(x, y + εv) − ∇_y h(x, y − εv)] / 2ε
        J v ≈ [∇_x h(x, y + εv) − ∇_x h(x, y − εv)] / 2ε

    (DARTS's rule: the points are at distance r from y). Error O(ε²) from the third
    derivatives of h, none when h is quadratic in y; rounding adds about
    ``eps_machine · ‖∇h‖ / ε``, which is why r is not tiny (0.01 is DARTS's value, for
    float32 networks; in float64 ``r = 1e-4`` is about 10⁴ times more accurate on smooth
    problems). Memory: first-order graphs only.

    Cost (oracle calls): a linearization is one gradient (``gradient_y``, or
    ``gradients`` with ``with_grad_x``); a product ``J v`` or ``(J v, H v)`` is two
    ``gradients``, ``H v`` alone two ``gradient_y``. Gradients come from
    ``gradients_from`` (default :class:`~bilevel.Oracles`), so
    ``HessianFree(gradients_from=bl.CountingOracles())`` counts them.

    Args:
        r: the distance of the two points from y (DARTS: 0.01), > 0.
        gradients_from: the oracles that compute the gradients (not a ``HessianFree``).

    Example:
        >>> import torch, bilevel as bl
        >>> from bilevel.finite_difference import HessianFree
        >>> problem = bl.problems.T1g(n=5)
        >>> x, y = problem.x_init, problem.y_init
        >>> v = {"y": torch.ones(5, dtype=torch.float64)}
        >>> exact = bl.Oracles().linearize(problem.lower, x, y, None).mixed(v)["x"]
        >>> approx = HessianFree(r=1e-3).linearize(problem.lower, x, y, None).mixed(v)["x"]
        >>> bool(torch.allclose(approx, exact, rtol=1e-9))           # g is quadratic in y: exact
        True

    Reference: Liu, Simonyan & Yang, ICLR 2019 (DARTS, ``architect.py``).
    """

    mode: str = field(default="finite_difference", repr=False)
    fd_eps: float = field(default=1e-6, repr=False)  # the base class's relative step: not used (the step is r/‖v‖)
    r: float = 0.01
    gradients_from: Oracles | None = None

    def __post_init__(self) -> None:
        if self.mode != "finite_difference":
            raise ValueError(f"HessianFree(mode={self.mode!r}): its products are always finite differences; leave mode unset")
        check_positive("HessianFree", "r", self.r)
        _check_gradient_oracles("HessianFree", "gradients_from", self.gradients_from)

    @property
    def _base(self) -> Oracles:
        return self.gradients_from if self.gradients_from is not None else Oracles()

    def gradients(self, fn: Callable, x: Tree, y: Tree, batch: Any) -> tuple[Tree, Tree, torch.Tensor]:
        return self._base.gradients(fn, x, y, batch)

    def gradient_y(self, fn: Callable, x: Tree, y: Tree, batch: Any) -> tuple[Tree, torch.Tensor]:
        return self._base.gradient_y(fn, x, y, batch)

    def linearize(self, fn: Callable, x: Tree, y: Tree, batch: Any, with_grad_x: bool = False) -> Linearization:
        """A linearization whose products are central differences of gradients (one gradient now)."""
        return _CentralDifferenceLinearization(self._base, fn, x, y, batch, with_grad_x, self.r)


@dataclass(frozen=True)
class OneTerm(LinearSolver):
    """The DARTS multiplier ``v = τ b``: the Neumann series ``τ Σ_{i≤K} (I − τH)^i b`` with
    K = 0, i.e. ``H⁻¹ ≈ τ I``. No Hessian product (``steps = 0``); ``v0`` is ignored.

    Unbiased only when ``H = I/τ``: at a lower solution AID's direction with it is
    ``∇_x f − τ J ∇_y f`` (on a quadratic with ``H = A``, the exact ``A⁻¹`` replaced by
    ``τ I``). The residual ``‖H v − b‖²`` is not formed (``residual_sq = None``).

    Args:
        lr: τ, the step of the one unrolled lower step (DARTS: the network's learning rate).

    Example:
        >>> import torch
        >>> from bilevel.finite_difference import OneTerm
        >>> OneTerm(lr=0.5)(lambda v: 2 * v, torch.ones(2)).v
        tensor([0.5000, 0.5000])
    """

    lr: float = 0.1
    steps: int = field(default=0, init=False, repr=False)
    uses_start: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_positive("OneTerm", "lr", self.lr)

    def hvps(self) -> int:
        return 0

    def __call__(self, matvec: MatVec, b: Tree, v0: Tree | None = None) -> LinearSolveResult:
        return LinearSolveResult(v=T.scale(self.lr, b), residual_sq=None)
