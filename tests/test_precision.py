"""Mixed precision (bilevel.precision): bfloat16 objectives, float32 iteration."""

import pytest
import torch

import bilevel as bl
from bilevel.data import hyperclean_from_arrays
from bilevel.linsolve import CG
from bilevel.precision import Autocast, as_precision
from bilevel.problems import T1g
from bilevel.problems.hyperclean import hyperclean_problem

F64, F32 = torch.float64, torch.float32


def _hypergradient(problem, x, y):
    """The implicit hypergradient ∇_x f − J H⁻¹ ∇_y f at (x, y) (CG, 60 steps)."""
    oracles = bl.Oracles()
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
    with pytest.raises(ValueError, match="float16 needs dynamic loss scaling"):
        Autocast(torch.float16)
    assert as_precision(None) is None and as_precision(torch.bfloat16) == Autocast()


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
