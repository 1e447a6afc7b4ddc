import pytest
import torch

import bilevel as bl
from bilevel.problems import T1, T2, T3, T3_LOCAL_MINIMA, T4, T1g
from helpers import BAD_STEP_SIZES, assert_rejects_step_size


def _t1g(n=5, seed=3):
    problem = T1g(n=n, seed=seed)
    A, B, D, x_hat = (problem.metadata[k] for k in ("A", "B", "D", "x_hat"))
    return problem, A, B, D, x_hat


@pytest.mark.parametrize("phi", ["gradient", "value"])
def test_one_iteration_equals_hand_written_step_on_t1g(phi):
    problem, A, B, D, x_hat = _t1g()
    alpha, beta, beta_hat, T, eta, eps = 0.05, 0.3, 0.2, 4, 0.5, 1e-4
    method = bl.BOME(lr_upper=alpha, lr_lower=beta, lr_shadow=beta_hat, shadow_steps=T, eta=eta, phi=phi, eps=eps)
    gen = torch.Generator().manual_seed(0)
    x0, y0 = (torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(2))
    new, info = method.step(problem, method.init(problem, {"x": x0}, {"y": y0}))

    g = lambda x, y: 0.5 * y @ A @ y - x @ B @ y
    y_hat = y0.clone()
    for _ in range(T):
        y_hat = y_hat - beta_hat * (A @ y_hat - B.T @ x0)
    q = g(x0, y0) - g(x0, y_hat)
    dq_x, dq_y = -B @ y0 + B @ y_hat, A @ y0 - B.T @ x0  # ∇_x g(x, y) − ∇_x g(x, ŷ), ∇_y g(x, y)
    df_x, df_y = D @ (x0 - x_hat), A @ y0
    norm, dot = dq_x @ dq_x + dq_y @ dq_y, df_x @ dq_x + df_y @ dq_y
    lam = max(eta - dot / (norm + eps), 0.0) if phi == "gradient" else max((eta * q - dot) / (norm + eps), 0.0)
    torch.testing.assert_close(new.x["x"], x0 - alpha * (df_x + lam * dq_x), rtol=0, atol=1e-12)
    torch.testing.assert_close(new.y["y"], y0 - beta * (df_y + lam * dq_y), rtol=0, atol=1e-12)
    assert info["constraint"].item() == pytest.approx(q.item(), rel=1e-12)
    assert info["multiplier"].item() == pytest.approx(float(lam), rel=1e-12, abs=1e-14)


def test_the_barrier_invariant_holds_at_random_points():
    """⟨d, ∇q̂⟩ = max(φ, ⟨∇f, ∇q̂⟩) with ε = 0: the step never decreases the gap slower than φ."""
    problem, A, B, D, x_hat = _t1g()
    gen = torch.Generator().manual_seed(1)
    for phi in ("gradient", "value"):
        method = bl.BOME(lr_upper=1.0, lr_lower=1.0, shadow_steps=3, lr_shadow=0.3, eta=0.7, phi=phi, eps=0.0)
        for _ in range(5):
            x0, y0 = (torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(2))
            state = method.init(problem, {"x": x0}, {"y": y0})
            new, info = method.step(problem, state)
            d_x, d_y = x0 - new.x["x"], y0 - new.y["y"]  # unit steps: the direction itself
            y_hat = y0.clone()
            for _ in range(3):
                y_hat = y_hat - 0.3 * (A @ y_hat - B.T @ x0)
            dq_x, dq_y = -B @ y0 + B @ y_hat, A @ y0 - B.T @ x0
            df_dot = (D @ (x0 - x_hat)) @ dq_x + (A @ y0) @ dq_y
            barrier = 0.7 * (dq_x @ dq_x + dq_y @ dq_y) if phi == "gradient" else 0.7 * info["constraint"]
            assert (d_x @ dq_x + d_y @ dq_y).item() == pytest.approx(max(barrier.item(), df_dot.item()), rel=1e-10)


@pytest.mark.parametrize("T, beta_hat", [(1, 0.5), (2, 0.5), (3, 0.3)])
def test_rest_point_on_t1_is_the_t_step_truncation_closed_form(T, beta_hat):
    """On T1 the barrier multiplier grows until ε balances it (λ ≈ η(1 + ‖∇q̂‖²/ε), hundreds here),
    y → y*(x) and x → the root of (x − 1) + (1 − ρ^T) x = 0, ρ = 1 − β_ŷ: ŷ_T's truncation bias,
    that of a T-term Neumann series (docs/methods/bome.md#bias-the-t-step-truncation)."""
    rho_T = (1.0 - beta_hat) ** T
    method = bl.BOME(lr_upper=0.2, lr_lower=0.5, lr_shadow=beta_hat, shadow_steps=T, eta=0.5)
    result = bl.solve(T1(n=2), method, max_iters=3000, log_every=1000)
    expected = 1.0 / (2.0 - rho_T)
    torch.testing.assert_close(result.x["x"], torch.full((2,), expected, dtype=torch.float64), rtol=0, atol=2e-3)
    assert result.final["multiplier"] > 100 and result.final["constraint"] < 1e-4


def test_t2_reaches_the_optimistic_solution():
    """T2 (merely convex lower level): the joint descent on f moves y2, so BOME selects x* = 1."""
    result = bl.solve(T2(n=4), bl.BOME(lr_upper=0.2, lr_lower=0.5, lr_shadow=0.5, shadow_steps=10, eta=0.5), max_iters=1500, log_every=500)
    torch.testing.assert_close(result.x["x"], torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(result.y["y2"], torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-6)


def test_t3_random_starts_end_near_local_minima_of_the_value_function():
    """T3 (nonconvex PL lower level, 10 starts in one run, so one λ for all): with steps 0.01 every
    end lies within 0.01 of a local minimum of Φ (0.3824 or 2.8296 from these starts; 0.019 with
    steps 0.02: the offset is O(α)) and y within 0.03 of y*(x) = −x."""
    problem = T3(copies=10, seed=0)
    method = bl.BOME(lr_upper=0.01, lr_lower=0.01, lr_shadow=0.1, shadow_steps=10, eta=0.5, project_x=bl.Box(0.0, 3.0))
    result = bl.solve(problem, method, max_iters=2000, log_every=1000)
    ends = result.x["x"]
    nearest = torch.stack([(ends - m).abs() for m in T3_LOCAL_MINIMA]).min(dim=0)
    assert nearest.values.max().item() < 0.01
    assert set(nearest.indices.tolist()) == {0, 2}
    assert (ends + result.y["y"]).abs().max().item() < 0.03


def test_t4_end_point_approaches_the_optimistic_solution_in_proportion_to_the_step():
    """T4 (wide least squares, convex PL): with fixed steps α the multiplier grows until α λ
    balances the curvature of q̂ (λ ≈ 0.8/α) and the iterates settle O(α) from (x_opt, y_opt):
    0.035 for α = 0.05, 0.018 for α = 0.025. The first-order extrapolation 2e(α/2) − e(α) is
    below 1e-3, so the limit α → 0 is x_opt (a wrong rest point would leave a floor)."""
    problem = T4(m=3, d=8, seed=0)
    L = problem.smoothness["L_g"]
    errors = []
    for alpha, iters in ((0.05, 600), (0.025, 1200)):
        method = bl.BOME(lr_upper=alpha, lr_lower=alpha, lr_shadow=1.0 / L, shadow_steps=20, eta=0.5)
        result = bl.solve(problem, method, max_iters=iters, log_every=iters)
        errors.append((result.x["x"] - problem.x_star["x"]).norm().item())
        assert (result.y["y"] - problem.y_star["y"]).norm().item() < alpha
    assert 0.02 < errors[0] < 0.05
    assert 1.7 < errors[0] / errors[1] < 2.3
    assert abs(2 * errors[1] - errors[0]) < 3e-3


def test_oracle_calls_per_iteration_match_the_cost_table():
    counting = bl.CountingOracles()
    problem = T1(n=3)
    method = bl.BOME(shadow_steps=4, lower_steps=2, oracles=counting)
    state = method.init(problem)
    counting.reset()
    method.step(problem, state)
    # T + lower_steps gradients in y, one gradient of f, one of the value gap; nothing second order
    assert counting.counts == {"gradient_y": 6, "gradients": 2}


def test_boat_vfo_options_add_lower_steps_and_momentum_on_y_hat():
    problem, A, B, D, x_hat = _t1g()
    gen = torch.Generator().manual_seed(2)
    x0, y0 = (torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(2))
    beta, T, m, u1 = 0.1, 3, 0.5, 0.2
    method = bl.BOME(lr_upper=0.05, lr_lower=beta, lr_shadow=0.2, shadow_steps=T, eta=u1, phi="value", shadow_momentum=m, lower_steps=T)
    new, _ = method.step(problem, method.init(problem, {"x": x0}, {"y": y0}))
    y = y0.clone()
    for _ in range(T):  # BOAT's VFO first trains y itself
        y = y - beta * (A @ y - B.T @ x0)
    y_hat, buf = y.clone(), torch.zeros(5, dtype=torch.float64)
    for _ in range(T):  # then ŷ by SGD with momentum (torch.optim.SGD's heavy ball from a zero buffer)
        buf = m * buf + (A @ y_hat - B.T @ x0)
        y_hat = y_hat - 0.2 * buf
    g = lambda x, yy: 0.5 * yy @ A @ yy - x @ B @ yy
    dq_x, dq_y = -B @ y + B @ y_hat, A @ y - B.T @ x0
    df_x, df_y = D @ (x0 - x_hat), A @ y
    lam = max((u1 * (g(x0, y) - g(x0, y_hat)) - (df_x @ dq_x + df_y @ dq_y)) / (dq_x @ dq_x + dq_y @ dq_y + 1e-8), 0.0)
    torch.testing.assert_close(new.y["y"], y - beta * (df_y + lam * dq_y), rtol=0, atol=1e-12)
    torch.testing.assert_close(new.x["x"], x0 - 0.05 * (df_x + lam * dq_x), rtol=0, atol=1e-12)


def test_checkpoint_round_trip_and_parts():
    method = bl.BOME(shadow_steps=3, lr_shadow=0.2)
    assert method.parts.lower == bl.parts.Shadow(lr=0.2, steps=3, start="restart")
    state = method.init(T1(n=2))
    assert bl.State.from_dict(state.to_dict()) == state


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eta": 0.0}, r"^BOME\(eta=0.0\) must be a positive number"),
        ({"eta": -0.5}, r"^BOME\(eta=-0.5\) must be a positive number"),
        ({"phi": "norm"}, r"^BOME\(phi='norm'\) must be one of 'gradient', 'value'$"),
        ({"eps": -1e-8}, r"^BOME\(eps=-1e-08\) must be a number >= 0"),
        ({"shadow_momentum": 1.0}, r"^BOME\(shadow_momentum=1.0\) must be a finite number in \[0, 1\)$"),
        ({"shadow_steps": 0}, r"^BOME\(shadow_steps=0\) must be an integer >= 1$"),
        ({"lower_steps": -1}, r"^BOME\(lower_steps=-1\) must be an integer >= 0$"),
    ],
)
def test_bad_options_fail_at_construction_with_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bl.BOME(**kwargs)


@pytest.mark.parametrize("field", ["lr_upper", "lr_lower", "lr_shadow"])
@pytest.mark.parametrize("value, shown", BAD_STEP_SIZES)
def test_step_sizes_reject_zero_negative_nonfinite_and_non_numbers(field, value, shown):
    assert_rejects_step_size(bl.BOME, field, value, shown)


@pytest.mark.parametrize("name", ["bilevel.methods.bome"])
def test_docstring_examples_run_and_print_what_they_claim(name):
    import doctest
    import importlib

    failures, attempted = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0 and failures == 0
