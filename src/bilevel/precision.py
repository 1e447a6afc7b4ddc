"""Mixed precision: the objectives evaluated under :func:`torch.autocast` in bfloat16.

``Autocast(dtype=torch.bfloat16).problem(problem)`` (or ``solve(..., precision="bf16")``)
evaluates ``f`` and ``g`` under ``torch.autocast``: the operations autocast lists as safe
in lower precision (matrix products, convolutions, ``linear``) run in bfloat16, the others
(reductions, ``log_softmax``, cross-entropy) in float32, and the value is returned in
float32. The variables x and y, the multiplier v, every gradient, Hessian and mixed product
*as a vector*, the linear solvers and the upper optimizer stay in float32: autograd
differentiates each low-precision product in the precision it was computed in and casts
the result back to the float32 leaf. So the products inherit bfloat16's relative error
(8 significant bits, ``2⁻⁸ ≈ 4e-3``) while the iteration's arithmetic — CG's recurrences,
line-search inner products, Adam's moments — does not.

What this buys is memory and bandwidth for activations (half the bytes) and, on hardware
with bfloat16 units (recent CPUs with AMX/AVX512-BF16, GPUs from Ampere on), speed of the
products; ``docs/precision.md`` has the measured figures and says which methods tolerate
the noise. float16 is not offered: it needs dynamic loss scaling against underflow of the
gradients, which this module does not implement.

Example:
    >>> import torch, bilevel as bl
    >>> from bilevel.precision import Autocast
    >>> problem = Autocast(torch.bfloat16).problem(bl.problems.T1g(n=4, dtype=torch.float32))
    >>> value = problem.g(problem.x_init, problem.y_init)
    >>> value.dtype                                   # computed in bfloat16, returned in float32
    torch.float32

References: Kalamkar et al., "A Study of BFLOAT16 for Deep Learning Training" (2019);
Micikevicius et al., "Mixed Precision Training" (ICLR 2018).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from . import tree as T
from .problem import Objective, Problem
from .tree import Tree

__all__ = ["PRECISIONS", "Autocast", "as_precision", "check_autocast_variables"]

PRECISIONS = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def check_autocast_variables(x: Tree, y: Tree, dtype: torch.dtype = torch.bfloat16) -> None:
    """Refuse float64 variables (one line naming the leaf): autocast lowers float32 only."""
    for name, tree in (("x", x), ("y", y)):
        flat, _ = pytree.tree_flatten_with_path(tree)
        for path, leaf in flat:
            if isinstance(leaf, torch.Tensor) and leaf.dtype == torch.float64:
                where = name + "".join(str(k) for k in path)
                raise ValueError(
                    f"mixed precision ({str(dtype).removeprefix('torch.')}) was asked for but {where} is float64: autocast "
                    f"only lowers float32 computations; use float32 variables (.float()), or drop precision= for float64"
                )


@dataclass(frozen=True)
class Autocast:
    """Evaluate the objectives under ``torch.autocast(device, dtype)`` (module docstring).

    Args:
        dtype: ``torch.bfloat16`` (the only one offered; see the module docstring).
    """

    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.dtype != torch.bfloat16:
            raise ValueError(
                f"Autocast(dtype={self.dtype}) is not available: use torch.bfloat16 (float16 needs dynamic loss scaling, "
                f"which bilevel does not implement)"
            )

    def objective(self, fn: Objective) -> Objective:
        """``fn`` evaluated under autocast on the device of ``y``; the value in float32."""
        dtype = self.dtype

        def autocast(x: Tree, y: Tree, batch: Any) -> torch.Tensor:
            leaves = T.leaves(y)
            device = leaves[0].device.type if leaves else "cpu"
            if leaves and leaves[0].dtype == torch.float64:
                check_autocast_variables(x, y, dtype)
            with torch.autocast(device_type=device, dtype=dtype):
                value = fn(x, y, batch)
            return value.float() if isinstance(value, torch.Tensor) and value.dtype != torch.float32 else value

        autocast.__qualname__ = getattr(fn, "__qualname__", "objective")
        autocast.__wrapped__ = fn  # type: ignore[attr-defined]
        return autocast

    def problem(self, problem: Problem) -> Problem:
        """``problem`` with both objectives under autocast (same class and fields)."""
        if problem.metadata.get("autocast"):
            return problem
        return dataclasses.replace(
            problem,
            upper=self.objective(problem.upper),
            lower=self.objective(problem.lower),
            metadata={**problem.metadata, "autocast": str(self.dtype).removeprefix("torch.")},
        )


def as_precision(precision: Any) -> Autocast | None:
    """``solve(precision=...)``: ``None``, ``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16``, or an :class:`Autocast`."""
    if precision is None or isinstance(precision, Autocast):
        return precision
    if isinstance(precision, torch.dtype):
        return Autocast(precision)
    if isinstance(precision, str) and precision in PRECISIONS:
        return Autocast(PRECISIONS[precision])
    raise ValueError(f"solve(precision={precision!r}) must be None, 'bf16' or a bilevel.precision.Autocast")
