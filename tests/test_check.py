"""bl.check_hypergradient: the references against closed forms, every method's verdict on T1g and
hyper-cleaning with the error its theory predicts, broken solvers caught, bad input (float64)."""

import dataclasses
import doctest
import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import bilevel as bl
import bilevel.tree as T
from bilevel.check import HypergradientCheck, Reference, reference_hypergradient, solve_lower
from bilevel.finite_difference import OneTerm
from bilevel.linsolve import CG, LinearSolver, LinearSolveResult


@pytest.fixture(scope="module")
def t1g():
    problem = bl.problems.T1g(n=10)
    return problem, reference_hypergradient(problem)


@pytest.fixture(scope="module")
def hyperclean():
    from bilevel.data import hyperclean_from_arrays

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(90, 4, generator=gen, dtype=torch.float64)
    labels = (images[:, 0] + 0.5 * images[:, 1] > 0).long() + (images[:, 2] > 1).long()
    data = hyperclean_from_arrays(
        images.numpy(), labels.numpy(), num_classes=3, max_pixel=1.0, name="blobs", noise_rate=0.4, n_train=30, n_val=30, n_test=30,
        dtype=torch.float64,
    )  # fmt: skip
    problem = bl.problems.hyperclean_problem(data, model="linear", reg=0.1)  # strongly convex lower level
    x = {"weights": torch.randn(30, generator=gen, dtype=torch.float64)}
    return problem, reference_hypergradient(problem, x)


def _t1g_matrices(problem):
    meta = problem.metadata
    return meta["A"], meta["B"], meta["D"], meta["x_hat"]


# -- the references -------------------------------------------------------------------------


def test_implicit_reference_is_the_closed_form_on_t1g(t1g):
    problem, ref = t1g
    assert ref.kind == "implicit" and ref.lower_converged and ref.note == ""
    rel, cos, _, _ = ref.compare(problem.hypergradient(ref.x))
    assert rel < 1e-12 and cos == pytest.approx(1.0, abs=1e-14)
    A, B, _, _ = _t1g_matrices(problem)
    assert torch.allclose(ref.y["y"], torch.linalg.solve(A, B.T @ ref.x["x"]), rtol=1e-12)


def test_finite_difference_reference_matches_the_closed_form_on_t1g(t1g):
    problem, _ = t1g
    ref = reference_hypergradient(problem, kind="finite_difference", directions=4)
    assert ref.kind == "finite_difference" and len(ref.probes) == 4 and ref.derivatives.shape == (4,)
    rel, cos, _, _ = ref.compare(problem.hypergradient(ref.x))
    assert rel < 1e-7 and cos > 1 - 1e-12
    assert ref.error < 1e-7  # its own estimate says so too
    # the projections are unbiased: Σ ⟨u_i, e⟩² estimates ‖e‖² (u_i ~ N(0, I/m))
    e = {"x": torch.ones(10, dtype=torch.float64)}
    many = reference_hypergradient(problem, kind="finite_difference", directions=9, seed=1)
    assert len(many.probes) == 9
    projected = sum(float(T.vdot(u, e)) ** 2 for u in many.probes)
    assert 0.2 * 10 < projected < 5 * 10


def test_finite_difference_reference_uses_the_coordinates_of_a_small_x():
    problem = bl.problems.T3(copies=2)
    ref = reference_hypergradient(problem, {"x": torch.tensor([0.8, 2.0], dtype=torch.float64)}, kind="finite_difference")
    assert [float(u["x"].norm()) for u in ref.probes] == [1.0, 1.0]
    rel, _, _, _ = ref.compare(problem.hypergradient(ref.x))
    assert rel < 1e-7


def test_auto_takes_finite_differences_when_the_lower_hessian_is_singular():
    # T4: H = AᵀA has rank m < d and ∇_y f is not in its range, so CG cannot solve H v = ∇_y f.
    # The warm-started lower solves select y(x) = y₀ + A⁺(x − A y₀), so Φ has the gradient
    # A⁺ᵀ(y(x) − y_ref) + x − x_ref
    problem = bl.problems.T4(m=3, d=8)
    x = {"x": torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)}
    ref = reference_hypergradient(problem, x, directions=3)
    assert ref.kind == "finite_difference" and "CG on H v = ∇_y f reached only" in ref.note
    A, y_ref, x_ref = (problem.metadata[k] for k in ("A", "y_ref", "x_ref"))
    y0 = problem.y_init["y"]
    pinv = torch.linalg.pinv(A)
    y_x = y0 + pinv @ (x["x"] - A @ y0)
    assert torch.allclose(ref.y["y"], y_x, atol=1e-9)
    expected = pinv.T @ (y_x - y_ref) + x["x"] - x_ref
    rel, _, _, _ = ref.compare({"x": expected})
    assert rel < 1e-6
    # GALET's minimum-norm shadow multiplier gives exactly this gradient
    check = bl.check_hypergradient(problem, bl.GALET(lr_lower=0.5, shadow_steps=200), x, reference=ref)
    assert check.verdict == "pass" and check.reference == "finite_difference" and check.directions == 3


def test_lower_solve_reaches_its_tolerance_and_leaves_the_input_alone(t1g):
    problem, _ = t1g
    y0 = T.clone(problem.y_init)
    _, residual, converged = solve_lower(problem, problem.x_init, y0, tol=1e-12)
    assert converged and residual <= 1e-12 * 100 and torch.equal(y0["y"], problem.y_init["y"])
    _, residual, converged = solve_lower(problem, problem.x_init, y0, iters=1, tol=1e-14)
    assert residual > 0


# -- every method passes, with the error its theory predicts ----------------------------------

T1G_METHODS = [
    (lambda: bl.AID(), 0),
    (lambda: bl.AID(solver=bl.Neumann(steps=60, lr=0.5)), 0),
    (lambda: bl.AID(solver=bl.FixedPoint(steps=60, lr=0.5)), 0),
    (lambda: bl.AID(hessian_free=0.01), 0),
    (lambda: bl.ITD(lr_lower=0.5, lower_steps=60), 0),
    (lambda: bl.TRHG(lr_lower=0.5, lower_steps=60, truncate=40), 0),
    (lambda: bl.BDA(lr_lower=0.5, lower_steps=60, mu=1e-4), 0),
    (lambda: bl.GALET(lr_lower=0.5), 0),
    (lambda: bl.BAGDC(lr_lower=0.5, lr_dual=0.5), 60),
    (lambda: bl.SlBAMM(lr_lower=0.5, mu=0.0), 60),
]


@pytest.mark.parametrize("build,warmup", T1G_METHODS)
def test_every_method_passes_on_t1g(t1g, build, warmup):
    problem, ref = t1g
    check = bl.check_hypergradient(problem, build(), reference=ref, warmup=warmup)
    assert check.verdict == "pass", str(check)
    assert check.relative_error < 1e-3 and check.cosine > 0.999999


HYPERCLEAN_METHODS = [
    (lambda: bl.AID(lr_lower=1.0), 0),
    (lambda: bl.AID(solver=bl.Neumann(steps=100, lr=2.0)), 0),
    (lambda: bl.AID(lr_lower=1.0, hessian_free=1e-3), 0),
    (lambda: bl.ITD(lr_lower=2.0, lower_steps=100), 0),
    (lambda: bl.TRHG(lr_lower=2.0, lower_steps=100, truncate=60), 0),
    (lambda: bl.BDA(lr_lower=2.0, lower_steps=100, mu=1e-4), 0),
    (lambda: bl.GALET(lr_lower=1.0), 0),
    (lambda: bl.BAGDC(lr_lower=1.0, lr_dual=2.0), 60),
    (lambda: bl.SlBAMM(lr_lower=1.0, mu=0.0), 60),
]


@pytest.mark.parametrize("build,warmup", HYPERCLEAN_METHODS)
def test_every_method_passes_on_hyperclean(hyperclean, build, warmup):
    problem, ref = hyperclean
    check = bl.check_hypergradient(problem, build(), ref.x, reference=ref, warmup=warmup)
    assert check.verdict == "pass", str(check)
    assert check.reference == "implicit" and check.relative_error < 1e-2


def test_hyperclean_reference_agrees_with_finite_differences(hyperclean):
    problem, ref = hyperclean
    fd = reference_hypergradient(problem, ref.x, kind="finite_difference", directions=6)
    rel, _, _, _ = fd.compare(ref.gradient)
    assert rel < 1e-6


def test_aid_cg_error_falls_with_the_cg_steps_within_the_cg_bound(t1g):
    # ‖v_K − v*‖_A ≤ 2 ρ^K ‖v*‖_A, ρ = (√κ − 1)/(√κ + 1); the error of d is ‖B (v_K − v*)‖
    problem, ref = t1g
    A, B, _, _ = _t1g_matrices(problem)
    eig = torch.linalg.eigvalsh(A)
    kappa = float(eig.max() / eig.min())
    rho = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
    v_star = ref.y["y"]  # H v = ∇_y f = A y*: v* = y*
    v_star_a = math.sqrt(float(v_star @ A @ v_star))
    grad_norm = float(T.norm(ref.gradient))
    errors = []
    for steps in (1, 2, 3, 4, 5):
        check = bl.check_hypergradient(problem, bl.AID(solver=bl.CG(steps=steps)), reference=ref)
        bound = float(torch.linalg.matrix_norm(B, 2)) * 2 * rho**steps * v_star_a / math.sqrt(float(eig.min())) / grad_norm
        assert check.relative_error <= bound, (steps, check.relative_error, bound)
        errors.append(check.relative_error)
    assert all(b < 0.5 * a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-5 < 1e-2 < errors[0]


def test_itd_error_is_the_truncated_neumann_series_and_falls_with_t(t1g):
    # from y₀ = y*, T steps of GD give dy_T/dx = A⁻¹(I − (I − βA)^T) Bᵀ: the error of d is
    # −B A⁻¹ (I − βA)^T A y*, exactly
    problem, ref = t1g
    A, B, _, _ = _t1g_matrices(problem)
    beta, n = 0.1, A.shape[0]
    grad_norm = float(T.norm(ref.gradient))
    errors = []
    for steps in (5, 10, 20, 40):
        check = bl.check_hypergradient(problem, bl.ITD(lr_lower=beta, lower_steps=steps), reference=ref)
        power = torch.linalg.matrix_power(torch.eye(n, dtype=torch.float64) - beta * A, steps)
        predicted = float(torch.linalg.norm(B @ torch.linalg.solve(A, power @ (A @ ref.y["y"])))) / grad_norm
        assert check.relative_error == pytest.approx(predicted, rel=1e-6)
        errors.append(check.relative_error)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.05 < errors[0]


def test_darts_multiplier_has_the_error_of_the_tau_identity(t1g):
    # H⁻¹ replaced by τI: d − ∇Φ = −J (τ ∇_y f − v*) = B (τ A y* − y*) on T1g
    problem, ref = t1g
    A, B, _, _ = _t1g_matrices(problem)
    tau = 0.4
    check = bl.check_hypergradient(problem, bl.AID(solver=OneTerm(lr=tau), hessian_free=0.01), reference=ref)
    y_star = ref.y["y"]
    predicted = float(torch.linalg.norm(B @ (tau * A @ y_star - y_star))) / float(T.norm(ref.gradient))
    assert check.relative_error == pytest.approx(predicted, rel=1e-6)


# -- the field's known failures are caught ---------------------------------------------------


@dataclass(frozen=True)
class WrongResidualCG(LinearSolver):
    """CG whose residual is updated with the wrong sign (r ← r + α H p): a classic slip."""

    steps: int = 10

    def __call__(self, matvec, b, v0=None):
        v, r = T.zeros_like(b), b
        p, rr = r, T.sq_norm(r)
        for _ in range(self.steps):
            hp = matvec(p)
            alpha = rr / T.vdot(p, hp)
            v = T.axpy(alpha, p, v)
            r = T.axpy(alpha, hp, r)  # should be −alpha
            rr_new = T.sq_norm(r)
            p, rr = T.axpy(rr_new / rr, p, r), rr_new
        return LinearSolveResult(v=v, residual_sq=rr)


@pytest.mark.parametrize("fixture", ["t1g", "hyperclean"])
def test_cg_with_the_wrong_residual_fails(fixture, request):
    problem, ref = request.getfixturevalue(fixture)
    check = bl.check_hypergradient(problem, bl.AID(solver=WrongResidualCG(steps=10)), ref.x, reference=ref)
    assert check.verdict == "fail" and not check.passed, str(check)
    assert "above fail_rtol" in check.reason
    # the correct CG with the same steps passes
    assert bl.check_hypergradient(problem, bl.AID(solver=CG(steps=40)), ref.x, reference=ref).verdict == "pass"


@pytest.mark.parametrize("fixture", ["t1g", "hyperclean"])
def test_neumann_with_a_step_above_two_over_l_fails(fixture, request):
    problem, ref = request.getfixturevalue(fixture)
    lam = bl.linsolve.estimate_spectral_norm(bl.Oracles().linearize(problem.lower, ref.x, ref.y, None).hvp, ref.y)
    for lr, verdict in ((2.2 / lam, "fail"), (1.0 / lam, "pass")):
        check = bl.check_hypergradient(problem, bl.AID(solver=bl.Neumann(steps=200, lr=lr)), ref.x, reference=ref)
        assert check.verdict == verdict, (lr * lam, str(check))


def test_a_direction_that_points_uphill_is_named(t1g):
    problem, ref = t1g

    @dataclass(frozen=True)
    class Uphill(bl.AID):
        name: ClassVar[str] = "uphill"

        def direction(self, problem, state, batch=None):
            d, info = super().direction(problem, state, batch)
            return T.scale(-1.0, d), info

    check = bl.check_hypergradient(problem, Uphill(), reference=ref)
    assert check.verdict == "fail" and check.cosine == pytest.approx(-1.0) and "points away from ∇Φ" in check.reason


def test_a_start_far_from_the_lower_solution_is_named(t1g):
    problem, _ = t1g
    check = bl.check_hypergradient(problem, bl.AID(lower_steps=1), y=problem.y_init)
    assert check.verdict != "pass" and check.lower_residual > 1.0
    assert "part of the error is the lower level's" in check.reason


def test_single_loop_methods_need_warmup_and_are_told_so(t1g):
    problem, ref = t1g
    cold = bl.check_hypergradient(problem, bl.BAGDC(lr_lower=0.5, lr_dual=0.05), reference=ref)
    assert cold.verdict == "fail" and "warmup" in cold.reason
    warm = bl.check_hypergradient(problem, bl.BAGDC(lr_lower=0.5, lr_dual=0.05), reference=ref, warmup=400)
    assert warm.verdict == "pass"


def test_an_inexact_reference_makes_the_check_inconclusive(t1g):
    problem, _ = t1g
    inexact = reference_hypergradient(problem, lower_iters=1, lower_tol=1e-30)
    assert not inexact.lower_converged and "the lower solve (L-BFGS, then Newton steps) stopped at" in inexact.note
    for method in (bl.AID(), bl.AID(solver=bl.Neumann(steps=20, lr=1.5))):  # exact, and diverging
        check = bl.check_hypergradient(problem, method, reference=inexact)
        assert check.verdict == "warn" and check.reason.startswith("inconclusive: relative error")
        assert "but the reference is inexact (the lower solve (L-BFGS" in check.reason


# -- the result, the hook, bad input ---------------------------------------------------------


def test_result_is_a_frozen_record_with_one_line(t1g):
    problem, ref = t1g
    check = bl.check_hypergradient(problem, bl.AID(), reference=ref)
    assert isinstance(check, bl.HypergradientCheck) and check is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        check.verdict = "fail"  # type: ignore[misc]
    line = str(check)
    assert line.startswith("AID: pass — relative error") and "\n" not in line
    assert check.reference_lower_residual == ref.lower_residual and check.lower_residual < 1e-10
    assert torch.allclose(check.estimate["x"], ref.gradient["x"], rtol=1e-10)
    assert check.estimate_norm == pytest.approx(check.reference_norm, rel=1e-10)


def test_direction_hook_leaves_the_state_alone_and_matches_the_step(t1g):
    problem, _ = t1g
    method = bl.AID(lr_upper=0.1)
    state = method.init(problem)
    before = T.clone(state.x)
    d, info = method.direction(problem, state)
    assert torch.equal(state.x["x"], before["x"]) and "lower_grad_sq" in info
    stepped, _ = method.step(problem, state)
    assert torch.allclose(stepped.x["x"], before["x"] - 0.1 * d["x"], rtol=1e-14)


def test_a_method_without_the_hook_is_refused_with_the_fix(t1g):
    problem, ref = t1g

    @dataclass(frozen=True)
    class Exact(bl.Method):  # moves x by the closed form, not through Assembled.update_x
        name: ClassVar[str] = "exact"

        def init(self, problem, x0=None, y0=None, batch=None, validate=True):
            x0, y0 = problem.initial_point(x0, y0)
            return bl.State(x=T.clone(x0), y=T.clone(y0))

        def step(self, problem, state, batch=None):
            return state.replace(x=T.axpy(-0.1, problem.hypergradient(state.x), state.x), k=state.k + 1), {}

    with pytest.raises(NotImplementedError, match=r"implement Exact.direction\(problem, state, batch\) \(docs/check.md"):
        bl.check_hypergradient(problem, Exact(), reference=ref)

    @dataclass(frozen=True)
    class ExactWithHook(Exact):
        def direction(self, problem, state, batch=None):
            return problem.hypergradient(state.x), {}

    check = bl.check_hypergradient(problem, ExactWithHook(), reference=ref)
    assert check.verdict == "pass" and check.relative_error < 1e-12


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "AID"}, "check_hypergradient expects a bilevel.Method (e.g. bilevel.AID()), got str"),
        ({"problem": None}, "check_hypergradient expects a bilevel.Problem, got NoneType"),
        ({"rtol": 0.0}, "check_hypergradient(rtol=0.0) must be a positive number"),
        ({"rtol": 0.5, "fail_rtol": 0.1}, "check_hypergradient(fail_rtol=0.1) must be larger than rtol=0.5"),
        ({"warmup": -1}, "check_hypergradient(warmup=-1)"),
        ({"reference": "exact"}, "check_hypergradient(reference='exact')"),
        ({"fd_step": 0.0}, "reference_hypergradient(fd_step=0.0) must be a positive number"),
        ({"fd_step": -1e-3}, "reference_hypergradient(fd_step=-0.001) must be a positive number"),
        ({"directions": 0}, "reference_hypergradient(directions=0)"),
        ({"lower_tol": 0}, "reference_hypergradient(lower_tol=0) must be a positive number"),
    ],
)
def test_bad_input_fails_with_one_line(t1g, kwargs, message):
    problem, _ = t1g
    arguments = {"problem": problem, "method": bl.AID(), **kwargs}
    with pytest.raises((TypeError, ValueError)) as err:
        bl.check_hypergradient(**arguments)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_reference_options_do_not_apply_to_a_given_reference(t1g):
    problem, ref = t1g
    with pytest.raises(ValueError, match="directions apply to a reference computed here"):
        bl.check_hypergradient(problem, bl.AID(), reference=ref, directions=4)
    assert isinstance(ref, Reference) and HypergradientCheck.__dataclass_params__.frozen


def test_docstring_examples_run():
    import bilevel.check as module

    failures, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert attempted >= 7 and failures == 0, failures


# -- bilevel check CONFIG ---------------------------------------------------------------------

CHECK_CONFIG = {
    "name": "tiny-check",
    "problem": {"kind": "hyperclean", "dataset": "mnist5k", "n_train": 40, "n_val": 30, "n_test": 30, "reg": 0.1, "dtype": "float64"},
    "method": {"name": "CG"},
    "methods": {
        "CG": {"solver": "CG", "solver_steps": 30, "lr_lower": 0.5, "lower_steps": 3},
        "BAGDC": {"lr_lower": 0.5, "lr_dual": 0.5},
        "BadNeumann": {"method": "AID", "solver": "Neumann", "solver_steps": 30, "solver_lr": 40.0, "lr_lower": 0.5},
    },
    "run": {"max_iters": 6, "threads": 1, "progress": False},
}


@pytest.fixture
def check_config(tmp_path):
    import yaml

    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(CHECK_CONFIG))
    return str(path)


def test_cli_check_prints_a_verdict_per_method_and_fails_on_a_broken_one(check_config, capsys):
    from bilevel.cli import main

    assert main(["check", check_config, "--methods", "CG,BadNeumann", "--warmup", "0"]) == 1
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert out[0].startswith("reference: implicit at the initial x") and "0 warm-up iterations" in out[0]
    assert out[1].startswith("CG: pass — relative error") and out[2].startswith("BadNeumann: fail — relative error")
    assert captured.err.strip() == "bilevel: 1 of 2 methods failed the hypergradient check: BadNeumann"


def test_cli_check_bad_input_is_one_line_with_status_2(check_config, capsys):
    from bilevel.cli import main

    assert main(["check", check_config, "--warmup", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "bilevel: error: --warmup must be an integer >= 0, got -1"
    assert main(["check", check_config, "--methods", "NoSuchMethod"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_check_refuses_the_stochastic_benchmarks_with_one_line(capsys):
    """A stochastic method's direction is one mini-batch estimate: comparing it with the exact
    hypergradient would fail every correct method, so ``bilevel check`` says what to do instead."""
    from bilevel.cli import main

    assert main(["check", "stochastic_quadratic", "problem.n_lower=256", "problem.n_upper=128"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "a stochastic method's direction is a mini-batch estimate" in captured.err and "bilevel bench" in captured.err


def test_docs_page_examples_run():
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "check.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL) if ">>>" in b]
    test = doctest.DocTestParser().get_doctest("\n".join(blocks), {}, "docs/check.md", "docs/check.md", 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False).attempted >= 8 and runner.failures == 0
