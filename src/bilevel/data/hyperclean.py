"""Data for the data hyper-cleaning experiment.

Protocol of the bilevel-optimization papers: a training set whose labels
are partly corrupted, a clean validation set, and a clean test set. The
lower level fits a classifier on the training set with one learnable weight
per example; the upper level tunes the weights on the validation set, so
that corrupted examples get low weight.

Steps (all randomness from one seeded ``numpy.random.Generator``):

1. take the dataset's train split (for MNIST/FashionMNIST the test examples
   also come from the 60000-example train split, as in the papers);
2. shuffle it and cut consecutive blocks of ``n_train``, ``n_val`` and
   ``n_test`` examples;
3. scale pixels to [0, 1] (divide by 255, or 16 for ``digits``) and flatten;
4. corrupt labels (:func:`corrupt_labels`): exactly
   ``round(noise_rate * n_train)`` training examples get a label drawn
   uniformly from all classes, the true one included (about 45 % wrong labels at
   ``noise_rate=0.5`` with 10 classes); ``exclude_true_class=True`` draws among the
   other classes only, so exactly ``noise_rate`` of the labels are wrong
   (:func:`wrong_label_fraction`, :func:`f1_ceiling`).

Example:
    >>> data = make_hyperclean_data("digits", noise_rate=0.5, seed=0)  # doctest: +SKIP
    >>> data.x_train.shape, int((~data.clean_mask).sum())  # doctest: +SKIP
    (torch.Size([700, 64]), 350)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from .. import validation
from .errors import DatasetError
from .sources import dataset_info, load_dataset

__all__ = [
    "HypercleanData",
    "accuracy",
    "cleaner_metrics",
    "corrupt_labels",
    "data_f1_ceiling",
    "default_split",
    "expected_wrong_label_fraction",
    "f1_ceiling",
    "hyperclean_from_arrays",
    "make_hyperclean_data",
    "wrong_label_fraction",
]

#: (n_train, n_val, n_test) per dataset; the MNIST-sized sets use the papers' split.
_DEFAULT_SPLITS: dict[str, tuple[int, int, int]] = {
    "mnist": (5000, 5000, 10000),
    "fashion_mnist": (5000, 5000, 10000),
    "mnist5k": (2000, 1000, 2000),
    "digits": (700, 400, 697),
}

_FEATURE_FIELDS = ("x_train", "x_val", "x_test")


def default_split(name: str) -> tuple[int, int, int]:
    """Default ``(n_train, n_val, n_test)`` for dataset ``name``.

    >>> default_split("mnist")
    (5000, 5000, 10000)
    """
    dataset_info(name)  # unknown names: DatasetError listing the known ones
    return _DEFAULT_SPLITS[name]


@dataclass(frozen=True)
class HypercleanData:
    """A hyper-cleaning problem instance (immutable).

    Attributes:
        x_train: ``[n_train, d]`` features in [0, 1].
        y_train_noisy: ``[n_train]`` long, labels after corruption (what the learner sees).
        y_train_true: ``[n_train]`` long, labels before corruption.
        clean_mask: ``[n_train]`` bool, True for examples NOT selected for corruption
            (a selected example whose random label equals its true one is still False).
        x_val, y_val: clean validation set.
        x_test, y_test: clean test set.
        num_classes: number of classes.
        noise_rate: fraction of training examples selected for corruption.
        name: dataset name.
    """

    x_train: torch.Tensor
    y_train_noisy: torch.Tensor
    y_train_true: torch.Tensor
    clean_mask: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    noise_rate: float
    name: str

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> HypercleanData:
        """Copy to ``device``; features take ``dtype``, labels stay long and the mask bool."""
        moved: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                target_dtype = dtype if field.name in _FEATURE_FIELDS else None
                moved[field.name] = value.to(device=device, dtype=target_dtype)
        return replace(self, **moved)


def corrupt_labels(
    labels: np.ndarray,
    noise_rate: float,
    num_classes: int,
    rng: np.random.Generator,
    exclude_true: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt labels the way the papers' code does.

    Exactly ``round(noise_rate * n)`` examples are chosen without replacement
    (Python's ``round``: halves go to the even integer), and each chosen label
    is replaced by ``rng.integers(0, num_classes)``. The draw includes the
    true class, so about ``1/num_classes`` of the chosen labels stay correct
    (50 % chosen, 10 classes: 45 % wrong labels on average).

    With ``exclude_true=True`` (the intent of the papers' text: "the label is
    replaced by a wrong one") a chosen label becomes
    ``(true + rng.integers(1, num_classes)) % num_classes``, uniform over the
    ``num_classes - 1`` other classes, so every chosen label is wrong and the
    fraction of wrong labels is exactly ``round(noise_rate * n) / n``. The default
    (``False``) consumes the generator exactly as before, so published runs reproduce.

    Args:
        labels: ``[n]`` integer labels in ``0..num_classes-1``.
        noise_rate: fraction in [0, 1] of examples to choose.
        num_classes: number of classes.
        rng: generator providing the randomness.
        exclude_true: draw the new label among the other classes only.

    Returns:
        ``(noisy_labels, chosen)``: int64 ``[n]`` labels and bool ``[n]`` marking
        the chosen examples.
    """
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must lie in [0, 1], got {noise_rate}")
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    num_chosen = round(noise_rate * n)
    if exclude_true and num_classes < 2 and num_chosen > 0:
        raise ValueError(f"exclude_true needs at least 2 classes, got num_classes={num_classes}")
    chosen_index = rng.choice(n, size=num_chosen, replace=False)
    noisy = labels.copy()
    if exclude_true:
        shift = rng.integers(1, num_classes, size=num_chosen) if num_chosen else np.zeros(0, dtype=np.int64)
        noisy[chosen_index] = (labels[chosen_index] + shift) % num_classes
    else:
        noisy[chosen_index] = rng.integers(0, num_classes, size=num_chosen)
    chosen = np.zeros(n, dtype=bool)
    chosen[chosen_index] = True
    return noisy, chosen


_SPLIT_ROLES = {
    "n_train": "the lower level fits the classifier on the training set",
    "n_val": "the upper objective is the loss on the validation set",
    "n_test": "the test accuracy is measured on the test set",
}


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        why = f": {_SPLIT_ROLES[name]}, which cannot be empty" if name in _SPLIT_ROLES and minimum == 1 else ""
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}{why}")
    return int(value)


def _numpy_dtype(images: np.ndarray, dtype: torch.dtype) -> type[np.floating]:
    """The NumPy dtype features are computed in: float32 for 8-bit pixels and a target of
    at most 32 bits (a correctly rounded division gives the float64 result rounded to
    float32, without a float64 copy of the data), else float64."""
    if images.dtype in (np.uint8, np.int8) and torch.empty((), dtype=dtype).element_size() <= 4:
        return np.float32
    return np.float64


def hyperclean_from_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    max_pixel: float,
    name: str,
    noise_rate: float = 0.5,
    seed: int = 0,
    n_train: int,
    n_val: int,
    n_test: int,
    dtype: torch.dtype = torch.float32,
    exclude_true_class: bool = False,
) -> HypercleanData:
    """Build :class:`HypercleanData` from in-memory images and labels.

    :func:`make_hyperclean_data` calls this after loading a dataset; call it
    directly for data of your own. Arguments as there, plus:

    Args:
        images: ``[N, ...]`` pixels (flattened per example).
        labels: ``[N]`` labels in ``0..num_classes-1``.
        max_pixel: pixels are divided by this.
        exclude_true_class: corruption rule (:func:`corrupt_labels`'s ``exclude_true``).

    Raises:
        DatasetError: fewer than ``n_train + n_val + n_test`` examples.
        ValueError: bad counts or noise rate.
    """
    n_train = _check_count("n_train", n_train, 1)
    n_val = _check_count("n_val", n_val, 1)
    n_test = _check_count("n_test", n_test, 1)
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must lie in [0, 1], got {noise_rate}")
    images = np.asarray(images)
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    needed = n_train + n_val + n_test
    if needed > len(images):
        raise DatasetError(
            f"dataset {name!r} has {len(images)} examples in its train split but the "
            f"hyper-cleaning split needs n_train + n_val + n_test = {n_train} + {n_val} + "
            f"{n_test} = {needed}; pass smaller n_train/n_val/n_test"
            + (f" (default for {name!r}: {_DEFAULT_SPLITS[name]})" if name in _DEFAULT_SPLITS else "")
        )
    # refuse before allocating: the three feature matrices in the target dtype
    num_features = int(np.prod(images.shape[1:], dtype=np.int64))
    itemsize = torch.empty((), dtype=dtype).element_size()
    validation.check_memory(
        f"the hyper-cleaning features ({needed:,} examples × {num_features} features in {str(dtype).replace('torch.', '')})",
        needed * num_features * itemsize,
        "reduce n_train/n_val/n_test (config: problem.n_train, ...)"
        + (", or use float32 (config: problem.dtype=float32)" if itemsize > 4 else ""),
    )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    train_index = order[:n_train]
    val_index = order[n_train : n_train + n_val]
    test_index = order[n_train + n_val : needed]
    y_train_true = labels[train_index].astype(np.int64)
    y_train_noisy, chosen = corrupt_labels(y_train_true, noise_rate, num_classes, rng, exclude_true=bool(exclude_true_class))

    def features(index: np.ndarray) -> torch.Tensor:
        np_dtype = _numpy_dtype(images, dtype)
        flat = images[index].reshape(len(index), -1).astype(np_dtype) / np_dtype(max_pixel)
        return torch.from_numpy(flat).to(dtype)

    def targets(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(values, dtype=np.int64))

    return HypercleanData(
        x_train=features(train_index),
        y_train_noisy=targets(y_train_noisy),
        y_train_true=targets(y_train_true),
        clean_mask=torch.from_numpy(~chosen),
        x_val=features(val_index),
        y_val=targets(labels[val_index]),
        x_test=features(test_index),
        y_test=targets(labels[test_index]),
        num_classes=int(num_classes),
        noise_rate=float(noise_rate),
        name=name,
    )


def make_hyperclean_data(
    name: str = "mnist5k",
    noise_rate: float = 0.5,
    seed: int = 0,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    root: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    exclude_true_class: bool = False,
) -> HypercleanData:
    """Load a dataset and build a hyper-cleaning instance from its train split.

    Args:
        name: ``mnist``, ``fashion_mnist``, ``mnist5k`` or ``digits``.
        noise_rate: fraction of training examples whose label is redrawn.
        seed: seeds the shuffle and the corruption; same seed, same data.
        n_train: training split size; ``None`` takes :func:`default_split`.
        n_val: validation split size; ``None`` takes :func:`default_split`.
        n_test: test split size; ``None`` takes :func:`default_split`.
        root: directory searched first for IDX datasets.
        dtype: dtype of the feature tensors.
        exclude_true_class: draw corrupted labels among the other classes only
            (:func:`corrupt_labels`); ``False`` (default) is the papers' code.

    Returns:
        :class:`HypercleanData` on the CPU.

    Example:
        >>> data = make_hyperclean_data("digits", seed=1)  # doctest: +SKIP
        >>> data.x_train.shape, data.x_val.shape, data.x_test.shape  # doctest: +SKIP
        (torch.Size([700, 64]), torch.Size([400, 64]), torch.Size([697, 64]))
    """
    info = dataset_info(name)
    default_train, default_val, default_test = default_split(name)
    images, labels = load_dataset(name, root=root, split="train")
    return hyperclean_from_arrays(
        images,
        labels,
        num_classes=info.num_classes,
        max_pixel=info.max_pixel,
        name=name,
        noise_rate=noise_rate,
        seed=seed,
        n_train=default_train if n_train is None else n_train,
        n_val=default_val if n_val is None else n_val,
        n_test=default_test if n_test is None else n_test,
        dtype=dtype,
        exclude_true_class=exclude_true_class,
    )


def cleaner_metrics(weights_logits: torch.Tensor, clean_mask: torch.Tensor, noise_rate: float) -> dict[str, float]:
    """How well per-example weights separate clean from corrupted examples.

    An example is predicted clean when its weight logit is >= 0 (its sigmoid
    weight is >= 1/2): ``m_i = 1[weights_logits_i >= 0]``.

    * precision ``p = mean(m * clean) / mean(m)`` (0 if nothing is predicted clean);
    * recall ``r = sum(m * clean) / sum(clean)`` (0 if no example is clean);
    * ``f1 = 2 p r / (p + r)`` (0 if ``p + r == 0``).

    The papers' code computes recall as ``mean(m * clean) / (1 - noise_rate)``;
    it equals ``r`` when the fraction of clean examples is exactly
    ``1 - noise_rate``, which holds for :class:`HypercleanData` up to rounding.
    That value is returned as ``paper_recall`` for comparison with the papers.

    Args:
        weights_logits: ``[n]`` real weight logits.
        clean_mask: ``[n]`` bool or 0/1 indicator of clean examples.
        noise_rate: fraction of examples selected for corruption.

    Returns:
        Dict of floats: ``precision``, ``recall``, ``f1``, ``paper_recall``,
        ``predicted_clean_fraction``.

    Example:
        >>> cleaner_metrics(torch.tensor([1.0, 1.0, -1.0, -1.0]),
        ...                 torch.tensor([True, False, False, False]), 0.75)["precision"]
        0.5
    """
    logits = torch.as_tensor(weights_logits).detach().reshape(-1)
    clean = torch.as_tensor(clean_mask).detach().reshape(-1).to(torch.float64)
    if logits.shape != clean.shape:
        raise ValueError(f"weights_logits has {logits.numel()} entries but clean_mask has {clean.numel()}")
    if logits.numel() == 0:
        raise ValueError("cleaner_metrics needs at least one example")
    predicted = (logits >= 0).to(torch.float64)
    true_positive = float((predicted * clean).sum())
    num_predicted = float(predicted.sum())
    num_clean = float(clean.sum())
    precision = true_positive / num_predicted if num_predicted > 0 else 0.0
    recall = true_positive / num_clean if num_clean > 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    paper_recall = true_positive / logits.numel() / (1.0 - noise_rate) if noise_rate < 1 else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "paper_recall": paper_recall,
        "predicted_clean_fraction": num_predicted / logits.numel(),
    }


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows of ``logits`` ``[n, C]`` whose argmax equals ``labels`` ``[n]``.

    >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
    0.5
    """
    logits = torch.as_tensor(logits).detach()
    labels = torch.as_tensor(labels).detach().reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits must be [n, num_classes] matching labels [n]; got {list(logits.shape)} and {list(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float((logits.argmax(dim=1) == labels.to(logits.device)).double().mean())


def wrong_label_fraction(data: HypercleanData) -> float:
    """The exact fraction of training labels that are wrong, ``mean(y_train_noisy != y_train_true)``.

    Differs from ``data.noise_rate`` (the fraction *chosen* for corruption) under the
    papers' rule, where a chosen label may be redrawn as its true class.
    """
    if len(data.y_train_true) == 0:
        raise ValueError("wrong_label_fraction of an empty training set is undefined")
    return float((data.y_train_noisy != data.y_train_true).double().mean())


def expected_wrong_label_fraction(noise_rate: float, num_classes: int, exclude_true_class: bool = False, n: int | None = None) -> float:
    """Expected fraction of wrong labels after :func:`corrupt_labels`.

    With ``n`` given, the chosen fraction is ``q = round(noise_rate * n) / n`` (the exact
    count); otherwise ``q = noise_rate``. Excluding the true class every chosen label is
    wrong: ``q`` (exact, not only in expectation). Drawing among all classes a chosen label
    stays correct with probability ``1/C``: ``q (1 - 1/C)``.

    >>> expected_wrong_label_fraction(0.5, 10)
    0.45
    >>> expected_wrong_label_fraction(0.5, 10, exclude_true_class=True)
    0.5
    """
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must lie in [0, 1], got {noise_rate}")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    q = round(noise_rate * n) / n if n else float(noise_rate)
    return q if exclude_true_class else q * (1.0 - 1.0 / num_classes)


def f1_ceiling(noise_rate: float, num_classes: int, exclude_true_class: bool = False, positive: str = "clean") -> float:
    """The best F1 any cleaner can reach, in expectation, for a corruption rule and convention.

    :func:`cleaner_metrics` scores a cleaner against ``clean_mask``: an example is
    *clean* when it was not chosen for corruption. Under the papers' rule (new label drawn
    among all ``C`` classes) a fraction ``r/C`` of the examples was chosen but kept its true
    label; no cleaner can tell those from clean examples, since their labels are right.
    Write ``r`` for ``noise_rate``.

    * ``positive="clean"`` (this library and the PBGD code): the best cleaner keeps every
      example with a correct label: recall 1, precision ``(1-r)/((1-r) + r/C)``, so
      ``F1* = 2(1-r) / (2(1-r) + r/C)`` (0.952 for r = 0.5, C = 10).
    * ``positive="noisy"`` (Franceschi et al.: the chosen examples are the positives): the
      best cleaner flags every wrong label: precision 1, recall ``1 - 1/C``, so
      ``F1* = 2(1 - 1/C) / (2 - 1/C)`` (0.947 for C = 10).

    With ``exclude_true_class=True`` every chosen label is wrong and ``F1* = 1`` in both
    conventions. The values are those at the expected counts; the ceiling of one data set
    (:func:`data_f1_ceiling`) differs by ``O(1/√n)``.

    >>> round(f1_ceiling(0.5, 10), 4), f1_ceiling(0.5, 10, exclude_true_class=True)
    (0.9524, 1.0)
    """
    if positive not in ("clean", "noisy"):
        raise ValueError(f"positive={positive!r} must be 'clean' or 'noisy'")
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must lie in [0, 1], got {noise_rate}")
    r = float(noise_rate)
    if exclude_true_class or num_classes <= 0:
        return 1.0 if (positive == "clean" and r < 1) or (positive == "noisy" and r > 0) else 0.0
    kept = r / num_classes  # chosen, label unchanged
    if positive == "clean":
        return 2 * (1 - r) / (2 * (1 - r) + kept) if r < 1 else 0.0
    if r == 0:
        return 0.0
    recall = 1.0 - 1.0 / num_classes
    return 2 * recall / (1 + recall) if recall > 0 else 0.0


def data_f1_ceiling(data: HypercleanData, positive: str = "clean") -> float:
    """The best F1 reachable on ``data`` (the realised counts of :func:`f1_ceiling`).

    The best cleaner predicts "clean" exactly for the examples whose noisy label equals
    the true one. ``positive="clean"``: ``2c / (2c + u)`` with ``c`` clean examples and
    ``u`` chosen-but-unchanged ones; ``positive="noisy"``: ``2w / (2w + u)`` with ``w``
    wrong labels (``w + u`` chosen examples).
    """
    if positive not in ("clean", "noisy"):
        raise ValueError(f"positive={positive!r} must be 'clean' or 'noisy'")
    clean = data.clean_mask.bool()
    correct = data.y_train_noisy == data.y_train_true
    unchanged = int((~clean & correct).sum())
    hits = int(clean.sum()) if positive == "clean" else int((~correct).sum())
    return 2 * hits / (2 * hits + unchanged) if hits else 0.0
