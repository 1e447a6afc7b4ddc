"""The explicit state of a run, and the typed states of the parts a method is made of.

A method's :class:`State` holds the variables ``x``, ``y``, the multiplier ``v``, the
iteration counter ``k``, the upper optimizer's state ``opt`` and, in ``extra``, the
states of its other parts by role (``"lower"``, ``"multiplier"``, ``"direction"``,
``"unroll"``). Each part state is a ``NamedTuple`` registered with :func:`part_state`,
in the style of optax's ``ScaleByAdamState``: :class:`EmptyState` for a part that keeps
nothing, ``AdamState(m, s)`` for Adam, ``PeriodicState(eta)`` for the periodic dual
step, ``UnrollState(y_init)`` for a cold-started unroll.

Checkpoints hold plain data only (tensors, numbers, strings, dicts, lists, tuples), so
that they load without running code. :meth:`~bilevel.state.State.to_dict` and :meth:`~bilevel.state.State.from_dict`
are the one place where typed part states become plain data and back: a registered
state ``AdamState(m=..., s=...)`` is written as ``{"__part_state__": "AdamState",
"m": ..., "s": ...}`` and rebuilt from the registry by name (nothing else is ever
constructed from a checkpoint). States written by bilevel 0.1 (plain dicts such as
``opt = {"m": ..., "s": ...}`` and ``extra = {"eta": ...}``) are converted on reading
(``from_dict(d, legacy=True)``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .tree import Tree

__all__ = ["STATE_TAG", "EmptyState", "State", "part_state", "registered_states", "states_from_plain", "states_to_plain"]

#: the key that marks a typed part state in plain data
STATE_TAG = "__part_state__"

_REGISTRY: dict[str, type] = {}


def part_state(cls: type) -> type:
    """Register a ``NamedTuple`` class as a part state (a class decorator).

    Registered states can live in a :class:`State` that is checkpointed: they are written
    as plain data tagged with the class name and rebuilt from this registry. Names are
    global: two different classes may not share one. Register a state in the module that
    defines its part, so that importing the part makes its checkpoints readable.
    """
    if not (isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")):
        raise TypeError(f"part_state registers NamedTuple classes, not {cls!r}")
    known = _REGISTRY.get(cls.__name__)
    if known is not None and known is not cls and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"a part state named {cls.__name__!r} is already registered ({known.__module__}.{known.__qualname__})")
    _REGISTRY[cls.__name__] = cls
    return cls


def registered_states() -> dict[str, type]:
    """Name -> class of every registered part state."""
    return dict(_REGISTRY)


@part_state
class EmptyState(NamedTuple):
    """The state of a part that keeps none (plain SGD, a fixed dual step, plain directions)."""


def _is_registered(value: Any) -> bool:
    return isinstance(value, tuple) and _REGISTRY.get(type(value).__name__) is type(value)


def states_to_plain(value: Any) -> Any:
    """``value`` with every registered part state replaced by a tagged dict (recursively)."""
    if _is_registered(value):
        return {STATE_TAG: type(value).__name__, **{name: states_to_plain(item) for name, item in zip(value._fields, value, strict=True)}}
    if type(value) is dict:
        return {key: states_to_plain(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(states_to_plain(item) for item in value)
    return value


def states_from_plain(value: Any) -> Any:
    """The inverse of :func:`states_to_plain`; an unknown tag raises ``ValueError``."""
    if type(value) is dict:
        if STATE_TAG in value:
            name = value[STATE_TAG]
            cls = _REGISTRY.get(name) if isinstance(name, str) else None
            if cls is None:
                raise ValueError(
                    f"unknown part state {name!r}: import the module that defines it before loading (known: {', '.join(sorted(_REGISTRY))})"
                )
            items = {key: states_from_plain(item) for key, item in value.items() if key != STATE_TAG}
            fields: tuple[str, ...] = getattr(cls, "_fields")  # noqa: B009 - a NamedTuple class; `type` has no _fields for mypy
            if set(items) != set(fields):
                raise ValueError(f"part state {name} has fields {sorted(items)}, expected {list(fields)}")
            return cls(**items)
        return {key: states_from_plain(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(states_from_plain(item) for item in value)
    return value


def _legacy_opt(opt: Any) -> Any:
    """bilevel 0.1's optimizer dicts as typed states: ``{}`` → EmptyState, Adam's
    ``{"m", "s"}`` → AdamState, SGD's ``{"momentum"}`` → SGDState; anything else as it is."""
    if type(opt) is not dict:
        return opt
    if not opt:
        return EmptyState()
    keys = set(opt)
    for name, fields in (("AdamState", {"m", "s"}), ("SGDState", {"momentum"})):
        cls = _REGISTRY.get(name)
        if cls is not None and keys == fields:
            return cls(**opt)
    return opt


def _legacy_extra(extra: Any) -> Any:
    """bilevel 0.1's ``extra`` (``{"eta": …}``, ``{"y_init": …}``) as part states by role."""
    if type(extra) is not dict or any(isinstance(item, tuple) or (type(item) is dict and STATE_TAG in item) for item in extra.values()):
        return extra
    out = {key: item for key, item in extra.items() if key not in ("eta", "y_init")}
    if "eta" in extra and "PeriodicState" in _REGISTRY:
        out["multiplier"] = _REGISTRY["PeriodicState"](eta=extra["eta"])
    if "y_init" in extra and "UnrollState" in _REGISTRY:
        out["unroll"] = _REGISTRY["UnrollState"](y_init=extra["y_init"])
    return out


@dataclass(frozen=True)
class State:
    """Explicit state of a bilevel method.

    Attributes:
        x: upper-level variables.
        y: lower-level variables.
        v: the multiplier / adjoint (solves ``H v ≈ ∇_y f``; GALET's ``w = −v``), or
            ``None`` for methods without one.
        opt: the upper optimizer's state (e.g. ``AdamState(m, s)``; whatever the
            optimizer's ``init`` returns).
        k: number of completed iterations.
        extra: the states of the method's other parts, by role (``"lower"``,
            ``"multiplier"``, ``"direction"``, ``"unroll"``), e.g. the stored step of
            BAGDC's periodic line search as ``extra["multiplier"].eta``.
    """

    x: Tree
    y: Tree
    v: Tree | None = None
    opt: Any = field(default_factory=dict)
    k: int = 0
    extra: dict = field(default_factory=dict)

    def replace(self, **changes: Any) -> State:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain nested data (for ``torch.save`` with ``weights_only=True``): typed part
        states become tagged dicts (see the module docstring)."""
        return {
            "x": self.x,
            "y": self.y,
            "v": self.v,
            "opt": states_to_plain(self.opt),
            "k": self.k,
            "extra": states_to_plain(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict, legacy: bool = False) -> State:
        """The inverse of :meth:`to_dict`. ``legacy=True`` reads the untyped dicts of
        bilevel 0.1 (checkpoint formats 1 and 2)."""
        opt, extra = states_from_plain(d["opt"]), states_from_plain(d.get("extra", {}))
        if legacy:
            opt, extra = _legacy_opt(opt), _legacy_extra(extra)
        return cls(x=d["x"], y=d["y"], v=d["v"], opt=opt, k=int(d["k"]), extra=extra)
