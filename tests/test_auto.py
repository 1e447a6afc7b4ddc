"""``"auto"`` step sizes (bilevel.auto): each rule against its mathematics, the scaled toy
zoo, a problem whose lower curvature grows with x, the guard, the cost, and exact resume."""

import doctest
import warnings

import pytest
import torch

import bilevel as bl
from bilevel.auto import CGLS, DoG, MonitoredLineSearch, MonitoredState
from bilevel.problems.toys import T1, T4, ToyProblem

F64 = torch.float64


# --------------------------------------------------------------------------- problems


def scaled(problem, s):
    """f and g multiplied by s: the same x*, every curvature times s."""
    return ToyProblem(
        upper=lambda x, y, b: s * problem.upper(x, y, b),
        lower=lambda x, y, b: s * problem.lower(x, y, b),
        x_init=problem.x_init,
        y_init=problem.y_init,
        name=f"{problem.name}*{s:g}",
        x_star=problem.x_star,
    )


def diagonal(n=10, kappa=100.0):
    """g = ½ yᵀAy − xᵀy, A = diag(1 … κ) (log-spaced), f = ½‖y − c‖² + ½‖x‖²:
    y*(x) = A⁻¹x and x* = (A⁻¹c)/(A⁻² + I) coordinatewise; lower condition number κ."""
    a = torch.logspace(0.0, float(torch.log10(torch.tensor(kappa))), n, dtype=F64)
    c = torch.linspace(-1.0, 1.0, n, dtype=F64)
    return ToyProblem(
        upper=lambda x, y, _: 0.5 * ((y["y"] - c) ** 2).sum() + 0.5 * (x["x"] ** 2).sum(),
        lower=lambda x, y, _: 0.5 * (a * y["y"] ** 2).sum() - (x["x"] * y["y"]).sum(),
        x_init={"x": torch.ones(n, dtype=F64)},
        y_init={"y": torch.zeros(n, dtype=F64)},
        name=f"Q{kappa:g}",
        x_star={"x": (c / a) / (1.0 / a**2 + 1.0)},
    )


def growing(n=5, rho=1.0, x_hat=5.0):
    """Learned log-penalties: g = ½ Σ e^{x_i} y_i² − bᵀy, f = ½‖y − c‖² + ½ρ‖x − x̂‖².
    The lower Hessian diag(e^x) grows from I at x₀ = 0 to about 148 I at x* (Newton on Φ')."""
    b, c = torch.linspace(1.0, 2.0, n, dtype=F64), torch.linspace(0.01, 0.02, n, dtype=F64)
    x = torch.full((n,), x_hat, dtype=F64)
    for _ in range(60):  # Φ'(x) = −b e^{−x}(b e^{−x} − c) + ρ(x − x̂), coordinatewise
        u = torch.exp(-x)
        x = x - (-b * u * (b * u - c) + rho * (x - x_hat)) / (b * u * (b * u - c) + (b * u) ** 2 + rho)
    return ToyProblem(
        upper=lambda x, y, _: 0.5 * ((y["y"] - c) ** 2).sum() + 0.5 * rho * ((x["x"] - x_hat) ** 2).sum(),
        lower=lambda x, y, _: 0.5 * (torch.exp(x["x"]) * y["y"] ** 2).sum() - (b * y["y"]).sum(),
        x_init={"x": torch.zeros(n, dtype=F64)},
        y_init={"y": torch.zeros(n, dtype=F64)},
        name="growing",
        x_star={"x": x},
    )


def rel_error(x, problem):
    return float(torch.linalg.norm(x["x"] - problem.x_star["x"]) / torch.linalg.norm(problem.x_star["x"]))


def run_until(problem, method, max_iters, target=1e-6, every=25):
    """Steps until the relative error of x is below ``target`` at two checks in a row."""
    state = method.init(problem)
    below = 0
    for k in range(1, max_iters + 1):
        state, _ = method.step(problem, state)
        if k % every == 0:
            below = below + 1 if rel_error(state.x, problem) <= target else 0
            if below == 2:
                break
    return rel_error(state.x, problem), state


AUTO = {
    "GALET": lambda: bl.GALET(),
    "AID": lambda: bl.AID(),
    "BAGDC": lambda: bl.BAGDC(),
    # μ_k is not a step size: its default 0.9 (k+1)^{-1/10} biases x by O(μ_k) on these
    # strongly convex toys, so the zoo uses a fast-decaying μ_k
    "SlBAMM": lambda: bl.SlBAMM(mu=lambda k: 0.9 / (k + 1) ** 3),
}
# the runnable examples' hand-tuned steps
PRESETS = {
    "GALET": lambda: bl.GALET(lr_upper=0.1, lr_lower=0.5, lower_steps=5, lr_shadow=0.5, shadow_steps=5, stability_check="off"),
    "AID": lambda: bl.AID(lr_upper=0.5, lr_lower=0.5, lower_steps=30),
    "BAGDC": lambda: bl.BAGDC(lr_upper=0.5, lr_lower=0.5, lr_dual=0.5, stability_check="off"),
    "SlBAMM": lambda: bl.SlBAMM(lr_upper=0.5, lr_lower=0.5, mu=lambda k: 0.9 / (k + 1) ** 3, stability_check="off"),
}
ZOO = {"T1": (lambda: T1(n=5), 600), "Q100": (lambda: diagonal(10, 100.0), 2500), "T4": (lambda: T4(), 600)}
CASES = [(p, m) for p in ZOO for m in AUTO if p != "T4" or m == "GALET"]  # T4's singular H: GALET's class


# --------------------------------------------------------------------------- the zoo


# every (problem, method) at curvature × 1; each method at × 1e-3, × 1 and × 1e3 on the
# problem of its class (benchmarks/auto_steps.py runs the full grid)
SCALED = [("T4", "GALET"), ("T1", "AID"), ("Q100", "BAGDC"), ("Q100", "SlBAMM")]
ZOO_RUNS = [(p, m, s) for p, m in SCALED for s in (1e-3, 1.0, 1e3)] + [(p, m, 1.0) for p, m in CASES if (p, m) not in SCALED]


@pytest.mark.parametrize("problem_name, method_name, s", ZOO_RUNS)
def test_every_method_with_no_step_size_reaches_x_star_at_every_curvature_scale(problem_name, method_name, s):
    make, iters = ZOO[problem_name]
    problem = scaled(make(), s)
    err, state = run_until(problem, AUTO[method_name](), iters)
    assert err <= 1e-6, f"{method_name} on {problem.name}: relative error {err:.2e}"
    assert int(state.extra["lower"].rollbacks) <= 2  # the guard is rarely needed


def test_aid_auto_at_condition_number_1e4_needs_the_warm_started_solve():
    # AID's default K = 10 cold CG steps leave a multiplier error that does not vanish at
    # κ = 1e4: x stalls (relative error ≈ 0.2). Warm-starting the CG from the previous v
    # (docs/auto.md's remedy) reaches x*; it is not the default because on hyper-cleaning,
    # where DoG's upper steps grow large, the stale start made auto AID clean worse.
    problem = diagonal(10, 1e4)
    err, state = run_until(problem, bl.AID(warm_start_v=True), 3000, every=250)
    assert err <= 1e-6, f"relative error {err:.2e} after {int(state.k)} iterations"
    cold, _ = run_until(problem, bl.AID(), 500, every=500)
    assert cold > 1e-2


@pytest.mark.parametrize("method_name", ["GALET", "AID", "BAGDC", "SlBAMM"])
def test_the_hand_tuned_steps_fail_on_the_scaled_problems(method_name):
    problem = T1(n=5)
    # curvature × 1e3: the explicit steps are far above 2/λ_max, the run diverges
    big = bl.solve(scaled(problem, 1e3), PRESETS[method_name](), max_iters=200, on_divergence="status")
    assert big.status is bl.Status.DIVERGED
    # curvature × 1e-3: they are 1000 times too small (auto reaches 1e-6 in this budget)
    small = bl.solve(scaled(problem, 1e-3), PRESETS[method_name](), max_iters=300, log_every=300)
    assert rel_error(small.x, problem) > 1e-2


# --------------------------------------------------------------------------- moving curvature


@pytest.mark.parametrize(
    "method_name, fixed",
    [
        ("GALET", lambda: bl.GALET(lr_upper=0.05, lr_lower=1.0, lr_shadow=1.0)),
        ("BAGDC", lambda: bl.BAGDC(lr_upper=0.05, lr_lower=1.0, lr_dual=1.0)),
        ("AID", lambda: bl.AID(lr_upper=0.05, lr_lower=1.0)),
    ],
)
def test_auto_converges_where_steps_fixed_at_init_diverge_as_the_curvature_grows(method_name, fixed):
    problem = growing()
    # λ_max(H) = 1 at the start: β = 1/λ_max, ρ = 1/λ_max² pass the stability check ...
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.StabilityWarning)
        fixed_method = fixed()
        fixed_method.init(problem)
    # ... but H = diag(e^x) grows to 148 I along the path: the fixed steps diverge
    assert bl.solve(problem, fixed_method, max_iters=300, on_divergence="status").status is bl.Status.DIVERGED
    err, state = run_until(problem, AUTO[method_name](), 800)
    assert err <= 1e-6
    # β followed the curvature: at x* it is below 2/λ_max(H(x*)) ≈ 2/148
    assert float(state.extra["lower"].beta) < 2.0 / float(torch.exp(problem.x_star["x"]).max())


# --------------------------------------------------------------------------- the rules


def test_cgls_gives_the_minimum_norm_least_squares_solution_of_a_singular_incompatible_system():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=F64))
    H = q @ torch.diag(torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.1, 0.0, 0.0], dtype=F64)) @ q.T
    b = torch.randn(8, generator=gen, dtype=F64)  # not in the range of H
    result = CGLS(steps=30)(lambda v: H @ v, b)
    assert torch.allclose(result.v, torch.linalg.pinv(H) @ b, atol=1e-10)
    null = q[:, 6:]
    assert float((null.T @ result.v).norm()) < 1e-12  # no component in Null(H)
    assert float(result.normal_residual_sq) < 1e-20  # ‖H(Hv − b)‖² at the iterate before the last


def test_the_monitored_dual_step_keeps_the_residual_bounded_on_an_ill_conditioned_system():
    # κ = 10⁴: reusing the line-search step for 10 iterations unmonitored lets ‖r‖ grow by
    # orders of magnitude; the monitor (min(η, safe) on growth) keeps it near ‖b‖
    H = torch.diag(torch.logspace(0.0, 4.0, 20, dtype=F64))
    b = torch.ones(20, dtype=F64)
    matvec = lambda v: H @ v

    def peak(rule, steps=400):
        part = bl.parts.DualCorrection(rule)
        v, state, worst = torch.zeros(20, dtype=F64), part.init(torch.zeros(20, dtype=F64)), 0.0
        for k in range(steps):
            if isinstance(state, MonitoredState):
                state = state._replace(safe=torch.tensor(1e-4, dtype=F64))  # 1/λ_max, as β would be
            result, state = part.update(matvec, b, v, state, k)
            v, worst = result.v, max(worst, float(result.residual.norm()))
        return worst / float(b.norm()), float((H @ v - b).norm() / b.norm())

    monitored_peak, monitored_final = peak(MonitoredLineSearch(period=10))
    periodic_peak, _ = peak(bl.parts.Periodic(10, bl.parts.LineSearch()))
    assert monitored_peak <= 10.0 < periodic_peak
    assert monitored_final < 0.5  # and it keeps converging


def test_dog_is_scale_free():
    dog = DoG()
    finals = []
    for s in (1e-3, 1.0, 1e3):  # f = s/2 (x − 1)²
        x, state = torch.tensor([3.0], dtype=F64), dog.init(torch.tensor([3.0], dtype=F64))
        for k in range(300):
            x, state = dog.update(x, s * (x - 1.0), state, k)
        finals.append(float(x))
    assert finals == pytest.approx([1.0, 1.0, 1.0], abs=1e-10)


def test_the_guard_restores_the_iteration_and_halves_the_lower_step():
    problem = T1(n=5)
    method = bl.BAGDC()
    state = method.init(problem, y0={"y": torch.zeros(5, dtype=F64)})
    assert float(state.extra["lower"].beta) == pytest.approx(1.0)  # 1/λ_max(I)
    lower = state.extra["lower"]._replace(beta=torch.tensor(64.0, dtype=F64))  # far above 2/λ_max
    state = state.replace(extra={**state.extra, "lower": lower})
    after, info = method.step(problem, state)
    assert int(info["rollbacks"]) == 1 and float(info["lr_lower"]) == 32.0  # ‖∇g‖ grew 63×
    for a, b in ((after.x, state.x), (after.y, state.y), (after.v, state.v)):
        assert torch.equal(a["x" if "x" in a else "y"], b["x" if "x" in b else "y"])
    assert after.k == 1
    for _ in range(600):
        after, info = method.step(problem, after)
    assert rel_error(after.x, problem) < 1e-6 and int(info["rollbacks"]) == 3 and float(info["lr_lower"]) <= 1.0


def test_auto_and_user_steps_mix_per_argument():
    method = bl.GALET(lr_lower=0.5)
    assert isinstance(method.parts.lower, bl.parts.LowerGD) and isinstance(method.parts.multiplier.solver, CGLS)
    assert isinstance(method.parts.upper, DoG)
    result = bl.solve(T1(n=5), method, max_iters=300, log_every=300)
    assert rel_error(result.x, T1(n=5)) < 1e-6 and "lr_upper" in result.history[-1] and "lr_lower" not in result.history[-1]


def test_auto_steps_are_diagnostics_in_every_record():
    for method, keys in (
        (bl.GALET(), {"lr_lower", "lr_upper", "rollbacks"}),
        (bl.BAGDC(), {"lr_lower", "lr_upper", "lr_dual", "rollbacks"}),
        (bl.SlBAMM(), {"lr_lower", "lr_upper", "rollbacks"}),
        (bl.AID(), {"lr_lower", "lr_upper", "rollbacks"}),
    ):
        result = bl.solve(T1(n=3), method, max_iters=4, log_every=1)
        assert all(keys <= set(record) for record in result.history), method.name
    explicit = bl.solve(T1(n=3), bl.BAGDC(lr_upper=0.1, lr_lower=0.5, lr_dual=0.5), max_iters=2)
    assert not {"lr_lower", "lr_upper", "lr_dual", "rollbacks"} & set(explicit.history[-1])


def test_stability_warnings_stay_for_user_steps_only():
    problem = T1(n=3)
    with pytest.warns(bl.StabilityWarning, match="lr_lower"):
        bl.GALET(lr_lower=3.0).init(problem)
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.StabilityWarning)
        bl.GALET().init(scaled(problem, 1e3))
        bl.BAGDC().init(scaled(problem, 1e3))


def test_bad_auto_arguments_fail_with_one_line():
    with pytest.raises(TypeError, match=r"^GALET\(lr_lower='fast'\) must be a positive number or 'auto'$"):
        bl.GALET(lr_lower="fast")
    with pytest.raises(ValueError, match=r"^BAGDC\(lr_lower='auto'\) needs order='sequential'"):
        bl.BAGDC(order="jacobi")
    bl.BAGDC(order="jacobi", lr_lower=0.5)  # a given step runs the Jacobi order as before


# --------------------------------------------------------------------------- cost


def _counts(method, problem, iters):
    counting = bl.CountingOracles()
    method = method.replace(oracles=counting)
    state = method.init(problem)
    counting.reset()
    for _ in range(iters):
        state, _ = method.step(problem, state)
    return counting.counts


def _gradient_units(counts):
    # a Hessian-vector or mixed product ≈ two gradients; a linearization ≈ one gradient
    return sum(n * (2 if kind in ("hvp", "mixed", "both") else 1) for kind, n in counts.items())


def _assert_resumes_exactly(tmp_path, problem, method, iters, data=None):
    """A run checkpointed at half of ``iters`` and resumed ends where the straight run does;
    ``data`` makes a fresh data source per run (streams), or None."""
    source = (lambda: data()) if data is not None else (lambda: None)
    straight = bl.solve(problem, method, data=source(), max_iters=iters)
    path = tmp_path / f"{method.name}.pt"
    bl.solve(problem, method, data=source(), max_iters=iters // 2, checkpoint=path, checkpoint_every=iters // 2)
    resumed = bl.solve(problem, method, data=source(), max_iters=iters, resume=path)
    for key in straight.x:
        torch.testing.assert_close(resumed.x[key], straight.x[key], rtol=0, atol=0)
    for key in straight.y:
        torch.testing.assert_close(resumed.y[key], straight.y[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    "auto, explicit",
    [
        (bl.GALET(), bl.GALET(lr_upper=0.1, lr_lower=0.5, lr_shadow=0.25)),
        (bl.BAGDC(), bl.BAGDC(lr_upper=0.01, lr_lower=0.2, lr_dual=0.5)),
        (bl.AID(), bl.AID(lr_upper=0.1, lr_lower=0.1)),
        (bl.SlBAMM(), bl.SlBAMM(lr_lower=0.1)),
    ],
    ids=lambda m: m.name,
)
def test_auto_costs_at_most_15_percent_more_oracle_calls_per_iteration(auto, explicit):
    problem = T1(n=3)
    a, e = _counts(auto, problem, 10), _counts(explicit, problem, 10)
    assert _gradient_units(a) <= 1.15 * _gradient_units(e), (a, e)
    assert a["gradient_y"] == e["gradient_y"] and a["linearize"] == e["linearize"]  # the secant is free


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("method", [bl.GALET(), bl.BAGDC(), bl.AID(lower_steps=3)], ids=lambda m: m.name)
def test_a_checkpointed_auto_run_resumes_exactly(tmp_path, method):
    problem = T1(n=4)
    full = bl.solve(problem, method, max_iters=40)
    path = tmp_path / "ckpt.pt"
    bl.solve(problem, method, max_iters=20, checkpoint=path)
    resumed = bl.solve(problem, method, max_iters=40, resume=path)
    strip = lambda h: [{k: v for k, v in rec.items() if k != "time"} for rec in h]
    assert strip(resumed.history) == strip(full.history)
    assert torch.equal(resumed.x["x"], full.x["x"]) and torch.equal(resumed.state.opt.rbar, full.state.opt.rbar)


def test_a_resume_during_rollbacks_is_exact(tmp_path):
    problem = T1(n=4)
    method = bl.BAGDC()
    state = method.init(problem, y0={"y": torch.zeros(4, dtype=F64)})
    state = state.replace(extra={**state.extra, "lower": state.extra["lower"]._replace(beta=torch.tensor(64.0, dtype=F64))})
    state, _ = method.step(problem, state)  # one rollback done, more to come
    path = tmp_path / "state.pt"
    torch.save(state.to_dict(), path)
    restored = bl.State.from_dict(torch.load(path, weights_only=True))
    for _ in range(8):
        state, info = method.step(problem, state)
        restored, info2 = method.step(problem, restored)
    assert int(info["rollbacks"]) == int(info2["rollbacks"]) >= 3
    assert torch.equal(state.x["x"], restored.x["x"]) and torch.equal(state.extra["lower"].beta, restored.extra["lower"].beta)


def test_docstring_examples_of_the_auto_module():
    failures, attempted = doctest.testmod(bl.auto, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0 and failures == 0


def test_the_reporter_prints_the_auto_steps_at_the_start_and_on_changes_over_2x():
    import io

    from bilevel.auto import AutoStepReporter

    stream = io.StringIO()
    result = bl.solve(growing(), bl.BAGDC(), max_iters=300, log_every=1, callbacks=[AutoStepReporter(stream=stream)])
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("auto steps at iteration 1: lr_lower=") and "L_lower ≈" in lines[0]
    assert 2 <= len(lines) < 60  # β falls about 150× along the path: reported on each halving, not every record
    betas = [r["lr_lower"] for r in result.history]
    printed = [float(line.split("lr_lower=")[1].split()[0]) for line in lines]
    assert max(printed) / min(printed) > 50 and max(betas) / min(betas) > 50
    quiet = io.StringIO()
    bl.solve(T1(n=3), bl.BAGDC(lr_upper=0.1, lr_lower=0.5, lr_dual=0.5), max_iters=5, callbacks=[AutoStepReporter(stream=quiet)])
    assert quiet.getvalue() == ""  # given steps: nothing to report


# --------------------------------------------------------------------------- unrolled methods


@pytest.mark.parametrize("s", [1e-3, 1.0, 1e3])
def test_itd_with_no_step_size_reaches_x_star_at_every_curvature_scale(s):
    """ITD's β from the tracked curvature at the start of each unroll, α by DoG: x* to 1e-6
    at curvature × 1e-3, 1, 1e3, no guard restore; its hand-tuned example steps fail there."""
    problem = scaled(T1(n=5), s)
    err, state = run_until(problem, bl.ITD(lower_steps=20), 600)
    assert err <= 1e-6, f"relative error {err:.2e}"
    assert int(state.extra["lower"].rollbacks) == 0
    if s != 1.0:
        preset = bl.solve(problem, bl.ITD(lr_upper=0.5, lr_lower=0.5, lower_steps=40), max_iters=300, on_divergence="status")
        assert preset.status is bl.Status.DIVERGED or rel_error(preset.x, problem) > 1e-2


def test_itd_auto_follows_the_curvature_where_a_step_fixed_at_init_diverges():
    problem = growing()
    fixed = bl.solve(problem, bl.ITD(lr_upper=0.05, lr_lower=1.0, lower_steps=30), max_iters=300, on_divergence="status")
    assert fixed.status is bl.Status.DIVERGED  # β = 1/λ_max(x₀) = 1; H grows to 148 I
    err, state = run_until(problem, bl.ITD(lower_steps=30), 800)
    assert err <= 1e-6
    beta = float(state.extra["lower"].scale / state.extra["lower"].lam)
    assert beta < 2.0 / float(torch.exp(problem.x_star["x"]).max())


def test_bda_auto_selects_the_optimistic_solution_of_t2():
    from bilevel.problems.toys import T2

    result = bl.solve(T2(n=10), bl.BDA(lower_steps=50), max_iters=500)
    assert float((result.x["x"] - 1.0).abs().max()) <= 1e-4  # RHG's answer would be 0.505


def test_the_unrolled_guard_undoes_a_diverging_iteration_and_halves_the_step():
    problem = T1(n=4)
    method = bl.ITD(lower_steps=10)
    state = method.init(problem, y0={"y": torch.zeros(4, dtype=F64)})  # y* = x = 2: the unroll has to move
    tracker = state.extra["lower"]
    state = state.replace(extra={**state.extra, "lower": tracker._replace(scale=torch.tensor(8.0, dtype=F64))})  # β = 8/λ: diverges
    after, info = method.step(problem, state)
    assert int(info["rollbacks"]) == 1 and float(after.extra["lower"].scale) == 4.0
    assert torch.equal(after.x["x"], state.x["x"]) and torch.equal(after.y["y"], state.y["y"]) and after.k == 1
    for _ in range(3):
        after, info = method.step(problem, after)
    # β = 4/λ is undone too; β = 2/λ (the stability bound: the unroll oscillates, its gradient
    # does not grow) is accepted, and the guard's count of restores in a row starts again
    assert float(after.extra["lower"].scale) == 2.0 and int(info["rollbacks"]) == 2
    assert int(after.extra["lower"].retries) == 0 and not torch.equal(after.x["x"], state.x["x"])


def test_a_checkpointed_itd_auto_run_resumes_exactly(tmp_path):
    problem, method = T1(n=4), bl.ITD(lower_steps=5)
    full = bl.solve(problem, method, max_iters=30)
    path = tmp_path / "ckpt.pt"
    bl.solve(problem, method, max_iters=15, checkpoint=path)
    resumed = bl.solve(problem, method, max_iters=30, resume=path)
    assert torch.equal(resumed.x["x"], full.x["x"]) and torch.equal(resumed.state.extra["lower"].u["y"], full.state.extra["lower"].u["y"])


def test_itd_auto_costs_at_most_15_percent_more_than_its_unroll():
    """The tracked curvature costs one gradient with its graph and one Hessian product per
    iteration (3 gradient units) against T = 20 lower steps plus the backward through them."""
    problem = T1(n=3)
    auto, explicit = _counts(bl.ITD(lower_steps=20), problem, 10), _counts(bl.ITD(lr_lower=0.5, lower_steps=20), problem, 10)
    extra = _gradient_units(auto) - _gradient_units(explicit)
    assert extra == 10 * 3, (auto, explicit)
    unroll_units = 10 * (20 + 20 + 1)  # T forward gradients, their backward, the upper gradient
    assert extra <= 0.15 * unroll_units


# --------------------------------------------------------------------------- first-order methods


@pytest.mark.parametrize("s", [1e-3, 1.0, 1e3])
def test_bome_with_no_step_size_runs_at_every_curvature_scale(s):
    """BOME auto: AdGD on its shadow steps, one DoG step for the pair (x, y). At scale 1 it
    reaches what its hand-tuned example reaches (BOME's own O(η)-barrier floor); at × 1e3
    the example's steps diverge and auto converges; at × 1e-3 the example stalls and auto
    is stopped only by BOME's ε = 1e-8 in the barrier, which is not scale-free."""
    problem = scaled(T1(n=5), s)
    auto = bl.solve(problem, bl.BOME(shadow_steps=20, eta=0.5), max_iters=1000)
    preset = bl.solve(
        problem, bl.BOME(lr_upper=0.2, lr_lower=0.5, lr_shadow=0.5, shadow_steps=20, eta=0.5), max_iters=1000, on_divergence="status"
    )
    err = rel_error(auto.x, problem)
    assert err <= {1e-3: 0.1, 1.0: 1e-3, 1e3: 1e-4}[s], err
    if s == 1.0:
        assert abs(err - rel_error(preset.x, problem)) <= 1e-9  # the same point as the tuned example
    elif s == 1e3:
        assert preset.status is bl.Status.DIVERGED
    else:
        assert rel_error(preset.x, problem) > 1.0 > 10 * err
    assert {"lr_upper", "lr_lower", "lr_shadow"} <= set(auto.history[-1])


def test_bome_auto_options_and_resume(tmp_path):
    with pytest.raises(ValueError, match="shadow_momentum"):
        bl.BOME(shadow_momentum=0.5)
    with pytest.raises(ValueError, match="lr_lower='auto'"):
        bl.BOME(lr_upper=bl.Adam(0.1))
    half = bl.BOME(lr_upper=0.5)  # lr_lower auto takes x's step: β = α
    assert half.lower_step(3) == 0.5
    problem, method = T1(n=4), bl.BOME(shadow_steps=5)
    full = bl.solve(problem, method, max_iters=30)
    path = tmp_path / "ckpt.pt"
    bl.solve(problem, method, max_iters=15, checkpoint=path)
    resumed = bl.solve(problem, method, max_iters=30, resume=path)
    assert torch.equal(resumed.x["x"], full.x["x"]) and torch.equal(resumed.y["y"], full.y["y"])


@pytest.mark.parametrize("s", [1e-3, 1e3])
def test_v_pbgd_with_no_step_size_reaches_its_penalised_point_at_every_curvature_scale(s):
    """V-PBGD auto (AdGD on the persistent shadow ω, one DoG step for (x, y)) approaches the
    stationary point of its penalised problem, x = (1 + γ)/(1 + 2γ) on T1 (the O(1/γ) bias
    of the method, not of the steps), at curvature × 1e-3 and 1e3 (to 1e-5 in 1500
    iterations, 1e-12 in 3000); the docstring example's steps stall at × 1e-3 and diverge
    at × 1e3."""
    problem, gamma = scaled(T1(n=3), s), 100.0
    target = (1 + gamma) / (1 + 2 * gamma)
    auto = bl.solve(problem, bl.PBGD(gamma=gamma, shadow_steps=5), max_iters=1500, log_every=1500)
    assert float((auto.x["x"] - target).abs().max()) <= 1e-5
    preset = bl.solve(
        problem, bl.PBGD(gamma=gamma, lr_upper=0.5, lr_lower=0.5, lr_shadow=0.5, shadow_steps=5), max_iters=300, on_divergence="status"
    )
    if s == 1e3:
        assert preset.status is bl.Status.DIVERGED
    else:
        assert float((preset.x["x"] - target).abs().max()) > 1.0


def _meha_rest_point(A, B, D, x_hat, c, gamma):
    """The stationary point of f + c (g − e_γ) on T1g (as tests/test_meha.py derives it)."""
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    Y = c * gamma * torch.linalg.solve(eye + gamma * (1.0 + c) * A, B.T)
    M = -c * gamma * B @ torch.linalg.solve(eye + gamma * A, A @ Y - B.T)
    return torch.linalg.solve(M + D, D @ x_hat)


@pytest.mark.parametrize("order", ["jacobi", "y_first", "x_first"])
@pytest.mark.parametrize("s", [1e-3, 1.0, 1e3])
def test_meha_with_no_step_size_reaches_its_penalised_point_at_every_curvature_scale(s, order):
    """MEHA auto (AdGD on the proximal shadow, a DoG for x and one for y bounded by the shadow
    step) reaches the stationary point of f + c(g − e_γ) on T1g to 1e-9 in 600 iterations,
    f and g scaled by s and γ by 1/s (the Moreau parameter has the units of 1/curvature:
    with γ fixed, scaling changes the problem, as the penalty of G-PBGD does); the explicit
    steps that suit s = 1 diverge at s = 1e3 and stall at 1e-3."""
    base = bl.problems.T1g(n=3, seed=1)
    A, B, D, x_hat = (base.metadata[k] for k in ("A", "B", "D", "x_hat"))
    problem, gamma, c = scaled(base, s), 1.0 / s, 4.0
    target = _meha_rest_point(s * A, s * B, s * D, x_hat, c, gamma)
    auto = bl.solve(problem, bl.MEHA(gamma=gamma, c0=c, p=0.0, shadow_steps=2, order=order), max_iters=600, log_every=600)
    assert float((auto.x["x"] - target).norm() / target.norm()) <= 1e-9
    assert {"lr_upper", "lr_lower", "lr_shadow"} <= set(auto.history[-1])
    explicit = bl.MEHA(lr_upper=0.3, lr_lower=0.3, lr_shadow=0.3, gamma=gamma, c0=c, p=0.0, shadow_steps=2, order=order)
    tuned = bl.solve(problem, explicit, max_iters=600, on_divergence="status")
    if s == 1e3:
        assert tuned.status is bl.Status.DIVERGED
    elif s == 1e-3:
        assert float((tuned.x["x"] - target).norm() / target.norm()) > 1e-2


def test_meha_auto_bounds_the_y_step_by_the_shadow_step():
    """The y step never exceeds η (y sees the 1/γ curvature of −(y − θ)/γ): on T1g scaled by
    1e-3 with γ = 1, DoG alone would grow y's step past 2γ and diverge (the shadow lags)."""
    problem = scaled(bl.problems.T1g(n=3, seed=1), 1e-3)
    result = bl.solve(problem, bl.MEHA(gamma=1.0, c0=4.0, p=0.0, shadow_steps=2), max_iters=400, log_every=1)
    assert result.status is not bl.Status.DIVERGED
    for record in result.history:
        assert float(record["lr_lower"]) <= float(record["lr_shadow"]) * (1 + 1e-12)
    assert float(result.history[-1]["lr_upper"]) > 100.0  # x's own DoG is not bound by y's cap


def test_meha_auto_options_and_resume(tmp_path):
    """lr_lower auto keeps y's own DoG whatever x's step (an optimizer included); given steps
    add no auto diagnostic; an auto run checkpointed half-way resumes exactly."""
    problem = bl.problems.T1(n=3)
    record = bl.solve(problem, bl.MEHA(lr_upper=bl.Adam(0.1)), max_iters=3, log_every=1).history[-1]
    assert "lr_lower" in record and "lr_upper" not in record
    given = bl.MEHA(lr_upper=0.2, lr_lower=0.2, lr_shadow=0.5)
    record = bl.solve(problem, given, max_iters=3, log_every=1).history[-1]
    assert not any(key.startswith("lr_") for key in record)
    _assert_resumes_exactly(tmp_path, problem, bl.MEHA(gamma=1.0), 40)


@pytest.mark.parametrize("s", [1e-3, 1.0, 1e3])
def test_iaptt_gm_with_no_step_size_reaches_x_star_at_every_curvature_scale(s):
    """IAPTT-GM auto (the tracked lower step, one DoG for (x, z)) reaches x* on T1 and the
    optimistic x* = 1 of T2 (several lower minimisers) to 1e-12 in 600 iterations at curvature
    × 1e-3, 1 and 1e3, with no guard restore; the docstring example's steps diverge at × 1e3."""
    for toy in (T1(n=5), bl.problems.T2(n=5)):
        problem = scaled(toy, s)
        result = bl.solve(problem, bl.IAPTTGM(lower_steps=10), max_iters=600, log_every=600)
        error = float((result.x["x"] - problem.x_star["x"]).norm() / problem.x_star["x"].norm())
        assert error <= 1e-12, (toy.name, error)
        assert float(result.history[-1]["rollbacks"]) == 0.0
        assert float(result.history[-1]["lr_lower"]) == pytest.approx(1.0 / s, rel=1e-6)  # 1/λ of g's Hessian s·I
    example = bl.IAPTTGM(lr_upper=0.5, lr_lower=0.5, lower_steps=10, lr_init=0.5)
    assert bl.solve(scaled(bl.problems.T2(n=5), 1e3), example, max_iters=50, on_divergence="status").status is bl.Status.DIVERGED


def test_iaptt_gm_auto_follows_the_curvature_where_a_step_fixed_at_init_diverges():
    """Learned log-penalties (lower Hessian diag(e^x), growing along the path): the tracked
    step converges where s fixed at 1/λ_max(x₀) — which passes the stability check — diverges.
    With the warm start (y_0 = the previous y_K); the learned z hovers at 1e-5 here with auto
    and with fixed stable steps alike: the rest point of min_{x,z} max_t f, not the step."""
    problem = growing()
    fixed = bl.IAPTTGM(lr_upper=0.05, lr_lower=1.0, lower_steps=30, initialization="warm")  # s = 1/λ_max(x₀) = 1; H grows to 148 I
    assert bl.solve(problem, fixed, max_iters=300, on_divergence="status").status is bl.Status.DIVERGED
    err, state = run_until(problem, bl.IAPTTGM(lower_steps=30, initialization="warm"), 800)
    assert err <= 1e-6
    assert float(state.extra["lower"].scale / state.extra["lower"].lam) < 2.0 / float(torch.exp(problem.x_star["x"]).max())


def test_iaptt_gm_auto_options_guard_and_resume(tmp_path):
    """lr_init auto with an upper optimizer is refused in one line; with a number lr_upper z
    takes α; the guard undoes a blown iteration and halves s; a checkpointed auto run resumes
    exactly."""
    with pytest.raises(ValueError, match=r"IAPTTGM\(lr_init='auto'\)"):
        bl.IAPTTGM(lr_upper=bl.Adam(0.1))
    bl.IAPTTGM(lr_upper=bl.Adam(0.1), initialization="warm")  # no z: nothing to step
    problem = bl.problems.T2(n=3)
    given = bl.solve(problem, bl.IAPTTGM(lr_upper=0.5, lower_steps=10), max_iters=300)
    assert abs(float(given.x["x"][0]) - 1.0) < 1e-3
    method = bl.IAPTTGM(lower_steps=5)
    state = method.init(T1(n=3), y0={"y": torch.zeros(3, dtype=F64)})  # off the lower solution y = x
    lower = state.extra["lower"]
    blown = state.replace(extra={**state.extra, "lower": lower._replace(scale=lower.scale * 1e3)})
    # β = 1000/λ: the unroll explodes, the iteration is undone and s halved
    after, info = method.step(T1(n=3), blown)
    torch.testing.assert_close(after.x["x"], state.x["x"], rtol=0, atol=0)
    torch.testing.assert_close(after.extra["unroll"].z["y"], state.extra["unroll"].z["y"], rtol=0, atol=0)
    assert float(info["rollbacks"]) == 1.0 and float(after.extra["lower"].scale) == 500.0
    _assert_resumes_exactly(tmp_path, problem, method, 30)


def test_iaptt_gm_auto_costs_at_most_15_percent_more_than_its_unroll():
    """The tracked step costs one gradient with its graph and one Hessian product per iteration
    (3 gradient units), counted, against K = 20 differentiated steps and their backward."""
    problem = T1(n=3)
    auto = _counts(bl.IAPTTGM(lower_steps=20, lr_upper=0.1, lr_init=0.1), problem, 10)
    explicit = _counts(bl.IAPTTGM(lower_steps=20, lr_upper=0.1, lr_lower=0.5, lr_init=0.1), problem, 10)
    extra = _gradient_units(auto) - _gradient_units(explicit)
    assert extra == 10 * 3, (auto, explicit)
    assert extra <= 0.15 * 10 * (20 + 20 + 1)


def test_meha_auto_makes_no_oracle_call_per_iteration_beyond_init():
    """MEHA auto stays first order: after init (30 power products for η₀) it makes exactly the
    oracle calls of the explicit steps."""
    problem = T1(n=3)
    auto = _counts(bl.MEHA(shadow_steps=2), problem, 10)
    explicit = _counts(bl.MEHA(lr_upper=0.1, lr_lower=0.1, lr_shadow=0.1, shadow_steps=2), problem, 10)
    assert _gradient_units(auto) == _gradient_units(explicit), (auto, explicit)


# --------------------------------------------------------------------------- stochastic family


def _finite_sum():
    return bl.problems.finite_sum_quadratic(n_lower=64, n_upper=32, dim_x=3, dim_y=4, mu=0.5, seed=0)


@pytest.mark.parametrize("s", [1e-3, 1.0, 1e3])
def test_the_stochastic_family_with_no_step_size_is_scale_free(s):
    """β = c_k/λ̂ (the tracked lower curvature) and DoG on x: f and g scaled by s give the same
    iterates' errors. Full batch, SABA, SRBA and AmIGO reach x* to 1e-10, StocBiO (K = 100
    Neumann factors: its truncation bias) to 1e-8, SOBA and MA-SOBA (decaying β) to 1e-3; on
    the streams SABA and SRBA (variance reduced) still reach 1e-10. The docstring example's
    steps diverge at × 1e3."""
    base = _finite_sum()
    problem = scaled(base, s)

    def error(result):
        return float((result.x["x"] - base.x_star["x"]).norm() / base.x_star["x"].norm())

    cases = [
        (bl.SABA(), 1e-10, 600),
        (bl.SRBA(), 1e-10, 600),
        (bl.AmIGO(lower_steps=2, dual_steps=2), 1e-10, 300),
        (bl.StocBiO(lower_steps=2, neumann_steps=100), 1e-8, 300),
        (bl.SOBA(), 1e-3, 600),
        (bl.MASOBA(), 1e-3, 600),
    ]
    for method, tol, iters in cases:
        full = bl.solve(problem, method, data=None, max_iters=iters, log_every=iters)
        assert error(full) <= tol, (method.name, error(full))
        assert {"lr_lower", "lr_upper"} <= set(full.history[-1])
    for method in (bl.SABA(), bl.SRBA()):
        streamed = bl.solve(problem, method, data=base.streams(batch_size=16, seed=1), max_iters=600, log_every=600)
        assert error(streamed) <= 1e-10, (method.name, error(streamed))
    if s == 1e3:
        example = bl.SABA(lr_lower=0.3, lr_upper=0.3)
        assert (
            bl.solve(problem, example, data=base.streams(batch_size=16, seed=1), max_iters=100, on_divergence="status").status
            is bl.Status.DIVERGED
        )


@pytest.mark.parametrize(
    "make", [lambda: bl.SOBA(), lambda: bl.SABA(), lambda: bl.AmIGO(lower_steps=5, dual_steps=5)], ids=["SOBA", "SABA", "AmIGO"]
)
def test_the_stochastic_auto_step_follows_a_growing_curvature(make):
    """Learned log-penalties (H from I to 148 I along the path): the tracked λ̂ ends near 148
    (β = 0.5/λ̂ below 2/λ_max at x*) and x reaches x* to 1e-10, where β fixed at 1/λ_max(x₀)
    diverges."""
    problem = growing()
    method = make()
    state = method.init(problem)
    for _ in range(1500):
        state, _ = method.step(problem, state)
    assert rel_error(state.x, problem) <= 1e-10
    lam_star = float(torch.exp(problem.x_star["x"]).max())  # λ_max(H(x*)) ≈ 148
    assert abs(float(state.extra["curvature"].lam) / lam_star - 1.0) < 0.05
    fixed = method.replace(lr_lower=1.0, lr_upper=0.5)
    assert bl.solve(problem, fixed, data=None, max_iters=1500, on_divergence="status").status is bl.Status.DIVERGED


def test_the_stochastic_auto_steps_cost_at_most_15_percent_and_resume_exactly(tmp_path):
    """One refreshing product every 10 iterations (single loop) or 2 (double loop), counted;
    a checkpointed auto run on streams resumes exactly (λ̂, u and DoG in the state)."""
    problem = _finite_sum()
    for auto, explicit in (
        (bl.SOBA(), bl.SOBA(lr_lower=0.1, lr_upper=0.1)),
        (bl.SABA(), bl.SABA(lr_lower=0.1, lr_upper=0.1)),
        (bl.StocBiO(), bl.StocBiO(lr_lower=0.1, lr_upper=0.1)),
        (bl.AmIGO(), bl.AmIGO(lr_lower=0.1, lr_upper=0.1)),
    ):
        a, e = _gradient_units(_counts(auto, problem, 20)), _gradient_units(_counts(explicit, problem, 20))
        assert e < a <= 1.15 * e, (auto.name, a, e)
    _assert_resumes_exactly(tmp_path, problem, bl.SOBA(), 40, data=lambda: problem.streams(batch_size=16, seed=1))


# --------------------------------------------------------------------------- AdamDoG


@pytest.mark.parametrize("s", [1e-3, 1.0, 1e3])
def test_adam_dog_is_scale_free_and_reaches_x_star_on_t1(s):
    """DoG along Adam's direction as every seed method's upper step, lower and dual steps
    auto: the same errors at curvature × 1e-3, 1 and 1e3, x* reached (sl-BAMM with a μ_k
    decaying as (k+1)^{-3}, as in the zoo)."""
    problem = scaled(T1(n=5), s)
    cases = [
        (bl.GALET(lr_upper=bl.auto.AdamDoG()), 1e-10),
        (bl.AID(lr_upper=bl.auto.AdamDoG()), 1e-10),
        (bl.BAGDC(lr_upper=bl.auto.AdamDoG()), 1e-5),
        (bl.SlBAMM(lr_upper=bl.auto.AdamDoG(), mu=lambda k: 0.9 / (k + 1) ** 3), 1e-5),
    ]
    for method, tol in cases:
        result = bl.solve(problem, method, max_iters=600, log_every=600)
        assert rel_error(result.x, problem) <= tol, (method.name, rel_error(result.x, problem))
        assert "lr_upper" in result.history[-1]


def test_adam_dog_moves_each_coordinate_at_its_own_scale_and_resumes_exactly(tmp_path):
    """Two coordinates with curvatures 1e3 and 1e-3 both reach their optimum (a scalar step
    cannot serve both in 500 iterations); without momenta (b₁ = b₂ = 0) a step is the sign
    of the gradient times r̄/√k, the first one r_ε = r_rel (1 + ‖x₀‖_∞) on every coordinate;
    a checkpointed run resumes exactly."""
    rule = bl.auto.AdamDoG()
    x, state = torch.tensor([3.0, -2.0], dtype=F64), rule.init(torch.tensor([3.0, -2.0], dtype=F64))
    curvature = torch.tensor([1e3, 1e-3], dtype=F64)
    for k in range(500):
        x, state = rule.update(x, curvature * (x - 1.0), state, k)
    torch.testing.assert_close(x, torch.ones(2, dtype=F64), rtol=0, atol=1e-9)
    plain = bl.auto.AdamDoG(b1=0.0, b2=0.0, r_rel=1e-3)  # u = sign(d): the first step moves every coordinate by r_ε
    start = torch.tensor([3.0, -2.0, 0.5], dtype=F64)
    moved, _ = plain.update(start, torch.tensor([1e6, -1e-6, 2.0], dtype=F64), plain.init(start), 0)
    torch.testing.assert_close(moved - start, torch.tensor([-4e-3, 4e-3, -4e-3], dtype=F64), rtol=1e-12, atol=0)
    _assert_resumes_exactly(tmp_path, T1(n=3), bl.BAGDC(lr_upper=bl.auto.AdamDoG()), 30)


def test_f2sa_with_no_step_size_is_scale_free_and_stays_first_order():
    """F2SA auto (β^z = c_k/λ̂ of ∇²g at z, β^y = c_k/λ̂ of ∇²(f + λ_k g) at y, both from
    differences of gradients; DoG on x): the same error at curvature × 1e-3, 1 and 1e3, inside
    the O(1/λ) band of its fixed-λ rest point (λ = 20) after 300 full-batch iterations, and no
    second-order product; the docstring example's steps diverge at × 1e3."""
    base = _finite_sum()
    errors = []
    for s in (1e-3, 1.0, 1e3):
        counting = bl.CountingOracles()
        method = bl.F2SA(lambda0=20.0, delta0=0.0, lower_steps=5, oracles=counting)
        result = bl.solve(scaled(base, s), method, data=None, max_iters=300, log_every=300)
        errors.append(float((result.x["x"] - base.x_star["x"]).norm()))
        assert set(counting.counts) <= {"gradient_y", "gradients"}, counting.counts
        assert {"lr_lower", "lr_shadow", "lr_upper"} <= set(result.history[-1])
    assert errors == pytest.approx([errors[1]] * 3, rel=1e-6)
    assert 0.005 < errors[1] < 0.05
    example = bl.F2SA(lr_lower=0.04, lr_shadow=0.5, lr_upper=0.5, lambda0=20.0, delta0=0.0, lower_steps=5)
    assert bl.solve(scaled(base, 1e3), example, data=None, max_iters=100, on_divergence="status").status is bl.Status.DIVERGED


def test_a_checkpointed_f2sa_auto_run_on_streams_resumes_exactly(tmp_path):
    problem = _finite_sum()
    _assert_resumes_exactly(tmp_path, problem, bl.F2SA(lower_steps=2), 30, data=lambda: problem.streams(batch_size=16, seed=1))
