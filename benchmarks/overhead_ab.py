"""A/B in one process: the per-call overhead changes of docs/performance.md §6 on vs off.

    PYTHONPATH=src python benchmarks/overhead_ab.py [d]        # logistic problem, d = 100 by default
    PYTHONPATH=src python benchmarks/overhead_ab.py 100 --device cuda

"old" patches the previous versions back in (``tree._flat_kind`` with ``all(<generator>)``,
``tree.tree_map`` always through pytree, ``linsolve._safe_divide`` with ``finfo``/``zeros_like``,
``projected_direction_sq`` recomputing ‖d‖², ``tree.leaves_like`` always through ``_align_keys``); the two variants alternate 30 times
and each
figure is the minimum over rounds of the mean of 5 steps (robust to a shared machine).
``--device cuda``: the problem's data are drawn on the CPU and moved; the device is
synchronised around each timed block.
"""

import argparse
import time

import torch
from torch.utils import _pytree as pytree

import bilevel.linsolve as ls
import bilevel.tree as bt
import common
from bilevel.methods.base import Assembled as Method  # projected_direction_sq lives on the assembled base

torch.set_num_threads(1)
new = dict(fk=bt._flat_kind, tm=bt.tree_map, sd=ls._safe_divide, pd=Method.projected_direction_sq, ll=bt.leaves_like)


def old_fk(tree):
    if isinstance(tree, torch.Tensor):
        return 1
    if type(tree) is dict and all(isinstance(t, torch.Tensor) for t in tree.values()):
        return 2
    return 0


def old_tm(fn, tree, *rest):
    return pytree.tree_map(fn, tree, *rest)


def old_ll(tree, like):
    return bt.leaves(bt._align_keys(tree, like))


def old_sd(num, den):
    tiny = torch.finfo(den.dtype).tiny
    return torch.where(den > tiny, num / torch.clamp(den, min=tiny), torch.zeros_like(num))


def old_pd(self, x, direction, direction_sq=None):
    return new["pd"](self, x, direction)


def setmode(old):
    bt._flat_kind = old_fk if old else new["fk"]
    bt.tree_map = old_tm if old else new["tm"]
    ls._safe_divide = old_sd if old else new["sd"]
    Method.projected_direction_sq = old_pd if old else new["pd"]
    bt.leaves_like = old_ll if old else new["ll"]


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("d", type=int, nargs="?", default=100, help="dimension of the logistic problem")
parser.add_argument("--device", default="cpu", help="cpu or cuda")
args = parser.parse_args()
dev = args.device
prob = common.logistic_problem(args.d, device=dev)
print(common.environment(dev))
print(f"{'method':<12} {'old ms':>8} {'new ms':>8} {'saved':>6}")
for name, m in common.methods().items():
    s = m.init(prob)
    best = {True: 1e9, False: 1e9}
    for _ in range(30):
        for old in (True, False):
            setmode(old)
            for _ in range(2):
                m.step(prob, s)
            common.sync(dev)
            t0 = time.perf_counter()
            for _ in range(5):
                m.step(prob, s)
            common.sync(dev)
            best[old] = min(best[old], (time.perf_counter() - t0) / 5)
    setmode(False)
    print(f"{name:<12} {best[True] * 1e3:8.3f} {best[False] * 1e3:8.3f} {100 * (1 - best[False] / best[True]):5.1f}%")
