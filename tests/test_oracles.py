import pytest
import torch

import bilevel as bl
from bilevel import oracles as oracles_module
from bilevel import tree as T
from bilevel.oracles import ORACLE_MODES, WeightedLinearization, scaled_products
from bilevel.problems import T2, T3, T1g

F64 = torch.float64
MODES = list(ORACLE_MODES)
RTOL = {"reverse": 1e-6, "forward": 1e-6, "finite_difference": 1e-5}


# ---------------------------------------------------------------------------------------
# test problems: (objective h, x, y, batch, direction v)
# ---------------------------------------------------------------------------------------
def _t1g_case():
    problem = T1g(n=6)
    gen = torch.Generator().manual_seed(1)
    x = {"x": torch.randn(6, generator=gen, dtype=F64)}
    y = {"y": torch.randn(6, generator=gen, dtype=F64)}
    v = {"y": torch.randn(6, generator=gen, dtype=F64)}
    return problem, x, y, None, v


def _t3_case():
    problem = T3(copies=4)
    gen = torch.Generator().manual_seed(2)
    x = {"x": 3.0 * torch.rand(4, generator=gen, dtype=F64)}
    y = {"y": torch.randn(4, generator=gen, dtype=F64)}
    v = {"y": torch.randn(4, generator=gen, dtype=F64)}
    return problem, x, y, None, v


def _mlp_case():
    """A tanh network as lower level; x = per-sample weight direction and log-L2 (2 tensors), y = 3 tensors."""
    gen = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)
    batch = {"Z": r(10, 3), "t": r(10), "Zv": r(7, 3), "tv": r(7)}

    def net(y, inputs):
        return torch.tanh(inputs @ y["W"].T + y["b"]) @ y["c"]

    def lower(x, y, b):
        weights = torch.sigmoid(b["Z"] @ x["a"])
        fit = (weights * (net(y, b["Z"]) - b["t"]) ** 2).mean()
        return fit + 0.5 * x["log_l2"].exp() * ((y["W"] ** 2).sum() + (y["c"] ** 2).sum())

    def upper(x, y, b):
        return ((net(y, b["Zv"]) - b["tv"]) ** 2).mean() + 0.1 * (x["a"] ** 2).sum() + 0.05 * x["log_l2"] ** 2

    problem = bl.Problem(upper=upper, lower=lower, name="mlp")
    x = {"a": r(3), "log_l2": torch.tensor(-0.5, dtype=F64)}
    y = {"W": 0.7 * r(4, 3), "b": 0.3 * r(4), "c": r(4)}
    v = {"W": r(4, 3), "b": r(4), "c": r(4)}
    return problem, x, y, batch, v


CASES = {"T1g": _t1g_case, "T3": _t3_case, "mlp": _mlp_case}


# ---------------------------------------------------------------------------------------
# independent references (plain autograd and finite differences, no library code)
# ---------------------------------------------------------------------------------------
def _rel_err(a, b):
    return float(T.norm(T.sub(a, b)) / T.norm(b))


def _assert_tree_close(a, b, rtol):
    assert set(T.structure_summary(a).split(", ")) == set(T.structure_summary(b).split(", "))
    err = _rel_err(a, b)
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


def _autograd_grads(fn, x, y, batch):
    xr = T.tree_map(lambda t: t.detach().clone().requires_grad_(True), x)
    yr = T.tree_map(lambda t: t.detach().clone().requires_grad_(True), y)
    value = fn(xr, yr, batch)
    grads = torch.autograd.grad(value, T.leaves(xr) + T.leaves(yr), allow_unused=True, materialize_grads=True)
    nx = len(T.leaves(x))
    return T.unflatten_like(list(grads[:nx]), x), T.unflatten_like(list(grads[nx:]), y)


def _fd_function_grad(fn, x, y, batch, wrt, h=1e-4):
    """Five-point central differences of h(x, y) coordinate by coordinate (error O(h^4))."""
    base = x if wrt == "x" else y
    out = []
    for i, leaf in enumerate(T.leaves(base)):
        g = torch.zeros_like(leaf)
        for j in range(leaf.numel()):

            def at(s):
                moved = [t.clone() for t in T.leaves(base)]
                moved[i].view(-1)[j] += s  # noqa: B023 -- at() is called only within this iteration
                tree = T.unflatten_like(moved, base)
                return fn(tree, y, batch) if wrt == "x" else fn(x, tree, batch)

            g.view(-1)[j] = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)
        out.append(g)
    return T.unflatten_like(out, base)


def _fd_gradient_derivative(fn, x, y, batch, v, h=1e-3):
    """d/ds (∇_x h, ∇_y h)(x, y + s v) at s = 0, five-point stencil: (J v, H v)."""

    def grads(s):
        return _autograd_grads(fn, x, T.axpy(s, v, y), batch)

    pts = {s: grads(s * h) for s in (-2, -1, 1, 2)}
    combo = lambda idx: T.scale(
        1.0 / (12 * h),
        T.add(T.sub(pts[-2][idx], pts[2][idx]), T.scale(8.0, T.sub(pts[1][idx], pts[-1][idx]))),
    )
    return combo(0), combo(1)


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_reference_fd_helpers_agree_with_autograd(case):
    problem, x, y, batch, _ = CASES[case]()
    gx, gy = _autograd_grads(problem.lower, x, y, batch)
    _assert_tree_close(_fd_function_grad(problem.lower, x, y, batch, "x"), gx, 1e-8)
    _assert_tree_close(_fd_function_grad(problem.lower, x, y, batch, "y"), gy, 1e-8)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("which", ["lower", "upper"])
def test_gradients_match_finite_differences_of_the_function(case, which):
    problem, x, y, batch, _ = CASES[case]()
    fn = getattr(problem, which)
    gx, gy, value = bl.Oracles().gradients(fn, x, y, batch)
    _assert_tree_close(gx, _fd_function_grad(fn, x, y, batch, "x"), 1e-8)
    _assert_tree_close(gy, _fd_function_grad(fn, x, y, batch, "y"), 1e-8)
    torch.testing.assert_close(value, fn(x, y, batch), rtol=1e-15, atol=0)
    gy2, value2 = bl.Oracles().gradient_y(fn, x, y, batch)
    _assert_tree_close(gy2, gy, 1e-14)
    assert torch.equal(value2, value)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_linearization_value_and_gradients_with_grad_x(mode, case):
    problem, x, y, batch, _ = CASES[case]()
    oracles = bl.Oracles(mode=mode)
    lin = oracles.linearize(problem.lower, x, y, batch, with_grad_x=True)
    fd_x = _fd_function_grad(problem.lower, x, y, batch, "x")
    fd_y = _fd_function_grad(problem.lower, x, y, batch, "y")
    _assert_tree_close(lin.grad_x, fd_x, 1e-8)
    _assert_tree_close(lin.grad_y, fd_y, 1e-8)
    torch.testing.assert_close(lin.value, problem.lower(x, y, batch), rtol=1e-14, atol=0)
    assert not lin.value.requires_grad
    assert all(not t.requires_grad for t in T.leaves(lin.grad_y) + T.leaves(lin.grad_x))
    plain = oracles.linearize(problem.lower, x, y, batch)
    assert plain.grad_x is None
    _assert_tree_close(plain.grad_y, fd_y, 1e-8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("which", ["lower", "upper"])
def test_hvp_and_mixed_match_finite_differences_of_the_gradient(mode, case, which):
    problem, x, y, batch, v = CASES[case]()
    fn = getattr(problem, which)
    jv_ref, hv_ref = _fd_gradient_derivative(fn, x, y, batch, v)
    lin = bl.Oracles(mode=mode).linearize(fn, x, y, batch)
    hv, jv = lin.hvp(v), lin.mixed(v)
    _assert_tree_close(hv, hv_ref, RTOL[mode])
    if float(T.norm(jv_ref)) == 0.0:  # T1g's f has no x-y coupling: J_f = 0
        assert float(T.norm(jv)) <= 1e-9
    else:
        _assert_tree_close(jv, jv_ref, RTOL[mode])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_both_equals_mixed_and_hvp(mode, case):
    problem, x, y, batch, v = CASES[case]()
    lin = bl.Oracles(mode=mode).linearize(problem.lower, x, y, batch)
    jv, hv = lin.both(v)
    _assert_tree_close(jv, lin.mixed(v), 1e-12)
    _assert_tree_close(hv, lin.hvp(v), 1e-12)
    only_j, no_h = lin.both(v, need_hvp=False)
    no_j, only_h = lin.both(v, need_mixed=False)
    assert no_h is None and no_j is None
    _assert_tree_close(only_j, jv, 1e-12)
    _assert_tree_close(only_h, hv, 1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_t1g_products_equal_the_closed_form(mode):
    problem, x, y, _, v = _t1g_case()
    A, B = problem.metadata["A"], problem.metadata["B"]
    lin = bl.Oracles(mode=mode).linearize(problem.lower, x, y, None, with_grad_x=True)
    tol = RTOL[mode]
    _assert_tree_close(lin.hvp(v), {"y": A @ v["y"]}, tol)  # H = A
    _assert_tree_close(lin.mixed(v), {"x": -B @ v["y"]}, tol)  # J v = -B v
    _assert_tree_close(lin.grad_y, {"y": A @ y["y"] - B.T @ x["x"]}, 1e-12)
    _assert_tree_close(lin.grad_x, {"x": -B @ y["y"]}, 1e-12)
    # the full matrices, column by column
    n = 6
    H = torch.stack([lin.hvp({"y": e})["y"] for e in torch.eye(n, dtype=F64)], dim=1)
    J = torch.stack([lin.mixed({"y": e})["x"] for e in torch.eye(n, dtype=F64)], dim=1)
    assert float((H - A).norm() / A.norm()) <= tol
    assert float((J + B).norm() / B.norm()) <= tol


@pytest.mark.parametrize("mode", MODES)
def test_t3_products_equal_the_closed_form(mode):
    problem, x, y, _, v = _t3_case()
    xv, u = x["x"], x["x"] + y["y"]
    lin = bl.Oracles(mode=mode).linearize(problem.lower, x, y, None, with_grad_x=True)
    tol = RTOL[mode]
    _assert_tree_close(lin.grad_y, {"y": 2 * u + xv * torch.sin(2 * u)}, 1e-12)
    _assert_tree_close(lin.grad_x, {"x": 2 * u + torch.sin(u) ** 2 + xv * torch.sin(2 * u)}, 1e-12)
    _assert_tree_close(lin.hvp(v), {"y": (2 + 2 * xv * torch.cos(2 * u)) * v["y"]}, tol)
    _assert_tree_close(lin.mixed(v), {"x": (2 + torch.sin(2 * u) + 2 * xv * torch.cos(2 * u)) * v["y"]}, tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_repeated_products_at_one_linearization_are_consistent_and_linear(mode, case):
    problem, x, y, batch, v = CASES[case]()
    w = T.tree_map(lambda t: torch.cos(torch.arange(t.numel(), dtype=F64)).reshape(t.shape), v)
    lin = bl.Oracles(mode=mode).linearize(problem.lower, x, y, batch)
    first = lin.hvp(v)
    hw, jw = lin.hvp(w), lin.mixed(w)
    again = lin.hvp(v)
    _assert_tree_close(again, first, 1e-12)
    combo = T.axpy(-0.7, w, T.scale(2.0, v))
    tol = 1e-10 if mode != "finite_difference" else 1e-5
    _assert_tree_close(lin.hvp(combo), T.axpy(-0.7, hw, T.scale(2.0, first)), tol)
    _assert_tree_close(lin.mixed(combo), T.axpy(-0.7, jw, T.scale(2.0, lin.mixed(v))), tol)
    for _ in range(3):
        _assert_tree_close(lin.hvp(v), first, 1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_products_with_zero_vector_are_zero(mode):
    problem, x, y, batch, v = _mlp_case()
    lin = bl.Oracles(mode=mode).linearize(problem.lower, x, y, batch)
    jv, hv = lin.both(T.zeros_like(v))
    assert float(T.norm(jv)) == 0.0 and float(T.norm(hv)) == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_lower_variable_absent_from_the_objective_gets_zero_products(mode):
    problem = T2(n=3)
    x = {"x": torch.tensor([0.3, -0.2, 1.0], dtype=F64)}
    y = {"y1": torch.tensor([0.1, 0.2, 0.3], dtype=F64), "y2": torch.tensor([1.0, 2.0, 3.0], dtype=F64)}
    v = {"y1": torch.tensor([1.0, -1.0, 2.0], dtype=F64), "y2": torch.tensor([5.0, 6.0, 7.0], dtype=F64)}
    lin = bl.Oracles(mode=mode).linearize(problem.lower, x, y, None)
    jv, hv = lin.both(v)
    tol = 1e-12 if mode != "finite_difference" else 1e-6
    # g = ½‖y1‖² − xᵀy1: H = diag(I, 0), J v = −v1
    assert float((hv["y1"] - v["y1"]).norm()) <= tol and float(hv["y2"].norm()) == 0.0
    assert float((jv["x"] + v["y1"]).norm()) <= tol
    assert float(lin.grad_y["y2"].norm()) == 0.0


def test_counting_oracles_count_every_call():
    problem, x, y, batch, v = _mlp_case()
    oracles = bl.CountingOracles()
    oracles.gradients(problem.upper, x, y, batch)
    oracles.gradient_y(problem.lower, x, y, batch)
    oracles.gradient_y(problem.lower, x, y, batch)
    lin = oracles.linearize(problem.lower, x, y, batch)
    lin.hvp(v), lin.hvp(v), lin.hvp(v)
    lin.mixed(v)
    lin.both(v), lin.both(v)
    assert oracles.counts == {"gradients": 1, "gradient_y": 2, "linearize": 1, "hvp": 3, "mixed": 1, "both": 2}
    # counting does not change the values
    ref = bl.Oracles().linearize(problem.lower, x, y, batch)
    _assert_tree_close(lin.hvp(v), ref.hvp(v), 1e-14)
    assert torch.equal(lin.value, ref.value)
    oracles.reset()
    assert oracles.counts == {}


@pytest.mark.parametrize("mode", MODES)
def test_weighted_linearization_equals_linearization_of_the_weighted_sum(mode):
    problem, x, y, batch, v = _mlp_case()
    oracles = bl.Oracles(mode=mode)
    mu = 0.3
    lf = oracles.linearize(problem.upper, x, y, batch, with_grad_x=True)
    lg = oracles.linearize(problem.lower, x, y, batch, with_grad_x=True)
    weighted = WeightedLinearization([(mu, lf), (1 - mu, lg), (0.0, lg)])
    assert len(weighted.terms) == 2
    direct = oracles.linearize(problem.aggregated(mu), x, y, batch, with_grad_x=True)
    tol = 1e-12 if mode != "finite_difference" else 1e-5
    torch.testing.assert_close(weighted.value, direct.value, rtol=1e-14, atol=0)
    _assert_tree_close(weighted.grad_y, direct.grad_y, 1e-12)
    _assert_tree_close(weighted.grad_x, direct.grad_x, 1e-12)
    _assert_tree_close(weighted.hvp(v), direct.hvp(v), tol)
    _assert_tree_close(weighted.mixed(v), direct.mixed(v), tol)
    jv, hv = weighted.both(v)
    _assert_tree_close(hv, direct.hvp(v), tol)
    _assert_tree_close(jv, direct.mixed(v), tol)
    no_x = WeightedLinearization([(mu, oracles.linearize(problem.upper, x, y, batch)), (1 - mu, lg)])
    assert no_x.grad_x is None


def test_weighted_linearization_needs_a_nonzero_weight():
    problem, x, y, batch, _ = _t1g_case()
    lin = bl.Oracles().linearize(problem.lower, x, y, batch)
    with pytest.raises(ValueError, match="nonzero weight"):
        WeightedLinearization([(0.0, lin)])


def test_oracle_configuration_errors():
    with pytest.raises(ValueError, match="mode='backward'"):
        bl.Oracles(mode="backward")
    with pytest.raises(ValueError, match="fd_eps"):
        bl.Oracles(mode="finite_difference", fd_eps=0.0)


def test_finite_difference_step_controls_its_bias():
    # T3 is not quadratic: a large fd_eps gives an O(eps²) error, the default a tiny one.
    problem, x, y, _, v = _t3_case()
    exact = bl.Oracles().linearize(problem.lower, x, y, None).hvp(v)
    coarse = bl.Oracles(mode="finite_difference", fd_eps=1e-2).linearize(problem.lower, x, y, None).hvp(v)
    fine = bl.Oracles(mode="finite_difference").linearize(problem.lower, x, y, None).hvp(v)
    assert _rel_err(coarse, exact) > 1e-6
    assert _rel_err(fine, exact) < 1e-7


def test_scaled_products_one_backward_pass_equals_separate_products(monkeypatch):
    """The products of several reverse-mode linearizations come from one backward pass and
    equal the separate, scaled products (float64); each request gets only what it asks for."""
    gen = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, 4, generator=gen, dtype=torch.float64), torch.randn(4, 3, generator=gen, dtype=torch.float64)
    f = lambda x, y, b: ((A @ y["y"]) ** 3).sum() + (x["x"] ** 2 * y["y"][:3]).sum()
    g = lambda x, y, b: 0.5 * (y["y"] ** 2 * (1 + (B @ x["x"]) ** 2)).sum()
    x, y = {"x": torch.randn(3, generator=gen, dtype=torch.float64)}, {"y": torch.randn(4, generator=gen, dtype=torch.float64)}
    v = {"y": torch.randn(4, generator=gen, dtype=torch.float64)}
    oracles = bl.Oracles()
    lf, lg = oracles.linearize(f, x, y, None), oracles.linearize(g, x, y, None)
    expected_f, expected_g = lf.both(v), lg.both(v)
    calls = []
    real_engine, real_grad = oracles_module._ENGINE_RUN_BACKWARD, torch.autograd.grad
    monkeypatch.setattr(oracles_module, "_ENGINE_RUN_BACKWARD", lambda *a, **k: calls.append(1) or real_engine(*a, **k))
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real_grad(*a, **k))
    (jf, hf), (jg, hg) = scaled_products([(lf, 0.3, True, False), (lg, None, True, True)], v)
    assert len(calls) == 1
    assert hf is None
    torch.testing.assert_close(jf["x"], 0.3 * expected_f[0]["x"], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(jg["x"], expected_g[0]["x"], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(hg["y"], expected_g[1]["y"], rtol=1e-13, atol=1e-13)


def test_weighted_linearization_keeps_the_last_terms_hessian_product():
    """φ = μ f + (1 − μ) g: H_φ v from one pass, and H_g v handed out again for that very v."""
    f = lambda x, y, b: (x["x"] * y["y"] ** 3).sum()
    g = lambda x, y, b: 0.5 * (x["x"] ** 2 * y["y"] ** 2).sum()
    x, y = {"x": torch.tensor([1.0, 2.0], dtype=torch.float64)}, {"y": torch.tensor([0.5, -1.0], dtype=torch.float64)}
    oracles, mu = bl.Oracles(), 0.25
    phi = WeightedLinearization([(mu, oracles.linearize(f, x, y, None)), (1 - mu, oracles.linearize(g, x, y, None))])
    v = {"y": torch.tensor([1.0, 3.0], dtype=torch.float64)}
    h_f = 6 * x["x"] * y["y"] * v["y"]  # ∇²_yy f = diag(6 x y)
    h_g = x["x"] ** 2 * v["y"]  # ∇²_yy g = diag(x²)
    torch.testing.assert_close(phi.hvp(v)["y"], mu * h_f + (1 - mu) * h_g, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(phi.term_hvp(v)["y"], h_g, rtol=1e-14, atol=1e-14)
    assert phi.term_hvp({"y": v["y"].clone()}) is None  # an equal tree that was not multiplied


def test_engine_backward_equals_autograd_grad_and_keeps_its_errors():
    """The direct engine call behind every product gives torch.autograd.grad's results
    (float64: gradients, cotangent products, a second-order graph, unreached inputs as
    zeros that carry the graph flag) and its errors for a bad cotangent or a non-scalar output."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = (a**3).sum()
    (expected,) = torch.autograd.grad(loss, a, create_graph=True)
    got = oracles_module._grads_or_zeros(loss, [a, unused], create_graph=True)
    torch.testing.assert_close(got[0], expected, rtol=0, atol=0)
    assert got[0].requires_grad and got[1].requires_grad and torch.equal(got[1], torch.zeros(2, dtype=torch.float64))
    v = torch.randn(3, generator=gen, dtype=torch.float64)
    (hv_expected,) = torch.autograd.grad(expected, a, v, retain_graph=True)
    (hv,) = oracles_module._grads_or_zeros(got[0], [a], v, retain_graph=True)
    torch.testing.assert_close(hv, hv_expected, rtol=0, atol=0)
    torch.testing.assert_close(hv, 6 * a.detach() * v, rtol=1e-15, atol=0)
    with pytest.raises(RuntimeError, match="Mismatch in shape"):
        oracles_module._grads_or_zeros(got[0], [a], torch.ones(4, dtype=torch.float64), retain_graph=True)
    with pytest.raises(RuntimeError, match="only for scalar outputs"):
        oracles_module._grads_or_zeros(got[0], [a], retain_graph=True)
