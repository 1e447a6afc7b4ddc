"""The stochastic family on benchopt's "simulated" quadratic: suboptimality ‖∇F(x)‖² against
wall-clock time and against samples seen, median and 20–80 % band over seeds.

The problem is :func:`bilevel.problems.finite_sum_quadratic` (the benchmark's generator, in
torch); the three problems (``--problem``) are built by :mod:`bilevel.problems.benchmark`,
which ``bilevel bench stochastic_quadratic`` (and ``_datacleaning``, ``_logreg``) runs with
the same parameters as presets (docs/stochastic.md); the hyper-parameters are benchopt's grid-search winners
(``config/quadratics_021424_best_params.yml``; SOBA has none there: its defaults) in the
benchmark's parameterisation (β₀ = ``step_size``, α₀ = β₀ / ``outer_ratio``, batch 64,
T = K = N = 10, x₀ = −2, y₀ = 0). Each run is a plain loop of ``method.step`` (no logging),
timed without the metric; the metric is evaluated every ``--eval-every`` iterations.

    PYTHONPATH=src python benchmarks/stochastic.py --seeds 10 --budget 4 --png docs/figures/stochastic_quadratic.png
    PYTHONPATH=src python benchmarks/stochastic.py --problem logreg --dtype float64 --seeds 10 --budget 2 \
        --png docs/figures/stochastic_logreg.png

``--device cuda`` puts the data and the variables on the GPU (drawn on the CPU, then moved);
the step time is measured with the device synchronised.

Default run time on a 2-core CPU: 6 methods × seeds × budget (+ the metric), ~5 min for
10 seeds at 4 s.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

import bilevel as bl  # noqa: E402
from bilevel.methods.stochastic import benchmark_steps  # noqa: E402
from bilevel.problems.benchmark import datacleaning, logreg, quadratic, samples_per_iteration  # noqa: E402
from common import environment, sync  # noqa: E402

#: benchopt's quadratics_021424 best parameters (β₀ = step_size, r = outer_ratio)
BEST_QUADRATIC = {
    "SOBA": {"step_size": 0.1, "outer_ratio": 1.0},  # no entry: the solver's defaults
    "SABA": {"step_size": 0.1, "outer_ratio": 1.0},
    "SRBA": {"step_size": 0.1, "outer_ratio": 1.0, "period_frac": 0.5},
    "StocBiO": {"step_size": 0.1, "outer_ratio": 1.0},
    "AmIGO": {"step_size": 0.01, "outer_ratio": 0.1},
    "F2SA": {"step_size": 0.1, "outer_ratio": 1.0, "delta_lmbda": 0.01, "lmbda0": 1.0},
}
METHODS = tuple(BEST_QUADRATIC)


AUTO_METHODS = ("SOBA", "MASOBA", "SABA", "SRBA", "StocBiO", "AmIGO", "F2SA")


def make_auto(name: str, params: dict, inner_steps: int = 10) -> bl.Method:
    """The method with no step size given (docs/auto.md), the benchmark's other settings."""
    if name in ("StocBiO", "AmIGO"):
        inner = {"lower_steps": inner_steps, ("neumann_steps" if name == "StocBiO" else "dual_steps"): inner_steps}
        return getattr(bl, name)(**inner)
    if name == "SRBA":
        return bl.SRBA(period_frac=params.get("period_frac", 0.5))
    if name == "F2SA":
        return bl.F2SA(lambda0=params.get("lmbda0", 1.0), delta0=params.get("delta_lmbda", 0.1), lower_steps=inner_steps)
    if name in AUTO_METHODS:
        return getattr(bl, name)()
    raise ValueError(f"{name} has no auto steps; choose from {', '.join(AUTO_METHODS)}")


def make_method(name: str, params: dict, inner_steps: int = 10) -> bl.Method:
    """Our method with benchopt's parameters (their conventions: η = β, T = K = N = 10)."""
    beta, ratio = params["step_size"], params["outer_ratio"]
    if name == "SOBA":
        return bl.SOBA(**benchmark_steps(beta, ratio, power=0.5))
    if name == "SABA":
        return bl.SABA(**benchmark_steps(beta, ratio))
    if name == "SRBA":
        return bl.SRBA(**benchmark_steps(beta, ratio), period_frac=params.get("period_frac", 0.5))
    if name == "StocBiO":
        return bl.StocBiO(**benchmark_steps(beta, ratio), lower_steps=inner_steps, neumann_steps=inner_steps)
    if name == "AmIGO":
        return bl.AmIGO(**benchmark_steps(beta, ratio), lower_steps=inner_steps, dual_steps=inner_steps)
    if name == "F2SA":
        return bl.F2SA(
            lr_lower=bl.Polynomial(beta, 5 / 7),
            lr_shadow=bl.Polynomial(beta, 4 / 7),
            lr_upper=bl.Polynomial(beta / ratio, 4 / 7),
            lambda0=params.get("lmbda0", 1.0),
            delta0=params.get("delta_lmbda", 0.1),
            lower_steps=inner_steps,
        )
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


def run(
    problem, method, streams, x0, budget: float, eval_every: int, max_iters: int = 10**9, metric=None, y0=None, device="cpu"
) -> list[dict]:
    """Steps until ``budget`` seconds of step time; records ``metric(state)`` (default: the
    problem's ‖∇F(x)‖²) every ``eval_every`` iterations under the key ``"subopt"``; the
    ``device`` is synchronised around each timed block."""
    metric = metric if metric is not None else (lambda state: problem.suboptimality(state.x))
    b = streams.lower.batch_size
    per_iter = samples_per_iteration(method, b)
    srba_period = None
    if method.name == "SRBA":
        from bilevel.parts.stochastic import sarah_period

        srba_period = sarah_period(streams.batch_at(0), method.period_frac)  # type: ignore[attr-defined]
    state = method.init(problem, x0=x0, y0=y0, batch=streams.batch_at(0))
    # untimed, on a copy: the first call's lazy imports are not the method's cost, and SABA's tables are
    # written in place (a step from `state` itself would leave a write in them that the run never made)
    method.step(problem, copy.deepcopy(state), streams.batch_at(0))
    records = [{"iteration": 0, "time": 0.0, "samples": 0.0, "subopt": metric(state)}]
    elapsed, samples, k = 0.0, 0.0, 0
    while elapsed < budget and k < max_iters:
        sync(device)
        start = time.perf_counter()
        for _ in range(eval_every):
            state, _ = method.step(problem, state, streams.batch_at(k))
            if srba_period is not None and k % srba_period == 0:
                samples += streams.lower.n + streams.upper.n
            else:
                samples += per_iter
            k += 1
        sync(device)
        elapsed += time.perf_counter() - start
        value = metric(state)
        records.append({"iteration": k, "time": elapsed, "samples": samples, "subopt": value})
        if not math.isfinite(value):
            break
    return records


def band(runs: list[list[dict]], key: str, grid: list[float]) -> tuple[list, list, list]:
    """Median and 20/80 % quantiles of the best suboptimality reached by ``key`` ≤ each grid point."""
    med, low, high = [], [], []
    for point in grid:
        values = []
        for records in runs:
            reached = [r["subopt"] for r in records if r[key] <= point and math.isfinite(r["subopt"])]
            values.append(min(reached) if reached else float("inf"))
        values.sort()
        q = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values * 9
        med.append(statistics.median(values))
        low.append(q[1])
        high.append(q[7])
    return med, low, high


def plot(results: dict, png: str, title: str, ylabel: str = "‖∇F(x)‖²") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in results.items():
        for ax, key in zip(axes, ("time", "samples"), strict=True):
            top = min(max(r[key] for r in records) for records in runs)
            grid = [top * i / 60 for i in range(1, 61)]
            med, low, high = band(runs, key, grid)
            (line,) = ax.plot(grid, med, label=name)
            ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2)
    for ax, label in zip(axes, ("wall-clock time (s)", "samples seen"), strict=True):
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


#: benchopt's datacleaning0_5 best parameters (F2SA: datacleaning0_5_021424)
BEST_DATACLEANING = {
    "SOBA": {"step_size": 1.0, "outer_ratio": 1e-4},
    "SABA": {"step_size": 0.1, "outer_ratio": 1e-3},
    "SRBA": {"step_size": 1e-3, "outer_ratio": 1e-5, "period_frac": 512.0},
    "StocBiO": {"step_size": 0.01, "outer_ratio": 1e-5},
    "AmIGO": {"step_size": 1e-3, "outer_ratio": 1e-5},
    "F2SA": {"step_size": 0.1, "outer_ratio": 1e-4, "delta_lmbda": 1.0, "lmbda0": 1.0},
}


#: benchopt's ijcnn1_021424 best parameters (F2SA has none there: those of the quadratic)
BEST_LOGREG = {
    "SOBA": {"step_size": 0.03125, "outer_ratio": 0.01},
    "SABA": {"step_size": 0.25, "outer_ratio": 1.0},
    "SRBA": {"step_size": 0.5, "outer_ratio": 1.0, "period_frac": 0.5},
    "StocBiO": {"step_size": 0.25, "outer_ratio": 1.0},
    "AmIGO": {"step_size": 0.125, "outer_ratio": 0.1},
    "F2SA": {"step_size": 0.1, "outer_ratio": 1.0, "delta_lmbda": 0.01, "lmbda0": 1.0},
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="quadratic", choices=["quadratic", "datacleaning", "logreg"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of step time per run")
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-lower", type=int, default=4096)
    parser.add_argument("--n-upper", type=int, default=1024)
    parser.add_argument("--dim-x", type=int, default=10)
    parser.add_argument("--dim-y", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (data drawn on the CPU, then moved; timings synchronise the device)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--png", default=None)
    parser.add_argument("--auto", action="store_true", help='also each method with no step size given ("auto", docs/auto.md)')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.problem == "quadratic":
        problem = quadratic(args.n_lower, args.n_upper, args.dim_x, args.dim_y, dtype, args.device)
        x0, y0 = {"x": -2.0 * torch.ones(args.dim_x, dtype=dtype, device=args.device)}, None
        best, metric, make_streams = BEST_QUADRATIC, None, problem.streams
    elif args.problem == "logreg":
        problem, make_streams, metrics, (x0, y0) = logreg(dtype=dtype, device=args.device)
        best, metric = BEST_LOGREG, lambda state: metrics(state)["value"]
    else:
        problem, make_streams, metric = datacleaning(dtype=dtype, device=args.device)
        x0, y0, best = None, None, BEST_DATACLEANING
    print(f"# {environment(args.device)}, {problem.name}, batch {args.batch_size}, {args.dtype}")
    results: dict = {}
    entries = [(name, make_method(name, best[name])) for name in args.methods if name in best]
    if args.auto:
        entries += [(f"{name} auto", make_auto(name, best.get(name, {}))) for name in args.methods if name in AUTO_METHODS]
    for name, method in entries:
        runs = []
        for seed in range(1, args.seeds + 1):
            streams = make_streams(batch_size=args.batch_size, seed=seed)
            runs.append(run(problem, method, streams, x0, args.budget, args.eval_every, metric=metric, y0=y0, device=args.device))
        results[name] = runs
        finals = sorted(min(r["subopt"] for r in records) for records in runs)
        its = statistics.median(records[-1]["iteration"] for records in runs)
        low, mid = finals[len(finals) // 5], statistics.median(finals)
        what = "‖∇F‖²" if metric is None or args.problem == "logreg" else "test error"
        print(f"{name:13s} median best {what} {mid:.3e}  [20%: {low:.3e}]  iterations in {args.budget:g}s: {its:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    if args.png:
        label = "‖∇F(x)‖²" if metric is None or args.problem == "logreg" else "test error"
        plot(results, args.png, f"{problem.name}, {args.seeds} seeds, median and 20–80 % band", label)
    return results


if __name__ == "__main__":
    main()
