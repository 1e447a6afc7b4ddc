"""Mixed precision (bilevel.precision): bfloat16 / float16 objectives, float32 iteration, loss scaling."""

import pytest
import torch

import bilevel as bl
from bilevel.data import hyperclean_from_arrays
from bilevel.linsolve import CG
from bilevel.precision import Autocast, LossScaled, LossScaledOracles, LossScaleState, LossScaling, as_precision
from bilevel.problems import T1g
from bilevel.problems.hyperclean import hyperclean_problem

F64, F32 = torch.float64, torch.float32


def _hypergradient(problem, x, y, oracles=None):
    """The implicit hypergradient ∇_x f − J H⁻¹ ∇_y f at (x, y) (CG, 60 steps)."""
    oracles = oracles or bl.Oracles()
    gx, gy, _ = oracles.gradients(problem.upper, x, y, None)
    lin = oracles.linearize(problem.lower, x, y, None)
    return bl.tree.sub(gx, lin.mixed(CG(steps=60)(lin.hvp, gy).v))


def _relative_error(a, b):
    a = torch.cat([t.reshape(-1).double() for t in bl.tree.leaves(a)])
    b = torch.cat([t.reshape(-1).double() for t in bl.tree.leaves(b)])
    return float((a - b).norm() / b.norm())


def _hyperclean(dtype):
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(600, 64, generator=g), torch.randint(0, 10, (600,), generator=g)
    data = hyperclean_from_arrays(
        images.numpy(), labels.numpy(), num_classes=10, max_pixel=1.0, name="r", n_train=200, n_val=200, n_test=200, dtype=dtype
    )
    return hyperclean_problem(data, model="linear", reg=0.01)


def _points(which):
    g = torch.Generator().manual_seed(1)
    if which == "T1g":
        reference = T1g(n=20, dtype=F64)
        return reference, T1g(n=20, dtype=F32), reference.x_init, reference.y_star
    reference = _hyperclean(F64)
    x = {"weights": torch.randn(200, generator=g, dtype=F64)}
    y = {k: 0.1 * torch.randn(v.shape, generator=g, dtype=F64) for k, v in reference.y_init.items()}
    return reference, _hyperclean(F32), x, y


@pytest.mark.parametrize(("which", "bound"), [("T1g", 1e-2), ("hyperclean", 3e-2)])
def test_bf16_hypergradient_error_is_bounded_against_float64(which, bound):
    reference, problem32, x, y = _points(which)
    exact = _hypergradient(reference, x, y)
    as32 = lambda tree: {k: v.float() for k, v in tree.items()}
    error32 = _relative_error(_hypergradient(problem32, as32(x), as32(y)), exact)
    error_bf16 = _relative_error(_hypergradient(Autocast().problem(problem32), as32(x), as32(y)), exact)
    assert error32 < 1e-5
    assert 1e-4 < error_bf16 < bound  # autocast did lower the products, and the error stays bounded
    direction = _hypergradient(Autocast().problem(problem32), as32(x), as32(y))
    assert all(t.dtype == F32 for t in bl.tree.leaves(direction))


def test_solve_in_bf16_follows_the_float32_run():
    problem = _hyperclean(F32)
    method = bl.AID(lr_upper=bl.Adam(0.1), lr_lower=0.5, lower_steps=5, solver=bl.CG(steps=5))
    plain = bl.solve(problem, method, max_iters=10)
    mixed = bl.solve(problem, method, max_iters=10, precision="bf16")
    assert all(t.dtype == F32 for t in bl.tree.leaves((mixed.x, mixed.y, mixed.v)))
    assert mixed.final["upper_loss"] == pytest.approx(plain.final["upper_loss"], rel=1e-2)
    assert mixed.final["upper_loss"] != plain.final["upper_loss"]
    assert mixed.final["upper_loss"] < mixed.history[0]["upper_loss"]


def test_bad_precision_requests_are_one_line_each():
    with pytest.raises(ValueError, match=r"mixed precision \(bfloat16\) was asked for but x\['x'\] is float64: .*use float32 variables"):
        bl.solve(T1g(n=4, dtype=F64), bl.AID(), max_iters=1, precision="bf16")
    with pytest.raises(ValueError, match=r"solve\(precision='fp8'\) must be None, 'bf16'"):
        bl.solve(T1g(n=4, dtype=F32), bl.AID(), max_iters=1, precision="fp8")
    with pytest.raises(ValueError, match=r"Autocast\(dtype=torch.float32\) is not available: use torch.bfloat16 or torch.float16"):
        Autocast(torch.float32)
    assert as_precision(None) is None and as_precision(torch.bfloat16) == Autocast()
    assert as_precision("fp16") == as_precision(torch.float16) == Autocast(torch.float16, LossScaling())
    assert Autocast().loss_scaling is None  # bfloat16 needs no scaling: float32's exponent range


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_hypergradient_error_is_bounded_and_the_vectors_stay_float32():
    reference, problem32, x, y = _points("hyperclean")
    exact = _hypergradient(reference, x, y)
    cuda = lambda tree: {k: v.float().cuda() for k, v in tree.items()}
    data = problem32.data.to("cuda")
    problem_cuda = Autocast().problem(hyperclean_problem(data, model="linear", reg=0.01))
    direction = _hypergradient(problem_cuda, cuda(x), cuda(y))
    assert all(t.dtype == F32 and t.is_cuda for t in bl.tree.leaves(direction))
    assert 1e-4 < _relative_error({k: v.cpu() for k, v in direction.items()}, exact) < 3e-2


def test_docstring_examples_run():
    import doctest
    import importlib

    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    failures, attempted = doctest.testmod(importlib.import_module("bilevel.precision"), optionflags=flags)
    assert attempted > 0 and failures == 0


# -- float16 and dynamic loss scaling -------------------------------------------------------------
as32 = lambda tree: {k: v.float() for k, v in tree.items()}


def _finite(tree):
    return all(bool(torch.isfinite(t).all()) for t in bl.tree.leaves(tree))


def _dynamic_hypergradient(problem, x, y):
    """The hypergradient with the scale the dynamic rule settles on: S = 2¹⁶, halved while non-finite."""
    for exponent in range(16, -16, -1):
        direction = _hypergradient(problem, x, y, LossScaledOracles(scale=2.0**exponent))
        if _finite(direction):
            return direction, exponent
    raise AssertionError("no scale gave a finite hypergradient")


def _scaled_by(factor, problem):
    return problem.replace(
        upper=lambda x, y, b, f=problem.upper: factor * f(x, y, b), lower=lambda x, y, b, g=problem.lower: factor * g(x, y, b)
    )


@pytest.mark.parametrize("mode", ["reverse", "forward", "finite_difference"])
def test_scaled_oracles_give_the_unscaled_derivatives_in_float64(mode):
    """Scaling is a plain product inside the graph: every derivative — gradients, H v, J v, the
    value — is that of h exactly (S and c are powers of two), not off by S or c."""
    reference, _, x, y = _points("hyperclean")
    plain, scaled = bl.Oracles(mode=mode), LossScaledOracles(inner=bl.Oracles(mode=mode), scale=2.0**20)
    v = {k: 1e-3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(3), dtype=F64) for k, t in y.items()}
    tol = 1e-14 if mode != "finite_difference" else 1e-7

    def same(got, want, tol=tol):
        flat = lambda tree: torch.cat([t.reshape(-1) for t in bl.tree.leaves(tree)])
        return float((flat(got) - flat(want)).norm()) <= tol * float(flat(want).norm())  # also for ∇_x f = 0

    for objective in (reference.upper, reference.lower):
        gx, gy, value = scaled.gradients(objective, x, y, None)
        gx_p, gy_p, value_p = plain.gradients(objective, x, y, None)
        assert same(gx, gx_p, 1e-14) and same(gy, gy_p, 1e-14) and float(value) == float(value_p)
        assert same(scaled.gradient_y(objective, x, y, None)[0], gy_p, 1e-14)
    lin_s, lin_p = (
        scaled.linearize(reference.lower, x, y, None, with_grad_x=True),
        plain.linearize(reference.lower, x, y, None, with_grad_x=True),
    )
    assert float(lin_s.value) == float(lin_p.value)
    assert same(lin_s.grad_x, lin_p.grad_x, 1e-14) and same(lin_s.grad_y, lin_p.grad_y, 1e-14)
    jv, hv = lin_s.both(v)
    jv_p, hv_p = lin_p.both(v)
    assert same(jv, jv_p) and same(hv, hv_p)
    assert _relative_error(hv, hv_p) < tol and _relative_error(jv, jv_p) < tol  # nonzero products


@pytest.mark.parametrize(("which", "bound"), [("T1g", 2e-3), ("hyperclean", 5e-3)])
def test_fp16_hypergradient_error_is_bounded_against_float64(which, bound):
    reference, problem32, x, y = _points(which)
    exact = _hypergradient(reference, x, y)
    direction, exponent = _dynamic_hypergradient(Autocast(torch.float16).problem(problem32), as32(x), as32(y))
    error = _relative_error(direction, exact)
    assert 1e-5 < error < bound  # float16 did lower the products (11 bits: ~5e-4 each), the error stays bounded
    assert all(t.dtype == F32 for t in bl.tree.leaves(direction))
    assert -16 < exponent <= 16


def test_fp16_without_loss_scaling_loses_the_gradients_that_underflow():
    """The objectives × 1e-6: their cotangents (~1e-9 per logit) are below float16's smallest
    subnormal (6e-8), so without scaling the mixed product, and the hypergradient, are zero;
    with S = 2¹⁶ they are ~1e-4 and survive."""
    reference, problem32, x, y = _points("hyperclean")
    exact = _hypergradient(_scaled_by(1e-6, reference), x, y)
    fp16 = Autocast(torch.float16).problem(_scaled_by(1e-6, problem32))
    unscaled = _hypergradient(fp16, as32(x), as32(y), bl.Oracles())
    scaled = _hypergradient(fp16, as32(x), as32(y), LossScaledOracles(scale=2.0**16))
    assert _relative_error(unscaled, exact) > 0.99  # everything underflowed
    assert _relative_error(scaled, exact) < 5e-3


def _solve_fp16(problem, max_iters, scaling=None, **kwargs):
    method = bl.AID(lr_upper=bl.Adam(0.1), lr_lower=0.5, lower_steps=3, solver=bl.CG(steps=5))
    return bl.solve(problem, method, max_iters=max_iters, precision=Autocast(torch.float16, scaling or LossScaling()), **kwargs)


def test_fp16_run_follows_the_float32_run_and_overflow_halves_the_scale():
    problem = _hyperclean(F32)
    method = bl.AID(lr_upper=bl.Adam(0.1), lr_lower=0.5, lower_steps=3, solver=bl.CG(steps=5))
    plain = bl.solve(problem, method, max_iters=6)
    default = _solve_fp16(problem, 6)
    huge = _solve_fp16(problem, 6, LossScaling(init_scale=2.0**40))  # S·∇ overflows float16's 65504 at first
    # the default scale settles in the first step (2¹⁶, halved if it overflowed) and holds
    start = default.history[0]
    assert start["loss_scale"] == 2.0 ** (16 - start["loss_scale_skipped"]) and start["loss_scale_skipped"] <= 2
    assert len(set(default.series("loss_scale"))) == 1 and default.series("loss_scale_skipped")[1:] == [0.0] * 5
    first = huge.history[0]
    assert first["loss_scale_skipped"] > 0 and first["loss_scale"] == 2.0 ** (40 - first["loss_scale_skipped"]) <= 2.0**16
    assert huge.series("loss_scale_skipped")[1:] == [0.0] * 5  # once found, the scale holds
    for run in (default, huge):
        assert all(t.dtype == F32 for t in bl.tree.leaves((run.x, run.y, run.v)))
        assert run.final["upper_loss"] == pytest.approx(plain.final["upper_loss"], rel=1e-2)
        assert run.final["upper_loss"] < run.history[0]["upper_loss"]
    assert huge.final["upper_loss"] != plain.final["upper_loss"]


def test_fp16_scale_grows_after_good_steps_and_resumes_exactly(tmp_path):
    problem = T1g(n=8, dtype=F32)
    method = bl.GALET(lr_upper=0.05, lr_lower=0.1, stability_check="off")
    fp16 = Autocast(torch.float16, LossScaling(init_scale=2.0**4, growth_interval=2))
    straight = bl.solve(problem, method, max_iters=6, precision=fp16)
    assert straight.series("loss_scale") == [16.0, 16.0, 32.0, 32.0, 64.0, 64.0]  # doubles after every 2 good steps
    assert straight.state.extra["loss_scale"] == LossScaleState(scale=128.0, good_steps=0)
    bl.solve(problem, method, max_iters=3, precision=fp16, checkpoint=tmp_path / "c.pt")
    assert bl.load_checkpoint(tmp_path / "c.pt")["state"].extra["loss_scale"] == LossScaleState(scale=32.0, good_steps=1)
    resumed = bl.solve(problem, method, max_iters=6, precision=fp16, resume=tmp_path / "c.pt")
    assert resumed.series("loss_scale") == straight.series("loss_scale")
    for a, b in zip(bl.tree.leaves((resumed.x, resumed.y, resumed.v)), bl.tree.leaves((straight.x, straight.y, straight.v)), strict=True):
        assert torch.equal(a, b)


def test_fp16_genuine_divergence_ends_the_run_with_the_divergence_message():
    """∇√(Σy²) at y = 0 is 0·∞ whatever S: the retries are spent, then the run ends as in float32."""
    problem = bl.Problem(
        upper=lambda x, y, b: ((y["y"] - 1.0) ** 2).sum(),
        lower=lambda x, y, b: 0.5 * ((y["y"] - x["x"]) ** 2).sum() + 1e-3 * (y["y"] ** 2).sum().sqrt(),
        x_init={"x": torch.ones(3)},
        y_init={"y": torch.zeros(3)},
    )
    with pytest.raises(bl.DivergenceError, match=r"^AID diverged at iteration 1: .* is nan") as caught:
        _solve_fp16(problem, 3, LossScaling(max_retries=3))
    assert caught.value.result.history[-1]["loss_scale_skipped"] == 3.0
    assert caught.value.result.history[-1]["loss_scale"] == 2.0 ** (16 - 3)


def test_fp16_refusals_are_one_line_each():
    with pytest.raises(ValueError, match=r"mixed precision \(float16\) was asked for but x\['x'\] is float64: .*use float32 variables"):
        bl.solve(T1g(n=4, dtype=F64), bl.AID(), max_iters=1, precision="fp16")
    with pytest.raises(ValueError, match=r"^ITD back-propagates through its lower steps .* use precision='bf16'"):
        bl.solve(T1g(n=4, dtype=F32), bl.ITD(), max_iters=1, precision="fp16")
    with pytest.raises(ValueError, match=r"compile=True\) cannot be combined with float16 loss scaling"):
        bl.solve(T1g(n=4, dtype=F32), bl.AID(), max_iters=1, precision="fp16", compile=True)
    with pytest.raises(ValueError, match=r"LossScaling\(growth_interval=0\)"):
        LossScaling(growth_interval=0)
    with pytest.raises(TypeError, match="needs a bilevel method"):
        LossScaled(object())
    assert LossScaled(bl.GALET()).name == "GALET"
