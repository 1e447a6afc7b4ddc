"""The finite-sum quadratic: its closed forms against autograd, its sums against its samples."""

import pytest
import torch

import bilevel as bl

F64 = torch.float64


@pytest.fixture(scope="module")
def problem():
    return bl.problems.finite_sum_quadratic(n_lower=48, n_upper=40, dim_x=3, dim_y=5, seed=7)


def test_the_full_objectives_are_the_means_of_the_samples(problem):
    gen = torch.Generator().manual_seed(0)
    x, y = {"x": torch.randn(3, generator=gen, dtype=F64)}, {"y": torch.randn(5, generator=gen, dtype=F64)}
    assert torch.allclose(problem.lower(x, y, None), problem.lower(x, y, problem.lower_data), atol=1e-12)
    assert torch.allclose(problem.upper(x, y, None), problem.upper(x, y, problem.upper_data), atol=1e-12)
    # a batch of one sample is that sample's quadratic
    u, c, e, a = (t[:1] for t in problem.lower_data)
    expected = 0.5 * (u[0] @ y["y"]) ** 2 + (c[0] @ x["x"]) * (e[0] @ y["y"]) + a[0] @ y["y"]
    assert torch.allclose(problem.lower(x, y, (u, c, e, a)), expected)


def test_y_star_v_star_and_the_hypergradient_against_autograd(problem):
    gen = torch.Generator().manual_seed(1)
    x = {"x": torch.randn(3, generator=gen, dtype=F64)}
    y = problem.y_of(x)
    grad_y_g, _ = bl.Oracles().gradient_y(problem.lower, x, y, None)
    assert grad_y_g["y"].norm() < 1e-12  # y*(x) is the lower minimiser
    # ∇F from autograd of the value function F(x) = f(x, y*(x)) (y* differentiable in x)
    xr = x["x"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(problem.value_function({"x": xr}), xr)
    assert torch.allclose(problem.hypergradient(x)["x"], grad, atol=1e-12)
    # v* solves H v = ∇_y f
    point = bl.Oracles().linearize(problem.lower, x, y, None)
    _, grad_y_f, _ = bl.Oracles().gradients(problem.upper, x, y, None)
    assert torch.allclose(point.hvp(problem.multiplier(x))["y"], grad_y_f["y"], atol=1e-12)


def test_x_star_is_the_stationary_point_and_the_value_function_is_strongly_convex(problem):
    assert problem.suboptimality(problem.x_star) < 1e-24
    m = problem.means
    M = -torch.linalg.solve(m["A"], m["C"].T)
    H = M.T @ m["P"] @ M + m["Q"] + m["D"] @ M + M.T @ m["D"].T
    assert torch.linalg.eigvalsh(0.5 * (H + H.T)).min() > 0
    assert torch.allclose(problem.y_star["y"], problem.y_of(problem.x_star)["y"])


def test_streams_are_over_the_samples_and_float32_follows_dtype():
    p = bl.problems.finite_sum_quadratic(n_lower=64, n_upper=32, dim_x=2, dim_y=2, seed=0, dtype=torch.float32)
    streams = p.streams(batch_size=16, seed=2)
    assert streams.samples == (32, 64) and streams.lower.n_blocks == 4 and streams.upper.n_blocks == 2
    assert p.x_init["x"].dtype == torch.float32 and streams.batch_at(0).lower(0)[0].dtype == torch.float32


def test_bad_arguments_fail_with_one_line():
    with pytest.raises(ValueError, match="mu"):
        bl.problems.finite_sum_quadratic(mu=2.0)
    with pytest.raises(ValueError, match="n_lower"):
        bl.problems.finite_sum_quadratic(n_lower=0)
