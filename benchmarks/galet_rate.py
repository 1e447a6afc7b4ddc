"""GALET's claim, tested: on a PL lower level it converges at the rate of single-level
gradient descent (Xiao, Lu & Chen, NeurIPS 2023, Theorem 2: min_k R_k = O(1/K) with O(1)
lower and shadow steps per upper step, as GD's min_k ‖∇F‖² = O(1/K) on a smooth F).

Problem: T4 of the toy zoo, ``g = ½‖Ay − x‖²`` with A (m × d, m < d) of full row rank, so
g is PL in y but not strongly convex (the solution set ``Ay = x`` is an affine space of
dimension d − m), and ``f = ½‖y − y₀‖² + ½‖x − x₀‖² + c Σ_i cos(x_i)`` (``--cosine c``;
c = 0 is T4 itself). The value function of the optimistic (here unique) selection is in
closed form:

    y(x) = y₀ − A⁺(A y₀ − x),   F(x) = ½‖A⁺(A y₀ − x)‖² + ½‖x − x₀‖² + c Σ cos(x_i)
    ∇F(x) = (A Aᵀ)⁻¹(x − A y₀) + (x − x₀) − c sin(x)

so ∇²F = (A Aᵀ)⁻¹ + I − c diag(cos x) ⪰ (1 + 1/λ_max(A Aᵀ) − c) I: F is strongly convex for
c = 0 and nonconvex around the start x₀ = 0 for c = 3 (1 + 1/λ_max ≈ 1.45 for the default
A), the two cases run by default.

Run side by side with the same upper step α: GALET (its stationarity measure R, the sum of
the upper, lower and shadow residuals, every iteration) and gradient descent on F itself
(‖∇F(x_k)‖², the single-level measure), from the same x₀ = 0. Printed: the iterations each
needs to bring its measure below 1e-4, 1e-8, 1e-12 and their ratio; ``--png`` plots the
running minimum of both measures against the iteration (log scale).

GALET is run twice: with its auto lower and shadow steps (``lr_lower``, ``lr_shadow``
left ``"auto"``) and with the paper's fixed-step loop (N lower steps of β, T shadow steps
of ρ, given by ``--fixed``).

    PYTHONPATH=src python benchmarks/galet_rate.py
    PYTHONPATH=src python benchmarks/galet_rate.py --png docs/figures/galet_rate.png   # ~5 s
"""

from __future__ import annotations

import argparse
import math

import torch

import bilevel as bl
import common  # noqa: F401  (sets sys.path)
from bilevel.problems.toys import T4, ToyProblem

THRESHOLDS = (1e-4, 1e-8, 1e-12)


def problem_with_cosine(c: float, m: int, d: int, seed: int) -> tuple[ToyProblem, object]:
    """T4 with ``c Σ cos(x_i)`` added to f, and the closed-form ∇F of its value function."""
    base = T4(m=m, d=d, seed=seed)
    A, y_ref, x_ref = (base.metadata[k] for k in ("A", "y_ref", "x_ref"))
    gram_inv = torch.linalg.inv(A @ A.T)

    def upper(x, y, batch):
        return base.upper(x, y, batch) + c * torch.cos(x["x"]).sum()

    def grad_F(x: torch.Tensor) -> torch.Tensor:
        return gram_inv @ (x - A @ y_ref) + (x - x_ref) - c * torch.sin(x)

    problem = bl.Problem(upper=upper, lower=base.lower, x_init=base.x_init, y_init=base.y_init, name=f"T4+{c:g}cos")
    return problem, grad_F


def galet_measure(problem: bl.Problem, method: bl.GALET, iters: int) -> list[float]:
    state = method.init(problem)
    values = []
    for _ in range(iters):
        state, info = method.step(problem, state)
        values.append(float(info["stationarity"]))
    return values


def gd_measure(grad_F, x0: torch.Tensor, alpha: float, iters: int) -> list[float]:
    x, values = x0.clone(), []
    for _ in range(iters):
        g = grad_F(x)
        values.append(float(g @ g))
        x = x - alpha * g
    return values


def first_below(values: list[float], threshold: float) -> int | None:
    best = math.inf
    for k, v in enumerate(values, start=1):
        best = min(best, v)
        if best <= threshold:
            return k
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--alpha", type=float, default=0.1, help="the upper step α of both (default 0.1)")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--cosine", type=float, nargs="+", default=[0.0, 3.0], help="c of the c Σ cos(x_i) term (0: T4; 3: F nonconvex)")
    p.add_argument("--m", type=int, default=5)
    p.add_argument("--d", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fixed", type=float, nargs=4, default=[0.4, 5, 0.2, 5], metavar=("BETA", "N", "RHO", "T"))
    p.add_argument("--png", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    beta, n_lower, rho, n_shadow = args.fixed
    curves = {}
    print(f"upper step α = {args.alpha} for every run; measures: GALET's R, GD's ‖∇F‖²; first iteration with min ≤ threshold")
    header = "problem          run                              " + "".join(f"{t:>10.0e}" for t in THRESHOLDS) + "   ratio at 1e-8"
    print(header)
    for c in args.cosine:
        problem, grad_F = problem_with_cosine(c, args.m, args.d, args.seed)
        runs = {
            "GD on F (single level)": gd_measure(grad_F, problem.x_init["x"], args.alpha, args.iters),
            "GALET, auto lower/shadow": galet_measure(problem, bl.GALET(lr_upper=args.alpha), args.iters),
            f"GALET, N={int(n_lower)} β={beta}, T={int(n_shadow)} ρ={rho}": galet_measure(
                problem,
                bl.GALET(
                    lr_upper=args.alpha,
                    lr_lower=beta,
                    lower_steps=int(n_lower),
                    lr_shadow=rho,
                    shadow_steps=int(n_shadow),
                    shadow_start="warm",
                    stability_check="off",
                ),
                args.iters,
            ),
        }
        reference = first_below(runs["GD on F (single level)"], 1e-8)
        for name, values in runs.items():
            hits = [first_below(values, t) for t in THRESHOLDS]
            cells = "".join(f"{h if h is not None else '—':>10}" for h in hits)
            k8 = hits[1]
            ratio = f"{k8 / reference:.2f}" if k8 is not None and reference else "—"
            print(f"{problem.name:<16} {name:<32} {cells}   {ratio:>6}")
            curves[(problem.name, name)] = values
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = sorted({pname for pname, _ in curves})
        fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
        for ax, pname in zip(axes[0], names, strict=True):
            for (qname, run), values in curves.items():
                if qname != pname:
                    continue
                running = torch.tensor(values).cummin(0).values.clamp(min=1e-30)
                ax.semilogy(range(1, len(values) + 1), running.tolist(), label=run)
            ax.set_title(pname)
            ax.set_xlabel("upper iteration k")
            ax.set_ylabel("min over k of the measure")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
