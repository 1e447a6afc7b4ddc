"""docs/extending.md: its code runs, SOBA built from parts equals BAGDC, and the base of
assembled methods (options with checks, parts built once) behaves as documented."""

import doctest
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import bilevel as bl
from bilevel.methods import Alternating, option
from bilevel.parts import LinearSolve, LowerGD, Parts
from bilevel.problems import T1g
from bilevel.validation import check_positive

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
F64 = torch.float64


def _blocks():
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def namespace():
    """The code blocks of docs/extending.md executed in order, the doctest blocks run."""
    ns = {"__name__": "extending_md"}
    for block in _blocks():
        if block.lstrip().startswith(">>>"):
            test = doctest.DocTestParser().get_doctest(block, ns, "extending.md", str(DOC), 0)
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            runner.run(test)
            assert runner.failures == 0, block
        else:
            exec(compile(block, str(DOC), "exec"), ns)
    return ns


def test_soba_is_under_30_lines(namespace):
    soba = next(block for block in _blocks() if "class SOBA" in block)
    assert len(soba.strip().splitlines()) < 30


def _trajectory(method, problem, iters=40):
    state = method.init(problem)
    out = []
    for _ in range(iters):
        state, info = method.step(problem, state)
        out.append((state, info))
    return out


def _hyperclean():
    gen = torch.Generator().manual_seed(0)
    X, Xv = torch.randn(30, 5, generator=gen, dtype=F64), torch.randn(20, 5, generator=gen, dtype=F64)
    lab, lv = torch.randint(0, 3, (30,), generator=gen), torch.randint(0, 3, (20,), generator=gen)
    ce = torch.nn.functional.cross_entropy
    lower = lambda x, y, b: (torch.sigmoid(x["w"]) * ce(X @ y["W"] + y["b"], lab, reduction="none")).mean() + 0.01 * (y["W"] ** 2).sum()
    upper = lambda x, y, b: ce(Xv @ y["W"] + y["b"], lv)
    return bl.Problem(
        upper=upper,
        lower=lower,
        x_init={"w": torch.zeros(30, dtype=F64)},
        y_init={"W": 0.1 * torch.randn(5, 3, generator=gen, dtype=F64), "b": torch.zeros(3, dtype=F64)},
    )


@pytest.mark.parametrize("order", ["sequential", "jacobi"])
@pytest.mark.parametrize("problem", [T1g(n=6, seed=2), _hyperclean()], ids=["T1g", "hyperclean"])
def test_soba_from_parts_makes_the_iterates_of_bagdc_with_a_fixed_dual_step(namespace, order, problem):
    soba = namespace["SOBA"](lr_upper=0.05, lr_lower=0.2, lr_dual=0.5, order=order)
    bagdc = bl.BAGDC(lr_upper=0.05, lr_lower=0.2, lr_dual=0.5, order=order, dual_step="fixed", stability_check="off")
    assert soba.parts == bagdc.parts
    for (a, info_a), (b, info_b) in zip(_trajectory(soba, problem), _trajectory(bagdc, problem), strict=True):
        for name in ("x", "y", "v"):
            for p, q in zip(bl.tree.leaves(getattr(a, name)), bl.tree.leaves(getattr(b, name)), strict=True):
                assert torch.equal(p, q)
        assert info_a.keys() == info_b.keys() and all(torch.equal(info_a[k], info_b[k]) for k in info_a)


def test_soba_options_are_checked_naming_soba(namespace):
    with pytest.raises(ValueError, match=r"^SOBA\(lr_dual=0\) must be a positive number"):
        namespace["SOBA"](lr_dual=0)
    with pytest.raises(ValueError, match=r"^SOBA\(lr_upper=-1\) must be a positive number"):
        namespace["SOBA"](lr_upper=-1)
    with pytest.raises(ValueError, match=r"^SOBA\(order='gauss'\) must be one of 'jacobi', 'sequential'$"):
        namespace["SOBA"](order="gauss")


def test_the_moving_average_direction_follows_its_recursion_and_is_checkpointed(namespace, tmp_path, preserve_rng):
    MovingAverage, AverageState = namespace["MovingAverage"], namespace["AverageState"]

    @dataclass(frozen=True)
    class AveragedAID(Alternating):
        name: ClassVar[str] = "AveragedAID"
        beta: float = 0.5

        def build_parts(self):
            return Parts(lower=LowerGD(0.3, 2), multiplier=LinearSolve(bl.CG(steps=6)), direction=MovingAverage(self.beta))

    problem = T1g(n=4, seed=1)
    averaged, plain = AveragedAID(lr_upper=0.05), bl.AID(lr_upper=0.05, lr_lower=0.3, lower_steps=2, solver=bl.CG(steps=6))
    state = averaged.init(problem)
    assert type(state.extra["direction"]) is AverageState
    for _ in range(3):
        reference, _ = plain.step(problem, state.replace(opt=bl.parts.EmptyState()))
        estimate = (state.x["x"] - reference.x["x"]) / 0.05  # ĥ_k at the same point
        previous = state.extra["direction"].d["x"]
        state, _ = averaged.step(problem, state)
        torch.testing.assert_close(state.extra["direction"].d["x"], 0.5 * previous + 0.5 * estimate, rtol=1e-12, atol=1e-14)
    path = tmp_path / "c.pt"
    bl.save_checkpoint(path, state, [])
    loaded = bl.load_checkpoint(path)["state"]
    assert type(loaded.extra["direction"]) is AverageState and torch.equal(
        loaded.extra["direction"].d["x"], state.extra["direction"].d["x"]
    )


def test_parts_are_built_once_and_again_on_replace():
    method = bl.BAGDC(lr_lower=0.3)
    assert method.parts is method.parts and method.parts.lower == LowerGD(0.3, 1)
    other = method.replace(lr_lower=0.1, dual_step="linesearch")
    assert other.parts.lower == LowerGD(0.1, 1) and other.parts is not method.parts
    assert method == bl.BAGDC(lr_lower=0.3) and hash(method) == hash(bl.BAGDC(lr_lower=0.3))
    from bilevel.solve import method_spec

    spec = method_spec(method)
    assert spec["class"] == "BAGDC" and "parts" not in spec and spec["lr_lower"] == 0.3 and spec["stability_check"] == "warn"


def test_a_method_whose_parts_are_wrong_fails_when_built():
    @dataclass(frozen=True)
    class NoParts(Alternating):
        def build_parts(self):
            return LowerGD()

    @dataclass(frozen=True)
    class NoMultiplier(Alternating):
        def build_parts(self):
            return Parts(lower=LowerGD())

    @dataclass(frozen=True)
    class JacobiMany(Alternating):
        steps: int = option(3, check_positive)

        def build_parts(self):
            return Parts(lower=LowerGD(steps=self.steps), multiplier=LinearSolve(), order="jacobi")

    with pytest.raises(TypeError, match=r"NoParts.build_parts\(\) must return a bilevel.parts.Parts, got LowerGD"):
        NoParts()
    with pytest.raises(ValueError, match="NoMultiplier: an alternating method needs a multiplier estimator"):
        NoMultiplier()
    with pytest.raises(ValueError, match=r"JacobiMany\(order='jacobi'\) takes exactly one lower step"):
        JacobiMany()
