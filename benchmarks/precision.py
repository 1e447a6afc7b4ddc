"""Mixed precision: time per iteration and activation memory, float32 vs bfloat16 and float16 autocast.

Hyper-cleaning (``common.hyperclean_problem``, random MNIST-sized data), the methods of
``common.methods``. Per method and precision: the time of one upper iteration (minimum over
repeats), the bytes autograd saves for the backward passes during one iteration (activation
memory: every tensor packed by ``torch.autograd.graph.saved_tensors_hooks``), on CUDA the
peak allocated memory of one iteration, and the upper loss after ``--iters`` iterations
(the precisions' losses should agree to about 1e-2). float16 runs with dynamic loss scaling
(``bilevel.precision.LossScaled``); its timed step starts from the first state (of the first
five) whose step needs no retry, once the loss scale has settled. It is refused for ITD
(back-propagation through the lower steps, which the scaling cannot reach), whose fp16 row is
skipped. On a CPU float16 products are emulated: the fp16 rows there measure correctness and
memory, not speed.

    PYTHONPATH=src python benchmarks/precision.py --threads 1
    PYTHONPATH=src python benchmarks/precision.py --threads 1 --precisions float32 fp16
    PYTHONPATH=src python benchmarks/precision.py --device cuda --model mlp
"""

from __future__ import annotations

import argparse

import torch

import bilevel as bl
import common
from bilevel.precision import Autocast


def saved_bytes(method, problem, state):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        method.step(problem, state)
    return total[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="mlp", choices=["linear", "mlp"])
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=["GALET", "AID-CG", "ITD"])
    p.add_argument("--precisions", nargs="+", default=["float32", "bf16", "fp16"], choices=["float32", "bf16", "fp16"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(common.environment(args.device))
    problem = common.hyperclean_problem(args.model, n_train=args.n_train, n_val=args.n_train, device=args.device)
    print(f"hyperclean-{args.model}, n_train = n_val = {args.n_train}; time: min over {args.repeats} iterations")
    print(f"{'method':<8} {'precision':<9} {'s/iter':>8} {'saved MB':>9} {'peak MB':>8} {'upper loss':>11}")
    casts = {"float32": None, "bf16": Autocast(torch.bfloat16), "fp16": Autocast(torch.float16)}
    for name in args.methods:
        plain = common.methods(itd_steps=20)[name]
        for label in args.precisions:
            cast = casts[label]
            prob = problem if cast is None else cast.problem(problem)
            try:
                method = plain if cast is None else cast.method(plain)
            except ValueError as err:  # float16 for a method its loss scaling cannot reach
                print(f"{name:<8} {label:<9} skipped: {err}", flush=True)
                continue
            state = method.init(prob)
            if label == "fp16":  # time a step at the settled loss scale, not the retries that settle it
                for _ in range(5):
                    after, info = method.step(prob, state)
                    if float(info["loss_scale_skipped"]) == 0:
                        break
                    state = after
            step = lambda st=state, m=method, pr=prob: m.step(pr, st)
            seconds = common.timeit(step, repeats=args.repeats, warmup=1, device=args.device)
            saved = saved_bytes(method, prob, state) / 2**20
            peak = float("nan")
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                method.step(prob, state)
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            result = bl.solve(prob, method, max_iters=args.iters)
            scale = f"  loss scale {result.final['loss_scale']:g}" if "loss_scale" in result.final else ""
            print(f"{name:<8} {label:<9} {seconds:8.4f} {saved:9.1f} {peak:8.1f} {result.final['upper_loss']:11.5f}{scale}", flush=True)


if __name__ == "__main__":
    main()
