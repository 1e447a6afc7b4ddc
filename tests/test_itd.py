import pytest
import torch

import bilevel as bl
from bilevel.problems import T1, T2, T1g
from helpers import BAD_STEP_SIZES, RecordDirection, assert_rejects_step_size
from helpers import relative_error as _rel

F64 = torch.float64


def _t1g(n=6, seed=0):
    problem = T1g(n=n, seed=seed)
    x = {"x": torch.randn(n, generator=torch.Generator().manual_seed(10 + seed), dtype=F64)}
    lam_max = float(torch.linalg.eigvalsh(problem.metadata["A"]).max())
    return problem, x, lam_max


def _direction(problem, method, x, y0):
    state = method.init(problem, x, y0)
    new, info = method.step(problem, state)
    return new.opt["d"]["x"], new, info


def _unrolled_direction(problem, x, y0, beta, T, K=None, mu=0.0, beta_u=None):
    """Closed form on T1g of d/dx f(x, y_T(x)) for y ← y − [(1−μ)β ∇_y g + μ β_u ∇_y f] (last K steps differentiated)."""
    A, B, D, x_hat = (problem.metadata[k] for k in ("A", "B", "D", "x_hat"))
    beta_u = beta if beta_u is None else beta_u
    K = T if K is None else K
    n = A.shape[0]
    P = torch.eye(n, dtype=F64) - ((1 - mu) * beta + mu * beta_u) * A
    c = (1 - mu) * beta
    y = y0
    for _ in range(T):
        y = P @ y + c * B.T @ x
    dy_dx = c * sum(torch.linalg.matrix_power(P, t) for t in range(K)) @ B.T  # ∂y_T/∂x
    return D @ (x - x_hat) + dy_dx.T @ (A @ y), y


def test_itd_with_many_lower_steps_gives_the_exact_t1g_hypergradient():
    problem, x, lam = _t1g()
    method = bl.ITD(lr_upper=RecordDirection(), lr_lower=1.0 / lam, lower_steps=60, warm_start=False)
    d, new, info = _direction(problem, method, x, problem.y_init)
    err = _rel(d, problem.hypergradient(x)["x"])
    print(f"\nITD hypergradient relative error on T1g (60 unrolled steps from y_init): {err:.2e}")
    assert err <= 1e-6
    assert float(info["lower_grad_sq"]) <= 1e-20
    assert torch.equal(new.extra["unroll"].y_init["y"], problem.y_init["y"])  # the typed UnrollState


@pytest.mark.parametrize("T, K", [(1, None), (3, None), (5, 2)])
def test_itd_direction_is_the_derivative_of_the_unrolled_map(T, K):
    problem, x, _lam = _t1g()
    beta = 0.4
    y0 = {"y": torch.linspace(-1.0, 2.0, 6, dtype=F64)}
    cls = bl.ITD if K is None else bl.TRHG
    method = cls(lr_upper=RecordDirection(), lr_lower=beta, lower_steps=T, truncate=K)
    d, new, _info = _direction(problem, method, x, y0)
    expected, y_T = _unrolled_direction(problem, x["x"], y0["y"], beta, T, K)
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.y["y"], y_T, rtol=1e-12, atol=1e-12)
    # the truncated derivative differs from the full one
    if K is not None:
        full, _ = _unrolled_direction(problem, x["x"], y0["y"], beta, T)
        assert _rel(d, full) > 1e-3


def test_bda_direction_is_the_derivative_of_the_aggregated_unrolled_map():
    problem, x, _lam = _t1g()
    y0 = {"y": torch.linspace(-1.0, 2.0, 6, dtype=F64)}
    beta, beta_u, mu, T = 0.4, 0.2, 0.3, 4
    method = bl.BDA(lr_upper=RecordDirection(), lr_lower=beta, lower_steps=T, mu=mu, lr_lower_upper=beta_u)
    d, new, _ = _direction(problem, method, x, y0)
    expected, y_T = _unrolled_direction(problem, x["x"], y0["y"], beta, T, mu=mu, beta_u=beta_u)
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.y["y"], y_T, rtol=1e-12, atol=1e-12)


def test_itd_converges_to_the_solution_of_t1():
    result = bl.solve(T1(n=4), bl.ITD(lr_upper=0.5, lr_lower=0.5, lower_steps=30), max_iters=20)
    assert float((result.x["x"] - 0.5).abs().max()) <= 1e-6


def test_trhg_converges_to_the_solution_of_t1():
    result = bl.solve(T1(n=4), bl.TRHG(lr_upper=0.5, lr_lower=0.5, lower_steps=40), max_iters=30)
    assert float((result.x["x"] - 0.5).abs().max()) <= 1e-6


def test_trhg_truncation_bias_on_t1_is_the_predicted_one():
    # Differentiating K of the steps y ← y − ½(y − x) gives ∂y_T/∂x = 1 − 2^{−K}: x = 1/(2 − 2^{−K}).
    assert bl.TRHG(lower_steps=40).differentiated_steps() == 20
    assert bl.TRHG(lower_steps=40).replace(lower_steps=10).differentiated_steps() == 5
    result = bl.solve(T1(n=3), bl.TRHG(lr_upper=0.5, lr_lower=0.5, lower_steps=40, truncate=3), max_iters=30)
    assert float((result.x["x"] - 1 / (2 - 2**-3)).abs().max()) <= 1e-9


def test_bda_with_vanishing_aggregation_converges_to_the_solution_of_t1():
    method = bl.BDA(lr_upper=0.5, lr_lower=0.5, lower_steps=30, mu=bl.Exponential(0.5, 0.5))
    result = bl.solve(T1(n=4), method, max_iters=30)
    assert float((result.x["x"] - 0.5).abs().max()) <= 1e-6


def test_bda_with_constant_aggregation_has_the_predicted_bias_on_t1():
    # Constant μ: y_T → (1 − μ) x, so Φ_μ(x) = ½(1 − μ)²x² + ½(x − 1)², minimised at 1/(1 + (1 − μ)²).
    mu = 0.1
    result = bl.solve(T1(n=3), bl.BDA(lr_upper=0.5, lr_lower=0.5, lower_steps=30, mu=mu), max_iters=20)
    assert float((result.x["x"] - 1 / (1 + (1 - mu) ** 2)).abs().max()) <= 1e-8


def test_itd_on_t2_stops_at_the_lower_only_limit():
    problem = T2(n=4)
    result = bl.solve(problem, bl.ITD(lr_upper=0.5, lr_lower=0.5, lower_steps=30), max_iters=20)
    assert float((result.x["x"] - 0.505).abs().max()) <= 1e-6
    assert torch.equal(result.y["y2"], problem.y_init["y2"])


def test_bda_on_t2_moves_toward_the_optimistic_solution():
    problem = T2(n=4)
    bda = bl.solve(problem, bl.BDA(lr_upper=0.9, lr_lower=0.5, lower_steps=10, mu=0.5), max_iters=20)
    itd = bl.solve(problem, bl.ITD(lr_upper=0.5, lr_lower=0.5, lower_steps=10), max_iters=20)
    assert float(bda.x["x"].min()) > 0.9
    assert float((itd.x["x"] - 0.505).abs().max()) <= 1e-3
    assert float(problem.f(bda.x, bda.y)) < float(problem.f(itd.x, itd.y))


def test_warm_started_one_step_itd_converges_to_the_wrong_point_on_t1():
    # With y_{k+1} = y_k − β(y_k − x_k) and one differentiated step, ∂y/∂x = β: x → 1/(1 + β).
    method = bl.ITD(lr_upper=0.5, lr_lower=0.2, lower_steps=1, warm_start=True)
    result = bl.solve(T1(n=3), method, max_iters=100)
    assert float((result.x["x"] - 1 / 1.2).abs().max()) <= 1e-8
    assert float((result.y["y"] - 1 / 1.2).abs().max()) <= 1e-8
    assert result.state.extra["unroll"] == bl.parts.EmptyState()  # nothing kept when warm


def test_configuration_errors():
    with pytest.raises(ValueError, match=r"truncate=5\) cannot exceed lower_steps=3"):
        bl.ITD(lower_steps=3, truncate=5)
    with pytest.raises(ValueError, match="truncate"):
        bl.ITD(lower_steps=3, truncate=0)
    with pytest.raises(ValueError, match="steps"):
        bl.ITD(lower_steps=0)
    with pytest.raises(ValueError, match="lr"):
        bl.BDA(lr_lower=-1.0)
    with pytest.raises(ValueError, match="mu"):
        bl.BDA(mu=-0.5)


@pytest.mark.parametrize("field", ["lr_upper", "lr_lower"])
@pytest.mark.parametrize("value, shown", BAD_STEP_SIZES)
def test_step_sizes_reject_zero_negative_nonfinite_and_non_numbers(field, value, shown):
    """Every step size fails at construction with one line naming the class, the argument and the value."""
    assert_rejects_step_size(bl.ITD, field, value, shown)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lower_steps": -1}, r"^ITD\(lower_steps=-1\) must be an integer >= 1$"),
        ({"truncate": 0}, r"^ITD\(truncate=0\) must be an integer >= 1$"),
        ({"warm_start": "no"}, r"^ITD\(warm_start='no'\) must be true or false, not a str$"),
    ],
)
def test_other_options_are_validated_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bl.ITD(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mu": 1.0}, r"^BDA\(mu=1.0\) must be a finite number in \[0, 1\)$"),
        ({"mu": "0.1"}, r"^BDA\(mu='0.1'\) must be a finite number in \[0, 1\), not a str$"),
        ({"lr_lower_upper": 0.0}, r"^BDA\(lr_lower_upper=0.0\) must be a positive number"),
        ({"lr_lower": float("inf")}, r"^BDA\(lr_lower=inf\) must be a positive number"),
        ({"lower_steps": 0}, r"^BDA\(lower_steps=0\) must be an integer >= 1$"),
    ],
)
def test_bda_options_are_validated_naming_bda(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bl.BDA(**kwargs)
