"""Multiplier estimators: how ``v`` with ``H v ≈ b = ∇_y f`` is obtained each upper iteration.

* :class:`LinearSolve` — a matrix-free solver of :mod:`bilevel.linsolve` run from zero
  (or warm-started from the previous v): AID with CG / Neumann / fixed point, GALET's
  shadow iteration (:class:`~bilevel.NormalGD`).
* :class:`DualCorrection` — the single-loop methods' one step per upper iteration,
  ``v ← v − η_k (H v − b)``, with a step rule: :class:`FixedStep` (η_k a schedule),
  :class:`LineSearch` (the exact ``‖r‖²/(rᵀHr)``, guarded) or :class:`Periodic` (a line
  search every ``period`` iterations whose step is kept in between, the typed state
  :class:`PeriodicState`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from .. import tree as T
from ..linsolve import CG, LinearSolver, LinearSolveResult, check_solver, line_search_step_size
from ..schedules import Schedule, ScheduleLike, as_schedule
from ..state import EmptyState, part_state
from ..tree import Tree
from ..validation import ArgumentTypeError, check_bool, check_choice, check_count, check_positive, check_step_size, describe
from .base import MatVec

__all__ = ["DualCorrection", "FixedStep", "LineSearch", "LinearSolve", "Periodic", "PeriodicState", "StepRule"]


@dataclass(frozen=True)
class LinearSolve:
    """The multiplier from a linear solver, every upper iteration anew.

    ``v_{k+1} = solver(H, b, v0)`` with ``v0 = 0`` (cold) or ``v0 = v_k`` (``warm_start``).
    Stateless.

    Args:
        solver: a solver of :mod:`bilevel.linsolve` (``CG``, ``Neumann``, ``FixedPoint``,
            ``NormalGD``, ``LineSearchStep``).
        warm_start: start from the previous multiplier instead of zero.
    """

    solver: LinearSolver = field(default_factory=lambda: CG(steps=10))
    warm_start: bool = False

    def __post_init__(self) -> None:
        check_solver("LinearSolve", "solver", self.solver)
        check_bool("LinearSolve", "warm_start", self.warm_start)

    def init(self, v: Tree) -> EmptyState:
        return EmptyState()

    def update(self, matvec: MatVec, b: Tree, v: Tree, state: Any, k: int, hv: Tree | None = None) -> tuple[LinearSolveResult, Any]:
        return self.solver(matvec, b, v if self.warm_start else None), state


@runtime_checkable
class StepRule(Protocol):
    """The step η_k of a dual correction: ``init(v) -> state`` and
    ``rule(r, matvec, k, state) -> (η, state, ‖r‖² or None)``."""

    def init(self, v: Tree) -> Any: ...

    def __call__(self, r: Tree, matvec: MatVec, k: int, state: Any) -> tuple[torch.Tensor, Any, torch.Tensor | None]: ...


def _like(tree: Tree) -> torch.Tensor:
    return T.leaves(tree)[0]


@dataclass(frozen=True)
class FixedStep:
    """η_k from a schedule (a number is a constant): the "RHG-type" correction. Stateless.

    Args:
        lr: η, a positive number or a schedule ``k -> η_k``.
    """

    lr: ScheduleLike = 0.5

    def __post_init__(self) -> None:
        check_step_size("FixedStep", "lr", self.lr)

    @cached_property
    def schedule(self) -> Schedule:
        """``lr`` as a schedule ``k -> η_k`` (built once)."""
        return as_schedule(self.lr)

    def init(self, v: Tree) -> EmptyState:
        return EmptyState()

    def __call__(self, r: Tree, matvec: MatVec, k: int, state: Any) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        leaf = _like(r)
        eta = self.schedule(k)
        if isinstance(eta, (int, float)):  # a number: scalar_tensor is the cheaper constructor (~1 µs a step)
            return torch.scalar_tensor(eta, dtype=leaf.dtype, device=leaf.device), state, None
        return torch.as_tensor(eta, dtype=leaf.dtype, device=leaf.device), state, None


NUMERATORS = ("residual", "tensorwise")


@dataclass(frozen=True)
class LineSearch:
    """The exact line search of the quadratic along r: ``η = ‖r‖²/(rᵀHr)`` ("CG-type"),
    one Hessian product. Guards the official code lacks: ``fallback`` when ``rᵀHr ≤ 0``
    and an optional clip to ``[0, max_step]``. Stateless.

    Args:
        fallback: step used when the curvature along r is not positive.
        max_step: optional upper bound on η.
        numerator: ``"residual"`` (default: ``‖r‖² = Σ_i ‖r_i‖²``, the exact minimiser) or
            ``"tensorwise"`` — ``(Σ_i ‖r_i‖)²`` over the parameter tensors ``r_i``, what the
            official sl-BAMM scripts compute (a reproduction quirk: larger than the exact
            step when y has several tensors, equal for one).
    """

    fallback: float = 0.1
    max_step: float | None = None
    numerator: str = "residual"

    def __post_init__(self) -> None:
        check_positive("LineSearch", "fallback", self.fallback)
        check_positive("LineSearch", "max_step", self.max_step, allow_none=True)
        check_choice("LineSearch", "numerator", self.numerator, NUMERATORS)

    def init(self, v: Tree) -> EmptyState:
        return EmptyState()

    def __call__(self, r: Tree, matvec: MatVec, k: int, state: Any) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        r_sq = T.sq_norm(r)
        numerator = r_sq if self.numerator == "residual" else torch.stack(torch._foreach_norm(T.leaves(r))).sum().square()
        eta = line_search_step_size(numerator, T.vdot(r, matvec(r)), self.fallback, self.max_step)
        return eta, state, r_sq


@part_state
class PeriodicState(NamedTuple):
    """The step of the last line search of a :class:`Periodic` rule (0-d tensor)."""

    eta: torch.Tensor


@dataclass(frozen=True)
class Periodic:
    """Self-governed step: a line search at every ``period``-th iteration (k ≡ 0 mod
    ``period``), its step kept for the next ``period − 1`` (one Hessian product fewer on
    those). State: :class:`PeriodicState` (``search.fallback`` before the first search).

    Args:
        period: iterations between line searches.
        search: the :class:`LineSearch` made at those iterations.
    """

    period: int = 10
    search: LineSearch = field(default_factory=LineSearch)

    def __post_init__(self) -> None:
        check_count("Periodic", "period", self.period)
        if not isinstance(self.search, LineSearch):
            raise ArgumentTypeError(f"{describe('Periodic', 'search', self.search)} must be a bilevel.parts.LineSearch")

    def init(self, v: Tree) -> PeriodicState:
        leaf = _like(v)
        return PeriodicState(eta=torch.tensor(self.search.fallback, dtype=leaf.dtype, device=leaf.device))

    def __call__(self, r: Tree, matvec: MatVec, k: int, state: Any) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        if k % self.period != 0:
            return state.eta, state, None
        eta, _, r_sq = self.search(r, matvec, k, EmptyState())
        return eta, PeriodicState(eta=eta), r_sq


@dataclass(frozen=True)
class DualCorrection:
    """One correction of the multiplier per upper iteration (sl-BAMM, BAGDC, SOBA):

        r = H v_k − b,    v_{k+1} = v_k − η_k r

    one step of gradient descent on ``½ vᵀHv − bᵀv`` from the previous multiplier. The
    residual costs one Hessian product unless the caller has ``H v_k`` already (the Jacobi
    order); :class:`LineSearch` costs one more. The state is the step rule's.

    Args:
        step: the step rule: :class:`FixedStep` (default η = 0.5), :class:`LineSearch` or
            :class:`Periodic`.

    Example:
        >>> import torch, bilevel as bl
        >>> H = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64)); b = torch.ones(2, dtype=torch.float64)
        >>> part = bl.parts.DualCorrection(bl.parts.LineSearch())
        >>> v0 = torch.zeros(2, dtype=torch.float64)
        >>> result, _ = part.update(lambda v: H @ v, b, v0, part.init(v0), 0)
        >>> result.step                                     # ‖r‖²/(rᵀHr) = 2/5
        tensor(0.4000, dtype=torch.float64)
    """

    step: StepRule = field(default_factory=FixedStep)

    def __post_init__(self) -> None:
        if not isinstance(self.step, StepRule):
            raise ArgumentTypeError(
                f"{describe('DualCorrection', 'step', self.step)} must be a step rule such as bilevel.parts.FixedStep(0.5), "
                f"LineSearch() or Periodic(10)"
            )

    def init(self, v: Tree) -> Any:
        return self.step.init(v)

    def update(self, matvec: MatVec, b: Tree | None, v: Tree, state: Any, k: int, hv: Tree | None = None) -> tuple[LinearSolveResult, Any]:
        if hv is not None:  # the Jacobi order: H v_k from the caller, nothing to hand back
            r = hv if b is None else T.sub(hv, b)  # b = None: hv is the residual itself (single-loop D_v)
            eta, state, r_sq = self.step(r, matvec, k, state)
            return LinearSolveResult(v=T.axpy(-eta, r, v), residual_sq=r_sq, step=eta, residual=r, previous=v), state
        hv = matvec(v)
        r = T.sub(hv, b)
        seen: list = []

        def recording(u: Tree) -> Tree:  # keeps H r when the step rule forms it (a line search)
            hu = matvec(u)
            if u is r:
                seen.append(hu)
            return hu

        eta, state, r_sq = self.step(r, recording, k, state)
        if seen:  # H v_{k+1} = H v_k − η H r: free when H r was formed, for the measure's diagnostics
            hv_next, v_next = T.axpys(-eta, (seen[0], hv), (r, v))
        else:
            hv_next, v_next = None, T.axpy(-eta, r, v)
        return LinearSolveResult(v=v_next, residual_sq=r_sq, step=eta, residual=r, hv=hv_next, previous=v), state
