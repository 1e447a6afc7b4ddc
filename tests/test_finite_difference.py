"""bilevel.finite_difference: DARTS's central-difference products and the one-term multiplier,
in float64 against the exact products and closed forms."""

import math

import pytest
import torch

import bilevel as bl
import bilevel.tree as T
from bilevel.finite_difference import HessianFree, OneTerm, central_difference_step


def _t3_point():
    problem = bl.problems.T3(copies=3)
    gen = torch.Generator().manual_seed(3)
    x = {"x": torch.rand(3, generator=gen, dtype=torch.float64) + 0.5}
    y = {"y": torch.randn(3, generator=gen, dtype=torch.float64)}
    v = {"y": torch.randn(3, generator=gen, dtype=torch.float64)}
    return problem, x, y, v


def test_step_rule_is_r_over_the_norm_of_v_over_all_tensors():
    v = {"a": torch.tensor([3.0], dtype=torch.float64), "b": torch.tensor([4.0], dtype=torch.float64)}
    assert float(central_difference_step(0.01, v)) == pytest.approx(0.01 / 5.0, rel=1e-15)
    # points at distance r from y whatever the scale of v: the products are linear in v
    problem, x, y, w = _t3_point()
    lin = HessianFree(r=1e-3).linearize(problem.lower, x, y, None)
    small, large = lin.hvp(w)["y"], lin.hvp(T.scale(1e6, w))["y"]
    assert torch.allclose(large, 1e6 * small, rtol=1e-12)


@pytest.mark.parametrize("which", ["hvp", "mixed"])
def test_central_differences_have_second_order_error(which):
    # T3's g = (x+y)² + x sin²(x+y) is not quadratic in y: the error is c r² + O(r⁴)
    problem, x, y, v = _t3_point()
    exact = getattr(bl.Oracles().linearize(problem.lower, x, y, None), which)(v)
    errors = []
    for r in (4e-2, 2e-2, 1e-2):
        approx = getattr(HessianFree(r=r).linearize(problem.lower, x, y, None), which)(v)
        errors.append(float(T.norm(T.sub(approx, exact))))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(ratio == pytest.approx(4.0, rel=0.02) for ratio in ratios), (errors, ratios)


def test_exact_when_the_objective_is_quadratic_in_y():
    problem = bl.problems.T1g(n=6)
    x, y = problem.x_init, problem.y_init
    v = {"y": torch.linspace(-1.0, 2.0, 6, dtype=torch.float64)}
    exact = bl.Oracles().linearize(problem.lower, x, y, None).both(v)
    approx = HessianFree(r=0.01).linearize(problem.lower, x, y, None).both(v)
    for a, e in zip(approx, exact, strict=True):
        assert torch.allclose(a["x" if "x" in a else "y"], e["x" if "x" in e else "y"], rtol=1e-10, atol=1e-12)


def test_cost_is_two_gradients_per_product():
    counting = bl.CountingOracles()
    problem, x, y, v = _t3_point()
    lin = HessianFree(gradients_from=counting).linearize(problem.lower, x, y, None)
    assert counting.counts == {"gradient_y": 1}
    lin.both(v)
    assert counting.counts == {"gradient_y": 1, "gradients": 2}
    lin.hvp(v)
    assert counting.counts == {"gradient_y": 3, "gradients": 2}
    lin = HessianFree(gradients_from=counting).linearize(problem.upper, x, y, None, with_grad_x=True)
    assert counting.counts["gradients"] == 3 and lin.grad_x is not None


def test_one_term_multiplier_is_tau_times_b_without_products():
    calls = []
    b = {"y": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    result = OneTerm(lr=0.3)(lambda u: calls.append(u) or u, b)
    assert torch.equal(result.v["y"], 0.3 * b["y"]) and not calls and result.residual_sq is None
    assert OneTerm(lr=0.3).hvps() == 0


def test_aid_with_darts_products_matches_exact_aid_to_second_order():
    # T3 is not quadratic: AID's direction with central-difference products differs by O(r²)
    problem, x, y, _ = _t3_point()
    exact = bl.AID(lr_lower=0.2, lower_steps=5)
    d_exact, _ = exact.direction(problem, exact.init(problem, x, y))
    errors = []
    for r in (2e-2, 1e-2):
        free = exact.replace(hessian_free=r)
        d_free, _ = free.direction(problem, free.init(problem, x, y))
        errors.append(float(T.norm(T.sub(d_free, d_exact))))
    assert 0 < errors[1] < 1e-3 * float(T.norm(d_exact))
    assert errors[0] / errors[1] == pytest.approx(4.0, rel=0.05)
    # the run goes to the same local minimum of Φ
    free = bl.solve(problem, bl.AID(lr_upper=0.05, lr_lower=0.2, lower_steps=20, hessian_free=1e-4), max_iters=30)
    assert float(free.x["x"][0]) == pytest.approx(bl.problems.T3_LOCAL_MINIMA[2], abs=1e-4)


def test_darts_direction_at_the_lower_solution_is_the_tau_identity_multiplier():
    # FAMILIES §C row DARTS, on T1g (H = A, J v = −B v): d = D(x − x̂) + τ B A y*
    problem = bl.problems.T1g(n=8)
    meta, tau = problem.metadata, 0.3
    x = {"x": torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)}
    y_star = {"y": torch.linalg.solve(meta["A"], meta["B"].T @ x["x"])}
    method = bl.AID(solver=OneTerm(lr=tau), hessian_free=0.01, lower_steps=1, lr_lower=tau)
    d, _ = method.direction(problem, method.init(problem, x, y_star))
    expected = meta["D"] @ (x["x"] - meta["x_hat"]) + tau * meta["B"] @ (meta["A"] @ y_star["y"])
    assert torch.allclose(d["x"], expected, rtol=1e-9)


def test_darts_direction_is_the_one_step_unrolled_gradient_when_j_does_not_depend_on_y():
    # the fixed DARTS differences around the original y, which is d/dx f(x, y − τ∇_y g(x, y)):
    # ITD with one warm-started step; on T1g J does not depend on y, so AID's placement agrees
    problem = bl.problems.T1g(n=8)
    tau = 0.2
    x, y = problem.x_init, {"y": torch.linspace(0.0, 1.0, 8, dtype=torch.float64)}
    darts = bl.AID(solver=OneTerm(lr=tau), hessian_free=0.01, lower_steps=1, lr_lower=tau)
    unrolled = bl.ITD(lower_steps=1, lr_lower=tau, warm_start=True)
    d_darts, _ = darts.direction(problem, darts.init(problem, x, y))
    d_unrolled, _ = unrolled.direction(problem, unrolled.init(problem, x, y))
    assert torch.allclose(d_darts["x"], d_unrolled["x"], rtol=1e-9)


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: HessianFree(r=0.0), "HessianFree(r=0.0) must be a positive number"),
        (lambda: HessianFree(r=-1e-3), "HessianFree(r=-0.001) must be a positive number"),
        (lambda: HessianFree(r=math.nan), "HessianFree(r=nan)"),
        (lambda: HessianFree(gradients_from="reverse"), "must be a bilevel.Oracles"),
        (lambda: HessianFree(gradients_from=HessianFree()), "must be a bilevel.Oracles"),
        (lambda: OneTerm(lr=0), "OneTerm(lr=0) must be a positive number"),
        (lambda: bl.AID(hessian_free=0.0), "AID(hessian_free=0.0) must be a positive number"),
    ],
)
def test_bad_arguments_fail_with_one_line(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_docstring_examples_run():
    import doctest

    import bilevel.finite_difference as module

    failures, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert attempted >= 8 and failures == 0, failures
