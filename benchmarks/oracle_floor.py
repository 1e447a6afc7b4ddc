"""Oracle floor: time of one ``method.step`` against the derivative evaluations it must make.

For each method, one step is run with recording oracles that log every derivative call
(kind, objective, flags) with its arguments. Each distinct call is then re-timed alone, as
many times in a row as the step makes it (the fastest of the repeated blocks), and the
floor is ``Σ count × time``. ITD makes its calls through
autograd directly: its floor is T gradients-with-graph of g + T products (the reverse
pass of each step is one ``both``) + one gradient of f.

    ratio = median step time / oracle floor     (1.0 = no overhead outside the oracles)

Usage (one command per table, see benchmarks/README.md):

    PYTHONPATH=src python benchmarks/oracle_floor.py                       # hyperclean linear + mlp
    PYTHONPATH=src python benchmarks/oracle_floor.py --problem logistic --dims 100 1000 10000
    PYTHONPATH=src python benchmarks/oracle_floor.py --device cuda
    PYTHONPATH=src python benchmarks/oracle_floor.py --models linear --methods BOME V-PBGD G-PBGD MEHA IAPTT-GM

The value-function and trajectory methods (BOME, V-PBGD, G-PBGD, MEHA, IAPTT-GM) run at the
settings of ``boat_compare.py``'s pairs; IAPTT-GM, like ITD, differentiates through its
trajectory with autograd, so its floor is assembled from the calls it must make.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import bilevel as bl
import common  # noqa: F401  (sets sys.path)
from bilevel.oracles import Linearization, Oracles
from common import add_common_args, apply_common_args, environment, hyperclean_problem, logistic_problem, methods, timeit


class _RecLin(Linearization):
    def __init__(self, inner, log, tag):
        self._inner, self._log, self._tag = inner, log, tag
        self.value, self.grad_y, self.grad_x = inner.value, inner.grad_y, inner.grad_x

    def both(self, v, need_mixed=True, need_hvp=True):
        kind = "both" if (need_mixed and need_hvp) else ("mixed" if need_mixed else "hvp")
        key = (kind, self._tag)
        self._log.setdefault(key, [0, (self._inner, v, need_mixed, need_hvp)])[0] += 1
        return self._inner.both(v, need_mixed=need_mixed, need_hvp=need_hvp)


@dataclass(frozen=True)
class RecordingOracles(Oracles):
    """Oracles that remember, per (kind, objective), the count and the first call's arguments."""

    log: dict = field(default_factory=dict, compare=False)

    def _rec(self, key, args):
        self.log.setdefault(key, [0, args])[0] += 1

    def gradients(self, fn, x, y, batch):
        self._rec(("gradients", fn.__name__), (fn, x, y, batch))
        return super().gradients(fn, x, y, batch)

    def gradient_y(self, fn, x, y, batch):
        self._rec(("gradient_y", fn.__name__), (fn, x, y, batch))
        return super().gradient_y(fn, x, y, batch)

    def linearize(self, fn, x, y, batch, with_grad_x=False):
        tag = fn.__name__ + ("+gx" if with_grad_x else "")
        self._rec(("linearize", tag), (fn, x, y, batch, with_grad_x))
        return _RecLin(super().linearize(fn, x, y, batch, with_grad_x), self.log, tag)


def block_time(call, count, repeats, device):
    """Time of one call, from the fastest of ``repeats`` blocks of ``count`` calls in a row:
    a step makes its calls one after the other, so the floor does too (the fastest single
    call, repeated, would leave out what consecutive calls cost each other — freed graphs,
    allocations — and make steps with many calls look slower than their floor)."""
    count = max(int(count), 1)
    return timeit(lambda: [call() for _ in range(count)], repeats, device=device) / count


def isolated_time(key, args, repeats, device, count=1):
    base = Oracles()
    kind = key[0]
    if kind == "gradients":
        return block_time(lambda: base.gradients(*args), count, repeats, device)
    if kind == "gradient_y":
        return block_time(lambda: base.gradient_y(*args), count, repeats, device)
    if kind == "linearize":
        return block_time(lambda: base.linearize(*args), count, repeats, device)
    inner, v, need_mixed, need_hvp = args
    return block_time(lambda: inner.both(v, need_mixed=need_mixed, need_hvp=need_hvp), count, repeats, device)


def itd_floor(problem, method, state, repeats, device):
    """T × (gradient of g with graph) + T × both + 1 gradient of f, each timed alone."""
    base = Oracles()
    x, y = state.x, state.y
    T = method.lower_steps
    lin = base.linearize(problem.lower, x, y, None)
    t_lin = block_time(lambda: base.linearize(problem.lower, x, y, None), T, repeats, device)
    t_both = block_time(lambda: lin.both(lin.grad_y), T, repeats, device)
    t_f = timeit(lambda: base.gradients(problem.upper, x, y, None), repeats, device=device)
    parts = {("linearize", "lower"): (T, t_lin), ("both", "lower"): (T, t_both), ("gradients", "upper"): (1, t_f)}
    return T * (t_lin + t_both) + t_f, parts


def value_function_methods(steps: int = 10) -> dict:
    """The first-order and trajectory methods, at the settings of ``boat_compare.py``'s pairs."""
    return {
        "BOME": bl.BOME(lr_upper=100.0, lr_lower=0.1, lr_shadow=0.1, shadow_steps=steps, eta=0.1, phi="value", lower_steps=steps),
        "V-PBGD": bl.PBGD(variant="value", gamma=0.3, lr_upper=100.0, lr_lower=0.1, lr_shadow=0.1, shadow_steps=steps),
        "G-PBGD": bl.PBGD(variant="gradient", gamma=0.3, lr_upper=100.0, lr_lower=0.1),
        "MEHA": bl.MEHA(lr_upper=100.0, lr_lower=0.1, lr_shadow=0.1, gamma=1000.0, c0=0.2, p=0.25, order="y_first"),
        "IAPTT-GM": bl.IAPTTGM(lr_upper=100.0, lr_lower=0.1, lower_steps=steps, initialization="warm"),
    }


def iaptt_floor(problem, method, state, repeats, device):
    """IAPTT-GM: K gradients-with-graph of g and K values of f along the trajectory, one
    gradient of f at the selected step s, and s reverse passes back through it (``both``)."""
    base = Oracles()
    x, y = state.x, state.y
    _, info = method.step(problem, state)
    selected = int(info["selected_step"])
    K = method.lower_steps
    lin = base.linearize(problem.lower, x, y, None)
    t_lin = block_time(lambda: base.linearize(problem.lower, x, y, None), K, repeats, device)
    t_both = block_time(lambda: lin.both(lin.grad_y), selected, repeats, device)
    t_value = block_time(lambda: problem.upper(x, y, None), K, repeats, device)
    t_f = timeit(lambda: base.gradients(problem.upper, x, y, None), repeats, device=device)
    parts = {
        ("linearize", "lower"): (K, t_lin),
        ("value", "upper"): (K, t_value),
        ("gradients", "upper"): (1, t_f),
        ("both", "lower"): (selected, t_both),
    }
    return sum(c * t for c, t in parts.values()), parts


def bench(problem, name, method, repeats, device, verbose):
    state = method.init(problem)
    for _ in range(2):  # move away from the initial point (zeros make some products trivial)
        state, _ = method.step(problem, state)
    step_t = timeit(lambda: method.step(problem, state), repeats, device=device)
    counting = bl.CountingOracles()
    method.replace(oracles=counting).step(problem, state)
    if name.startswith("ITD"):
        floor, parts = itd_floor(problem, method, state, repeats, device)
    elif name.startswith("IAPTT"):
        floor, parts = iaptt_floor(problem, method, state, repeats, device)
    else:
        rec = RecordingOracles()
        method.replace(oracles=rec).step(problem, state)
        parts = {}
        for key, (count, args) in rec.log.items():
            parts[key] = (count, isolated_time(key, args, repeats, device, count))
        floor = sum(c * t for c, t in parts.values())
    if verbose:
        detail = ", ".join(f"{c}×{k[0]}({k[1]}) {t * 1e3:.2f}ms" for k, (c, t) in parts.items())
        print(f"    {name}: {detail}")
    return step_t, floor, dict(counting.counts)


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--problem", default="hyperclean", choices=["hyperclean", "logistic"])
    p.add_argument("--models", nargs="+", default=["linear", "mlp"])
    p.add_argument("--dims", nargs="+", type=int, default=[100, 1000, 10000])
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--itd-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    dtype = apply_common_args(args)
    print(environment(args.device))
    if args.problem == "hyperclean":
        problems = [
            (m, hyperclean_problem(m, n_train=args.n_train, n_val=args.n_train, device=args.device, dtype=dtype)) for m in args.models
        ]
    else:
        problems = [(f"d={d}", logistic_problem(d, device=args.device, dtype=dtype)) for d in args.dims]
    rows = []
    print(f"{'problem':<12} {'method':<12} {'step ms':>9} {'floor ms':>9} {'ratio':>6}  counts")
    for label, problem in problems:
        for name, method in {**methods(args.itd_steps), **value_function_methods()}.items():
            if args.methods and name not in args.methods:
                continue
            step_t, floor, counts = bench(problem, name, method, args.repeats, args.device, args.verbose)
            rows.append(
                {
                    "problem": f"{args.problem}-{label}",
                    "method": name,
                    "step_ms": step_t * 1e3,
                    "floor_ms": floor * 1e3,
                    "ratio": step_t / floor,
                    "counts": counts,
                }
            )
            cstr = " ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "(autograd unroll)"
            print(f"{label:<12} {name:<12} {step_t * 1e3:9.2f} {floor * 1e3:9.2f} {step_t / floor:6.3f}  {cstr}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": environment(args.device), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
