"""The shared argument checks of bilevel.validation: one line naming owner, argument, value and expectation."""

import math

import numpy as np
import pytest

import bilevel as bl
from bilevel.validation import (
    ArgumentTypeError,
    check_bool,
    check_choice,
    check_count,
    check_fraction,
    check_int_range,
    check_nonnegative,
    check_positive,
    check_step_size,
)


@pytest.mark.parametrize("value", [1e-3, 1, 2.5, np.float64(0.1), np.float32(0.5), np.int64(3)])
def test_check_positive_accepts_numbers(value):
    assert check_positive("Adam", "lr", value) is value


@pytest.mark.parametrize(
    "value, error, match",
    [
        (0.0, ValueError, r"^Adam\(lr=0.0\) must be a positive number \(finite and > 0\)$"),
        (-2e-4, ValueError, r"^Adam\(lr=-0.0002\) must be a positive number"),
        (math.inf, ValueError, r"^Adam\(lr=inf\) must be a positive number"),
        (math.nan, ValueError, r"^Adam\(lr=nan\) must be a positive number"),
        (True, ArgumentTypeError, r"^Adam\(lr=True\) must be a positive number \(finite and > 0\), not a bool$"),
        ("1e-3", ArgumentTypeError, r"^Adam\(lr='1e-3'\) must be a positive number \(finite and > 0\), not a str$"),
        (None, ArgumentTypeError, r"Adam\(lr=None\).*not a NoneType"),
        ([1, 2], ArgumentTypeError, r"Adam\(lr=\[1, 2\]\).*not a list"),
    ],
)
def test_check_positive_rejects(value, error, match):
    with pytest.raises(error, match=match):
        check_positive("Adam", "lr", value)


def test_type_errors_are_both_type_and_value_errors():
    with pytest.raises(TypeError):
        check_positive("X", "lr", "abc")
    with pytest.raises(ValueError):
        check_positive("X", "lr", "abc")


def test_check_nonnegative():
    assert check_nonnegative("solve", "tol", 0.0) == 0.0
    assert check_nonnegative("solve", "max_time", math.inf, allow_inf=True) == math.inf
    assert check_nonnegative("solve", "max_time", None, allow_none=True) is None
    with pytest.raises(ValueError, match=r"^solve\(tol=-1e-06\) must be a number >= 0 \(finite\)$"):
        check_nonnegative("solve", "tol", -1e-6)
    with pytest.raises(ValueError, match=r"solve\(tol=inf\)"):
        check_nonnegative("solve", "tol", math.inf)
    with pytest.raises(ValueError, match=r"solve\(max_time=nan\) must be a number >= 0 \(inf for no limit\)"):
        check_nonnegative("solve", "max_time", math.nan, allow_inf=True)


def test_check_fraction():
    assert check_fraction("SGD", "momentum", 0.0) == 0.0
    with pytest.raises(ValueError, match=r"SGD\(momentum=1.0\) must be a finite number in \[0, 1\)"):
        check_fraction("SGD", "momentum", 1.0)
    with pytest.raises(ValueError, match=r"BAGDC\(lower_mu=0.0\) must be a finite number in \(0, 1\)"):
        check_fraction("BAGDC", "lower_mu", 0.0, low_open=True)


def test_check_count_and_int_range():
    assert check_count("CG", "steps", 3) == 3
    assert check_count("CG", "steps", np.int64(3)) == 3
    assert check_count("solve", "checkpoint_every", 0, minimum=0) == 0
    with pytest.raises(ValueError, match=r"^CG\(steps=0\) must be an integer >= 1$"):
        check_count("CG", "steps", 0)
    with pytest.raises(ArgumentTypeError, match=r"CG\(steps=2.0\) must be an integer >= 1, not a float"):
        check_count("CG", "steps", 2.0)
    with pytest.raises(ArgumentTypeError, match=r"CG\(steps=True\).*not a bool"):
        check_count("CG", "steps", True)
    with pytest.raises(ValueError, match=r"^run.seed=100000000000000000000 must be an integer in \[0, 2\*\*32\)$"):
        check_int_range("", "run.seed", 10**20, 0, 2**32)
    with pytest.raises(ValueError, match=r"run.seed=-1 must be an integer in \[0, 2\*\*32\)"):
        check_int_range("", "run.seed", -1, 0, 2**32)


def test_check_choice_and_bool():
    assert check_choice("solve", "stop_on", "upper", ("upper", "lower")) == "upper"
    with pytest.raises(ValueError, match=r"^solve\(stop_on='uper'\) must be one of 'upper', 'lower'$"):
        check_choice("solve", "stop_on", "uper", ("upper", "lower"))
    with pytest.raises(ValueError, match="must be one of 1, 2"):
        check_choice("X", "k", True, (1, 2))  # True == 1, but a bool is not the choice 1
    assert check_bool("", "run.progress", False) is False
    with pytest.raises(ArgumentTypeError, match=r"^run.progress='yes' must be true or false, not a str$"):
        check_bool("", "run.progress", "yes")


def test_check_step_size():
    assert check_step_size("SGD", "lr", 0.1) == 0.1
    fn = lambda k: 1.0 / (k + 1)
    assert check_step_size("SGD", "lr", fn) is fn
    schedule = bl.Polynomial(0.5, 1.0)
    assert check_step_size("SGD", "lr", schedule) is schedule
    with pytest.raises(ValueError, match=r"SGD\(lr=Polynomial\(value=0.0.*gives step 0.0 at k = 0"):
        check_step_size("SGD", "lr", bl.Polynomial(0.0, 1.0))
    with pytest.raises(ArgumentTypeError, match=r"SGD\(lr='abc'\) must be a positive number \(finite and > 0\) or a schedule"):
        check_step_size("SGD", "lr", "abc")
    with pytest.raises(ValueError, match=r"SGD\(lr=0\) must be a positive number"):
        check_step_size("SGD", "lr", 0)
