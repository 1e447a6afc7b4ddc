"""The stochastic family on benchopt's "simulated" quadratic: suboptimality ‖∇F(x)‖² against
wall-clock time and against samples seen, median and 20–80 % band over seeds.

The problem is :func:`bilevel.problems.finite_sum_quadratic` (the benchmark's generator, in
torch); the hyper-parameters are benchopt's grid-search winners
(``config/quadratics_021424_best_params.yml``; SOBA has none there: its defaults) in the
benchmark's parameterisation (β₀ = ``step_size``, α₀ = β₀ / ``outer_ratio``, batch 64,
T = K = N = 10, x₀ = −2, y₀ = 0). Each run is a plain loop of ``method.step`` (no logging),
timed without the metric; the metric is evaluated every ``--eval-every`` iterations.

    PYTHONPATH=src python benchmarks/stochastic.py --seeds 10 --budget 4 --png docs/figures/stochastic_quadratic.png
    PYTHONPATH=src python benchmarks/stochastic.py --problem logreg --dtype float64 --seeds 10 --budget 2 \
        --png docs/figures/stochastic_logreg.png

``--device cuda`` puts the data and the variables on the GPU (drawn on the CPU, then moved);
the step time is measured with the device synchronised.

Default run time on a 2-core CPU: 6 methods × seeds × budget (+ the metric), ~5 min for
10 seeds at 4 s.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

import bilevel as bl  # noqa: E402
from bilevel.methods.stochastic import benchmark_steps  # noqa: E402
from common import environment, sync  # noqa: E402

#: benchopt's quadratics_021424 best parameters (β₀ = step_size, r = outer_ratio)
BEST_QUADRATIC = {
    "SOBA": {"step_size": 0.1, "outer_ratio": 1.0},  # no entry: the solver's defaults
    "SABA": {"step_size": 0.1, "outer_ratio": 1.0},
    "SRBA": {"step_size": 0.1, "outer_ratio": 1.0, "period_frac": 0.5},
    "StocBiO": {"step_size": 0.1, "outer_ratio": 1.0},
    "AmIGO": {"step_size": 0.01, "outer_ratio": 0.1},
    "F2SA": {"step_size": 0.1, "outer_ratio": 1.0, "delta_lmbda": 0.01, "lmbda0": 1.0},
}
METHODS = tuple(BEST_QUADRATIC)


def make_method(name: str, params: dict, inner_steps: int = 10) -> bl.Method:
    """Our method with benchopt's parameters (their conventions: η = β, T = K = N = 10)."""
    beta, ratio = params["step_size"], params["outer_ratio"]
    if name == "SOBA":
        return bl.SOBA(**benchmark_steps(beta, ratio, power=0.5))
    if name == "SABA":
        return bl.SABA(**benchmark_steps(beta, ratio))
    if name == "SRBA":
        return bl.SRBA(**benchmark_steps(beta, ratio), period_frac=params.get("period_frac", 0.5))
    if name == "StocBiO":
        return bl.StocBiO(**benchmark_steps(beta, ratio), lower_steps=inner_steps, neumann_steps=inner_steps)
    if name == "AmIGO":
        return bl.AmIGO(**benchmark_steps(beta, ratio), lower_steps=inner_steps, dual_steps=inner_steps)
    if name == "F2SA":
        return bl.F2SA(
            lr_lower=bl.Polynomial(beta, 5 / 7),
            lr_shadow=bl.Polynomial(beta, 4 / 7),
            lr_upper=bl.Polynomial(beta / ratio, 4 / 7),
            lambda0=params.get("lmbda0", 1.0),
            delta0=params.get("delta_lmbda", 0.1),
            lower_steps=inner_steps,
        )
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


def samples_per_iteration(method: bl.Method, b: int) -> float:
    """Samples one iteration draws (upper and lower; SRBA's refresh is added by the caller)."""
    name = method.name
    if name in ("SOBA", "MASOBA", "SABA"):
        return 2 * b
    if name == "SRBA":
        return 4 * b
    if name in ("StocBiO", "AmIGO"):
        return (method.lower_draws + 1) * b  # type: ignore[attr-defined]
    if name == "F2SA":
        steps = method.lower_steps  # type: ignore[attr-defined]
        return (3 * steps + 3) * b
    return 2 * b


def run(
    problem, method, streams, x0, budget: float, eval_every: int, max_iters: int = 10**9, metric=None, y0=None, device="cpu"
) -> list[dict]:
    """Steps until ``budget`` seconds of step time; records ``metric(state)`` (default: the
    problem's ‖∇F(x)‖²) every ``eval_every`` iterations under the key ``"subopt"``; the
    ``device`` is synchronised around each timed block."""
    metric = metric if metric is not None else (lambda state: problem.suboptimality(state.x))
    b = streams.lower.batch_size
    per_iter = samples_per_iteration(method, b)
    srba_period = None
    if method.name == "SRBA":
        from bilevel.parts.stochastic import sarah_period

        srba_period = sarah_period(streams.batch_at(0), method.period_frac)  # type: ignore[attr-defined]
    state = method.init(problem, x0=x0, y0=y0, batch=streams.batch_at(0))
    method.step(problem, state, streams.batch_at(0))  # untimed: the first call's lazy imports are not the method's cost
    records = [{"iteration": 0, "time": 0.0, "samples": 0.0, "subopt": metric(state)}]
    elapsed, samples, k = 0.0, 0.0, 0
    while elapsed < budget and k < max_iters:
        sync(device)
        start = time.perf_counter()
        for _ in range(eval_every):
            state, _ = method.step(problem, state, streams.batch_at(k))
            if srba_period is not None and k % srba_period == 0:
                samples += streams.lower.n + streams.upper.n
            else:
                samples += per_iter
            k += 1
        sync(device)
        elapsed += time.perf_counter() - start
        value = metric(state)
        records.append({"iteration": k, "time": elapsed, "samples": samples, "subopt": value})
        if not math.isfinite(value):
            break
    return records


def band(runs: list[list[dict]], key: str, grid: list[float]) -> tuple[list, list, list]:
    """Median and 20/80 % quantiles of the best suboptimality reached by ``key`` ≤ each grid point."""
    med, low, high = [], [], []
    for point in grid:
        values = []
        for records in runs:
            reached = [r["subopt"] for r in records if r[key] <= point and math.isfinite(r["subopt"])]
            values.append(min(reached) if reached else float("inf"))
        values.sort()
        q = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values * 9
        med.append(statistics.median(values))
        low.append(q[1])
        high.append(q[7])
    return med, low, high


def plot(results: dict, png: str, title: str, ylabel: str = "‖∇F(x)‖²") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in results.items():
        for ax, key in zip(axes, ("time", "samples"), strict=True):
            top = min(max(r[key] for r in records) for records in runs)
            grid = [top * i / 60 for i in range(1, 61)]
            med, low, high = band(runs, key, grid)
            (line,) = ax.plot(grid, med, label=name)
            ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2)
    for ax, label in zip(axes, ("wall-clock time (s)", "samples seen"), strict=True):
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


#: benchopt's datacleaning0_5 best parameters (F2SA: datacleaning0_5_021424)
BEST_DATACLEANING = {
    "SOBA": {"step_size": 1.0, "outer_ratio": 1e-4},
    "SABA": {"step_size": 0.1, "outer_ratio": 1e-3},
    "SRBA": {"step_size": 1e-3, "outer_ratio": 1e-5, "period_frac": 512.0},
    "StocBiO": {"step_size": 0.01, "outer_ratio": 1e-5},
    "AmIGO": {"step_size": 1e-3, "outer_ratio": 1e-5},
    "F2SA": {"step_size": 0.1, "outer_ratio": 1e-4, "delta_lmbda": 1.0, "lmbda0": 1.0},
}


def mnist_arrays() -> dict:
    """The local MNIST files (``bilevel.data``) in the layout of the benchmark's ``mnist.pkl``."""
    from bilevel.data.sources import load_mnist

    out = {}
    for split, prefix in (("train", "training"), ("test", "test")):
        images, labels = load_mnist(split=split)
        out[f"{prefix}_images"] = images.reshape(len(images), -1).astype("uint8")
        out[f"{prefix}_labels"] = labels.astype("uint8")
    return out


def datacleaning(ratio: float = 0.5, random_state: int = 32, reg: float = 0.2, dtype: torch.dtype = torch.float32, device="cpu"):
    """benchopt's MNIST data cleaning with the benchmark's split, corruption and scaling
    (``datasets/mnist.py``: n_train 20000, n_val 5000, test 10000, per-sample weights σ(x_i)
    on a multinomial logistic regression, ``reg ‖W‖²``). Returns ``(problem, data, test_error)``."""
    import numpy as np
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    mnist = mnist_arrays()
    rng = np.random.RandomState(random_state)
    X_train, X_val, y_train, y_val = train_test_split(
        mnist["training_images"], mnist["training_labels"].copy(), test_size=5000, train_size=20000, random_state=rng
    )
    corrupted = rng.rand(20000) < ratio
    y_train[corrupted] = rng.randint(0, 10, np.sum(corrupted))
    scaler = StandardScaler()
    X_train = scaler.fit_transform(X_train)
    X_test, X_val = scaler.transform(mnist["test_images"]), scaler.transform(X_val)
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype).to(device)
    tl = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64)).to(device)
    train = (t(X_train), tl(y_train), torch.arange(20000, device=device))
    val = (t(X_val), tl(y_val))
    X_te, y_te = t(X_test), tl(mnist["test_labels"])

    def ce(W, X, y):
        logits = X @ W
        return torch.logsumexp(logits, dim=1) - logits.gather(1, y[:, None])[:, 0]

    def lower(x, y, batch):
        X, labels, idx = bl.streams.lower_batch(batch) if batch is not None else train
        W = y["W"]
        return (torch.sigmoid(x["w"][idx]) * ce(W, X, labels)).mean() + reg * (W * W).sum()

    def upper(x, y, batch):
        X, labels = bl.streams.upper_batch(batch) if batch is not None else val
        return ce(y["W"], X, labels).mean()

    problem = bl.Problem(
        upper=upper,
        lower=lower,
        x_init={"w": -2.0 * torch.ones(20000, dtype=dtype, device=device)},
        y_init={"W": torch.zeros(784, 10, dtype=dtype, device=device)},
        name=f"MNIST data cleaning (ratio {ratio})",
    )

    def test_error(state) -> float:
        with torch.no_grad():
            return float(((X_te @ state.y["W"]).argmax(1) != y_te).double().mean())

    def streams(batch_size: int, seed: int) -> bl.Streams:
        return bl.Streams(upper=bl.Stream(val, batch_size=batch_size), lower=bl.Stream(train, batch_size=batch_size), seed=seed)

    return problem, streams, test_error


#: benchopt's ijcnn1_021424 best parameters (F2SA has none there: those of the quadratic)
BEST_LOGREG = {
    "SOBA": {"step_size": 0.03125, "outer_ratio": 0.01},
    "SABA": {"step_size": 0.25, "outer_ratio": 1.0},
    "SRBA": {"step_size": 0.5, "outer_ratio": 1.0, "period_frac": 0.5},
    "StocBiO": {"step_size": 0.25, "outer_ratio": 1.0},
    "AmIGO": {"step_size": 0.125, "outer_ratio": 0.1},
    "F2SA": {"step_size": 0.1, "outer_ratio": 1.0, "delta_lmbda": 0.01, "lmbda0": 1.0},
}


def logreg(dtype: torch.dtype = torch.float64, device="cpu", split_seed: int = 0):
    """The benchmark's ijcnn1/covtype problem — per-feature L2 penalties of a logistic
    regression — on scikit-learn's embedded ``digits`` (1797 × 64, label +1 for digits ≥ 5):

        g(x, y) = mean_i log(1 + exp(−b_i ⟨a_i, y⟩)) + ½ Σ_j exp(x_j) y_j²     (inner: 2/3)
        f(x, y) = mean_i log(1 + exp(−b_i ⟨a_i, y⟩))                          (outer: 1/3)

    ``datasets/ijcnn1.py``'s definition with ``reg_parametrization="exp"``. covtype and ijcnn1
    come from the LIBSVM site (a download at run time, not possible offline); digits ships
    inside scikit-learn, is a real dataset with heterogeneous features (some constant zero,
    where per-feature penalties matter) and, like ijcnn1 (22 features), few of them. Features
    are standardised on the inner part. The metrics are the benchmark's: ``value_func`` =
    F(x) = f(x, y*(x)) and ``value`` = ‖∇F(x)‖², with y*(x) from Newton's method (d = 64: the
    Hessian is formed in closed form) and ∇F by the implicit function theorem with exact
    matrices.
    Returns ``(problem, streams, metrics, (x0, y0))``; the start is the benchmark's
    (y₀ ~ N(0, 1), x₀ = log U(0, 1), seeded).
    """
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    digits = load_digits()
    labels = np.where(digits.target >= 5, 1.0, -1.0)
    A_in, A_out, b_in, b_out = train_test_split(digits.data, labels, test_size=1 / 3, random_state=split_seed)
    scaler = StandardScaler().fit(A_in)
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype).to(device)
    inner, outer = (t(scaler.transform(A_in)), t(b_in)), (t(scaler.transform(A_out)), t(b_out))
    dim = inner[0].shape[1]

    def logistic(y, data):
        A, b = data
        return torch.nn.functional.softplus(-b * (A @ y)).mean()

    def lower(x, y, batch):
        data = bl.streams.lower_batch(batch) if batch is not None else inner
        return logistic(y["w"], data) + 0.5 * (torch.exp(x["lam"]) * y["w"] ** 2).sum()

    def upper(x, y, batch):
        data = bl.streams.upper_batch(batch) if batch is not None else outer
        return logistic(y["w"], data)

    problem = bl.Problem(
        upper=upper,
        lower=lower,
        x_init={"lam": torch.zeros(dim, dtype=dtype, device=device)},
        y_init={"w": torch.zeros(dim, dtype=dtype, device=device)},
        name="logistic regression with per-feature L2 penalties (digits ≥ 5)",
    )

    A_inner, b_inner = inner
    A_outer, b_outer = outer

    def inner_derivatives(lam, w):
        """∇_y g, ∇²_yy g and ∂(∇_y g)/∂x on the whole inner set, in closed form."""
        s = torch.sigmoid(-b_inner * (A_inner @ w))
        grad = -(A_inner.T @ (b_inner * s)) / len(b_inner) + torch.exp(lam) * w
        hess = (A_inner.T * (s * (1 - s))) @ A_inner / len(b_inner) + torch.diag(torch.exp(lam))
        return grad, hess, torch.diag(torch.exp(lam) * w)

    def metrics(state) -> dict:
        lam = state.x["lam"].detach()
        w = torch.zeros(dim, dtype=dtype, device=device)
        for _ in range(100):  # Newton on the strongly convex inner problem (quadratic convergence)
            grad, hess, _ = inner_derivatives(lam, w)
            w = w - torch.linalg.solve(hess, grad)
            if float(grad.norm()) < 1e-12:
                break
        _, hess, mixed = inner_derivatives(lam, w)
        grad_f = -(A_outer.T @ (b_outer * torch.sigmoid(-b_outer * (A_outer @ w)))) / len(b_outer)
        grad_F = -mixed.T @ torch.linalg.solve(hess, grad_f)  # ∇F = −(∂∇_y g/∂x)ᵀ H⁻¹ ∇_y f
        return {"value_func": float(logistic(w, outer)), "value": float(grad_F @ grad_F), "grad": grad_F}

    gen = torch.Generator().manual_seed(split_seed)
    start = (
        {"lam": torch.log(torch.rand(dim, generator=gen, dtype=dtype)).to(device)},
        {"w": torch.randn(dim, generator=gen, dtype=dtype).to(device)},
    )

    def streams(batch_size: int, seed: int) -> bl.Streams:
        return bl.Streams(upper=bl.Stream(outer, batch_size=batch_size), lower=bl.Stream(inner, batch_size=batch_size), seed=seed)

    return problem, streams, metrics, start


def quadratic(n_lower: int, n_upper: int, dim_x: int, dim_y: int, dtype: torch.dtype, device="cpu"):
    """The data are drawn on the CPU (seeded) and moved to ``device``."""
    return bl.problems.finite_sum_quadratic(
        n_lower=n_lower, n_upper=n_upper, dim_x=dim_x, dim_y=dim_y, mu=0.1, seed=2442, dtype=dtype, device=device
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="quadratic", choices=["quadratic", "datacleaning", "logreg"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of step time per run")
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-lower", type=int, default=4096)
    parser.add_argument("--n-upper", type=int, default=1024)
    parser.add_argument("--dim-x", type=int, default=10)
    parser.add_argument("--dim-y", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (data drawn on the CPU, then moved; timings synchronise the device)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.problem == "quadratic":
        problem = quadratic(args.n_lower, args.n_upper, args.dim_x, args.dim_y, dtype, args.device)
        x0, y0 = {"x": -2.0 * torch.ones(args.dim_x, dtype=dtype, device=args.device)}, None
        best, metric, make_streams = BEST_QUADRATIC, None, problem.streams
    elif args.problem == "logreg":
        problem, make_streams, metrics, (x0, y0) = logreg(dtype=dtype, device=args.device)
        best, metric = BEST_LOGREG, lambda state: metrics(state)["value"]
    else:
        problem, make_streams, metric = datacleaning(dtype=dtype, device=args.device)
        x0, y0, best = None, None, BEST_DATACLEANING
    print(f"# {environment(args.device)}, {problem.name}, batch {args.batch_size}, {args.dtype}")
    results: dict = {}
    for name in args.methods:
        method = make_method(name, best[name])
        runs = []
        for seed in range(1, args.seeds + 1):
            streams = make_streams(batch_size=args.batch_size, seed=seed)
            runs.append(run(problem, method, streams, x0, args.budget, args.eval_every, metric=metric, y0=y0, device=args.device))
        results[name] = runs
        finals = sorted(min(r["subopt"] for r in records) for records in runs)
        its = statistics.median(records[-1]["iteration"] for records in runs)
        low, mid = finals[len(finals) // 5], statistics.median(finals)
        what = "‖∇F‖²" if metric is None or args.problem == "logreg" else "test error"
        print(f"{name:8s} median best {what} {mid:.3e}  [20%: {low:.3e}]  iterations in {args.budget:g}s: {its:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    if args.png:
        label = "‖∇F(x)‖²" if metric is None or args.problem == "logreg" else "test error"
        plot(results, args.png, f"{problem.name}, {args.seeds} seeds, median and 20–80 % band", label)
    return results


if __name__ == "__main__":
    main()
