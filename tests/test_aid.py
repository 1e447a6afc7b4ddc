import pytest
import torch

import bilevel as bl
from bilevel.problems import T1, T2, T3, T1g
from helpers import BAD_STEP_SIZES, RecordDirection, assert_rejects_step_size
from helpers import relative_error as _rel

F64 = torch.float64


def _t1g_point(n=6, seed=0):
    problem = T1g(n=n, seed=seed)
    A, B = problem.metadata["A"], problem.metadata["B"]
    x = {"x": torch.randn(n, generator=torch.Generator().manual_seed(10 + seed), dtype=F64)}
    y_star = {"y": torch.linalg.solve(A, B.T @ x["x"])}
    lam_max = float(torch.linalg.eigvalsh(A).max())
    return problem, x, y_star, lam_max


def _direction(problem, method, x, y):
    state = method.init(problem, x, y)
    new, info = method.step(problem, state)
    return new.opt["d"]["x"], new, info


SOLVERS = {
    "CG": lambda lam: bl.CG(steps=6),
    "Neumann": lambda lam: bl.Neumann(steps=60, lr=1.0 / lam),
    "FixedPoint": lambda lam: bl.FixedPoint(steps=60, lr=1.0 / lam),
}


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_one_step_direction_is_the_exact_t1g_hypergradient_from_the_lower_solution(solver):
    problem, x, y_star, lam = _t1g_point()
    method = bl.AID(lr_upper=RecordDirection(), lr_lower=1.0 / lam, lower_steps=1, solver=SOLVERS[solver](lam))
    d, new, info = _direction(problem, method, x, y_star)
    exact = problem.hypergradient(x)["x"]
    err = _rel(d, exact)
    print(f"\nAID-{solver} hypergradient relative error on T1g (y0 = y*(x)): {err:.2e}")
    assert err <= 1e-6
    assert torch.equal(new.x["x"], x["x"])
    torch.testing.assert_close(info["stationarity"], exact @ exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_one_step_direction_is_the_exact_t1g_hypergradient_after_many_lower_steps(solver):
    problem, x, _, lam = _t1g_point()
    method = bl.AID(lr_upper=RecordDirection(), lr_lower=1.0 / lam, lower_steps=80, solver=SOLVERS[solver](lam))
    d, _new, info = _direction(problem, method, x, problem.y_init)
    exact = problem.hypergradient(x)["x"]
    err = _rel(d, exact)
    print(f"\nAID-{solver} hypergradient relative error on T1g (80 lower steps from y_init): {err:.2e}")
    assert err <= 1e-6
    assert float(info["lower_grad_sq"]) <= 1e-20


def test_direction_with_an_sgd_step_equals_x_minus_x_new_over_lr():
    problem, x, y_star, lam = _t1g_point()
    lr = 1e-3
    method = bl.AID(lr_upper=lr, lr_lower=1.0 / lam, lower_steps=1, solver=bl.CG(steps=6))
    new, _ = method.step(problem, method.init(problem, x, y_star))
    d = (x["x"] - new.x["x"]) / lr
    assert _rel(d, problem.hypergradient(x)["x"]) <= 1e-9


def test_truncated_solvers_give_the_predicted_inexact_direction():
    # AID with K Neumann terms: d = ∇_x f + B v_K with v_K the truncated series (not H⁻¹∇_y f).
    problem, x, y_star, lam = _t1g_point()
    A, B = problem.metadata["A"], problem.metadata["B"]
    s, K = 1.0 / lam, 3
    method = bl.AID(lr_upper=RecordDirection(), lr_lower=s, lower_steps=1, solver=bl.Neumann(steps=K, lr=s))
    d, new, _info = _direction(problem, method, x, y_star)
    b = A @ y_star["y"]  # ∇_y f
    P = torch.eye(6, dtype=F64) - s * A
    v = s * sum(torch.linalg.matrix_power(P, i) @ b for i in range(K + 1))
    grad_x_f = problem.metadata["D"] @ (x["x"] - problem.metadata["x_hat"])
    torch.testing.assert_close(d, grad_x_f + B @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.v["y"], v, rtol=1e-12, atol=1e-12)
    assert _rel(d, problem.hypergradient(x)["x"]) > 1e-3


def test_step_reports_the_diagnostics_of_the_point_it_used():
    problem, x, _, _lam = _t1g_point()
    A, B, D, x_hat = (problem.metadata[k] for k in ("A", "B", "D", "x_hat"))
    y0 = {"y": torch.linspace(-1, 1, 6, dtype=F64)}
    beta = 0.3
    method = bl.AID(lr_upper=0.01, lr_lower=beta, lower_steps=2, solver=bl.CG(steps=6))
    new, info = method.step(problem, method.init(problem, x, y0))
    y = y0["y"]
    for _ in range(2):
        y = y - beta * (A @ y - B.T @ x["x"])
    torch.testing.assert_close(new.y["y"], y, rtol=1e-13, atol=1e-14)
    gy = A @ y - B.T @ x["x"]
    torch.testing.assert_close(info["lower_grad_sq"], gy @ gy, rtol=1e-12, atol=0)
    f = 0.5 * y @ A @ y + 0.5 * (x["x"] - x_hat) @ D @ (x["x"] - x_hat)
    torch.testing.assert_close(info["upper_loss"], f, rtol=1e-13, atol=0)
    v = torch.linalg.solve(A, A @ y)  # = y
    d = D @ (x["x"] - x_hat) + B @ v
    torch.testing.assert_close(new.x["x"], x["x"] - 0.01 * d, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(info["direction_sq"], d @ d, rtol=1e-9, atol=0)
    assert float(info["linsys_residual_sq"]) <= 1e-20
    assert new.k == 1


def test_cost_per_iteration_in_oracle_calls():
    problem, x, y_star, _ = _t1g_point()
    oracles = bl.CountingOracles()
    method = bl.AID(lr_upper=0.1, lr_lower=0.5, lower_steps=3, solver=bl.CG(steps=4), oracles=oracles)
    state = method.init(problem, x, y_star)
    method.step(problem, state)
    assert oracles.counts == {"gradient_y": 3, "gradients": 1, "linearize": 1, "hvp": 4, "mixed": 1}
    oracles.reset()
    warm = method.replace(warm_start_v=True)
    state, _ = warm.step(problem, state)
    warm.step(problem, state)
    assert oracles.counts["hvp"] == 2 * (4 + 1)  # one more product for r₀ = b − H v₀


def test_warm_started_multiplier_is_used():
    problem, x, y_star, _lam = _t1g_point()
    A = problem.metadata["A"]
    v_exact = torch.linalg.solve(A, A @ y_star["y"])
    method = bl.AID(lr_upper=RecordDirection(), lr_lower=0.5, lower_steps=1, solver=bl.FixedPoint(steps=1, lr=0.5), warm_start_v=True)
    state = method.init(problem, x, y_star).replace(v={"y": v_exact.clone()})
    new, _info = method.step(problem, state)
    assert _rel(new.v["y"], v_exact) <= 1e-12  # started at the solution, stays there
    assert _rel(new.opt["d"]["x"], problem.hypergradient(x)["x"]) <= 1e-10
    cold, _ = method.replace(warm_start_v=False).step(problem, state)
    assert _rel(cold.v["y"], v_exact) > 1e-2


def test_aid_cg_converges_to_the_solution_of_t1():
    problem = T1(n=5)
    result = bl.solve(problem, bl.AID(lr_upper=0.3, lr_lower=0.5, lower_steps=5, solver=bl.CG(steps=2)), max_iters=60)
    assert float((result.x["x"] - 0.5).abs().max()) <= 1e-6
    assert float((result.y["y"] - 0.5).abs().max()) <= 1e-6


def test_aid_cg_converges_to_the_solution_of_t1g():
    problem = T1g(n=5, seed=2)
    A, B, D = (problem.metadata[k] for k in ("A", "B", "D"))
    hess = B @ torch.linalg.solve(A, B.T) + D
    ev = torch.linalg.eigvalsh(0.5 * (hess + hess.T))
    lr = 2.0 / float(ev.min() + ev.max())
    result = bl.solve(problem, bl.AID(lr_upper=lr, lr_lower=0.5, lower_steps=5, solver=bl.CG(steps=5)), max_iters=60)
    assert _rel(result.x["x"], problem.x_star["x"]) <= 1e-4
    assert _rel(result.y["y"], problem.y_star["y"]) <= 1e-4


@pytest.mark.parametrize("solver", [bl.FixedPoint(steps=12, lr=0.8), bl.Neumann(steps=12, lr=0.8)])
def test_aid_on_t2_stops_at_the_lower_only_limit(solver):
    problem = T2(n=4)
    result = bl.solve(problem, bl.AID(lr_upper=0.3, lr_lower=0.8, lower_steps=5, solver=solver), max_iters=40)
    assert float((result.x["x"] - 0.505).abs().max()) <= 1e-6
    assert float((result.x["x"] - 1.0).abs().max()) > 0.4
    torch.testing.assert_close(result.y["y2"], problem.y_init["y2"], rtol=0, atol=0)  # y2 never moves


def test_aid_with_a_box_projection_reaches_local_minima_of_t3():
    problem = T3(copies=4, seed=1)
    method = bl.AID(lr_upper=0.1, lr_lower=0.1, lower_steps=10, solver=bl.CG(steps=4), project_x=bl.Box(0.0, 3.0))
    result = bl.solve(problem, method, max_iters=40)
    x = result.x["x"]
    assert float(x.min()) >= 0.0 and float(x.max()) <= 3.0
    minima = torch.tensor(bl.problems.T3_LOCAL_MINIMA, dtype=F64)
    dist = (x[:, None] - minima[None, :]).abs().min(dim=1).values
    assert float(dist.max()) <= 1e-4, x.tolist()
    assert float(problem.hypergradient({"x": x})["x"].abs().max()) <= 1e-8
    torch.testing.assert_close(result.y["y"], -x, rtol=0, atol=1e-8)  # y*(x) = −x


def test_configuration_errors():
    with pytest.raises(TypeError, match="solver"):
        bl.AID(solver="cg")
    with pytest.raises(ValueError, match="lr"):
        bl.AID(lr_lower=0.0)
    with pytest.raises(ValueError, match="steps"):
        bl.AID(lower_steps=0)
    with pytest.raises(ValueError, match="lr_upper"):
        bl.AID(lr_upper=-0.1)


@pytest.mark.parametrize("field", ["lr_upper", "lr_lower"])
@pytest.mark.parametrize("value, shown", BAD_STEP_SIZES)
def test_step_sizes_reject_zero_negative_nonfinite_and_non_numbers(field, value, shown):
    """Every step size fails at construction with one line naming the class, the argument and the value."""
    assert_rejects_step_size(bl.AID, field, value, shown)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lower_steps": 0}, r"^AID\(lower_steps=0\) must be an integer >= 1$"),
        ({"warm_start_v": 1}, r"^AID\(warm_start_v=1\) must be true or false, not an int$"),
        ({"solver": "CG"}, r"^AID\(solver='CG'\) must be a linear solver such as bilevel.CG\(steps=10\), not a str$"),
    ],
)
def test_other_options_are_validated_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bl.AID(**kwargs)
