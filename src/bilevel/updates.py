"""Upper-level update rules (functional SGD / Adam) and projections onto constraint sets.

Each optimizer is a frozen configuration with two pure functions, in the style of optax:

    opt_state = optimizer.init(x)
    x_new, opt_state = optimizer.update(x, d, opt_state, k)

where ``d`` is the (hyper)gradient direction and ``k`` the iteration counter used by the
step-size schedule. ``opt_state`` is a dict of tensors/trees (Adam's moments), so it is
saved in checkpoints with the rest of the method state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import tree as T
from .schedules import ScheduleLike, as_schedule
from .tree import Tree
from .validation import check_fraction, check_nonnegative, check_number, check_step_size, describe

__all__ = ["SGD", "Adam", "Box", "UpperOptimizer", "as_upper_optimizer"]


class UpperOptimizer:
    """Protocol of an upper-level update: ``init(x)`` and ``update(x, d, state, k)``."""

    lr: ScheduleLike

    def init(self, x: Tree) -> dict:  # pragma: no cover - protocol
        raise NotImplementedError

    def update(self, x: Tree, d: Tree, state: dict, k: int) -> tuple[Tree, dict]:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class SGD(UpperOptimizer):
    """Gradient step ``x ← x − α_k d`` (optionally with heavy-ball momentum ``m ← βm + d``).

    Args:
        lr: α, a number or a schedule ``k -> α_k``.
        momentum: β ∈ [0, 1); 0 is plain gradient descent (the papers' update).
    """

    lr: ScheduleLike = 0.1
    momentum: float = 0.0

    def __post_init__(self):
        check_step_size("SGD", "lr", self.lr)
        check_fraction("SGD", "momentum", self.momentum)

    def init(self, x):
        return {"momentum": T.zeros_like(x)} if self.momentum else {}

    def update(self, x, d, state, k):
        lr = as_schedule(self.lr)(k)
        if self.momentum:
            m = T.axpy(1.0, d, T.scale(self.momentum, state["momentum"]))
            return T.axpy(-lr, m, x), {"momentum": m}
        return T.axpy(-lr, d, x), state


@dataclass(frozen=True)
class Adam(UpperOptimizer):
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

    def __post_init__(self):
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

    def init(self, x):
        return {"m": T.zeros_like(x), "s": T.zeros_like(x)}

    def update(self, x, d, state, k):
        lr = as_schedule(self.lr)(k)
        b1, b2 = self.betas
        t = k + 1
        dl = T.leaves(d)
        m = T.leaves(state["m"])
        s = T.leaves(state["s"])
        m = torch._foreach_add(torch._foreach_mul(m, b1), dl, alpha=1 - b1)
        s = torch._foreach_addcmul(torch._foreach_mul(s, b2), dl, dl, value=1 - b2)
        denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(s), (1 - b2**t) ** 0.5), self.eps)
        step = torch._foreach_div(m, denom)
        new_x = torch._foreach_add(T.leaves(x), step, alpha=-lr / (1 - b1**t))
        return T.unflatten_like(new_x, x), {"m": T.unflatten_like(m, x), "s": T.unflatten_like(s, x)}


@dataclass(frozen=True)
class Box:
    """Projection onto the box ``lower ≤ x ≤ upper`` (element-wise, every leaf).

    Either bound may be ``None``. Used for constrained upper levels (e.g. x ∈ [0, 3]
    on the nonconvex-PL toy).
    """

    lower: Optional[float] = None
    upper: Optional[float] = None

    def __post_init__(self):
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
