import pytest
import torch

import bilevel as bl
from bilevel.problems import T1, T2, T1g
from helpers import BAD_STEP_SIZES, assert_rejects_step_size
from helpers import random_state as _random_state


def _phi_parts(problem, mu):
    """Closed forms of T1g for φ_μ = μ f + (1 − μ) g: (H_φ, J_φ as a matrix, ∇_y φ(x, y))."""
    A, B, D, x_hat = (problem.metadata[k] for k in ("A", "B", "D", "x_hat"))
    H_phi = A  # μ A + (1 − μ) A
    J_phi = -(1 - mu) * B  # ∇²_xy of −(1 − μ) xᵀBy
    grad_y_phi = lambda x, y: mu * (A @ y) + (1 - mu) * (A @ y - B.T @ x)
    return A, B, D, x_hat, H_phi, J_phi, grad_y_phi


@pytest.mark.parametrize("order", ["sequential", "jacobi"])
@pytest.mark.parametrize("dual_step", ["linesearch", "fixed"])
def test_one_iteration_equals_hand_written_step_on_t1g(order, dual_step):
    problem = T1g(n=5, seed=1)
    mu0, alpha0, eta0, beta = 0.7, 0.03, 0.4, 0.2
    method = bl.SlBAMM(lr_lower=beta, mu=mu0, lr_upper=alpha0, lr_dual=eta0, dual_step=dual_step, order=order)
    state, x0, y0, z0 = _random_state(method, problem)
    new, info = method.step(problem, state)
    A, B, D, x_hat, H, J, grad_y_phi = _phi_parts(problem, mu0)

    def dual(z, y):
        r = H @ z - A @ y  # ∇_y f = A y
        eta = (r @ r) / (r @ (H @ r)) if dual_step == "linesearch" else eta0
        return z - eta * r

    if order == "sequential":
        y1 = y0 - beta * grad_y_phi(x0, y0)
        z1 = dual(z0, y1)
        d = D @ (x0 - x_hat) - J @ z1
        # kkt_multiplier ‖∇_y f − H_g z‖² comes free: at z_{k+1} after a line search
        # (H_g z_k − η H_g r), at z_k after a fixed step (exact_kkt=True: always z_{k+1})
        z_mult = z1 if dual_step == "linesearch" else z0
        kkt = ((D @ (x0 - x_hat) + B @ z1) ** 2).sum() + ((A @ y1 - A @ z_mult) ** 2).sum() + ((A @ y1 - B.T @ x0) ** 2).sum()
    else:
        z1 = dual(z0, y0)
        d = D @ (x0 - x_hat) - J @ z0
        y1 = y0 - beta * grad_y_phi(x0, y0)
        kkt = ((D @ (x0 - x_hat) + B @ z0) ** 2).sum() + ((A @ y0 - A @ z0) ** 2).sum() + ((A @ y0 - B.T @ x0) ** 2).sum()
    torch.testing.assert_close(new.y["y"], y1, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.v["y"], z1, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.x["x"], x0 - alpha0 * d, rtol=0, atol=1e-12)
    assert info["stationarity"].item() == pytest.approx(kkt.item(), rel=1e-10)


@pytest.mark.parametrize("order", ["sequential", "jacobi"])
def test_one_iteration_equals_hand_written_step_on_t1(order):
    """T1: H_φ = I, J_φ = −(1 − μ)I, ∇_y φ = y − (1 − μ)x, so the line-search step is 1."""
    problem = T1(n=4)
    mu, alpha, beta = 0.9, 0.1, 0.2
    method = bl.SlBAMM(lr_lower=beta, mu=mu, lr_upper=alpha, order=order)
    state, x0, y0, z0 = _random_state(method, problem, seed=2)
    new, _ = method.step(problem, state)
    y1 = y0 - beta * (y0 - (1 - mu) * x0)
    if order == "sequential":
        z1, d = y1, (x0 - 1) + (1 - mu) * y1
    else:
        z1, d = y0, (x0 - 1) + (1 - mu) * z0
    torch.testing.assert_close(new.y["y"], y1, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.v["y"], z1, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.x["x"], x0 - alpha * d, rtol=0, atol=1e-12)


def test_frozen_phi_mu_uses_the_frozen_weight_in_phi_only():
    problem = T1(n=3)
    method = bl.SlBAMM(lr_lower=0.2, mu=0.9, lr_upper=0.1, freeze_phi_mu=0.1, order="jacobi")
    state, x0, y0, z0 = _random_state(method, problem, seed=4)
    new, info = method.step(problem, state)
    torch.testing.assert_close(new.y["y"], y0 - 0.2 * (y0 - 0.9 * x0), rtol=0, atol=1e-12)
    torch.testing.assert_close(new.x["x"], x0 - 0.1 * ((x0 - 1) + 0.9 * z0), rtol=0, atol=1e-12)
    assert info["mu"].item() == pytest.approx(0.9)


def test_schedules_follow_strategy_s3():
    method = bl.SlBAMM.from_strategy(s=0.1, mu0=0.9, p=10, tau=1 / 40, strategy="s3")
    for k in (0, 9, 999):
        mu_k = 0.9 * (k + 1) ** (-1 / 10)
        assert method.mu(k) == pytest.approx(mu_k)
        assert method.lr_upper(k) == pytest.approx(0.1 * (k + 1) ** (-1.5 / 40) * mu_k**3)
        assert method.lr_dual(k) == pytest.approx(0.1 * (k + 1) ** (-0.5 / 40))


def test_line_search_guard_falls_back_on_nonpositive_curvature():
    # g = −½‖y‖² + xᵀy has H = −I: the exact step would be negative; the guard uses the fallback
    f = lambda x, y, b: 0.5 * (y["y"] ** 2).sum() + 0.5 * ((x["x"] - 1) ** 2).sum()
    g = lambda x, y, b: -0.5 * (y["y"] ** 2).sum() + (x["x"] * y["y"]).sum()
    problem = bl.Problem(upper=f, lower=g)
    method = bl.SlBAMM(lr_lower=0.1, mu=0.0001, lr_upper=0.01, dual_fallback=0.05, order="jacobi")
    state = method.init(problem, {"x": torch.ones(2, dtype=torch.float64)}, {"y": torch.ones(2, dtype=torch.float64)})
    state = state.replace(v={"y": torch.full((2,), 3.0, dtype=torch.float64)})
    _, info = method.step(problem, state)
    assert info["dual_step"].item() == pytest.approx(0.05)


def test_oracle_calls_per_iteration():
    counting = bl.CountingOracles()
    problem = T1(n=3)
    seq = bl.SlBAMM(lr_lower=0.1, oracles=counting)
    state = seq.init(problem)
    counting.reset()
    seq.step(problem, state)
    # one ∇_y φ for the lower step; graphs of ∇f and ∇g at (x_k, y_{k+1}); H_φ z_k and H_φ r
    # (each a product with f and with g: one backward pass in reverse mode); J_f z_{k+1} and
    # J_g z_{k+1} for the direction and the KKT residual's first term (one pass); the g-parts
    # H_g z_{k+1} = H_g z_k − η H_g r and H_φ z_{k+1} come from the line search's products
    assert counting.counts == {"gradient_y": 1, "linearize": 2, "hvp": 4, "mixed": 2}
    counting.reset()
    seq.replace(exact_kkt=True).step(problem, state)  # one pass per objective for (J z_{k+1}, H z_{k+1})
    assert counting.counts == {"gradient_y": 1, "linearize": 2, "hvp": 4, "both": 2}
    jac = seq.replace(order="jacobi")
    counting.reset()
    jac.step(problem, state)
    # Jacobi reuses ∇_y φ(x_k, y_k) for the lower step: no separate gradient
    assert counting.counts == {"linearize": 2, "hvp": 2, "both": 2}


def test_t2_reaches_optimistic_solution_where_lower_only_methods_stop_at_0505():
    problem = T2(n=10)
    result = bl.solve(problem, bl.SlBAMM.official_toy(), max_iters=6000, log_every=500)
    for key, tree in (("x", result.x), ("y1", result.y), ("y2", result.y)):
        value = tree["x"] if key == "x" else tree[key]
        torch.testing.assert_close(value, torch.ones(10, dtype=torch.float64), rtol=0, atol=1e-5)
    aid = bl.solve(problem, bl.AID(lr_upper=0.5, lr_lower=0.5, solver=bl.FixedPoint(steps=20, lr=0.5)), max_iters=200, log_every=50)
    torch.testing.assert_close(aid.x["x"], torch.full((10,), 0.505, dtype=torch.float64), rtol=0, atol=1e-6)


def test_official_toy_reproduces_the_scripts_tensorwise_line_search_on_t2():
    """The official scripts' line search has the numerator (Σ_i ‖r_i‖)² over y's tensors
    (T2: y1, y2); official_toy() reproduces it. n = 100, start 0.01·1, float64."""
    problem = T2(n=100)
    method = bl.SlBAMM.official_toy()
    assert method.line_search_numerator == "tensorwise"
    state = method.init(problem)
    xs, steps = [], []
    for _ in range(10):
        state, info = method.step(problem, state)
        xs.append(state.x["x"][0].item())
        steps.append(info["dual_step"].item())
    assert xs[1] == pytest.approx(0.0614053, abs=5e-8)
    assert xs[2] == pytest.approx(0.1032013, abs=5e-8)
    assert steps[2] == pytest.approx(10.5865, abs=5e-5)  # the exact step would be 7.92
    assert xs[9] == pytest.approx(0.3030346, abs=5e-8)
    exact = method.replace(line_search_numerator="residual").init(problem)
    for _ in range(3):
        exact, info = method.replace(line_search_numerator="residual").step(problem, exact)
    assert info["dual_step"].item() == pytest.approx(7.9208, abs=5e-5)


def test_t2_with_decaying_mu_in_phi_approaches_one():
    result = bl.solve(T2(n=10), bl.SlBAMM.official_toy(freeze_phi_mu=None), max_iters=6000, log_every=500)
    assert (result.x["x"] - 1).abs().max().item() < 1e-4
    assert (result.y["y2"] - 1).abs().max().item() < 1e-4


def test_fixed_mu_fixed_point_on_t2_is_exactly_one():
    """For any fixed μ the aggregated hypergradient on T2 is (1−μ)²(x − 1) at y_μ(x)."""
    method = bl.SlBAMM(lr_lower=0.5, mu=0.3, lr_upper=0.5, order="sequential")
    result = bl.solve(T2(n=5), method, max_iters=400, log_every=100)
    torch.testing.assert_close(result.x["x"], torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-8)


def test_t1_jacobi_bias_matches_closed_form_of_averaging():
    """μ_k decays slowly (p = 10): x tracks the biased fixed point 1/(1 + (1 − μ_k)²)."""
    method = bl.SlBAMM.from_strategy(s=0.2, mu0=0.9, p=10, tau=1 / 40, strategy="s3", order="jacobi", lr_upper=0.2)
    result = bl.solve(T1(n=5), method, max_iters=1500, log_every=100)
    mu_k = method.mu(1499)
    assert result.x["x"][0].item() == pytest.approx(1 / (1 + (1 - mu_k) ** 2), abs=2e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"order": "parallel"}, "order"),
        ({"dual_step": "cg"}, "dual_step"),
        ({"freeze_phi_mu": 1.5}, "freeze_phi_mu"),
        ({"lr_lower": -1.0}, "lr_lower"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bl.SlBAMM(**kwargs)


def test_stability_bound_of_the_averaged_hessian_is_checked():
    problem = T1(n=3)  # ∇²_yy φ_μ = I
    with pytest.raises(ValueError, match=r"SlBAMM\(lr_lower=2.5\).*φ_μ"):
        bl.SlBAMM(lr_lower=2.5, stability_check="error").init(problem)
    with pytest.warns(bl.StabilityWarning, match=r"lr_dual=3"):
        bl.SlBAMM(dual_step="fixed", lr_dual=3.0).init(problem)


@pytest.mark.parametrize("field", ["lr_upper", "lr_lower", "lr_dual", "dual_fallback", "max_dual_step"])
@pytest.mark.parametrize("value, shown", BAD_STEP_SIZES)
def test_step_sizes_reject_zero_negative_nonfinite_and_non_numbers(field, value, shown):
    """Every step size fails at construction with one line naming the class, the argument and the value."""
    assert_rejects_step_size(bl.SlBAMM, field, value, shown)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mu": 1.0}, r"^SlBAMM\(mu=1.0\) must be a finite number in \[0, 1\)$"),
        ({"mu": "0.5"}, r"^SlBAMM\(mu='0.5'\) must be a finite number in \[0, 1\), not a str$"),
        ({"freeze_phi_mu": float("nan")}, r"^SlBAMM\(freeze_phi_mu=nan\) must be a finite number in \[0, 1\)$"),
        ({"period": 0}, r"^SlBAMM\(period=0\) must be an integer >= 1$"),
        ({"order": "gauss"}, r"^SlBAMM\(order='gauss'\) must be one of 'sequential', 'jacobi'$"),
    ],
)
def test_other_options_are_validated_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bl.SlBAMM(**kwargs)
