import collections

import pytest
import torch

import bilevel as bl
from bilevel.problems import T1, T3, T3_LOCAL_MINIMA, T4, T1g
from helpers import BAD_STEP_SIZES, assert_rejects_step_size


def _t1g_closed_forms(problem):
    A, B, D, x_hat = (problem.metadata[k] for k in ("A", "B", "D", "x_hat"))
    return A, B, D, x_hat


def test_one_iteration_equals_hand_written_step_on_t1g():
    problem = T1g(n=6, seed=3)
    A, B, D, x_hat = _t1g_closed_forms(problem)
    alpha, beta, rho, N, T = 0.05, 0.3, 0.2, 3, 4
    method = bl.GALET(lr_upper=alpha, lr_lower=beta, lower_steps=N, lr_shadow=rho, shadow_steps=T, stability_check="off", exact_metric=True)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, generator=gen, dtype=torch.float64)
    y0 = torch.randn(6, generator=gen, dtype=torch.float64)
    state = method.init(problem, {"x": x0}, {"y": y0})
    new, info = method.step(problem, state)

    y = y0.clone()
    for _ in range(N):
        y = y - beta * (A @ y - B.T @ x0)
    fy, fx = A @ y, D @ (x0 - x_hat)
    w = torch.zeros(6, dtype=torch.float64)  # GALET's sign: w = -v
    for _ in range(T):
        w = w - rho * A @ (fy + A @ w)
    d = fx + (-B) @ w  # ∇_x f + J w with J = -B
    x1 = x0 - alpha * d
    torch.testing.assert_close(new.y["y"], y, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.v["y"], -w, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.x["x"], x1, rtol=0, atol=1e-12)
    r_terms = (d @ d, (A @ y - B.T @ x0).square().sum(), (A @ (fy + A @ w)).square().sum())
    assert info["R_upper"].item() == pytest.approx(r_terms[0].item(), rel=1e-10)
    assert info["R_lower"].item() == pytest.approx(r_terms[1].item(), rel=1e-10)
    assert info["R_shadow"].item() == pytest.approx(r_terms[2].item(), rel=1e-10)
    assert info["stationarity"].item() == pytest.approx(sum(t.item() for t in r_terms), rel=1e-10)


def test_warm_shadow_start_continues_from_previous_multiplier():
    problem = T1(n=4)
    method = bl.GALET(lr_upper=0.1, lr_lower=0.5, lower_steps=2, lr_shadow=0.5, shadow_steps=1, shadow_start="warm")
    state = method.init(problem).replace(v={"y": torch.full((4,), 0.3, dtype=torch.float64)})
    new, _ = method.step(problem, state)
    y1 = 2.0 + (2.0 - 2.0) * 0  # y0 = x0 = 2 is already the lower solution of T1
    v_expected = 0.3 - 0.5 * (0.3 - y1)  # H = I: v ← v − ρ (v − ∇_y f)
    torch.testing.assert_close(new.v["y"], torch.full((4,), v_expected, dtype=torch.float64))


def test_cheap_metric_reports_shadow_term_at_previous_inner_iterate():
    problem = T1(n=3)
    method = bl.GALET(lr_upper=0.1, lr_lower=0.5, lower_steps=1, lr_shadow=0.5, shadow_steps=2, exact_metric=False)
    state = method.init(problem)
    _, info = method.step(problem, state)
    # y stays at 2 (= x); w^(1) = -0.5·2 = -1, residual ∇_y f + H w^(1) = 1 → ‖H r‖² = n
    assert info["R_shadow"].item() == pytest.approx(3.0)


def test_oracle_calls_per_iteration_match_the_cost_table():
    counting = bl.CountingOracles()
    N, T = 3, 4
    method = bl.GALET(lr_upper=0.1, lr_lower=0.5, lower_steps=N, lr_shadow=0.25, shadow_steps=T, oracles=counting, stability_check="off")
    problem = T1(n=3)
    state = method.init(problem)
    counting.reset()
    method.step(problem, state)
    # the cold start's first residual costs no product: 2T − 1 in the loop; the default
    # metric (exact_metric=False) needs nothing more than the direction's mixed product
    assert counting.counts == {"gradient_y": N, "gradients": 1, "linearize": 1, "hvp": 2 * T - 1, "mixed": 1}
    exact = method.replace(exact_metric=True)
    counting.reset()
    exact.step(problem, state)
    assert counting.counts == {"gradient_y": N, "gradients": 1, "linearize": 1, "hvp": 2 * T, "both": 1}


def test_cold_start_bias_on_t1_is_the_closed_form_fixed_point():
    method = bl.GALET(lr_upper=0.1, lr_lower=0.5, lower_steps=5, lr_shadow=0.5, shadow_steps=5)
    result = bl.solve(T1(n=10), method, max_iters=500, log_every=50)
    expected = 1.0 / (1.0 + (1.0 - 0.5**5))
    assert expected == pytest.approx(0.507937, abs=1e-6)
    torch.testing.assert_close(result.x["x"], torch.full((10,), expected, dtype=torch.float64), rtol=0, atol=1e-6)


def test_warm_start_reaches_t1_solution():
    method = bl.GALET(lr_upper=0.2, lr_lower=0.5, lower_steps=5, lr_shadow=0.5, shadow_steps=5, shadow_start="warm")
    result = bl.solve(T1(n=10), method, max_iters=300, log_every=50)
    torch.testing.assert_close(result.x["x"], torch.full((10,), 0.5, dtype=torch.float64), rtol=0, atol=1e-8)
    assert result.final["stationarity"] < 1e-14


def test_t4_pl_lower_level_drives_metric_to_zero_and_x_to_optimistic_solution():
    problem = T4(m=5, d=20, seed=0)
    L = problem.smoothness["L_g"]
    method = bl.GALET(lr_upper=0.2, lr_lower=1 / L, lower_steps=10, lr_shadow=1 / L**2, shadow_steps=30, shadow_start="warm")
    result = bl.solve(problem, method, max_iters=600, log_every=50)
    assert (result.x["x"] - problem.x_star["x"]).norm().item() < 1e-3
    assert result.final["R_upper"] < 1e-12 and result.final["R_lower"] < 1e-12 and result.final["R_shadow"] < 1e-6
    # the null-space part of y never moves, so ∇_y f + H w stays O(1): GALET's metric does
    # not force the optimistic y (docs/algorithms.md#galet-stationarity-measure)
    A = problem.metadata["A"]
    P_null = torch.eye(20, dtype=torch.float64) - A.T @ torch.linalg.solve(A @ A.T, A)
    assert (P_null @ (result.y["y"] - problem.y_init["y"])).norm().item() < 1e-10
    grad_y_f = result.y["y"] - problem.metadata["y_ref"]
    shadow_residual = grad_y_f - A.T @ (A @ result.v["y"])  # ∇_y f + H w with w = −v
    assert shadow_residual.norm().item() > 0.1


def test_t3_random_starts_reach_the_three_local_minima():
    problem = T3(copies=60, seed=0)
    method = bl.GALET(
        lr_upper=0.05, lr_lower=0.1, lower_steps=10, lr_shadow=0.01, shadow_steps=20, shadow_start="warm", project_x=bl.Box(0.0, 3.0)
    )
    result = bl.solve(problem, method, max_iters=1500, log_every=100)
    ends = result.x["x"]
    nearest = torch.stack([(ends - m).abs() for m in T3_LOCAL_MINIMA]).min(dim=0)
    assert nearest.values.max().item() < 5e-3
    counts = collections.Counter(nearest.indices.tolist())
    assert set(counts) == {0, 1, 2}
    # y tracks the lower solution y*(x) = −x
    torch.testing.assert_close(result.y["y"], -ends, rtol=0, atol=1e-6)


def test_stability_bound_on_shadow_step_warns_and_errors():
    problem = T3(copies=1)
    x0, y0 = {"x": torch.tensor([3.0], dtype=torch.float64)}, {"y": torch.tensor([-3.0], dtype=torch.float64)}
    method = bl.GALET(lr_lower=0.1, lr_shadow=0.05)  # λ_max(H) = 8 at x = 3: bound 2/64
    with pytest.warns(bl.StabilityWarning, match=r"lr_shadow=0.05.*2/λ_max\(H\)²"):
        method.init(problem, x0, y0)
    with pytest.raises(ValueError, match="stability bound"):
        method.replace(stability_check="error").init(problem, x0, y0)
    with pytest.raises(ValueError, match=r"lr_lower=0.3.*2/λ_max\(H\)"):
        method.replace(lr_lower=0.3, lr_shadow=0.01, stability_check="error").init(problem, x0, y0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shadow_start": "random"}, "shadow_start"),
        ({"lr_shadow": 0.0}, "lr_shadow"),
        ({"shadow_steps": 0}, "shadow_steps"),
        ({"lower_steps": 0}, "steps"),
        ({"stability_check": "maybe"}, "stability_check"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bl.GALET(**kwargs)


def test_divergent_upper_step_raises_naming_iteration_and_quantity():
    method = bl.GALET(lr_upper=50.0, lr_lower=0.5, lower_steps=5, lr_shadow=0.5, shadow_steps=5)
    with pytest.raises(bl.DivergenceError, match=r"GALET diverged at iteration \d+: \w+"):
        bl.solve(T1(n=3), method, max_iters=200)


@pytest.mark.parametrize("field", ["lr_upper", "lr_lower", "lr_shadow"])
@pytest.mark.parametrize("value, shown", BAD_STEP_SIZES)
def test_step_sizes_reject_zero_negative_nonfinite_and_non_numbers(field, value, shown):
    """Every step size fails at construction with one line naming the class, the argument and the value."""
    assert_rejects_step_size(bl.GALET, field, value, shown)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lower_steps": 2.0}, r"^GALET\(lower_steps=2.0\) must be an integer >= 1, not a float$"),
        ({"shadow_steps": True}, r"^GALET\(shadow_steps=True\) must be an integer >= 1, not a bool$"),
        ({"shadow_start": "cold"}, r"^GALET\(shadow_start='cold'\) must be one of 'auto', 'zero', 'warm'$"),
        ({"exact_metric": "yes"}, r"^GALET\(exact_metric='yes'\) must be true or false, not a str$"),
        ({"stability_check": "on"}, r"^GALET\(stability_check='on'\) must be one of 'warn', 'error', 'off'$"),
        ({"project_x": 3.0}, r"^GALET\(project_x=3.0\) must be a projection such as bilevel.Box"),
        ({"oracles": "fd"}, r"^GALET\(oracles='fd'\) must be a bilevel.Oracles"),
    ],
)
def test_other_options_are_validated_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bl.GALET(**kwargs)
