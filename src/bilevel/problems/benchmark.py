"""The stochastic benchmark problems of benchopt's ``benchmark_bilevel``, on sample streams.

Three problems on which the stochastic family (SOBA, SABA, SRBA, StocBiO, AmIGO, F2SA;
docs/stochastic.md) is compared, each with its metric and its start:

* :func:`quadratic`: the "simulated" quadratic (:func:`~bilevel.problems.finite_sum_quadratic`,
  n = 4096 lower and m = 1024 upper samples, d_x = 10, d_y = 20, μ = 0.1, data seed 2442),
  metric ``‖∇F(x)‖²`` in closed form, start x₀ = −2·1, y₀ = 0;
* :func:`datacleaning`: MNIST data cleaning (20000 training examples of which half carry a
  random label, 5000 clean validation, 10000 test; per-sample weights σ(x_i) on a
  multinomial logistic regression with ``0.2 ‖W‖²``), metric the test error, start
  x₀ = −2·1, W₀ = 0; needs the MNIST files (``bilevel data``) and scikit-learn;
* :func:`logreg`: per-feature L2 penalties of a logistic regression (the benchmark's
  ijcnn1/covtype problem) on scikit-learn's ``digits``, metric ``‖∇F(x)‖²`` with y*(x) by
  Newton's method, a seeded random start.

:func:`stochastic_benchmark` returns any of them as a :class:`StochasticBenchmark` (problem,
streams, evaluation, start): what ``problem.kind: stochastic`` in an experiment
configuration runs (docs/experiments.md). :func:`samples_seen` counts the samples a method
has drawn after k iterations, the benchmark's x-axis.

Example:
    >>> import bilevel as bl
    >>> from bilevel.problems.benchmark import stochastic_benchmark
    >>> bench = stochastic_benchmark("quadratic", n_lower=256, n_upper=128, dim_x=3, dim_y=4)
    >>> start = bench.evaluate(bl.State(x=bench.problem.x_init, y=None))["suboptimality"]   # ‖∇F(x₀)‖², x₀ = −2·1
    >>> result = bl.solve(bench.problem, bl.SABA(lr_lower=0.1, lr_upper=0.1), data=bench.streams(batch_size=16, seed=1), max_iters=300)
    >>> bench.evaluate(result.state)["suboptimality"] < 1e-2 * start
    True

Reference: M. Dagréou, T. Moreau, S. Vaiter, P. Ablin, "A framework for bilevel
optimization that enables stochastic and global variance reduction algorithms", NeurIPS
2022 (the benchmark: github.com/benchopt/benchmark_bilevel).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..problem import Problem
from ..streams import Stream, Streams, lower_batch, upper_batch
from .finite_sum import FiniteSumQuadratic, finite_sum_quadratic

__all__ = [
    "NAMES",
    "StochasticBenchmark",
    "datacleaning",
    "logreg",
    "mnist_arrays",
    "quadratic",
    "samples_per_iteration",
    "samples_seen",
    "stochastic_benchmark",
]

#: the problems of :func:`stochastic_benchmark`
NAMES = ("quadratic", "datacleaning", "logreg")


def quadratic(
    n_lower: int = 4096,
    n_upper: int = 1024,
    dim_x: int = 10,
    dim_y: int = 20,
    dtype: torch.dtype = torch.float32,
    device: Any = "cpu",
    seed: int = 2442,
) -> FiniteSumQuadratic:
    """The benchmark's simulated quadratic (μ = 0.1); the data are drawn on the CPU
    (seeded by ``seed``) and moved to ``device``."""
    return finite_sum_quadratic(n_lower=n_lower, n_upper=n_upper, dim_x=dim_x, dim_y=dim_y, mu=0.1, seed=seed, dtype=dtype, device=device)


def mnist_arrays(root: str | os.PathLike | None = None) -> dict:
    """The local MNIST files (``bilevel.data``) in the layout of the benchmark's ``mnist.pkl``;
    ``root`` is searched first (a missing file raises the library's ``DatasetNotFoundError``,
    whose message says how to install it)."""
    from ..data.sources import load_mnist

    out = {}
    for split, prefix in (("train", "training"), ("test", "test")):
        images, labels = load_mnist(root, split=split)
        out[f"{prefix}_images"] = images.reshape(len(images), -1).astype("uint8")
        out[f"{prefix}_labels"] = labels.astype("uint8")
    return out


def datacleaning(
    ratio: float = 0.5,
    random_state: int = 32,
    reg: float = 0.2,
    dtype: torch.dtype = torch.float32,
    device: Any = "cpu",
    data_dir: str | os.PathLike | None = None,
) -> tuple[Problem, Callable[..., Streams], Callable[[Any], float]]:
    """benchopt's MNIST data cleaning with the benchmark's split, corruption and scaling
    (``datasets/mnist.py``: n_train 20000, n_val 5000, test 10000, per-sample weights σ(x_i)
    on a multinomial logistic regression, ``reg ‖W‖²``)::

        g(x, W) = (1/n) Σ_i σ(x_i) CE(W; a_i, b̃_i) + reg ‖W‖²      (noisy training set)
        f(x, W) = (1/m) Σ_j CE(W; a_j, b_j)                         (clean validation set)

    A fraction ``ratio`` of the training labels is redrawn uniformly from the 10 classes
    (seeded by ``random_state``, as the split). Returns ``(problem, streams, test_error)``:
    ``streams(batch_size, seed)`` makes the sample streams, ``test_error(state)`` the error
    of ``state.y`` on the 10000 test images."""
    import numpy as np
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    mnist = mnist_arrays(data_dir)
    rng = np.random.RandomState(random_state)
    X_train, X_val, y_train, y_val = train_test_split(
        mnist["training_images"], mnist["training_labels"].copy(), test_size=5000, train_size=20000, random_state=rng
    )
    corrupted = rng.rand(20000) < ratio
    y_train[corrupted] = rng.randint(0, 10, int(np.sum(corrupted)))
    scaler = StandardScaler()
    X_train = scaler.fit_transform(X_train)
    X_test, X_val = scaler.transform(mnist["test_images"]), scaler.transform(X_val)
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype).to(device)
    tl = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64)).to(device)
    train = (t(X_train), tl(y_train), torch.arange(20000, device=device))
    val = (t(X_val), tl(y_val))
    X_te, y_te = t(X_test), tl(mnist["test_labels"])

    def ce(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = X @ W
        return torch.logsumexp(logits, dim=1) - logits.gather(1, y[:, None])[:, 0]

    def lower(x: dict, y: dict, batch: Any) -> torch.Tensor:
        X, labels, idx = lower_batch(batch) if batch is not None else train
        W = y["W"]
        loss: torch.Tensor = (torch.sigmoid(x["w"][idx]) * ce(W, X, labels)).mean() + reg * (W * W).sum()
        return loss

    def upper(x: dict, y: dict, batch: Any) -> torch.Tensor:
        X, labels = upper_batch(batch) if batch is not None else val
        return ce(y["W"], X, labels).mean()

    problem = Problem(
        upper=upper,
        lower=lower,
        x_init={"w": -2.0 * torch.ones(20000, dtype=dtype, device=device)},
        y_init={"W": torch.zeros(784, 10, dtype=dtype, device=device)},
        name=f"MNIST data cleaning (ratio {ratio})",
    )

    def test_error(state: Any) -> float:
        with torch.no_grad():
            return float(((X_te @ state.y["W"]).argmax(1) != y_te).double().mean())

    def streams(batch_size: int, seed: int) -> Streams:
        return Streams(upper=Stream(val, batch_size=batch_size), lower=Stream(train, batch_size=batch_size), seed=seed)

    return problem, streams, test_error


def logreg(
    dtype: torch.dtype = torch.float64, device: Any = "cpu", split_seed: int = 0
) -> tuple[Problem, Callable[..., Streams], Callable[[Any], dict], tuple[dict, dict]]:
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
    (y₀ ~ N(0, 1), x₀ = log U(0, 1), seeded by ``split_seed``, which also seeds the split).
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

    def logistic(y: torch.Tensor, data: tuple) -> torch.Tensor:
        A, b = data
        return torch.nn.functional.softplus(-b * (A @ y)).mean()

    def lower(x: dict, y: dict, batch: Any) -> torch.Tensor:
        data = lower_batch(batch) if batch is not None else inner
        loss: torch.Tensor = logistic(y["w"], data) + 0.5 * (torch.exp(x["lam"]) * y["w"] ** 2).sum()
        return loss

    def upper(x: dict, y: dict, batch: Any) -> torch.Tensor:
        data = upper_batch(batch) if batch is not None else outer
        return logistic(y["w"], data)

    problem = Problem(
        upper=upper,
        lower=lower,
        x_init={"lam": torch.zeros(dim, dtype=dtype, device=device)},
        y_init={"w": torch.zeros(dim, dtype=dtype, device=device)},
        name="logistic regression with per-feature L2 penalties (digits ≥ 5)",
    )

    A_inner, b_inner = inner
    A_outer, b_outer = outer

    def inner_derivatives(lam: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """∇_y g, ∇²_yy g and ∂(∇_y g)/∂x on the whole inner set, in closed form."""
        s = torch.sigmoid(-b_inner * (A_inner @ w))
        grad = -(A_inner.T @ (b_inner * s)) / len(b_inner) + torch.exp(lam) * w
        hess = (A_inner.T * (s * (1 - s))) @ A_inner / len(b_inner) + torch.diag(torch.exp(lam))
        return grad, hess, torch.diag(torch.exp(lam) * w)

    def metrics(state: Any) -> dict:
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

    def streams(batch_size: int, seed: int) -> Streams:
        return Streams(upper=Stream(outer, batch_size=batch_size), lower=Stream(inner, batch_size=batch_size), seed=seed)

    return problem, streams, metrics, start


@dataclass(frozen=True)
class StochasticBenchmark:
    """One benchmark problem ready to run: the problem (its ``x_init``/``y_init`` are the
    benchmark's start), the streams and the evaluation.

    Attributes:
        name: ``quadratic``, ``datacleaning`` or ``logreg``.
        problem: the :class:`~bilevel.Problem`.
        streams: ``streams(batch_size, seed) -> Streams``; the data are fixed, ``seed`` only
            chooses the draws.
        evaluate: ``evaluate(state) -> {metric: value}``: ``suboptimality`` (‖∇F(x)‖², the
            quadratic and logreg; logreg also ``value_func`` = F(x)) or ``test_error`` and
            ``test_accuracy`` (%) (data cleaning).
        metric: the headline key of ``evaluate``'s result, lower is better.
    """

    name: str
    problem: Problem
    streams: Callable[..., Streams]
    evaluate: Callable[[Any], dict]
    metric: str


def stochastic_benchmark(
    name: str,
    *,
    seed: int | None = None,
    n_lower: int = 4096,
    n_upper: int = 1024,
    dim_x: int = 10,
    dim_y: int = 20,
    noise_rate: float = 0.5,
    reg: float = 0.2,
    dtype: torch.dtype | None = None,
    device: Any = "cpu",
    data_dir: str | os.PathLike | None = None,
) -> StochasticBenchmark:
    """The benchmark problem ``name`` with its start and its metric.

    Args:
        name: ``quadratic`` (:func:`quadratic`), ``datacleaning`` (:func:`datacleaning`) or
            ``logreg`` (:func:`logreg`).
        seed: the data's seed (default the benchmark's: 2442, 32, 0): the quadratic's
            draw, the data cleaning's split and corruption, logreg's split and start.
        n_lower: the quadratic's lower samples n.
        n_upper: the quadratic's upper samples m.
        dim_x: the quadratic's d_x.
        dim_y: the quadratic's d_y.
        noise_rate: data cleaning's corrupted fraction.
        reg: data cleaning's ``reg ‖W‖²``.
        dtype: float32 by default (logreg: float64, its Newton metric reaches 1e-20).
        device: where the data and the variables live.
        data_dir: searched first for the MNIST files (data cleaning).
    """
    if name == "quadratic":
        problem = quadratic(n_lower, n_upper, dim_x, dim_y, dtype or torch.float32, device, seed=2442 if seed is None else seed)
        start = {"x": -2.0 * torch.ones(dim_x, dtype=problem.x_init["x"].dtype, device=problem.x_init["x"].device)}
        return StochasticBenchmark(
            name,
            dataclasses.replace(problem, x_init=start),
            problem.streams,
            lambda state: {"suboptimality": problem.suboptimality(state.x)},
            "suboptimality",
        )
    if name == "datacleaning":
        clean, make_streams, test_error = datacleaning(
            noise_rate, 32 if seed is None else seed, reg, dtype or torch.float32, device, data_dir=data_dir
        )

        def cleaning_metrics(state: Any) -> dict:
            error = test_error(state)
            return {"test_error": error, "test_accuracy": 100.0 * (1.0 - error)}

        return StochasticBenchmark(name, clean, make_streams, cleaning_metrics, "test_error")
    if name == "logreg":
        penalties, make_streams, metrics, (x0, y0) = logreg(dtype or torch.float64, device, split_seed=0 if seed is None else seed)

        def logreg_metrics(state: Any) -> dict:
            values = metrics(state)
            return {"suboptimality": values["value"], "value_func": values["value_func"]}

        return StochasticBenchmark(
            name, dataclasses.replace(penalties, x_init=x0, y_init=y0), make_streams, logreg_metrics, "suboptimality"
        )
    raise ValueError(f"stochastic_benchmark(name={name!r}) is not one of {', '.join(NAMES)}")


def samples_per_iteration(method: Any, b: int) -> float:
    """Samples one iteration draws, upper and lower, at batch size b (the benchmark's count;
    SRBA's periodic full refresh is counted by :func:`samples_seen`)."""
    name = method.name
    if name in ("SOBA", "MASOBA", "SABA"):
        return float(2 * b)
    if name == "SRBA":
        return float(4 * b)
    if name in ("StocBiO", "AmIGO"):
        return float((method.lower_draws + 1) * b)
    if name == "F2SA":
        return float((3 * method.lower_steps + 3) * b)
    return float(2 * b)


def samples_seen(method: Any, streams: Streams, k: int) -> float:
    """The samples drawn in iterations 0 … k − 1: ``k · samples_per_iteration``, except for
    SRBA, whose iterations ``i ≡ 0 (mod q)`` read all n + m samples. A pure function of k (a
    resumed run counts as an uninterrupted one)."""
    per_iteration = samples_per_iteration(method, int(streams.lower.batch_size))  # type: ignore[arg-type]
    if method.name != "SRBA":
        return float(k * per_iteration)
    from ..parts.stochastic import sarah_period

    period = method.period or sarah_period(streams.batch_at(0), method.period_frac)
    refreshes = math.ceil(k / period)
    return float(refreshes * (streams.lower.n + streams.upper.n) + (k - refreshes) * per_iteration)
