"""Arithmetic on pytrees of tensors.

Upper-level variables ``x``, lower-level variables ``y`` and multipliers ``v`` are
pytrees: a tensor, or a dict / list / tuple of tensors (a dict of named parameter
tensors is the usual case, as returned by ``dict(module.named_parameters())``).
These helpers flatten once and use ``torch._foreach_*`` kernels, so an update of a
model with many parameter tensors costs one fused call instead of a Python loop.

All functions are pure: they return new trees and never modify their inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

Tree = Any
Leaves = list[torch.Tensor] | tuple[torch.Tensor, ...]

__all__ = [
    "Leaves",
    "Tree",
    "add",
    "all_finite",
    "axpy",
    "axpy_leaves",
    "axpys",
    "clone",
    "detach",
    "differences",
    "leaves",
    "leaves_like",
    "norm",
    "scale",
    "scales",
    "sq_norm",
    "sq_norm_leaves",
    "sq_norms",
    "structure_summary",
    "sub",
    "sums",
    "tree_map",
    "unflatten_like",
    "vdot",
    "vdot_leaves",
    "zeros_like",
]


def _flat_kind(tree: Tree) -> int:
    """1: a bare tensor, 2: a plain dict of tensors (the common cases, flattened without
    ``torch.utils._pytree``, whose generic flatten costs ~10 µs a call); 0: anything else."""
    if type(tree) is dict:  # a plain loop: ~0.5 µs vs ~0.9 µs for all(<generator>), 200+ calls a step
        for t in tree.values():
            if not isinstance(t, torch.Tensor):
                return 0
        return 2
    return 1 if isinstance(tree, torch.Tensor) else 0


def leaves(tree: Tree) -> list[torch.Tensor]:
    """The tensors of ``tree`` in a fixed order."""
    # the two usual cases inline (30+ calls a step): a dict flattens in the insertion order
    # of its keys, as in pytree; a nested or other container goes through pytree
    if type(tree) is dict:
        values = list(tree.values())
        for t in values:
            if not isinstance(t, torch.Tensor):
                return pytree.tree_leaves(tree)
        return values
    if isinstance(tree, torch.Tensor):
        return [tree]
    return pytree.tree_leaves(tree)


def unflatten_like(tensors: Leaves, like: Tree) -> Tree:
    """Rebuild a tree with the structure of ``like`` from a flat list of tensors."""
    if type(like) is dict:
        if len(tensors) == len(like):
            for t in like.values():  # a flat dict of tensors (inline: 20+ calls a step)
                if not isinstance(t, torch.Tensor):
                    break
            else:
                return dict(zip(like, tensors, strict=True))
    elif isinstance(like, torch.Tensor) and len(tensors) == 1:
        return tensors[0]
    _, spec = pytree.tree_flatten(like)
    return pytree.tree_unflatten(list(tensors), spec)


def leaves_like(tree: Tree, like: Tree) -> list[torch.Tensor]:
    """The tensors of ``tree`` in the leaf order of ``like`` (dicts are matched by key).

    Two dicts with the same keys in another insertion order flatten in different orders;
    binary operations must pair leaves by key, as ``tree_map`` does.
    """
    if type(tree) is dict and type(like) is dict and list(tree) == list(like):
        values = list(tree.values())  # same keys in the same order: no re-pairing needed
        for t in values:
            if not isinstance(t, torch.Tensor):
                break
        else:
            return values
    return leaves(_align_keys(tree, like))


def _align_keys(tree: Tree, like: Tree) -> Tree:
    if isinstance(tree, dict) and isinstance(like, dict):
        if tree.keys() != like.keys():
            raise ValueError(f"trees with different keys: {sorted(map(str, tree))} vs {sorted(map(str, like))}")
        if list(tree) == list(like) and _flat_kind(tree) == 2:
            return tree
        return {k: _align_keys(tree[k], like[k]) for k in like}
    return tree


def tree_map(fn: Callable, tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leaf-wise over trees of identical structure."""
    if not rest:  # unary maps (zeros_like, detach, clone) of the usual variables skip pytree
        kind = _flat_kind(tree)
        if kind == 1:
            return fn(tree)
        if kind == 2:
            return {k: fn(t) for k, t in tree.items()}
    return pytree.tree_map(fn, tree, *rest)


def add(a: Tree, b: Tree) -> Tree:
    """``a + b``."""
    return unflatten_like(torch._foreach_add(leaves(a), leaves_like(b, a)), a)


def sub(a: Tree, b: Tree) -> Tree:
    """``a - b``."""
    return unflatten_like(torch._foreach_sub(leaves(a), leaves_like(b, a)), a)


def _pairwise(kernel: Callable[[list[torch.Tensor], list[torch.Tensor]], Leaves], pairs: tuple[tuple[Tree, Tree], ...]) -> list[Tree]:
    """``kernel`` once over the leaves of every pair ``(a_i, b_i)`` (b_i paired with a_i by
    key); the results rebuilt in the structures of the a_i."""
    lhs: list[torch.Tensor] = []
    rhs: list[torch.Tensor] = []
    counts: list[int] = []
    for a, b in pairs:
        la = leaves(a)
        lhs += la
        rhs += leaves_like(b, a)
        counts.append(len(la))
    return _split_like(kernel(lhs, rhs), [a for a, _ in pairs], counts)


def _split_like(flat: Leaves, likes: list[Tree], counts: list[int]) -> list[Tree]:
    """``flat`` cut into runs of ``counts`` leaves, each rebuilt in the structure of its tree
    of ``likes`` (the way back from one fused kernel over several trees)."""
    trees, start = [], 0
    for like, count in zip(likes, counts, strict=True):
        trees.append(unflatten_like(flat[start : start + count], like))
        start += count
    return trees


# Several operations of one kind on small trees cost one kernel launch (and one pass of tree
# bookkeeping) each; the fused forms below make them one ``_foreach`` call, element for element
# the same arithmetic.


def differences(*pairs: tuple[Tree, Tree]) -> list[Tree]:
    """``[a_i − b_i]`` for pairs ``(a_i, b_i)`` of trees (each pair of one structure), from
    one fused kernel: a step's diagnostics form several differences of small trees, and one
    ``_foreach_sub`` over all their leaves costs what one :func:`sub` does."""
    return _pairwise(torch._foreach_sub, pairs)


def sums(*pairs: tuple[Tree, Tree]) -> list[Tree]:
    """``[a_i + b_i]`` for pairs ``(a_i, b_i)`` of trees, from one fused kernel."""
    return _pairwise(torch._foreach_add, pairs)


def scale(c: float | torch.Tensor, a: Tree) -> Tree:
    """``c * a`` for a Python or 0-d tensor scalar ``c``."""
    return unflatten_like(torch._foreach_mul(leaves(a), c), a)


def scales(c: float | torch.Tensor, *trees: Tree) -> list[Tree]:
    """``[c * a_i]`` for several trees, from one fused kernel (what :func:`scale` gives each)."""
    flat: list[torch.Tensor] = []
    counts: list[int] = []
    for a in trees:
        la = leaves(a)
        flat += la
        counts.append(len(la))
    return _split_like(torch._foreach_mul(flat, c), list(trees), counts)


def axpy(c: float | torch.Tensor, x: Tree, y: Tree) -> Tree:
    """``y + c * x`` (BLAS naming)."""
    return unflatten_like(axpy_leaves(c, leaves_like(x, y), leaves(y)), y)


def axpys(c: float | torch.Tensor, *pairs: tuple[Tree, Tree]) -> list[Tree]:
    """``[y_i + c * x_i]`` for pairs ``(x_i, y_i)`` (each pair of one structure) with one
    ``c``, from one fused kernel: what several :func:`axpy` calls with the same step give."""
    return _pairwise(lambda ys, xs: axpy_leaves(c, xs, ys), tuple((y, x) for x, y in pairs))


def vdot(a: Tree, b: Tree) -> torch.Tensor:
    """Euclidean inner product ``<a, b>`` summed over all leaves (0-d tensor)."""
    return vdot_leaves(leaves(a), leaves_like(b, a))


def sq_norm(a: Tree) -> torch.Tensor:
    """Squared Euclidean norm ``||a||^2`` over all leaves (0-d tensor)."""
    return sq_norm_leaves(leaves(a))


# The same operations on the leaf lists of trees of one structure. Iterative solvers flatten
# once, run every iteration on lists and rebuild the tree at the end: the per-call tree
# bookkeeping (structure checks, key pairing) is then paid once per solve, not per operation.


def axpy_leaves(c: float | torch.Tensor, xs: Leaves, ys: Leaves) -> Leaves:
    """``[y + c * x]`` leaf by leaf (the kernels of :func:`axpy`)."""
    if isinstance(c, torch.Tensor):  # one fused kernel per leaf: y + x·c (alpha= takes Python numbers only)
        return torch._foreach_addcmul(ys, xs, [c] * len(ys))
    return torch._foreach_add(ys, xs, alpha=c)


def vdot_leaves(la: Leaves, lb: Leaves) -> torch.Tensor:
    """``Σ <a_i, b_i>`` over paired leaves (0-d tensor; the kernels of :func:`vdot`)."""
    if not la:
        raise ValueError("vdot of an empty tree: the variables hold no tensor")
    products = [torch.sum(p * q) for p, q in zip(la, lb, strict=True)]
    if len(products) <= 2:  # a sum of two numbers is one add, bit for bit (no stack)
        return products[0] if len(products) == 1 else products[0] + products[1]
    return torch.stack(products).sum()


def sq_norm_leaves(la: Leaves) -> torch.Tensor:
    """``Σ ‖a_i‖²`` over leaves (0-d tensor; the kernels of :func:`sq_norm`)."""
    norms = torch._foreach_norm(la)
    if len(norms) == 2:  # a sum of two numbers is one add, bit for bit (no stack)
        squares = torch._foreach_mul(norms, norms)
        return squares[0] + squares[1]
    return torch.stack(norms).square().sum() if len(norms) > 1 else norms[0].square()


def sq_norms(*trees: Tree) -> tuple[torch.Tensor, ...]:
    """``(‖a‖², ‖b‖², ...)`` of several trees (0-d tensors) from one fused norm kernel.

    A method's diagnostics need several squared norms per step; one ``_foreach_norm`` over
    all their leaves and a few reductions cost what two separate :func:`sq_norm` calls do.
    """
    lists = [leaves(t) for t in trees]
    counts = [len(leaf_list) for leaf_list in lists]
    if 0 in counts:
        raise ValueError("sq_norms of an empty tree: the variables hold no tensor")
    norms = torch._foreach_norm([t for leaf_list in lists for t in leaf_list])
    if max(counts) <= 2:
        # trees of one or two tensors (a weight and a bias): the squares as a list and one add
        # per two-tensor tree; a sum of two numbers is that add, bit for bit, so this gives what
        # the reductions below give with 3-4 fewer kernels
        squares_list = torch._foreach_mul(norms, norms)
        out, start = [], 0
        for count in counts:
            out.append(squares_list[start] if count == 1 else squares_list[start] + squares_list[start + 1])
            start += count
        return tuple(out)
    squares = torch.stack(norms)
    squares = squares * squares
    if all(c == counts[0] for c in counts):  # one reshape and one sum for every tree at once
        return squares.view(len(counts), counts[0]).sum(1).unbind()
    return tuple(part.sum() for part in squares.split_with_sizes(counts))


def norm(a: Tree) -> torch.Tensor:
    """Euclidean norm ``||a||`` over all leaves (0-d tensor)."""
    return sq_norm(a).sqrt()


def zeros_like(a: Tree) -> Tree:
    """A tree of zeros with the shapes, dtypes and devices of ``a``."""
    return tree_map(torch.zeros_like, a)


def detach(a: Tree) -> Tree:
    """A tree of detached tensors (same storage)."""
    return tree_map(torch.Tensor.detach, a)


def clone(a: Tree) -> Tree:
    """A tree of detached copies."""
    return tree_map(lambda t: t.detach().clone(), a)


def all_finite(a: Tree) -> torch.Tensor:
    """0-d boolean tensor: every entry of every leaf is finite (no host sync)."""
    checks = [torch.isfinite(t).all() for t in leaves(a)]
    return torch.stack(checks).all() if len(checks) > 1 else checks[0]


def structure_summary(tree: Tree) -> str:
    """A short human-readable description of a tree (keys, shapes, dtypes) for errors."""
    flat, _spec = pytree.tree_flatten_with_path(tree)
    parts = []
    for path, leaf in flat:
        name = "".join(str(k) for k in path) or "<tensor>"
        if isinstance(leaf, torch.Tensor):
            parts.append(f"{name}: {tuple(leaf.shape)} {str(leaf.dtype).replace('torch.', '')}")
        else:
            parts.append(f"{name}: {type(leaf).__name__}")
    return "{" + ", ".join(parts) + "}"
