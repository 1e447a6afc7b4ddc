"""Opt-in: compiled oracles (bilevel.compile) give the eager iterates.

Skipped unless BILEVEL_TEST_COMPILE=1 (torch.compile takes tens of seconds on a CPU).
"""

import os

import pytest
import torch

import bilevel as bl

pytestmark = pytest.mark.skipif(os.environ.get("BILEVEL_TEST_COMPILE") != "1", reason="set BILEVEL_TEST_COMPILE=1 to run")


def _problem():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(30, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(30, generator=gen, dtype=torch.float64)

    def lower(x, y, batch):
        return 0.5 * ((A @ y["w"] - b) ** 2).mean() + 0.5 * (torch.exp(x["lam"]) * y["w"] ** 2).sum()

    def upper(x, y, batch):
        return 0.5 * ((A[:10] @ y["w"] - b[:10]) ** 2).mean()

    x0 = {"lam": torch.zeros(8, dtype=torch.float64)}
    y0 = {"w": torch.zeros(8, dtype=torch.float64)}
    return bl.Problem(upper=upper, lower=lower, x_init=x0, y_init=y0)


@pytest.mark.parametrize(
    "method",
    [
        bl.GALET(lr_upper=0.1, lr_lower=0.3, lower_steps=3, lr_shadow=0.3, shadow_steps=4, stability_check="off"),
        bl.AID(lr_upper=0.1, lr_lower=0.3, lower_steps=3, solver=bl.CG(steps=4)),
        bl.BAGDC(lr_upper=0.1, lr_lower=0.3, lr_dual=0.3, stability_check="off"),
        bl.SlBAMM(lr_lower=0.3, stability_check="off"),
    ],
    ids=lambda m: m.name,
)
def test_compiled_equals_eager(method):
    from bilevel.compile import compiled

    problem = _problem()
    eager = bl.solve(problem, method, max_iters=4)
    comp = bl.solve(problem, compiled(method, problem), max_iters=4)
    for a, b in ((eager.x, comp.x), (eager.y, comp.y), (eager.v, comp.v)):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-11)


def test_solve_compile_flag():
    problem = _problem()
    method = bl.AID(lr_upper=0.1, lr_lower=0.3, lower_steps=2, solver=bl.CG(steps=2))
    eager = bl.solve(problem, method, max_iters=3)
    comp = bl.solve(problem, method, max_iters=3, compile=True)
    torch.testing.assert_close(eager.x["lam"], comp.x["lam"], rtol=1e-9, atol=1e-11)
