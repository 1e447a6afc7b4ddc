import pytest
import torch

import bilevel as bl
from bilevel import tree as T
from bilevel.problems import T1, T2, T3, T3_LOCAL_MINIMA, T4, T1g

F64 = torch.float64


def _implicit_hypergradient(problem, x, y):
    """∇_x f − J H⁻¹ ∇_y f at (x, y) from the library's oracles (H assembled column by column)."""
    oracles = bl.Oracles()
    gx_f, gy_f, _ = oracles.gradients(problem.upper, x, y, None)
    lin = oracles.linearize(problem.lower, x, y, None)
    n = y["y"].numel()
    H = torch.stack([lin.hvp({"y": e})["y"] for e in torch.eye(n, dtype=F64)], dim=1)
    v = torch.linalg.solve(H, gy_f["y"])
    return T.sub(gx_f, lin.mixed({"y": v}))


def _y_star_t1g(problem, x):
    A, B = problem.metadata["A"], problem.metadata["B"]
    return {"y": torch.linalg.solve(A, B.T @ x["x"])}


def test_t1_closed_form_solution():
    problem = T1(n=7)
    x, y = problem.x_star, problem.y_star
    assert torch.equal(x["x"], torch.full((7,), 0.5, dtype=F64))
    assert float(T.norm(problem.hypergradient(x))) == 0.0
    _, gy, _ = bl.Oracles().gradients(problem.lower, x, y, None)
    assert float(T.norm(gy)) == 0.0  # y* = y*(x*) = x*
    assert float(problem.value_function(x)) == pytest.approx(7 / 4, rel=1e-15)
    xr = {"x": torch.linspace(-1, 2, 7, dtype=F64)}
    torch.testing.assert_close(_implicit_hypergradient(problem, xr, {"y": xr["x"].clone()})["x"], 2 * xr["x"] - 1, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(problem.hypergradient(xr)["x"], 2 * xr["x"] - 1, rtol=0, atol=0)


def test_t1g_solution_is_stationary_and_lower_optimal():
    problem = T1g(n=6)
    g0 = float(T.norm(problem.hypergradient(problem.x_init)))
    assert float(T.norm(problem.hypergradient(problem.x_star))) <= 1e-12 * g0
    _, gy, _ = bl.Oracles().gradients(problem.lower, problem.x_star, problem.y_star, None)
    assert float(T.norm(gy)) <= 1e-12
    torch.testing.assert_close(problem.y_star["y"], _y_star_t1g(problem, problem.x_star)["y"], rtol=1e-12, atol=1e-14)
    # x* minimises Φ: Φ(x* + δ) > Φ(x*) (Φ is a strongly convex quadratic here)
    gen = torch.Generator().manual_seed(0)
    phi_star = float(problem.value_function(problem.x_star))
    for _ in range(5):
        d = 1e-2 * torch.randn(6, generator=gen, dtype=F64)
        assert float(problem.value_function({"x": problem.x_star["x"] + d})) > phi_star


def test_t1g_hypergradient_equals_the_implicit_formula_at_a_random_point():
    problem = T1g(n=6, seed=3)
    x = {"x": torch.randn(6, generator=torch.Generator().manual_seed(4), dtype=F64)}
    implicit = _implicit_hypergradient(problem, x, _y_star_t1g(problem, x))
    ref = problem.hypergradient(x)["x"]
    assert float((implicit["x"] - ref).norm() / ref.norm()) <= 1e-10


def test_t1g_hypergradient_equals_finite_differences_of_the_value_function():
    problem = T1g(n=6, seed=1)
    x = torch.randn(6, generator=torch.Generator().manual_seed(2), dtype=F64)
    h = 1e-4
    fd = torch.zeros(6, dtype=F64)
    for i in range(6):
        e = torch.zeros(6, dtype=F64)
        e[i] = h
        fd[i] = (problem.value_function({"x": x + e}) - problem.value_function({"x": x - e})) / (2 * h)
    ref = problem.hypergradient({"x": x})["x"]
    assert float((fd - ref).norm() / ref.norm()) <= 1e-8


def test_t1g_depends_on_the_seed_and_respects_dtype():
    a, b = T1g(n=4, seed=0), T1g(n=4, seed=1)
    assert not torch.equal(a.metadata["A"], b.metadata["A"])
    assert torch.equal(a.metadata["A"], T1g(n=4, seed=0).metadata["A"])
    ev = torch.linalg.eigvalsh(a.metadata["A"])
    assert float(ev.min()) >= 1.0 - 1e-12 and float(ev.max()) < 2.0
    assert a.smoothness["L_g"] == pytest.approx(float(ev.max()), rel=1e-12)
    assert T1g(n=4, dtype=torch.float32).x_init["x"].dtype == torch.float32


@pytest.mark.parametrize("x, expected", [(0.5, 1.0000), (1.0, -1.778397), (2.0, 1.773020)])
def test_t3_hypergradient_values(x, expected):
    problem = T3()
    got = problem.hypergradient({"x": torch.tensor([x], dtype=F64)})["x"]
    assert float(got) == pytest.approx(expected, abs=1e-5)


def test_t3_hypergradient_equals_the_implicit_formula_at_the_lower_solution():
    problem = T3(copies=5)
    x = {"x": torch.tensor([0.2, 0.5, 1.0, 2.0, 2.9], dtype=F64)}
    y = {"y": -x["x"]}
    _, gy, _ = bl.Oracles().gradients(problem.lower, x, y, None)
    assert float(T.norm(gy)) <= 1e-14  # y*(x) = −x is stationary
    implicit = _implicit_hypergradient(problem, x, y)
    torch.testing.assert_close(implicit["x"], problem.hypergradient(x)["x"], rtol=1e-10, atol=1e-12)


def test_t3_local_minima_are_zeros_of_the_hypergradient():
    problem = T3()
    assert T3_LOCAL_MINIMA == (0.3824, 1.2152, 2.8296)
    for m in T3_LOCAL_MINIMA:
        pts = torch.tensor([m - 1e-3, m, m + 1e-3], dtype=F64)
        left, mid, right = problem.hypergradient({"x": pts})["x"].tolist()
        assert abs(mid) < 2e-3  # the minima are rounded to 1e-4
        assert left < 0 < right  # a minimum, not a maximum
    # the global one is the middle minimum
    values = [float(problem.value_function({"x": torch.tensor([m], dtype=F64)})) for m in T3_LOCAL_MINIMA]
    assert values[1] < values[0] and values[1] < values[2]


def test_t3_starting_points_are_in_the_documented_ranges():
    problem = T3(copies=50, seed=3)
    x0, y0 = problem.x_init["x"], problem.y_init["y"]
    assert float(x0.min()) >= 0.0 and float(x0.max()) <= 3.0
    assert float(y0.min()) >= -5.0 and float(y0.max()) <= 8.5
    assert problem.metadata["box"] == (0.0, 3.0)


def test_t2_solution_and_lower_only_limit():
    problem = T2(n=4, init=0.01)
    x, y = problem.x_star, problem.y_star
    assert float(problem.f(x, y)) == 0.0
    _, gy, _ = bl.Oracles().gradients(problem.lower, x, y, None)
    assert float(T.norm(gy)) == 0.0
    assert problem.metadata["lower_only_limit"] == pytest.approx(0.505, rel=1e-15)
    # at the lower-only limit x = (1 + y2₀)/2 the derivative along y1 = x with y2 fixed vanishes
    x_lim = torch.full((4,), 0.505, dtype=F64)
    xr = x_lim.clone().requires_grad_(True)
    value = problem.f({"x": xr}, {"y1": xr, "y2": torch.full((4,), 0.01, dtype=F64)})
    (grad,) = torch.autograd.grad(value, xr)
    assert float(grad.abs().max()) <= 1e-14


def test_t4_solution_satisfies_the_optimistic_optimality_conditions():
    problem = T4(m=3, d=8, seed=2)
    A, y_ref, x_ref = (problem.metadata[k] for k in ("A", "y_ref", "x_ref"))
    x, y = problem.x_star["x"], problem.y_star["y"]
    # y* minimises ½‖y − y₀‖² + ½‖Ay − x₀‖²: zero gradient
    grad = (y - y_ref) + A.T @ (A @ y - x_ref)
    assert float(grad.norm()) <= 1e-12
    # x* = A y*: y* is a lower solution (g = 0 is the minimum of g) and ∇_y g = 0
    torch.testing.assert_close(x, A @ y, rtol=0, atol=1e-15)
    assert float(problem.g(problem.x_star, problem.y_star)) <= 1e-28
    # any other feasible pair (Ay', y') has a larger upper objective
    f_star = float(problem.f(problem.x_star, problem.y_star))
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        yp = y + 0.05 * torch.randn(8, generator=gen, dtype=F64)
        assert float(problem.f({"x": A @ yp}, {"y": yp})) > f_star
    # the lower level is not strongly convex: AᵀA has d − m zero eigenvalues
    ev = torch.linalg.eigvalsh(A.T @ A)
    assert int((ev.abs() < 1e-12).sum()) == 5
    assert problem.smoothness["L_g"] == pytest.approx(float(ev.max()), rel=1e-12)


def test_t4_needs_a_wide_matrix():
    with pytest.raises(ValueError, match="m < d"):
        T4(m=5, d=5)


@pytest.mark.parametrize("make", [lambda: T1(n=3), lambda: T1g(n=3), lambda: T2(n=3), lambda: T3(copies=3), lambda: T4(m=2, d=4)])
def test_toy_problems_validate_at_their_start(make):
    problem = make()
    fv, gv = problem.validate(problem.x_init, problem.y_init)
    assert fv.dtype == F64 and torch.isfinite(fv) and torch.isfinite(gv)
