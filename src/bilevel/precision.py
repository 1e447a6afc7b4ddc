"""Mixed precision: the objectives evaluated under :func:`torch.autocast` in bfloat16 or float16.

``Autocast(dtype).problem(problem)`` (or ``solve(..., precision="bf16" | "fp16")``) evaluates
``f`` and ``g`` under ``torch.autocast``: the operations autocast lists as safe in lower
precision (matrix products, convolutions, ``linear``) run in ``dtype``, the others
(reductions, ``log_softmax``, cross-entropy) in float32, and the value is returned in
float32. The variables x and y, the multiplier v, every gradient, Hessian and mixed product
*as a vector*, the linear solvers and the upper optimizer stay in float32: autograd
differentiates each low-precision product in the precision it was computed in and casts
the result back to the float32 leaf. So the products inherit the low precision's relative
error (bfloat16: 8 significant bits, ``2⁻⁸ ≈ 4e-3``; float16: 11 bits, ``2⁻¹¹ ≈ 5e-4``)
while the iteration's arithmetic — CG's recurrences, line-search inner products, Adam's
moments — does not.

**bfloat16** has float32's exponent range: nothing underflows that would not in float32.

**float16** has 11 significant bits but its exponent stops at ``6e-8`` (subnormals; ``6e-5``
normal) and ``65504``: the cotangents of a backward pass through float16 products — the
loss's derivative spread over a batch, multiplied by small weights — underflow to zero.
It therefore comes with **dynamic loss scaling** (:class:`LossScaling`, on by default):

* every gradient is taken of ``S·h`` and divided by ``S`` in float32:
  ``∇h = ∇(S h) / S``; the value handed to the method is ``(S h)/S = h`` (S is a power
  of two, so both divisions are exact), so methods, line searches and diagnostics see
  the unscaled quantities and need not know about S;
* a Hessian or mixed product also pushes the cotangent ``v`` through the double backward:
  it is scaled too, by ``c = 2^(−⌊log₂ max|v|⌋)`` (a power of two near ``1/max|v|``), and
  ``H v = ∇²(S h)·(c v) / (S c)``, ``J v`` likewise. The scaling is an ordinary
  multiplication of the objective's value, inside the graph, so every derivative of
  every order is the derivative of ``S h`` (a scaling done by a custom autograd function
  that is the identity forward and rescales backward would hand autograd an inconsistent
  derivative, and the double backward would come out wrong by a factor S);
* **dynamic**: S starts at ``init_scale`` (2¹⁶). A step that produced a non-finite
  gradient or product is rejected — the state before it is kept, S is halved and the step
  is made again (at most ``max_retries`` times; then the non-finite step is accepted and
  :func:`bilevel.solve` ends the run with its divergence message, as in float32); after
  ``growth_interval`` accepted steps in a row S doubles (``torch.amp.GradScaler``'s rule).
  S and the count of good steps live in the run's state (``state.extra["loss_scale"]``,
  a :class:`LossScaleState`), so a checkpoint resumes exactly; ``solve`` logs the
  diagnostics ``loss_scale`` (the S of the accepted step) and ``loss_scale_skipped``
  (how many times the step was rejected).

The scaling lives in the derivative oracles (:class:`LossScaledOracles`, around the
method's own :class:`~bilevel.Oracles`) and in a method wrapper (:class:`LossScaled`) that
runs the retry loop; methods are unchanged. It reaches every method whose derivatives go
through its oracles — AID, GALET, sl-BAMM, BAGDC, BOME, PBGD, MEHA and the stochastic
methods. ITD, T-RHG, BDA and IAPTT-GM back-propagate through their lower steps with
autograd directly, where no oracle can scale: float16 is refused for them (one line;
use bfloat16).

What this buys is memory and bandwidth for activations (half the bytes) and, on hardware
with low-precision units (GPUs; CPUs with AMX or AVX512-BF16 for bfloat16), speed of the
products. On a CPU float16 is emulated and slow: it is offered there for testing, the
speed case is the GPU. ``docs/precision.md`` has the measured figures and says which
methods tolerate the noise.

Example:
    >>> import torch, bilevel as bl
    >>> from bilevel.precision import Autocast
    >>> problem = Autocast(torch.bfloat16).problem(bl.problems.T1g(n=4, dtype=torch.float32))
    >>> value = problem.g(problem.x_init, problem.y_init)
    >>> value.dtype                                   # computed in bfloat16, returned in float32
    torch.float32
    >>> fp16 = Autocast(torch.float16)                # loss scaling on: S = 2^16, growth every 2000 steps
    >>> fp16.loss_scaling.init_scale
    65536.0
    >>> result = bl.solve(bl.problems.T1g(n=4, dtype=torch.float32), bl.AID(lr_upper=0.1), max_iters=3, precision=fp16)
    >>> result.series("loss_scale")                   # 2^16 overflowed at the start: halved three times
    [8192.0, 8192.0, 8192.0]

References: Kalamkar et al., "A Study of BFLOAT16 for Deep Learning Training" (2019);
Micikevicius et al., "Mixed Precision Training" (ICLR 2018) — loss scaling, §3.2.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch.utils import _pytree as pytree

from . import tree as T
from .methods.base import Method
from .oracles import Linearization, Oracles
from .problem import Objective, Problem
from .state import State, part_state
from .tree import Tree
from .validation import check_count, check_positive

__all__ = [
    "PRECISIONS",
    "Autocast",
    "LossScaleState",
    "LossScaled",
    "LossScaledOracles",
    "LossScaling",
    "as_precision",
    "check_autocast_variables",
]

PRECISIONS = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}

#: the key of the loss-scale state in ``State.extra``
STATE_KEY = "loss_scale"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_autocast_variables(x: Tree, y: Tree, dtype: torch.dtype = torch.bfloat16) -> None:
    """Refuse float64 variables (one line naming the leaf): autocast lowers float32 only."""
    for name, tree in (("x", x), ("y", y)):
        flat, _ = pytree.tree_flatten_with_path(tree)
        for path, leaf in flat:
            if isinstance(leaf, torch.Tensor) and leaf.dtype == torch.float64:
                where = name + "".join(str(k) for k in path)
                raise ValueError(
                    f"mixed precision ({_dtype_name(dtype)}) was asked for but {where} is float64: autocast "
                    f"only lowers float32 computations; use float32 variables (.float()), or drop precision= for float64"
                )


# -- dynamic loss scaling -----------------------------------------------------------------------
@dataclass(frozen=True)
class LossScaling:
    """Dynamic loss scaling of float16 derivatives (module docstring).

    Args:
        init_scale: S at the start of a run (a power of two keeps the unscaling exact).
        growth_interval: accepted steps in a row after which S doubles.
        max_retries: times one step is made again with S halved before its non-finite
            result is accepted (and the run ends as diverged).
    """

    init_scale: float = 2.0**16
    growth_interval: int = 2000
    max_retries: int = 30

    def __post_init__(self) -> None:
        check_positive("LossScaling", "init_scale", self.init_scale)
        check_count("LossScaling", "growth_interval", self.growth_interval, minimum=1)
        check_count("LossScaling", "max_retries", self.max_retries, minimum=0)
        object.__setattr__(self, "init_scale", float(self.init_scale))


@part_state
class LossScaleState(NamedTuple):
    """The loss scale S and the accepted steps since it last changed (``state.extra["loss_scale"]``)."""

    scale: float
    good_steps: int


class _Scaling:
    """The scale of the step being made and the finiteness of every derivative it produced."""

    def __init__(self, scale: float):
        self.scale = scale
        self.flags: list[torch.Tensor] = []

    def check(self, *trees: Tree) -> None:
        for tree in trees:
            if tree is not None and T.leaves(tree):
                self.flags.append(T.all_finite(tree))

    def finite(self) -> bool:
        """Whether every derivative was finite, agreed by every process of a distributed run
        (one host synchronisation)."""
        if not self.flags:
            return True
        flag = torch.stack(self.flags).all()
        from . import distributed

        if distributed.is_active():
            flag = distributed.DataParallel().all_reduce_scalar(flag.to(torch.float32), "min") > 0
        return bool(flag)


_ACTIVE: ContextVar[_Scaling | None] = ContextVar("bilevel_loss_scaling", default=None)


@contextlib.contextmanager
def _scaling(scale: float) -> Iterator[_Scaling]:
    active = _Scaling(scale)
    token = _ACTIVE.set(active)
    try:
        yield active
    finally:
        _ACTIVE.reset(token)


def _times(scale: float, fn: Callable) -> Callable:
    """``(x, y, batch) ↦ scale · fn(x, y, batch)``: a plain product, inside the graph."""

    def scaled(x: Tree, y: Tree, batch: Any) -> torch.Tensor:
        value: torch.Tensor = fn(x, y, batch) * scale
        return value

    return scaled


def _unscale(factor: float | torch.Tensor, tree: Tree) -> Tree:
    return None if tree is None else T.scale(factor, tree)


def _cotangent_scale(v: Tree) -> torch.Tensor:
    """``c = 2^(−⌊log₂ max|v|⌋)`` (1 for a zero or non-finite v), so that ``max|c v| ∈ [1, 2)``."""
    largest = torch.stack([t.detach().abs().amax() for t in T.leaves(v)]).amax()
    usable = (largest > 0) & torch.isfinite(largest)
    power = torch.exp2(-torch.floor(torch.log2(torch.where(usable, largest, torch.ones_like(largest)))))
    return torch.where(usable, power, torch.ones_like(power))


class _ScaledLinearization(Linearization):
    """Products of ``h`` from a linearization of ``S h``: ``(J, H)(c v) / (S c)``."""

    def __init__(self, inner: Linearization, scaling: _Scaling | None, scale: float):
        self._inner, self._scaling, self._scale = inner, scaling, scale
        self.value = inner.value / scale
        self.grad_y = _unscale(1.0 / scale, inner.grad_y)
        self.grad_x = _unscale(1.0 / scale, inner.grad_x)
        if scaling is not None:
            scaling.check(self.grad_y, self.grad_x)

    def both(self, v: Tree, need_mixed: bool = True, need_hvp: bool = True) -> tuple[Tree, Tree]:
        c = _cotangent_scale(v)
        jv, hv = self._inner.both(T.scale(c, v), need_mixed=need_mixed, need_hvp=need_hvp)
        inverse = 1.0 / (self._scale * c)
        jv, hv = _unscale(inverse, jv), _unscale(inverse, hv)
        if self._scaling is not None:
            self._scaling.check(jv, hv)
        return jv, hv


@dataclass(frozen=True)
class LossScaledOracles(Oracles):
    """The derivatives of ``inner`` taken of ``S·h`` and divided by ``S`` (module docstring).

    Inside a :class:`LossScaled` step, S is that step's dynamic scale and every result's
    finiteness is recorded for the retry decision; elsewhere S is ``scale`` (default 1).

    Args:
        inner: the oracles that differentiate (any mode).
        scale: the fixed S used outside a :class:`LossScaled` step.
    """

    inner: Oracles = field(default_factory=Oracles)
    scale: float = 1.0

    def _current(self) -> tuple[_Scaling | None, float]:
        active = _ACTIVE.get()
        return (active, active.scale) if active is not None else (None, self.scale)

    def gradients(self, fn: Callable, x: Tree, y: Tree, batch: Any) -> tuple[Tree, Tree, torch.Tensor]:
        active, scale = self._current()
        gx, gy, value = self.inner.gradients(_times(scale, fn), x, y, batch)
        gx, gy = T.scale(1.0 / scale, gx), T.scale(1.0 / scale, gy)
        if active is not None:
            active.check(gx, gy)
        return gx, gy, value / scale

    def gradient_y(self, fn: Callable, x: Tree, y: Tree, batch: Any) -> tuple[Tree, torch.Tensor]:
        active, scale = self._current()
        gy, value = self.inner.gradient_y(_times(scale, fn), x, y, batch)
        gy = T.scale(1.0 / scale, gy)
        if active is not None:
            active.check(gy)
        return gy, value / scale

    def linearize(self, fn: Callable, x: Tree, y: Tree, batch: Any, with_grad_x: bool = False) -> Linearization:
        active, scale = self._current()
        return _ScaledLinearization(self.inner.linearize(_times(scale, fn), x, y, batch, with_grad_x), active, scale)


def _refuse_unscalable(method: Method) -> None:
    from .methods import IAPTTGM, Unrolled

    if isinstance(method, (Unrolled, IAPTTGM)):
        raise ValueError(
            f"{method.name} back-propagates through its lower steps with autograd directly, which float16 loss scaling "
            f"cannot reach: use precision='bf16' (no scaling needed) or float32 for {method.name}"
        )


# a method's own fields, whichever its class (mypy reads dataclasses.replace as Method's fields only)
_replace: Callable[..., Method] = dataclasses.replace


def _with_scaled_oracles(method: Method) -> Method:
    """``method`` whose oracles (its own, or those of the method it wraps) are loss-scaled."""
    _refuse_unscalable(method)
    names = {f.name for f in dataclasses.fields(method)} if dataclasses.is_dataclass(method) else set()
    if "oracles" in names:
        own = method.oracles if method.oracles is not None else Oracles()  # type: ignore[attr-defined]
        if isinstance(own, LossScaledOracles):
            return method
        return _replace(method, oracles=LossScaledOracles(inner=own))
    inner = [name for name in names if isinstance(getattr(method, name), Method)]
    if len(inner) == 1:  # a wrapper (e.g. the few-shot EpisodicLower): scale the method it runs
        return _replace(method, **{inner[0]: _with_scaled_oracles(getattr(method, inner[0]))})
    raise ValueError(
        f"{type(method).__name__} has no oracles option: float16 loss scaling works through the derivative oracles of "
        f"the library's methods; use precision='bf16' or float32"
    )


@dataclass(frozen=True)
class LossScaled(Method):
    """``method`` with float16 dynamic loss scaling (module docstring): its oracles scaled,
    its steps retried with S halved while they produce non-finite derivatives.

    Args:
        method: the method to run (its iterates are those of ``method``).
        scaling: the :class:`LossScaling` options.
    """

    method: Method | None = None
    scaling: LossScaling = field(default_factory=LossScaling)
    uses_multiplier: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.method, Method) or isinstance(self.method, LossScaled):
            raise TypeError(f"LossScaled(method=...) needs a bilevel method such as bilevel.AID(), got {type(self.method).__name__}")
        if not isinstance(self.scaling, LossScaling):
            raise TypeError(f"LossScaled(scaling={self.scaling!r}) must be a bilevel.precision.LossScaling")
        object.__setattr__(self, "_scaled", _with_scaled_oracles(self.method))

    @property
    def _inner(self) -> Method:
        scaled: Method = self.__dict__["_scaled"]
        return scaled

    @property
    def name(self) -> str:  # type: ignore[override]  # the wrapped method's name, not a class constant
        return self._inner.name

    @property
    def stationarity_doc(self) -> str:  # type: ignore[override]  # the wrapped method's
        return self._inner.stationarity_doc

    def _attempts(self, state: State | None, run: Callable[[Any], Any]) -> tuple[Any, float, LossScaleState, int]:
        """``run(inner state)`` with S halved until its derivatives are finite (or the retries
        are spent): ``(its result, the S it was made with, the next loss-scale state,
        rejected attempts)``. ``state`` ``None``: the start of a run, at ``init_scale``."""
        saved = state.extra.get(STATE_KEY) if state is not None else None
        scale, good = (saved.scale, saved.good_steps) if isinstance(saved, LossScaleState) else (self.scaling.init_scale, 0)
        inner_state = None if state is None else state.replace(extra={k: v for k, v in state.extra.items() if k != STATE_KEY})
        rejected = 0
        while True:
            with _scaling(scale) as active:
                out = run(inner_state)
            finite = active.finite()
            if finite or rejected >= self.scaling.max_retries:
                break
            scale, good, rejected = scale / 2.0, 0, rejected + 1
        good = good + 1 if finite else 0
        if good >= self.scaling.growth_interval:
            return out, scale, LossScaleState(scale=scale * 2.0, good_steps=0), rejected
        return out, scale, LossScaleState(scale=scale, good_steps=good), rejected

    def init(self, problem: Problem, x0: Tree = None, y0: Tree = None, batch: Any = None, validate: bool = True) -> State:
        state: State
        state, scale, _, _ = self._attempts(None, lambda _: self._inner.init(problem, x0, y0, batch, validate))
        return state.replace(extra={**state.extra, STATE_KEY: LossScaleState(scale=scale, good_steps=0)})

    def step(self, problem: Problem, state: State, batch: Any = None) -> tuple[State, dict]:
        (new_state, info), scale, scale_state, rejected = self._attempts(
            state, lambda inner_state: self._inner.step(problem, inner_state, batch)
        )
        leaves = T.leaves(new_state.x)
        device = leaves[0].device if leaves else None
        info = {
            **info,
            "loss_scale": torch.tensor(scale, device=device),
            "loss_scale_skipped": torch.tensor(float(rejected), device=device),
        }
        return new_state.replace(extra={**new_state.extra, STATE_KEY: scale_state}), info

    def direction(self, problem: Problem, state: State, batch: Any = None) -> tuple[Tree, dict]:
        """The wrapped method's estimate, made at the first scale whose derivatives are finite."""
        (estimate, info), _, _, _ = self._attempts(state, lambda inner_state: self._inner.direction(problem, inner_state, batch))
        return estimate, info


# -- autocast -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Autocast:
    """Evaluate the objectives under ``torch.autocast(device, dtype)`` (module docstring).

    Args:
        dtype: ``torch.bfloat16`` (default) or ``torch.float16``.
        loss_scaling: a :class:`LossScaling`, ``None`` (no scaling), or ``"auto"``
            (default: ``LossScaling()`` for float16, ``None`` for bfloat16).
    """

    dtype: torch.dtype = torch.bfloat16
    loss_scaling: LossScaling | str | None = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"Autocast(dtype={self.dtype}) is not available: use torch.bfloat16 or torch.float16")
        if self.loss_scaling == "auto":
            object.__setattr__(self, "loss_scaling", LossScaling() if self.dtype == torch.float16 else None)
        elif self.loss_scaling is not None and not isinstance(self.loss_scaling, LossScaling):
            raise TypeError(f"Autocast(loss_scaling={self.loss_scaling!r}) must be a bilevel.precision.LossScaling, None or 'auto'")

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
            metadata={**problem.metadata, "autocast": _dtype_name(self.dtype)},
        )

    def method(self, method: Method) -> Method:
        """``method`` with loss scaling (:class:`LossScaled`) when it is on, else ``method``."""
        if not isinstance(self.loss_scaling, LossScaling) or isinstance(method, LossScaled):
            return method
        return LossScaled(method, self.loss_scaling)


def as_precision(precision: Any) -> Autocast | None:
    """``solve(precision=...)``: ``None``, ``"bf16"`` / ``"fp16"`` (or ``"bfloat16"`` / ``"float16"``,
    the torch dtypes), or an :class:`Autocast`."""
    if precision is None or isinstance(precision, Autocast):
        return precision
    if isinstance(precision, torch.dtype) and precision in PRECISIONS.values():
        return Autocast(precision)
    if isinstance(precision, str) and precision in PRECISIONS:
        return Autocast(PRECISIONS[precision])
    raise ValueError(f"solve(precision={precision!r}) must be None, 'bf16', 'fp16' or a bilevel.precision.Autocast")
