import math

import pytest

import bilevel as bl
from bilevel.schedules import BAMM_STRATEGIES, as_schedule


def test_constant():
    c = bl.Constant(0.3)
    assert [c(k) for k in (0, 1, 100)] == [0.3, 0.3, 0.3]


def test_polynomial_values():
    p = bl.Polynomial(2.0, 0.5)
    assert p(0) == 2.0
    assert p(3) == pytest.approx(2.0 / 2.0, rel=1e-15)
    assert p(8) == pytest.approx(2.0 / 3.0, rel=1e-15)
    shifted = bl.Polynomial(1.0, 2.0, shift=10.0)
    assert shifted(0) == pytest.approx(0.01, rel=1e-15) and shifted(10) == pytest.approx(1 / 400, rel=1e-15)
    assert bl.Polynomial(0.7, 0.0)(123) == 0.7
    with pytest.raises(ValueError, match=r"Polynomial\(shift=0.0\) must be a positive number"):
        bl.Polynomial(1.0, 1.0, shift=0.0)


def test_linear_values():
    s = bl.Linear(1.0, 0.0, steps=4)
    assert [s(k) for k in range(7)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0], abs=1e-15)
    up = bl.Linear(0.1, 0.5, steps=2)
    assert up(1) == pytest.approx(0.3, rel=1e-15) and up(50) == pytest.approx(0.5, rel=1e-15)
    with pytest.raises(ValueError, match=r"Linear\(steps=0\) must be an integer >= 1"):
        bl.Linear(1.0, 0.0, steps=0)


def test_exponential_values():
    e = bl.Exponential(0.5, 0.99)
    assert e(0) == 0.5
    assert e(10) == pytest.approx(0.5 * 0.99**10, rel=1e-15)
    assert e(200) == pytest.approx(0.5 * math.exp(200 * math.log(0.99)), rel=1e-12)


@pytest.mark.parametrize("strategy, qr", [("s1", (7, 2)), ("s2", (5, 1)), ("s3", (3, 0))])
def test_bamm_schedules_follow_the_formulas(strategy, qr):
    q, r = qr
    assert BAMM_STRATEGIES[strategy] == qr
    s, mu0, p, tau = 0.1, 0.9, 10.0, 1 / 40
    mu, alpha, eta = bl.bamm_schedules(s, mu0=mu0, p=p, tau=tau, strategy=strategy)
    for k in (0, 1, 2, 9, 99, 5000):
        mu_k = mu0 * (k + 1) ** (-1 / p)
        assert mu(k) == pytest.approx(mu_k, rel=1e-13)
        assert alpha(k) == pytest.approx(s * (k + 1) ** (-1.5 * tau) * mu_k**q, rel=1e-13)
        assert eta(k) == pytest.approx(s * (k + 1) ** (-tau / 2) * mu_k**r, rel=1e-13)


def test_bamm_schedules_with_other_parameters():
    mu, alpha, eta = bl.bamm_schedules(0.3, mu0=0.5, p=4.0, tau=0.2, strategy="s1")
    k = 7
    mu_k = 0.5 * 8 ** (-0.25)
    assert mu(k) == pytest.approx(mu_k, rel=1e-13)
    assert alpha(k) == pytest.approx(0.3 * 8 ** (-0.3) * mu_k**7, rel=1e-13)
    assert eta(k) == pytest.approx(0.3 * 8 ** (-0.1) * mu_k**2, rel=1e-13)
    # decreasing schedules
    assert mu(100) < mu(10) < mu(0) and alpha(100) < alpha(0) and eta(100) < eta(0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strategy": "s4"}, r"bamm_schedules\(strategy='s4'\) must be one of 's1', 's2', 's3'"),
        ({"mu0": 1.0}, r"bamm_schedules\(mu0=1.0\) must be a finite number in \(0, 1\)"),
        ({"mu0": 0.0}, r"bamm_schedules\(mu0=0.0\)"),
        ({"p": 0.0}, r"bamm_schedules\(p=0.0\) must be a positive number"),
        ({"tau": -0.1}, r"bamm_schedules\(tau=-0.1\) must be a number >= 0"),
        ({"tau": "0.1"}, r"bamm_schedules\(tau='0.1'\) must be a number >= 0 \(finite\), not a str"),
    ],
)
def test_bamm_schedules_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bl.bamm_schedules(0.1, **kwargs)
    with pytest.raises(ValueError, match=r"bamm_schedules\(s=0.0\) must be a positive number"):
        bl.bamm_schedules(0.0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: bl.Constant(float("nan")), r"Constant\(value=nan\) must be a finite number"),
        (lambda: bl.Constant("0.1"), r"Constant\(value='0.1'\) must be a finite number, not a str"),
        (lambda: bl.Polynomial(float("inf"), 1.0), r"Polynomial\(value=inf\)"),
        (lambda: bl.Polynomial(1.0, None), r"Polynomial\(power=None\)"),
        (lambda: bl.Linear(1.0, float("nan"), steps=10), r"Linear\(end=nan\)"),
        (lambda: bl.Linear(1.0, 0.0, steps=2.5), r"Linear\(steps=2.5\) must be an integer >= 1"),
        (lambda: bl.Exponential(1.0, 0.0), r"Exponential\(rate=0.0\) must be a positive number"),
        (lambda: bl.Exponential(1.0, True), r"Exponential\(rate=True\).*not a bool"),
    ],
)
def test_schedule_construction_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_as_schedule_accepts_numbers_and_callables():
    c = as_schedule(3)
    assert isinstance(c, bl.Constant) and c(5) == 3.0 and isinstance(c(5), float)
    assert as_schedule(0.0)(1) == 0.0
    fn = lambda k: 1.0 / (k + 1)
    assert as_schedule(fn) is fn


@pytest.mark.parametrize(
    "value, error, match",
    [
        (True, TypeError, "got a bool"),
        (-0.1, ValueError, r"lr=-0.1 must be a finite number >= 0"),
        (float("nan"), ValueError, "finite"),
        (float("inf"), ValueError, "finite"),
        ("0.1", TypeError, "got str"),
        (None, TypeError, "got NoneType"),
    ],
)
def test_as_schedule_errors(value, error, match):
    with pytest.raises(error, match=match):
        as_schedule(value, "lr")
