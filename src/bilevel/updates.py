"""Upper-level update rules (functional SGD / Adam) and projections onto constraint sets.

Each optimizer is a frozen configuration with two pure functions, in the style of optax:

    opt_state = optimizer.init(x)
    x_new, opt_state = optimizer.update(x, d, opt_state, k)

where ``d`` is the (hyper)gradient direction and ``k`` the iteration counter used by the
step-size schedule. ``opt_state`` is a typed state (:class:`SGDState` for heavy-ball momentum, :class:`AdamState`
for Adam's moments, :class:`~bilevel.state.EmptyState` for plain SGD), saved in checkpoints
with the rest of the method state. The optimizers are the upper-optimizer parts of
:mod:`bilevel.parts`; :class:`Box` is the projection part.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from . import tree as T
from .schedules import Schedule, ScheduleLike, as_schedule
from .state import EmptyState, part_state
from .tree import Tree
from .validation import check_fraction, check_nonnegative, check_number, check_step_size, describe

__all__ = ["SGD", "Adam", "AdamState", "Box", "SGDState", "UpperOptimizer", "as_upper_optimizer"]


@runtime_checkable
class UpperOptimizer(Protocol):
    """Protocol of an upper-level update: ``init(x) -> state`` and
    ``update(x, d, state, k) -> (x_next, state)``, ``k`` the upper iteration."""

    def init(self, x: Tree) -> Any:  # pragma: no cover - protocol
        ...

    def update(self, x: Tree, d: Tree, state: Any, k: int) -> tuple[Tree, Any]:  # pragma: no cover
        ...


@part_state
class SGDState(NamedTuple):
    """Heavy-ball momentum ``m`` of :class:`SGD` (a tree shaped like x)."""

    momentum: Tree


@part_state
class AdamState(NamedTuple):
    """Adam's first and second moments ``m``, ``s`` (trees shaped like x)."""

    m: Tree
    s: Tree


@dataclass(frozen=True)
class SGD:
    """Gradient step ``x ← x − α_k d`` (optionally with heavy-ball momentum ``m ← βm + d``).

    Args:
        lr: α, a number or a schedule ``k -> α_k``.
        momentum: β ∈ [0, 1); 0 is plain gradient descent (the papers' update).
    """

    lr: ScheduleLike = 0.1
    momentum: float = 0.0

    def __post_init__(self) -> None:
        check_step_size("SGD", "lr", self.lr)
        check_fraction("SGD", "momentum", self.momentum)

    @cached_property
    def schedule(self) -> Schedule:
        """``lr`` as a schedule ``k -> α_k`` (built once)."""
        return as_schedule(self.lr)

    def init(self, x: Tree) -> EmptyState | SGDState:
        return SGDState(momentum=T.zeros_like(x)) if self.momentum else EmptyState()

    def update(self, x: Tree, d: Tree, state: Any, k: int) -> tuple[Tree, EmptyState | SGDState]:
        lr = self.schedule(k)
        if self.momentum:
            m = T.axpy(1.0, d, T.scale(self.momentum, state.momentum))
            return T.axpy(-lr, m, x), SGDState(momentum=m)
        return T.axpy(-lr, d, x), state


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba, 2015) on the hypergradient direction, as ``torch.optim.Adam``.

    ``m ← β₁m + (1−β₁)d, s ← β₂s + (1−β₂)d², x ← x − α_k m̂ / (√ŝ + ε)`` with bias
    corrections ``m̂ = m/(1−β₁ᵗ)``, ``ŝ = s/(1−β₂ᵗ)``, ``t = k + 1``.

    Args:
        lr: α, a number or a schedule.
        betas: (β₁, β₂).
        eps: ε.
    """

    lr: ScheduleLike = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check_step_size("Adam", "lr", self.lr)
        betas = self.betas
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"{describe('Adam', 'betas', betas)} must be a pair (beta1, beta2) of numbers in [0, 1)")
        for beta in betas:
            try:
                check_fraction("Adam", "betas", beta)
            except ValueError:
                raise ValueError(f"{describe('Adam', 'betas', betas)} must be a pair (beta1, beta2) of numbers in [0, 1)") from None
        check_nonnegative("Adam", "eps", self.eps)

    @cached_property
    def schedule(self) -> Schedule:
        """``lr`` as a schedule ``k -> α_k`` (built once)."""
        return as_schedule(self.lr)

    def init(self, x: Tree) -> AdamState:
        return AdamState(m=T.zeros_like(x), s=T.zeros_like(x))

    def update(self, x: Tree, d: Tree, state: AdamState, k: int) -> tuple[Tree, AdamState]:
        lr = self.schedule(k)
        b1, b2 = self.betas
        t = k + 1
        dl = T.leaves(d)
        m = torch._foreach_add(torch._foreach_mul(T.leaves(state.m), b1), dl, alpha=1 - b1)
        s = torch._foreach_addcmul(torch._foreach_mul(T.leaves(state.s), b2), dl, dl, value=1 - b2)
        denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(s), (1 - b2**t) ** 0.5), self.eps)
        step = torch._foreach_div(m, denom)
        new_x = torch._foreach_add(T.leaves(x), step, alpha=-lr / (1 - b1**t))
        return T.unflatten_like(new_x, x), AdamState(m=T.unflatten_like(m, x), s=T.unflatten_like(s, x))


@dataclass(frozen=True)
class Box:
    """Projection onto the box ``lower ≤ x ≤ upper`` (element-wise, every leaf).

    Either bound may be ``None``. Used for constrained upper levels (e.g. x ∈ [0, 3]
    on the nonconvex-PL toy).
    """

    lower: float | None = None
    upper: float | None = None

    def __post_init__(self) -> None:
        for name in ("lower", "upper"):
            value = getattr(self, name)
            if value is not None:
                check_number("Box", name, value, finite=False, expected="a number (inf allowed) or None")
        if self.lower is None and self.upper is None:
            raise ValueError("Box() needs at least one of lower/upper")
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise ValueError(f"Box(lower={self.lower}, upper={self.upper}) is empty")

    def __call__(self, x: Tree) -> Tree:
        return T.tree_map(lambda t: torch.clamp(t, min=self.lower, max=self.upper), x)


def as_upper_optimizer(value: Any, name: str, owner: str = "") -> UpperOptimizer:
    """An upper optimizer from an instance or a step size (→ :class:`SGD`).

    A step size must be a positive finite number or a schedule; errors name
    ``owner(name=value)`` (e.g. ``GALET(lr_upper=0)``).
    """
    if isinstance(value, UpperOptimizer):
        return value
    check_step_size(owner, name, value)
    return SGD(lr=value)
