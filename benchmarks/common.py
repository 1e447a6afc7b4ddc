"""Shared pieces of the benchmarks: problems, method configurations, timers, environment.

Everything here is self-contained (random data with fixed seeds), so each figure is
reproducible with one command and needs no download. Import from a script in this folder
(``python benchmarks/<script>.py``); the scripts put ``src/`` on ``sys.path`` themselves.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bilevel as bl  # noqa: E402
from bilevel.linsolve import CG, Neumann  # noqa: E402

# --------------------------------------------------------------------------- environment


def environment(device: str = "cpu") -> str:
    """One line: python, torch, threads, CPU model (lscpu) or GPU name."""
    cpu = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                cpu = line.split(":", 1)[1].strip()
    except Exception:  # pragma: no cover - lscpu missing
        pass
    dev = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else f"cpu ({cpu})"
    return f"python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}, device {dev}"


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


#: the clock of :func:`timeit`: ``time.perf_counter`` (wall, default) or ``time.process_time``
#: (``--clock cpu``: the process's CPU time, which leaves out waiting for a core on a shared
#: machine; for single-threaded CPU runs only)
CLOCK = time.perf_counter


def timeit(fn, repeats: int = 10, warmup: int = 2, device="cpu", stat: str = "min") -> float:
    """Time of ``fn()`` in seconds by :data:`CLOCK` (after ``warmup`` calls): the minimum over
    ``repeats`` (robust to other processes on a shared machine) or the median (``stat="median"``)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        sync(device)
        times.append(CLOCK() - start)
    return min(times) if stat == "min" else statistics.median(times)


# --------------------------------------------------------------------------- problems


def _ce_per_example(logits, labels):
    return F.cross_entropy(logits, labels, reduction="none")


def linear_model(y, X):
    # W stored [out, in] with F.linear: the weight gradient of the backward is the fast
    # Gᵀ X product (X @ W with W [in, out] made every step 2.3× slower on a CPU)
    return F.linear(X, y["W"], y["b"])


def mlp_model(y, X):
    return F.linear(torch.sigmoid(F.linear(X, y["W1"], y["b1"])), y["W2"], y["b2"])


def hyperclean_problem(
    model: str = "linear",
    n_train: int = 5000,
    n_val: int = 5000,
    features: int = 784,
    classes: int = 10,
    hidden: int = 300,
    seed: int = 0,
    device="cpu",
    dtype=torch.float32,
    use_dataset: bool = False,
):
    """Data hyper-cleaning, MNIST-sized by default.

    x = {"logit": (n_train,)} per-example weight logits; y = the classifier's parameters
    (``linear``: 784→10; ``mlp``: 784→hidden(sigmoid)→10), weights stored ``[out, in]``
    and applied with ``F.linear`` (the fast layout on a CPU).
    g(x, y) = mean_i σ(x_i) CE_i(y) on the (noisy) training set, f(x, y) = CE on validation.
    Random Gaussian features and random labels (``use_dataset=True`` tries
    ``bilevel.data.make_hyperclean_data("mnist5k")`` instead; it needs the files).
    """
    gen = torch.Generator().manual_seed(seed)
    if use_dataset:
        data = bl.data.make_hyperclean_data("mnist5k", n_train=n_train, n_val=n_val)
        Xtr, ytr, Xva, yva = data.x_train, data.y_train, data.x_val, data.y_val
        features, classes = Xtr.shape[1], int(max(ytr.max(), yva.max())) + 1
    else:
        Xtr = torch.randn(n_train, features, generator=gen) / features**0.5
        Xva = torch.randn(n_val, features, generator=gen) / features**0.5
        ytr = torch.randint(0, classes, (n_train,), generator=gen)
        yva = torch.randint(0, classes, (n_val,), generator=gen)
    Xtr, Xva = Xtr.to(device, dtype), Xva.to(device, dtype)
    ytr, yva = ytr.to(device), yva.to(device)
    net = linear_model if model == "linear" else mlp_model

    def lower(x, y, batch):
        return (torch.sigmoid(x["logit"]) * _ce_per_example(net(y, Xtr), ytr)).mean()

    def upper(x, y, batch):
        return F.cross_entropy(net(y, Xva), yva)

    x0 = {"logit": torch.zeros(n_train, device=device, dtype=dtype)}
    if model == "linear":
        y0 = {"W": torch.zeros(classes, features, device=device, dtype=dtype), "b": torch.zeros(classes, device=device, dtype=dtype)}
    else:
        y0 = {
            # the draws of the former [in, out] layout, transposed to [out, in]
            "W1": (torch.randn(features, hidden, generator=gen) / features**0.5).T.contiguous().to(device, dtype),
            "b1": torch.zeros(hidden, device=device, dtype=dtype),
            "W2": (torch.randn(hidden, classes, generator=gen) / hidden**0.5).T.contiguous().to(device, dtype),
            "b2": torch.zeros(classes, device=device, dtype=dtype),
        }
    return bl.Problem(upper=upper, lower=lower, x_init=x0, y_init=y0, name=f"hyperclean-{model}")


def logistic_problem(dim: int = 1000, n: int = 2000, seed: int = 0, device="cpu", dtype=torch.float32):
    """Regularisation selection for logistic regression, size ``dim``.

    y = {"w": (dim,)}, x = {"lam": (dim,)} per-coordinate log-penalties;
    g = mean logistic loss on training + ½ Σ exp(lam_j) w_j²  (strongly convex),
    f = mean logistic loss on validation.
    """
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(dim, generator=gen)
    Xtr = torch.randn(n, dim, generator=gen) / dim**0.5
    Xva = torch.randn(n, dim, generator=gen) / dim**0.5
    btr = torch.sign(Xtr @ w_true + 0.5 * torch.randn(n, generator=gen))
    bva = torch.sign(Xva @ w_true + 0.5 * torch.randn(n, generator=gen))
    Xtr, Xva, btr, bva = (t.to(device, dtype) for t in (Xtr, Xva, btr, bva))

    def lower(x, y, batch):
        return F.softplus(-btr * (Xtr @ y["w"])).mean() + 0.5 * (torch.exp(x["lam"]) * y["w"] ** 2).sum()

    def upper(x, y, batch):
        return F.softplus(-bva * (Xva @ y["w"])).mean()

    x0 = {"lam": torch.full((dim,), -2.0, device=device, dtype=dtype)}
    y0 = {"w": torch.zeros(dim, device=device, dtype=dtype)}
    return bl.Problem(upper=upper, lower=lower, x_init=x0, y_init=y0, name=f"logistic-{dim}")


# --------------------------------------------------------------------------- methods


def methods(itd_steps: int = 20) -> dict:
    """The benchmarked configurations (same hyper-parameters everywhere)."""
    off = {"stability_check": "off"}
    return {
        "GALET": bl.GALET(lr_upper=0.1, lr_lower=0.1, lower_steps=5, lr_shadow=0.1, shadow_steps=10, **off),
        "SlBAMM": bl.SlBAMM.from_strategy(s=0.01, mu0=0.9, p=100.0, tau=0.01, strategy="s1", **off),
        "BAGDC": bl.BAGDC(lr_upper=0.01, lr_lower=0.1, lr_dual=0.1, **off),
        "AID-CG": bl.AID(lr_upper=0.1, lr_lower=0.1, lower_steps=10, solver=CG(steps=10)),
        "AID-Neumann": bl.AID(lr_upper=0.1, lr_lower=0.1, lower_steps=10, solver=Neumann(steps=10, lr=0.1)),
        "ITD": bl.ITD(lr_upper=0.1, lr_lower=0.1, lower_steps=itd_steps),
    }


def add_common_args(parser):
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="wall clock, or CPU time (one thread, CPU only)")
    return parser


def apply_common_args(args):
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if args.device != "cpu" or args.threads != 1:
            raise SystemExit("--clock cpu measures the CPU time of one thread: use it with --device cpu --threads 1")
        CLOCK = time.process_time
    return getattr(torch, args.dtype)
