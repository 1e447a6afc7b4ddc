import pytest
import torch

import bilevel as bl
from bilevel.updates import as_upper_optimizer

F64 = torch.float64


def _x_and_grads(seed=0, steps=5):
    gen = torch.Generator().manual_seed(seed)
    x = {"w": torch.randn(3, 2, generator=gen, dtype=F64), "b": torch.randn(4, generator=gen, dtype=F64)}
    grads = [{k: torch.randn(t.shape, generator=gen, dtype=F64) for k, t in x.items()} for _ in range(steps)]
    return x, grads


def test_sgd_step_is_x_minus_lr_d():
    x, (d, *_) = _x_and_grads()
    opt = bl.SGD(lr=0.3)
    state = opt.init(x)
    assert state == bl.parts.EmptyState()
    new, state2 = opt.update(x, d, state, 0)
    for k in x:
        torch.testing.assert_close(new[k], x[k] - 0.3 * d[k], rtol=1e-15, atol=1e-15)
    assert state2 == bl.parts.EmptyState()


def test_sgd_uses_the_schedule_at_iteration_k():
    x, (d, *_) = _x_and_grads()
    opt = bl.SGD(lr=bl.Polynomial(1.0, 1.0))
    new, _ = opt.update(x, d, opt.init(x), 4)
    torch.testing.assert_close(new["b"], x["b"] - 0.2 * d["b"], rtol=1e-15, atol=1e-15)


def test_sgd_momentum_matches_heavy_ball_and_torch_sgd():
    x, grads = _x_and_grads()
    opt = bl.SGD(lr=0.1, momentum=0.9)
    state = opt.init(x)
    m = {k: torch.zeros_like(t) for k, t in x.items()}
    params = {k: t.clone().requires_grad_(True) for k, t in x.items()}
    torch_opt = torch.optim.SGD(list(params.values()), lr=0.1, momentum=0.9)
    cur = x
    for k, d in enumerate(grads):
        cur, state = opt.update(cur, d, state, k)
        m = {key: 0.9 * m[key] + d[key] for key in m}
        for key, p in params.items():
            p.grad = d[key].clone()
        torch_opt.step()
        for key in x:
            torch.testing.assert_close(state.momentum[key], m[key], rtol=1e-14, atol=1e-14)
            torch.testing.assert_close(cur[key], params[key].detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("betas, lr, eps", [((0.9, 0.999), 0.01, 1e-8), ((0.5, 0.9), 0.2, 1e-3)])
def test_adam_equals_torch_optim_adam(betas, lr, eps):
    x, grads = _x_and_grads(seed=1)
    opt = bl.Adam(lr=lr, betas=betas, eps=eps)
    state = opt.init(x)
    params = {k: t.clone().requires_grad_(True) for k, t in x.items()}
    torch_opt = torch.optim.Adam(list(params.values()), lr=lr, betas=betas, eps=eps)
    cur = x
    for k, d in enumerate(grads):
        cur, state = opt.update(cur, d, state, k)
        for key, p in params.items():
            p.grad = d[key].clone()
        torch_opt.step()
        for key in x:
            torch.testing.assert_close(cur[key], params[key].detach(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(state.m[key], torch_opt.state[params[key]]["exp_avg"], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(state.s[key], torch_opt.state[params[key]]["exp_avg_sq"], rtol=1e-12, atol=1e-14)
    # the inputs are not modified
    x0, _ = _x_and_grads(seed=1)
    assert all(torch.equal(x[k], x0[k]) for k in x)


def test_adam_first_step_moves_by_lr_times_sign():
    x, (d, *_) = _x_and_grads()
    new, _ = bl.Adam(lr=0.05, eps=0.0).update(x, d, bl.Adam().init(x), 0)
    for k in x:
        torch.testing.assert_close(new[k], x[k] - 0.05 * torch.sign(d[k]), rtol=1e-14, atol=1e-14)


def test_box_projection_clamps_every_leaf():
    x = {"a": torch.tensor([-1.0, 0.5, 4.0], dtype=F64), "b": torch.tensor([[3.5, 2.0]], dtype=F64)}
    both = bl.Box(0.0, 3.0)(x)
    assert torch.equal(both["a"], torch.tensor([0.0, 0.5, 3.0], dtype=F64))
    assert torch.equal(both["b"], torch.tensor([[3.0, 2.0]], dtype=F64))
    lower_only = bl.Box(lower=1.0)(x)
    assert torch.equal(lower_only["a"], torch.tensor([1.0, 1.0, 4.0], dtype=F64))
    upper_only = bl.Box(upper=0.0)(x)
    assert torch.equal(upper_only["b"], torch.tensor([[0.0, 0.0]], dtype=F64))
    assert torch.equal(x["a"], torch.tensor([-1.0, 0.5, 4.0], dtype=F64))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (
            lambda: bl.Adam(betas=(1.0, 0.999)),
            ValueError,
            r"Adam\(betas=\(1.0, 0.999\)\) must be a pair \(beta1, beta2\) of numbers in \[0, 1\)",
        ),
        (lambda: bl.Adam(betas=(0.9, -0.1)), ValueError, r"Adam\(betas=\(0.9, -0.1\)\)"),
        (lambda: bl.Adam(betas=0.9), ValueError, r"Adam\(betas=0.9\) must be a pair"),
        (lambda: bl.Adam(eps=-1e-8), ValueError, r"Adam\(eps=-1e-08\) must be a number >= 0"),
        (lambda: bl.SGD(momentum=1.0), ValueError, r"SGD\(momentum=1.0\) must be a finite number in \[0, 1\)"),
        (lambda: bl.SGD(momentum=-0.5), ValueError, r"SGD\(momentum=-0.5\)"),
        (lambda: bl.SGD(momentum="0.9"), TypeError, r"SGD\(momentum='0.9'\).*not a str"),
        (lambda: bl.SGD(lr=-1.0), ValueError, r"SGD\(lr=-1.0\) must be a positive number \(finite and > 0\)"),
        (lambda: bl.Adam(lr="fast"), TypeError, r"Adam\(lr='fast'\) must be a positive number.*or a schedule.*not a str"),
        (lambda: bl.Box(), ValueError, "at least one"),
        (lambda: bl.Box(2.0, 1.0), ValueError, "empty"),
        (lambda: bl.Box(lower=float("nan")), ValueError, r"Box\(lower=nan\) must be a number"),
        (lambda: bl.Box(upper="3"), TypeError, r"Box\(upper='3'\).*not a str"),
    ],
)
def test_construction_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("cls", [bl.SGD, bl.Adam])
@pytest.mark.parametrize(
    "lr, error, shown",
    [
        (0.0, ValueError, "0.0"),
        (0, ValueError, "0"),
        (float("inf"), ValueError, "inf"),
        (float("nan"), ValueError, "nan"),
        (-2e-4, ValueError, "-0.0002"),
        (True, TypeError, "True"),
        ([1, 2], TypeError, r"\[1, 2\]"),
    ],
)
def test_learning_rates_reject_zero_nonfinite_and_non_numbers(cls, lr, error, shown):
    with pytest.raises(error, match=rf"^{cls.__name__}\(lr={shown}\) must be a positive number"):
        cls(lr=lr)


def test_learning_rate_schedules_are_checked_at_k0():
    assert bl.SGD(lr=bl.Polynomial(0.1, 0.5)).lr(0) == 0.1
    with pytest.raises(ValueError, match=r"SGD\(lr=Polynomial\(value=-0.1.*gives step -0.1 at k = 0"):
        bl.SGD(lr=bl.Polynomial(-0.1, 0.5))


def test_as_upper_optimizer():
    adam = bl.Adam()
    assert as_upper_optimizer(adam, "lr") is adam
    sgd = as_upper_optimizer(0.25, "lr")
    assert isinstance(sgd, bl.SGD) and sgd.lr == 0.25
    with pytest.raises(ValueError, match=r"^lr_upper=-1 must be a positive number"):
        as_upper_optimizer(-1, "lr_upper")
    with pytest.raises(ValueError, match=r"^GALET\(lr_upper=0\) must be a positive number"):
        as_upper_optimizer(0, "lr_upper", "GALET")
