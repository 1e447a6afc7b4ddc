"""Solve the closed-form toy problems with every method and print a table of errors.

    python examples/toys.py            # all toys (about two minutes on 2 CPU cores)
    python examples/toys.py T1 T2      # a subset

For each toy and method: the final error ‖x − x*‖/‖x*‖ (T3: the largest distance of the
end points to the nearest local minimum of Φ; T4: ‖x − x_opt‖), the method's
stationarity measure, iterations and wall-clock seconds. Settings are the reference
runs of docs/algorithms.md#reference-results where there is one.
"""

from __future__ import annotations

import sys
import time

import torch

import bilevel as bl
from bilevel.problems import T1, T2, T3, T3_LOCAL_MINIMA, T4, T1g


def relative_error(problem, result) -> float:
    x, x_star = result.x["x"], problem.x_star["x"]
    return float((x - x_star).norm() / x_star.norm())


def t3_error(problem, result) -> float:
    ends = result.x["x"]
    return float(torch.stack([(ends - m).abs() for m in T3_LOCAL_MINIMA]).min(dim=0).values.max())


def configurations():
    t1g = T1g(n=20, seed=0)
    alpha_t1g = 1.0 / t1g.smoothness["L_phi"]
    t4 = T4(m=5, d=20, seed=0)
    L4 = t4.smoothness["L_g"]
    return {
        "T1": (
            T1(),
            relative_error,
            20000 // 10,
            [
                ("GALET (zero start, ρ=0.5, T=5)", bl.GALET(lr_upper=0.1, lr_lower=0.5, lower_steps=5, lr_shadow=0.5, shadow_steps=5), 500),
                (
                    "GALET (warm start)",
                    bl.GALET(lr_upper=0.2, lr_lower=0.5, lower_steps=5, lr_shadow=0.5, shadow_steps=5, shadow_start="warm"),
                    300,
                ),
                ("sl-BAMM (official toy schedule, Jacobi, s=0.2)", bl.SlBAMM.from_strategy(s=0.2, order="jacobi"), 20000),
                ("sl-BAMM (sequential, μ=0.01 fixed)", bl.SlBAMM(lr_lower=0.5, mu=0.01, lr_upper=0.3), 300),
                ("BAGDC (η=0.5, s=0.2, α=0.01)", bl.BAGDC(lr_upper=0.01, lr_lower=0.2, lr_dual=0.5), 20000),
                ("BAGDC (line search, α=0.2)", bl.BAGDC(lr_upper=0.2, lr_lower=0.2, dual_step="linesearch"), 1500),
                ("AID-CG", bl.AID(lr_upper=0.5, lr_lower=0.5, lower_steps=20, solver=bl.CG(10)), 100),
                ("AID-Neumann", bl.AID(lr_upper=0.5, lr_lower=0.5, lower_steps=20, solver=bl.Neumann(20, 0.5)), 100),
                ("ITD/RHG (T=40)", bl.ITD(lr_upper=0.5, lr_lower=0.5, lower_steps=40), 100),
                ("T-RHG (T=40, K=20)", bl.TRHG(lr_upper=0.5, lr_lower=0.5, lower_steps=40), 100),
                ("BDA (T=40, μ=0.01)", bl.BDA(lr_upper=0.5, lr_lower=0.5, lower_steps=40, mu=0.01), 100),
                ("1-step unroll, no dual (counter-example)", bl.ITD(lr_upper=0.2, lr_lower=0.2, lower_steps=1, warm_start=True), 1500),
            ],
        ),
        "T1g": (
            t1g,
            relative_error,
            None,
            [
                (
                    "GALET (warm start)",
                    bl.GALET(lr_upper=alpha_t1g, lr_lower=0.5, lower_steps=10, lr_shadow=0.2, shadow_steps=10, shadow_start="warm"),
                    3000,
                ),
                ("BAGDC (sequential, α=1/L_Φ)", bl.BAGDC(lr_upper=alpha_t1g, lr_lower=0.2, lr_dual=0.3), 20000),
                ("sl-BAMM (sequential, μ=1e-4 fixed)", bl.SlBAMM(lr_lower=0.4, mu=1e-4, lr_upper=alpha_t1g), 5000),
                ("AID-CG", bl.AID(lr_upper=alpha_t1g, lr_lower=0.5, lower_steps=50, solver=bl.CG(20)), 3000),
            ],
        ),
        "T2": (
            T2(),
            relative_error,
            None,
            [
                ("sl-BAMM official toy (μ frozen 0.1 in φ)", bl.SlBAMM.official_toy(), 6000),
                ("sl-BAMM (μ_k in φ)", bl.SlBAMM.official_toy(freeze_phi_mu=None), 6000),
                ("BDA (T=20, μ=0.5)", bl.BDA(lr_upper=0.5, lr_lower=0.5, lower_steps=20, mu=0.5), 300),
                ("AID-FixedPoint (lower-only)", bl.AID(lr_upper=0.5, lr_lower=0.5, solver=bl.FixedPoint(20, 0.5)), 200),
                ("ITD/RHG (lower-only)", bl.ITD(lr_upper=0.5, lr_lower=0.5, lower_steps=20), 200),
            ],
        ),
        "T3": (
            T3(copies=200, seed=0),
            t3_error,
            None,
            [
                (
                    "GALET (200 starts, ρ=0.01, T=50)",
                    bl.GALET(lr_upper=0.05, lr_lower=0.1, lower_steps=10, lr_shadow=0.01, shadow_steps=50, project_x=bl.Box(0.0, 3.0)),
                    3000,
                ),
                (
                    "GALET (warm start, T=20)",
                    bl.GALET(
                        lr_upper=0.05,
                        lr_lower=0.1,
                        lower_steps=10,
                        lr_shadow=0.01,
                        shadow_steps=20,
                        shadow_start="warm",
                        project_x=bl.Box(0.0, 3.0),
                    ),
                    1500,
                ),
            ],
        ),
        "T4": (
            t4,
            lambda p, r: float((r.x["x"] - p.x_star["x"]).norm()),
            None,
            [
                (
                    "GALET (β=1/L, ρ=1/L², N=10, T=200)",
                    bl.GALET(lr_upper=0.2, lr_lower=1 / L4, lower_steps=10, lr_shadow=1 / L4**2, shadow_steps=200),
                    3000,
                ),
                (
                    "GALET (warm start, T=30)",
                    bl.GALET(lr_upper=0.2, lr_lower=1 / L4, lower_steps=10, lr_shadow=1 / L4**2, shadow_steps=30, shadow_start="warm"),
                    600,
                ),
            ],
        ),
    }


def main(argv: list[str]) -> None:
    configs = configurations()
    names = argv or list(configs)
    print("| toy | method | error | stationarity | iterations | seconds |")
    print("|---|---|---|---|---|---|")
    for name in names:
        problem, error, _, runs = configs[name]
        for label, method, iters in runs:
            start = time.perf_counter()
            result = bl.solve(problem, method, max_iters=iters, log_every=max(1, iters // 10))
            seconds = time.perf_counter() - start
            print(
                f"| {name} | {label} | {error(problem, result):.2e} | {result.final['stationarity']:.2e} | {iters} | {seconds:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:])
