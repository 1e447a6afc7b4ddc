"""Side by side with TorchOpt 0.7.3 implicit differentiation (``custom_root`` + ``solve_cg``).

Run with the TorchOpt virtual environment's python (our package from ``src/``):

    PYTHONPATH=src /tmp/optenv/bin/python benchmarks/torchopt_compare.py --threads 1
    PYTHONPATH=src /tmp/optenv/bin/python benchmarks/torchopt_compare.py --threads 1 --dtype float64

Same problem (``common.hyperclean_problem("linear")``: data hyper-cleaning, n train = n val,
784 features, 10 classes), same init, same hyper-parameters. Per upper iteration both sides do

    y ← T steps of  y − β ∇_y g(x, y)   (warm start from the previous y)
    v ← K steps of CG on  ∇²_yy g v = ∇_y f   (from 0; TorchOpt: ``rtol=0`` so exactly K steps)
    d = ∇_x f − ∇²_xy g v ;   x ← x − α d

TorchOpt: the lower loop is a ``@custom_root(optimality_fn=∇_y g, argnums=1,
solve=solve_cg(maxiter=K, rtol=0))`` solver and ``d`` is ``torch.autograd.grad`` of
f(x, y(x)) (its implicit backward: functorch ``vjp`` of ∇_y g, CG with a host sync per step,
then the vjp w.r.t. x). Only the pure-Python path is used: ``custom_root`` and ``solve_cg``
need no C++ op, and TorchOpt's compiled extension (``torchopt._C``) does not load against
torch 2.13 (undefined symbol; ``import torchopt`` still works). Ours: ``bl.AID(solver=CG(K)).step``.
Keep the default n = 5000: with a small n and α = 100 the upper iterates blow up and any
rounding difference is amplified.

Prints max|Δx|, max|Δy| over the first ``--check-iters`` iterations, how far x moved, and
the minimum time per iteration (= per hypergradient, lower steps included) over iterations
3..n, plus the minimum time of the hypergradient alone (lower steps excluded: y fixed).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch.func import grad

import bilevel as bl
import common  # noqa: F401
from bilevel import tree as btree
from bilevel.linsolve import CG
from common import environment, hyperclean_problem, sync, timeit

warnings.filterwarnings("ignore", category=FutureWarning, message=".*functorch")  # its functorch.vjp
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torchopt


def torchopt_side(problem, T, K, lr_lower):
    names = list(problem.y_init)

    def lower(xt, yt):
        return problem.lower({"logit": xt}, dict(zip(names, yt, strict=True)), None)

    def upper(xt, yt):
        return problem.upper({"logit": xt}, dict(zip(names, yt, strict=True)), None)

    def optimality_fn(y, x):  # ∇_y g(x, y) = 0 at the root
        return grad(lower, argnums=1)(x, y)

    @torchopt.diff.implicit.custom_root(optimality_fn, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=K, rtol=0.0))
    def inner(y, x):
        with torch.no_grad():
            x, y = x.detach(), tuple(t.detach() for t in y)
            for _ in range(T):
                g = grad(lower, argnums=1)(x, y)
                y = tuple(t - lr_lower * gt for t, gt in zip(y, g, strict=True))
        return y

    def hypergradient(x, y_start):
        xr = x.detach().requires_grad_(True)
        y = inner(y_start, xr)
        loss = upper(xr, y)
        (d,) = torch.autograd.grad(loss, xr)
        return d, tuple(t.detach() for t in y)

    def ift_only(x, y_star):  # the hypergradient alone, at a given y (T = 0 lower steps)
        xr = x.detach().requires_grad_(True)
        y = inner_0(y_star, xr)
        return torch.autograd.grad(upper(xr, y), xr)[0]

    @torchopt.diff.implicit.custom_root(optimality_fn, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=K, rtol=0.0))
    def inner_0(y, x):
        return tuple(t.detach() for t in y)

    return names, hypergradient, ift_only


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--lower-steps", type=int, default=10)
    p.add_argument("--solver-steps", type=int, default=10)
    p.add_argument("--lr-lower", type=float, default=0.1)
    p.add_argument("--lr-upper", type=float, default=100.0)
    p.add_argument("--check-iters", type=int, default=5)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(environment(args.device), "| torchopt", torchopt.__version__)
    T, K, beta, alpha = args.lower_steps, args.solver_steps, args.lr_lower, args.lr_upper
    print(f"hyper-cleaning linear, n={args.n_train}, d=784, T={T}, K={K}, β={beta}, α={alpha}, {args.dtype}")
    problem = hyperclean_problem("linear", n_train=args.n_train, n_val=args.n_train, dtype=dtype, device=args.device)
    method = bl.AID(lr_upper=alpha, lr_lower=beta, lower_steps=T, solver=CG(steps=K))
    names, hypergradient, ift_only = torchopt_side(problem, T, K, beta)

    state = method.init(problem)
    x, y = problem.x_init["logit"].clone(), tuple(problem.y_init[n].clone() for n in names)
    dx = dy = 0.0
    t_opt, t_ours = [], []
    for k in range(args.iters):
        sync(args.device)
        start = time.perf_counter()
        d, y = hypergradient(x, y)
        x = x - alpha * d
        sync(args.device)
        t_opt.append(time.perf_counter() - start)
        start = time.perf_counter()
        state, _ = method.step(problem, state)
        sync(args.device)
        t_ours.append(time.perf_counter() - start)
        if k < args.check_iters:
            dx = max(dx, float((state.x["logit"] - x).abs().max()))
            dy = max(dy, max(float((state.y[n] - t).abs().max()) for n, t in zip(names, y, strict=True)))
    moved = float(state.x["logit"].abs().max())
    to, tb = min(t_opt[2:]), min(t_ours[2:])

    # the hypergradient alone at a fixed y (no lower steps), both sides
    lin_state = state
    oracles = method._oracles()

    def ours_ift():
        xs, ys = lin_state.x, lin_state.y
        gx, gy, _ = oracles.gradients(problem.upper, xs, ys, None)
        lin = oracles.linearize(problem.lower, xs, ys, None)
        v = method.solver(lin.hvp, gy, None).v
        return btree.sub(gx, lin.mixed(v))

    ys = tuple(lin_state.y[n] for n in names)
    d_opt = ift_only(lin_state.x["logit"], ys)
    d_ours = ours_ift()["logit"]
    ti_opt = timeit(lambda: ift_only(lin_state.x["logit"], ys), args.repeats, device=args.device)
    ti_ours = timeit(ours_ift, args.repeats, device=args.device)

    print(f"{'':<22} {'max|Δx|':>9} {'max|Δy|':>9} {'|x-x0|':>9} {'TorchOpt ms':>11} {'ours ms':>9} {'TorchOpt/ours':>13}")
    print(f"{'step (T lower + IFT)':<22} {dx:9.2e} {dy:9.2e} {moved:9.2e} {to * 1e3:11.2f} {tb * 1e3:9.2f} {to / tb:13.2f}")
    print(
        f"{'hypergradient alone':<22} {float((d_opt - d_ours).abs().max()):9.2e} {'':>9} {float(d_ours.abs().max()):9.2e} "
        f"{ti_opt * 1e3:11.2f} {ti_ours * 1e3:9.2f} {ti_opt / ti_ours:13.2f}"
    )
    print("(hypergradient row: max|Δd| between the two hypergradients, and max|d| in the |x-x0| column)")


if __name__ == "__main__":
    main()
