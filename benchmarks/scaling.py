"""Scaling: time per iteration vs lower-level size, and vs tasks in a meta-batch.

    PYTHONPATH=src python benchmarks/scaling.py size                 # AID-CG & GALET, MLP width sweep
    PYTHONPATH=src python benchmarks/scaling.py size --widths 1 10 100 1000 13000 --n-train 200
    PYTHONPATH=src python benchmarks/scaling.py tasks                # few-shot heads: loop vs vmap vs bmm

``size``: hyper-cleaning with a 784→h(sigmoid)→10 lower model, h swept, so the lower level
has 795 h + 10 parameters (h = 1 … 13000 gives 10³ … 10⁷). One BAGDC and one AID-CG step.

``tasks``: the inner problem of few-shot meta-learning with a shared feature extractor and
per-task linear heads (B tasks, 5-way, 25 support examples, 64 features): the
hypergradient of one step of the per-task AID computation (linearize, CG(5), mixed product)
for all tasks by (a) a Python loop over tasks, (b) ``torch.func.vmap`` of the per-task
functional computation, (c) batched matmuls written by hand (closed-form head Hessian).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

import bilevel as bl
import common  # noqa: F401
from common import add_common_args, apply_common_args, environment, hyperclean_problem, timeit


def size_sweep(args, dtype):
    print(f"{'hidden':>7} {'params':>10} {'BAGDC ms':>10} {'AID-CG ms':>10}")
    for h in args.widths:
        problem = hyperclean_problem("mlp", n_train=args.n_train, n_val=args.n_train, hidden=h, device=args.device, dtype=dtype)
        n_params = sum(t.numel() for t in problem.y_init.values())
        row = []
        for method in (
            bl.BAGDC(lr_upper=0.01, lr_lower=0.1, lr_dual=0.1, stability_check="off"),
            bl.AID(lr_upper=0.1, lr_lower=0.1, lower_steps=10, solver=bl.CG(steps=10)),
        ):
            state = method.init(problem)
            row.append(timeit(lambda: method.step(problem, state), args.repeats, warmup=1, device=args.device))
        print(f"{h:7d} {n_params:10d} {row[0] * 1e3:10.2f} {row[1] * 1e3:10.2f}", flush=True)


def task_sweep(args, dtype):
    ways, shots, feats, cg_steps, lam = 5, 5, 64, 5, 0.1
    dev = args.device

    def lower(W, phi, labels):  # per-task ridge-regularised CE of a linear head on shared features
        return F.cross_entropy(phi @ W, labels) + 0.5 * lam * (W**2).sum()

    def upper(W, phi, labels):
        return F.cross_entropy(phi @ W, labels)

    def per_task(P, W, Xs, ys, Xq, yq):
        """∂/∂P of the AID hypergradient for one task: features phi = tanh(X P)."""
        phi_s, phi_q = torch.tanh(Xs @ P), torch.tanh(Xq @ P)
        gW = grad(upper)(W, phi_q, yq)
        gP_f = grad(lambda PP: upper(W, torch.tanh(Xq @ PP), yq))(P)
        hvp = lambda v: jvp(lambda WW: grad(lower)(WW, phi_s, ys), (W,), (v,))[1]
        v = torch.zeros_like(gW)
        r = gW
        p = r
        rr = (r * r).sum()
        for _ in range(cg_steps):
            hp = hvp(p)
            a = rr / (p * hp).sum()
            v, r = v + a * p, r - a * hp
            rr_new = (r * r).sum()
            p, rr = r + (rr_new / rr) * p, rr_new
        mixed = grad(lambda PP: (grad(lower)(W, torch.tanh(Xs @ PP), ys) * v).sum())(P)
        return gP_f - mixed

    def bmm_version(P, W, Xs, ys, Xq, yq):
        """Hand-batched: softmax-CE head Hessian applied with bmm, autograd only for P."""
        Pr = P.detach().requires_grad_(True)
        with torch.enable_grad():
            phi_s, phi_q = torch.tanh(Xs @ Pr), torch.tanh(Xq @ Pr)  # (B, n, f), graph to P
        Yq = F.one_hot(yq, ways).to(dtype)
        Ys = F.one_hot(ys, ways).to(dtype)
        phq, phs = phi_q.detach(), phi_s.detach()
        pq = torch.softmax(phq @ W, -1)
        gW = phq.transpose(1, 2) @ (pq - Yq) / pq.shape[1]  # ∇_W f, per task
        ps = torch.softmax(phs @ W, -1)

        def hvp(V):  # ∇²_W g V for CE: Φᵀ (diag(p) − ppᵀ) Φ V / n + λ V, batched
            Z = phs @ V
            JZ = ps * Z - ps * (ps * Z).sum(-1, keepdim=True)
            return phs.transpose(1, 2) @ JZ / ps.shape[1] + lam * V

        v = torch.zeros_like(gW)
        r = gW
        p = r
        rr = (r * r).sum((1, 2), keepdim=True)
        for _ in range(cg_steps):
            hp = hvp(p)
            a = rr / (p * hp).sum((1, 2), keepdim=True)
            v, r = v + a * p, r - a * hp
            rr_new = (r * r).sum((1, 2), keepdim=True)
            p, rr = r + (rr_new / rr) * p, rr_new
        with torch.enable_grad():
            # Σ_b f_b (each task's mean cross-entropy on its query set)
            f = F.cross_entropy((phi_q @ W).reshape(-1, ways), yq.reshape(-1), reduction="sum") / yq.shape[1]
            # mixed product ∂_P ⟨∇_W g(P), v⟩ = ∂_P ⟨Φ_sᵀ (p − Y)/n, v⟩ with p depending on Φ_s
            ps_g = torch.softmax(phi_s @ W, -1)
            inner = ((phi_s.transpose(1, 2) @ (ps_g - Ys) / ps.shape[1]) * v).sum()
            return torch.autograd.grad(f - inner, Pr)[0]  # one backward for both terms

    print(f"{'tasks':>6} {'loop ms':>9} {'vmap ms':>9} {'bmm ms':>9} {'loop/vmap':>9} {'loop/bmm':>9}  max|vmap-loop| max|bmm-loop|")
    gen = torch.Generator().manual_seed(0)
    for B in args.tasks:
        d = 784 if args.full else 128
        P = (torch.randn(d, feats, generator=gen) / d**0.5).to(dev, dtype)
        W = (0.1 * torch.randn(B, feats, ways, generator=gen)).to(dev, dtype)
        Xs = torch.randn(B, ways * shots, d, generator=gen).to(dev, dtype)
        Xq = torch.randn(B, ways * 15, d, generator=gen).to(dev, dtype)
        ys = torch.randint(0, ways, (B, ways * shots), generator=gen).to(dev)
        yq = torch.randint(0, ways, (B, ways * 15), generator=gen).to(dev)
        loop = lambda: torch.stack([per_task(P, W[b], Xs[b], ys[b], Xq[b], yq[b]) for b in range(B)]).sum(0)
        vm = lambda: vmap(per_task, in_dims=(None, 0, 0, 0, 0, 0))(P, W, Xs, ys, Xq, yq).sum(0)
        bm = lambda: bmm_version(P, W, Xs, ys, Xq, yq)
        ref, out_v, out_b = loop(), vm(), bm()
        tl, tv, tb = (timeit(f, args.repeats, device=dev) for f in (loop, vm, bm))
        print(
            f"{B:6d} {tl * 1e3:9.2f} {tv * 1e3:9.2f} {tb * 1e3:9.2f} {tl / tv:9.2f} {tl / tb:9.2f}  "
            f"{float((out_v - ref).abs().max()):.1e}        {float((out_b - ref).abs().max()):.1e}",
            flush=True,
        )


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("what", choices=["size", "tasks"])
    p.add_argument("--widths", nargs="+", type=int, default=[1, 10, 100, 1000])
    p.add_argument("--n-train", type=int, default=500)
    p.add_argument("--tasks", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument("--full", action="store_true", help="784 input features in the task sweep (default 128)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    dtype = apply_common_args(args)
    print(environment(args.device))
    (size_sweep if args.what == "size" else task_sweep)(args, dtype)


if __name__ == "__main__":
    main()
