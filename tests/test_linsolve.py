import itertools

import pytest
import torch

import bilevel as bl
from bilevel.linsolve import estimate_spectral_norm, line_search_step_size

F64 = torch.float64
N = 8


def _orthogonal(seed, n=N):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return q


def _matrix(eigenvalues, seed=0):
    q = _orthogonal(seed, len(eigenvalues))
    H = q @ torch.diag(torch.as_tensor(eigenvalues, dtype=F64)) @ q.T
    return 0.5 * (H + H.T)


# SPD, condition number 10, eigenvalues 1 ... 6 and a top one at 10 (power iteration gap)
EIGS = [1.0, 1.7, 2.4, 3.1, 3.8, 4.5, 6.0, 10.0]
H = _matrix(EIGS)
B = torch.randn(N, generator=torch.Generator().manual_seed(5), dtype=F64)
V_STAR = torch.linalg.solve(H, B)


def _mv(M):
    return lambda v: M @ v


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _neumann_closed_form(M, b, lr, K):
    I = torch.eye(len(b), dtype=F64)
    P = I - lr * M
    return lr * sum(torch.linalg.matrix_power(P, i) @ b for i in range(K + 1))


def test_matrix_has_the_intended_spectrum():
    ev = torch.linalg.eigvalsh(H)
    torch.testing.assert_close(ev, torch.tensor(EIGS, dtype=F64), rtol=1e-12, atol=1e-12)
    assert float(torch.linalg.cond(H)) == pytest.approx(10.0, rel=1e-10)


def test_cg_is_exact_in_n_steps():
    res = bl.CG(steps=N)(_mv(H), B)
    assert _rel(res.v, V_STAR) <= 1e-8
    assert float(res.residual_sq) <= 1e-16 * float(B @ B)
    assert res.step is None


def test_cg_error_decreases_and_reported_residual_is_the_true_residual():
    errors = []
    for k in range(1, N + 1):
        res = bl.CG(steps=k)(_mv(H), B)
        true_r = B - H @ res.v
        if k < N:
            torch.testing.assert_close(res.residual_sq, true_r @ true_r, rtol=1e-8, atol=0)
        # CG minimises the H-norm of the error over the Krylov space: monotone decrease
        errors.append(float((res.v - V_STAR) @ H @ (res.v - V_STAR)))
    assert all(b < a for a, b in itertools.pairwise(errors))
    # bound of CG: ‖e_k‖_H ≤ 2 ((√κ−1)/(√κ+1))^k ‖e_0‖_H
    kappa = 10.0
    rho = (kappa**0.5 - 1) / (kappa**0.5 + 1)
    e0 = float(V_STAR @ H @ V_STAR)
    for k, e in enumerate(errors, start=1):
        assert e**0.5 <= 2 * rho**k * e0**0.5 + 1e-12


def test_cg_on_a_dict_tree_equals_the_flat_solve():
    # The solvers only use tree arithmetic: split the vector into two named leaves.
    def split(v):
        return {"a": v[:5].reshape(5), "b": v[5:].reshape(3, 1)}

    def join(t):
        return torch.cat([t["a"].reshape(-1), t["b"].reshape(-1)])

    res = bl.CG(steps=N)(lambda t: split(H @ join(t)), split(B))
    assert set(res.v) == {"a", "b"} and res.v["b"].shape == (3, 1)
    assert _rel(join(res.v), V_STAR) <= 1e-8


@pytest.mark.parametrize(
    "solver, residual_rtol",
    [
        (bl.CG(steps=N), 1e-12),
        (bl.Neumann(steps=60, lr=0.15), 1e-12),
        (bl.FixedPoint(steps=60, lr=0.15), 1e-12),
        (bl.NormalGD(steps=600, lr=0.019), 1e-12),
        # its residual after 60 steps is ~1e-11, not rounding, and each step's η = ‖r‖²/rᵀHr
        # sums per leaf here and over one vector there: 60 such ratios agree to ~1e-10
        (bl.LineSearchStep(steps=60), 1e-9),
    ],
    ids=["CG", "Neumann", "FixedPoint", "NormalGD", "LineSearchStep"],
)
def test_solvers_on_dict_trees_pair_leaves_by_key(solver, residual_rtol):
    # The solvers iterate on leaf lists; a warm start and a matvec whose dicts list the keys in
    # another order must still be paired by key (the same iterates as on the flat vector).
    def split(v, order=("a", "b")):
        parts = {"a": v[:5].reshape(5), "b": v[5:].reshape(3, 1)}
        return {k: parts[k] for k in order}

    def join(t):
        return torch.cat([t["a"].reshape(-1), t["b"].reshape(-1)])

    v0 = 0.5 * V_STAR
    tree = solver(lambda t: split(H @ join(t), ("b", "a")), split(B), v0=split(v0, ("b", "a")))
    flat = solver(_mv(H), B, v0=v0.clone())
    assert list(tree.v) == ["a", "b"] and tree.v["b"].shape == (3, 1)
    torch.testing.assert_close(join(tree.v), flat.v, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(tree.residual_sq, flat.residual_sq, rtol=residual_rtol, atol=1e-24 * float(B @ B))
    assert _rel(flat.v, V_STAR) <= 1e-3  # the comparison is made near the solution, not at an arbitrary point


def test_cg_warm_start_is_used():
    exact = bl.CG(steps=1)(_mv(H), B, v0=V_STAR.clone())
    assert _rel(exact.v, V_STAR) <= 1e-12  # r₀ = 0: nothing to correct
    v0 = V_STAR + 0.1 * torch.ones(N, dtype=F64)
    one = bl.CG(steps=1)(_mv(H), B, v0=v0)
    r0 = B - H @ v0
    alpha = (r0 @ r0) / (r0 @ H @ r0)
    torch.testing.assert_close(one.v, v0 + alpha * r0, rtol=1e-13, atol=1e-13)


def test_cg_with_zero_right_hand_side_stays_at_zero():
    res = bl.CG(steps=3)(_mv(H), torch.zeros(N, dtype=F64))
    assert torch.count_nonzero(res.v) == 0 and float(res.residual_sq) == 0.0


@pytest.mark.parametrize("K", [0, 1, 5, 30])
def test_neumann_equals_the_truncated_series(K):
    lr = 0.15
    res = bl.Neumann(steps=max(K, 1), lr=lr)(_mv(H), B)
    K_eff = max(K, 1)
    torch.testing.assert_close(res.v, _neumann_closed_form(H, B, lr, K_eff), rtol=1e-12, atol=1e-12)
    # the reported residual is the one of the iterate before the last term: (I − sH)^K b
    prev = _neumann_closed_form(H, B, lr, K_eff - 1)
    true_r = B - H @ prev
    torch.testing.assert_close(res.residual_sq, true_r @ true_r, rtol=1e-10, atol=1e-14)


def test_neumann_ignores_v0_and_converges_at_the_predicted_rate():
    lr = 0.15  # < 2/λmax = 0.2
    rho = max(abs(1 - lr * l) for l in EIGS)  # = 0.85 (from λ_min = 1)
    errs = []
    for K in (20, 40, 60, 80):
        v = bl.Neumann(steps=K, lr=lr)(_mv(H), B, v0=torch.ones(N, dtype=F64)).v
        # exact error: v* − v_K = (I − sH)^{K+1} v*
        err = float((V_STAR - v).norm())
        assert err <= rho ** (K + 1) * float(V_STAR.norm()) * (1 + 1e-9)
        errs.append(err)
    ratios = [(b / a) ** (1 / 20) for a, b in itertools.pairwise(errs)]
    assert ratios[-1] == pytest.approx(rho, rel=1e-3)


def test_neumann_diverges_above_the_stability_bound():
    v = bl.Neumann(steps=40, lr=0.25)(_mv(H), B).v  # |1 − 0.25·10| = 1.5 > 1
    assert _rel(v, V_STAR) > 1e3


def test_fixed_point_from_zero_equals_neumann_with_one_term_less():
    lr = 0.15
    for K in (1, 2, 7):
        fp = bl.FixedPoint(steps=K, lr=lr)(_mv(H), B)
        torch.testing.assert_close(fp.v, _neumann_closed_form(H, B, lr, K - 1), rtol=1e-12, atol=1e-12)


def test_fixed_point_warm_start_and_reported_residual():
    lr, K = 0.12, 25
    v0 = torch.linspace(-1, 1, N, dtype=F64)
    res = bl.FixedPoint(steps=K, lr=lr)(_mv(H), B, v0=v0)
    P = torch.eye(N, dtype=F64) - lr * H
    # v_K − v* = (I − sH)^K (v₀ − v*)
    expected = V_STAR + torch.linalg.matrix_power(P, K) @ (v0 - V_STAR)
    torch.testing.assert_close(res.v, expected, rtol=1e-11, atol=1e-12)
    before_last = V_STAR + torch.linalg.matrix_power(P, K - 1) @ (v0 - V_STAR)
    r = H @ before_last - B
    torch.testing.assert_close(res.residual_sq, r @ r, rtol=1e-9, atol=1e-16)
    rho = max(abs(1 - lr * l) for l in EIGS)
    assert float((res.v - V_STAR).norm()) <= rho**K * float((v0 - V_STAR).norm()) * (1 + 1e-9)


def test_fixed_point_converges_to_the_solution():
    res = bl.FixedPoint(steps=200, lr=0.18)(_mv(H), B)
    assert _rel(res.v, V_STAR) <= 1e-8


def test_normal_gd_reaches_the_minimum_norm_solution_of_a_singular_system():
    Hs = _matrix([0.0, 0.0, 0.0, 1.0, 1.3, 1.6, 1.8, 2.0], seed=3)
    b = torch.randn(N, generator=torch.Generator().manual_seed(7), dtype=F64)  # not in Range(H)
    lr = 1.0 / 2.0**2
    res = bl.NormalGD(steps=150, lr=lr)(_mv(Hs), b)
    v_min_norm = torch.linalg.pinv(Hs, hermitian=True) @ b
    assert _rel(res.v, v_min_norm) <= 1e-8
    # least squares: the normal residual vanishes, the residual does not
    assert float(res.normal_residual_sq) <= 1e-14
    r = Hs @ v_min_norm - b
    torch.testing.assert_close(res.residual_sq, r @ r, rtol=1e-8, atol=0)
    assert float(res.residual_sq) > 0.1


def test_normal_gd_one_step_and_reported_residuals():
    lr = 0.004
    v0 = torch.linspace(0, 1, N, dtype=F64)
    res = bl.NormalGD(steps=1, lr=lr)(_mv(H), B, v0=v0)
    r = H @ v0 - B
    torch.testing.assert_close(res.v, v0 - lr * H @ r, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(res.residual_sq, r @ r, rtol=1e-13, atol=0)
    torch.testing.assert_close(res.normal_residual_sq, (H @ r) @ (H @ r), rtol=1e-13, atol=0)
    assert bl.NormalGD(steps=4).hvps() == 8


def test_line_search_step_equals_the_hand_computed_step():
    v0 = torch.linspace(-0.5, 0.5, N, dtype=F64)
    res = bl.LineSearchStep(steps=1)(_mv(H), B, v0=v0)
    r = H @ v0 - B
    eta = (r @ r) / (r @ H @ r)
    torch.testing.assert_close(res.step, eta, rtol=1e-14, atol=0)
    torch.testing.assert_close(res.v, v0 - eta * r, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(res.residual_sq, r @ r, rtol=1e-14, atol=0)
    # the exact line search minimises the quadratic along −r
    q = lambda v: 0.5 * v @ H @ v - B @ v
    for t in (0.9, 1.1):
        assert float(q(v0 - t * eta * r)) > float(q(res.v))


def test_line_search_steps_converge_like_steepest_descent():
    res = bl.LineSearchStep(steps=60)(_mv(H), B)
    kappa = 10.0
    bound = ((kappa - 1) / (kappa + 1)) ** 60 * float((V_STAR @ H @ V_STAR) ** 0.5)
    err = V_STAR - res.v
    assert float((err @ H @ err) ** 0.5) <= bound * (1 + 1e-9)


def test_line_search_falls_back_on_nonpositive_curvature():
    Hn = torch.diag(torch.tensor([-1.0, -2.0, 3.0], dtype=F64))
    b = torch.tensor([1.0, 1.0, 0.0], dtype=F64)  # r = −b from 0: rᵀHr = −3 < 0
    res = bl.LineSearchStep(steps=1, fallback=0.05)(_mv(Hn), b)
    assert float(res.step) == 0.05
    torch.testing.assert_close(res.v, 0.05 * b, rtol=1e-15, atol=0)
    # zero residual: the fallback, but no movement
    v0 = torch.linspace(-1, 1, N, dtype=F64)
    at_solution = bl.LineSearchStep(steps=1, fallback=0.05)(_mv(H), H @ v0, v0=v0)
    assert float(at_solution.step) == 0.05
    assert torch.equal(at_solution.v, v0)


def test_line_search_step_is_clipped_by_max_step():
    v0 = torch.zeros(N, dtype=F64)
    r = -B
    eta = float((r @ r) / (r @ H @ r))
    clipped = bl.LineSearchStep(steps=1, max_step=eta / 2)(_mv(H), B, v0=v0)
    assert float(clipped.step) == pytest.approx(eta / 2, rel=1e-15)
    torch.testing.assert_close(clipped.v, (eta / 2) * B, rtol=1e-14, atol=1e-15)
    unclipped = bl.LineSearchStep(steps=1, max_step=2 * eta)(_mv(H), B, v0=v0)
    assert float(unclipped.step) == pytest.approx(eta, rel=1e-14)


def test_line_search_step_size_function_guards():
    one = torch.tensor(1.0, dtype=F64)
    assert float(line_search_step_size(torch.tensor(4.0, dtype=F64), torch.tensor(2.0, dtype=F64), 0.1, None)) == 2.0
    assert float(line_search_step_size(one, torch.tensor(-1.0, dtype=F64), 0.1, None)) == 0.1
    assert float(line_search_step_size(one, torch.tensor(0.0, dtype=F64), 0.3, None)) == 0.3
    assert float(line_search_step_size(one, torch.tensor(0.01, dtype=F64), 0.1, 5.0)) == 5.0


@pytest.mark.parametrize("top", [10.0, -10.0])
def test_estimate_spectral_norm_finds_the_largest_absolute_eigenvalue(top):
    M = _matrix([1.0, -1.7, 2.4, 3.1, -3.8, 4.5, 6.0, top], seed=11)
    est = estimate_spectral_norm(_mv(M), torch.zeros(N, dtype=F64), iters=30)
    assert abs(est - 10.0) <= 1e-3
    assert isinstance(est, float)
    tree_est = estimate_spectral_norm(
        lambda t: {"a": (M @ torch.cat([t["a"], t["b"]]))[:3], "b": (M @ torch.cat([t["a"], t["b"]]))[3:]},
        {"a": torch.zeros(3, dtype=F64), "b": torch.zeros(5, dtype=F64)},
    )
    assert abs(tree_est - 10.0) <= 1e-3
    assert estimate_spectral_norm(lambda v: 0 * v, torch.zeros(N, dtype=F64)) == 0.0


def test_hvps_per_call():
    assert bl.CG(steps=7).hvps() == 7
    assert bl.Neumann(steps=5).hvps() == 5
    assert bl.FixedPoint(steps=3).hvps() == 3
    assert bl.LineSearchStep(steps=2).hvps() == 4


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: bl.CG(steps=0), r"CG\(steps=0\) must be an integer >= 1"),
        (lambda: bl.CG(steps=2.0), r"CG\(steps=2.0\)"),
        (lambda: bl.CG(steps=True), r"CG\(steps=True\)"),
        (lambda: bl.Neumann(lr=0.0), r"Neumann\(lr=0.0\) must be a positive number"),
        (lambda: bl.Neumann(steps=-1), r"Neumann\(steps=-1\)"),
        (lambda: bl.FixedPoint(lr=-0.1), r"FixedPoint\(lr=-0.1\)"),
        (lambda: bl.FixedPoint(lr="0.1"), r"FixedPoint\(lr='0.1'\)"),
        (lambda: bl.NormalGD(steps=0), r"NormalGD\(steps=0\)"),
        (lambda: bl.NormalGD(lr=0), r"NormalGD\(lr=0\)"),
        (lambda: bl.LineSearchStep(fallback=0.0), r"LineSearchStep\(fallback=0.0\)"),
        (lambda: bl.LineSearchStep(max_step=-1.0), r"LineSearchStep\(max_step=-1.0\)"),
    ],
)
def test_construction_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


SINGULAR = _matrix([0.0, 0.0, 0.0, 1.0, 1.3, 1.6, 1.8, 2.0], seed=3)
B_IN_RANGE = SINGULAR @ torch.randn(N, generator=torch.Generator().manual_seed(7), dtype=F64)


def test_cg_on_a_consistent_singular_system_reaches_the_minimum_norm_solution_in_rank_steps():
    res = bl.CG(steps=5)(_mv(SINGULAR), B_IN_RANGE)
    v_min_norm = torch.linalg.pinv(SINGULAR, hermitian=True) @ B_IN_RANGE
    assert _rel(res.v, v_min_norm) <= 1e-8


def test_cg_extra_steps_on_a_solved_singular_system_leave_v_unchanged():
    v_min_norm = torch.linalg.pinv(SINGULAR, hermitian=True) @ B_IN_RANGE
    res = bl.CG(steps=20)(_mv(SINGULAR), B_IN_RANGE)
    assert _rel(res.v, v_min_norm) <= 1e-8


@pytest.mark.parametrize("cls", [bl.Neumann, bl.FixedPoint, bl.NormalGD])
@pytest.mark.parametrize("lr, shown", [(float("inf"), "inf"), (float("nan"), "nan"), (True, "True"), (-2e-4, "-0.0002")])
def test_solver_step_sizes_reject_nonfinite_and_bools(cls, lr, shown):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\(lr={shown}\) must be a positive number"):
        cls(lr=lr)
