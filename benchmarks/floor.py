"""The hand-written floor: the library's seed methods against minimal PyTorch loops.

For GALET, sl-BAMM, BAGDC, AID-CG and ITD, a hand-written loop of the same algorithm with
the same options (plain ``torch.autograd.grad``, ``create_graph`` where a product needs it,
no library code, no diagnostics) is run next to ``method.step`` with the library's default
diagnostics on (what a user gets). First the iterates ``(x, y)`` of both are checked equal
in float64 (relative 1e-12 after ``--check-iters`` steps); then library and hand blocks of
``--block`` steps alternate in one process (``torch.set_num_threads(1)``) and the ratio of
each round is recorded:

    ratio = library time / hand time       (1.00: at the floor)

reported as the median over rounds with its spread (25-75 %) and as min/min. Problem:
linear data hyper-cleaning, n = 1000 training + 1000 validation examples, random data,
W stored ``[out, in]`` and ``F.linear`` (the library's layout); parameters ≈ 10³
(d = 100, C = 10), 10⁵ (d = 1000, C = 100), 10⁶ (d = 10000, C = 100).

    PYTHONPATH=src python benchmarks/floor.py                     # all sizes, all methods
    PYTHONPATH=src python benchmarks/floor.py --sizes 1e3 --rounds 40 --methods GALET BAGDC
    PYTHONPATH=src python benchmarks/floor.py --check-only        # float64 equality only
    PYTHONPATH=src python benchmarks/floor.py --clock cpu         # CPU time: a machine shared with other jobs
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch
import torch.nn.functional as F

import bilevel as bl
import common  # noqa: F401  (sets sys.path)
from bilevel.linsolve import CG
from common import environment, sync

grad = torch.autograd.grad

SIZES = {"1e3": (100, 10), "1e5": (1000, 100), "1e6": (10000, 100)}


# --------------------------------------------------------------------------- problem


class Data:
    """Linear hyper-cleaning data (features d, classes C, n_train + n_val examples)."""

    def __init__(self, d, C, n=1000, dtype=torch.float32, seed=0, device="cpu"):
        gen = torch.Generator().manual_seed(seed)  # drawn on the CPU, so every device gets the same data
        self.Xtr = (torch.randn(n, d, generator=gen) / d**0.5).to(device, dtype)
        self.Xva = (torch.randn(n, d, generator=gen) / d**0.5).to(device, dtype)
        self.ytr = torch.randint(0, C, (n,), generator=gen).to(device)
        self.yva = torch.randint(0, C, (n,), generator=gen).to(device)
        self.d, self.C, self.n, self.dtype, self.device = d, C, n, dtype, torch.device(device)

    def g(self, x, W, b):
        return (torch.sigmoid(x) * F.cross_entropy(F.linear(self.Xtr, W, b), self.ytr, reduction="none")).mean()

    def f(self, W, b):
        return F.cross_entropy(F.linear(self.Xva, W, b), self.yva)

    def problem(self):
        def lower(x, y, batch):
            return self.g(x["weights"], y["W"], y["b"])

        def upper(x, y, batch):
            return self.f(y["W"], y["b"])

        z = functools.partial(torch.zeros, dtype=self.dtype, device=self.device)
        x0 = {"weights": z(self.n)}
        y0 = {"W": z(self.C, self.d), "b": z(self.C)}
        return bl.Problem(upper=upper, lower=lower, x_init=x0, y_init=y0, name="hyperclean-linear")


# --------------------------------------------------------------------------- the library's configurations


def library_methods():
    """The benchmarked configurations (benchmarks/common.py's), with their defaults."""
    off = {"stability_check": "off"}
    return {
        "GALET": bl.GALET(lr_upper=0.1, lr_lower=0.1, lower_steps=5, lr_shadow=0.1, shadow_steps=10, **off),
        "sl-BAMM": bl.SlBAMM.from_strategy(s=0.01, mu0=0.9, p=100.0, tau=0.01, strategy="s1", **off),
        "BAGDC": bl.BAGDC(lr_upper=0.01, lr_lower=0.1, lr_dual=0.1, **off),
        "AID-CG": bl.AID(lr_upper=0.1, lr_lower=0.1, lower_steps=10, solver=CG(steps=10)),
        "ITD": bl.ITD(lr_upper=0.1, lr_lower=0.1, lower_steps=20),
    }


# --------------------------------------------------------------------------- hand-written loops
# state: (x, W, b, vW, vb, k); every function returns the next state.


def _req(*ts):
    return [t.detach().requires_grad_(True) for t in ts]


def _dot(a, b):
    return sum((p * q).sum() for p, q in zip(a, b, strict=True))


def _sq(a):
    return sum((p * p).sum() for p in a)


def hand_galet(D, s, lr=0.1, beta=0.1, N=5, rho=0.1, T=10):
    x, W, b, _, _, k = s
    for _ in range(N):
        W, b = _req(W, b)
        gW, gb = grad(D.g(x, W, b), (W, b))
        W, b = (W - beta * gW).detach(), (b - beta * gb).detach()
    xr, Wr, br = _req(x, W, b)
    gy = grad(D.g(xr, Wr, br), (Wr, br), create_graph=True)
    fW, fb = grad(D.f(Wr, br), (Wr, br))
    vW = vb = None
    for _ in range(T):  # v ← v − ρ H (H v − ∇_y f), from 0
        if vW is None:
            rW, rb = -fW, -fb
        else:
            hW, hb = grad(gy, (Wr, br), (vW, vb), retain_graph=True)
            rW, rb = hW - fW, hb - fb
        hW, hb = grad(gy, (Wr, br), (rW, rb), retain_graph=True)
        vW, vb = (-rho * hW, -rho * hb) if vW is None else (vW - rho * hW, vb - rho * hb)
    (jv,) = grad(gy, xr, (vW, vb))
    return x + lr * jv, W, b, vW, vb, k + 1


def hand_aid_cg(D, s, lr=0.1, beta=0.1, N=10, K=10):
    x, W, b, _, _, k = s
    for _ in range(N):
        W, b = _req(W, b)
        gW, gb = grad(D.g(x, W, b), (W, b))
        W, b = (W - beta * gW).detach(), (b - beta * gb).detach()
    xr, Wr, br = _req(x, W, b)
    gy = grad(D.g(xr, Wr, br), (Wr, br), create_graph=True)
    r = list(grad(D.f(Wr, br), (Wr, br)))
    v = [torch.zeros_like(t) for t in r]
    p, rr = r, _sq(r)
    for _ in range(K):
        hp = grad(gy, (Wr, br), p, retain_graph=True)
        alpha = rr / _dot(p, hp)
        v = [a + alpha * q for a, q in zip(v, p, strict=True)]
        r = [a - alpha * q for a, q in zip(r, hp, strict=True)]
        rr_new = _sq(r)
        p = [a + (rr_new / rr) * q for a, q in zip(r, p, strict=True)]
        rr = rr_new
    (jv,) = grad(gy, xr, v)
    return x + lr * jv, W, b, v[0], v[1], k + 1


def hand_itd(D, s, W0, b0, lr=0.1, beta=0.1, N=20):
    x, _, _, _, _, k = s
    xr, W, b = _req(x, W0, b0)
    for _ in range(N):
        gW, gb = grad(D.g(xr, W, b), (W, b), create_graph=True)
        W, b = W - beta * gW, b - beta * gb
    (gx,) = grad(D.f(W, b), xr)
    return x - lr * gx, W.detach(), b.detach(), None, None, k + 1


def hand_bagdc(D, s, lr=0.01, beta=0.1, eta=0.1):
    x, W, b, vW, vb, k = s
    W, b = _req(W, b)
    gW, gb = grad(D.g(x, W, b), (W, b))
    W, b = (W - beta * gW).detach(), (b - beta * gb).detach()
    xr, Wr, br = _req(x, W, b)
    gy = grad(D.g(xr, Wr, br), (Wr, br), create_graph=True)
    fW, fb = grad(D.f(Wr, br), (Wr, br))
    hW, hb = grad(gy, (Wr, br), (vW, vb), retain_graph=True)
    vW, vb = vW - eta * (hW - fW), vb - eta * (hb - fb)
    (jv,) = grad(gy, xr, (vW, vb))
    return x + lr * jv, W, b, vW, vb, k + 1


def hand_slbamm(D, s, schedules, beta=0.01, fallback=0.1):
    x, W, b, vW, vb, k = s
    mu_s, alpha_s, _ = schedules
    mu, lr = float(mu_s(k)), float(alpha_s(k))
    W, b = _req(W, b)
    gW, gb = grad((1.0 - mu) * beta * D.g(x, W, b) + mu * beta * D.f(W, b), (W, b))
    W, b = (W - gW).detach(), (b - gb).detach()
    xr, Wr, br = _req(x, W, b)
    f = D.f(Wr, br)
    fW, fb = grad(f, (Wr, br), retain_graph=True)
    gphi = grad(mu * f + (1.0 - mu) * D.g(xr, Wr, br), (Wr, br), create_graph=True)
    hW, hb = grad(gphi, (Wr, br), (vW, vb), retain_graph=True)
    r = (hW - fW, hb - fb)
    hr = grad(gphi, (Wr, br), r, retain_graph=True)
    rhr = _dot(r, hr)
    eta = torch.where(rhr > torch.finfo(rhr.dtype).tiny, _sq(r) / rhr, torch.full_like(rhr, fallback))
    vW, vb = vW - eta * r[0], vb - eta * r[1]
    (jv,) = grad(gphi, xr, (vW, vb))
    return x + lr * jv, W, b, vW, vb, k + 1


def hand_steps(D):
    W0, b0 = torch.zeros(D.C, D.d, dtype=D.dtype, device=D.device), torch.zeros(D.C, dtype=D.dtype, device=D.device)
    schedules = bl.schedules.bamm_schedules(s=0.01, mu0=0.9, p=100.0, tau=0.01, strategy="s1")
    return {
        "GALET": lambda s: hand_galet(D, s),
        "sl-BAMM": lambda s: hand_slbamm(D, s, schedules),
        "BAGDC": lambda s: hand_bagdc(D, s),
        "AID-CG": lambda s: hand_aid_cg(D, s),
        "ITD": lambda s: hand_itd(D, s, W0, b0),
    }


def hand_init(D):
    z = functools.partial(torch.zeros, dtype=D.dtype, device=D.device)
    return (z(D.n), z(D.C, D.d), z(D.C), z(D.C, D.d), z(D.C), 0)


# --------------------------------------------------------------------------- check and timing


def check(names, iters=12, d=30, C=5, n=200, tol=1e-12, device="cpu"):
    """Iterates of library and hand loops equal in float64 after ``iters`` steps."""
    D = Data(d, C, n=n, dtype=torch.float64, device=device)
    problem, lib, hand = D.problem(), library_methods(), hand_steps(D)
    worst = {}
    for name in names:
        state, hs = lib[name].init(problem), hand_init(D)
        for _ in range(iters):
            state, _ = lib[name].step(problem, state)
            hs = hand[name](hs)
        errs = []
        for a, h in ((state.x["weights"], hs[0]), (state.y["W"], hs[1]), (state.y["b"], hs[2])):
            errs.append(float((a - h).abs().max() / h.abs().max().clamp(min=1e-300)))
        worst[name] = max(errs)
        status = "ok" if worst[name] <= tol else "MISMATCH"
        print(f"  check {name:<8} max relative difference {worst[name]:.2e}  {status}", flush=True)
        if worst[name] > tol:
            raise SystemExit(f"{name}: library and hand-written iterates differ ({worst[name]:.3e} > {tol:g})")
    return worst


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_pair(lib_step, hand_step, rounds, block, device="cpu", clock="wall"):
    """Interleaved blocks; returns per-round library and hand times (seconds per step).

    ``clock="cpu"`` measures the process's CPU time instead of the wall clock: on a shared
    machine it leaves out the time the process waits for a core (the runs are single-threaded,
    so CPU time is the work done; on a GPU it would miss the device's time)."""
    now = CLOCKS[clock]
    t_lib, t_hand = [], []
    for i in range(rounds):
        for which in (0, 1) if i % 2 == 0 else (1, 0):
            fn = lib_step if which == 0 else hand_step
            sync(device)
            start = now()
            for _ in range(block):
                fn()
            sync(device)
            (t_lib if which == 0 else t_hand).append((now() - start) / block)
    return t_lib, t_hand


def bench(size, names, rounds, block, device="cpu", clock="wall"):
    d, C = SIZES[size]
    D = Data(d, C, device=device)
    problem, lib, hand = D.problem(), library_methods(), hand_steps(D)
    rows = []
    for name in names:
        method = lib[name]
        state = method.init(problem)
        hs = hand_init(D)
        for _ in range(2):  # move away from zero (products with v = 0 are trivial)
            state, _ = method.step(problem, state)
            hs = hand[name](hs)
        t_lib, t_hand = time_pair(lambda: method.step(problem, state), lambda: hand[name](hs), rounds, block, device, clock)
        ratios = sorted(a / b for a, b in zip(t_lib, t_hand, strict=True))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        row = {
            "size": size,
            "params": d * C + C,
            "method": name,
            "lib_ms": 1e3 * min(t_lib),
            "hand_ms": 1e3 * min(t_hand),
            "ratio_median": statistics.median(ratios),
            "ratio_q1": q[0],
            "ratio_q3": q[2],
            "ratio_min_min": min(t_lib) / min(t_hand),
        }
        rows.append(row)
        print(
            f"{size:>5} {name:<8} {row['lib_ms']:9.3f} {row['hand_ms']:9.3f} {row['ratio_median']:7.3f} "
            f"[{row['ratio_q1']:.3f}, {row['ratio_q3']:.3f}] {row['ratio_min_min']:7.3f}",
            flush=True,
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--methods", nargs="+", default=list(library_methods()))
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 40 / 20 / 6 by size)")
    p.add_argument("--block", type=int, default=None, help="steps per timed block (default 10 / 2 / 1 by size)")
    p.add_argument("--check-iters", type=int, default=12)
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise the device around each block)")
    p.add_argument("--clock", default="wall", choices=list(CLOCKS), help="wall clock, or the process's CPU time (a shared CPU machine)")
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu measures host CPU time: use it with --device cpu")
    torch.set_num_threads(1)
    print(environment(args.device))
    check(args.methods, iters=args.check_iters, device=args.device)
    if args.check_only:
        return
    print(f"{'size':>5} {'method':<8} {'lib ms':>9} {'hand ms':>9} {'median':>7} {'[25%, 75%]':>16} {'min/min':>7}")
    rows = []
    defaults = {"1e3": (40, 10), "1e5": (20, 2), "1e6": (6, 1)}
    for size in args.sizes:
        rounds, block = defaults[size]
        rows += bench(size, args.methods, args.rounds or rounds, args.block or block, args.device, args.clock)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": environment(args.device), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
