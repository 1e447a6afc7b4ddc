"""bilevel.parts: each part against its mathematics, in float64."""

import doctest
import importlib

import pytest
import torch

import bilevel as bl
from bilevel.parts import (
    DirectionNorm,
    DualCorrection,
    EmptyState,
    FixedStep,
    KKTResidual,
    LinearSolve,
    LineSearch,
    LowerAggregated,
    LowerGD,
    Parts,
    Periodic,
    PeriodicState,
    PlainDirection,
    ShadowResidual,
    Unroll,
    UnrollState,
    linearize,
)
from bilevel.problems import T1g

F64 = torch.float64
N = 6


def _spd(seed=0, eigenvalues=(1.0, 1.5, 2.0, 3.0, 4.0, 8.0)):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=F64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ q.T


H = _spd()
B = torch.randn(N, generator=torch.Generator().manual_seed(1), dtype=F64)
V0 = torch.linspace(-1.0, 1.0, N, dtype=F64)


class _Counting:
    """``matvec`` with H that counts its calls."""

    def __init__(self, M):
        self.M, self.calls = M, 0

    def __call__(self, v):
        self.calls += 1
        return self.M @ v


def _point(seed=3, mu=0.0):
    problem = T1g(n=N, seed=seed)
    gen = torch.Generator().manual_seed(seed + 10)
    x = {"x": torch.randn(N, generator=gen, dtype=F64)}
    y = {"y": torch.randn(N, generator=gen, dtype=F64)}
    return problem, x, y, linearize(bl.Oracles(), problem, mu, x, y, None)


# ----------------------------------------------------------------------------- lower dynamics


def test_lower_gd_runs_n_gradient_steps_on_g():
    problem, x, y, _ = _point()
    A, Bm = problem.metadata["A"], problem.metadata["B"]
    part = LowerGD(lr=0.2, steps=3)
    y3, direction, state = part.run(problem, x, y, None, bl.Oracles(), part.init(y), 0)
    expected = y["y"]
    for _ in range(3):
        last = A @ expected - Bm.T @ x["x"]
        expected = expected - 0.2 * last
    torch.testing.assert_close(y3["y"], expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(direction["y"], last, rtol=0, atol=1e-13)
    assert state == EmptyState() and part.averaging(7) == 0.0
    torch.testing.assert_close(part.apply(y, {"y": last})["y"], y["y"] - 0.2 * last, rtol=0, atol=0)


@pytest.mark.parametrize("index", ["inner", "outer"])
def test_lower_aggregated_step_is_a_weighted_gradient_step(index):
    problem, x, y, _ = _point()
    A, Bm, D = (problem.metadata[k] for k in ("A", "B", "D"))
    mu = bl.Polynomial(0.8, 1.0)  # μ_i = 0.8/(i + 1)
    part = LowerAggregated(lr=0.3, steps=2, mu=mu, lr_lower_upper=0.1, index=index)
    k = 4
    y2, _, _ = part.run(problem, x, y, None, bl.Oracles(), EmptyState(), k)
    expected = y["y"]
    for t in range(2):
        m = mu(t if index == "inner" else k)
        grad_g, grad_f = A @ expected - Bm.T @ x["x"], A @ expected  # T1g: ∇_y f = A y
        expected = expected - ((1 - m) * 0.3 * grad_g + m * 0.1 * grad_f)
    torch.testing.assert_close(y2["y"], expected, rtol=0, atol=1e-13)
    assert part.averaging(k) == pytest.approx(mu(k) if index == "outer" else mu(0))
    del D


def test_lower_aggregated_with_zero_weight_is_lower_gd_and_apply_needs_equal_steps():
    problem, x, y, _ = _point()
    counting = bl.CountingOracles()
    aggregated = LowerAggregated(lr=0.3, steps=1, mu=0.0)
    ya, _ = aggregated.step(problem, x, y, None, 0, counting)
    yg, _ = LowerGD(lr=0.3, steps=1).step(problem, x, y, None, 0, bl.Oracles())
    assert torch.equal(ya["y"], yg["y"])
    assert counting.counts == {"gradient_y": 1}
    with pytest.raises(ValueError, match="lr_lower_upper = lr"):
        LowerAggregated(lr=0.3, lr_lower_upper=0.1).apply(y, y)


# ----------------------------------------------------------------------------- multiplier estimators


def test_linear_solve_with_cg_solves_the_system_cold_or_warm():
    part = LinearSolve(bl.CG(steps=N))
    result, state = part.update(lambda v: H @ v, B, V0, part.init(V0), 0)
    torch.testing.assert_close(H @ result.v, B, rtol=0, atol=1e-10)
    assert state == EmptyState()
    one = LinearSolve(bl.FixedPoint(steps=1, lr=0.1), warm_start=True)
    warm, _ = one.update(lambda v: H @ v, B, V0, EmptyState(), 0)
    torch.testing.assert_close(warm.v, V0 - 0.1 * (H @ V0 - B), rtol=0, atol=1e-14)
    cold, _ = LinearSolve(bl.FixedPoint(steps=1, lr=0.1)).update(lambda v: H @ v, B, V0, EmptyState(), 0)
    torch.testing.assert_close(cold.v, 0.1 * B, rtol=0, atol=1e-15)


def test_fixed_step_correction_is_one_richardson_step_with_the_scheduled_step():
    part = DualCorrection(FixedStep(bl.Polynomial(0.3, 1.0)))
    matvec = _Counting(H)
    result, state = part.update(matvec, B, V0, part.init(V0), 2)  # η_2 = 0.3/3
    torch.testing.assert_close(result.v, V0 - 0.1 * (H @ V0 - B), rtol=0, atol=1e-15)
    assert float(result.step) == pytest.approx(0.1) and result.residual_sq is None and matvec.calls == 1
    # a caller that has H v already (the Jacobi order) pays no product
    again, _ = part.update(matvec, B, V0, state, 2, hv=H @ V0)
    assert torch.equal(again.v, result.v) and matvec.calls == 1


def test_line_search_step_is_the_exact_minimiser_along_the_residual():
    part = DualCorrection(LineSearch())
    result, _ = part.update(lambda v: H @ v, B, V0, EmptyState(), 0)
    r = H @ V0 - B
    q = lambda t: 0.5 * (V0 - t * r) @ H @ (V0 - t * r) - B @ (V0 - t * r)  # q(v) = ½vᵀHv − bᵀv along −r
    # q is a parabola in t: its minimiser from three values, against the step taken
    t0, t1, t2 = 0.0, 0.5, 1.0
    curvature = (q(t2) - 2 * q(t1) + q(t0)) / (t1 - t0) ** 2
    slope = (q(t1) - q(t0)) / (t1 - t0) - 0.5 * curvature * (t1 - t0)
    torch.testing.assert_close(result.step, -slope / curvature, rtol=1e-10, atol=0)
    torch.testing.assert_close(result.step, (r @ r) / (r @ H @ r), rtol=1e-14, atol=0)
    torch.testing.assert_close(result.v, V0 - result.step * r, rtol=0, atol=1e-14)
    torch.testing.assert_close(result.residual_sq, r @ r, rtol=1e-14, atol=0)


def test_line_search_guards_and_the_official_tensorwise_numerator():
    negative = torch.diag(torch.tensor([-1.0, -2.0], dtype=F64))
    result, _ = DualCorrection(LineSearch(fallback=0.05)).update(
        lambda v: negative @ v, torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64), EmptyState(), 0
    )
    assert float(result.step) == 0.05  # rᵀHr < 0: the fallback
    r = H @ V0 - B
    clipped, _ = DualCorrection(LineSearch(max_step=0.01)).update(lambda v: H @ v, B, V0, EmptyState(), 0)
    assert float(clipped.step) == 0.01
    # y made of two tensors: the scripts' numerator is (‖r₁‖ + ‖r₂‖)², not ‖r₁‖² + ‖r₂‖²
    split = lambda v: {"a": v[:2], "b": v[2:]}
    join = lambda t: torch.cat([t["a"], t["b"]])
    mv = lambda t: split(H @ join(t))
    official, _ = DualCorrection(LineSearch(numerator="tensorwise")).update(mv, split(B), split(V0), EmptyState(), 0)
    expected = (r[:2].norm() + r[2:].norm()) ** 2 / (r @ H @ r)
    torch.testing.assert_close(official.step, expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(join(official.v), V0 - expected * r, rtol=0, atol=1e-14)
    assert float(official.step) > float((r @ r) / (r @ H @ r))


def test_periodic_rule_searches_every_period_and_keeps_its_step_in_between():
    part = DualCorrection(Periodic(period=3, search=LineSearch(fallback=0.2)))
    state = part.init(V0)
    assert isinstance(state, PeriodicState) and float(state.eta) == 0.2 and state.eta.dtype == F64
    v, steps, calls = V0, [], []
    for k in range(6):
        matvec = _Counting(H)
        result, state = part.update(matvec, B, v, state, k)
        r = H @ v - B
        if k % 3 == 0:
            torch.testing.assert_close(result.step, (r @ r) / (r @ H @ r), rtol=1e-14, atol=0)
        v = result.v
        steps.append(float(result.step))
        calls.append(matvec.calls)
    assert calls == [2, 1, 1, 2, 1, 1]
    assert steps[1] == steps[2] == steps[0] and steps[4] == steps[5] == steps[3] != steps[0]


# ----------------------------------------------------------------------------- directions, optimizers, unroll


def test_plain_direction_is_the_identity():
    d = {"x": torch.arange(3.0, dtype=F64)}
    out, state = PlainDirection().update(d, PlainDirection().init(d), 5)
    assert out is d and state == EmptyState()


def test_adam_part_equals_its_closed_form_first_two_steps():
    lr, (b1, b2), eps = 0.1, (0.9, 0.999), 1e-8
    opt = bl.Adam(lr=lr, betas=(b1, b2), eps=eps)
    x = {"x": torch.tensor([1.0, -2.0], dtype=F64)}
    d1, d2 = torch.tensor([0.5, -4.0], dtype=F64), torch.tensor([-1.0, 2.0], dtype=F64)
    state = opt.init(x)
    assert isinstance(state, bl.updates.AdamState)
    x1, state = opt.update(x, {"x": d1}, state, 0)
    # first step: m̂ = d, ŝ = d², so x moves by lr·d/(|d| + ε)
    torch.testing.assert_close(x1["x"], x["x"] - lr * d1 / (d1.abs() + eps), rtol=0, atol=1e-15)
    x2, state = opt.update(x1, {"x": d2}, state, 1)
    m = b1 * (1 - b1) * d1 + (1 - b1) * d2
    s = b2 * (1 - b2) * d1**2 + (1 - b2) * d2**2
    torch.testing.assert_close(state.m["x"], m, rtol=1e-15, atol=0)
    torch.testing.assert_close(state.s["x"], s, rtol=1e-15, atol=0)
    step = (m / (1 - b1**2)) / ((s / (1 - b2**2)).sqrt() + eps)
    torch.testing.assert_close(x2["x"], x1["x"] - lr * step, rtol=0, atol=1e-15)


def test_sgd_momentum_state_is_typed():
    opt = bl.SGD(lr=0.5, momentum=0.5)
    x = {"x": torch.ones(2, dtype=F64)}
    state = opt.init(x)
    assert isinstance(state, bl.updates.SGDState)
    x1, state = opt.update(x, {"x": torch.ones(2, dtype=F64)}, state, 0)
    x2, state = opt.update(x1, {"x": torch.ones(2, dtype=F64)}, state, 1)
    torch.testing.assert_close(state.momentum["x"], torch.full((2,), 1.5, dtype=F64))
    torch.testing.assert_close(x2["x"], torch.full((2,), 1.0 - 0.5 - 0.75, dtype=F64))


def test_unroll_keeps_the_restart_point_only_when_cold():
    y = {"y": torch.ones(3, dtype=F64)}
    cold, warm = Unroll(truncate=2), Unroll(warm_start=True)
    state = cold.init(y)
    assert isinstance(state, UnrollState) and torch.equal(state.y_init["y"], y["y"]) and state.y_init["y"] is not y["y"]
    assert cold.start({"y": torch.zeros(3)}, state) is state.y_init
    assert warm.init(y) == EmptyState() and warm.start(y, EmptyState()) is y
    assert cold.differentiated(10) == 2 and warm.differentiated(10) == 10


# ----------------------------------------------------------------------------- measures


def test_direction_norm_is_the_projected_step_and_reports_the_solver_residual():
    problem, x, y, point = _point()
    A, Bm, D, x_hat = (problem.metadata[k] for k in ("A", "B", "D", "x_hat"))
    v = {"y": torch.linspace(0.0, 1.0, N, dtype=F64)}
    box = bl.Box(-0.1, 0.1)
    d, info, hv = DirectionNorm().evaluate(point, v, None, x, box)
    expected = D @ (x["x"] - x_hat) + Bm @ v["y"]  # ∇_x f − J v, J = −B
    torch.testing.assert_close(d["x"], expected, rtol=0, atol=1e-13)
    projected = x["x"] - (x["x"] - expected).clamp(-0.1, 0.1)
    torch.testing.assert_close(info["stationarity"], projected @ projected, rtol=1e-13, atol=0)
    torch.testing.assert_close(info["lower_grad_sq"], (A @ y["y"] - Bm.T @ x["x"]).square().sum(), rtol=1e-13, atol=0)
    assert hv is None
    solve = bl.linsolve.LinearSolveResult(v=v, residual_sq=torch.tensor(3.0, dtype=F64))
    assert DirectionNorm().report(solve) == {"linsys_residual_sq": solve.residual_sq}


def test_shadow_residual_terms_are_galets_metric():
    problem, x, y, point = _point()
    A, Bm, D, x_hat = (problem.metadata[k] for k in ("A", "B", "D", "x_hat"))
    v = {"y": torch.linspace(0.0, 1.0, N, dtype=F64)}
    d, info, hv = ShadowResidual().evaluate(point, v, None, x, None)
    grad_y_f = A @ y["y"]
    torch.testing.assert_close(hv["y"], A @ v["y"], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(info["R_shadow"], (A @ (A @ v["y"] - grad_y_f)).square().sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(info["R_upper"], d["x"] @ d["x"], rtol=1e-13, atol=0)
    torch.testing.assert_close(info["stationarity"], info["R_upper"] + info["R_lower"] + info["R_shadow"], rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="normal_residual_sq"):
        ShadowResidual(exact=False).evaluate(point, v, None, x, None)
    del Bm, D, x_hat


def test_kkt_residual_with_the_averaged_objective():
    mu = 0.3
    problem, x, y, point = _point(mu=mu)
    A, Bm, D, x_hat = (problem.metadata[k] for k in ("A", "B", "D", "x_hat"))
    v = {"y": torch.linspace(0.0, 1.0, N, dtype=F64)}
    d, info, h_phi = KKTResidual().evaluate(point, v, None, x, None)
    grad_x_f, grad_y_f = D @ (x["x"] - x_hat), A @ y["y"]
    # φ_μ = μ f + (1 − μ) g on T1g: H_φ = A, J_φ = −(1 − μ) B; J_g = −B, H_g = A
    torch.testing.assert_close(d["x"], grad_x_f + (1 - mu) * Bm @ v["y"], rtol=0, atol=1e-13)
    torch.testing.assert_close(h_phi["y"], A @ v["y"], rtol=0, atol=1e-13)
    kkt_upper = (grad_x_f + Bm @ v["y"]).square().sum()
    kkt_multiplier = (grad_y_f - A @ v["y"]).square().sum()
    kkt_lower = (A @ y["y"] - Bm.T @ x["x"]).square().sum()
    for key, value in (("kkt_upper", kkt_upper), ("kkt_multiplier", kkt_multiplier), ("kkt_lower", kkt_lower)):
        torch.testing.assert_close(info[key], value, rtol=1e-12, atol=0)
    grad_y_phi = mu * grad_y_f + (1 - mu) * (A @ y["y"] - Bm.T @ x["x"])
    torch.testing.assert_close(info["kkt_phi"], d["x"] @ d["x"] + kkt_multiplier + grad_y_phi @ grad_y_phi, rtol=1e-12, atol=0)
    assert KKTResidual().report(bl.linsolve.LinearSolveResult(v=v, residual_sq=None, step=torch.tensor(0.5))) == {
        "dual_step": torch.tensor(0.5)
    }


# ----------------------------------------------------------------------------- assembly


def test_parts_check_their_kinds_and_order():
    with pytest.raises(TypeError, match=r"Parts\(lower=3\) must be a LowerDynamics"):
        Parts(lower=3)
    with pytest.raises(TypeError, match=r"Parts\(multiplier=.*must be a MultiplierEstimator"):
        Parts(lower=LowerGD(), multiplier=bl.CG())
    with pytest.raises(ValueError, match=r"Parts\(order='gauss'\) must be one of 'sequential', 'jacobi'"):
        Parts(lower=LowerGD(), order="gauss")
    parts = Parts(lower=LowerGD(), multiplier=LinearSolve())
    assert parts.direction == PlainDirection() and parts.measure == DirectionNorm() and parts.replace(order="jacobi").order == "jacobi"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LowerGD(lr=0.0), r"^LowerGD\(lr=0.0\) must be a positive number"),
        (lambda: LowerAggregated(mu=1.0), r"^LowerAggregated\(mu=1.0\) must be a finite number in \[0, 1\)$"),
        (lambda: LowerAggregated(index="middle"), r"^LowerAggregated\(index='middle'\) must be one of 'inner', 'outer'$"),
        (lambda: LowerAggregated(lr_lower_upper=-1.0), r"^LowerAggregated\(lr_lower_upper=-1.0\) must be a positive number"),
        (lambda: LinearSolve("CG"), r"^LinearSolve\(solver='CG'\) must be a linear solver"),
        (lambda: DualCorrection("fixed"), r"^DualCorrection\(step='fixed'\) must be a step rule"),
        (lambda: FixedStep(0.0), r"^FixedStep\(lr=0.0\) must be a positive number"),
        (lambda: LineSearch(numerator="l1"), r"^LineSearch\(numerator='l1'\) must be one of 'residual', 'tensorwise'$"),
        (lambda: Periodic(period=0), r"^Periodic\(period=0\) must be an integer >= 1$"),
        (lambda: Unroll(truncate=0), r"^Unroll\(truncate=0\) must be an integer >= 1$"),
        (lambda: ShadowResidual(exact="yes"), r"^ShadowResidual\(exact='yes'\) must be true or false"),
    ],
)
def test_parts_validate_their_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


PRESET_PARTS = [
    (
        bl.GALET(lr_upper=0.1, lr_lower=0.3, lower_steps=2, lr_shadow=0.1, shadow_steps=4, shadow_start="warm", exact_metric=False),
        dict(
            lower=LowerGD(0.3, 2),
            multiplier=LinearSolve(bl.NormalGD(steps=4, lr=0.1), warm_start=True),
            measure=ShadowResidual(exact=False),
        ),
    ),
    (
        bl.AID(lr_upper=0.1, lr_lower=0.2, lower_steps=3, solver=bl.Neumann(steps=5, lr=0.3), warm_start_v=True),
        dict(lower=LowerGD(0.2, 3), multiplier=LinearSolve(bl.Neumann(steps=5, lr=0.3), warm_start=True), measure=DirectionNorm()),
    ),
    (
        bl.BAGDC(lr_upper=0.01, lr_lower=0.3, lower="bda", lower_mu=0.2, dual_step="periodic", period=4, order="jacobi"),
        dict(
            lower=LowerAggregated(0.3, 1, mu=0.2, index="outer"),
            multiplier=DualCorrection(Periodic(4, LineSearch())),
            measure=KKTResidual(),
            order="jacobi",
        ),
    ),
    (
        bl.SlBAMM(lr_upper=0.1, lr_lower=0.2, mu=0.5, dual_step="fixed", lr_dual=0.4),
        dict(lower=LowerAggregated(0.2, 1, mu=0.5, index="outer"), multiplier=DualCorrection(FixedStep(0.4)), measure=KKTResidual()),
    ),
    (
        bl.SlBAMM.official_toy(),
        dict(
            lower=LowerAggregated(0.1, 1, mu=0.1, index="outer"),
            multiplier=DualCorrection(LineSearch(numerator="tensorwise")),
            measure=KKTResidual(),
            order="jacobi",
        ),
    ),
    (
        bl.ITD(lr_upper=0.1, lr_lower=0.3, lower_steps=7, warm_start=True),
        dict(lower=LowerGD(0.3, 7), unroll=Unroll(truncate=7, warm_start=True)),
    ),
    (bl.TRHG(lr_upper=0.1, lr_lower=0.3, lower_steps=7), dict(lower=LowerGD(0.3, 7), unroll=Unroll(truncate=3))),
    (
        bl.BDA(lr_upper=0.1, lr_lower=0.3, lower_steps=7, mu=0.4, lr_lower_upper=0.2),
        dict(lower=LowerAggregated(0.3, 7, mu=0.4, lr_lower_upper=0.2), unroll=Unroll(truncate=7)),
    ),
]


@pytest.mark.parametrize("method, expected", PRESET_PARTS, ids=lambda v: getattr(v, "name", ""))
def test_presets_build_the_documented_parts_once(method, expected):
    parts = method.parts
    for key, value in expected.items():
        assert getattr(parts, key) == value, key
    assert parts.direction == PlainDirection() and parts.projection is None
    assert parts.upper == bl.updates.as_upper_optimizer(method.lr_upper, "lr_upper")
    assert method.parts is parts  # built once, not per call
    problem = T1g(n=3)
    state = method.replace(**({"stability_check": "off"} if hasattr(method, "stability_check") else {})).init(problem)
    assert method.step(problem, state)[0].k == 1


@pytest.mark.parametrize("name", ["bilevel.parts.lower", "bilevel.parts.multiplier", "bilevel.parts.direction"])
def test_docstring_examples_of_the_parts(name):
    failures, attempted = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0 and failures == 0
