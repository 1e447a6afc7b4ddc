"""Opt-in compilation of the derivative oracles with :func:`torch.compile`.

``torch.compile`` graph-breaks on ``torch.autograd.grad`` (the default reverse-over-reverse
:class:`~bilevel.Oracles`), so this module compiles the *functional* (``torch.func``)
oracles instead: for each objective of the problem it compiles

* ``(∇_x h, ∇_y h, h)`` and ``(∇_y h, h)``  — :func:`torch.func.grad_and_value`;
* ``H v`` and ``(J v, H v)``               — :func:`torch.func.jvp` of the gradient
  (forward-over-reverse, as ``Oracles(mode="forward")``).

The methods are unchanged: :func:`compiled` returns the method with
``oracles=CompiledOracles(problem)``, and ``bilevel.solve(..., compile=True)`` does the same.
Only ``problem.upper`` and ``problem.lower`` are compiled; any other objective (e.g. the
aggregated ``a g + b f`` of BDA-type lower steps, a new closure at every step) runs in the
uncompiled forward mode, so results stay correct.

Results equal the eager ones within float tolerance (``tests/test_compile.py``). Whether
it is faster depends on the problem and device: see ``docs/performance.md`` (on the
2-core CPU of the measurements it was not; the first steps pay the compile time).

Example:
    >>> import bilevel as bl
    >>> from bilevel.compile import compiled
    >>> problem = bl.problems.T1(n=5)
    >>> method = compiled(bl.AID(lr_upper=0.5, lr_lower=0.5), problem)  # doctest: +SKIP
    >>> bl.solve(problem, method, max_iters=10)                            # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.func import grad_and_value, jvp

from . import tree as T
from .tree import Tree

if TYPE_CHECKING:
    from .methods.base import Method
    from .problem import Problem
from .oracles import Linearization, Oracles

__all__ = ["CompiledOracles", "compiled"]


class _Compiled:
    """The compiled functional derivatives of one objective ``h(x, y, batch)``."""

    def __init__(self, fn: Callable, options: dict):
        def gradients(x: Tree, y: Tree, batch: Any) -> tuple[Tree, Tree, torch.Tensor]:
            (gx, gy), value = grad_and_value(lambda xx, yy: fn(xx, yy, batch), argnums=(0, 1))(x, y)
            return gx, gy, value

        def gradient_y(x: Tree, y: Tree, batch: Any) -> tuple[Tree, torch.Tensor]:
            return grad_and_value(lambda yy: fn(x, yy, batch))(y)

        def hvp(x: Tree, y: Tree, v: Tree, batch: Any) -> Tree:
            return jvp(lambda yy: grad_and_value(lambda yv: fn(x, yv, batch))(yy)[0], (y,), (v,))[1]

        def both(x: Tree, y: Tree, v: Tree, batch: Any) -> tuple[Tree, Tree]:
            grads = lambda yy: grad_and_value(lambda xx, yv: fn(xx, yv, batch), argnums=(0, 1))(x, yy)[0]
            jv_hv: tuple[Tree, Tree] = jvp(grads, (y,), (v,))[1]
            return jv_hv

        self.gradients = torch.compile(gradients, **options)
        self.gradient_y = torch.compile(gradient_y, **options)
        self.hvp = torch.compile(hvp, **options)
        self.both = torch.compile(both, **options)


class _CompiledLinearization(Linearization):
    def __init__(self, comp: _Compiled, x: Tree, y: Tree, batch: Any, with_grad_x: bool):
        self._c, self._x, self._y, self._batch = comp, T.detach(x), T.detach(y), batch
        if with_grad_x:
            gx, gy, value = comp.gradients(self._x, self._y, batch)
            self.grad_x = gx
        else:
            gy, value = comp.gradient_y(self._x, self._y, batch)
            self.grad_x = None
        self.value, self.grad_y = value, gy

    def both(self, v: Tree, need_mixed: bool = True, need_hvp: bool = True) -> tuple[Tree, Tree]:
        if need_mixed:
            jv, hv = self._c.both(self._x, self._y, v, self._batch)
            return jv, (hv if need_hvp else None)
        return None, self._c.hvp(self._x, self._y, v, self._batch)


@dataclass(frozen=True)
class CompiledOracles(Oracles):
    """Forward-mode oracles whose derivatives of ``problem.upper``/``problem.lower`` are compiled.

    Args:
        problem: the problem whose two objectives are compiled (others run uncompiled).
        options: keyword arguments of :func:`torch.compile` (default ``{"dynamic": False}``).
    """

    problem: Any = None
    options: dict = field(default_factory=lambda: {"dynamic": False}, compare=False)
    mode: str = "forward"
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def _compiled(self, fn: Callable) -> _Compiled | None:
        if self.problem is None or fn not in (self.problem.upper, self.problem.lower):
            return None
        key = "upper" if fn is self.problem.upper else "lower"
        if key not in self._cache:
            self._cache[key] = _Compiled(fn, dict(self.options))
        comp: _Compiled = self._cache[key]
        return comp

    def gradients(self, fn: Callable, x: Tree, y: Tree, batch: Any) -> tuple[Tree, Tree, torch.Tensor]:
        comp = self._compiled(fn)
        if comp is None:
            return super().gradients(fn, x, y, batch)
        gx, gy, value = comp.gradients(T.detach(x), T.detach(y), batch)
        return gx, gy, value.detach()

    def gradient_y(self, fn: Callable, x: Tree, y: Tree, batch: Any) -> tuple[Tree, torch.Tensor]:
        comp = self._compiled(fn)
        if comp is None:
            return super().gradient_y(fn, x, y, batch)
        gy, value = comp.gradient_y(T.detach(x), T.detach(y), batch)
        return gy, value.detach()

    def linearize(self, fn: Callable, x: Tree, y: Tree, batch: Any, with_grad_x: bool = False) -> Linearization:
        comp = self._compiled(fn)
        if comp is None:
            return super().linearize(fn, x, y, batch, with_grad_x)
        return _CompiledLinearization(comp, x, y, batch, with_grad_x)


def compiled(method: Method, problem: Problem, **options: Any) -> Method:
    """``method`` with :class:`CompiledOracles` for ``problem`` (``options`` go to ``torch.compile``).

    Methods that differentiate through their own lower iterations with autograd (ITD,
    T-RHG, BDA) do not use these oracles for the unrolled part and gain nothing.
    """
    opts = {"dynamic": False, **options}
    replaced: Method = method.replace(oracles=CompiledOracles(problem=problem, options=opts))
    return replaced
