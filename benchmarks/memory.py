"""Peak memory: does it grow with iterations (GALET, sl-BAMM, BAGDC) / with the unroll length (ITD)?

Each measurement runs in a fresh subprocess: on CPU the figures are growths of the
process's maximum resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``); on CUDA
of ``torch.cuda.max_memory_allocated``. Two figures per run: ``first`` = the peak of the
first step over the state after the problem is built (ITD: the memory of its unrolled
graph, which grows with T), ``growth`` = the peak of the next ``iters`` steps over the peak
after the first step (must be ~0 for the single-loop methods, whatever ``iters``).

    PYTHONPATH=src python benchmarks/memory.py                  # iterations 10 vs 200, ITD T=10/50/200/1000
    PYTHONPATH=src python benchmarks/memory.py --methods ITD --checkpoint none sqrt   # O(T) vs O(√T)
    PYTHONPATH=src python benchmarks/memory.py --model mlp --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(spec):
    sys.path.insert(0, HERE)
    import resource

    import torch

    import common

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    problem = common.hyperclean_problem(spec["model"], n_train=spec["n"], n_val=spec["n"], device=device)
    method = common.methods(itd_steps=spec["T"])[spec["method"]]
    if spec.get("checkpoint") is not None:
        method = method.replace(checkpoint=spec["checkpoint"])
    state = method.init(problem)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tick = time.perf_counter()
    state, _ = method.step(problem, state)  # first step: allocator pools, lazy init, ITD's unrolled graph
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        first = torch.cuda.max_memory_allocated() - start
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        first = (base - start) * 1024
    step_s = time.perf_counter() - tick
    for _ in range(spec["iters"]):
        state, _info = method.step(problem, state)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    print(json.dumps({"peak_growth_mb": peak / 2**20, "first_step_mb": first / 2**20, "step_s": step_s}))


def run(spec):
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(HERE), "src")},
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", default=None)
    p.add_argument("--model", default="linear", choices=["linear", "mlp"])
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--iters", nargs="+", type=int, default=[10, 200])
    p.add_argument("--unroll", nargs="+", type=int, default=[10, 50, 200, 1000])
    p.add_argument(
        "--checkpoint",
        nargs="+",
        default=["none", "sqrt"],
        help="ITD's gradient checkpointing: none, sqrt or a segment length (one row each)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["GALET", "SlBAMM", "BAGDC", "ITD"])
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))
    sys.path.insert(0, HERE)
    import torch

    import common

    torch.set_num_threads(args.threads)  # as in the children (the environment line says so)
    print(common.environment(args.device))
    what = "max RSS growth" if args.device == "cpu" else "max allocated - allocated at start"
    print(f"peak memory growth after the first step ({what}), hyperclean-{args.model}, n={args.n_train}")
    base = {"model": args.model, "n": args.n_train, "device": args.device, "threads": args.threads, "T": 10}
    print(
        "growth = peak after the first step − peak after it (must not grow with iterations);"
        " first = peak of the first step − before it (ITD: its unrolled graph)"
    )
    for name in [m for m in ["GALET", "SlBAMM", "BAGDC"] if m in args.methods]:
        figures = [run({**base, "method": name, "iters": k}) for k in args.iters]
        print(
            f"{name:<8} "
            + "  ".join(f"{k} iters: growth {f['peak_growth_mb']:7.1f} MB" for k, f in zip(args.iters, figures, strict=True))
            + f"   (first {figures[0]['first_step_mb']:.1f} MB)",
            flush=True,
        )
    if "ITD" in args.methods:
        for checkpoint in args.checkpoint:
            ck = None if checkpoint == "none" else (checkpoint if checkpoint == "sqrt" else int(checkpoint))
            rows = []
            for T in args.unroll:
                start = time.perf_counter()
                figures = run({**base, "method": "ITD", "iters": 2, "T": T, "checkpoint": ck})
                rows.append((T, figures, time.perf_counter() - start))
            print(
                f"ITD checkpoint={checkpoint:<5} "
                + "  ".join(f"T={T}: first {f['first_step_mb']:7.1f} MB ({f['step_s']:.2f} s/step)" for T, f, _ in rows),
                flush=True,
            )


if __name__ == "__main__":
    main()
