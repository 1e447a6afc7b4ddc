"""The stochastic family against mathematics, on the finite-sum quadratic (float64):
fixed points (§ closed forms), variance-reduced linear convergence, decreasing-step
convergence, unbiasedness of the estimators (statistical, 5-sigma bounds, fixed seeds),
F2SA's penalty path, costs per iteration, resume bit for bit, bad input."""

import pytest
import torch

import bilevel as bl
from bilevel.parts import SagaEstimate, StochasticNeumann, evaluate
from bilevel.schedules import Polynomial
from bilevel.streams import as_draws

F64 = torch.float64


@pytest.fixture(scope="module")
def p():
    return bl.problems.finite_sum_quadratic(n_lower=64, n_upper=32, dim_x=3, dim_y=4, mu=0.5, seed=0)


def err(result_or_state, p):
    return float((result_or_state.x["x"] - p.x_star["x"]).norm())


def _root(gradient, dim):
    """The root of an affine map x ↦ G(x) on R^dim."""
    g0 = gradient(torch.zeros(dim, dtype=F64))
    K = torch.stack([gradient(torch.eye(dim, dtype=F64)[i]) - g0 for i in range(dim)], dim=1)
    return -torch.linalg.solve(K, g0)


def _run(p, method, iters, data):
    """Steps without solve's logging (the same iterates; cheaper on a busy machine)."""
    source = bl.solve.__globals__["as_data_source"](data)
    state = method.init(p, batch=source.batch_at(0))
    for k in range(iters):
        state, _ = method.step(p, state, source.batch_at(k))
    return state


# -- full batch: the fixed points of the closed-form table --------------------------------


@pytest.mark.parametrize(
    ("method", "iters"),
    [
        (bl.SOBA(lr_lower=0.5, lr_upper=0.5), 200),
        (bl.MASOBA(lr_lower=0.5, lr_upper=0.2, theta=0.5), 300),
        (bl.SABA(lr_lower=0.5, lr_upper=0.5), 200),
        (bl.SRBA(lr_lower=0.5, lr_upper=0.5), 200),
        (bl.AmIGO(lr_lower=0.5, lower_steps=2, dual_steps=2, lr_upper=0.5), 100),
    ],
    ids=lambda m: getattr(m, "name", ""),
)
def test_full_batch_methods_reach_the_exact_solution(p, method, iters):
    """Full batch, SOBA-type methods have x* as their fixed point (no bias; v → H⁻¹∇_y f)."""
    state = _run(p, method, iters, None)
    assert err(state, p) < 1e-10
    assert torch.allclose(state.v["y"], p.multiplier(state.x)["y"], atol=1e-8)


def test_full_batch_stocbio_reaches_its_truncated_neumann_fixed_point(p):
    """∇_x f − J A⁻¹(I − (I − ηA)^{K+1}) ∇_y f = 0 at y*(x): a bias ∝ (1 − ημ)^{K+1}."""
    m, eta, K = p.means, 0.5, 3
    A = m["A"]
    trunc = torch.linalg.solve(A, torch.eye(4, dtype=F64) - torch.linalg.matrix_power(torch.eye(4, dtype=F64) - eta * A, K + 1))

    def gradient(x):
        y = p.y_of({"x": x})["y"]
        return m["Q"] @ x + m["D"] @ y + m["q"] - m["C"] @ (trunc @ (m["P"] @ y + m["D"].T @ x + m["p"]))

    x_K = _root(gradient, 3)
    state = _run(p, bl.StocBiO(lr_lower=eta, lower_steps=3, neumann_steps=K, lr_upper=0.5), 150, None)
    assert float((state.x["x"] - x_K).norm()) < 1e-9
    assert float((x_K - p.x_star["x"]).norm()) > 1e-3  # the bias is real, and the run found it


def test_f2sa_penalty_path_converges_to_x_star_as_lambda_grows(p):
    """At a fixed λ, F2SA's rest point is the root of ∇_x min_y L_λ (closed form); |x_λ − x*| = O(1/λ)."""
    m = p.means
    errors = []
    for lam in (1.0, 10.0, 100.0):

        def gradient(x, lam=lam):
            y_lam = -torch.linalg.solve(m["P"] + lam * m["A"], m["D"].T @ x + m["p"] + lam * (m["C"].T @ x + m["a"]))
            y_star = p.y_of({"x": x})["y"]
            return m["Q"] @ x + m["D"] @ y_lam + m["q"] + lam * (m["C"] @ (y_lam - y_star))

        x_lam = _root(gradient, 3)
        beta = 1.0 / (lam * p.smoothness["L_g"] + 2.0)
        alpha, steps = (0.5, 5) if lam < 100 else (0.2, 10)  # λ amplifies the inner errors in the x step
        method = bl.F2SA(lr_lower=beta, lr_shadow=0.8, lr_upper=alpha, lambda0=lam, delta0=0.0, lower_steps=steps)
        state = _run(p, method, 150 if lam < 100 else 200, None)
        assert float((state.x["x"] - x_lam).norm()) < 1e-7, lam
        errors.append(float((x_lam - p.x_star["x"]).norm()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] / errors[2] > 20  # O(1/λ): λ 100× larger, error ~100× smaller (within 5×)
    assert errors[1] / errors[2] > 5


def test_f2sa_increments_the_penalty(p):
    state = _run(p, bl.F2SA(lambda0=1.0, delta0=0.5, lower_steps=1), 3, None)
    expected = 1.0 + 0.5 * sum((k + 1) ** (-1 / 7) for k in range(3))
    assert state.extra["penalty"].lam == pytest.approx(expected)


# -- variance reduction: linear convergence with mini-batches -----------------------------


@pytest.mark.parametrize(
    ("method", "iters"), [(bl.SABA(lr_lower=0.3, lr_upper=0.3), 600), (bl.SRBA(lr_lower=0.3, lr_upper=0.3), 300)], ids=["SABA", "SRBA"]
)
def test_variance_reduced_methods_reach_x_star_to_1e8_on_mini_batches(p, method, iters):
    state = _run(p, method, iters, p.streams(batch_size=16, seed=1))
    assert err(state, p) < 1e-8


def test_saba_with_full_memory_initialisation_converges_too(p):
    state = _run(p, bl.SABA(lr_lower=0.3, lr_upper=0.3, init_memory="full"), 600, p.streams(batch_size=16, seed=2))
    assert err(state, p) < 1e-8


def test_a_saba_state_is_stepped_once_and_a_copy_branches_exactly(p):
    """SABA's tables are written in place: stepping one state twice would leave a write the
    run never made and bias the means for good, so the second step is refused (one line);
    a deep copy steps like the original, bit for bit, and the checkpoint keeps the count."""
    import copy

    method, streams = bl.SABA(lr_lower=0.3, lr_upper=0.3), p.streams(batch_size=16, seed=1)
    state = method.init(p, batch=streams.batch_at(0))
    for k in range(3):
        state, _ = method.step(p, state, streams.batch_at(k))
    branch = copy.deepcopy(state)
    after, _ = method.step(p, state, streams.batch_at(3))
    with pytest.raises(ValueError, match="this SABA state was stepped before: its SAGA tables are updated in place") as err_info:
        method.step(p, state, streams.batch_at(3))
    assert "\n" not in str(err_info.value)
    again, _ = method.step(p, branch, streams.batch_at(3))
    assert torch.equal(again.x["x"], after.x["x"]) and torch.equal(again.y["y"], after.y["y"])
    restored = bl.State.from_dict(after.to_dict())
    method.step(p, restored, streams.batch_at(4))  # the count travels with the state


def test_constant_step_soba_plateaus_where_saba_converges(p):
    """The reason for variance reduction: with the same constant steps and batches, SOBA stalls at a noise floor."""
    streams = p.streams(batch_size=16, seed=1)
    soba = _run(p, bl.SOBA(lr_lower=0.3, lr_upper=0.3), 600, streams)
    assert err(soba, p) > 1e-4


# -- decreasing steps: SOBA and MA-SOBA to 1e-3 ----------------------------------------


@pytest.mark.parametrize(
    "method",
    [
        bl.SOBA(lr_lower=Polynomial(0.5, 0.5), lr_upper=Polynomial(0.5, 0.5)),
        bl.MASOBA(lr_lower=Polynomial(0.5, 0.5), lr_upper=Polynomial(0.5, 0.5), theta=0.5),
    ],
    ids=["SOBA", "MASOBA"],
)
def test_decreasing_steps_reach_x_star_to_1e3(method):
    """Passes over 2 blocks in a new order each pass (the benchmark's sampler), steps ∝ (k+1)^{-1/2}."""
    q = bl.problems.finite_sum_quadratic(n_lower=64, n_upper=64, dim_x=3, dim_y=4, mu=0.5, seed=0)
    state = _run(q, method, 600, q.streams(batch_size=32, seed=1, sampling="shuffle"))
    assert err(state, q) < 1e-3


@pytest.fixture(scope="module")
def large():
    """65536 samples a level: x* = O(n^{-1/2}) is small, so the test needs big batches (4 blocks)."""
    return bl.problems.finite_sum_quadratic(n_lower=65536, n_upper=65536, dim_x=3, dim_y=4, mu=0.5, seed=0)


@pytest.mark.parametrize(
    "method",
    [
        bl.StocBiO(lr_lower=0.5, lower_steps=2, neumann_steps=15, lr_upper=Polynomial(4.0, 1.0, 8.0)),
        bl.AmIGO(lr_lower=0.5, lower_steps=2, dual_steps=2, lr_upper=Polynomial(4.0, 1.0, 8.0)),
        bl.SOBA(lr_lower=0.5, lr_upper=Polynomial(4.0, 1.0, 8.0)),
    ],
    ids=["StocBiO", "AmIGO", "SOBA"],
)
def test_decreasing_upper_steps_reach_x_star_to_1e3_with_independent_draws(large, method):
    """α_k = 4/(k + 8) (4 ≥ 2/μ_F), independent uniform draws: the noise averages out as O(k^{-1/2})."""
    assert float(large.x_star["x"].norm()) > 5e-3  # 1e-3 is a real target here
    state = _run(large, method, 200, large.streams(batch_size=16384, seed=3))
    assert err(state, large) < 1e-3


# -- unbiasedness (statistical, fixed seeds, 5-sigma bounds) -------------------------------


def _point(p, seed=5):
    gen = torch.Generator().manual_seed(seed)
    x = {"x": torch.randn(3, generator=gen, dtype=F64)}
    y = {"y": torch.randn(4, generator=gen, dtype=F64)}
    v = {"y": torch.randn(4, generator=gen, dtype=F64)}
    return x, y, v


def _assert_mean(samples, expected, sigmas=5.0):
    samples = torch.stack(samples)
    mean, std = samples.mean(0), samples.std(0)
    bound = sigmas * std / samples.shape[0] ** 0.5 + 1e-12
    assert ((mean - expected).abs() <= bound).all(), (mean, expected, bound)
    assert (std > 0).any()  # the draws differ: the test can fail


def test_soba_directions_are_unbiased(p):
    """E[D_y, D_v, D_x] over independent (ξ, ζ) = the full-batch directions at (x, y, v)."""
    x, y, v = _point(p)
    oracles = bl.Oracles()
    full = evaluate(oracles, p, x, y, v, None, None)
    streams = p.streams(batch_size=4, seed=11)
    estimator = bl.parts.PlainEstimate()
    ev = lambda *a: evaluate(oracles, p, *a)
    samples = {"d_y": [], "d_v": [], "d_x": []}
    for k in range(800):
        (d_y, d_v, d_x), _, _ = estimator.estimate(ev, x, y, v, streams.batch_at(k), None, k)
        samples["d_y"].append(d_y["y"])
        samples["d_v"].append(d_v["y"])
        samples["d_x"].append(d_x["x"])
    _assert_mean(samples["d_y"], full.grad_y_g["y"])
    _assert_mean(samples["d_v"], full.hv["y"] - full.grad_y_f["y"])
    _assert_mean(samples["d_x"], full.grad_x_f["x"] - full.jv["x"])


class _Blocks:
    """Draws of chosen blocks (for the exact expectation of the SAGA estimator)."""

    def __init__(self, streams, i, j):
        self.streams, self.i, self.j = streams, i, j

    def lower_block(self, t=0):
        s = self.streams.lower
        return self.i, s.weight(self.i), s.take(self.i)

    def upper_block(self, t=0):
        s = self.streams.upper
        return self.j, s.weight(self.j), s.take(self.j)


def test_saga_estimate_is_unbiased_given_any_memory(p):
    """E_{i,j}[out] = the full value, whatever the rows hold (exact over the blocks)."""
    x, y, v = _point(p)
    oracles = bl.Oracles()
    ev = lambda *a: evaluate(oracles, p, *a)
    streams = p.streams(batch_size=16, seed=0)
    part = SagaEstimate()
    base = part.init(x, y, v, streams.batch_at(0), ev)
    gen = torch.Generator().manual_seed(3)
    tables = {key: tree for key, tree in base.rows.items() if key != "writes"}  # no write counter: the rows are set by hand
    rows = {key: bl.tree.tree_map(lambda t: torch.randn(t.shape, generator=gen, dtype=F64), tree) for key, tree in tables.items()}
    w_lo = [streams.lower.weight(i) for i in range(streams.lower.n_blocks)]
    w_up = [streams.upper.weight(j) for j in range(streams.upper.n_blocks)]
    means = {
        key: bl.tree.tree_map(
            lambda t, key=key: sum(w * t[b] for b, w in enumerate(w_lo if key in ("grad_y_g", "hv", "jv") else w_up)), rows[key]
        )
        for key in rows
    }
    expected = [0.0, 0.0, 0.0]
    for i, wi in enumerate(w_lo):
        for j, wj in enumerate(w_up):
            state = type(base)(rows={key: bl.tree.clone(t) for key, t in rows.items()}, means=dict(means))
            directions, _, _ = part.estimate(ev, x, y, v, _Blocks(streams, i, j), state, 0)
            for n, d in enumerate(directions):
                expected[n] = expected[n] + wi * wj * bl.tree.leaves(d)[0]
    full = evaluate(oracles, p, x, y, v, None, None)
    assert torch.allclose(expected[0], full.grad_y_g["y"], atol=1e-12)
    assert torch.allclose(expected[1], full.hv["y"] - full.grad_y_f["y"], atol=1e-12)
    assert torch.allclose(expected[2], full.grad_x_f["x"] - full.jv["x"], atol=1e-12)


def test_stocbio_neumann_estimate_has_the_truncated_series_as_its_mean(p):
    """E[v] = A⁻¹(I − (I − ηA)^{K+1}) u with an independent Hessian batch per factor."""
    x, y, _ = _point(p)
    oracles = bl.Oracles()
    u = {"y": torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=F64)}
    eta, K = 0.3, 3
    part = StochasticNeumann(steps=K)
    streams = p.streams(batch_size=4, seed=4)
    samples = []
    for k in range(600):
        draws = streams.batch_at(k)
        v = part.solve(lambda q, draws=draws: oracles.linearize(p.lower, x, y, draws.lower(q)).hvp, u, eta)
        samples.append(v["y"])
    A, eye = p.means["A"], torch.eye(4, dtype=F64)
    expected = torch.linalg.solve(A, (eye - torch.linalg.matrix_power(eye - eta * A, K + 1)) @ u["y"])
    _assert_mean(samples, expected)


# -- costs, state, resume, bad input -----------------------------------------------------


def test_soba_costs_one_gy_one_hj_one_gf_per_iteration(p):
    oracles = bl.CountingOracles()
    method = bl.SOBA(oracles=oracles)
    streams = p.streams(batch_size=8)
    state = method.init(p, batch=streams.batch_at(0))
    oracles.reset()
    method.step(p, state, streams.batch_at(0))
    assert oracles.counts == {"linearize": 1, "both": 1, "gradients": 1}


def test_stocbio_costs_t_gy_k_h_one_j_one_gf(p):
    oracles = bl.CountingOracles()
    method = bl.StocBiO(oracles=oracles, lower_steps=3, neumann_steps=4)
    state = method.init(p)
    oracles.reset()
    method.step(p, state, None)
    assert oracles.counts["gradient_y"] == 3 and oracles.counts["gradients"] == 1
    assert oracles.counts["linearize"] == 5 and oracles.counts["hvp"] == 4 and oracles.counts["mixed"] == 1


@pytest.mark.parametrize("name", ["SABA", "SRBA", "MASOBA", "F2SA"])
def test_resume_is_bit_exact_on_streams(tmp_path, p, name):
    method = {
        "SABA": bl.SABA(lr_lower=0.3, lr_upper=0.3),
        "SRBA": bl.SRBA(lr_lower=0.3, lr_upper=0.3, period=7),
        "MASOBA": bl.MASOBA(theta=0.5),
        "F2SA": bl.F2SA(lower_steps=2),
    }[name]
    streams = p.streams(batch_size=16, seed=9)
    straight = bl.solve(p, method, data=streams, max_iters=24)
    path = tmp_path / "run.pt"
    bl.solve(p, method, data=streams, max_iters=11, checkpoint=path)
    resumed = bl.solve(p, method, data=streams, max_iters=24, resume=path)
    assert torch.equal(straight.x["x"], resumed.x["x"]) and torch.equal(straight.y["y"], resumed.y["y"])


def test_bad_options_fail_with_one_line():
    with pytest.raises(ValueError, match=r"SOBA\(lr_lower=0\)"):
        bl.SOBA(lr_lower=0)
    with pytest.raises(ValueError, match=r"MASOBA\(theta=1.5\)"):
        bl.MASOBA(theta=1.5)
    with pytest.raises(ValueError, match="init_memory"):
        bl.SABA(init_memory="warm")
    with pytest.raises(ValueError, match=r"StocBiO\(neumann_steps=-1\)"):
        bl.StocBiO(neumann_steps=-1)


def test_a_double_loop_method_on_a_dry_shuffled_stream_says_how_many_draws_it_needs(p):
    method = bl.AmIGO(lower_steps=2, dual_steps=3)
    assert method.lower_draws == 6
    streams = p.streams(batch_size=16, sampling="shuffle", draws=1)
    state = method.init(p, batch=streams.batch_at(0))
    with pytest.raises(IndexError, match="ran dry"):
        method.step(p, state, streams.batch_at(0))


def test_streams_on_another_device_are_refused_at_init(p):
    streams = bl.Streams(
        upper=bl.Stream(tuple(t.to("meta") for t in p.upper_data), batch_size=8), lower=bl.Stream(p.lower_data, batch_size=8)
    )
    with pytest.raises(ValueError, match="the upper stream's data is on meta but the variables are on cpu"):
        bl.SOBA().init(p, batch=streams.batch_at(0))


def test_full_draws_make_the_stochastic_methods_deterministic(p):
    a = _run(p, bl.SABA(lr_lower=0.1, lr_upper=0.1), 5, None)
    b = _run(p, bl.SOBA(lr_lower=0.1, lr_upper=0.1), 5, None)
    assert torch.allclose(a.x["x"], b.x["x"], atol=1e-14)  # full-batch SABA is SOBA with constant steps
    assert as_draws(None).lower_blocks == 1


DOC_MODULES = ["bilevel.streams", "bilevel.parts.stochastic", "bilevel.methods.stochastic", "bilevel.problems.finite_sum"]


@pytest.mark.parametrize("name", DOC_MODULES)
def test_docstring_examples_run(name):
    import doctest
    import importlib

    failures, attempted = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0 and failures == 0
