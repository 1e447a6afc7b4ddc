"""Side by side with the authors' code on their own toys: BOME, V-PBGD and IAPTT-GM.

The official repositories are read from ``--refs`` (one folder each, at the commits named
below), never copied into this project; their toy functions run unchanged in this process
(the BOME toy's module-level experiment loop and the IAPTT toy's ``main()`` are not run —
only the functions they call, with the same settings). Run with a python that has
``higher``, ``scipy``, ``pyyaml`` and ``matplotlib`` (the BOAT venv of benchmarks/README.md has them)::

    git --git-dir=<mirror of Cranial-XIX/BOME> show 24e27a3:toy/toy_convergence.py > /tmp/refs/BOME/toy/toy_convergence.py
    git --git-dir=<mirror of hanshen95/penalized-bilevel-gradient-descent> archive d105496 | tar -x -C /tmp/refs/PBGD
    git --git-dir=<mirror of vis-opt-group/IAPTT-GM> archive 22c239a | tar -x -C /tmp/refs/IAPTT-GM
    PYTHONPATH=src /tmp/boatenv/bin/python benchmarks/reference_compare.py --refs /tmp/refs

Pairs (same problem, same start, same hyper-parameters, same dtype as the official code):

* BOME ``toy/toy_convergence.py::bilevel_descent_bome`` (coreset toy, T = 10, steps 0.05,
  η = 0.5, their ε = 1e-4, 5000 iterations from (0, 3)) against ``bl.BOME(phi="gradient",
  eps=1e-4)``: largest difference of the iterates over the run, in float64 (agreement to
  rounding) and float32 (the toy's dtype: where ∇q̂ ≈ 0 the division by ‖∇q̂‖² + ε amplifies
  rounding, so two float32 runs of the same update differ by 1e-2 after the first such spike).
* V-PBGD ``V-PBGD/toy/toy.py::solveF`` (float64 numpy, γ = 10, step 0.1/γ on f + γg, X = [0, 3],
  stopped at ‖projected gradient‖ ≤ 1e-5, random starts) against ``bl.PBGD(variant="value",
  gamma=10, lr=0.1)`` (normalised: the same step) stopped after the same number of steps. The
  toy uses g* ≡ 0 where ours estimates it with the shadow ω (100 warm steps, so ω = −x to
  1e-10). Quirk: the toy's hand-written ∂f/∂x has a wrong denominator; the pair runs our
  method on an f whose gradient is that formula (same iterates), and reports how far the
  correct gradient moves the end points.
* IAPTT-GM ``experiment/Numerical.py`` (float32, K = 40, s = 5e-4, α = s_z = 0.1, x ∈ [1, 10],
  y ∈ [−2, 2], 500 iterations, its CSV log) against ``bl.IAPTTGM(code_history=True)`` (the
  code's clamp makes ``higher`` record two entries per step, so it differentiates y_{⌈k̃/2⌉};
  the option reproduces that), and the paper's selection (``code_history=False``).

``--device cuda`` runs our side on the GPU (its data and starts built on the CPU, then moved;
iterates brought back to the CPU for the comparison); the official code always runs on the
CPU, as written.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import bilevel as bl
import common  # noqa: F401
from common import environment, sync


# ----------------------------------------------------------------------------- BOME toy
def _load_bome_toy(refs: Path) -> types.ModuleType:
    """The functions and data of toy_convergence.py (its experiment loop, after the data, is cut)."""
    source = (refs / "BOME" / "toy" / "toy_convergence.py").read_text()
    source = source[: source.index('if not os.path.exists("./imgs")')]
    module = types.ModuleType("bome_toy")
    exec(compile(source, "toy_convergence.py", "exec"), module.__dict__)
    return module


def bome_pair(refs: Path, iters: int, dtype: torch.dtype, device="cpu") -> dict:
    torch.set_default_dtype(dtype)  # the toy's variables follow it (its two data tensors are float32 integers)
    toy = _load_bome_toy(refs)
    x0 = torch.tensor([0.0, 3.0])
    lr, T, eta = toy.x_lr, toy.k, 0.5
    toy.x.data, toy.w.data = x0.clone(), toy.w_data.clone()  # as its experiment loop sets them
    start = time.perf_counter()
    official = toy.bilevel_descent_bome(toy.x, toy.w, toy.x_lr, toy.w_lr, toy.xhat_lr, T, iters, eta)
    official_time = time.perf_counter() - start
    points, target = toy.xcts.clone().to(device, dtype), toy.xcts0.clone().to(device, dtype)  # the authors' x is our y, their w our x

    def upper(x, y, batch):
        return 0.1 * (y["y"] - target).pow(2).sum()

    def lower(x, y, batch):
        return ((F.softmax(x["w"], dim=0).view(-1, 1) * points).sum(0) - y["y"]).pow(2).sum()

    problem = bl.Problem(upper=upper, lower=lower)
    method = bl.BOME(lr_upper=lr, lr_lower=lr, lr_shadow=toy.xhat_lr, shadow_steps=T, eta=eta, phi="gradient", eps=1e-4)
    state = method.init(problem, {"w": torch.zeros(4, device=device)}, {"y": x0.clone().to(device)})
    dx = dy = 0.0
    sync(device)
    start = time.perf_counter()
    for k in range(iters):
        state, _ = method.step(problem, state)
        dy = max(dy, float((state.y["y"].view(-1).cpu() - official["x"][k + 1]).abs().max()))
        dx = max(dx, float((state.x["w"].cpu() - official["w"][k + 1]).abs().max()))
    ours_time = time.perf_counter() - start
    torch.set_default_dtype(torch.float32)
    return {
        "pair": f"BOME toy / bl.BOME ({str(dtype).split('.')[-1]})",
        "iterations": iters,
        "max |Δx|": dx,
        "max |Δy|": dy,
        "end (official)": f"y = {official['x'][-1].numpy().round(4).tolist()}, f = {official['f'][-1].item():.5f}",
        "end (ours)": f"y = {state.y['y'].view(-1).cpu().numpy().round(4).tolist()}, f = {upper(None, state.y, None).item():.5f}",
        "time official / ours (s)": f"{official_time:.2f} / {ours_time:.2f}",
    }


# ----------------------------------------------------------------------------- V-PBGD toy
class _CodeGradient(torch.autograd.Function):
    """f of the V-PBGD toy with the gradient its code writes by hand (∂f/∂x has (1 + e^{2(2−4x)})
    where (1 + e^{2−4x})² belongs): to check iterates against the code."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return (torch.cos(4 * y + 2) / (1 + torch.exp(2 - 4 * x)) + 0.5 * torch.log((4 * x - 2) ** 2 + 1)).sum()

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        e = torch.exp(2 - 4 * x)
        dx = 4 * e * torch.cos(4 * y + 2) / (1 + e**2) + (16 * x - 8) / ((4 * x - 2) ** 2 + 1)
        dy = -4 * torch.sin(4 * y + 2) / (1 + e)
        return grad * dx, grad * dy


def _t3_problem(code_gradient: bool) -> bl.Problem:
    def upper(x, y, batch):
        if code_gradient:
            return _CodeGradient.apply(x["x"], y["y"])
        xv, yv = x["x"], y["y"]
        return (torch.cos(4 * yv + 2) / (1 + torch.exp(2 - 4 * xv)) + 0.5 * torch.log((4 * xv - 2) ** 2 + 1)).sum()

    def lower(x, y, batch):
        u = x["x"] + y["y"]
        return (u * u + x["x"] * torch.sin(u) ** 2).sum()

    return bl.Problem(upper=upper, lower=lower)


def pbgd_pair(refs: Path, starts: int, seed: int, device="cpu") -> dict:
    sys.path.insert(0, str(refs / "PBGD" / "V-PBGD" / "toy"))
    import toy as pbgd_toy  # the authors' module: g, dg, f, df, box, solveF

    sys.path.pop(0)
    pbgd_toy.xlim = [0, 3.0]  # set in its __main__ block
    gamma, alpha0, eps = 10.0, 0.1, 1e-5
    rng = np.random.default_rng(seed)
    x0s, y0s = rng.uniform(0, 3.5, starts), rng.uniform(-5, 8.5, starts)
    ends, counts = [], []
    start = time.perf_counter()
    for x0, y0 in zip(x0s, y0s, strict=True):
        (x, y, k), _ = pbgd_toy.solveF(x0, y0, alpha0 / gamma, gamma, eps)
        ends.append((x, y))
        counts.append(k)
    official_time = time.perf_counter() - start
    ends = np.array(ends)
    kw = {"dtype": torch.float64, "device": device}
    results = {}
    for code_gradient in (True, False):
        problem = _t3_problem(code_gradient)
        # the code's first step is taken before its loop: iterate k is the one it returns
        x, y = {"x": torch.tensor(np.clip(x0s, 0, 3), **kw)}, {"y": torch.tensor(y0s, **kw)}
        method = bl.PBGD(
            variant="value",
            gamma=gamma,
            lr_upper=alpha0,
            lr_lower=alpha0,
            lr_shadow=0.1,
            shadow_steps=100,
            project_x=bl.Box(0.0, 3.0),
        )
        state = method.init(problem, {"x": torch.tensor(x0s, **kw)}, y)
        state = state.replace(extra={**state.extra, "lower": bl.parts.ShadowState(z={"y": -x["x"].clone()})})  # ω₀ = y*(x₀)
        mine = np.zeros_like(ends)
        begin = time.perf_counter()
        for k in range(max(counts) + 1):
            for i in np.flatnonzero(np.array(counts) == k):
                mine[i] = (state.x["x"][i].item(), state.y["y"][i].item())
            state, _ = method.step(problem, state)
        sync(device)
        results[code_gradient] = (mine, time.perf_counter() - begin)
    same, same_time = results[True]
    correct, _ = results[False]
    return {
        "pair": "V-PBGD toy / bl.PBGD(value)",
        "iterations": f"{min(counts)}-{max(counts)} ({starts} starts)",
        "max |Δx|": float(np.abs(same[:, 0] - ends[:, 0]).max()),
        "max |Δy|": float(np.abs(same[:, 1] - ends[:, 1]).max()),
        "end (official)": f"x in {np.round(np.sort(ends[:, 0]), 3).tolist()[:4]}…, max |x + y| = {np.abs(ends.sum(1)).max():.2e}",
        "end (ours)": f"correct ∂f/∂x moves the ends by up to {np.abs(correct[:, 0] - ends[:, 0]).max():.2e} in x",
        "time official / ours (s)": f"{official_time:.2f} / {same_time:.2f}",
    }


# ----------------------------------------------------------------------------- IAPTT-GM toy
def iaptt_pair(refs: Path, iters: int, device="cpu") -> dict:
    path = refs / "IAPTT-GM" / "experiment" / "Numerical.py"
    workdir = tempfile.mkdtemp()
    argv, cwd = sys.argv, os.getcwd()
    sys.argv = ["Numerical.py", "--outer_loop", str(iters), "--Notes", "compare"]
    os.chdir(workdir)
    try:
        module = types.ModuleType("iaptt_numerical")
        module.__dict__["__file__"] = str(path)
        exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
        start = time.perf_counter()
        module.main()
        official_time = time.perf_counter() - start
        log = next(Path(workdir).glob("*.csv"))
        rows = list(csv.reader(log.open()))[1:]
    finally:
        sys.argv = argv
        os.chdir(cwd)
        torch.set_default_dtype(torch.float32)
    number = lambda text: float(text.strip("[]").split()[0])
    official_x = [number(r[11]) for r in rows]  # x after the step (and its clamp)
    official_z = [number(r[12]) for r in rows]
    official_sel = [int(r[8]) + 1 for r in rows]

    def upper(x, y, batch):
        return (x["x"] + x["x"] * y["y"]).sum()

    def lower(x, y, batch):
        return (-torch.sin(x["x"] * y["y"])).sum()

    problem = bl.Problem(upper=upper, lower=lower)
    out = {}
    for code_history in (True, False):
        method = bl.IAPTTGM(
            lr_upper=0.1,
            lr_lower=5e-4,
            lower_steps=40,
            lr_init=0.1,
            project_x=bl.Box(1.0, 10.0),
            project_y=bl.Box(-2.0, 2.0),
            code_history=code_history,
        )
        state = method.init(problem, {"x": torch.ones(1, device=device)}, {"y": torch.full((1,), 2.0, device=device)})
        xs, zs, sel = [], [], []
        begin = time.perf_counter()
        for _ in range(iters):
            state, info = method.step(problem, state)
            xs.append(state.x["x"].item())
            zs.append(state.extra["unroll"].z["y"].item())
            sel.append(int(info["selected_step"]))
        out[code_history] = (np.array(xs), np.array(zs), sel, time.perf_counter() - begin)
    xs, zs, sel, ours_time = out[True]
    paper_x = out[False][0]
    agree = sum(a == b for a, b in zip(sel, official_sel, strict=True))
    return {
        "pair": "IAPTT-GM toy / bl.IAPTTGM(code_history=True)",
        "iterations": iters,
        "max |Δx|": float(np.abs(xs - np.array(official_x)).max()),
        "max |Δy|": float(np.abs(zs - np.array(official_z)).max()),
        "end (official)": f"x = {official_x[-1]:.4f}, z = {official_z[-1]:.3f}, k̃ equal in {agree}/{iters}",
        "end (ours)": f"x = {xs[-1]:.4f}; paper's selection: x = {paper_x[-1]:.4f} (11π/4 = {11 * math.pi / 4:.4f})",
        "time official / ours (s)": f"{official_time:.2f} / {ours_time:.2f}",
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refs", type=Path, default=Path("/tmp/refs"), help="folder with BOME/, PBGD/, IAPTT-GM/")
    parser.add_argument("--bome-iters", type=int, default=5000)
    parser.add_argument("--pbgd-starts", type=int, default=20)
    parser.add_argument("--iaptt-iters", type=int, default=500)
    parser.add_argument("--pairs", nargs="+", default=["bome", "pbgd", "iaptt"], choices=["bome", "pbgd", "iaptt"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: our side only (the official code runs on the CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(args.device)
    print(env if args.device == "cpu" else f"{env} (ours; the official code on the CPU)")
    rows = []
    if "bome" in args.pairs:
        # float64 first: the iterates agree to rounding; in float32 the division by ‖∇q̂‖² + 1e-4 where
        # ∇q̂ ≈ 0 (iteration ~50, λ jumps to ~23) amplifies rounding differences to 1e-2 on both sides
        rows.append(bome_pair(args.refs, args.bome_iters, torch.float64, args.device))
        rows.append(bome_pair(args.refs, args.bome_iters, torch.float32, args.device))
    if "pbgd" in args.pairs:
        rows.append(pbgd_pair(args.refs, args.pbgd_starts, seed=0, device=args.device))
    if "iaptt" in args.pairs:
        rows.append(iaptt_pair(args.refs, args.iaptt_iters, device=args.device))
    for row in rows:
        print()
        for key, value in row.items():
            print(f"  {key:<26} {value if not isinstance(value, float) else f'{value:.2e}'}")


if __name__ == "__main__":
    main()
