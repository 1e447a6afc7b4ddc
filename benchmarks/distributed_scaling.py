"""Data-parallel scaling: time and memory per iteration on 1 and 2 processes, and the bytes
each process communicates per iteration.

Hyper-cleaning (``bilevel.problems.hyperclean_problem`` on random MNIST-sized data, which
``solve`` splits between the processes by itself), the methods of ``common.methods``. Each
process count runs in fresh processes (``torch.multiprocessing``, gloo on 127.0.0.1, one
thread each); rank 0 reports the step time per iteration (``Result.wall_time`` over the
timed iterations, after 2 warm-up iterations), every rank its peak resident memory
(``ru_maxrss``), and rank 0 the ``all_reduce`` calls and bytes per iteration
(``bilevel.distributed.traffic``). A ring all-reduce of b bytes sends about 2 b (P − 1)/P
bytes per process: that, not this machine's loopback, sets the cost on a cluster.

    PYTHONPATH=src python benchmarks/distributed_scaling.py
    PYTHONPATH=src python benchmarks/distributed_scaling.py --model mlp --n-train 8000 --nprocs 1 2 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))


def _problem(model, n, features, device):
    import torch

    from bilevel.data import hyperclean_from_arrays
    from bilevel.problems.hyperclean import hyperclean_problem

    g = torch.Generator().manual_seed(0)
    images = torch.rand(3 * n, features, generator=g)
    labels = torch.randint(0, 10, (3 * n,), generator=g)
    data = hyperclean_from_arrays(
        images.numpy(), labels.numpy(), num_classes=10, max_pixel=features**0.5, name="random", n_train=n, n_val=n, n_test=n
    ).to(device)
    return hyperclean_problem(data, model=model, hidden=300)


def worker(rank, world, port, spec, out_dir):
    sys.path.insert(0, HERE)
    import torch
    import torch.distributed as dist

    import bilevel as bl
    import common
    from bilevel.distributed import traffic

    torch.set_num_threads(1)
    if world > 1:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
        )
    problem = _problem(spec["model"], spec["n"], spec["features"], spec["device"])
    method = common.methods(itd_steps=spec["T"])[spec["method"]]
    warm = bl.solve(problem, method, max_iters=2, log_every=2)
    traffic(reset=True)
    result = bl.solve(problem, method, max_iters=2 + spec["iters"], resume=_payload(warm), log_every=spec["iters"])
    sent = traffic()
    iters = spec["iters"]
    report = {
        "s_per_iter": (result.wall_time - warm.wall_time) / iters,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "all_reduces_per_iter": sent["all_reduces"] / iters,
        "bytes_per_iter": sent["bytes"] / iters,
        "upper_loss": result.final["upper_loss"],
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    if world > 1:
        dist.destroy_process_group()


def _payload(result):
    """A resume payload from a finished result (no file: the same state, history and RNG)."""
    from bilevel.checkpoint import capture_rng

    return {"state": result.state, "history": result.history, "rng": capture_rng(), "meta": {"wall_time": result.wall_time}}


def run(world, spec):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=worker, args=(r, world, port, spec, out)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(1800)
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a worker failed (exit codes {[p.exitcode for p in procs]})")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (gloo); CUDA tensors need one GPU per process and nccl: not this script")
    p.add_argument("--model", default="linear", choices=["linear", "mlp"])
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--features", type=int, default=784)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--nprocs", nargs="+", type=int, default=[1, 2])
    p.add_argument("--methods", nargs="+", default=["GALET", "AID-CG", "ITD"])
    p.add_argument("--itd-steps", type=int, default=10)
    args = p.parse_args()
    if args.device != "cpu":
        p.error("--device: this script measures gloo processes on CPU; on GPUs run bilevel under torchrun with nccl")
    sys.path.insert(0, HERE)
    import common

    print(common.environment("cpu"), f"| cores {os.cpu_count()}, 1 thread per process")
    print(f"hyperclean-{args.model}, n_train = n_val = {args.n_train} (split between the processes), {args.iters} timed iterations")
    print(f"{'method':<8} {'P':>2} {'s/iter':>8} {'speed-up':>8} {'max RSS MB/proc':>15} {'all_reduce/iter':>15} {'bytes/iter/proc':>16}")
    for name in args.methods:
        base = None
        for world in args.nprocs:
            spec = {"model": args.model, "n": args.n_train, "features": args.features, "device": args.device}
            spec.update(method=name, iters=args.iters, T=args.itd_steps)
            start = time.perf_counter()
            reports = run(world, spec)
            r0 = reports[0]
            base = base or r0["s_per_iter"]
            rss = max(r["maxrss_mb"] for r in reports)
            print(
                f"{name:<8} {world:>2} {r0['s_per_iter']:8.4f} {base / r0['s_per_iter']:8.2f} {rss:15.0f} "
                f"{r0['all_reduces_per_iter']:15.0f} {r0['bytes_per_iter']:16,.0f}   (loss {r0['upper_loss']:.6f}, "
                f"{time.perf_counter() - start:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
