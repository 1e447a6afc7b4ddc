"""The hand-written floor: the library's methods against minimal PyTorch loops.

For each method, a hand-written loop of the same algorithm with the same options (plain
``torch.autograd.grad``, ``create_graph`` where a product needs it, no library code, no
diagnostics) is run next to ``method.step`` with the library's default diagnostics on (what
a user gets). Covered, one loop per method (``hand_<method>``):

* implicit / unrolled (the seed methods): GALET, sl-BAMM, BAGDC, AID-CG, ITD;
* first order / value function: BOME (φ = η‖∇q̂‖², T restarted ŷ steps), V-PBGD (persistent
  shadow ω, normalised penalty γ), G-PBGD (penalty ½‖∇_y g‖², one (J u, H u) backward), MEHA
  (Jacobi order, proximal θ step, c_k = c₀(k+1)^p), IAPTT-GM (K steps from the learned
  initialisation z, backward from the first iterate where f is largest);
* stochastic: SOBA, MA-SOBA (moving-average direction), SABA (SAGA tables of ∇_y g, J v,
  H v per lower block and ∇_y f per upper block), SRBA (SARAH recursion, full refresh every
  q iterations; the timed steps are ordinary ones), StocBiO (Neumann multiplier), AmIGO
  (warm-started dual steps), F2SA (shadow z, growing penalty λ_k).

The library's defaults are kept for every option but the step sizes (``library_methods``).
The seed and first-order methods run full batch (objectives on all n examples, batch
``None``). The stochastic family runs on the library's sample streams (``Data.streams``: the
training set is the lower stream ξ with rows ``(X, label, index)`` so that g weights each
example by σ(x_index), the validation set the upper stream ζ, 10 contiguous blocks each,
uniform block draws): the library's step gets ``streams.batch_at(k)`` as ``bl.solve`` passes
it, and the hand loop draws its batches from the same ``streams.batch_at(k)`` — draw t of
iteration k is a pure function of (seed, k, t), so both see the same samples and both pay the
(host-side) cost of drawing. f does not depend on x here, so the hand loops leave out ∇_x f.

First the iterates ``(x, y)`` of both are checked equal in float64 (relative 1e-12 after
``--check-iters`` steps, and x and y must have moved); then library and hand blocks of
``--block`` steps alternate in one process (``torch.set_num_threads(1)``) and the ratio of
each round is recorded:

    ratio = library time / hand time       (1.00: at the floor)

reported as the median over rounds with its spread (25-75 %) and as min/min. Problem:
linear data hyper-cleaning, n = 1000 training + 1000 validation examples (mini-batches of 100
for the stochastic family), random data, W stored ``[out, in]`` and ``F.linear`` (the
library's layout); parameters ≈ 10³ (d = 100, C = 10), 10⁵ (d = 1000, C = 100), 10⁶
(d = 10000, C = 100).

    PYTHONPATH=src python benchmarks/floor.py                     # all sizes, all methods
    PYTHONPATH=src python benchmarks/floor.py --sizes 1e3 --rounds 40 --methods GALET BAGDC
    PYTHONPATH=src python benchmarks/floor.py --methods BOME V-PBGD SOBA SABA    # some of the new families
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
from bilevel.methods.stochastic import Stochastic
from common import environment, sync

grad = torch.autograd.grad

SIZES = {"1e3": (100, 10), "1e5": (1000, 100), "1e6": (10000, 100)}


# --------------------------------------------------------------------------- problem


class Data:
    """Linear hyper-cleaning data (features d, classes C, n_train + n_val examples)."""

    def __init__(self, d, C, n=1000, dtype=torch.float32, seed=0, device="cpu", blocks=10):
        gen = torch.Generator().manual_seed(seed)  # drawn on the CPU, so every device gets the same data
        self.Xtr = (torch.randn(n, d, generator=gen) / d**0.5).to(device, dtype)
        self.Xva = (torch.randn(n, d, generator=gen) / d**0.5).to(device, dtype)
        self.ytr = torch.randint(0, C, (n,), generator=gen).to(device)
        self.yva = torch.randint(0, C, (n,), generator=gen).to(device)
        self.d, self.C, self.n, self.dtype, self.device = d, C, n, dtype, torch.device(device)
        self.batch_size = n // blocks

    def g(self, x, W, b):
        return (torch.sigmoid(x) * F.cross_entropy(F.linear(self.Xtr, W, b), self.ytr, reduction="none")).mean()

    def f(self, W, b):
        return F.cross_entropy(F.linear(self.Xva, W, b), self.yva)

    def g_on(self, x, W, b, batch):
        """g on a lower batch ``(X, labels, indices)`` of the training set (x indexed by the rows)."""
        X, labels, rows = batch
        return (torch.sigmoid(x[rows]) * F.cross_entropy(F.linear(X, W, b), labels, reduction="none")).mean()

    def f_on(self, W, b, batch):
        """f on an upper batch ``(X, labels)`` of the validation set."""
        X, labels = batch
        return F.cross_entropy(F.linear(X, W, b), labels)

    def streams(self, seed=0):
        """The library's sample streams: ``blocks`` contiguous blocks of the training set (lower, ξ)
        and of the validation set (upper, ζ), uniform block draws (``bl.Stream``'s default)."""
        rows = torch.arange(self.n, device=self.device)
        return bl.Streams(
            upper=bl.Stream((self.Xva, self.yva), batch_size=self.batch_size),
            lower=bl.Stream((self.Xtr, self.ytr, rows), batch_size=self.batch_size),
            seed=seed,
        )

    def problem(self):
        def lower(x, y, batch):
            return self.g(x["weights"], y["W"], y["b"])

        def upper(x, y, batch):
            return self.f(y["W"], y["b"])

        z = functools.partial(torch.zeros, dtype=self.dtype, device=self.device)
        x0 = {"weights": z(self.n)}
        y0 = {"W": z(self.C, self.d), "b": z(self.C)}
        return bl.Problem(upper=upper, lower=lower, x_init=x0, y_init=y0, name="hyperclean-linear")

    def stream_problem(self):
        """The same problem with objectives of one batch each (the stochastic family's draws)."""

        def lower(x, y, batch):
            return self.g_on(x["weights"], y["W"], y["b"], batch)

        def upper(x, y, batch):
            return self.f_on(y["W"], y["b"], batch)

        full = self.problem()
        return bl.Problem(upper=upper, lower=lower, x_init=full.x_init, y_init=full.y_init, name="hyperclean-linear-streams")


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
        # first order / value function: full batch, as the seed methods
        # β = 2: y descends f fast enough that the barrier's λ_k > 0 from the 4th step of the
        # check on (with β = 0.1 it stays 0 for the 12 steps: x would never move)
        "BOME": bl.BOME(lr_upper=10.0, lr_lower=2.0, lr_shadow=0.1),
        "V-PBGD": bl.PBGD(variant="value", lr_upper=10.0, lr_lower=0.1, lr_shadow=0.1),
        "G-PBGD": bl.PBGD(variant="gradient", lr_upper=10.0, lr_lower=0.1),
        "MEHA": bl.MEHA(lr_upper=10.0, lr_lower=0.1, lr_shadow=0.1),
        "IAPTT-GM": bl.IAPTTGM(lr_upper=10.0, lr_lower=0.1, lr_init=0.1),
        # the stochastic family: on the library's sample streams (Data.streams)
        "SOBA": bl.SOBA(lr_upper=10.0, lr_lower=0.1),
        "SABA": bl.SABA(lr_upper=10.0, lr_lower=0.1),
        "SRBA": bl.SRBA(lr_upper=10.0, lr_lower=0.1),
        "MA-SOBA": bl.MASOBA(lr_upper=10.0, lr_lower=0.1),
        "StocBiO": bl.StocBiO(lr_upper=10.0, lr_lower=0.1),
        "AmIGO": bl.AmIGO(lr_upper=10.0, lr_lower=0.1),
        "F2SA": bl.F2SA(lr_upper=10.0, lr_lower=0.1, lr_shadow=0.1),
    }


# --------------------------------------------------------------------------- hand-written loops
# state: (x, W, b, vW, vb, k, memory); every function returns the next state. ``memory`` holds
# what a method keeps besides (x, y, v): a shadow variable, a penalty, SAGA tables, an average.
# f (the validation loss) does not depend on x here, so ∇_x f = 0 is left out of every loop.


def _req(*ts):
    return [t.detach().requires_grad_(True) for t in ts]


def _dot(a, b):
    return sum((p * q).sum() for p, q in zip(a, b, strict=True))


def _sq(a):
    return sum((p * p).sum() for p in a)


def hand_galet(D, s, lr=0.1, beta=0.1, N=5, rho=0.1, T=10):
    x, W, b, _, _, k, memory = s
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
    return x + lr * jv, W, b, vW, vb, k + 1, memory


def hand_aid_cg(D, s, lr=0.1, beta=0.1, N=10, K=10):
    x, W, b, _, _, k, memory = s
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
    return x + lr * jv, W, b, v[0], v[1], k + 1, memory


def hand_itd(D, s, W0, b0, lr=0.1, beta=0.1, N=20):
    x, _, _, _, _, k, memory = s
    xr, W, b = _req(x, W0, b0)
    for _ in range(N):
        gW, gb = grad(D.g(xr, W, b), (W, b), create_graph=True)
        W, b = W - beta * gW, b - beta * gb
    (gx,) = grad(D.f(W, b), xr)
    return x - lr * gx, W.detach(), b.detach(), None, None, k + 1, memory


def hand_bagdc(D, s, lr=0.01, beta=0.1, eta=0.1):
    x, W, b, vW, vb, k, memory = s
    W, b = _req(W, b)
    gW, gb = grad(D.g(x, W, b), (W, b))
    W, b = (W - beta * gW).detach(), (b - beta * gb).detach()
    xr, Wr, br = _req(x, W, b)
    gy = grad(D.g(xr, Wr, br), (Wr, br), create_graph=True)
    fW, fb = grad(D.f(Wr, br), (Wr, br))
    hW, hb = grad(gy, (Wr, br), (vW, vb), retain_graph=True)
    vW, vb = vW - eta * (hW - fW), vb - eta * (hb - fb)
    (jv,) = grad(gy, xr, (vW, vb))
    return x + lr * jv, W, b, vW, vb, k + 1, memory


def hand_slbamm(D, s, schedules, beta=0.01, fallback=0.1):
    x, W, b, vW, vb, k, memory = s
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
    return x + lr * jv, W, b, vW, vb, k + 1, memory


# first order / value function (full batch) --------------------------------------------


def hand_bome(D, s, lr=10.0, beta=2.0, beta_hat=0.1, T=10, eta=0.5, eps=1e-8):
    """BOME, φ = η‖∇q̂‖²: T restarted steps ŷ from y, the value-gap gradient, λ, the joint step."""
    x, W, b, _, _, k, memory = s
    Wh, bh = W, b
    for _ in range(T):
        Wh, bh = _req(Wh, bh)
        gW, gb = grad(D.g(x, Wh, bh), (Wh, bh))
        Wh, bh = (Wh - beta_hat * gW).detach(), (bh - beta_hat * gb).detach()
    xr, Wr, br = _req(x, W, b)
    fW, fb = grad(D.f(Wr, br), (Wr, br))
    qx, qW, qb = grad(D.g(xr, Wr, br) - D.g(xr, Wh, bh), (xr, Wr, br))
    lam = torch.clamp(eta - _dot((fW, fb), (qW, qb)) / (_sq((qx, qW, qb)) + eps), min=0.0)
    return x - lr * (lam * qx), W - beta * (fW + lam * qW), b - beta * (fb + lam * qb), None, None, k + 1, memory


def hand_vpbgd(D, s, lr=10.0, beta=0.1, beta_z=0.1, gamma=10.0):
    """V-PBGD: one step of the persistent shadow ω, the value-gap gradient, the normalised joint step."""
    x, W, b, _, _, k, (zW, zb) = s
    scale = min(1.0, 1.0 / (gamma + 1e-8))
    zW, zb = _req(zW, zb)
    gW, gb = grad(D.g(x, zW, zb), (zW, zb))
    zW, zb = (zW - beta_z * gW).detach(), (zb - beta_z * gb).detach()
    xr, Wr, br = _req(x, W, b)
    fW, fb = grad(D.f(Wr, br), (Wr, br))
    qx, qW, qb = grad(D.g(xr, Wr, br) - D.g(xr, zW, zb), (xr, Wr, br))
    cx, cy = lr * scale * gamma, beta * scale
    return x - cx * qx, W - cy * (fW + gamma * qW), b - cy * (fb + gamma * qb), None, None, k + 1, (zW, zb)


def hand_gpbgd(D, s, lr=10.0, beta=0.1, gamma=10.0):
    """G-PBGD: p = ½‖∇_y g‖², its gradient (J ∇_y g, H ∇_y g) by one backward of ∇_y g, the normalised joint step."""
    x, W, b, _, _, k, memory = s
    scale = min(1.0, 1.0 / (gamma + 1e-8))
    xr, Wr, br = _req(x, W, b)
    gW, gb = grad(D.g(xr, Wr, br), (Wr, br), create_graph=True)
    px, pW, pb = grad((gW, gb), (xr, Wr, br), (gW.detach(), gb.detach()))
    fW, fb = grad(D.f(Wr, br), (Wr, br))
    cx, cy = lr * scale * gamma, beta * scale
    return x - cx * px, W - cy * (fW + gamma * pW), b - cy * (fb + gamma * pb), None, None, k + 1, memory


def hand_meha(D, s, lr=10.0, beta=0.1, eta=0.1, gamma=10.0, c0=0.2, p=0.25):
    """MEHA (Jacobi order): one proximal step of θ, one backward of f/c_k + g(x, y) − g(x, θ)."""
    x, W, b, _, _, k, (tW, tb) = s
    c, inv = c0 * (k + 1.0) ** p, 1.0 / gamma
    tWr, tbr = _req(tW, tb)
    gW, gb = grad(D.g(x, tWr, tbr), (tWr, tbr))
    tW, tb = tW - eta * (gW + inv * (tW - W)), tb - eta * (gb + inv * (tb - b))
    xr, Wr, br = _req(x, W, b)
    dx, gW, gb = grad(D.f(Wr, br) / c + D.g(xr, Wr, br) - D.g(xr, tW, tb), (xr, Wr, br))
    W_next, b_next = W - beta * (gW - inv * (W - tW)), b - beta * (gb - inv * (b - tb))
    return x - lr * dx, W_next, b_next, None, None, k + 1, (tW, tb)


def hand_iaptt(D, s, lr=10.0, beta=0.1, beta_z=0.1, K=20):
    """IAPTT-GM (learned initialisation z): K differentiable lower steps from z, f at each
    iterate without a graph, the first maximiser k̃, one backward of f(y_k̃) into (x, z).
    (Here f falls along the lower path, so k̃ = 1 in the check and in the timed steps.)"""
    x, _, _, _, _, k, (zW, zb) = s
    xr, W0, b0 = _req(x, zW, zb)
    W, b, path, values = W0, b0, [], []
    for _ in range(K):
        gW, gb = grad(D.g(xr, W, b), (W, b), create_graph=True)
        W, b = W - beta * gW, b - beta * gb
        path.append((W, b))
        with torch.no_grad():
            values.append(D.f(W, b))
    W_sel, b_sel = path[int(torch.argmax(torch.stack(values)))]
    gx, gzW, gzb = grad(D.f(W_sel, b_sel), (xr, W0, b0))
    return x - lr * gx, W.detach(), b.detach(), None, None, k + 1, (zW - beta_z * gzW, zb - beta_z * gzb)


# the stochastic family (the library's sample streams) ----------------------------------
# Every loop draws its batches from ``streams.batch_at(k)``, the same Draws object the
# library's step is given: the t-th lower draw ξ_{k,t} and upper draw ζ_{k,t} are a pure
# function of (seed, k, t), so library and hand loop see the same samples, and both pay the
# (host-side, integer-hash) cost of drawing.


def _soba_oracles(D, x, W, b, vW, vb, xi, zeta):
    """∇_y g(ξ), (J v, H v)(ξ) by one backward of ∇_y g, ∇_y f(ζ): 1 Gy + 1 HJ + 1 Gf."""
    xr, Wr, br = _req(x, W, b)
    gW, gb = grad(D.g_on(xr, Wr, br, xi), (Wr, br), create_graph=True)
    jv, hW, hb = grad((gW, gb), (xr, Wr, br), (vW, vb))
    fW, fb = grad(D.f_on(Wr, br, zeta), (Wr, br))
    return gW.detach(), gb.detach(), jv, hW, hb, fW, fb


def hand_soba(D, s, streams, alpha=10.0, beta=0.1):
    """SOBA (η = β): the five oracles at (x_k, y_k, v_k) on ξ_{k,0}, ζ_{k,0}, then all variables move."""
    x, W, b, vW, vb, k, memory = s
    draws = streams.batch_at(k)
    gW, gb, jv, hW, hb, fW, fb = _soba_oracles(D, x, W, b, vW, vb, draws.lower(0), draws.upper(0))
    return x + alpha * jv, W - beta * gW, b - beta * gb, vW - beta * (hW - fW), vb - beta * (hb - fb), k + 1, memory


def hand_masoba(D, s, streams, alpha=10.0, beta=0.1, theta=0.1):
    """MA-SOBA: SOBA's oracles; x moves along h ← (1 − θ) h + θ (−J v), h_0 = the first estimate."""
    x, W, b, vW, vb, k, h = s
    draws = streams.batch_at(k)
    gW, gb, jv, hW, hb, fW, fb = _soba_oracles(D, x, W, b, vW, vb, draws.lower(0), draws.upper(0))
    h = -jv if h is None else (1.0 - theta) * h - theta * jv
    return x - alpha * h, W - beta * gW, b - beta * gb, vW - beta * (hW - fW), vb - beta * (hb - fb), k + 1, h


def saba_memory(D):
    """SAGA tables (zero-initialised, one row per block) and their weighted means, in the order
    of ``_soba_oracles``: ∇_y g, J v, H v per lower block; ∇_y f per upper block (∇_x f = 0
    needs no table)."""
    blocks = D.n // D.batch_size
    z = functools.partial(torch.zeros, dtype=D.dtype, device=D.device)
    rows = [z(blocks, D.C, D.d), z(blocks, D.C), z(blocks, D.n), z(blocks, D.C, D.d), z(blocks, D.C), z(blocks, D.C, D.d), z(blocks, D.C)]
    return rows, [z(r.shape[1:]) for r in rows]


def hand_saba(D, s, streams, alpha=10.0, beta=0.1):
    """SABA (η = β): SOBA's oracles on the drawn blocks i (lower) and j (upper), each through its
    SAGA row: out = o − m_block + m̄, m̄ ← m̄ + w (o − m_block), m_block ← o (in place)."""
    x, W, b, vW, vb, k, (rows, means) = s
    draws = streams.batch_at(k)
    i, wi, xi = draws.lower_block(0)
    j, wj, zeta = draws.upper_block(0)
    fresh = _soba_oracles(D, x, W, b, vW, vb, xi, zeta)
    out, new_means = [], []
    for n, (o, table, mean) in enumerate(zip(fresh, rows, means, strict=True)):
        block, weight = (i, wi) if n < 5 else (j, wj)
        delta = o - table[block]
        out.append(delta + mean)
        new_means.append(mean + weight * delta)
        table[block].copy_(o)
    gW, gb, jv, hW, hb, fW, fb = out
    v_next = vW - beta * (hW - fW), vb - beta * (hb - fb)
    return x + alpha * jv, W - beta * gW, b - beta * gb, *v_next, k + 1, (rows, new_means)


def hand_srba(D, s, streams, alpha=10.0, beta=0.1, period_frac=0.5):
    """SRBA (η = β): every q = int((n + m)·period_frac / b) iterations SOBA's oracles on all the
    data; otherwise D ← D + o(x_k, y_k, v_k) − o(x_{k−1}, y_{k−1}, v_{k−1}), both on ξ_{k,0}, ζ_{k,0}."""
    x, W, b, vW, vb, k, previous = s
    q = max(1, int(2 * D.n * period_frac / D.batch_size))
    draws = streams.batch_at(k)
    if k % q == 0:
        gW, gb, jv, hW, hb, fW, fb = _soba_oracles(D, x, W, b, vW, vb, draws.lower_full(), draws.upper_full())
        d = [gW, gb, hW - fW, hb - fb, -jv]
    else:
        xi, zeta = draws.lower(0), draws.upper(0)
        gW, gb, jv, hW, hb, fW, fb = _soba_oracles(D, x, W, b, vW, vb, xi, zeta)
        oW, ob, ojv, ohW, ohb, ofW, ofb = _soba_oracles(D, *previous[:5], xi, zeta)
        new, old = (gW, gb, hW - fW, hb - fb, -jv), (oW, ob, ohW - ofW, ohb - ofb, -ojv)
        d = [a + (n - o) for a, n, o in zip(previous[5:], new, old, strict=True)]
    dW, db, dvW, dvb, dx = d
    return x - alpha * dx, W - beta * dW, b - beta * db, vW - beta * dvW, vb - beta * dvb, k + 1, (x, W, b, vW, vb, *d)


def _lower_sgd(D, x, W, b, draws, beta, T):
    """T lower SGD steps, step t on the lower draw ξ_{k,t}."""
    for t in range(T):
        W, b = _req(W, b)
        gW, gb = grad(D.g_on(x, W, b, draws.lower(t)), (W, b))
        W, b = (W - beta * gW).detach(), (b - beta * gb).detach()
    return W, b


def _hvp(D, x, Wr, br, batch, vW, vb):
    """H(ξ) v: ∇_y g with a graph on the batch, then one backward of it."""
    gy = grad(D.g_on(x, Wr, br, batch), (Wr, br), create_graph=True)
    return grad(gy, (Wr, br), (vW, vb))


def _mixed(D, x, Wr, br, batch, vW, vb):
    """J(ξ) v."""
    xr = _req(x)[0]
    gy = grad(D.g_on(xr, Wr, br, batch), (Wr, br), create_graph=True)
    return grad(gy, xr, (vW, vb))[0]


def hand_stocbio(D, s, streams, alpha=10.0, beta=0.1, T=10, K=10):
    """StocBiO (η = β): T lower steps on ξ_{k,0…T−1}, ∇_y f on ζ_{k,0}, the Neumann series
    v = η Σ_q r_q with factor q on ξ_{k,T+q}, J v on ξ_{k,T+K}."""
    x, W, b, _, _, k, memory = s
    draws = streams.batch_at(k)
    W, b = _lower_sgd(D, x, W, b, draws, beta, T)
    Wr, br = _req(W, b)
    fW, fb = grad(D.f_on(Wr, br, draws.upper(0)), (Wr, br))
    rW, rb, sW, sb = fW, fb, fW, fb
    for q in range(K):
        hW, hb = _hvp(D, x, Wr, br, draws.lower(T + q), rW, rb)
        rW, rb = rW - beta * hW, rb - beta * hb
        sW, sb = sW + rW, sb + rb
    vW, vb = beta * sW, beta * sb
    jv = _mixed(D, x, Wr, br, draws.lower(T + K), vW, vb)
    return x + alpha * jv, W, b, vW, vb, k + 1, memory


def hand_amigo(D, s, streams, alpha=10.0, beta=0.1, T=10, N=10):
    """AmIGO (η = β): T lower steps on ξ_{k,0…T−1}, ∇_y f on ζ_{k,0}, N warm-started steps
    v ← v − η (H v − ∇_y f) with step n on ξ_{k,T+n}, J v on ξ_{k,T+N}."""
    x, W, b, vW, vb, k, memory = s
    draws = streams.batch_at(k)
    W, b = _lower_sgd(D, x, W, b, draws, beta, T)
    Wr, br = _req(W, b)
    fW, fb = grad(D.f_on(Wr, br, draws.upper(0)), (Wr, br))
    for n in range(N):
        hW, hb = _hvp(D, x, Wr, br, draws.lower(T + n), vW, vb)
        vW, vb = vW - beta * (hW - fW), vb - beta * (hb - fb)
    jv = _mixed(D, x, Wr, br, draws.lower(T + N), vW, vb)
    return x + alpha * jv, W, b, vW, vb, k + 1, memory


def hand_f2sa(D, s, streams, alpha=10.0, beta_y=0.1, beta_z=0.1, T=10, delta0=0.01, power=1 / 7):
    """F2SA: T steps of the shadow z (on ξ_{k,2t}) and of y on f + λ g (ζ_{k,t}, ξ_{k,2t+1}),
    then d = λ (∇_x g(x, y; ξ_{k,2T}) − ∇_x g(x, z; ξ_{k,2T+1})) and λ ← λ + δ_0 (k+1)^{−p}."""
    x, W, b, _, _, k, (zW, zb, lam) = s
    draws = streams.batch_at(k)
    for t in range(T):
        zW, zb = _req(zW, zb)
        gW, gb = grad(D.g_on(x, zW, zb, draws.lower(2 * t)), (zW, zb))
        zW, zb = (zW - beta_z * gW).detach(), (zb - beta_z * gb).detach()
        W, b = _req(W, b)
        fW, fb = grad(D.f_on(W, b, draws.upper(t)), (W, b))
        gW, gb = grad(D.g_on(x, W, b, draws.lower(2 * t + 1)), (W, b))
        W, b = (W - beta_y * (fW + lam * gW)).detach(), (b - beta_y * (fb + lam * gb)).detach()
    xr = _req(x)[0]
    (gx_y,) = grad(D.g_on(xr, W, b, draws.lower(2 * T)), xr)
    (gx_z,) = grad(D.g_on(xr, zW, zb, draws.lower(2 * T + 1)), xr)
    lam_next = lam + delta0 * (k + 1) ** -power
    return x - alpha * (lam * (gx_y - gx_z)), W, b, None, None, k + 1, (zW, zb, lam_next)


def hand_steps(D, streams):
    W0, b0 = torch.zeros(D.C, D.d, dtype=D.dtype, device=D.device), torch.zeros(D.C, dtype=D.dtype, device=D.device)
    schedules = bl.schedules.bamm_schedules(s=0.01, mu0=0.9, p=100.0, tau=0.01, strategy="s1")
    return {
        "GALET": lambda s: hand_galet(D, s),
        "sl-BAMM": lambda s: hand_slbamm(D, s, schedules),
        "BAGDC": lambda s: hand_bagdc(D, s),
        "AID-CG": lambda s: hand_aid_cg(D, s),
        "ITD": lambda s: hand_itd(D, s, W0, b0),
        "BOME": lambda s: hand_bome(D, s),
        "V-PBGD": lambda s: hand_vpbgd(D, s),
        "G-PBGD": lambda s: hand_gpbgd(D, s),
        "MEHA": lambda s: hand_meha(D, s),
        "IAPTT-GM": lambda s: hand_iaptt(D, s),
        "SOBA": lambda s: hand_soba(D, s, streams),
        "SABA": lambda s: hand_saba(D, s, streams),
        "SRBA": lambda s: hand_srba(D, s, streams),
        "MA-SOBA": lambda s: hand_masoba(D, s, streams),
        "StocBiO": lambda s: hand_stocbio(D, s, streams),
        "AmIGO": lambda s: hand_amigo(D, s, streams),
        "F2SA": lambda s: hand_f2sa(D, s, streams),
    }


def hand_init(D, name):
    """The hand loops' initial state: zeros, and the method's memory (the shadow starts at y_0 = 0)."""
    z = functools.partial(torch.zeros, dtype=D.dtype, device=D.device)
    memory = {
        "V-PBGD": lambda: (z(D.C, D.d), z(D.C)),
        "MEHA": lambda: (z(D.C, D.d), z(D.C)),
        "IAPTT-GM": lambda: (z(D.C, D.d), z(D.C)),
        "SABA": lambda: saba_memory(D),
        # the previous point (x, W, b, vW, vb) and the directions (D_W, D_b, D_vW, D_vb, D_x)
        "SRBA": lambda: (z(D.n), z(D.C, D.d), z(D.C), z(D.C, D.d), z(D.C), z(D.C, D.d), z(D.C), z(D.C, D.d), z(D.C), z(D.n)),
        "F2SA": lambda: (z(D.C, D.d), z(D.C), 1.0),
    }.get(name, lambda: None)()
    return (z(D.n), z(D.C, D.d), z(D.C), z(D.C, D.d), z(D.C), 0, memory)


# --------------------------------------------------------------------------- check and timing


class LibraryRun:
    """A library method on the benchmark's problem: the full-batch problem (batch ``None``), or,
    for the stochastic family, the stream problem with the Draws of iteration k (what
    ``bl.solve(problem, method, data=streams)`` passes)."""

    def __init__(self, method, D, streams):
        self.method, self.streams = method, streams
        self.streamed = isinstance(method, Stochastic)
        self.problem = D.stream_problem() if self.streamed else D.problem()

    def batch(self, k):
        return self.streams.batch_at(k) if self.streamed else None

    def init(self):
        return self.method.init(self.problem, batch=self.batch(0))

    def step(self, state):
        return self.method.step(self.problem, state, self.batch(state.k))


def check(names, iters=12, d=30, C=5, n=200, tol=1e-12, device="cpu"):
    """Iterates of library and hand loops equal in float64 after ``iters`` steps."""
    D = Data(d, C, n=n, dtype=torch.float64, device=device)
    streams = D.streams()
    lib, hand = library_methods(), hand_steps(D, streams)
    worst = {}
    for name in names:
        run = LibraryRun(lib[name], D, streams)
        state, hs = run.init(), hand_init(D, name)
        for _ in range(iters):
            state, _ = run.step(state)
            hs = hand[name](hs)
        if not (hs[0].abs().max() > 0 and hs[1].abs().max() > 0):
            raise SystemExit(f"{name}: x or y never moved in {iters} steps, so the check compares nothing: change the steps")
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
    streams = D.streams()
    lib, hand = library_methods(), hand_steps(D, streams)
    rows = []
    for name in names:
        run = LibraryRun(lib[name], D, streams)
        state = run.init()
        hs = hand_init(D, name)
        for _ in range(2):  # move away from zero (products with v = 0 are trivial)
            state, _ = run.step(state)
            hs = hand[name](hs)
        current = [state]

        def lib_step():
            # the state advances: SABA's tables are written in place, so a state is stepped once
            current[0] = run.step(current[0])[0]

        t_lib, t_hand = time_pair(lib_step, lambda: hand[name](hs), rounds, block, device, clock)
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
    p.add_argument("--methods", nargs="+", default=list(library_methods()), choices=list(library_methods()))
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
