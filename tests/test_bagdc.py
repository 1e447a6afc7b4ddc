import pytest
import torch

import bilevel as bl
from bilevel.problems import T1, T1g
from helpers import BAD_STEP_SIZES, assert_rejects_step_size
from helpers import random_state as _random_state


@pytest.mark.parametrize("order", ["sequential", "jacobi"])
@pytest.mark.parametrize("dual_step", ["fixed", "linesearch"])
def test_one_iteration_equals_hand_written_step_on_t1g(order, dual_step):
    problem = T1g(n=5, seed=2)
    A, B, D, x_hat = (problem.metadata[k] for k in ("A", "B", "D", "x_hat"))
    alpha, beta, eta0 = 0.02, 0.3, 0.4
    method = bl.BAGDC(lr_upper=alpha, lr_lower=beta, lr_dual=eta0, dual_step=dual_step, order=order)
    state, x0, y0, v0 = _random_state(method, problem)
    new, info = method.step(problem, state)

    def correct(v, y):
        r = A @ v - A @ y  # H v − ∇_y f, H = A, ∇_y f = A y
        eta = (r @ r) / (r @ (A @ r)) if dual_step == "linesearch" else eta0
        return v - eta * r

    y1 = y0 - beta * (A @ y0 - B.T @ x0)
    if order == "sequential":
        v1 = correct(v0, y1)
        d = D @ (x0 - x_hat) + B @ v1  # ∇_x f − J v with J = −B
        y_kkt, v_kkt = y1, v1
    else:
        v1 = correct(v0, y0)
        d = D @ (x0 - x_hat) + B @ v0
        y_kkt, v_kkt = y0, v0
    torch.testing.assert_close(new.y["y"], y1, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.v["y"], v1, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.x["x"], x0 - alpha * d, rtol=0, atol=1e-12)
    kkt = ((D @ (x0 - x_hat) + B @ v_kkt) ** 2).sum() + ((A @ y_kkt - A @ v_kkt) ** 2).sum() + ((A @ y_kkt - B.T @ x0) ** 2).sum()
    # the default diagnostics cost no product: the multiplier term at v_{k+1} after a line
    # search (H v_k − η H r), at v_k (the residual the step formed) after a fixed step
    v_mult = v0 if (order == "sequential" and dual_step == "fixed") else v_kkt
    free = ((D @ (x0 - x_hat) + B @ v_kkt) ** 2).sum() + ((A @ y_kkt - A @ v_mult) ** 2).sum() + ((A @ y_kkt - B.T @ x0) ** 2).sum()
    assert info["stationarity"].item() == pytest.approx(free.item(), rel=1e-10)
    assert info["kkt_multiplier"].item() == pytest.approx(((A @ y_kkt - A @ v_mult) ** 2).sum().item(), rel=1e-10)
    assert info["dual_residual_sq"].item() == pytest.approx(info["kkt_multiplier"].item(), rel=1e-12)
    exact_new, exact_info = method.replace(exact_kkt=True).step(problem, state)
    for key in ("x", "y", "v"):
        assert torch.equal(getattr(exact_new, key)["x" if key == "x" else "y"], getattr(new, key)["x" if key == "x" else "y"])
    assert exact_info["stationarity"].item() == pytest.approx(kkt.item(), rel=1e-10)


@pytest.mark.parametrize("order", ["sequential", "jacobi"])
def test_one_iteration_equals_hand_written_step_on_t1(order):
    problem = T1(n=4)
    alpha, beta, eta = 0.01, 0.2, 0.5
    method = bl.BAGDC(lr_upper=alpha, lr_lower=beta, lr_dual=eta, order=order)
    state, x0, y0, v0 = _random_state(method, problem, seed=5)
    new, _ = method.step(problem, state)
    y1 = y0 - beta * (y0 - x0)
    if order == "sequential":
        v1 = v0 - eta * (v0 - y1)
        d = (x0 - 1) + v1
    else:
        v1 = v0 - eta * (v0 - y0)
        d = (x0 - 1) + v0
    torch.testing.assert_close(new.y["y"], y1, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.v["y"], v1, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.x["x"], x0 - alpha * d, rtol=0, atol=1e-12)


def test_bda_lower_dynamics_use_the_aggregated_objective():
    problem = T1(n=3)
    method = bl.BAGDC(lr_upper=0.1, lr_lower=0.2, lr_dual=0.5, lower="bda", lower_mu=0.1)
    state, x0, y0, v0 = _random_state(method, problem, seed=6)
    new, _ = method.step(problem, state)
    y1 = y0 - 0.2 * (y0 - 0.9 * x0)  # ∇_y φ = 0.1 y + 0.9 (y − x)
    v1 = v0 - 0.5 * (v0 - y1)  # H_φ = I
    torch.testing.assert_close(new.y["y"], y1, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.x["x"], x0 - 0.1 * ((x0 - 1) + 0.9 * v1), rtol=0, atol=1e-12)


def test_periodic_line_search_keeps_its_step_between_searches():
    problem = T1g(n=5, seed=0)
    counting = bl.CountingOracles()
    method = bl.BAGDC(lr_upper=0.001, lr_lower=0.3, dual_step="periodic", period=3, oracles=counting)
    state = method.init(problem)
    hvps, steps = [], []
    for _ in range(6):
        counting.reset()
        state, info = method.step(problem, state)
        hvps.append(counting.counts["hvp"])
        steps.append(info["dual_step"].item())
    assert hvps == [2, 1, 1, 2, 1, 1]  # line search at k = 0 and 3 only
    assert steps[1] == steps[0] and steps[2] == steps[0]
    assert steps[4] == steps[3] and steps[3] != steps[0]


def test_oracle_calls_per_iteration_match_the_cost_table():
    counting = bl.CountingOracles()
    problem = T1(n=3)
    method = bl.BAGDC(lr_upper=0.01, lr_lower=0.2, lr_dual=0.5, oracles=counting)
    state = method.init(problem)
    counting.reset()
    method.step(problem, state)
    # the default diagnostics form no product of their own: the direction's mixed product only
    assert counting.counts == {"gradient_y": 1, "gradients": 1, "linearize": 1, "hvp": 1, "mixed": 1}
    counting.reset()
    method.replace(dual_step="linesearch").step(problem, state)
    assert counting.counts == {"gradient_y": 1, "gradients": 1, "linearize": 1, "hvp": 2, "mixed": 1}
    counting.reset()
    method.replace(exact_kkt=True).step(problem, state)  # H v_{k+1} for the diagnostics: a (J v, H v) pass
    assert counting.counts == {"gradient_y": 1, "gradients": 1, "linearize": 1, "hvp": 1, "both": 1}
    counting.reset()
    method.replace(order="jacobi").step(problem, state)
    assert counting.counts == {"gradients": 1, "linearize": 1, "both": 1}


def test_reaches_t1_solution_where_one_step_unroll_without_dual_stops_at_one_over_one_plus_s():
    s = 0.2
    bagdc = bl.solve(T1(n=5), bl.BAGDC(lr_upper=0.2, lr_lower=s, lr_dual=0.5), max_iters=1500, log_every=100)
    torch.testing.assert_close(bagdc.x["x"], torch.full((5,), 0.5, dtype=torch.float64), rtol=0, atol=1e-6)
    unroll = bl.solve(T1(n=5), bl.ITD(lr_upper=0.2, lr_lower=s, lower_steps=1, warm_start=True), max_iters=1500, log_every=100)
    torch.testing.assert_close(unroll.x["x"], torch.full((5,), 1 / (1 + s), dtype=torch.float64), rtol=0, atol=1e-6)


def test_reference_run_on_t1_with_paper_step_sizes():
    """docs/algorithms.md#reference-results: sequential, η = 0.5, s = 0.2, α = 0.01, 20 000 iterations → 0.500000."""
    result = bl.solve(T1(n=2), bl.BAGDC(lr_upper=0.01, lr_lower=0.2, lr_dual=0.5), max_iters=20000, log_every=2000)
    torch.testing.assert_close(result.x["x"], torch.full((2,), 0.5, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(result.y["y"], torch.full((2,), 0.5, dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dual_step", ["fixed", "linesearch"])
def test_sequential_order_is_stable_at_one_over_lphi_where_jacobi_diverges(dual_step):
    problem = T1g(n=10, seed=0)
    alpha = 1.0 / problem.smoothness["L_phi"]
    method = bl.BAGDC(lr_upper=alpha, lr_lower=0.2, lr_dual=0.3, dual_step=dual_step)
    result = bl.solve(problem, method, max_iters=4000, log_every=500)
    x_star = problem.x_star["x"]
    first = (problem.x_init["x"] - x_star).norm().item()
    assert (result.x["x"] - x_star).norm().item() < 0.1 * first
    with pytest.raises(bl.DivergenceError):
        bl.solve(problem, method.replace(order="jacobi"), max_iters=4000, log_every=50)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"order": "gauss"}, "order"),
        ({"dual_step": "exact"}, "dual_step"),
        ({"lower": "adam"}, "lower"),
        ({"lower_mu": 1.0}, "lower_mu"),
        ({"order": "jacobi", "lower_steps": 3}, "one lower step"),
        ({"period": 0}, "period"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bl.BAGDC(**kwargs)


def test_stability_bounds_on_lower_and_dual_steps_warn_and_error():
    problem = T1(n=3)  # H = I: both steps are stable below 2
    with pytest.warns(bl.StabilityWarning, match=r"BAGDC\(lr_dual=2.5\).*2/λ_max\(H\)"):
        bl.BAGDC(lr_dual=2.5).init(problem)
    with pytest.raises(ValueError, match=r"BAGDC\(lr_lower=2.2\).*stability bound 2"):
        bl.BAGDC(lr_lower=2.2, stability_check="error").init(problem)
    with pytest.raises(bl.DivergenceError):
        bl.solve(problem, bl.BAGDC(lr_dual=2.5, stability_check="off"), max_iters=3000)


@pytest.mark.parametrize("field", ["lr_upper", "lr_lower", "lr_dual", "dual_fallback", "max_dual_step"])
@pytest.mark.parametrize("value, shown", BAD_STEP_SIZES)
def test_step_sizes_reject_zero_negative_nonfinite_and_non_numbers(field, value, shown):
    """Every step size fails at construction with one line naming the class, the argument and the value."""
    assert_rejects_step_size(bl.BAGDC, field, value, shown)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lower_mu": 0.0}, r"^BAGDC\(lower_mu=0.0\) must be a finite number in \(0, 1\)$"),
        ({"lower_steps": "3"}, r"^BAGDC\(lower_steps='3'\) must be an integer >= 1, not a str$"),
        ({"lower": "adam"}, r"^BAGDC\(lower='adam'\) must be one of 'gd', 'bda'$"),
        ({"dual_step": "exact"}, r"^BAGDC\(dual_step='exact'\) must be one of 'fixed', 'linesearch', 'periodic'$"),
        ({"period": 1.5}, r"^BAGDC\(period=1.5\) must be an integer >= 1, not a float$"),
    ],
)
def test_other_options_are_validated_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bl.BAGDC(**kwargs)
