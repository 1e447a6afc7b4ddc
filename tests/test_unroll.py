"""Unrolled differentiation with gradient checkpointing (bilevel.parts.Unroll(checkpoint=...))."""

import math

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


def _graph_bytes(checkpoint, steps, n=50, lower=None):
    """Bytes the unrolled graph holds between the forward and the backward pass (every tensor
    autograd saves outside a checkpointed segment), and the derivative d y_T / dx."""
    problem = T1(n=n)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    x = {"x": torch.ones(n, dtype=F64, requires_grad=True)}
    y = {"y": torch.zeros(n, dtype=F64, requires_grad=True)}
    lower = lower or LowerGD(lr=0.5, steps=steps)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y_T, _ = Unroll(checkpoint=checkpoint).differentiate(lower, problem, x, y, None, 0, steps)
    (dx,) = torch.autograd.grad(y_T["y"].sum(), x["x"])
    return saved[0], dx


def test_memory_of_the_graph_is_linear_without_and_square_root_with_checkpointing():
    y_bytes = 50 * 8
    full16, dx16 = _graph_bytes(None, 16)
    full64, dx64 = _graph_bytes(None, 64)
    assert full64 == 4 * full16  # O(K)
    for steps, full, dx in ((16, full16, dx16), (64, full64, dx64)):
        kept, dx_ck = _graph_bytes("sqrt", steps)
        assert kept == math.ceil(steps / math.ceil(math.sqrt(steps))) * y_bytes  # one y per segment: O(√K)
        assert kept * 10 < full
        torch.testing.assert_close(dx_ck, dx, rtol=0, atol=0)
        torch.testing.assert_close(dx, torch.full((50,), 1 - 0.5**steps, dtype=F64), rtol=1e-14, atol=0)  # d y_K/dx for g = ½‖y‖² − xᵀy
    kept, _ = _graph_bytes(5, 64)
    assert kept == math.ceil(64 / 5) * y_bytes


def test_checkpointed_aggregated_steps_match():
    lower = LowerAggregated(lr=0.3, steps=9, mu=0.4)
    _, plain = _graph_bytes(None, 9, lower=lower)
    _, ck = _graph_bytes(2, 9, lower=lower)
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
