"""Side by side with benchopt's ``benchmark_bilevel`` (JAX) on the simulated quadratic:
time for each implementation to reach the same suboptimality ‖∇F(x)‖², ratio ours/theirs.

Both sides solve the same problem (our :func:`bilevel.problems.finite_sum_quadratic`, exported
as the benchmark's per-sample matrices ``hess_inner_i = u_i u_iᵀ``, ``cross_i = c_i e_iᵀ`` …
and evaluated by their own ``datasets/simulated.py`` functions), from x₀ = −2, y₀ = 0, in
float32, batch 64, with the benchmark's best parameters
(``config/quadratics_021424_best_params.yml``) and the same seeds (the samplers differ: theirs
is JAX's). Their solvers run unchanged (``Solver.get_instance(...)``, ``set_objective``,
``run(callback)``): each callback records the time spent in their jitted epochs
(``eval_freq`` iterations; the first epoch's compile time is replaced by the median epoch
time) and the outer variable; ours is a plain loop of ``method.step``. The metric is
computed afterwards, for both, by our closed form in float64.

Setup (a separate virtual environment; never the project's dependencies)::

    python -m venv /tmp/bo_venv && /tmp/bo_venv/bin/pip install benchopt jax jaxlib scikit-learn
    git clone https://github.com/benchopt/benchmark_bilevel /tmp/benchmark_bilevel   # @3ad65dc
    PYTHONPATH=src python benchmarks/benchopt_compare.py --threads 1 --budget 6

``--device cuda`` runs our side on the GPU (problem drawn on the CPU, then moved; step time
measured with the device synchronised); their JAX side always runs on the CPU
(``jax_platform_name = "cpu"``), so the ratio is then GPU (ours) against CPU (theirs).

Default run time on a 2-core CPU: ~2 × 6 solvers × budget, ~3 min.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOLVERS = {"SOBA": "soba", "SABA": "saba", "SRBA": "srba", "StocBiO": "stocbio", "AmIGO": "amigo", "F2SA": "f2sa"}


# --------------------------------------------------------------------------- their side (JAX venv)


def their_side(args) -> None:
    import importlib.util

    sys.path.insert(0, args.bb)
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_platform_name", "cpu")
    spec = importlib.util.spec_from_file_location("bb_simulated", f"{args.bb}/datasets/simulated.py")
    simulated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(simulated)
    metric = None
    if args.problem == "quadratic":
        data = np.load(args.data)
        n_in, n_out = data["hess_inner_inner"].shape[0], data["hess_outer_inner"].shape[0]
        inner_keys = ("hess_inner_inner", "hess_inner_outer", "cross_inner", "lin_inner_inner", "lin_inner_outer")
        outer_keys = ("hess_outer_inner", "hess_outer_outer", "cross_outer", "lin_outer_inner", "lin_outer_outer")
        f_inner = simulated.get_function(*(jnp.asarray(data[k]) for k in inner_keys))
        f_outer = simulated.get_function(*(jnp.asarray(data[k]) for k in outer_keys))
        inner0, outer0 = jnp.zeros(data["hess_inner_inner"].shape[1]), -2.0 * jnp.ones(data["cross_inner"].shape[1])
    else:  # their MNIST loader reads ./mnist.pkl (written from the local IDX files) instead of downloading
        import os

        os.chdir(Path(args.data).parent)
        spec = importlib.util.spec_from_file_location("bb_mnist", f"{args.bb}/datasets/mnist.py")
        mnist = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mnist)
        got = mnist.Dataset.get_instance(ratio=0.5, random_state=32, reg=0.2).get_data()
        f_inner, n_in, dim_in, _ = got["pb_inner"]
        f_outer, n_out, dim_out, _ = got["pb_outer"]
        metrics = got["metrics"]
        inner0, outer0 = jnp.zeros(dim_in), -2.0 * jnp.ones(dim_out)

        def metric(solver):
            return metrics(solver.inner_var, solver.outer_var)["test_accuracy"]  # their name for the test error

    params = json.loads(args.params)
    out = {}
    for name in args.solvers:
        spec = importlib.util.spec_from_file_location(f"bb_{SOLVERS[name]}", f"{args.bb}/solvers/{SOLVERS[name]}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        runs = []
        for seed in range(1, args.seeds + 1):
            solver = module.Solver.get_instance(batch_size=64, eval_freq=args.eval_every, random_state=seed, **params[name])
            solver.set_objective(
                f_inner=f_inner,
                f_outer=f_outer,
                n_inner_samples=n_in,
                n_outer_samples=n_out,
                inner_var0=inner0,
                outer_var0=outer0,
            )
            records, epochs = [], []
            clock = {"last": None}

            def callback(solver=solver, records=records, epochs=epochs, clock=clock):
                now = time.perf_counter()
                if clock["last"] is not None:
                    jax.block_until_ready(solver.outer_var)
                    now = time.perf_counter()
                    epochs.append(now - clock["last"])
                records.append(metric(solver) if metric is not None else np.asarray(solver.outer_var, dtype=np.float64).tolist())
                spent = sum(epochs[1:]) + (statistics.median(epochs[1:]) if len(epochs) > 1 else 0.0)
                clock["last"] = time.perf_counter()
                return spent < args.budget and len(records) < 100000

            solver.run(callback)
            times = [0.0]
            for i in range(1, len(records)):
                times.append(sum(epochs[1:i]) + (statistics.median(epochs[1:]) if len(epochs) > 1 else 0.0))
            runs.append(
                {
                    "x": records,
                    "time": times,
                    "iterations": [i * args.eval_every for i in range(len(records))],
                    "compile": epochs[0] if epochs else 0.0,
                }
            )
        out[name] = runs
        print(
            f"theirs {name}: {len(runs[0]['x']) * args.eval_every} iterations, first epoch (with compile) {runs[0]['compile']:.2f}s",
            file=sys.stderr,
        )
    Path(args.out).write_text(json.dumps(out))


# --------------------------------------------------------------------------- our side


def export(problem, path: Path) -> None:
    import numpy as np

    u, c, e, a = (t.double().cpu().numpy() for t in problem.lower_data)
    r, s, h, w, p, q = (t.double().cpu().numpy() for t in problem.upper_data)
    f32 = np.float32
    np.savez(
        path,
        hess_inner_inner=np.einsum("ni,nj->nij", u, u).astype(f32),
        hess_inner_outer=np.zeros((u.shape[0], c.shape[1], c.shape[1]), f32),
        cross_inner=np.einsum("ni,nj->nij", c, e).astype(f32),
        lin_inner_inner=a.astype(f32),
        lin_inner_outer=np.zeros((u.shape[0], c.shape[1]), f32),
        hess_outer_inner=np.einsum("ni,nj->nij", r, r).astype(f32),
        hess_outer_outer=np.einsum("ni,nj->nij", s, s).astype(f32),
        cross_outer=np.einsum("ni,nj->nij", h, w).astype(f32),
        lin_outer_inner=p.astype(f32),
        lin_outer_outer=q.astype(f32),
    )


def time_to(records_time: list, values: list, target: float) -> float:
    for t, v in zip(records_time, values, strict=True):
        if v <= target:
            return t
    return math.inf


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", default="ours", choices=["ours", "theirs"])
    parser.add_argument("--problem", default="quadratic", choices=["quadratic", "datacleaning"])
    parser.add_argument("--bb", default="/tmp/benchmark_bilevel", help="a checkout of benchopt/benchmark_bilevel")
    parser.add_argument("--venv-python", default="/tmp/bo_venv/bin/python")
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of step time per run and side")
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--n-lower", type=int, default=4096)
    parser.add_argument("--n-upper", type=int, default=1024)
    parser.add_argument("--dim-x", type=int, default=10)
    parser.add_argument("--dim-y", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: our side only (their JAX side always runs on the CPU)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--params", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.side == "theirs":
        their_side(args)
        return {}

    sys.path.insert(0, str(HERE))
    import torch

    import stochastic as ours
    from bilevel.problems.benchmark import datacleaning, mnist_arrays, quadratic
    from common import environment

    torch.set_num_threads(args.threads)
    dev = args.device
    if args.problem == "quadratic":
        problem = quadratic(args.n_lower, args.n_upper, args.dim_x, args.dim_y, torch.float32, dev)
        best, metric_name, x0 = ours.BEST_QUADRATIC, "‖∇F‖²", {"x": -2.0 * torch.ones(args.dim_x, dtype=torch.float32, device=dev)}
        make_streams, metric = problem.streams, None
    else:
        problem, make_streams, metric = datacleaning(device=dev)
        best, metric_name, x0 = ours.BEST_DATACLEANING, "test error", None
    params = {name: dict(best[name]) for name in args.solvers}
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "problem.npz", Path(tmp) / "theirs.json"
        if args.problem == "quadratic":
            export(problem, data)
        else:
            import pickle

            with open(Path(tmp) / "mnist.pkl", "wb") as handle:
                pickle.dump(mnist_arrays(), handle)
        env = {"XLA_FLAGS": f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={args.threads}", "PATH": "/usr/bin:/bin"}
        command = [args.venv_python, str(Path(__file__).resolve()), "--side", "theirs", "--problem", args.problem, "--bb", args.bb]
        command += ["--data", str(data), "--out", str(out), "--params", json.dumps(params), "--seeds", str(args.seeds)]
        command += ["--budget", str(args.budget), "--eval-every", str(args.eval_every), "--solvers", *args.solvers]
        subprocess.run(command, check=True, env=env)
        theirs = json.loads(out.read_text())
    table = {}
    print(f"# ours: {environment(dev)}; theirs: JAX on the CPU")
    print(f"# {problem.name}, float32, batch 64, {args.seeds} seed(s), budget {args.budget:g}s per run, torch threads {args.threads}")
    columns = (f"target {metric_name}", "ours (s)", "theirs (s)", "ours/theirs", "ours best", "theirs best", "it/s ours", "it/s theirs")
    print("solver   " + " ".join(f"{c:>12s}" for c in columns))
    for name in args.solvers:
        method = ours.make_method(name, params[name])
        ours_runs = [
            ours.run(problem, method, make_streams(batch_size=64, seed=seed), x0, args.budget, args.eval_every, metric=metric, device=dev)
            for seed in range(1, args.seeds + 1)
        ]
        if args.problem == "quadratic":
            subs_theirs = [
                [problem.suboptimality({"x": torch.tensor(x, dtype=torch.float32, device=dev)}) for x in run["x"]] for run in theirs[name]
            ]
        else:
            subs_theirs = [run["x"] for run in theirs[name]]  # their test error at each record
        best_ours = statistics.median(min(r["subopt"] for r in run) for run in ours_runs)
        best_theirs = statistics.median(min(v for v in s if math.isfinite(v)) for s in subs_theirs)
        # a level both reach: twice the worse best suboptimality, or the worse best test error + 0.5 %
        target = 2.0 * max(best_ours, best_theirs) if args.problem == "quadratic" else max(best_ours, best_theirs) + 0.005
        t_ours = statistics.median(time_to([r["time"] for r in run], [r["subopt"] for r in run], target) for run in ours_runs)
        t_theirs = statistics.median(time_to(run["time"], s, target) for run, s in zip(theirs[name], subs_theirs, strict=True))
        speed_ours = statistics.median(run[-1]["iteration"] / run[-1]["time"] for run in ours_runs)
        speed_theirs = statistics.median(run["iterations"][-1] / max(run["time"][-1], 1e-9) for run in theirs[name])
        ratio = t_ours / t_theirs if t_theirs > 0 else math.inf
        table[name] = {"target": target, "ours": t_ours, "theirs": t_theirs, "ratio": ratio, "best_ours": best_ours}
        table[name].update({"best_theirs": best_theirs, "its_ours": speed_ours, "its_theirs": speed_theirs})
        row = (f"{target:.3e}", f"{t_ours:.3f}", f"{t_theirs:.3f}", f"{ratio:.2f}", f"{best_ours:.3e}", f"{best_theirs:.3e}")
        print(f"{name:8s} " + " ".join(f"{c:>12s}" for c in (*row, f"{speed_ours:.0f}", f"{speed_theirs:.0f}")))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    return table


if __name__ == "__main__":
    main()
