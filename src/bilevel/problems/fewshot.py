"""Few-shot classification as a bilevel problem (docs/algorithms.md#few-shot-classification).

The upper variable ``x`` is a feature extractor ``φ_x`` shared by all tasks; the lower
variable ``y`` is one linear head per task of a meta-batch of B N-way K-shot tasks,
``y = {"W": [B, F, N], "b": [B, N]}``::

    g(x, y) = Σ_b [ CE_b^support(x, y_b) + (reg/2) ‖y_b‖² ]          (one head per task)
    f(x, y) = (1/B) Σ_b CE_b^query(x, y_b)
    CE_b^S(x, y_b) = mean_{(a, c) ∈ S_b} CE(φ_x(a) W_b + b_b, c)

Tasks are independent, so the lower problem is block separable. ``g`` *sums* the tasks'
losses (instead of averaging them) so that each head's gradient and curvature — and so
the lower step size that suits it — do not depend on B; the minimiser is the same.
``reg > 0`` makes each head's problem strongly convex (curvature ≥ reg). Each objective
computes the features of all tasks' images in one pass and the heads with one batched
matmul (``torch.baddbmm``), with no Python loop over tasks.

Backbones (``backbone``):

* ``"conv"``: 4 blocks ``conv 3×3 (channels) → [GroupNorm] → ReLU → max-pool 2`` (no ReLU
  in the last block, for the reason given for the MLP below) on
  ``[C, 28, 28]`` inputs (28 → 14 → 7 → 3 → 1), F = ``channels``; ``norm="group"`` adds
  GroupNorm (no batch statistics, so the objectives stay pure functions of (x, y, batch));
* ``"mlp"``: ``relu(a W₁ + b₁) W₂ + b₂`` on flattened images, F = ``features``
  (much faster on a CPU). The feature layer is linear (no ReLU): with a final ReLU,
  meta-training on few classes killed about 95 % of the features and sent some
  held-out-class images to the zero vector, and the learned features ended below the
  untrained ones on held-out classes (docs/results.md).

With ``feature_scale = s > 0`` the features are rescaled to the sphere of radius s,
``φ ← s φ/√(‖φ‖² + 10⁻⁶)``: the head problem's curvature then stays below ``s²/2 + 1/2 + reg``
whatever the backbone learns, so fixed lower/shadow step sizes stay stable during
meta-training (unnormalised features grow under the upper optimizer and make them diverge).

Because every meta-iteration brings new tasks, the heads of the previous iteration are
meaningless for the next one: :class:`EpisodicLower` restarts ``y`` (and the multiplier
``v``) from zero before each step of any method.

Example:
    >>> import torch, bilevel as bl
    >>> from bilevel.data import EpisodeSampler
    >>> classes = {c: torch.rand(10, 1, 28, 28) * (c + 1) / 6 for c in range(6)}
    >>> sampler = EpisodeSampler(classes, n_way=3, k_shot=1, q_query=2, meta_batch=2, seed=0)
    >>> problem = fewshot_problem(n_way=3, meta_batch=2, image_shape=(1, 28, 28), backbone="mlp", hidden=32, features=16)
    >>> problem.y_init["W"].shape
    torch.Size([2, 16, 3])
    >>> method = EpisodicLower(bl.AID(lr_upper=bl.Adam(1e-3), lr_lower=0.1, lower_steps=5))
    >>> result = bl.solve(problem, method, data=EpisodeSource(sampler), max_iters=3)
    >>> result.iterations
    3
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .. import tree as T
from ..data.fewshot import EpisodeSampler
from ..methods.base import Method, State
from ..problem import Problem
from ..tree import Tree
from ..validation import check_choice, check_count, check_nonnegative
from ._init import check_model_memory, seeded_uniform

__all__ = [
    "BACKBONES",
    "EpisodeSource",
    "EpisodicLower",
    "FewshotProblem",
    "backbone_features",
    "fewshot_problem",
    "head_logits",
    "init_backbone",
    "solve_heads",
]

BACKBONES = ("conv", "mlp")


def init_backbone(
    backbone: str,
    image_shape: Sequence[int],
    channels: int = 32,
    blocks: int = 4,
    norm: str = "none",
    hidden: int = 256,
    features: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: Any = None,
) -> dict:
    """Initial feature-extractor parameters ``x`` (He-uniform weights ``U(±√(6/fan_in))``, zero biases).

    Drawn from ``torch.Generator().manual_seed(seed)`` on the CPU, then moved to ``device``.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown few-shot backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if norm not in ("none", "group"):
        raise ValueError(f"norm={norm!r} must be 'none' or 'group'")
    for name, value in (("channels", channels), ("blocks", blocks)) if backbone == "conv" else (("hidden", hidden), ("features", features)):
        check_count("init_backbone", name, value)
    generator = torch.Generator().manual_seed(int(seed))

    def he_uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        # float64 draws (the same start for every dtype), converted block by block
        return seeded_uniform(shape, math.sqrt(6.0 / fan_in), generator, dtype, device)

    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=dtype, device=device)

    params: dict = {}
    if backbone == "conv":
        in_channels = int(image_shape[0])
        for i in range(blocks):
            params[f"conv{i}_w"] = he_uniform((channels, in_channels, 3, 3), in_channels * 9)
            params[f"conv{i}_b"] = zeros(channels)
            if norm == "group":
                params[f"norm{i}_w"] = torch.ones(channels, dtype=dtype, device=device)
                params[f"norm{i}_b"] = zeros(channels)
            in_channels = channels
        return params
    d = int(math.prod(image_shape))
    params["fc1_w"] = he_uniform((d, hidden), d)
    params["fc1_b"] = zeros(hidden)
    params["fc2_w"] = he_uniform((hidden, features), hidden)
    params["fc2_b"] = zeros(features)
    return params


def backbone_sizes(
    backbone: str,
    image_shape: Sequence[int],
    channels: int = 32,
    blocks: int = 4,
    norm: str = "none",
    hidden: int = 256,
    features: int = 64,
) -> tuple[int, int]:
    """``(parameters, feature_dim)`` of a backbone, computed without building it."""
    if backbone == "conv":
        in_channels, height, width = (int(s) for s in image_shape)
        parameters = 0
        for _ in range(blocks):
            parameters += channels * in_channels * 9 + channels + (2 * channels if norm == "group" else 0)
            in_channels, height, width = channels, height // 2, width // 2
        return parameters, channels * max(height, 1) * max(width, 1)
    d = int(math.prod(image_shape))
    return d * hidden + hidden + hidden * features + features, features


def backbone_features(backbone: str, x: dict, images: torch.Tensor, groups: int = 4) -> torch.Tensor:
    """``φ_x(images)``: ``[n, C, H, W] -> [n, F]`` (see the module docstring)."""
    if backbone == "mlp":
        hidden = torch.relu(torch.addmm(x["fc1_b"], images.flatten(1), x["fc1_w"]))
        return torch.addmm(x["fc2_b"], hidden, x["fc2_w"])  # linear feature layer: see the module docstring
    h = images
    i = 0
    while f"conv{i}_w" in x:
        h = F.conv2d(h, x[f"conv{i}_w"], x[f"conv{i}_b"], padding=1)
        if f"norm{i}_w" in x:
            h = F.group_norm(h, groups, x[f"norm{i}_w"], x[f"norm{i}_b"])
        last = f"conv{i + 1}_w" not in x
        # the last block is linear before pooling, like the MLP's feature layer: a final ReLU
        # let meta-training zero ~90 % of the features (docs/results.md)
        h = F.max_pool2d(h if last else torch.relu(h), 2)
        i += 1
    return h.flatten(1)


def _scaled(features: torch.Tensor, scale: float) -> torch.Tensor:
    if not scale:
        return features
    return scale * features * torch.rsqrt((features * features).sum(-1, keepdim=True) + 1e-6)


def head_logits(features: torch.Tensor, y: dict) -> torch.Tensor:
    """Per-task linear heads: ``[B, M, F] × y -> [B, M, N]`` in one batched matmul."""
    return torch.baddbmm(y["b"].unsqueeze(1), features, y["W"])


def _task_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each task: ``[B, M, N], [B, M] -> [B]``."""
    batch, m, n = logits.shape
    return F.cross_entropy(logits.reshape(batch * m, n), labels.reshape(batch * m), reduction="none").view(batch, m).mean(1)


@dataclass(frozen=True)
class FewshotProblem(Problem):
    """A :class:`~bilevel.Problem` for few-shot classification with a meta-test evaluation.

    Attributes:
        backbone: ``"conv"`` or ``"mlp"``.
        n_way: N, classes per task.
        meta_batch: B, tasks per meta-batch (the shape of ``y``).
        reg: ridge weight of each head (> 0).
        groups: GroupNorm groups (``norm="group"`` only).
    """

    backbone: str = "mlp"
    feature_scale: float = 0.0
    n_way: int = 5
    meta_batch: int = 4
    reg: float = 0.5
    groups: int = 4

    def features(self, x: dict, images: torch.Tensor) -> torch.Tensor:
        """``[B, M, C, H, W] -> [B, M, F]`` features, one pass over all tasks' images."""
        batch, m = images.shape[:2]
        return _scaled(backbone_features(self.backbone, x, images.flatten(0, 1), self.groups), self.feature_scale).view(batch, m, -1)

    def meta_test(self, x: dict, sampler: EpisodeSampler, num_tasks: int = 100, steps: int = 100) -> dict:
        """Accuracy (%) on ``num_tasks`` tasks of ``sampler`` (held-out classes).

        For each task the head is fitted on the support set with the learned features
        (:func:`solve_heads`: ``steps`` accelerated gradient steps on the strongly convex
        head problem), then scored on the query set. Tasks come from ``sampler.sample(0)``,
        ``sample(1)``, ... so the same sampler always gives the same tasks.

        Returns ``test_accuracy`` (mean %), ``test_ci95`` (1.96·std/√n_tasks, %) and
        ``test_tasks``.
        """
        if num_tasks < 1:
            raise ValueError(f"num_tasks={num_tasks} must be >= 1")
        leaf = T.leaves(x)[0]
        accuracies: list[torch.Tensor] = []
        step = 0
        with torch.no_grad():
            while sum(len(a) for a in accuracies) < num_tasks:
                batch = sampler.sample(step, device=leaf.device, dtype=leaf.dtype)
                step += 1
                support = self.features(x, batch["support_x"])
                query = self.features(x, batch["query_x"])
                heads = solve_heads(support, batch["support_y"], self.n_way, self.reg, steps)
                predictions = head_logits(query, heads).argmax(-1)
                accuracies.append((predictions == batch["query_y"]).double().mean(1).cpu())
        acc = torch.cat(accuracies)[:num_tasks] * 100.0
        std = float(acc.std(unbiased=False)) if len(acc) > 1 else 0.0
        return {"test_accuracy": float(acc.mean()), "test_ci95": 1.96 * std / math.sqrt(len(acc)), "test_tasks": float(len(acc))}

    def evaluate_batch(self, x: dict, y: dict, batch: dict) -> dict:
        """Training-batch metrics at ``(x, y)``: query accuracy (%) and losses."""
        with torch.no_grad():
            logits = head_logits(self.features(x, batch["query_x"]), y)
            accuracy = float((logits.argmax(-1) == batch["query_y"]).double().mean()) * 100.0
        return {"train_query_accuracy": accuracy}


def solve_heads(features: torch.Tensor, labels: torch.Tensor, n_way: int, reg: float, steps: int = 100) -> dict:
    """Fit the heads ``argmin_W,b CE(φ W + b, labels) + (reg/2)(‖W‖² + ‖b‖²)`` for every task.

    Nesterov's accelerated gradient with the constant momentum ``(√κ − 1)/(√κ + 1)`` for a
    strongly convex problem, step ``1/L`` with the per-task bound
    ``L = ½ mean_i ‖[φ_i, 1]‖² + reg`` (softmax cross-entropy's Hessian is ≤ ½ I per
    sample), ``κ = L/reg``; the gradient is in closed form, so no graph is built.

    Args:
        features: ``[B, M, F]``; labels: ``[B, M]`` in ``0..n_way-1``.
    Returns:
        ``{"W": [B, F, N], "b": [B, N]}``.
    """
    if reg <= 0:
        raise ValueError(f"reg={reg} must be > 0 for the head problem to be strongly convex")
    batch, m, feat = features.shape
    onehot = F.one_hot(labels, n_way).to(features.dtype)
    lipschitz = 0.5 * ((features * features).sum(-1) + 1.0).mean(1) + reg  # [B]
    lr = (1.0 / lipschitz).view(batch, 1, 1)
    kappa_sqrt = torch.sqrt(lipschitz / reg).view(batch, 1, 1)
    momentum = (kappa_sqrt - 1) / (kappa_sqrt + 1)
    W = torch.zeros(batch, feat, n_way, dtype=features.dtype, device=features.device)
    b = torch.zeros(batch, n_way, dtype=features.dtype, device=features.device)
    W_prev, b_prev = W, b
    for _ in range(steps):
        W_look = W + momentum * (W - W_prev)
        b_look = b + momentum.view(batch, 1) * (b - b_prev)
        residual = (torch.softmax(head_logits(features, {"W": W_look, "b": b_look}), -1) - onehot) / m
        grad_W = features.transpose(1, 2) @ residual + reg * W_look
        grad_b = residual.sum(1) + reg * b_look
        W_prev, b_prev = W, b
        W = W_look - lr * grad_W
        b = b_look - lr.view(batch, 1) * grad_b
    return {"W": W, "b": b}


def fewshot_problem(
    n_way: int,
    meta_batch: int,
    image_shape: Sequence[int] = (1, 28, 28),
    backbone: str = "mlp",
    reg: float = 0.5,
    channels: int = 32,
    blocks: int = 4,
    norm: str = "none",
    groups: int = 4,
    hidden: int = 256,
    features: int = 64,
    feature_scale: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: Any = None,
) -> FewshotProblem:
    """The few-shot bilevel problem (equations in the module docstring).

    Args:
        n_way: N, the classes per task; fixes the shape of ``y``.
        meta_batch: B, the tasks per batch; fixes the shape of ``y``.
        image_shape: ``(C, H, W)`` of the images (28×28 for the 4-block ConvNet).
        backbone: ``"conv"`` (``channels``, ``blocks``, ``norm``, ``groups``) or ``"mlp"``
            (``hidden``, ``features``).
        reg: head ridge weight, > 0 (strongly convex lower level).
        feature_scale: radius of the normalised features (0: no normalisation).
        seed: seeds the backbone's initialisation.
        dtype: dtype of the parameters (batches are cast to it by :class:`EpisodeSource`).
        device: device of the parameters (batches are moved to it by :class:`EpisodeSource`).

    Returns:
        a :class:`FewshotProblem`; ``x_init`` = backbone parameters, ``y_init`` = zero heads.
        The ``batch`` of the objectives is an :class:`~bilevel.data.EpisodeSampler` batch.
    """
    if not (isinstance(reg, (int, float)) and reg > 0):
        raise ValueError(f"reg={reg!r} must be > 0: it makes each head's problem strongly convex")
    for name, value in (("n_way", n_way), ("meta_batch", meta_batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if backbone == "conv" and tuple(image_shape[1:]) != (28, 28) and blocks == 4:
        raise ValueError(f"the 4-block ConvNet expects 28×28 images, got {tuple(image_shape)}; use backbone='mlp' or fewer blocks")
    check_choice("fewshot_problem", "backbone", backbone, BACKBONES)
    check_nonnegative("fewshot_problem", "feature_scale", feature_scale)
    check_count("fewshot_problem", "groups", groups)
    # refuse a backbone that cannot fit before allocating it
    parameters, feat_dim = backbone_sizes(backbone, image_shape, channels, blocks, norm, hidden, features)
    check_model_memory(
        f"the {backbone} few-shot backbone"
        + (f" with hidden={hidden}, features={features}" if backbone == "mlp" else f" with channels={channels}, blocks={blocks}"),
        parameters + meta_batch * (feat_dim + 1) * n_way,
        0,
        dtype,
        device,
        "reduce hidden/features (config: problem.hidden, problem.features)"
        if backbone == "mlp"
        else "reduce channels (config: problem.channels)",
    )
    x_init = init_backbone(backbone, image_shape, channels, blocks, norm, hidden, features, seed, dtype, device)
    with torch.no_grad():
        dummy = torch.zeros(1, *image_shape, dtype=dtype, device=device)
        feat_dim = backbone_features(backbone, x_init, dummy, groups).shape[1]
    y_init = {
        "W": torch.zeros(meta_batch, feat_dim, n_way, dtype=dtype, device=device),
        "b": torch.zeros(meta_batch, n_way, dtype=dtype, device=device),
    }
    reg = float(reg)

    def lower(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = _scaled(backbone_features(backbone, x, batch["support_x"].flatten(0, 1), groups), feature_scale).view(
            meta_batch, -1, feat_dim
        )
        losses = _task_cross_entropy(head_logits(feats, y), batch["support_y"])
        return losses.sum() + 0.5 * reg * ((y["W"] * y["W"]).sum() + (y["b"] * y["b"]).sum())

    def upper(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = _scaled(backbone_features(backbone, x, batch["query_x"].flatten(0, 1), groups), feature_scale).view(
            meta_batch, -1, feat_dim
        )
        return _task_cross_entropy(head_logits(feats, y), batch["query_y"]).mean()

    return FewshotProblem(
        upper=upper,
        lower=lower,
        x_init=x_init,
        y_init=y_init,
        name=f"fewshot-{n_way}way-{backbone}",
        metadata={"feature_dim": feat_dim},
        backbone=backbone,
        feature_scale=float(feature_scale),
        n_way=n_way,
        meta_batch=meta_batch,
        reg=reg,
        groups=groups,
    )


@dataclass(frozen=True)
class EpisodeSource:
    """A data source for :func:`bilevel.solve`: ``batch_at(k) = sampler.sample(k)``.

    The batch is a pure function of ``(sampler.seed, k)``, so a resumed run sees exactly
    the tasks an uninterrupted run would have seen.
    """

    sampler: EpisodeSampler
    device: Any = None
    dtype: torch.dtype = torch.float32

    def batch_at(self, k: int) -> dict:
        return self.sampler.sample(k, device=self.device, dtype=self.dtype)


@dataclass(frozen=True)
class EpisodicLower(Method):
    """Run ``inner`` with the lower variable and the multiplier restarted at zero each step.

    Few-shot meta-training draws new tasks at every meta-iteration (with a random
    relabelling of their classes), so the heads ``y`` and the multiplier ``v`` carried
    over from the previous iteration solve *other* tasks: warm-starting from them is
    meaningless and biases the hypergradient. Before every ``inner.step`` this wrapper
    sets ``y ← 0`` and ``v ← 0`` (when the method has one), which is the episodic
    protocol of the few-shot papers (every task starts from the same head). Everything
    else (x, the optimizer moments, counters) is the inner method's.

    Example:
        >>> import bilevel as bl
        >>> EpisodicLower(bl.GALET()).name
        'GALET'
    """

    inner: Method | None = None
    uses_multiplier: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.inner, Method) or isinstance(self.inner, EpisodicLower):
            raise TypeError(f"EpisodicLower(inner=...) needs a bilevel method such as bilevel.AID(), got {type(self.inner).__name__}")

    @property
    def _method(self) -> Method:
        """``inner``, a method (``__post_init__`` refused anything else)."""
        if not isinstance(self.inner, Method):  # pragma: no cover - refused by __post_init__
            raise TypeError("EpisodicLower.inner is not a method")
        return self.inner

    @property
    def name(self) -> str:  # type: ignore[override]  # the inner method's name, not a class constant
        return self._method.name

    @property
    def stationarity_doc(self) -> str:  # type: ignore[override]  # the inner method's, not a class constant
        return self._method.stationarity_doc

    def init(self, problem: Problem, x0: Tree = None, y0: Tree = None, batch: Any = None, validate: bool = True) -> State:
        return self._method.init(problem, x0, y0, batch, validate)

    def step(self, problem: Problem, state: State, batch: Any = None) -> tuple[State, dict]:
        restarted = state.replace(
            y=T.zeros_like(state.y),
            v=None if state.v is None else T.zeros_like(state.v),
        )
        return self._method.step(problem, restarted, batch)
