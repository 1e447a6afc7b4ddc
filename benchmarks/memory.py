"""Peak memory: does it grow with iterations (GALET, sl-BAMM, BAGDC) / with the unroll length (ITD)?

Each measurement runs in a fresh subprocess: on CPU the figure is the growth of the
process's maximum resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) during
the run, after the problem is built and one warm-up step is done; on CUDA it is
``torch.cuda.max_memory_allocated`` over the run.

    PYTHONPATH=src python benchmarks/memory.py                  # iterations 10 vs 200, ITD T=10/50/200
    PYTHONPATH=src python benchmarks/memory.py --model mlp --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def child(spec):
    sys.path.insert(0, HERE)
    import resource

    import common
    import torch

    import bilevel as bl

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    problem = common.hyperclean_problem(spec["model"], n_train=spec["n"], n_val=spec["n"], device=device)
    method = common.methods(itd_steps=spec["T"])[spec["method"]]
    state = method.init(problem)
    state, _ = method.step(problem, state)  # warm-up: allocator pools, lazy init
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(spec["iters"]):
        state, info = method.step(problem, state)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    print(json.dumps({"peak_growth_mb": peak / 2**20}))


def run(spec):
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(HERE), "src")})
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mb"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", default=None)
    p.add_argument("--model", default="linear", choices=["linear", "mlp"])
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--iters", nargs="+", type=int, default=[10, 200])
    p.add_argument("--unroll", nargs="+", type=int, default=[10, 50, 200])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))
    sys.path.insert(0, HERE)
    import common

    print(common.environment(args.device))
    what = "max RSS growth" if args.device == "cpu" else "max allocated - allocated at start"
    print(f"peak memory growth after the first step ({what}), hyperclean-{args.model}, n={args.n_train}")
    base = {"model": args.model, "n": args.n_train, "device": args.device, "threads": args.threads, "T": 10}
    for name in ["GALET", "SlBAMM", "BAGDC"]:
        figures = [run({**base, "method": name, "iters": k}) for k in args.iters]
        print(f"{name:<8} " + "  ".join(f"{k} iters: {mb:7.1f} MB" for k, mb in zip(args.iters, figures)), flush=True)
    figures = [run({**base, "method": "ITD", "iters": 3, "T": T}) for T in args.unroll]
    print("ITD      " + "  ".join(f"T={T}: {mb:7.1f} MB" for T, mb in zip(args.unroll, figures)), flush=True)


if __name__ == "__main__":
    main()
