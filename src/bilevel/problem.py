"""The bilevel problem: an upper objective ``f`` and a lower objective ``g``.

    min_x  f(x, y)   s.t.   y ∈ argmin_y g(x, y)

``f`` (upper level, UL) and ``g`` (lower level, LL) are plain Python callables
``(x, y, batch) -> 0-d tensor`` over pytrees of tensors (usually dicts of named
tensors). ``batch`` is whatever the user's losses need (``None`` for deterministic
problems); the same object is passed to both.

The papers of Liu et al. write ``F`` for the upper and ``f`` for the lower level; this
library always writes ``f`` = upper, ``g`` = lower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from . import tree as T
from .tree import Tree

Objective = Callable[[Any, Any, Any], torch.Tensor]

__all__ = ["Objective", "Problem", "check_scalar_loss", "check_variables"]


class _ModuleParts:
    """How ``module`` is called functionally: its trainable parameters (the variable), its
    frozen parameters and buffers (constants, the module's own tensors, never written), and
    the running statistics of its normalisation layers."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        # named_parameters lists a tied parameter once, under its first name; functional_call
        # (tie_weights=True) makes every alias follow it
        named = list(module.named_parameters())
        self.trainable = [k for k, p in named if p.requires_grad]
        self.frozen = {k: p.detach() for k, p in named if not p.requires_grad}
        self.buffers = {k: b.detach() for k, b in module.named_buffers()}
        self.norms = [
            (sub, [f"{prefix}.{b}" if prefix else b for b in ("running_mean", "running_var", "num_batches_tracked")])
            for prefix, sub in module.named_modules()
            if isinstance(sub, torch.nn.modules.batchnorm._NormBase) and sub.track_running_stats
        ]

    def initial(self) -> dict[str, torch.Tensor]:
        """Detached copies of the trainable parameters (the starting point)."""
        params = dict(self.module.named_parameters())
        return {k: params[k].detach().clone() for k in self.trainable}

    def constants(self) -> dict[str, torch.Tensor | None]:
        """Frozen parameters and buffers for one call, following the module's training/evaluation mode now:
        a normalisation layer in training mode gets no running statistics (batch statistics,
        nothing updated in place: pure, so every derivative and ``torch.func`` transform
        applies); in evaluation mode it uses its running statistics."""
        constants: dict[str, torch.Tensor | None] = {**self.buffers, **self.frozen}
        for sub, names in self.norms:
            if sub.training:
                constants.update(dict.fromkeys(names))
        return constants


class _Bound:
    """``module`` called functionally with ``params`` (and its constants); ``.params`` holds them."""

    def __init__(self, parts: _ModuleParts, params: dict[str, torch.Tensor]):
        self.parts, self.params = parts, params
        self.module = parts.module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        values: dict[str, Any] = {**self.parts.constants(), **self.params}  # a None statistic: batch statistics
        return torch.func.functional_call(self.module, values, args, kwargs)


def _describe_leaf_path(path: Sequence[Any]) -> str:
    return "".join(str(k) for k in path) or "<tensor>"


def check_variables(name: str, value: Any) -> None:
    """Check that ``value`` is a non-empty pytree of finite floating-point tensors.

    Raises ``TypeError`` for non-tensors or integer tensors, ``ValueError`` for empty
    trees, tensors on the ``meta`` device (shapes without data), mixed devices and
    NaN/Inf entries; every message names the offending leaf.
    """
    if value is None:
        raise TypeError(f"{name} is None: give a tensor or a dict of tensors, e.g. {name}={{'w': torch.zeros(10)}}")
    flat, _ = pytree.tree_flatten_with_path(value)
    if not flat:
        raise ValueError(f"{name} holds no tensor: give a tensor or a dict of tensors")
    devices = set()
    for path, leaf in flat:
        where = f"{name}{_describe_leaf_path(path)}" if path else name
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{where} is a {type(leaf).__name__}, not a tensor: bilevel variables must be "
                f"tensors or dicts/lists/tuples of tensors (convert with torch.as_tensor)"
            )
        if not leaf.is_floating_point():
            raise TypeError(
                f"{where} has dtype {leaf.dtype}: bilevel variables must be floating point "
                f"(use .float() or .double(); float64 for verification)"
            )
        if leaf.device.type == "meta":
            raise ValueError(
                f"{where} is on the meta device (no data): materialise it, e.g. with "
                f"torch.empty_like(..., device='cpu') / module.to_empty(device=...), then initialise it"
            )
        if not bool(torch.isfinite(leaf).all()):
            bad = int((~torch.isfinite(leaf)).sum())
            raise ValueError(f"{where} contains {bad} NaN/Inf entries: start from a finite point")
        devices.add(leaf.device)
    if len(devices) > 1:
        raise ValueError(f"{name} has tensors on several devices {sorted(map(str, devices))}: move them to one device")


def check_scalar_loss(which: str, value: Any) -> torch.Tensor:
    """Check that an objective returned a finite 0-d floating tensor; return it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"the {which} objective returned a {type(value).__name__}, not a tensor: return a 0-d torch tensor")
    if value.dim() != 0:
        raise ValueError(
            f"the {which} objective returned a tensor of shape {tuple(value.shape)}, not a scalar: "
            f"reduce it with .mean() or .sum() so that it returns a 0-d tensor"
        )
    if not value.is_floating_point():
        raise TypeError(f"the {which} objective returned dtype {value.dtype}: it must be floating point")
    if not bool(torch.isfinite(value)):
        raise ValueError(f"the {which} objective is {value.item()} at the initial point: start from a point where it is finite")
    return value


@dataclass(frozen=True)
class Problem:
    """A bilevel problem ``min_x f(x, y) s.t. y ∈ argmin_y g(x, y)``.

    Args:
        upper: ``f(x, y, batch) -> 0-d tensor``, the upper-level objective.
        lower: ``g(x, y, batch) -> 0-d tensor``, the lower-level objective.
        x_init: optional default starting point for ``x`` (used by :func:`bilevel.solve`
            when no ``x0`` is given).
        y_init: optional default starting point for ``y``.
        name: a label used in logs and tables.

    Example:
        >>> import torch, bilevel as bl
        >>> f = lambda x, y, b: 0.5 * (y["y"] ** 2).sum() + 0.5 * ((x["x"] - 1) ** 2).sum()
        >>> g = lambda x, y, b: 0.5 * (y["y"] ** 2).sum() - (x["x"] * y["y"]).sum()
        >>> problem = bl.Problem(upper=f, lower=g)
        >>> problem.validate({"x": torch.zeros(3)}, {"y": torch.zeros(3)})   # (f, g) at the point
        (tensor(1.5000), tensor(0.))
    """

    upper: Objective
    lower: Objective
    x_init: Any = None
    y_init: Any = None
    name: str = "problem"
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for which in ("upper", "lower"):
            if not callable(getattr(self, which)):
                raise TypeError(
                    f"Problem({which}=...) must be a callable (x, y, batch) -> 0-d tensor, got {type(getattr(self, which)).__name__}"
                )

    # -- the two objectives -------------------------------------------------------------
    def f(self, x: Tree, y: Tree, batch: Any = None) -> torch.Tensor:
        """Upper-level objective ``f(x, y)``."""
        return self.upper(x, y, batch)

    def g(self, x: Tree, y: Tree, batch: Any = None) -> torch.Tensor:
        """Lower-level objective ``g(x, y)``."""
        return self.lower(x, y, batch)

    def aggregated(self, mu: float) -> Objective:
        """The averaged objective ``φ_μ(x, y) = μ f(x, y) + (1 − μ) g(x, y)`` (BDA, sl-BAMM)."""
        upper, lower = self.upper, self.lower

        def phi(x: Tree, y: Tree, batch: Any) -> torch.Tensor:
            return mu * upper(x, y, batch) + (1.0 - mu) * lower(x, y, batch)

        return phi

    def initial_point(self, x0: Tree = None, y0: Tree = None) -> tuple[Tree, Tree]:
        """``(x0, y0)`` with the problem's defaults filled in; clear error if missing."""
        x0 = self.x_init if x0 is None else x0
        y0 = self.y_init if y0 is None else y0
        if x0 is None or y0 is None:
            missing = " and ".join(n for n, v in (("x0", x0), ("y0", y0)) if v is None)
            raise ValueError(f"no {missing} given and problem '{self.name}' has no default: pass {missing} to solve()/init()")
        return x0, y0

    # -- validation ---------------------------------------------------------------------
    def validate(self, x: Tree, y: Tree, batch: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluate ``f`` and ``g`` once at ``(x, y)`` and check everything a method relies on.

        Checks: x and y are pytrees of finite floating tensors on one device (not
        ``meta``); both objectives run (an objective that indexes ``batch`` while
        ``batch`` is ``None`` gets a message saying to pass ``data=``) and return
        finite 0-d floating tensors; ``g`` depends on ``y``. Returns ``(f(x, y), g(x, y))``.
        Raises ``TypeError``/``ValueError`` whose message names the problem and the fix.
        """
        check_variables("x", x)
        check_variables("y", y)
        dev_x = T.leaves(x)[0].device
        dev_y = T.leaves(y)[0].device
        if dev_x != dev_y:
            raise ValueError(f"x is on {dev_x} but y is on {dev_y}: put both on the same device")
        values = []
        for which, fn in (("upper", self.upper), ("lower", self.lower)):
            try:
                with torch.enable_grad():
                    y_req = T.tree_map(lambda t: t.detach().requires_grad_(True), y)
                    value = fn(x, y_req, batch)
            except (KeyError, IndexError, RuntimeError, TypeError, AttributeError) as err:
                if batch is None and isinstance(err, (TypeError, AttributeError)) and "NoneType" in str(err):
                    raise TypeError(
                        f"the {which} objective indexes its batch but data=None was given ({err}): pass "
                        f"data=... to solve (a batch, or a source with batch_at(k)) or batch=... to init"
                    ) from err
                raise type(err)(
                    f"calling the {which} objective at the initial point failed ({err}); check that x and y "
                    f"have the structure it expects: x = {T.structure_summary(x)}, y = {T.structure_summary(y)}"
                ) from err
            value = check_scalar_loss(which, value)
            if which == "lower":
                # A lower variable absent from g is legitimate (T2's y2: S(x) is then not a
                # singleton); g independent of every lower variable is almost surely a bug.
                grads = torch.autograd.grad(value, T.leaves(y_req), allow_unused=True) if value.requires_grad else ()
                if all(g is None for g in grads):
                    raise ValueError(
                        "the lower objective g(x, y) does not depend on y at all: compute it from the y it "
                        "receives (a detached copy or a captured module parameter would be ignored)"
                    )
            values.append(value.detach())
        return values[0], values[1]

    # -- construction from modules --------------------------------------------------------
    @classmethod
    def from_modules(
        cls,
        model: torch.nn.Module,
        upper_loss: Callable[[Callable, Any, Any], torch.Tensor],
        lower_loss: Callable[[Callable, Any, Any], torch.Tensor],
        hyper: torch.nn.Module | Mapping[str, torch.Tensor] | None = None,
        name: str = "modules",
    ) -> Problem:
        """Build a problem whose lower variable ``y`` is the parameters of ``model``.

        ``upper_loss(model_fn, hyper_fn, batch)`` and ``lower_loss(model_fn, hyper_fn, batch)``
        receive ``model_fn(*inputs)`` = ``model`` evaluated with the parameters ``y``
        (``torch.func.functional_call``) and ``hyper_fn`` = the hyper-module evaluated with
        the parameters ``x`` when ``hyper`` is a module, or the dict ``x`` itself when
        ``hyper`` is a dict of tensors. ``x_init``/``y_init`` are detached copies of the
        current parameters, so the modules themselves are never modified.

        Modules as users write them:

        * **frozen parameters** (``requires_grad=False``) stay out of ``y`` (and ``x``):
          they are constants, read from the module at every call;
        * **tied parameters** (one ``nn.Parameter`` under several names, e.g. a decoder
          sharing its embedding) are one entry of ``y``, under the first name
          ``named_parameters()`` gives; every alias follows it;
        * **buffers** are the module's own, read at every call and never written, and
          normalisation layers follow the module's training/evaluation mode (``train``/``eval``) *at the time of
          the call*: in training mode BatchNorm normalises with the batch statistics and
          does not update its running statistics (an objective that changed a buffer at
          each of the many evaluations of an iteration would not be a function of
          ``(x, y)``, and ``torch.func`` transforms refuse the in-place update); in
          evaluation mode it uses the running statistics. To refresh them after training,
          run the model once in training mode with the final ``y``:
          ``torch.func.functional_call(model, result.y, inputs)``.

        Example:
            >>> import torch, bilevel as bl
            >>> net = torch.nn.Linear(4, 1)
            >>> hyper = {"log_l2": torch.zeros(())}
            >>> data = {"xt": torch.randn(8, 4), "yt": torch.randn(8, 1), "xv": torch.randn(8, 4), "yv": torch.randn(8, 1)}
            >>> def lower(model, h, b):
            ...     return ((model(b["xt"]) - b["yt"]) ** 2).mean() + h["log_l2"].exp() * (model.params["weight"] ** 2).sum()
            >>> def upper(model, h, b):
            ...     return ((model(b["xv"]) - b["yv"]) ** 2).mean()
            >>> problem = bl.Problem.from_modules(net, upper, lower, hyper=hyper)
            >>> float(problem.g(problem.x_init, problem.y_init, data)) > 0
            True
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"from_modules(model=...) must be a torch.nn.Module, got {type(model).__name__}")
        model_parts = _ModuleParts(model)
        y_init = model_parts.initial()
        if not y_init:
            what = "only frozen parameters (requires_grad=False)" if model_parts.frozen else "no parameters"
            raise ValueError(f"the model has {what}: there is no lower-level variable to optimize; unfreeze the ones y should hold")
        hyper_parts = _ModuleParts(hyper) if isinstance(hyper, torch.nn.Module) else None
        if hyper_parts is not None:
            x_init = hyper_parts.initial()
            if not x_init:
                raise ValueError("the hyper module has no trainable parameters: there is no upper-level variable to optimize")
        elif isinstance(hyper, Mapping):
            x_init = {k: torch.as_tensor(v).detach().clone() for k, v in hyper.items()}
        else:
            raise TypeError("from_modules(hyper=...) must be an nn.Module or a dict of tensors holding the upper-level variables")

        def bind(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> tuple[_Bound, _Bound | dict[str, torch.Tensor]]:
            model_fn = _Bound(model_parts, y)
            if hyper_parts is not None:
                return model_fn, _Bound(hyper_parts, x)
            return model_fn, x

        def upper(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
            model_fn, hyper_fn = bind(x, y)
            return upper_loss(model_fn, hyper_fn, batch)

        def lower(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
            model_fn, hyper_fn = bind(x, y)
            return lower_loss(model_fn, hyper_fn, batch)

        return cls(upper=upper, lower=lower, x_init=x_init, y_init=y_init, name=name)

    def replace(self, **changes: Any) -> Problem:
        """A copy with some fields changed (frozen dataclass)."""
        return dataclasses.replace(self, **changes)
