"""Toy bilevel problems with closed-form solutions (docs/algorithms.md#toy-problems; the
runs that check them: docs/algorithms.md#reference-results).

Each constructor returns a :class:`ToyProblem`: a :class:`~bilevel.Problem` with the
papers' starting point and its known answer (``x_star``, ``y_star``), and, where the
lower level has a unique solution, the exact hypergradient ``∇Φ(x)`` of
``Φ(x) = f(x, y*(x))``. Variables are dicts: ``x = {"x": ...}``, ``y = {"y": ...}``
(T2: ``y = {"y1": ..., "y2": ...}``). Losses are written as sums of squares (the
second derivative of ``torch.norm`` at zero is NaN).

=====  ============================================  ==============================
name   lower level                                   answer
=====  ============================================  ==============================
T1     strongly convex, ``g = ½‖y‖² − xᵀy``            x* = y* = 0.5·1
T1g    strongly convex quadratic, random A, B, D     x* = (BA⁻¹Bᵀ + D)⁻¹ D x̂
T2     merely convex, y2 absent from g               x* = 1, y* = (1, 1)
T3     nonconvex PL, ``(x+y)² + x sin²(x+y)``          three local minima of Φ on [0, 3]
T4     convex PL, ``½‖Ay − x‖²``, A wide               x_opt = A y_opt
=====  ============================================  ==============================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..problem import Problem

__all__ = ["T1", "T2", "T3", "T3_LOCAL_MINIMA", "T4", "T1g", "ToyProblem"]

T3_LOCAL_MINIMA = (0.3824, 1.2152, 2.8296)


@dataclass(frozen=True)
class ToyProblem(Problem):
    """A :class:`~bilevel.Problem` with a known answer.

    Attributes:
        x_star, y_star: the solution (``None`` where it is not unique, as for T3).
        hypergradient: ``x -> ∇Φ(x)`` (a dict shaped like ``x``) when the lower level has
            a unique solution, else ``None``.
        value_function: ``x -> Φ(x) = f(x, y*(x))`` when defined.
        smoothness: a dict of Lipschitz constants useful for step sizes (``L_g``, ``L_phi``).
    """

    x_star: Any = None
    y_star: Any = None
    hypergradient: Callable | None = None
    value_function: Callable | None = None
    smoothness: Any = None


def _sq(t: torch.Tensor) -> torch.Tensor:
    return (t * t).sum()


def T1(n: int = 100, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> ToyProblem:
    """T1, the strongly convex toy of sl-BAMM's ``strongly_convex.py`` (``idt=True``).

    ``f = ½‖y‖² + ½‖x − 1‖²``, ``g = ½‖y‖² − xᵀy``; ``y*(x) = x``,
    ``Φ(x) = ½‖x‖² + ½‖x − 1‖²``, ``∇Φ(x) = 2x − 1``, x* = y* = 0.5·1, Φ* = n/4.
    Start: x = y = 2·1.
    """
    kw: dict[str, Any] = {"dtype": dtype, "device": device}

    def upper(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return 0.5 * _sq(y["y"]) + 0.5 * _sq(x["x"] - 1.0)

    def lower(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return 0.5 * _sq(y["y"]) - (x["x"] * y["y"]).sum()

    half = torch.full((n,), 0.5, **kw)
    return ToyProblem(
        upper=upper,
        lower=lower,
        x_init={"x": torch.full((n,), 2.0, **kw)},
        y_init={"y": torch.full((n,), 2.0, **kw)},
        name="T1",
        x_star={"x": half},
        y_star={"y": half.clone()},
        hypergradient=lambda x: {"x": 2.0 * x["x"] - 1.0},
        value_function=lambda x: 0.5 * _sq(x["x"]) + 0.5 * _sq(x["x"] - 1.0),
        smoothness={"L_g": 1.0, "L_phi": 2.0},
    )


def T1g(n: int = 20, seed: int = 0, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> ToyProblem:
    """T1g, the general strongly convex quadratic (``strongly_convex.py`` with ``idt=False``).

    ``f = ½ yᵀAy + ½ (x − x̂)ᵀD(x − x̂)``, ``g = ½ yᵀAy − xᵀBy`` with
    ``A = Qᵀ diag(1 + U[0,1)) Q`` (SPD), ``D = Q'ᵀ diag(U[0,1)) Q'``, ``B ~ U[0,1)^{n×n}``,
    ``x̂ ~ U[0,1)^n`` drawn from ``seed``. ``y*(x) = A⁻¹Bᵀx``,
    ``∇Φ(x) = BA⁻¹Bᵀx + D(x − x̂)``, ``x* = (BA⁻¹Bᵀ + D)⁻¹ D x̂``. Start: x = y = 2·1.
    """
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)
    q1, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    A = q1.T @ torch.diag(1.0 + rand(n)) @ q1
    A = 0.5 * (A + A.T)
    D = q2.T @ torch.diag(rand(n)) @ q2
    D = 0.5 * (D + D.T)
    B = rand(n, n)
    x_hat = rand(n)
    M = B @ torch.linalg.solve(A, B.T)
    x_star = torch.linalg.solve(M + D, D @ x_hat)
    y_star = torch.linalg.solve(A, B.T @ x_star)
    L_phi = float(torch.linalg.eigvalsh(0.5 * (M + M.T) + D).max())
    A, D, B, x_hat, M = (t.to(dtype=dtype, device=device) for t in (A, D, B, x_hat, M))

    def upper(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        yv, dx = y["y"], x["x"] - x_hat
        return 0.5 * (yv @ (A @ yv)) + 0.5 * (dx @ (D @ dx))

    def lower(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        yv = y["y"]
        return 0.5 * (yv @ (A @ yv)) - x["x"] @ (B @ yv)

    kw: dict[str, Any] = {"dtype": dtype, "device": device}
    return ToyProblem(
        upper=upper,
        lower=lower,
        x_init={"x": torch.full((n,), 2.0, **kw)},
        y_init={"y": torch.full((n,), 2.0, **kw)},
        name="T1g",
        x_star={"x": x_star.to(**kw)},
        y_star={"y": y_star.to(**kw)},
        hypergradient=lambda x: {"x": M @ x["x"] + D @ (x["x"] - x_hat)},
        value_function=lambda x: upper(x, {"y": torch.linalg.solve(A, B.T @ x["x"])}, None),
        smoothness={"L_g": float(torch.linalg.eigvalsh(A).max()), "L_phi": L_phi},
        metadata={"A": A, "B": B, "D": D, "x_hat": x_hat},
    )


def T2(n: int = 100, init: float = 0.01, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> ToyProblem:
    """T2, the merely convex toy of sl-BAMM's ``strategy3.py`` (from BDA).

    ``f = ½‖x − y2‖² + ½‖y1 − 1‖²``, ``g = ½‖y1‖² − xᵀy1``: the lower solution set
    ``S(x) = {y1 = x, y2 free}`` is not a singleton. Answer x* = 1, y* = (1, 1), f* = 0.
    Methods that only follow ``∇g`` never move ``y2`` and stop at ``x = (1 + y2₀)/2``
    (0.505 from the code's start 0.01·1).
    """
    kw: dict[str, Any] = {"dtype": dtype, "device": device}

    def upper(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return 0.5 * _sq(x["x"] - y["y2"]) + 0.5 * _sq(y["y1"] - 1.0)

    def lower(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return 0.5 * _sq(y["y1"]) - (x["x"] * y["y1"]).sum()

    ones = torch.ones(n, **kw)
    return ToyProblem(
        upper=upper,
        lower=lower,
        x_init={"x": torch.full((n,), init, **kw)},
        y_init={"y1": torch.full((n,), init, **kw), "y2": torch.full((n,), init, **kw)},
        name="T2",
        x_star={"x": ones},
        y_star={"y1": ones.clone(), "y2": ones.clone()},
        smoothness={"L_g": 1.0},
        metadata={"lower_only_limit": (1.0 + init) / 2.0},
    )


def T3(copies: int = 1, seed: int = 0, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> ToyProblem:
    """T3, the nonconvex-PL toy of V-PBGD, with ``copies`` independent instances.

    ``g = (x+y)² + x sin²(x+y)``, ``f = cos(4y+2)/(1+e^{2−4x}) + ½ ln((4x−2)²+1)``, x ∈ [0, 3].
    ``y*(x) = −x`` is the unique lower stationary point for x ≤ π (so g is PL in y on
    [0, 3]); ``Φ(x) = cos(2−4x)/(1+e^{2−4x}) + ½ ln((4x−2)²+1)`` has local minima
    x ≈ 0.3824, 1.2152 (global), 2.8296. The objectives are sums over ``copies``
    independent coordinates, so one run with fixed step sizes is ``copies`` independent
    runs; starts are drawn as in the repo: x ~ U[0, 3.5] (projected onto [0, 3]), y ~ U[−5, 8.5].
    Use ``Box(0, 3)`` as the upper projection.
    """
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.clamp(3.5 * torch.rand(copies, generator=gen, dtype=torch.float64), 0.0, 3.0)
    y0 = -5.0 + 13.5 * torch.rand(copies, generator=gen, dtype=torch.float64)
    kw: dict[str, Any] = {"dtype": dtype, "device": device}

    def upper(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        xv, yv = x["x"], y["y"]
        return (torch.cos(4 * yv + 2) / (1 + torch.exp(2 - 4 * xv)) + 0.5 * torch.log((4 * xv - 2) ** 2 + 1)).sum()

    def lower(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        u = x["x"] + y["y"]
        return (u * u + x["x"] * torch.sin(u) ** 2).sum()

    def value_function(x: dict[str, torch.Tensor]) -> torch.Tensor:
        return upper(x, {"y": -x["x"]}, None)

    def hypergradient(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        xr = x["x"].detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(value_function({"x": xr}), xr)
        return {"x": g.detach()}

    return ToyProblem(
        upper=upper,
        lower=lower,
        x_init={"x": x0.to(**kw)},
        y_init={"y": y0.to(**kw)},
        name="T3",
        hypergradient=hypergradient,
        value_function=value_function,
        smoothness={"L_g": 2.0 + 2 * 3.0},  # ∂²_yy g = 2 + 2x cos 2u ≤ 8 on [0, 3]
        metadata={"local_minima": T3_LOCAL_MINIMA, "box": (0.0, 3.0)},
    )


def T4(m: int = 5, d: int = 20, seed: int = 0, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> ToyProblem:
    """T4, a convex-PL lower level that is not strongly convex (built for GALET).

    ``g = ½‖Ay − x‖²`` with ``A ∈ R^{m×d}``, m < d, full row rank (so ``S(x)`` is an
    affine set of dimension d − m), ``f = ½‖y − y₀‖² + ½‖x − x₀‖²``. Optimistic answer
    ``y_opt = (I + AᵀA)⁻¹(y₀ + Aᵀx₀)``, ``x_opt = A y_opt``. Start: x = 0, y ~ N(0, I).
    """
    if not m < d:
        raise ValueError(f"T4 needs m < d for a lower level that is not strongly convex (got m={m}, d={d})")
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(m, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    y_ref = torch.randn(d, generator=gen, dtype=torch.float64)
    x_ref = torch.randn(m, generator=gen, dtype=torch.float64)
    y_start = torch.randn(d, generator=gen, dtype=torch.float64)
    y_opt = torch.linalg.solve(torch.eye(d, dtype=torch.float64) + A.T @ A, y_ref + A.T @ x_ref)
    x_opt = A @ y_opt
    L_g = float(torch.linalg.eigvalsh(A.T @ A).max())
    kw: dict[str, Any] = {"dtype": dtype, "device": device}
    A, y_ref, x_ref = (t.to(**kw) for t in (A, y_ref, x_ref))

    def upper(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return 0.5 * _sq(y["y"] - y_ref) + 0.5 * _sq(x["x"] - x_ref)

    def lower(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return 0.5 * _sq(A @ y["y"] - x["x"])

    return ToyProblem(
        upper=upper,
        lower=lower,
        x_init={"x": torch.zeros(m, **kw)},
        y_init={"y": y_start.to(**kw)},
        name="T4",
        x_star={"x": x_opt.to(**kw)},
        y_star={"y": y_opt.to(**kw)},
        smoothness={"L_g": L_g},
        metadata={"A": A, "y_ref": y_ref, "x_ref": x_ref},
    )
