"""Data hyper-cleaning as a bilevel problem (docs/algorithms.md#data-hyper-cleaning).

A training set ``{(a_i, b̃_i)}`` with partly corrupted labels, a clean validation set
``{(a'_j, b'_j)}``. The upper variable holds one weight logit per training example,
``x = {"weights": x ∈ R^{n_train}}`` (weights ``σ(x_i)``, started at ``x = 0``); the lower
variable ``y`` is the classifier's parameters (a dict of tensors)::

    g(x, y) = (1/n_tr) Σ_i σ(x_i) · CE(h_y(a_i), b̃_i)  +  (reg/2) ‖y‖²
    f(x, y) = (1/n_val) Σ_j CE(h_y(a'_j), b'_j)

Classifiers ``h_y`` (``model``):

* ``"linear"``: ``h(a) = a Wᵀ + b``, ``W ∈ R^{C×d}`` (convex lower level; init at zero);
* ``"mlp"``: ``h(a) = sigmoid(a W₁ᵀ + b₁) W₂ᵀ + b₂`` with 300 hidden units (PBGD protocol);
* ``"two_layer"``: ``h(a) = (a W₁ᵀ + b₁) W₂ᵀ + b₂``, two linear layers **without**
  activation (Liu-group "nonconvex" protocol).

Weights are stored ``[out, in]`` as in ``nn.Linear`` (see :func:`init_classifier`).

Hidden-layer models start from PyTorch's default ``nn.Linear`` initialisation
(``U(−1/√fan_in, 1/√fan_in)`` for weights and biases) drawn from a seeded
``torch.Generator``, so a seed gives the same start on every machine and device.
Everything is written with differentiable torch ops (``log_softmax``), so double
backward (Hessian- and mixed-vector products) works. Devices and dtypes follow the data:
move the data with ``data.to(device, dtype)`` before building the problem.

Example:
    >>> import torch, bilevel as bl
    >>> from bilevel.data import hyperclean_from_arrays
    >>> g = torch.Generator().manual_seed(0)
    >>> images = torch.randn(300, 5, generator=g).numpy(); labels = (images[:, 0] > 0).astype("int64")
    >>> data = hyperclean_from_arrays(images, labels, num_classes=2, max_pixel=1.0, name="blobs",
    ...                               noise_rate=0.5, seed=0, n_train=100, n_val=100, n_test=100)
    >>> problem = hyperclean_problem(data, model="linear")
    >>> sorted(problem.y_init), problem.x_init["weights"].shape
    (['W', 'b'], torch.Size([100]))
    >>> result = bl.solve(problem, bl.AID(lr_upper=bl.Adam(0.1), lr_lower=0.5, lower_steps=20), max_iters=20)
    >>> sorted(problem.evaluate(result.x, result.y))[:3]
    ['f1', 'paper_recall', 'precision']
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data.hyperclean import HypercleanData, cleaner_metrics
from ..problem import Problem
from ..validation import check_count, check_nonnegative
from ._init import check_model_memory, seeded_uniform

__all__ = [
    "HYPERCLEAN_MODELS",
    "HypercleanProblem",
    "classifier_logits",
    "classifier_sizes",
    "fit_lower",
    "hyperclean_problem",
    "init_classifier",
]

HYPERCLEAN_MODELS = ("linear", "mlp", "two_layer")


def init_classifier(
    model: str,
    num_features: int,
    num_classes: int,
    hidden: int = 300,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: Any = None,
) -> dict:
    """Initial classifier parameters ``y`` for ``model`` (see the module docstring).

    ``"linear"`` starts at zero (the lower problem is convex; zero is the papers' start);
    the two-layer models use ``nn.Linear``'s default ``U(−1/√fan_in, 1/√fan_in)`` drawn from
    ``torch.Generator().manual_seed(seed)`` on the CPU, then moved to ``device``.
    Weights are stored ``[out, in]`` (as ``nn.Linear``), ``h(a) = a Wᵀ + b`` computed by
    ``F.linear``: on a CPU its backward product is about twice as fast as that of ``a @ W``
    with ``W`` stored ``[in, out]`` (benchmarks/floor.py). The seeded draws are the same
    numbers as bilevel 0.1's ``[in, out]`` weights, transposed.
    """
    if model not in HYPERCLEAN_MODELS:
        raise ValueError(f"unknown hyper-cleaning model {model!r}; choose one of {', '.join(HYPERCLEAN_MODELS)}")
    if model == "linear":
        return {
            "W": torch.zeros(num_classes, num_features, dtype=dtype, device=device),
            "b": torch.zeros(num_classes, dtype=dtype, device=device),
        }
    check_count("init_classifier", "hidden", hidden)
    generator = torch.Generator().manual_seed(int(seed))

    def uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        # float64 draws (the same start for every dtype), converted block by block
        return seeded_uniform(shape, 1.0 / math.sqrt(fan_in), generator, dtype, device)

    # drawn [in, out] in this order (the starts of bilevel 0.1), stored [out, in]
    w1 = uniform((num_features, hidden), num_features).T.contiguous()
    b1 = uniform((hidden,), num_features)
    w2 = uniform((hidden, num_classes), hidden).T.contiguous()
    b2 = uniform((num_classes,), hidden)
    return {"W1": w1, "b1": b1, "W2": w2, "b2": b2}


def classifier_sizes(model: str, num_features: int, num_classes: int, hidden: int = 300) -> tuple[int, int]:
    """``(parameters, width)``: the classifier's number of parameters and the numbers it
    computes per example (logits, plus the hidden layer of the two-layer models)."""
    if model == "linear":
        return num_features * num_classes + num_classes, num_classes
    return num_features * hidden + hidden + hidden * num_classes + num_classes, hidden + num_classes


def classifier_logits(model: str, y: dict, inputs: torch.Tensor) -> torch.Tensor:
    """``h_y(inputs)``: ``[n, d] -> [n, C]`` logits of ``model`` with parameters ``y``."""
    if model == "linear":
        return F.linear(inputs, y["W"], y["b"])
    hidden = F.linear(inputs, y["W1"], y["b1"])
    if model == "mlp":
        hidden = torch.sigmoid(hidden)
    elif model != "two_layer":
        raise ValueError(f"unknown hyper-cleaning model {model!r}; choose one of {', '.join(HYPERCLEAN_MODELS)}")
    return F.linear(hidden, y["W2"], y["b2"])


def _squared_norm(tree: dict) -> torch.Tensor:
    total: torch.Tensor = sum((t * t).sum() for t in tree.values())
    return total


@dataclass(frozen=True)
class HypercleanProblem(Problem):
    """A :class:`~bilevel.Problem` for hyper-cleaning, with its data and an evaluation.

    Attributes:
        data: the :class:`~bilevel.data.HypercleanData` instance.
        model: ``"linear"``, ``"mlp"`` or ``"two_layer"``.
        reg: the lower-level ridge weight (``(reg/2)‖y‖²``; 0 in the papers).
    """

    data: HypercleanData | None = None
    model: str = "linear"
    reg: float = 0.0

    def logits(self, y: dict, inputs: torch.Tensor) -> torch.Tensor:
        """``h_y(inputs)``."""
        return classifier_logits(self.model, y, inputs)

    def evaluate(self, x: dict, y: dict) -> dict:
        """Metrics of the point ``(x, y)`` as plain floats.

        ``test_accuracy`` and ``train_clean_accuracy`` in %; ``val_loss`` = f(x, y);
        ``precision``, ``recall``, ``f1``, ``paper_recall``, ``predicted_clean_fraction``
        of the cleaner ``m_i = 1[x_i ≥ 0]`` (:func:`bilevel.data.cleaner_metrics`).
        """
        data = self.data
        if data is None:
            raise ValueError(
                f"{self.name}: evaluate needs the problem's data (HypercleanProblem(data=...), as hyperclean_problem builds it)"
            )
        with torch.no_grad():
            y = {k: v.detach() for k, v in y.items()}
            test_logits = self.logits(y, data.x_test)
            val_loss = float(F.cross_entropy(self.logits(y, data.x_val), data.y_val))
            test_accuracy = 100.0 * float((test_logits.argmax(1) == data.y_test).double().mean()) if len(data.y_test) else float("nan")
        metrics = {"test_accuracy": test_accuracy, "val_loss": val_loss}
        metrics.update(cleaner_metrics(x["weights"].detach().cpu(), data.clean_mask.cpu(), data.noise_rate))
        return metrics


def hyperclean_problem(
    data: HypercleanData,
    model: str = "linear",
    reg: float = 0.0,
    hidden: int = 300,
    seed: int = 0,
) -> HypercleanProblem:
    """The hyper-cleaning bilevel problem on ``data`` (equations in the module docstring).

    Args:
        data: a :class:`~bilevel.data.HypercleanData` (e.g. from
            :func:`bilevel.data.make_hyperclean_data`); its device and feature dtype are used.
        model: ``"linear"`` (d→C), ``"mlp"`` (d→hidden sigmoid→C) or ``"two_layer"``
            (d→hidden→C, no activation).
        reg: ridge weight of the lower level, ``≥ 0`` (0 = the papers; a small value such
            as 1e-3 makes a linear lower level strongly convex).
        hidden: hidden width of the two-layer models (300 in both protocols).
        seed: seeds the classifier's initialisation.

    Returns:
        a :class:`HypercleanProblem` with ``x_init = {"weights": zeros(n_train)}`` and
        ``y_init`` from :func:`init_classifier`; ``batch`` is unused (full batch).
    """
    if not isinstance(data, HypercleanData):
        raise TypeError(f"hyperclean_problem expects a HypercleanData (bilevel.data.make_hyperclean_data), got {type(data).__name__}")
    if model not in HYPERCLEAN_MODELS:
        raise ValueError(f"unknown hyper-cleaning model {model!r}; choose one of {', '.join(HYPERCLEAN_MODELS)}")
    check_nonnegative("hyperclean_problem", "reg", reg)
    if model != "linear":
        check_count("hyperclean_problem", "hidden", hidden)
    reg = float(reg)
    dtype, device = data.x_train.dtype, data.x_train.device
    x_train, labels_noisy = data.x_train, data.y_train_noisy
    x_val, labels_val = data.x_val, data.y_val
    # refuse a model that cannot fit before allocating it (a width of 2e6 asked for 12.5 GB)
    parameters, width = classifier_sizes(model, data.num_features, data.num_classes, hidden)
    n_train, n_val = len(labels_noisy), len(labels_val)
    check_model_memory(
        f"the {model} hyper-cleaning model" + (f" with hidden={hidden}" if model != "linear" else ""),
        parameters + n_train,
        4 * (n_train + n_val) * width,  # forward, backward and double-backward activations
        dtype,
        device,
        "reduce hidden or n_train (config: problem.hidden, problem.n_train)"
        if model != "linear"
        else "reduce n_train (config: problem.n_train)",
    )

    def lower(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        losses = F.cross_entropy(classifier_logits(model, y, x_train), labels_noisy, reduction="none")
        value = (torch.sigmoid(x["weights"]) * losses).mean()
        if reg:
            value = value + 0.5 * reg * _squared_norm(y)
        return value

    def upper(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return F.cross_entropy(classifier_logits(model, y, x_val), labels_val)

    x_init = {"weights": torch.zeros(len(labels_noisy), dtype=dtype, device=device)}
    y_init = init_classifier(model, data.num_features, data.num_classes, hidden=hidden, seed=seed, dtype=dtype, device=device)
    return HypercleanProblem(
        upper=upper,
        lower=lower,
        x_init=x_init,
        y_init=y_init,
        name=f"hyperclean-{data.name}-{model}",
        metadata={"n_train": len(labels_noisy), "n_val": len(labels_val), "n_test": len(data.y_test), "noise_rate": data.noise_rate},
        data=data,
        model=model,
        reg=reg,
    )


def fit_lower(
    problem: Problem, x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], batch: Any = None, steps: int = 500, lr: float = 0.1
) -> dict[str, torch.Tensor]:
    """``steps`` plain gradient steps on ``g(x, ·)`` from ``y`` (no graph); returns the new ``y``.

    Used for the no-cleaning baseline: with ``x = 0`` every example has weight ½, i.e. the
    classifier trained on the noisy labels.
    """
    y = {k: v.detach().clone() for k, v in y.items()}
    for _ in range(steps):
        with torch.enable_grad():
            leaves = {k: v.requires_grad_(True) for k, v in y.items()}
            grads = torch.autograd.grad(problem.lower(x, leaves, batch), list(leaves.values()))
        y = {k: (v - lr * gr).detach() for (k, v), gr in zip(leaves.items(), grads, strict=True)}
    return y
