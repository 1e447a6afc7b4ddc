"""Compilation: eager reverse oracles vs eager forward oracles vs compiled forward oracles.

    PYTHONPATH=src python benchmarks/compile_bench.py                  # small hyperclean (n=1000)
    PYTHONPATH=src python benchmarks/compile_bench.py --n-train 5000 --methods AID-CG GALET

Prints the compile time (first step), the steady step time of each variant, the speed-up
of compiled over eager reverse, and the largest difference of the iterates after
``--steps`` steps (compiled vs eager).
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401
from bilevel.compile import compiled
from bilevel.oracles import Oracles
from common import add_common_args, apply_common_args, environment, hyperclean_problem, methods, sync, timeit


def maxdiff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--model", default="linear", choices=["linear", "mlp"])
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--methods", nargs="+", default=["AID-CG", "BAGDC"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    dtype = apply_common_args(args)
    print(environment(args.device))
    problem = hyperclean_problem(args.model, n_train=args.n_train, n_val=args.n_train, device=args.device, dtype=dtype)
    print(f"{'method':<12} {'compile s':>9} {'reverse ms':>10} {'forward ms':>10} {'compiled ms':>11} {'speed-up':>8} {'max|Δx|':>9}")
    for name in args.methods:
        method = methods()[name]
        fwd = method.replace(oracles=Oracles(mode="forward"))
        comp = compiled(method, problem)
        s0 = method.init(problem)
        start = time.perf_counter()
        comp.step(problem, s0)
        sync(args.device)
        t_compile = time.perf_counter() - start
        se = sc = s0
        for _ in range(args.steps):
            se, _ = method.step(problem, se)
            sc, _ = comp.step(problem, sc)
        t_rev = timeit(lambda: method.step(problem, se), args.repeats, device=args.device)
        t_fwd = timeit(lambda: fwd.step(problem, se), args.repeats, device=args.device)
        t_cmp = timeit(lambda: comp.step(problem, se), args.repeats, device=args.device)
        print(
            f"{name:<12} {t_compile:9.1f} {t_rev * 1e3:10.2f} {t_fwd * 1e3:10.2f} {t_cmp * 1e3:11.2f} "
            f"{t_rev / t_cmp:8.2f} {maxdiff(se.x, sc.x):9.2e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
