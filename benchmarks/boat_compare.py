"""Side by side with BOAT (boat-torch 1.1.1): same problem, same hyper-parameters, same process.

Run with the BOAT virtual environment's python (see benchmarks/README.md for its install):

    PYTHONPATH=src /tmp/boatenv/bin/python benchmarks/boat_compare.py            # MNIST-sized linear
    PYTHONPATH=src /tmp/boatenv/bin/python benchmarks/boat_compare.py --model mlp

Pairs (BOAT name -> ours), all on data hyper-cleaning, lower lr β, T lower steps, K solver steps:

    NGD + RAD  (unrolled, warm start)        -> ITD(lower_steps=T, warm_start=True)
    NGD + CG   (K CG steps on I - ∂Φ)        -> AID(solver=CG(K))
    NGD + CG                                 -> AID(solver=PlainCG(K)): CG without our pᵀHp ≤ 0
                                                guard, as BOAT (differs on indefinite H, MLP)
    NGD + NS   (Neumann, K terms, step β)    -> AID(solver=Neumann(K, lr=β))
    DM  + RAD  (s1, no GDA: Jacobi, fixed η) -> SlBAMM(mu=0, order="jacobi", dual_step="fixed")
                                                with BOAT's α_k, η_k schedules
    VFO  (fo_op; BOME, value barrier u1 q̂)  -> BOME(phi="value", eta=u1, lower_steps=T, shadow_steps=T,
                                                shadow_momentum=0.5): BOAT first trains y with T lower
                                                steps, then ŷ with T momentum-0.5 steps. Quirk: its last
                                                lower gradient stays in .grad and update_tensor_grads adds
                                                the barrier direction to it, so y moves by β(d_y + ∇_y g
                                                at the point before its last lower step); the iterate check
                                                uses BOMEBoatGrad, which adds that term, the timing plain BOME
    PGDO (fo_op; penalty="difference")      -> PBGD(variant="value", shadow ω persistent, T steps, constant γ)
                                                (BOAT's penalty="gradient" takes ∇_y g without create_graph:
                                                the penalty has no gradient, so no G-PBGD pair)
    MESO (fo_op)                            -> MEHA(order="y_first", c0, p=1/4, gamma=1/gamma_1): BOAT differentiates
                                                the Moreau term through θ' = θ − η(∇g + γ₁(θ − y)), which
                                                scales its y-gradient by (1 − ηγ₁) (1e-4 here): Δy of that order
    NGD + PTT + RAD (copy_last_param)        -> IAPTTGM(initialization="warm"): PTT without the learned z.
                                                Quirk: RAD evaluates the patched model with params=y_k̃,
                                                which higher appends to its history, so BOAT warm-starts
                                                from y_k̃ instead of y_K (IAPTTBoatWarm for the iterate check)

For each pair: (1) the largest |difference| of x and y after a few iterations from the same
start (both sides should compute the same iterates up to float rounding); (2) the minimum
time of one iteration (over iterations 3..n, robust to other load) (BOAT: ``Problem.run_iter`` including its own loss bookkeeping;
ours: ``method.step``) and the ratio.

``--device cuda`` runs both sides on the GPU (BOAT is PyTorch too: its models, variables and
``device`` setting follow; the data are drawn on the CPU, then moved), with the device
synchronised around each timed step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import boat_torch as boat
import torch
import torch.nn as nn
import torch.nn.functional as F

import bilevel as bl
import common  # noqa: F401
from bilevel import tree as T
from bilevel.linsolve import CG, LinearSolver, LinearSolveResult, Neumann
from bilevel.parts import EmptyState
from bilevel.schedules import Polynomial
from common import environment, sync


# ----------------------------------------------------------------------- BOAT-side losses
def boat_lower(feed, ul_model, ll_model, params=None, **_):
    out = ll_model(feed["data"], params=params) if params is not None else ll_model(feed["data"])
    return (torch.sigmoid(ul_model.logit) * F.cross_entropy(out, feed["target"], reduction="none")).mean()


def boat_upper(feed, ul_model, ll_model, params=None, **_):
    out = ll_model(feed["data"], params=params) if params is not None else ll_model(feed["data"])
    return F.cross_entropy(out, feed["target"])


class Weights(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(n))


class InOutLinear(nn.Module):
    """``X @ W + b`` with W stored ``[in, out]``: the layout of BOAT's hyper-cleaning example
    (``--layout in-out``). Its backward forms ``Xᵀ G``, which on a CPU is the slow product."""

    def __init__(self, features, classes):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(features, classes))
        self.bias = nn.Parameter(torch.zeros(classes))

    def forward(self, X):
        return X @ self.weight + self.bias


def make_ll_model(model, features, classes, hidden, seed, device="cpu", layout="out-in"):
    """Initialised on the CPU (seeded), then moved to ``device``."""
    torch.manual_seed(seed)
    if model == "linear" and layout == "in-out":
        return InOutLinear(features, classes).to(device)
    if model == "linear":
        net = nn.Linear(features, classes)
        nn.init.zeros_(net.weight), nn.init.zeros_(net.bias)
        return net.to(device)
    return nn.Sequential(nn.Linear(features, hidden), nn.Sigmoid(), nn.Linear(hidden, classes)).to(device)


def boat_config(gm, na, ll_model, ul_model, ll_lr, ul_lr, T, K, dm=None, log_path=None, fo=None, device="cpu"):
    ll_opt = torch.optim.SGD(ll_model.parameters(), lr=ll_lr)
    ul_opt = torch.optim.SGD(ul_model.parameters(), lr=ul_lr)
    return {
        "fo_op": fo[0] if fo else None,
        **({fo[0]: fo[1]} if fo else {}),
        "gm_op": gm,
        "na_op": None if fo else na,
        "lower_level_model": ll_model,
        "upper_level_model": ul_model,
        "lower_level_var": list(ll_model.parameters()),
        "upper_level_var": list(ul_model.parameters()),
        "lower_level_opt": ll_opt,
        "upper_level_opt": ul_opt,
        "lower_iters": T,
        "device": str(device),
        "loss_log_path": log_path,
        "GDA": {"alpha_init": 0.0, "alpha_decay": 1.0},
        "RGT": {"truncate_iter": 0},
        "CG": {"k": K, "tolerance": 1e-30},
        "DM": dm or {"auxiliary_v_lr": 0.0, "tau": 0.0, "p": 1.0, "mu0": 0.0, "eta0": 0.0, "strategy": "s1"},
        "accumulate_grad": False,
        "return_grad": False,
        "copy_last_param": True,
        "fo_ol_batch_input": False,
    }


def boat_problem(cfg):
    loss_cfg = {"lower_level_loss": {"function": f"{__name__}.boat_lower"}, "upper_level_loss": {"function": f"{__name__}.boat_upper"}}
    problem = boat.Problem(cfg, loss_cfg)
    problem.build_ll_solver()
    problem.build_ul_solver()
    return problem


# ----------------------------------------------------------------------- our side
class PlainCG(LinearSolver):
    """CG without our guard on ``pᵀHp ≤ 0`` (BOAT's ``cg_step``: it divides by ``pᵀHp`` whatever
    its sign). Only for the side-by-side check: on the MLP the lower Hessian is indefinite and
    the guarded :class:`~bilevel.CG` zeroes the step where BOAT takes a negative one."""

    def __init__(self, steps):
        self.steps = steps

    def __call__(self, matvec, b, v0=None):
        v, r = T.zeros_like(b), b
        p, rr = r, T.sq_norm(r)
        for _ in range(self.steps):
            hp = matvec(p)
            alpha = rr / T.vdot(p, hp)
            v, r = T.axpy(alpha, p, v), T.axpy(-alpha, hp, r)
            rr_new = T.sq_norm(r)
            p, rr = T.axpy(rr_new / rr, p, r), rr_new
        return LinearSolveResult(v=v, residual_sq=rr)


class BOMEBoatGrad(bl.BOME):
    """BOME as BOAT's ``VFO`` computes it, for the iterate check only: its last lower step's gradient
    ∇_y g(x, y_{T−1}) is still in ``.grad`` when it adds the barrier direction (``update_tensor_grads``
    accumulates), so y moves by β (d_y + ∇_y g(x, y_{T−1}))."""

    def step(self, problem, state, batch=None):
        oracles, x, y = self.derivatives, state.x, state.y
        for _ in range(self.lower_steps - 1):
            y, _ = bl.LowerGD(lr=self.lr_lower).step(problem, x, y, batch, 0, oracles)
        stale, _ = oracles.gradient_y(problem.lower, x, y, batch)
        y = T.axpy(-self.lr_lower, stale, y)
        plain = bl.BOME(
            lr_upper=self.lr_upper,
            lr_lower=self.lr_lower,
            lr_shadow=self.lr_shadow,
            shadow_steps=self.shadow_steps,
            eta=self.eta,
            phi=self.phi,
            eps=self.eps,
            shadow_momentum=self.shadow_momentum,
        )
        new, info = plain.step(problem, state.replace(y=y, extra={**state.extra, "lower": EmptyState()}))
        return new.replace(y=T.axpy(-self.lr_lower, stale, new.y)), info


class IAPTTBoatWarm(bl.IAPTTGM):
    """IAPTT-GM's warm start as BOAT's ``PTT`` + ``copy_last_param`` does it, for the iterate check only:
    RAD calls the patched model with ``params=`` the selected iterate, which ``higher`` appends to the
    history, so the "last" parameters copied back are y_k̃, not y_K."""

    def step(self, problem, state, batch=None):
        new, info = super().step(problem, state, batch)
        steps = int(info["selected_step"])
        y_selected, _, _ = bl.LowerGD(lr=self.lr_lower, steps=steps).run(problem, state.x, state.y, batch, self.derivatives)
        return new.replace(y=y_selected), info


def our_problem(model, Xtr, ytr, Xva, yva, ll_model):
    names = [n for n, _ in ll_model.named_parameters()]

    def net(y, X):
        from torch.func import functional_call

        return functional_call(ll_model, {n: y[n] for n in names}, (X,))

    def lower(x, y, batch):
        return (torch.sigmoid(x["logit"]) * F.cross_entropy(net(y, Xtr), ytr, reduction="none")).mean()

    def upper(x, y, batch):
        return F.cross_entropy(net(y, Xva), yva)

    y0 = {n: p.detach().clone() for n, p in ll_model.named_parameters()}
    x0 = {"logit": torch.zeros(Xtr.shape[0], dtype=Xtr.dtype, device=Xtr.device)}
    return bl.Problem(upper=upper, lower=lower, x_init=x0, y_init=y0)


def pairs(args):
    T, K, lr, ulr = args.lower_steps, args.solver_steps, args.lr_lower, args.lr_upper
    dm = {"auxiliary_v_lr": 1.0, "tau": args.tau, "p": 1.0, "mu0": 0.0, "eta0": args.eta0, "strategy": "s1"}
    # BOAT DM+RAD (s1): x_lr = ul_lr (k+1)^-τ β ; η = η0 (k+1)^-τ/2 β
    return {
        "RAD/ITD": (["NGD"], ["RAD"], T, None, bl.ITD(lr_upper=ulr, lr_lower=lr, lower_steps=T, warm_start=True)),
        "CG/AID-CG": (["NGD"], ["CG"], T, None, bl.AID(lr_upper=ulr, lr_lower=lr, lower_steps=T, solver=CG(steps=K))),
        "CG/AID-plainCG": (["NGD"], ["CG"], T, None, bl.AID(lr_upper=ulr, lr_lower=lr, lower_steps=T, solver=PlainCG(K))),
        "NS/AID-Neumann": (["NGD"], ["NS"], T, None, bl.AID(lr_upper=ulr, lr_lower=lr, lower_steps=T, solver=Neumann(steps=K, lr=lr))),
        "VFO/BOME": (
            None,
            ("VFO", {"y_hat_lr": args.lr_shadow, "eta": 0.0, "u1": args.u1}),
            T,
            None,
            BOMEBoatGrad(
                lr_upper=ulr,
                lr_lower=lr,
                lr_shadow=args.lr_shadow,
                shadow_steps=T,
                eta=args.u1,
                phi="value",
                shadow_momentum=0.5,
                lower_steps=T,
            ),
            bl.BOME(
                lr_upper=ulr,
                lr_lower=lr,
                lr_shadow=args.lr_shadow,
                shadow_steps=T,
                eta=args.u1,
                phi="value",
                shadow_momentum=0.5,
                lower_steps=T,
            ),
        ),
        "PGDO/V-PBGD": (
            None,
            (
                "PGDO",
                {
                    "y_hat_lr": args.lr_shadow,
                    "gamma_init": args.gamma,
                    "gamma_max": args.gamma,
                    "gamma_argmax_step": 1,
                    "update_y_ahead": False,
                    "penalty": "difference",
                },
            ),
            T,
            None,
            bl.PBGD(variant="value", gamma=args.gamma, lr_upper=ulr, lr_lower=lr, lr_shadow=args.lr_shadow, shadow_steps=T),
        ),
        "MESO/MEHA": (
            None,
            ("MESO", {"eta": args.lr_shadow, "gamma_1": args.gamma_1, "c0": 0.2, "y_hat_lr": args.lr_shadow}),
            T,
            None,
            bl.MEHA(lr_upper=ulr, lr_lower=lr, lr_shadow=args.lr_shadow, gamma=1.0 / args.gamma_1, c0=0.2, p=0.25, order="y_first"),
        ),
        "PTT/IAPTT-GM": (
            ["NGD"],
            ["PTT", "RAD"],
            T,
            None,
            IAPTTBoatWarm(lr_upper=ulr, lr_lower=lr, lower_steps=T, initialization="warm"),
            bl.IAPTTGM(lr_upper=ulr, lr_lower=lr, lower_steps=T, initialization="warm"),
        ),
        "DM/sl-BAMM": (
            ["DM"],
            ["RAD"],
            1,
            dm,
            bl.SlBAMM(
                mu=0.0,
                lr_lower=lr,
                order="jacobi",
                dual_step="fixed",
                lr_dual=Polynomial(args.eta0 * lr, args.tau / 2),
                lr_upper=Polynomial(ulr * lr, args.tau),
                stability_check="off",
            ),
        ),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="linear", choices=["linear", "mlp"])
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--features", type=int, default=784)
    p.add_argument("--hidden", type=int, default=300)
    p.add_argument("--lower-steps", type=int, default=10)
    p.add_argument("--solver-steps", type=int, default=10)
    p.add_argument("--lr-lower", type=float, default=0.1)
    p.add_argument("--lr-upper", type=float, default=100.0)
    p.add_argument("--eta0", type=float, default=1.0)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--lr-shadow", type=float, default=0.1, help="ŷ / ω / θ step of VFO, PGDO, MESO")
    p.add_argument("--u1", type=float, default=0.1, help="VFO's value barrier φ = u1 q̂ (BOME's η)")
    p.add_argument("--gamma", type=float, default=0.3, help="PGDO's constant penalty (BOAT's example: 0.3)")
    p.add_argument("--gamma-1", type=float, default=1e-3, help="MESO's 1/γ")
    p.add_argument("--check-iters", type=int, default=5)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--pairs", nargs="+", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (both sides; timings synchronise the device)")
    p.add_argument(
        "--layout",
        default="out-in",
        choices=["out-in", "in-out"],
        help="linear model: W [out, in] with F.linear (the library's layout, default) or W [in, out] with X @ W (BOAT's example's)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    dev = args.device
    print(environment(dev), "| boat-torch", getattr(boat, "__version__", "1.1.1"))
    gen = torch.Generator().manual_seed(0)
    n, d, c = args.n_train, args.features, 10
    Xtr = torch.randn(n, d, generator=gen) / d**0.5
    Xva = torch.randn(n, d, generator=gen) / d**0.5
    ytr = torch.randint(0, c, (n,), generator=gen)
    yva = torch.randint(0, c, (n,), generator=gen)
    Xtr, Xva, ytr, yva = Xtr.to(dev), Xva.to(dev), ytr.to(dev), yva.to(dev)
    ll_feed, ul_feed = {"data": Xtr, "target": ytr}, {"data": Xva, "target": yva}
    log_path = os.path.join(tempfile.mkdtemp(), "boat_losses.json")
    print(
        f"hyper-cleaning {args.model}, n={n}, d={d}, T={args.lower_steps}, K={args.solver_steps}, "
        f"β={args.lr_lower}, α={args.lr_upper}, {args.dtype}, layout {args.layout if args.model == 'linear' else 'out-in'}"
    )
    print(f"{'pair':<16} {'max|Δx|':>9} {'max|Δy|':>9} {'|x-x0|':>9} {'BOAT ms':>9} {'ours ms':>9} {'BOAT/ours':>9}")
    for name, (gm, na, steps, dm, method, *timed) in pairs(args).items():
        if args.pairs and name not in args.pairs:
            continue
        fo = na if gm is None else None  # (op name, its settings) of BOAT's first-order methods
        ll_model = make_ll_model(args.model, d, c, args.hidden, seed=1, device=dev, layout=args.layout)
        ul_model = Weights(n).to(dev)
        problem = our_problem(args.model, Xtr, ytr, Xva, yva, ll_model)
        state = method.init(problem)
        # a pair whose BOAT side has a quirk checks iterates with the method that reproduces it and
        # times the plain method (the quirk costs nothing)
        timed_method = timed[0] if timed else method
        timed_state = timed_method.init(problem)
        cfg = boat_config(
            gm, na, ll_model, ul_model, args.lr_lower, args.lr_upper, steps, args.solver_steps, dm, log_path, fo=fo, device=dev
        )
        bp = boat_problem(cfg)
        boat_times, our_times = [], []
        dx = dy = 0.0
        for k in range(args.iters):
            sync(dev)
            start = time.perf_counter()
            bp.run_iter(ll_feed, ul_feed, current_iter=k)
            sync(dev)
            boat_times.append(time.perf_counter() - start)
            if timed:
                start = time.perf_counter()
                timed_state, _ = timed_method.step(problem, timed_state)
                sync(dev)
                our_times.append(time.perf_counter() - start)
            if k < args.check_iters or not timed:
                start = time.perf_counter()
                state, _ = method.step(problem, state)
                sync(dev)
                if not timed:
                    our_times.append(time.perf_counter() - start)
            if k < args.check_iters:
                dx = max(dx, float((state.x["logit"] - ul_model.logit.detach()).abs().max()))
                dy = max(dy, max(float((state.y[nm] - p_.detach()).abs().max()) for nm, p_ in ll_model.named_parameters()))
        tb, to = min(boat_times[2:]), min(our_times[2:])
        moved = float(state.x["logit"].abs().max())
        print(f"{name:<16} {dx:9.2e} {dy:9.2e} {moved:9.2e} {tb * 1e3:9.2f} {to * 1e3:9.2f} {tb / to:9.2f}", flush=True)


if __name__ == "__main__":
    main()
