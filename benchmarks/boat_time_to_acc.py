"""Time to reach the same test accuracy, ours vs BOAT 1.1.1, on data hyper-cleaning (linear model).

Run with the BOAT virtual environment's python (see benchmarks/README.md):

    PYTHONPATH=src /tmp/boatenv/bin/python benchmarks/boat_time_to_acc.py --threads 1

Data: ``bilevel.data.make_hyperclean_data(--dataset)`` (default ``mnist``: 5000 train with 50 %
corrupted labels, 5000 clean validation, 10000 clean test, 784 features in [0, 1]); falls back to
the random MNIST-sized data of ``boat_compare.py`` with ``--dataset random`` (test accuracy then
means nothing: random labels).

Pairs, hyper-parameters and initialisation are exactly those of ``boat_compare.py``
(``pairs()``, ``boat_config()``, ``make_ll_model()``, ``our_problem()``): BOAT DM+RAD -> sl-BAMM,
NGD+RAD -> ITD (RHG, warm start), NGD+CG -> AID-CG, NGD+NS -> AID-Neumann. Both sides start from
the same zero-initialised linear model and zero weight logits and run ``--iters`` upper iterations,
interleaved iteration by iteration in the same process (so machine load hits both alike).

Only the step is timed (BOAT: ``Problem.run_iter``, which includes its own loss bookkeeping;
ours: ``method.step``); test accuracy of the current lower-level model is evaluated after every
iteration outside the timer. Per repeat, cumulative step time vs accuracy; a target is
frac × min(best accuracy of BOAT, best accuracy of ours) over the run, for each frac of
``--target-frac`` (default 0.95 and 0.99); the time to
target is the cumulative step time at the first iteration whose test accuracy is >= target.
Reported: median and minimum over ``--repeats`` of that time per side, and the ratio of medians
(BOAT/ours > 1: ours reaches it sooner), the median step time of each side, and the largest
difference of the two test-accuracy curves at equal iteration (same iterates: ~0). ``--json PATH`` saves the curves,
``--png PATH`` plots them,
``--from-json PATH`` re-summarises saved curves without running (e.g. with other ``--target-frac``).
``--device cuda`` runs both sides on the GPU (data loaded or drawn on the CPU, then moved; BOAT's
models and ``device`` setting follow), with the device synchronised around each timed step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

import bilevel as bl
import boat_compare as bc
import common  # noqa: F401  (puts src/ on sys.path)
from common import environment, sync

NAMES = {"DM/sl-BAMM": "sl-BAMM ↔ DM", "RAD/ITD": "RHG (ITD) ↔ RAD", "CG/AID-CG": "AID-CG ↔ CG", "NS/AID-Neumann": "AID-Neumann ↔ NS"}


def load(args):
    if args.dataset == "random":
        gen = torch.Generator().manual_seed(0)
        n, d = args.n_train, 784
        X = [torch.randn(n, d, generator=gen) / d**0.5 for _ in range(3)]
        Y = [torch.randint(0, 10, (n,), generator=gen) for _ in range(3)]
        D = X[0], Y[0], X[1], Y[1], X[2], Y[2]
    else:
        data = bl.data.make_hyperclean_data(args.dataset, noise_rate=args.noise, seed=args.seed)
        D = data.x_train, data.y_train_noisy, data.x_val, data.y_val, data.x_test, data.y_test
    return tuple(t.to(args.device) for t in D)


@torch.no_grad()
def accuracy(W, b, X, y):
    return float(((X @ W.T + b).argmax(1) == y).float().mean())


def run_pair(name, spec, args, D):
    Xtr, ytr, Xva, yva, Xte, yte = D
    gm, na, T, dm, method = spec
    n, d = Xtr.shape
    dev = args.device
    ll_model = bc.make_ll_model("linear", d, 10, 0, seed=1, device=dev)
    ul_model = bc.Weights(n).to(dev)
    problem = bc.our_problem("linear", Xtr, ytr, Xva, yva, ll_model)
    state = method.init(problem)
    log_path = os.path.join(tempfile.mkdtemp(), "boat_losses.json")
    cfg = bc.boat_config(gm, na, ll_model, ul_model, args.lr_lower, args.lr_upper, T, args.solver_steps, dm, log_path, device=dev)
    bp = bc.boat_problem(cfg)
    ll_feed, ul_feed = {"data": Xtr, "target": ytr}, {"data": Xva, "target": yva}
    curves = {
        "boat": [(0.0, accuracy(ll_model.weight, ll_model.bias, Xte, yte))],
        "ours": [(0.0, accuracy(state.y["weight"], state.y["bias"], Xte, yte))],
    }
    tb = to = 0.0
    for k in range(args.iters):
        sync(dev)
        start = time.perf_counter()
        bp.run_iter(ll_feed, ul_feed, current_iter=k)
        sync(dev)
        tb += time.perf_counter() - start
        start = time.perf_counter()
        state, _ = method.step(problem, state)
        sync(dev)
        to += time.perf_counter() - start
        curves["boat"].append((tb, accuracy(ll_model.weight.detach(), ll_model.bias.detach(), Xte, yte)))
        curves["ours"].append((to, accuracy(state.y["weight"], state.y["bias"], Xte, yte)))
    return curves


def time_to(curve, target):
    for i, (t, acc) in enumerate(curve):
        if acc >= target:
            return t, i
    return float("nan"), -1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="mnist, mnist5k, fashion_mnist, digits or random")
    p.add_argument("--noise", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=5000, help="only for --dataset random")
    p.add_argument("--lower-steps", type=int, default=10)
    p.add_argument("--solver-steps", type=int, default=10)
    p.add_argument("--lr-lower", type=float, default=0.1)
    p.add_argument("--lr-upper", type=float, default=100.0)
    p.add_argument("--eta0", type=float, default=1.0)
    p.add_argument("--tau", type=float, default=0.1)
    # boat_compare.pairs() reads these for its first-order pairs (VFO, PGDO, MESO); same defaults
    p.add_argument("--lr-shadow", type=float, default=0.1, help=argparse.SUPPRESS)
    p.add_argument("--u1", type=float, default=0.1, help=argparse.SUPPRESS)
    p.add_argument("--gamma", type=float, default=0.3, help=argparse.SUPPRESS)
    p.add_argument("--gamma-1", type=float, default=1e-3, help=argparse.SUPPRESS)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--target-frac", type=float, nargs="+", default=[0.95, 0.99])
    p.add_argument("--from-json", default=None, help="re-summarise the curves saved by --json (no run)")
    p.add_argument("--pairs", nargs="+", default=["DM/sl-BAMM", "RAD/ITD", "CG/AID-CG", "NS/AID-Neumann"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (both sides; timings synchronise the device)")
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    print(environment(args.device), "| boat-torch 1.1.1 | load", os.getloadavg())
    D = load(args)
    print(
        f"hyper-cleaning linear, {args.dataset} (noise {args.noise}), n_train={D[0].shape[0]}, "
        f"n_val={D[2].shape[0]}, n_test={D[4].shape[0]}; T={args.lower_steps}, K={args.solver_steps}, "
        f"β={args.lr_lower}, α={args.lr_upper}; {args.iters} iterations × {args.repeats} repeats; "
        f"target = frac × min(best BOAT, best ours)"
    )
    header = (
        f"{'pair':<15} {'frac':>5} {'best BOAT':>9} {'best ours':>9} {'target':>7} {'it B':>5} {'it O':>5} "
        f"{'BOAT s (med/min)':>17} {'ours s (med/min)':>17} {'BOAT/ours':>9} {'ms/it B':>8} {'ms/it O':>8} {'max|Δacc|':>8}"
    )
    print(header)
    specs = bc.pairs(args)
    if args.from_json:
        with open(args.from_json) as f:
            runs_by_pair = {k: v["curves"] for k, v in json.load(f)["results"].items()}
    else:
        runs_by_pair = {}
    out = {}
    for name in args.pairs:
        runs = runs_by_pair.get(name) or [run_pair(name, specs[name], args, D) for _ in range(args.repeats)]
        best_b = max(a for r in runs for _, a in r["boat"])
        best_o = max(a for r in runs for _, a in r["ours"])
        itb = statistics.median(statistics.median(r["boat"][i][0] - r["boat"][i - 1][0] for i in range(1, len(r["boat"]))) for r in runs)
        ito = statistics.median(statistics.median(r["ours"][i][0] - r["ours"][i - 1][0] for i in range(1, len(r["ours"]))) for r in runs)
        dacc = max(abs(a[1] - b[1]) for r in runs for a, b in zip(r["boat"], r["ours"], strict=True))
        out[name] = {"max_abs_acc_diff": dacc, "best_boat": best_b, "best_ours": best_o, "curves": runs, "targets": {}}
        for frac in args.target_frac:
            target = frac * min(best_b, best_o)
            tb = [time_to(r["boat"], target) for r in runs]
            to = [time_to(r["ours"], target) for r in runs]
            mb, mo = statistics.median(t for t, _ in tb), statistics.median(t for t, _ in to)
            nb, no = min(t for t, _ in tb), min(t for t, _ in to)
            print(
                f"{name:<15} {frac:5.2f} {best_b:9.4f} {best_o:9.4f} {target:7.4f} {tb[0][1]:5d} {to[0][1]:5d} "
                f"{mb:8.2f}/{nb:8.2f} {mo:8.2f}/{no:8.2f} {mb / mo:9.2f} {itb * 1e3:8.1f} {ito * 1e3:8.1f} {dacc:8.1e}",
                flush=True,
            )
            out[name]["targets"][frac] = {
                "target": target,
                "time_to_target_boat": [t for t, _ in tb],
                "time_to_target_ours": [t for t, _ in to],
                "iter_to_target_boat": [i for _, i in tb],
                "iter_to_target_ours": [i for _, i in to],
            }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": out}, f)
    if args.png:
        plot(out, args.png)


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(out), figsize=(3.2 * len(out), 2.8), squeeze=False)
    for ax, (name, r) in zip(axes[0], out.items(), strict=False):
        for side, color in (("boat", "tab:orange"), ("ours", "tab:blue")):
            # the repeat with the median time to target
            first = next(iter(r["targets"].values()))
            times = first[f"time_to_target_{side}"]
            idx = sorted(range(len(times)), key=lambda i: times[i])[len(times) // 2]
            t, a = zip(*r["curves"][idx][side], strict=True)
            ax.plot(t, a, color=color, label="BOAT" if side == "boat" else "ours", lw=1.2)
        for tg in r["targets"].values():
            ax.axhline(tg["target"], color="gray", ls="--", lw=0.8)
        ax.set_ylim(min(tg["target"] for tg in r["targets"].values()) - 0.15, max(r["best_boat"], r["best_ours"]) + 0.02)
        ax.set_title(NAMES.get(name, name), fontsize=9)
        ax.set_xlabel("step time (s)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("test accuracy", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
