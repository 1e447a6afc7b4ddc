"""Derivative oracles: gradients, Hessian-vector and mixed products of an objective.

For an objective ``h(x, y)`` (the lower objective ``g``, or the averaged ``φ_μ``) the
methods need, at a point ``(x, y)``,

* the gradients ``∇_x h`` and ``∇_y h``;
* Hessian-vector products ``H v = ∇²_yy h · v``;
* mixed products ``J v = ∇²_xy h · v = ∇_x ⟨∇_y h(x, y), v⟩`` (a vector shaped like x).

:class:`Oracles` builds a :class:`Linearization` of ``∇_y h`` at a point once, then
serves any number of products there without recomputing the gradient graph: GALET
makes ``2T`` Hessian products and one mixed product at the same point. Three modes:

``"reverse"`` (default)
    reverse-over-reverse: ``∇_y h`` is built with a graph and each product is one
    vector-Jacobian product of it; ``both(v)`` returns ``(J v, H v)`` from a single
    backward pass. Fastest on CPU here (see ``benchmarks/``), and it only traverses the
    part of the graph a product needs (``H v`` never back-propagates into ``x``).
``"forward"``
    forward-over-reverse with :func:`torch.func.jvp` of :func:`torch.func.grad`:
    ``both(v)`` is the directional derivative of ``(∇_x h, ∇_y h)`` along ``(0, v)``.
``"finite_difference"``
    central differences of gradients, ``(∇h(x, y + εv) − ∇h(x, y − εv)) / 2ε`` with a
    step relative to ``‖v‖``: two gradients per product, no second-order graph
    (memory-light; biased by O(ε²)).

Example:
    >>> import torch, bilevel as bl
    >>> h = lambda x, y, b: (x["a"] * y["w"] ** 2).sum()
    >>> x, y = {"a": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}
    >>> lin = bl.Oracles().linearize(h, x, y, None)
    >>> lin.hvp({"w": torch.ones(2)})["w"]      # H = diag(2a)
    tensor([2., 4.])
    >>> lin.mixed({"w": torch.ones(2)})["a"]    # J v = 2 w ⊙ v
    tensor([6., 8.])
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch.func import grad_and_value, jvp
from torch.overrides import has_torch_function

from . import tree as T
from .tree import Tree

_ENGINE_RUN_BACKWARD: Callable[..., Any] | None
try:  # the engine call behind torch.autograd.grad (PyTorch >= 2.3); _backward falls back without it
    from torch.autograd.graph import _engine_run_backward as _ENGINE_RUN_BACKWARD
except ImportError:  # pragma: no cover - older PyTorch
    _ENGINE_RUN_BACKWARD = None

__all__ = ["ORACLE_MODES", "CountingOracles", "Linearization", "Oracles", "WeightedLinearization", "scaled_products"]

ORACLE_MODES = ("reverse", "forward", "finite_difference")


def _requires_grad_copy(tree: Tree) -> Tree:
    return T.tree_map(lambda t: t.detach().requires_grad_(True), tree)


def _backward(
    outputs: tuple[torch.Tensor, ...],
    inputs: tuple[torch.Tensor, ...],
    cotangents: torch.Tensor | Sequence[torch.Tensor] | None,
    retain_graph: bool,
    create_graph: bool,
) -> Sequence[torch.Tensor | None]:
    """The vector-Jacobian products of ``outputs`` with ``cotangents`` at ``inputs`` (``None``
    where an input is not reached).

    Calls the autograd engine as ``torch.autograd.grad`` does, without its per-call Python
    preparation (argument normalisation, a cotangent per scalar output built in Python, the
    symbolic shape comparison, ``materialize_grads``): ~5-10 µs of each of the 5-10 products
    a step makes, which is what separates a step from a hand-written loop on small models.
    Anything unusual (tensor subclasses, a cotangent whose shape differs from its output's,
    an older PyTorch) goes through ``torch.autograd.grad``, which also gives its errors.
    """
    if cotangents is None:
        cotangent_tuple: tuple | None = None
        for o in outputs:
            if o.dim() != 0:
                break
        else:  # scalar outputs (a gradient): cotangent 1 each
            cotangent_tuple = tuple([torch.ones_like(o) for o in outputs])
    else:
        cotangent_tuple = (cotangents,) if isinstance(cotangents, torch.Tensor) else tuple(cotangents)
        if len(cotangent_tuple) != len(outputs):
            cotangent_tuple = None
        else:
            for c, o in zip(cotangent_tuple, outputs, strict=True):
                if c.shape != o.shape:
                    cotangent_tuple = None
                    break
    if _ENGINE_RUN_BACKWARD is None or cotangent_tuple is None or has_torch_function(outputs + inputs):
        return torch.autograd.grad(
            outputs, inputs, grad_outputs=cotangents, retain_graph=retain_graph, create_graph=create_graph, allow_unused=True
        )
    grads: Sequence[torch.Tensor | None] = _ENGINE_RUN_BACKWARD(
        outputs, cotangent_tuple, retain_graph, create_graph, inputs, True, accumulate_grad=False
    )
    return grads


def _all_require_grad(outputs: tuple[torch.Tensor, ...]) -> bool:
    for o in outputs:  # noqa: SIM110 - a plain loop: all(<generator>) costs ~1 µs more, 6-20 calls a step
        if not o.requires_grad:
            return False
    return True


def _grads_or_zeros(
    outputs: torch.Tensor | Sequence[torch.Tensor],
    inputs: list[torch.Tensor],
    cotangents: torch.Tensor | Sequence[torch.Tensor] | None = None,
    retain_graph: bool = False,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    """``torch.autograd.grad`` that returns zeros for inputs the outputs do not depend on."""
    output_tuple = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    if output_tuple and _all_require_grad(output_tuple):
        # the common case (every gradient and product): every output has a graph, nothing to filter
        grads = _backward(output_tuple, tuple(inputs), cotangents, retain_graph or create_graph, create_graph)
        for g in grads:
            if g is None:  # an input the outputs do not reach: zeros
                return [g if g is not None else torch.zeros_like(t, requires_grad=create_graph) for g, t in zip(grads, inputs, strict=True)]
        return cast(list[torch.Tensor], list(grads))
    output_list = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    cotangent_list: list[torch.Tensor | None] = []
    if isinstance(cotangents, torch.Tensor):
        cotangent_list = [cotangents]
    elif cotangents:
        cotangent_list = list(cotangents)
    pairs = [(o, c) for o, c in zip(output_list, cotangent_list or [None] * len(output_list), strict=True) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(t) for t in inputs]
    outs, cots = zip(*pairs, strict=True)
    grads = torch.autograd.grad(
        outs,
        inputs,
        grad_outputs=None if cotangents is None else list(cots),
        retain_graph=retain_graph or create_graph,
        create_graph=create_graph,
        allow_unused=True,
        materialize_grads=True,
    )
    return list(grads)


class Linearization:
    """Products with the Hessian ``H`` and mixed matrix ``J`` of ``h`` at a fixed point.

    Attributes:
        value: ``h(x, y)`` (detached 0-d tensor).
        grad_y: ``∇_y h(x, y)`` (detached tree shaped like ``y``).
        grad_x: ``∇_x h(x, y)`` when asked for with ``with_grad_x=True``, else ``None``.
    """

    value: torch.Tensor
    grad_y: Tree
    grad_x: Tree | None = None

    def hvp(self, v: Tree) -> Tree:
        """``H v = ∇²_yy h · v`` (shaped like y)."""
        return self.both(v, need_mixed=False)[1]

    def mixed(self, v: Tree) -> Tree:
        """``J v = ∇²_xy h · v`` (shaped like x)."""
        return self.both(v, need_hvp=False)[0]

    def both(self, v: Tree, need_mixed: bool = True, need_hvp: bool = True) -> tuple[Tree, Tree]:
        """``(J v, H v)``; a product not needed is returned as ``None``."""
        raise NotImplementedError


class _ReverseLinearization(Linearization):
    def __init__(self, fn: Callable, x: Tree, y: Tree, batch: Any, with_grad_x: bool):
        self._x = _requires_grad_copy(x)
        self._y = _requires_grad_copy(y)
        self._xl, self._yl = T.leaves(self._x), T.leaves(self._y)
        with torch.enable_grad():
            value = fn(self._x, self._y, batch)
            inputs = (self._xl if with_grad_x else []) + self._yl
            grads = _grads_or_zeros(value, inputs, create_graph=True)
        nx = len(self._xl) if with_grad_x else 0
        self._gy = grads[nx:]
        self._gx = grads[:nx] if with_grad_x else None
        self._value: torch.Tensor = value
        self._x_like, self._y_like = x, y

    # detached when first read: a linearization that only serves products (the Hessian
    # batches of StocBiO and AmIGO) pays no detach and no tree for them
    @functools.cached_property
    def value(self) -> torch.Tensor:  # type: ignore[override]
        return self._value.detach()

    @functools.cached_property
    def grad_y(self) -> Tree:
        return T.unflatten_like([g.detach() for g in self._gy], self._y_like)

    @functools.cached_property
    def grad_x(self) -> Tree | None:  # type: ignore[override]
        return None if self._gx is None else T.unflatten_like([g.detach() for g in self._gx], self._x_like)

    def both(self, v: Tree, need_mixed: bool = True, need_hvp: bool = True) -> tuple[Tree, Tree]:
        # a product needs no grad mode: the engine runs a backward with create_graph=False without a graph
        grads = _grads_or_zeros(self._gy, self._inputs(need_mixed, need_hvp), T.leaves(v), retain_graph=True)
        return self._split(grads, need_mixed, need_hvp)

    def _inputs(self, need_mixed: bool, need_hvp: bool) -> list[torch.Tensor]:
        return (self._xl if need_mixed else []) + (self._yl if need_hvp else [])

    def _split(self, grads: list[torch.Tensor], need_mixed: bool, need_hvp: bool) -> tuple[Tree, Tree]:
        nx = len(self._xl) if need_mixed else 0
        jv = T.unflatten_like(grads[:nx], self._x_like) if need_mixed else None
        hv = T.unflatten_like(grads[nx:], self._y_like) if need_hvp else None
        return jv, hv


Request = tuple[Linearization, float | None, bool, bool]
ProductLeaves = tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]


def _all_reverse(requests: Sequence[Request]) -> bool:
    for request in requests:  # noqa: SIM110 - a plain loop, as _all_require_grad
        if type(request[0]) is not _ReverseLinearization:
            return False
    return True


def _reverse_product_leaves(requests: Sequence[Request], leaves_v: list[torch.Tensor]) -> list[ProductLeaves]:
    """The products of :func:`scaled_products` as leaf lists, from one backward pass (every
    linearization a reverse-mode one): callers that combine them rebuild a tree once."""
    outputs: list[torch.Tensor] = []
    cotangents: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []
    # (the callers checked that every linearization is a _ReverseLinearization: no cast in this hot loop)
    for lin, c, need_mixed, need_hvp in requests:
        outputs += lin._gy  # type: ignore[attr-defined]
        cotangents += leaves_v if c is None else [c * t for t in leaves_v]
        if need_mixed:
            inputs += lin._xl  # type: ignore[attr-defined]
        if need_hvp:
            inputs += lin._yl  # type: ignore[attr-defined]
    grads = _grads_or_zeros(outputs, inputs, cotangents, retain_graph=True)
    results: list[ProductLeaves] = []
    start = 0
    for lin, _, need_mixed, need_hvp in requests:
        jv = hv = None
        if need_mixed:
            count = len(lin._xl)  # type: ignore[attr-defined]
            jv, start = grads[start : start + count], start + count
        if need_hvp:
            count = len(lin._yl)  # type: ignore[attr-defined]
            hv, start = grads[start : start + count], start + count
        results.append((jv, hv))
    return results


def scaled_products(requests: Sequence[Request], v: Tree) -> list[tuple[Tree, Tree]]:
    """``[(c_i J_i v, c_i H_i v)]`` for requests ``(linearization_i, c_i, need_mixed, need_hvp)``.

    ``c_i = None`` means 1 (no scaling). When every linearization is a reverse-mode one,
    all products come from **one** backward pass: the gradient graphs are disjoint (each
    linearization holds its own copies of x and y), so back-propagating the outputs
    ``∇_y h_i`` with cotangents ``c_i v`` into the inputs each request asks for gives
    every product at once, with no work for products not asked for. This is how the
    products of ``φ_μ = μ f + (1 − μ) g`` cost what one graph of ``∇_y φ_μ`` costs.
    Otherwise each product is formed on its own and scaled.
    """
    if _all_reverse(requests):
        results = []
        for (lin, *_), (jv, hv) in zip(requests, _reverse_product_leaves(requests, T.leaves(v)), strict=True):
            lin = cast(_ReverseLinearization, lin)
            results.append(
                (None if jv is None else T.unflatten_like(jv, lin._x_like), None if hv is None else T.unflatten_like(hv, lin._y_like))
            )
        return results
    results = []
    for lin, c, need_mixed, need_hvp in requests:
        jv, hv = lin.both(v, need_mixed=need_mixed, need_hvp=need_hvp)
        if c is not None:
            jv = None if jv is None else T.scale(c, jv)
            hv = None if hv is None else T.scale(c, hv)
        results.append((jv, hv))
    return results


class _ForwardLinearization(Linearization):
    def __init__(self, fn: Callable, x: Tree, y: Tree, batch: Any, with_grad_x: bool):
        self._fn, self._x, self._y, self._batch = fn, T.detach(x), T.detach(y), batch
        if with_grad_x:
            (gx, gy), value = grad_and_value(lambda xx, yy: fn(xx, yy, batch), argnums=(0, 1))(self._x, self._y)
            self.grad_x = T.detach(gx)
        else:
            gy, value = grad_and_value(lambda yy: fn(self._x, yy, batch))(self._y)
            self.grad_x = None
        self.value, self.grad_y = value.detach(), T.detach(gy)

    def both(self, v: Tree, need_mixed: bool = True, need_hvp: bool = True) -> tuple[Tree, Tree]:
        fn, x, batch = self._fn, self._x, self._batch
        if need_mixed:
            grads = lambda yy: grad_and_value(lambda xx, yv: fn(xx, yv, batch), argnums=(0, 1))(x, yy)[0]
            jv, hv = jvp(grads, (self._y,), (v,))[1]
            return jv, (hv if need_hvp else None)
        grad_y = lambda yy: grad_and_value(lambda yv: fn(x, yv, batch))(yy)[0]
        hv = jvp(grad_y, (self._y,), (v,))[1]
        return None, hv


class _FiniteDifferenceLinearization(Linearization):
    def __init__(self, fn: Callable, x: Tree, y: Tree, batch: Any, with_grad_x: bool, eps: float):
        self._fn, self._x, self._y, self._batch, self._eps = fn, T.detach(x), T.detach(y), batch, eps
        gx, gy, value = _gradients(fn, self._x, self._y, batch)
        self.value, self.grad_y = value, gy
        self.grad_x = gx if with_grad_x else None

    def both(self, v: Tree, need_mixed: bool = True, need_hvp: bool = True) -> tuple[Tree, Tree]:
        v_norm = T.norm(v)
        # relative step: ε·max(1, ‖y‖)/‖v‖ keeps the perturbation at a fixed relative size
        step = self._eps * torch.clamp(T.norm(self._y), min=1.0) / torch.clamp(v_norm, min=torch.finfo(v_norm.dtype).tiny)
        plus = _gradients(self._fn, self._x, T.axpy(step, v, self._y), self._batch)
        minus = _gradients(self._fn, self._x, T.axpy(-step, v, self._y), self._batch)
        inv = 0.5 / step
        jv = T.scale(inv, T.sub(plus[0], minus[0])) if need_mixed else None
        hv = T.scale(inv, T.sub(plus[1], minus[1])) if need_hvp else None
        return jv, hv


def _gradients(fn: Callable, x: Tree, y: Tree, batch: Any) -> tuple[Tree, Tree, torch.Tensor]:
    """``(∇_x h, ∇_y h, h)`` at ``(x, y)`` by one reverse pass (detached)."""
    xr, yr = _requires_grad_copy(x), _requires_grad_copy(y)
    xl, yl = T.leaves(xr), T.leaves(yr)
    with torch.enable_grad():
        value = fn(xr, yr, batch)
        grads = _grads_or_zeros(value, xl + yl)
    return T.unflatten_like(grads[: len(xl)], x), T.unflatten_like(grads[len(xl) :], y), value.detach()


def _gradient_y(fn: Callable, x: Tree, y: Tree, batch: Any) -> tuple[Tree, torch.Tensor]:
    """``(∇_y h, h)`` at ``(x, y)``; ``x`` is treated as a constant."""
    yr = _requires_grad_copy(y)
    with torch.enable_grad():
        value = fn(T.detach(x), yr, batch)
        grads = _grads_or_zeros(value, T.leaves(yr))
    return T.unflatten_like(grads, y), value.detach()


@dataclass(frozen=True)
class Oracles:
    """First- and second-order derivatives of the problem's objectives.

    Args:
        mode: ``"reverse"`` (default), ``"forward"`` or ``"finite_difference"``
            (see the module docstring for what each costs).
        fd_eps: relative step of the finite-difference mode.
    """

    mode: str = "reverse"
    fd_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.mode not in ORACLE_MODES:
            raise ValueError(f"Oracles(mode={self.mode!r}) is not one of {ORACLE_MODES}")
        if not self.fd_eps > 0:
            raise ValueError(f"Oracles(fd_eps={self.fd_eps}) must be positive")

    def gradients(self, fn: Callable, x: Tree, y: Tree, batch: Any) -> tuple[Tree, Tree, torch.Tensor]:
        """``(∇_x h, ∇_y h, h)`` at ``(x, y)``, detached."""
        return _gradients(fn, x, y, batch)

    def gradient_y(self, fn: Callable, x: Tree, y: Tree, batch: Any) -> tuple[Tree, torch.Tensor]:
        """``(∇_y h, h)`` at ``(x, y)``, detached."""
        return _gradient_y(fn, x, y, batch)

    def linearize(self, fn: Callable, x: Tree, y: Tree, batch: Any, with_grad_x: bool = False) -> Linearization:
        """A :class:`Linearization` of ``∇_y h`` at ``(x, y)`` (one gradient evaluation).

        With ``with_grad_x=True`` it also holds ``grad_x = ∇_x h`` from the same pass.
        """
        if self.mode == "reverse":
            return _ReverseLinearization(fn, x, y, batch, with_grad_x)
        if self.mode == "forward":
            return _ForwardLinearization(fn, x, y, batch, with_grad_x)
        return _FiniteDifferenceLinearization(fn, x, y, batch, with_grad_x, self.fd_eps)


class WeightedLinearization(Linearization):
    """The linearization of ``Σ_i c_i h_i`` from linearizations of the ``h_i`` at one point.

    Used for the averaged objective ``φ_μ = μ f + (1 − μ) g``: its products are the
    weighted sums of the products with ``f`` and ``g``, and the parts stay available
    (sl-BAMM reports its KKT residual with ``g`` alone at no extra cost).
    """

    def __init__(self, terms: Sequence[tuple[float, Linearization]]):
        terms = [(c, lin) for c, lin in terms if c != 0.0]
        if not terms:
            raise ValueError("WeightedLinearization needs at least one term with a nonzero weight")
        self.terms = terms
        # (v, H_last v as a tree or as leaves, the tree structure of those leaves or None)
        self._last_term_hvps: list[tuple[Tree, Any, Tree]] = []

    # the weighted value and gradients are formed when first read (a method that only
    # needs the products pays no kernels for them)
    @functools.cached_property
    def value(self) -> torch.Tensor:  # type: ignore[override]
        return functools.reduce(operator.add, [c * lin.value for c, lin in self.terms])

    @functools.cached_property
    def grad_y(self) -> Tree:
        return _weighted_sum([(c, lin.grad_y) for c, lin in self.terms])

    @functools.cached_property
    def grad_x(self) -> Tree | None:  # type: ignore[override]
        if not all(lin.grad_x is not None for _, lin in self.terms):
            return None
        return _weighted_sum([(c, lin.grad_x) for c, lin in self.terms])

    def both(self, v: Tree, need_mixed: bool = True, need_hvp: bool = True) -> tuple[Tree, Tree]:
        # the last term's products come unscaled (c_last enters the final axpy), so that its
        # Hessian product can be handed out again by term_hvp at no cost
        *others, (c_last, lin_last) = self.terms
        requests: list[Request] = [(lin, c, need_mixed, need_hvp) for c, lin in others]
        requests.append((lin_last, None, need_mixed, need_hvp))
        if not _all_reverse(requests):
            *parts, (j_last, h_last) = scaled_products(requests, v)
            jv = _combine(c_last, j_last, [p[0] for p in parts]) if need_mixed else None
            hv = _combine(c_last, h_last, [p[1] for p in parts]) if need_hvp else None
            if need_hvp and not need_mixed:
                self._last_term_hvps.append((v, h_last, None))
            return jv, hv
        # reverse mode: combined on leaf lists, each product rebuilt as a tree once
        *leaf_parts, (jl_last, hl_last) = _reverse_product_leaves(requests, T.leaves(v))
        last = cast(_ReverseLinearization, lin_last)
        jv = hv = None
        if jl_last is not None:
            jv = T.unflatten_like(_combine_leaves(c_last, jl_last, [cast(list, p[0]) for p in leaf_parts]), last._x_like)
        if hl_last is not None:
            hv = T.unflatten_like(_combine_leaves(c_last, hl_last, [cast(list, p[1]) for p in leaf_parts]), last._y_like)
            if not need_mixed:
                self._last_term_hvps.append((v, hl_last, last._y_like))
        return jv, hv

    def term_hvp(self, v: Tree) -> Tree | None:
        """``H_last v`` — the Hessian product of the **last** term alone (unweighted) — when
        ``hvp(v)`` was formed for this very ``v`` (the same object), else ``None``.

        For ``φ_μ = μ f + (1 − μ) g`` this is ``H_g v``: the g-parts of sl-BAMM's KKT
        residual come free from the products its dual step made.
        """
        for u, h, like in self._last_term_hvps:
            if u is v:
                return h if like is None else T.unflatten_like(h, like)
        return None


def _combine(c_last: float, last: Tree, scaled: Sequence[Tree]) -> Tree:
    """``Σ scaled + c_last · last``."""
    if not scaled:
        return T.scale(c_last, last)
    return T.axpy(c_last, last, functools.reduce(T.add, scaled))


def _combine_leaves(c_last: float, last: list[torch.Tensor], scaled: Sequence[list[torch.Tensor]]) -> T.Leaves:
    """:func:`_combine` on the leaf lists of trees of one structure (the same kernels)."""
    if not scaled:
        return torch._foreach_mul(last, c_last)
    total: T.Leaves = scaled[0]
    for other in scaled[1:]:
        total = torch._foreach_add(total, other)
    return T.axpy_leaves(c_last, last, total)


def _weighted_sum(terms: Sequence[tuple[float, Tree]]) -> Tree:
    (c0, first), rest = terms[0], terms[1:]
    out = T.scale(c0, first)
    for c, t in rest:
        out = T.axpy(c, t, out)
    return out


class _CountingLinearization(Linearization):
    def __init__(self, inner: Linearization, counts: dict):
        self._inner, self._counts = inner, counts
        self.value, self.grad_y, self.grad_x = inner.value, inner.grad_y, inner.grad_x

    def both(self, v: Tree, need_mixed: bool = True, need_hvp: bool = True) -> tuple[Tree, Tree]:
        key = "both" if (need_mixed and need_hvp) else ("mixed" if need_mixed else "hvp")
        self._counts[key] = self._counts.get(key, 0) + 1
        return self._inner.both(v, need_mixed=need_mixed, need_hvp=need_hvp)


@dataclass(frozen=True)
class CountingOracles(Oracles):
    """:class:`Oracles` that count their calls in ``counts`` (for cost tests and profiling).

    Keys: ``gradients`` (∇_x h and ∇_y h), ``gradient_y``, ``linearize`` (∇_y h with a
    graph), ``hvp``, ``mixed`` and ``both`` (one pass giving ``J v`` and ``H v``).
    """

    counts: dict = field(default_factory=dict, compare=False)

    def _tick(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def reset(self) -> None:
        self.counts.clear()

    def gradients(self, fn: Callable, x: Tree, y: Tree, batch: Any) -> tuple[Tree, Tree, torch.Tensor]:
        self._tick("gradients")
        return super().gradients(fn, x, y, batch)

    def gradient_y(self, fn: Callable, x: Tree, y: Tree, batch: Any) -> tuple[Tree, torch.Tensor]:
        self._tick("gradient_y")
        return super().gradient_y(fn, x, y, batch)

    def linearize(self, fn: Callable, x: Tree, y: Tree, batch: Any, with_grad_x: bool = False) -> Linearization:
        self._tick("linearize")
        return _CountingLinearization(super().linearize(fn, x, y, batch, with_grad_x), self.counts)
