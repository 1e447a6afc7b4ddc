import pytest
import torch

import bilevel as bl
from bilevel.problems import T1, T2, T3, T3_LOCAL_MINIMA, T4, T1g
from helpers import BAD_STEP_SIZES, assert_rejects_step_size


def _t1g(n=5, seed=3):
    problem = T1g(n=n, seed=seed)
    A, B, D, x_hat = (problem.metadata[k] for k in ("A", "B", "D", "x_hat"))
    return problem, A, B, D, x_hat


def _start(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(3))


@pytest.mark.parametrize("gamma", [0.5, 4.0])
def test_one_value_iteration_equals_hand_written_step_on_t1g(gamma):
    problem, A, B, D, x_hat = _t1g()
    alpha, beta, beta_w, T = 0.05, 0.3, 0.2, 3
    method = bl.PBGD(gamma=gamma, lr_upper=alpha, lr_lower=beta, lr_shadow=beta_w, shadow_steps=T)
    x0, y0, w0 = _start()
    state = method.init(problem, {"x": x0}, {"y": y0})
    state = state.replace(extra={**state.extra, "lower": bl.parts.ShadowState(z={"y": w0})})
    new, info = method.step(problem, state)
    w = w0.clone()
    for _ in range(T):
        w = w - beta_w * (A @ w - B.T @ x0)
    s = min(1.0, 1.0 / (gamma + 1e-8))  # the code's normaliser, with its guard
    d_x = s * (D @ (x0 - x_hat) + gamma * (-B @ y0 + B @ w))
    d_y = s * (A @ y0 + gamma * (A @ y0 - B.T @ x0))
    torch.testing.assert_close(new.x["x"], x0 - alpha * d_x, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.y["y"], y0 - beta * d_y, rtol=0, atol=1e-12)
    torch.testing.assert_close(new.extra["lower"].z["y"], w, rtol=0, atol=1e-12)
    g = lambda yy: 0.5 * yy @ A @ yy - x0 @ B @ yy
    assert info["constraint"].item() == pytest.approx((g(y0) - g(w)).item(), rel=1e-12)
    assert info["penalty"].item() == gamma


def test_one_gradient_iteration_equals_hand_written_step_on_t1g():
    problem, A, B, D, x_hat = _t1g()
    gamma, alpha, beta = 3.0, 0.05, 0.3
    method = bl.PBGD(variant="gradient", gamma=gamma, lr_upper=alpha, lr_lower=beta, normalise=False)
    x0, y0, _ = _start()
    new, info = method.step(problem, method.init(problem, {"x": x0}, {"y": y0}))
    r = A @ y0 - B.T @ x0  # ∇_y g; the penalty ½‖r‖² has gradients (J r, H r) = (−B r, A r)
    torch.testing.assert_close(new.x["x"], x0 - alpha * (D @ (x0 - x_hat) + gamma * (-B @ r)), rtol=0, atol=1e-12)
    torch.testing.assert_close(new.y["y"], y0 - beta * (A @ y0 + gamma * (A @ r)), rtol=0, atol=1e-12)
    assert info["constraint"].item() == pytest.approx(0.5 * (r @ r).item(), rel=1e-12)


def _value_rest_point(A, B, D, x_hat, gamma):
    """V-PBGD on T1g (∇²_yy f = A): the implicit gradient with A replaced by A + A/γ."""
    M = B @ torch.linalg.solve(A * (1.0 + 1.0 / gamma), A @ torch.linalg.solve(A, B.T))
    return torch.linalg.solve(M + D, D @ x_hat)


def _gradient_rest_point(A, B, D, x_hat, gamma):
    """G-PBGD on T1g: B(A + I/γ)⁻¹Bᵀ in place of BA⁻¹Bᵀ."""
    n = A.shape[0]
    M = B @ torch.linalg.solve(A + torch.eye(n, dtype=A.dtype) / gamma, B.T)
    return torch.linalg.solve(M + D, D @ x_hat)


@pytest.mark.parametrize("variant, rest", [("value", _value_rest_point), ("gradient", _gradient_rest_point)])
def test_bias_as_a_function_of_the_penalty_matches_the_closed_form_on_t1g(variant, rest):
    """The rest point is the closed form of docs/methods/pbgd.md#bias-as-a-function-of-the-penalty;
    its distance to x* falls like 1/γ."""
    problem, A, B, D, x_hat = _t1g(n=3, seed=1)
    L = float(torch.linalg.eigvalsh(A).max())
    lr = 0.5 / (L * (1.0 + L)) if variant == "gradient" else 0.5 / L  # s(γ) keeps the curvature O(L) (O(L²) for G)
    errors = []
    for gamma in (1.0, 4.0, 16.0):
        method = bl.PBGD(variant=variant, gamma=gamma, lr_upper=lr, lr_lower=lr, lr_shadow=1.0 / L, shadow_steps=3)
        result = bl.solve(problem, method, max_iters=2500, log_every=500)
        expected = rest(A, B, D, x_hat, gamma)
        torch.testing.assert_close(result.x["x"], expected, rtol=0, atol=1e-5)
        errors.append((expected - problem.x_star["x"]).norm().item())
    assert errors[0] > 3 * errors[1] > 9 * errors[2] > 0  # O(1/γ): the ratio tends to 4


def test_an_increasing_penalty_schedule_removes_the_bias_on_t1():
    """Fixed γ = 10 stops at (1 + γ)/(1 + 2γ) = 0.5238; a linear ramp to γ = 100 gets to 101/201 = 0.5025."""
    fixed = bl.solve(T1(n=3), bl.PBGD(gamma=10.0, lr_upper=0.5, lr_lower=0.5, lr_shadow=0.5, shadow_steps=3), max_iters=1500, log_every=500)
    torch.testing.assert_close(fixed.x["x"], torch.full((3,), 11 / 21, dtype=torch.float64), rtol=0, atol=1e-8)
    ramp = bl.schedules.Linear(10.0, 100.0, 500)
    method = bl.PBGD(gamma=ramp, lr_upper=0.5, lr_lower=0.5, lr_shadow=0.5, shadow_steps=3)
    ramped = bl.solve(T1(n=3), method, max_iters=3000, log_every=1000)
    torch.testing.assert_close(ramped.x["x"], torch.full((3,), 101 / 201, dtype=torch.float64), rtol=0, atol=1e-6)


def test_t3_random_starts_end_near_the_local_minima_of_the_value_function():
    """The authors' toy (γ = 10, step 0.1/γ on f + γg, X = [0, 3]): the ends lie O(1/γ) from the
    three local minima of Φ and |x + y| = O(1/γ)."""
    problem = T3(copies=30, seed=0)
    method = bl.PBGD(gamma=10.0, lr_upper=0.1, lr_lower=0.1, lr_shadow=0.1, shadow_steps=5, project_x=bl.Box(0.0, 3.0))
    result = bl.solve(problem, method, max_iters=2000, log_every=500)
    ends = result.x["x"]
    nearest = torch.stack([(ends - m).abs() for m in T3_LOCAL_MINIMA]).min(dim=0)
    assert nearest.values.max().item() < 0.05
    assert set(nearest.indices.tolist()) == {0, 1, 2}
    assert (ends + result.y["y"]).abs().max().item() < 0.05


def test_t2_and_t4_reach_the_optimistic_solution_up_to_the_penalty_bias():
    """T2 (merely convex) and T4 (wide convex PL): the joint descent on f selects the optimistic y
    (exactly on T2; within the O(1/γ) bias on T4)."""
    t2 = bl.solve(T2(n=3), bl.PBGD(gamma=10.0, lr_upper=0.5, lr_lower=0.5, lr_shadow=0.5, shadow_steps=3), max_iters=1500, log_every=500)
    assert (t2.x["x"] - 1.0).abs().max().item() < 1e-8  # no bias on T2: the penalty vanishes at y1 = x
    problem = T4(m=3, d=8, seed=0)
    L = problem.smoothness["L_g"]
    method = bl.PBGD(gamma=100.0, lr_upper=0.5, lr_lower=0.5 / L, lr_shadow=1.0 / L, shadow_steps=5)
    t4 = bl.solve(problem, method, max_iters=2000, log_every=500)
    assert (t4.x["x"] - problem.x_star["x"]).norm().item() < 0.02


def test_oracle_calls_per_iteration_match_the_cost_table():
    counting = bl.CountingOracles()
    problem = T1(n=3)
    value = bl.PBGD(shadow_steps=3, oracles=counting)
    state = value.init(problem)
    counting.reset()
    value.step(problem, state)
    assert counting.counts == {"gradient_y": 3, "gradients": 2}
    gradient = bl.PBGD(variant="gradient", oracles=counting)
    counting.reset()
    gradient.step(problem, gradient.init(problem))
    assert counting.counts == {"gradients": 1, "linearize": 1, "both": 1}


def test_penalty_controller_and_shadow_state_round_trip():
    penalty = bl.PBGD(gamma=bl.schedules.Linear(0.0, 0.2, 100)).penalty
    assert penalty(0) == 0.0 and penalty(50) == pytest.approx(0.1) and penalty(500) == pytest.approx(0.2)
    assert penalty.scale(50) == 1.0  # s(γ) = min(1, 1/γ): small penalties are not normalised
    assert bl.parts.Penalty(40.0, normalise=True).scale(0) == pytest.approx(1 / 40)
    state = bl.PBGD(lr_shadow=0.1).init(T1(n=2))
    assert isinstance(state.extra["lower"], bl.parts.ShadowState)
    assert bl.State.from_dict(state.to_dict()) == state
    auto = bl.PBGD().init(T1(n=2))  # auto shadow: ω next to its AdGD state, and the joint DoG state
    assert isinstance(auto.extra["lower"], bl.auto.AdaptiveLowerState) and "omega" in auto.extra and "joint" in auto.extra
    restored = bl.State.from_dict(auto.to_dict())
    assert torch.equal(restored.extra["omega"]["y"], auto.extra["omega"]["y"]) and torch.equal(
        restored.extra["lower"].beta, auto.extra["lower"].beta
    )


@pytest.mark.parametrize(
    "gamma, match",
    [
        (
            bl.schedules.Linear(10.0, 1.0, 100),
            r"^PBGD\(gamma=Linear\(start=10.0, end=1.0, steps=100\)\) decreases \(10 at k = 0, 1 at k = 100\)",
        ),
        (bl.schedules.Polynomial(10.0, 0.5), r"^PBGD\(gamma=Polynomial\(.*\)\) decreases \(10 at k = 0, 0.3\d+ at k = 1000\)"),
        (bl.schedules.Exponential(1.0, 0.99), r"^PBGD\(gamma=Exponential\(.*\)\) decreases"),
        (lambda k: 5.0 if k < 10 else 1.0, r"^PBGD\(gamma=<function .*>\) decreases \(5 at k = 5, 1 at k = 10\)"),
        (lambda k: -1.0, r"gives -1.0 at k = 0: a penalty must be a finite number >= 0"),
        (-1.0, r"^PBGD\(gamma=-1.0\) must be a number >= 0 \(finite\)$"),
        (float("inf"), r"^PBGD\(gamma=inf\) must be a number >= 0 \(finite\)$"),
        ("10", r"^PBGD\(gamma='10'\) must be a number >= 0 or a nondecreasing schedule"),
    ],
)
def test_a_decreasing_or_negative_penalty_fails_with_one_line(gamma, match):
    with pytest.raises(ValueError, match=match):
        bl.PBGD(gamma=gamma)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "both"}, r"^PBGD\(variant='both'\) must be one of 'value', 'gradient'$"),
        ({"normalise": 1}, r"^PBGD\(normalise=1\) must be true or false, not an int$"),
        ({"shadow_steps": 0}, r"^PBGD\(shadow_steps=0\) must be an integer >= 1$"),
    ],
)
def test_other_options_are_validated_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bl.PBGD(**kwargs)


@pytest.mark.parametrize("field", ["lr_upper", "lr_lower", "lr_shadow"])
@pytest.mark.parametrize("value, shown", BAD_STEP_SIZES)
def test_step_sizes_reject_zero_negative_nonfinite_and_non_numbers(field, value, shown):
    assert_rejects_step_size(bl.PBGD, field, value, shown)


@pytest.mark.parametrize("name", ["bilevel.methods.pbgd", "bilevel.parts.value"])
def test_docstring_examples_run_and_print_what_they_claim(name):
    import doctest
    import importlib

    failures, attempted = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0 and failures == 0
