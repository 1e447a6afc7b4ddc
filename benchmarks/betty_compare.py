"""Side by side with Betty (``betty-ml`` 0.2.1): implicit hypergradients (Neumann, CG).

Run with the Betty virtual environment's python (install in benchmarks/README.md):

    PYTHONPATH=src /tmp/bettyenv/bin/python benchmarks/betty_compare.py --threads 1
    PYTHONPATH=src /tmp/bettyenv/bin/python benchmarks/betty_compare.py --threads 1 --problem reweight

Same problem as ``torchopt_compare.py`` (``common.hyperclean_problem("linear")``: data
hyper-cleaning, random MNIST-sized data, n train = n val, 784 features, 10 classes), same init,
same hyper-parameters. Per upper iteration both sides do

    y ← T steps of  y − β ∇_y g(x, y)   (warm start from the previous y)
    v ← K-step linear solve of  ∇²_yy g v = ∇_y f      (Neumann with step β, or CG from 0)
    d = ∇_x f − ∇²_xy g v ;   x ← x − α d

Betty: two ``ImplicitProblem`` s (inner = classifier, ``Config(type=..., unroll_steps=T,
neumann_iterations=K, neumann_alpha=β | cg_iterations=K)``; outer = weight logits), plain
``torch.optim.SGD`` on both, driven by ``Engine.train_step()`` (T calls = one upper iteration).
Ours: ``bl.AID(lr_lower=β, lower_steps=T, solver=Neumann(K, lr=β) | CG(K))``.

Betty 0.2.1's ``cg`` (``betty/hypergradient/cg.py``) builds the new search direction from the
*old* residual (``p_new = r + β p`` with ``r`` before the update: the bug of Betty issue #15, still
in the 0.2.1 wheel on PyPI). So the CG rows are also run against ``BettyCG`` below, which is
that same recurrence written with our tree helpers: it shows the difference is the recurrence,
not rounding. The "hypergradient alone" rows time one hypergradient at a fixed (x, y) (no lower
steps; Betty: its ``neumann`` / ``cg`` function called directly on the engine's problems) and
give its relative error against a converged reference (CG with 500 steps, float64).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings

import betty
import torch
import torch.nn as nn
from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.hypergradient import cg as betty_cg
from betty.hypergradient import neumann as betty_neumann
from betty.logging.logger_base import get_logger
from betty.problems import ImplicitProblem

import bilevel as bl
import common  # noqa: F401
from bilevel import tree as T
from bilevel.linsolve import CG, LinearSolver, LinearSolveResult, Neumann
from common import environment, hyperclean_problem, sync, timeit

HERE = os.path.dirname(os.path.abspath(__file__))


class BettyCG(LinearSolver):
    """Betty 0.2.1's CG recurrence (new direction from the old residual), on our trees."""

    def __init__(self, steps):
        self.steps = steps

    def __call__(self, matvec, b, v0=None):
        v, r, p = T.zeros_like(b), b, b
        for _ in range(self.steps):
            hp = matvec(p)
            rr = T.sq_norm(r)
            alpha = rr / T.vdot(hp, p)
            v, r_new = T.axpy(alpha, p, v), T.axpy(-alpha, hp, r)
            beta = T.sq_norm(r_new) / rr
            p, r = T.axpy(beta, p, r), r_new  # Betty: p_new = r (old) + beta p
        return LinearSolveResult(v=v, residual_sq=T.sq_norm(r))


class Linear(nn.Module):
    def __init__(self, W, b):
        super().__init__()
        self.W, self.b = nn.Parameter(W.clone()), nn.Parameter(b.clone())


class Logits(nn.Module):
    def __init__(self, x):
        super().__init__()
        self.logit = nn.Parameter(x.clone())


def betty_side(problem, kind, T_, K, beta, alpha):
    y0, x0 = problem.y_init, problem.x_init
    inner_mod, outer_mod = Linear(y0["W"], y0["b"]), Logits(x0["logit"])

    def y_of():
        return {"W": inner_mod.W, "b": inner_mod.b}

    class Inner(ImplicitProblem):
        def training_step(self, batch):
            return problem.lower({"logit": outer_mod.logit}, y_of(), None)

    class Outer(ImplicitProblem):
        def training_step(self, batch):
            return problem.upper({"logit": outer_mod.logit}, y_of(), None)

    loader = [(torch.zeros(1),)]
    cfg = dict(type=kind, unroll_steps=T_, log_step=-1)
    if kind == "neumann":
        cfg.update(neumann_iterations=K, neumann_alpha=beta)
    else:
        cfg.update(cg_iterations=K, cg_alpha=1.0)
    inner = Inner(
        name="inner",
        module=inner_mod,
        optimizer=torch.optim.SGD(inner_mod.parameters(), lr=beta),
        train_data_loader=loader,
        config=Config(**cfg),
    )
    outer = Outer(
        name="outer",
        module=outer_mod,
        optimizer=torch.optim.SGD(outer_mod.parameters(), lr=alpha),
        train_data_loader=loader,
        config=Config(type="darts", log_step=-1),
    )
    engine = Engine(
        problems=[outer, inner],
        dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
        config=EngineConfig(train_iters=10**9, valid_step=10**9, logger_type="none"),
    )
    engine.train()

    def upper_iteration():
        for _ in range(T_):
            engine.global_step += 1
            engine.train_step()

    def hypergradient_alone():  # d at the current (x, y), no lower steps
        inner.cur_batch = loader[0]
        loss = outer.training_step(loader[0])
        vec = torch.autograd.grad(loss, list(inner_mod.parameters()))
        fn = betty_neumann if kind == "neumann" else betty_cg
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (d,) = fn(list(vec), inner, outer, sync=False)
        return d  # ∇_x f = 0 here (f does not depend on x)

    return inner_mod, outer_mod, upper_iteration, hypergradient_alone


# -- data reweighting (Meta-Weight-Net style) on long-tailed FashionMNIST ------------------------
def long_tailed_fashion(n_max, imbalance, meta_per_class, seed=0):
    """Long-tailed FashionMNIST: class c keeps ⌊n_max · imbalance^(−c/9)⌋ training images; a
    balanced meta (validation) set of ``meta_per_class`` images per class from the rest."""
    import numpy as np

    from bilevel.data.sources import load_fashion_mnist

    images, labels = load_fashion_mnist()
    rng = np.random.default_rng(seed)
    train, meta = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        keep = int(n_max * imbalance ** (-c / 9))
        train.append(idx[:keep])
        meta.append(idx[keep : keep + meta_per_class])
    tr, me = np.concatenate(train), np.concatenate(meta)
    as_x = lambda i: torch.as_tensor(images[i].reshape(len(i), -1), dtype=torch.float32) / 255.0
    as_y = lambda i: torch.as_tensor(labels[i], dtype=torch.long)
    return as_x(tr), as_y(tr), as_x(me), as_y(me)


def _init_reweight(features, hidden, wnet_hidden, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape, fan: (torch.rand(*shape, generator=g) * 2 - 1) / fan**0.5
    y0 = {"W1": u(hidden, features, fan=features), "b1": torch.zeros(hidden), "W2": u(10, hidden, fan=hidden), "b2": torch.zeros(10)}
    x0 = {"a1": u(wnet_hidden, 1, fan=1), "c1": torch.zeros(wnet_hidden), "a2": u(1, wnet_hidden, fan=wnet_hidden), "c2": torch.zeros(1)}
    return x0, y0


def reweight_objectives(Xtr, ytr, Xme, yme):
    """g(x, y) = mean_i w_x(ℓ_i) ℓ_i(y), w_x = sigmoid(MLP_x(ℓ_i detached)) (the weighting net,
    1 → h → 1); f(x, y) = CE on the balanced meta set. y: the classifier 784 → h → 10."""
    F = torch.nn.functional

    def classifier(y, X):
        return F.linear(torch.relu(F.linear(X, y["W1"], y["b1"])), y["W2"], y["b2"])

    def weights(x, losses):
        return torch.sigmoid(F.linear(torch.relu(F.linear(losses.unsqueeze(1), x["a1"], x["c1"])), x["a2"], x["c2"])).squeeze(1)

    def lower(x, y, batch):
        losses = F.cross_entropy(classifier(y, Xtr), ytr, reduction="none")
        return (weights(x, losses.detach()) * losses).mean()

    def upper(x, y, batch):
        return F.cross_entropy(classifier(y, Xme), yme)

    return lower, upper


def _status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reweight_child(spec):
    """One side of the comparison in a fresh process: time per upper iteration, RSS growth, x."""
    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    # the data were prepared by the parent: loading FashionMNIST here would set the max RSS above any iteration
    Xtr, ytr, Xme, yme = (t.to(device) for t in torch.load(spec["data"]))
    lower, upper = reweight_objectives(Xtr, ytr, Xme, yme)
    x0, y0 = _init_reweight(Xtr.shape[1], spec["hidden"], spec["wnet_hidden"])
    x0, y0 = ({k: v.to(device) for k, v in t.items()} for t in (x0, y0))
    T_, K, beta, alpha = spec["T"], spec["K"], spec["beta"], spec["alpha"]
    if spec["side"] == "ours":
        problem = bl.Problem(upper, lower, x_init=x0, y_init=y0)
        method = bl.AID(lr_upper=alpha, lr_lower=beta, lower_steps=T_, solver=Neumann(steps=K, lr=beta))
        state = method.init(problem)

        def iteration():
            nonlocal state
            state, _ = method.step(problem, state)

        def current_x():
            return state.x
    else:
        inner_mod = nn.ParameterDict({k: nn.Parameter(v.clone()) for k, v in y0.items()})
        outer_mod = nn.ParameterDict({k: nn.Parameter(v.clone()) for k, v in x0.items()})

        class Inner(ImplicitProblem):
            def training_step(self, batch):
                return lower(dict(outer_mod.items()), dict(inner_mod.items()), None)

        class Outer(ImplicitProblem):
            def training_step(self, batch):
                return upper(dict(outer_mod.items()), dict(inner_mod.items()), None)

        loader = [(torch.zeros(1),)]
        inner = Inner(
            name="inner",
            module=inner_mod,
            optimizer=torch.optim.SGD(inner_mod.parameters(), lr=beta),
            train_data_loader=loader,
            config=Config(type="neumann", unroll_steps=T_, neumann_iterations=K, neumann_alpha=beta, log_step=-1),
        )
        outer = Outer(
            name="outer",
            module=outer_mod,
            optimizer=torch.optim.SGD(outer_mod.parameters(), lr=alpha),
            train_data_loader=loader,
            config=Config(type="darts", log_step=-1),
        )
        engine = Engine(
            problems=[outer, inner],
            dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
            config=EngineConfig(train_iters=10**9, valid_step=10**9, logger_type="none"),
        )
        engine.train()

        def iteration():
            for _ in range(T_):
                engine.global_step += 1
                engine.train_step()

        def current_x():
            return {k: v.detach() for k, v in outer_mod.items()}

    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the high-water mark VmHWM to the current RSS
            f.write("5")
        base = _status_kb("VmRSS")
    times, cpu_times, xs = [], [], []
    for k in range(spec["iters"]):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        iteration()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if k < spec["check_iters"]:
            xs.append({name: v.detach().cpu().reshape(-1).tolist() for name, v in current_x().items()})
    on_cuda = device.startswith("cuda")
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if on_cuda else (_status_kb("VmHWM") - base) / 1024
    # where the time goes: one more iteration under the profiler (after the memory reading),
    # the floating-point work of its matrix products and their share of the operators' time
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
        iteration()
    events = prof.key_averages()
    products = [e for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm")]
    work = {
        "gflop": sum(e.flops for e in products) / 1e9,
        "products": sum(e.count for e in products),
        "product_share": sum(e.self_cpu_time_total for e in products) / max(sum(e.self_cpu_time_total for e in events), 1e-9),
    }
    median = sorted(times[2:])[len(times[2:]) // 2]
    cpu = {"cpu_s": min(cpu_times[2:]), "cpu_median_s": sorted(cpu_times[2:])[len(cpu_times[2:]) // 2]}
    print(json.dumps({"s_per_iter": min(times[2:]), "median_s": median, "peak_mb": peak, "x": xs, **work, **cpu}))


def reweight_main(args):
    import os
    import subprocess
    import sys

    spec = {
        "n_max": args.n_max,
        "imbalance": args.imbalance,
        "meta_per_class": args.meta_per_class,
        "hidden": args.hidden,
        "wnet_hidden": 100,
        "T": args.lower_steps,
        "K": args.solver_steps,
        "beta": args.lr_lower,
        "alpha": args.rw_lr_upper,
        "iters": args.iters,
        "check_iters": args.check_iters,
        "threads": args.threads or 1,
        "device": args.device,
    }
    import tempfile

    data = long_tailed_fashion(args.n_max, args.imbalance, args.meta_per_class)
    folder = tempfile.mkdtemp(prefix="reweight-")
    spec["data"] = os.path.join(folder, "data.pt")
    torch.save(data, spec["data"])
    ytr = data[1]
    counts = torch.bincount(ytr, minlength=10).tolist()
    print(
        f"data reweighting (Meta-Weight-Net style), long-tailed FashionMNIST: {len(ytr)} training images per class {counts}, "
        f"{10 * args.meta_per_class} balanced meta images; classifier 784→{args.hidden}→10, weighting net 1→100→1; "
        f"implicit Neumann hypergradient both sides: T={spec['T']}, K={spec['K']}, β={spec['beta']}, α={spec['alpha']}, float32"
    )
    runs: dict[str, list[dict]] = {"betty": [], "ours": []}
    for r in range(args.rounds):  # the sides alternate, and so does which one goes first (load drifts)
        for side in ("betty", "ours") if r % 2 == 0 else ("ours", "betty"):
            run = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps({**spec, "side": side})],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(os.path.dirname(HERE), "src"), HERE])},
            )
            if run.returncode:
                raise RuntimeError(run.stderr[-3000:])
            runs[side].append(json.loads(run.stdout.strip().splitlines()[-1]))
    os.remove(spec["data"])
    os.rmdir(folder)
    dx = max(
        abs(a - b)
        for xb, xo in zip(runs["betty"][0]["x"], runs["ours"][0]["x"], strict=True)
        for k in xb
        for a, b in zip(xb[k], xo[k], strict=True)
    )
    middle = lambda values: sorted(values)[len(values) // 2]
    summary = {
        side: {
            "s_per_iter": min(r["s_per_iter"] for r in rs),
            "median_s": middle([r["median_s"] for r in rs]),
            "cpu_s": min(r["cpu_s"] for r in rs),
            "cpu_median_s": middle([r["cpu_median_s"] for r in rs]),
            "peak_mb": middle([r["peak_mb"] for r in rs]),
            "gflop": rs[0]["gflop"],
            "products": rs[0]["products"],
            "product_share": middle([r["product_share"] for r in rs]),
        }
        for side, rs in runs.items()
    }
    b, o = summary["betty"], summary["ours"]
    print(
        f"{'':<8} {'s/iter (min)':>12} {'(median)':>9} {'CPU s/iter (min)':>16} {'(median)':>9} {'peak MB':>8} "
        f"{'GFLOP/iter':>10} {'products':>8} {'% time':>6}"
    )
    for name, r in (("Betty", b), ("ours", o)):
        print(
            f"{name:<8} {r['s_per_iter']:12.4f} {r['median_s']:9.4f} {r['cpu_s']:16.4f} {r['cpu_median_s']:9.4f} {r['peak_mb']:8.1f} "
            f"{r['gflop']:10.2f} {r['products']:8d} {100 * r['product_share']:6.1f}"
        )
    print(
        f"ours/Betty: time {o['s_per_iter'] / b['s_per_iter']:.2f} (min), {o['median_s'] / b['median_s']:.2f} (median); "
        f"CPU time {o['cpu_s'] / b['cpu_s']:.2f} (min), {o['cpu_median_s'] / b['cpu_median_s']:.2f} (median); "
        f"peak memory {o['peak_mb'] / max(b['peak_mb'], 1e-9):.2f}; max|Δx| over the first {args.check_iters} iterations: {dx:.2e}"
    )
    rounds = list(zip(runs["betty"], runs["ours"], strict=True))
    print(
        "ours/Betty per round, time (min): "
        + ", ".join(f"{ro['s_per_iter'] / rb['s_per_iter']:.2f}" for rb, ro in rounds)
        + "; CPU time (min): "
        + ", ".join(f"{ro['cpu_s'] / rb['cpu_s']:.2f}" for rb, ro in rounds)
    )
    print(
        f"(over {args.rounds} rounds, the sides alternating in fresh processes: min of the per-round minima, median of "
        "the per-round medians and peaks. CPU time: time.process_time of the process (one thread), which other "
        "processes on the machine slow down far less than the wall-clock time. peak: the resident-set high-water mark "
        "over the iterations minus the resident set before them, VmHWM reset through /proc/self/clear_refs, on CPU; "
        "max allocated on CUDA. GFLOP/iter, products: the matrix products (mm/addmm) of one upper iteration as "
        "torch.profiler counts them; % time: their share of the operators' self time)"
    )


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
    p.add_argument("--device", default="cpu", help="cpu or cuda (the tensors of both sides)")
    p.add_argument("--problem", default="hyperclean", choices=["hyperclean", "reweight"])
    p.add_argument("--n-max", type=int, default=500, help="reweight: images of the largest class")
    p.add_argument("--imbalance", type=float, default=100.0, help="reweight: largest / smallest class")
    p.add_argument("--meta-per-class", type=int, default=10, help="reweight: balanced meta images per class")
    p.add_argument("--hidden", type=int, default=100, help="reweight: hidden units of the classifier")
    p.add_argument("--rw-lr-upper", type=float, default=1.0, help="reweight: α of the weighting net")
    p.add_argument("--rounds", type=int, default=3, help="reweight: rounds of the two sides, alternating")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        get_logger().setLevel(logging.WARNING)
        return reweight_child(json.loads(args.child))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.problem == "reweight":
        get_logger().setLevel(logging.WARNING)
        print(environment(args.device))
        return reweight_main(args)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    get_logger().setLevel(logging.WARNING)  # Betty's per-engine banner
    with open(betty.__file__.replace("__init__.py", "version.txt")) as f:
        version = f.read().strip()
    print(environment(args.device), "| betty-ml", version)
    T_, K, beta, alpha = args.lower_steps, args.solver_steps, args.lr_lower, args.lr_upper
    print(f"hyper-cleaning linear, n={args.n_train}, d=784, T={T_}, K={K}, β={beta}, α={alpha}, {args.dtype}")
    problem = hyperclean_problem("linear", n_train=args.n_train, n_val=args.n_train, dtype=dtype, device=args.device)
    ref64 = hyperclean_problem("linear", n_train=args.n_train, n_val=args.n_train, dtype=torch.float64, device=args.device)
    print(
        f"{'Betty → ours':<26} {'max|Δx|':>9} {'max|Δy|':>9} {'|x-x0|':>9} {'Betty ms':>9} {'ours ms':>9} "
        f"{'Betty/ours':>10} | {'alone: |Δd|/|d|':>16} {'err Betty':>9} {'err ours':>9} {'Betty ms':>9} {'ours ms':>9} {'ratio':>6}"
    )
    rows = [
        ("neumann", "Neumann → AID-Neumann", Neumann(steps=K, lr=beta)),
        ("cg", "CG → AID-CG", CG(steps=K)),
        ("cg", "CG → AID-BettyCG", BettyCG(K)),
    ]
    for kind, label, solver in rows:
        method = bl.AID(lr_upper=alpha, lr_lower=beta, lower_steps=T_, solver=solver)
        state = method.init(problem)
        inner_mod, outer_mod, upper_iteration, betty_alone = betty_side(problem, kind, T_, K, beta, alpha)
        dx = dy = 0.0
        tb, to = [], []
        for k in range(args.iters):
            sync(args.device)
            start = time.perf_counter()
            upper_iteration()
            sync(args.device)
            tb.append(time.perf_counter() - start)
            start = time.perf_counter()
            state, _ = method.step(problem, state)
            sync(args.device)
            to.append(time.perf_counter() - start)
            if k < args.check_iters:
                dx = max(dx, float((state.x["logit"] - outer_mod.logit.detach()).abs().max()))
                dy = max(
                    dy, float((state.y["W"] - inner_mod.W.detach()).abs().max()), float((state.y["b"] - inner_mod.b.detach()).abs().max())
                )
        moved = float(state.x["logit"].abs().max())
        t_b, t_o = min(tb[2:]), min(to[2:])

        # hypergradient alone at Betty's current (x, y): both sides at the same point
        xs = {"logit": outer_mod.logit.detach().clone()}
        ys = {"W": inner_mod.W.detach().clone(), "b": inner_mod.b.detach().clone()}
        oracles = method._oracles()

        def ours_alone(prob=problem, solver=solver, xs=xs, ys=ys, oracles=oracles):
            gx, gy, _ = oracles.gradients(prob.upper, xs, ys, None)
            lin = oracles.linearize(prob.lower, xs, ys, None)
            return T.sub(gx, lin.mixed(solver(lin.hvp, gy, None).v))["logit"]

        x64 = {k_: v.double() for k_, v in xs.items()}
        y64 = {k_: v.double() for k_, v in ys.items()}
        d_ref = ours_alone(ref64, CG(steps=500), x64, y64)
        d_b, d_o = betty_alone().detach(), ours_alone()
        rel = lambda a, b_: float((a.double() - b_.double()).norm() / b_.double().norm())
        ti_b = timeit(betty_alone, args.repeats, device=args.device)
        ti_o = timeit(ours_alone, args.repeats, device=args.device)
        print(
            f"{label:<26} {dx:9.2e} {dy:9.2e} {moved:9.2e} {t_b * 1e3:9.2f} {t_o * 1e3:9.2f} {t_b / t_o:10.2f} | "
            f"{rel(d_b, d_o):16.2e} {rel(d_b, d_ref):9.2e} {rel(d_o, d_ref):9.2e} {ti_b * 1e3:9.2f} {ti_o * 1e3:9.2f} "
            f"{ti_b / ti_o:6.2f}",
            flush=True,
        )
    print(
        "(left: iterates over the first --check-iters upper iterations and min time per upper iteration, T lower "
        "steps included; right: one hypergradient at Betty's final (x, y): relative difference Betty vs ours, "
        "relative error of each against a 500-step float64 CG reference, min time)"
    )


if __name__ == "__main__":
    main()
