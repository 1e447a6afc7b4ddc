"""Argument checks shared by the library: step sizes, counts, ranges and choices.

Every check takes the ``owner`` (the class or function being configured, e.g.
``"GALET"`` or ``"solve"``), the argument ``name`` and its ``value``, and raises one
line that names all three and what is expected::

    >>> check_positive("Adam", "lr", 0.0)
    Traceback (most recent call last):
    ...
    ValueError: Adam(lr=0.0) must be a positive number (finite and > 0)

With ``owner=""`` the label is ``name=value`` (e.g. ``run.seed=1e+20``), which is how
the experiment configuration names its keys.

A value of the wrong type (a string, a bool, a list where a number is expected) raises
:class:`ArgumentTypeError`, which is both a ``TypeError`` and a ``ValueError`` so that
callers catching either see it; a number out of range raises ``ValueError``. Each
check returns the value unchanged, so ``x = check_count("CG", "steps", steps)`` reads
naturally. ``allow_none=True`` accepts ``None`` (an optional argument left unset).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable
from typing import Any

__all__ = [
    "ArgumentTypeError",
    "InsufficientMemoryError",
    "available_memory",
    "check_bool",
    "check_choice",
    "check_count",
    "check_fraction",
    "check_int_range",
    "check_memory",
    "check_nonnegative",
    "check_number",
    "check_positive",
    "check_step_size",
    "describe",
    "format_bytes",
    "is_number",
]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (e.g. ``lr='abc'``, ``steps=True``).

    Subclasses both ``TypeError`` and ``ValueError``: code that catches either
    (``except ValueError``) handles it.
    """


def describe(owner: str, name: str, value: Any) -> str:
    """The label of an argument in messages: ``Owner(name=value)``, or ``name=value`` without owner."""
    return f"{owner}({name}={value!r})" if owner else f"{name}={value!r}"


def is_number(value: Any) -> bool:
    """A real number (``int``, ``float``, NumPy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a bool"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


def check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
    allow_none: bool = False,
    expected: str | None = None,
) -> Any:
    """A real number, finite unless ``finite=False``, within ``[low, high]``.

    ``low_open``/``high_open`` make the bound strict. NaN is always rejected.
    ``expected`` replaces the generated description (``"a number in [0, 1)"``) in
    the message.
    """
    if value is None and allow_none:
        return value
    if expected is None:
        expected = _range_text(low, high, low_open, high_open, finite)
    label = describe(owner, name, value)
    if not is_number(value):
        raise ArgumentTypeError(f"{label} must be {expected}, not {_type_name(value)}")
    number = float(value)
    bad = math.isnan(number) or (finite and math.isinf(number))
    if low is not None:
        bad = bad or (number <= low if low_open else number < low)
    if high is not None:
        bad = bad or (number >= high if high_open else number > high)
    if bad:
        raise ValueError(f"{label} must be {expected}")
    return value


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool, finite: bool) -> str:
    kind = "a finite number" if finite else "a number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high:g}"
    return kind


def check_positive(owner: str, name: str, value: Any, *, allow_none: bool = False) -> Any:
    """A finite number > 0: step sizes, learning rates, tolerances that must act.

    Rejects 0, negatives, ``inf``, ``nan``, bools and non-numbers.
    """
    return check_number(owner, name, value, low=0.0, low_open=True, allow_none=allow_none, expected="a positive number (finite and > 0)")


def check_nonnegative(owner: str, name: str, value: Any, *, allow_inf: bool = False, allow_none: bool = False) -> Any:
    """A number >= 0 (e.g. ``tol``, ``max_time``, ``reg``); ``allow_inf=True`` accepts ``inf`` ("no limit")."""
    expected = "a number >= 0" + (" (inf for no limit)" if allow_inf else " (finite)")
    return check_number(owner, name, value, low=0.0, finite=not allow_inf, allow_none=allow_none, expected=expected)


def check_fraction(owner: str, name: str, value: Any, *, low_open: bool = False, high_open: bool = True, allow_none: bool = False) -> Any:
    """A number in ``[0, 1)`` by default (weights, momenta, rates); the ends' openness is configurable."""
    return check_number(owner, name, value, low=0.0, high=1.0, low_open=low_open, high_open=high_open, allow_none=allow_none)


def check_count(owner: str, name: str, value: Any, minimum: int = 1, *, allow_none: bool = False) -> Any:
    """An integer (not a bool, not a float such as ``2.0``) >= ``minimum``."""
    return check_int_range(owner, name, value, minimum, None, allow_none=allow_none)


def check_int_range(
    owner: str,
    name: str,
    value: Any,
    low: int | None = None,
    high: int | None = None,
    *,
    allow_none: bool = False,
    expected: str | None = None,
) -> Any:
    """An integer in ``[low, high)`` (``high`` exclusive; either bound may be ``None``)."""
    if value is None and allow_none:
        return value
    if expected is None:
        if low is not None and high is not None:
            expected = f"an integer in [{low}, {_int_text(high)})"
        elif low is not None:
            expected = f"an integer >= {low}"
        elif high is not None:
            expected = f"an integer < {_int_text(high)}"
        else:
            expected = "an integer"
    label = describe(owner, name, value)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ArgumentTypeError(f"{label} must be {expected}, not {_type_name(value)}")
    if (low is not None and int(value) < low) or (high is not None and int(value) >= high):
        raise ValueError(f"{label} must be {expected}")
    return value


def _int_text(n: int) -> str:
    if n > 1 and n & (n - 1) == 0 and n >= 1024:
        return f"2**{n.bit_length() - 1}"
    return str(n)


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of ``choices``; the message lists them."""
    choices = tuple(choices)
    ok = any(type(c) is type(value) and c == value for c in choices)
    if not ok:
        raise ValueError(f"{describe(owner, name, value)} must be one of {', '.join(repr(c) for c in choices)}")
    return value


def check_bool(owner: str, name: str, value: Any, *, allow_none: bool = False) -> Any:
    """``True`` or ``False`` (not 0/1, not the string ``'true'``)."""
    if value is None and allow_none:
        return value
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{describe(owner, name, value)} must be true or false, not {_type_name(value)}")
    return value


def check_step_size(owner: str, name: str, value: Any) -> Any:
    """A step size: a positive finite number, or a schedule (a callable ``k -> float``).

    The library's schedules (:mod:`bilevel.schedules`) are evaluated at ``k = 0`` and
    must give a positive finite step there; other callables are accepted as they are
    (they are only called while the method runs).
    """
    if callable(value) and not is_number(value):
        from . import schedules

        if isinstance(value, (schedules.Constant, schedules.Polynomial, schedules.Linear, schedules.Exponential)):
            first = value(0)
            if not (is_number(first) and math.isfinite(first) and first > 0):
                raise ValueError(f"{describe(owner, name, value)} gives step {first!r} at k = 0: a step size must be positive and finite")
        return value
    if not is_number(value):
        raise ArgumentTypeError(
            f"{describe(owner, name, value)} must be a positive number (finite and > 0) or a schedule (callable k -> float), "
            f"not {_type_name(value)}"
        )
    return check_positive(owner, name, value)


class InsufficientMemoryError(MemoryError, ValueError):
    """An allocation estimated beforehand does not fit in the available memory.

    Both a ``MemoryError`` and a ``ValueError`` (so command-line tools that report bad
    arguments as one line report this one too).
    """


def available_memory() -> int | None:
    """Bytes of host memory available for new allocations, or ``None`` when unknown.

    ``MemAvailable`` of ``/proc/meminfo`` (Linux), else the free physical pages
    (``os.sysconf``); ``None`` where neither can be read, and then no check refuses.
    """
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def format_bytes(count: float) -> str:
    """``12.5 GB``, ``376.3 MB``, ``512 B``: a byte count in decimal units."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def check_memory(what: str, needed: int, advice: str) -> None:
    """Refuse, before allocating, when ``needed`` bytes exceed the available memory.

    Raises :class:`InsufficientMemoryError` with one line: ``{what} needs about N GB
    but only M GB of memory is available: {advice}``. Does nothing when the available
    memory cannot be read.
    """
    available = available_memory()
    if available is None or needed <= available:
        return
    raise InsufficientMemoryError(
        f"{what} needs about {format_bytes(needed)} but only {format_bytes(available)} of memory is available: {advice}"
    )
