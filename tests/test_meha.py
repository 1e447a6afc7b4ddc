import dataclasses

import pytest
import torch

import bilevel as bl
from bilevel.problems import T1, T2, T3, T3_LOCAL_MINIMA, T4, T1g
from helpers import BAD_STEP_SIZES, assert_rejects_step_size


def _t1g(n=5, seed=3):
    problem = T1g(n=n, seed=seed)
    A, B, D, x_hat = (problem.metadata[k] for k in ("A", "B", "D", "x_hat"))
    return problem, A, B, D, x_hat


@pytest.mark.parametrize("order", ["jacobi", "y_first", "x_first"])
def test_one_iteration_equals_hand_written_step_on_t1g(order):
    problem, A, B, D, x_hat = _t1g()
    alpha, beta, eta, gamma, c0, p, k = 0.05, 0.3, 0.2, 0.7, 2.0, 0.25, 3
    method = bl.MEHA(lr_upper=alpha, lr_lower=beta, lr_shadow=eta, gamma=gamma, c0=c0, p=p, order=order)
    gen = torch.Generator().manual_seed(0)
    x0, y0, th0 = (torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(3))
    state = method.init(problem, {"x": x0}, {"y": y0})
    state = state.replace(k=k, extra={**state.extra, "lower": bl.parts.ShadowState(z={"y": th0})})
    new, info = method.step(problem, state)

    c = c0 * (k + 1) ** p
    grad_y_g = lambda x, y: A @ y - B.T @ x
    th = th0 - eta * (grad_y_g(x0, th0) + (th0 - y0) / gamma)
    d_y = lambda x, y: (A @ y) / c + grad_y_g(x, y) - (y - th) / gamma
    d_x = lambda x, y: (D @ (x - x_hat)) / c - B @ y + B @ th  # ∇_x f/c + ∇_x g(x, y) − ∇_x g(x, θ)
    if order == "jacobi":
        y1, x1 = y0 - beta * d_y(x0, y0), x0 - alpha * d_x(x0, y0)
    elif order == "y_first":
        y1 = y0 - beta * d_y(x0, y0)
        x1 = x0 - alpha * d_x(x0, y1)
    else:
        x1 = x0 - alpha * d_x(x0, y0)
        y1 = y0 - beta * d_y(x1, y0)
    torch.testing.assert_close(new.extra["lower"].z["y"], th, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.y["y"], y1, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.x["x"], x1, rtol=0, atol=1e-12)
    assert info["penalty"].item() == pytest.approx(c)


@pytest.mark.parametrize("order", ["jacobi", "y_first", "x_first"])
def test_moreau_gap_is_the_quadratic_closed_form_at_the_proximal_point(order):
    """On a quadratic lower level g − e_γ = (γ/2) ∇_y gᵀ (I + γA)⁻¹ ∇_y g: the value-gap (γ → ∞)
    and gradient-norm (γ → 0) penalties are its two ends."""
    problem, A, B, _, _ = _t1g()
    gamma = 0.8
    method = bl.MEHA(lr_shadow=0.2, shadow_steps=200, gamma=gamma, order=order)  # θ → θ*_γ(x, y), gap at (x_k, y_k)
    gen = torch.Generator().manual_seed(4)
    x0, y0 = (torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(2))
    _, info = method.step(problem, method.init(problem, {"x": x0}, {"y": y0}))
    r = A @ y0 - B.T @ x0
    expected = 0.5 * gamma * r @ torch.linalg.solve(torch.eye(5, dtype=torch.float64) + gamma * A, r)
    assert info["moreau_gap"].item() == pytest.approx(expected.item(), rel=1e-10)


def _rest_point(A, B, D, x_hat, c, gamma):
    """The stationary point of f + c (g − e_γ) on T1g (f = ½yᵀAy + ½(x − x̂)ᵀD(x − x̂)):
    y = cγ (I + γ(1 + c)A)⁻¹ Bᵀx, and D(x − x̂) = cγ B (I + γA)⁻¹ (A y − Bᵀx)."""
    n = A.shape[0]
    eye = torch.eye(n, dtype=A.dtype)
    Y = c * gamma * torch.linalg.solve(eye + gamma * (1.0 + c) * A, B.T)  # y = Y x
    R = A @ Y - B.T  # ∇_y g = R x
    M = -c * gamma * B @ torch.linalg.solve(eye + gamma * A, R)
    return torch.linalg.solve(M + D, D @ x_hat)


def test_bias_as_a_function_of_c_matches_the_closed_form_on_t1g():
    """With p = 0 (fixed c) MEHA rests at the stationary point of f + c(g − e_γ): O(1/c) from x*
    (docs/methods/meha.md#bias-as-a-function-of-c)."""
    problem, A, B, D, x_hat = _t1g(n=3, seed=1)
    L = float(torch.linalg.eigvalsh(A).max())
    gamma, errors = 1.0, []
    for c in (1.0, 4.0, 16.0):
        lr = 0.5 / (L * (1.0 + 1.0 / c))  # the y-curvature of f/c + g − e_γ is below L (1 + 1/c)
        method = bl.MEHA(lr_upper=lr, lr_lower=lr, lr_shadow=0.5 / (L + 1.0 / gamma), shadow_steps=2, gamma=gamma, c0=c, p=0.0)
        result = bl.solve(problem, method, max_iters=2500, log_every=500)
        expected = _rest_point(A, B, D, x_hat, c, gamma)
        torch.testing.assert_close(result.x["x"], expected, rtol=0, atol=1e-5)
        errors.append((expected - problem.x_star["x"]).norm().item())
    assert errors[0] > 2 * errors[1] > 4 * errors[2] > 0  # O(1/c)


def test_a_growing_c_moves_t1_towards_the_solution():
    """On T1 the fixed-c rest point is x = (1/c + 1/2)/(1/c + 1) (γ = 1); c_k = c₀(k+1)^p, p > 0,
    does better than its starting value c₀ after the same number of steps."""
    fixed = bl.solve(T1(n=2), bl.MEHA(lr_upper=0.3, lr_lower=0.3, lr_shadow=0.5, gamma=1.0, c0=2.0, p=0.0), max_iters=1500, log_every=500)
    torch.testing.assert_close(fixed.x["x"], torch.full((2,), 1.0 / 1.5, dtype=torch.float64), rtol=0, atol=1e-6)
    grown = bl.solve(T1(n=2), bl.MEHA(lr_upper=0.3, lr_lower=0.3, lr_shadow=0.5, gamma=1.0, c0=2.0, p=0.45), max_iters=1500, log_every=500)
    assert abs(grown.x["x"][0].item() - 0.5) < 0.5 * abs(fixed.x["x"][0].item() - 0.5)


def test_t2_and_t4_reach_the_optimistic_solution():
    """T2 (merely convex) has no MEHA bias (the penalty vanishes on S(x) whatever y2); on T4 the
    bias is O(1/c)."""
    t2 = bl.solve(T2(n=3), bl.MEHA(lr_upper=0.3, lr_lower=0.3, lr_shadow=0.5, gamma=1.0, c0=2.0, p=0.0), max_iters=1500, log_every=500)
    assert (t2.x["x"] - 1.0).abs().max().item() < 1e-6
    problem = T4(m=3, d=8, seed=0)
    L = problem.smoothness["L_g"]
    method = bl.MEHA(lr_upper=0.3, lr_lower=0.3 / L, lr_shadow=0.5 / (L + 1.0), gamma=1.0, c0=50.0, p=0.0)
    t4 = bl.solve(problem, method, max_iters=3000, log_every=1000)
    assert (t4.x["x"] - problem.x_star["x"]).norm().item() < 0.05


def test_t3_random_starts_end_near_the_local_minima_of_the_value_function_with_an_o_1_over_c_offset():
    """T3 (nonconvex PL lower level, 10 starts in one run) with γ = 10 (a penalty close to the value
    gap; the persistent θ still follows g to its global minimum in y): every end lies near a local
    minimum of Φ, all three reached, 0.027 away for c = 10 and 0.0027 for c = 100 (O(1/c)), with
    |x + y| = 0.035 and 0.0027. γ = 0.2, below the inverse weak-convexity modulus ¼, leaves 4 of
    the 10 starts at spurious stationary points (docs/methods/meha.md)."""
    offsets = []
    for c in (10.0, 100.0):
        problem = T3(copies=10, seed=0)
        method = bl.MEHA(lr_upper=0.1, lr_lower=0.1, lr_shadow=0.1, gamma=10.0, c0=c, p=0.0, project_x=bl.Box(0.0, 3.0))
        result = bl.solve(problem, method, max_iters=2000, log_every=1000)
        ends = result.x["x"]
        nearest = torch.stack([(ends - m).abs() for m in T3_LOCAL_MINIMA]).min(dim=0)
        assert set(nearest.indices.tolist()) == {0, 1, 2}
        assert (ends + result.y["y"]).abs().max().item() < 0.5 / c
        offsets.append(nearest.values.max().item())
    assert offsets[0] < 0.05 and offsets[1] < 0.005
    assert offsets[0] > 5 * offsets[1]  # the O(1/c) bias: the ratio is 10


def test_oracle_calls_per_iteration_match_the_cost_table():
    # one backward pass per block and no evaluation of g(x, θ) where its gradient is zero:
    # the y-block evaluates f and g(x, y); the x- and Jacobi blocks f, g(x, y) and g(x, θ)
    counting = bl.CountingOracles()
    evaluations = {"upper": 0, "lower": 0}

    def counted(name, fn):
        def wrapper(x, y, batch):
            evaluations[name] += 1
            return fn(x, y, batch)

        return wrapper

    base = T1(n=3)
    problem = dataclasses.replace(base, upper=counted("upper", base.upper), lower=counted("lower", base.lower))
    shadow_steps = 2
    calls = {
        "jacobi": ({"gradient_y": 2, "gradients": 1}, {"upper": 1, "lower": shadow_steps + 2}),
        "y_first": ({"gradient_y": 4}, {"upper": 2, "lower": shadow_steps + 3}),
        "x_first": ({"gradient_y": 4}, {"upper": 2, "lower": shadow_steps + 3}),
    }
    for order, (expected_calls, expected_evaluations) in calls.items():
        method = bl.MEHA(shadow_steps=shadow_steps, order=order, oracles=counting)
        state = method.init(problem)
        counting.reset()
        evaluations.update(upper=0, lower=0)
        method.step(problem, state)
        assert counting.counts == expected_calls, order
        assert evaluations == expected_evaluations, order


def test_parts_and_checkpoint_round_trip():
    method = bl.MEHA(lr_shadow=0.3, gamma=2.0)
    assert method.parts.lower == bl.parts.Shadow(lr=0.3, steps=1, start="persistent", gamma=2.0)
    assert method.penalty_schedule(0) == pytest.approx(0.2) and method.penalty_schedule(15) == pytest.approx(0.4)
    state = method.init(T1(n=2))
    assert bl.State.from_dict(state.to_dict()) == state


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"p": 0.5}, r"^MEHA\(p=0.5\) must be a number in \[0, 0.5\) \(c_k = c0 \(k\+1\)\^p; the theory needs p < 1/2\)$"),
        ({"p": -0.1}, r"^MEHA\(p=-0.1\) must be a number in \[0, 0.5\)"),
        ({"gamma": 0.0}, r"^MEHA\(gamma=0.0\) must be a positive number"),
        ({"c0": -1.0}, r"^MEHA\(c0=-1.0\) must be a positive number"),
        ({"order": "gauss"}, r"^MEHA\(order='gauss'\) must be one of 'jacobi', 'y_first', 'x_first'$"),
    ],
)
def test_parameters_outside_their_range_fail_with_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bl.MEHA(**kwargs)


@pytest.mark.parametrize("field", ["lr_upper", "lr_lower", "lr_shadow"])
@pytest.mark.parametrize("value, shown", BAD_STEP_SIZES)
def test_step_sizes_reject_zero_negative_nonfinite_and_non_numbers(field, value, shown):
    assert_rejects_step_size(bl.MEHA, field, value, shown)


@pytest.mark.parametrize("name", ["bilevel.methods.meha"])
def test_docstring_examples_run_and_print_what_they_claim(name):
    import doctest
    import importlib

    failures, attempted = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0 and failures == 0
