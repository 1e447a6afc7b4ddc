"""Unrolled differentiation with gradient checkpointing (bilevel.parts.Unroll(checkpoint=...))."""

import pytest
import torch

import bilevel as bl
from bilevel.parts import LowerAggregated, LowerGD, Unroll
from bilevel.problems import T1

F64 = torch.float64


def _classifier_problem():
    """A small nonlinear lower level (two-layer classifier, per-example weights x)."""
    g = torch.Generator().manual_seed(0)
    a, labels = torch.randn(12, 4, generator=g, dtype=F64), torch.randint(0, 3, (12,), generator=g)
    av, lv = torch.randn(6, 4, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)

    def logits(y, inputs):
        return torch.tanh(inputs @ y["W1"].T) @ y["W2"].T

    def lower(x, y, b):
        losses = torch.nn.functional.cross_entropy(logits(y, a), labels, reduction="none")
        return (torch.sigmoid(x["w"]) * losses).mean() + 0.01 * sum((t**2).sum() for t in y.values())

    def upper(x, y, b):
        return torch.nn.functional.cross_entropy(logits(y, av), lv)

    y0 = {"W1": 0.5 * torch.randn(5, 4, generator=g, dtype=F64), "W2": 0.5 * torch.randn(3, 5, generator=g, dtype=F64)}
    return bl.Problem(upper, lower, x_init={"w": torch.zeros(12, dtype=F64)}, y_init=y0)


@pytest.mark.parametrize(
    "make",
    [
        lambda ck: bl.ITD(lr_upper=0.5, lr_lower=0.3, lower_steps=10, checkpoint=ck),
        lambda ck: bl.TRHG(lr_upper=0.5, lr_lower=0.3, lower_steps=10, truncate=7, checkpoint=ck),
        lambda ck: bl.BDA(lr_upper=0.5, lr_lower=0.3, lower_steps=10, mu=0.3, checkpoint=ck, warm_start=True),
    ],
    ids=["ITD", "TRHG", "BDA"],
)
def test_checkpointed_unrolling_gives_the_same_iterates(make):
    problem = _classifier_problem()
    plain = bl.solve(problem, make(None), max_iters=3)
    assert not torch.equal(plain.x["w"], problem.x_init["w"])
    for checkpoint in ("sqrt", 1, 3, 100):
        other = bl.solve(problem, make(checkpoint), max_iters=3)
        for name in ("x", "y"):
            for a, b in zip(bl.tree.leaves(getattr(plain, name)), bl.tree.leaves(getattr(other, name)), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        for mine, theirs in zip(other.history, plain.history, strict=True):
            assert mine["stationarity"] == pytest.approx(theirs["stationarity"], rel=1e-10)


class _Counting(LowerGD):
    """LowerGD that counts its differentiated steps."""

    calls = 0

    def differentiable_step(self, *args, **kwargs):
        type(self).calls += 1
        return super().differentiable_step(*args, **kwargs)


def _unrolled_dx(checkpoint, steps, lower=None, problem=None):
    """d(Σ y_T)/dx through ``steps`` differentiated steps, and the steps evaluated for it."""
    problem = problem or _classifier_problem()
    x = {k: v.clone().requires_grad_(True) for k, v in problem.x_init.items()}
    y = {k: v.clone().requires_grad_(True) for k, v in problem.y_init.items()}
    lower = lower or _Counting(lr=0.3, steps=steps)
    _Counting.calls = 0
    with torch.enable_grad():
        y_T, _ = Unroll(checkpoint=checkpoint).differentiate(lower, problem, x, y, None, 0, steps)
        forward = _Counting.calls
        (dx,) = torch.autograd.grad(sum(t.sum() for t in y_T.values()), list(x.values()))
    return dx, forward, _Counting.calls


def test_checkpointed_steps_cost_one_extra_evaluation_each_and_give_the_same_derivative():
    for steps in (16, 64):
        dx, forward, total = _unrolled_dx(None, steps)
        assert forward == total == steps
        for checkpoint in ("sqrt", 5, 1):
            dx_ck, forward, total = _unrolled_dx(checkpoint, steps)
            assert forward == steps and total == 2 * steps  # each step recomputed once, in the backward pass
            torch.testing.assert_close(dx_ck, dx, rtol=1e-13, atol=1e-15)
    # T1 (g = ½‖y‖² − xᵀy): d y_K / dx = 1 − (1 − β)^K, through the segments too
    dx, _, _ = _unrolled_dx("sqrt", 16, lower=LowerGD(lr=0.5, steps=16), problem=T1(n=3))
    torch.testing.assert_close(dx, torch.full((3,), 1 - 0.5**16, dtype=F64), rtol=1e-14, atol=0)


def test_checkpointed_aggregated_steps_match():
    lower = LowerAggregated(lr=0.3, steps=9, mu=0.4)
    plain, _, _ = _unrolled_dx(None, 9, lower=lower)
    ck, _, _ = _unrolled_dx(2, 9, lower=lower)
    assert not torch.equal(plain, torch.zeros_like(plain))
    torch.testing.assert_close(ck, plain, rtol=1e-14, atol=1e-15)


def test_segment_lengths_and_bad_values():
    assert Unroll().segment(100) is None
    assert Unroll(checkpoint="sqrt").segment(10) == 4 and Unroll(checkpoint="sqrt").segment(1) == 1
    assert Unroll(checkpoint=7).segment(100) == 7
    assert bl.ITD(checkpoint="sqrt").parts.unroll.checkpoint == "sqrt"
    with pytest.raises(ValueError, match=r"Unroll\(checkpoint='cube'\) must be None, 'sqrt' or a segment length"):
        Unroll(checkpoint="cube")
    with pytest.raises(ValueError, match=r"ITD\(checkpoint=0\)"):
        bl.ITD(checkpoint=0)
    with pytest.raises((TypeError, ValueError), match="checkpoint"):
        Unroll(checkpoint=2.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_checkpointed_unrolling_lowers_the_peak_memory():
    n, steps = 4096, 64
    problem = T1(n=n, dtype=torch.float32, device="cuda")

    def peak(checkpoint):
        x = {"x": torch.ones(n, device="cuda", requires_grad=True)}
        y = {"y": torch.zeros(n, device="cuda", requires_grad=True)}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.enable_grad():
            y_T, _ = Unroll(checkpoint=checkpoint).differentiate(LowerGD(lr=0.5, steps=steps), problem, x, y, None, 0, steps)
            (dx,) = torch.autograd.grad(y_T["y"].sum(), x["x"])
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, dx

    full, dx_full = peak(None)
    kept, dx_kept = peak("sqrt")
    torch.testing.assert_close(dx_kept, dx_full)
    assert kept * 3 < full


def test_docstring_examples_run():
    import doctest
    import importlib

    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    failures, attempted = doctest.testmod(importlib.import_module("bilevel.parts.unroll"), optionflags=flags)
    assert attempted > 0 and failures == 0
