"""Non-bilevel baselines for the hyper-cleaning and few-shot experiments.

Every bilevel hyper-cleaning method uses a noisy training set *and* a clean validation set.
The baselines here answer "how much of its test accuracy does the bilevel machinery add?":
they use the same data, the same classifiers (:func:`~bilevel.problems.hyperclean.init_classifier`,
:func:`~bilevel.problems.hyperclean.classifier_logits`) and full-batch gradient descent, with
every choice made on validation data only.

Training rule (:func:`fit_classifier`), shared by every baseline:

* objective ``(1/n) Σ_i w_i CE(h_y(a_i), b_i) + (reg/2) ‖y‖²`` over the fitting set
  (``w_i = 1``, or the weights given);
* **step size** ``lr = 1/L₀``, where ``L₀`` is the largest absolute eigenvalue of the
  objective's Hessian at the starting point, estimated by 30 power iterations on
  Hessian-vector products (:func:`hessian_norm`): half the stability limit ``2/L₀`` of
  gradient descent on the local quadratic model. As a guard for curvature growing along
  the run, a step that would increase the training objective is rejected and ``lr`` halved
  (``halvings`` in the results counts these; it was 0 in every run of docs/baselines.md);
* **step count** chosen on validation: accuracy on a selection set is evaluated every
  ``eval_every`` steps (and at step 0) up to ``max_steps``; the earliest step with the
  highest accuracy is kept.

The five baselines of :func:`hyperclean_baselines` (keys of the returned dict):

* ``val_only``: train on the clean validation set only;
* ``noisy_plus_val``: train on the noisy training set and the validation set together
  (every example weight 1);
* ``noisy_early_stop``: train on the noisy training set; stop when validation accuracy has
  not improved for ``patience`` evaluations and keep the best iterate (classic early stopping);
* ``no_cleaning``: the bilevel problem's lower level at ``x = 0`` (every weight ``σ(0) = ½``,
  exactly the classifier the no-cleaning row of docs/results.md trains) run for the whole
  ``max_steps`` and the step count chosen on validation. With ``reg = 0`` and the ``1/L₀``
  rule it follows the same path as ``noisy_early_stop`` (weights ½ halve both the gradient
  and ``L₀``); only the stopping rule differs;
* ``oracle``: the truly clean training examples (those whose noisy label equals the true
  one: ground truth, not available to a method) plus the validation set.

The three baselines that train on the validation set cannot select on it: their step count
is chosen by ``folds``-fold cross-validation on the validation set (the validation set is
cut into ``folds`` parts by a seeded permutation; for each part, train on everything else
and score the held-out part along the run; the step with the highest mean held-out accuracy
wins), then one classifier is refitted on the whole fitting set for that many steps and
tested. ``folds=1`` uses a single 80/20 split of the validation set (faster).

:func:`retrain_with_weights` separates cleaning quality from how long a bilevel method
trained its classifier: a fresh classifier on the noisy training set with the learned
weights ``σ(x_i)`` (the lower objective ``g(x, ·)``), step count chosen on validation.

:func:`fewshot_raw_pixel_baseline` is the few-shot counterpart: the meta-test of
:meth:`~bilevel.problems.fewshot.FewshotProblem.meta_test` with the identity feature map
(flattened pixels, the same normalisation to the sphere and the same ridge heads).

Example:
    >>> import torch
    >>> from bilevel.data import hyperclean_from_arrays
    >>> g = torch.Generator().manual_seed(0)
    >>> images = torch.randn(300, 5, generator=g, dtype=torch.float64).numpy()
    >>> labels = (images[:, 0] > 0).astype("int64")
    >>> data = hyperclean_from_arrays(images, labels, num_classes=2, max_pixel=1.0, name="blobs",
    ...                               noise_rate=0.3, seed=0, n_train=100, n_val=100, n_test=100,
    ...                               dtype=torch.float64)
    >>> table = hyperclean_baselines(data, max_steps=100, folds=2)
    >>> sorted(table)
    ['no_cleaning', 'noisy_early_stop', 'noisy_plus_val', 'oracle', 'val_only']
    >>> table["oracle"]["test_accuracy"] > 90
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..data.hyperclean import HypercleanData
from ..problems.hyperclean import HYPERCLEAN_MODELS, classifier_logits, init_classifier

__all__ = [
    "BASELINES",
    "fewshot_raw_pixel_baseline",
    "fewshot_test_sampler",
    "fit_classifier",
    "hessian_norm",
    "hyperclean_baselines",
    "retrain_with_weights",
    "stable_step",
]

#: Keys of :func:`hyperclean_baselines`, in table order.
BASELINES = ("val_only", "noisy_plus_val", "noisy_early_stop", "no_cleaning", "oracle")

_DESCRIPTIONS = {
    "val_only": "validation set only",
    "noisy_plus_val": "noisy train + validation",
    "noisy_early_stop": "noisy train, early stopping on validation",
    "no_cleaning": "no cleaning (x = 0), step count chosen on validation",
    "oracle": "oracle: truly clean train + validation",
}


# --------------------------------------------------------------------------- training


def _objective(
    model: str, params: dict, inputs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None, reg: float
) -> torch.Tensor:
    losses = F.cross_entropy(classifier_logits(model, params, inputs), labels, reduction="none")
    value = (losses * weights).mean() if weights is not None else losses.mean()
    if reg:
        value = value + 0.5 * reg * sum((t * t).sum() for t in params.values())
    return value


def _loss_and_grad(
    model: str, params: dict, inputs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None, reg: float
) -> tuple[float, dict]:
    if model == "linear":  # closed form, no graph: the same values, about 3x faster on a CPU
        with torch.no_grad():
            logits = F.linear(inputs, params["W"], params["b"])
            log_probs = torch.log_softmax(logits, dim=1)
            losses = -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
            residual = torch.exp(log_probs)
            residual[torch.arange(len(labels), device=labels.device), labels] -= 1.0
            scale = (weights if weights is not None else torch.ones_like(losses)) / len(labels)
            residual = residual * scale.unsqueeze(1)
            value = float((losses * scale).sum())
            grads = {"W": residual.T @ inputs, "b": residual.sum(0)}
            if reg:
                value += 0.5 * reg * float(sum((t * t).sum() for t in params.values()))
                grads = {k: g + reg * params[k] for k, g in grads.items()}
        return value, grads
    with torch.enable_grad():
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        objective = _objective(model, leaves, inputs, labels, weights, reg)
        grad_list = torch.autograd.grad(objective, list(leaves.values()))
    return float(objective.detach()), dict(zip(leaves, grad_list, strict=True))


def hessian_norm(
    model: str,
    params: dict,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    reg: float = 0.0,
    iters: int = 30,
    seed: int = 0,
) -> float:
    """Largest absolute eigenvalue of the training objective's Hessian at ``params``.

    Power iteration ``v ← Hv/‖Hv‖`` from a seeded Gaussian start, ``iters`` Hessian-vector
    products (double backward); returns ``‖Hv‖`` of the last (unit) iterate, which
    approaches ``max |λ|`` from below.
    """
    if iters < 1:
        raise ValueError(f"iters={iters} must be >= 1")
    with torch.enable_grad():
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        value = _objective(model, leaves, inputs, labels, weights, reg)
        grads = torch.autograd.grad(value, list(leaves.values()), create_graph=True)
        generator = torch.Generator().manual_seed(int(seed))
        vec = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t) for t in leaves.values()]
        norm = math.sqrt(sum(float((v * v).sum()) for v in vec))
        vec = [v / norm for v in vec]
        estimate = 0.0
        for _ in range(iters):
            hv = torch.autograd.grad(grads, list(leaves.values()), grad_outputs=vec, retain_graph=True)
            estimate = math.sqrt(sum(float((h * h).sum()) for h in hv))
            if estimate == 0.0:
                break
            vec = [h.detach() / estimate for h in hv]
    return estimate


def stable_step(curvature: float, factor: float = 1.0) -> float:
    """The step rule: ``factor / curvature`` (``factor = 1``: half the limit ``2/L``).

    >>> stable_step(4.0)
    0.25
    """
    if not 0 < factor < 2:
        raise ValueError(f"factor={factor} must lie in (0, 2): a step of 2/L or more is unstable")
    if not curvature > 0:
        raise ValueError(f"curvature={curvature} must be > 0")
    return factor / curvature


def _accuracy(model: str, params: dict, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    with torch.no_grad():
        return 100.0 * float((classifier_logits(model, params, inputs).argmax(1) == labels).double().mean())


def _clone(params: dict) -> dict:
    return {k: v.detach().clone() for k, v in params.items()}


def fit_classifier(
    model: str,
    init: dict,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    reg: float = 0.0,
    max_steps: int = 2000,
    eval_every: int = 10,
    select: tuple[torch.Tensor, torch.Tensor] | None = None,
    patience: int | None = None,
    lr: float | None = None,
    lr_factor: float = 1.0,
    power_iters: int = 30,
    seed: int = 0,
) -> dict:
    """Full-batch gradient descent with the stable step and the step count chosen on ``select``.

    Args:
        model: a hyper-cleaning classifier (``"linear"``, ``"mlp"``, ``"two_layer"``).
        init: starting parameters (copied).
        inputs, labels: the fitting set ``[n, d]``, ``[n]``.
        weights: ``[n]`` per-example weights (default 1).
        reg: ridge weight.
        max_steps: the horizon.
        eval_every: accuracy on ``select`` is computed at steps 0, eval_every, 2·eval_every, ...
            and at ``max_steps``.
        select: ``(inputs, labels)`` of the selection set; ``None``: run ``max_steps`` steps
            and return the last iterate.
        patience: stop after this many evaluations without improvement (``None``: never).
        lr: the step size; ``None`` applies the rule ``lr_factor / L₀`` (module docstring).
        power_iters, seed: of the curvature estimate.

    Returns:
        dict with ``params`` (the selected iterate), ``best_step``, ``selection_accuracy``
        (% on ``select`` at ``best_step``; nan without ``select``), ``curve`` (list of
        ``(step, accuracy)``), ``steps_run``, ``lr`` (the initial step), ``curvature``
        (``L₀``; nan when ``lr`` was given), ``halvings`` (rejected steps) and
        ``final_loss``.
    """
    if model not in HYPERCLEAN_MODELS:
        raise ValueError(f"unknown hyper-cleaning model {model!r}; choose one of {', '.join(HYPERCLEAN_MODELS)}")
    if max_steps < 0 or eval_every < 1:
        raise ValueError(f"max_steps={max_steps} must be >= 0 and eval_every={eval_every} >= 1")
    if len(labels) == 0:
        raise ValueError("fit_classifier needs at least one fitting example")
    params = _clone(init)
    curvature = float("nan")
    if lr is None:
        curvature = hessian_norm(model, params, inputs, labels, weights, reg, iters=power_iters, seed=seed)
        lr = stable_step(curvature, lr_factor)
    lr0 = float(lr)
    tolerance = 16 * torch.finfo(inputs.dtype).eps

    def score(p: dict) -> float:
        return _accuracy(model, p, *select) if select is not None else float("nan")

    best_acc, best_step, best_params = score(params), 0, params
    curve = [(0, best_acc)]
    since_best = 0
    loss, grads = _loss_and_grad(model, params, inputs, labels, weights, reg)
    step, halvings = 0, 0
    while step < max_steps:
        candidate = {k: v - lr * grads[k] for k, v in params.items()}
        cand_loss, cand_grads = _loss_and_grad(model, candidate, inputs, labels, weights, reg)
        if not math.isfinite(cand_loss) or cand_loss > loss + tolerance * max(1.0, abs(loss)):
            lr *= 0.5
            halvings += 1
            if halvings > 60:
                raise FloatingPointError(f"step size rule failed: {halvings} halvings without descent (lr {lr:.3g})")
            continue
        params, loss, grads = candidate, cand_loss, cand_grads
        step += 1
        if select is not None and (step % eval_every == 0 or step == max_steps):
            acc = score(params)
            curve.append((step, acc))
            if acc > best_acc:
                best_acc, best_step, best_params, since_best = acc, step, params, 0
            else:
                since_best += 1
                if patience is not None and since_best >= patience:
                    break
    if select is None:
        best_step, best_params = step, params
    return {
        "params": _clone(best_params),
        "best_step": best_step,
        "selection_accuracy": best_acc,
        "curve": curve,
        "steps_run": step,
        "lr": lr0,
        "curvature": curvature,
        "halvings": halvings,
        "final_loss": loss,
    }


def _folds(n: int, folds: int, seed: int) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 7919))
    if folds == 1:
        held = max(1, n // 5)
        return [order[:held]]
    if not 2 <= folds <= n:
        raise ValueError(f"folds={folds} must be 1 (one 80/20 split) or between 2 and n_val={n}")
    return list(order.chunk(folds))


def _cv_fit(
    model: str,
    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    data: HypercleanData,
    *,
    reg: float,
    seed: int,
    hidden: int,
    folds: int,
    max_steps: int,
    eval_every: int,
    val_weight: float = 1.0,
) -> dict:
    """Train on ``extra`` + validation; step count by cross-validation over the validation set."""
    x_extra, y_extra, w_extra = extra
    n_val = len(data.y_val)
    if n_val < 2:
        raise ValueError(f"cross-validating the step count needs at least 2 validation examples, got {n_val}")
    init = init_classifier(
        model, data.num_features, data.num_classes, hidden=hidden, seed=seed, dtype=data.x_val.dtype, device=data.x_val.device
    )

    def fitting_set(val_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        xs = torch.cat([x_extra, data.x_val[val_index]])
        ys = torch.cat([y_extra, data.y_val[val_index]])
        weights = None
        if w_extra is not None or val_weight != 1.0:
            w_head = w_extra if w_extra is not None else torch.ones(len(y_extra), dtype=xs.dtype, device=xs.device)
            weights = torch.cat([w_head, torch.full((len(val_index),), float(val_weight), dtype=xs.dtype, device=xs.device)])
        return xs, ys, weights

    device = data.y_val.device
    curves, lrs, halvings = [], [], 0
    for held in _folds(n_val, folds, seed):
        keep = torch.ones(n_val, dtype=torch.bool)
        keep[held] = False
        xs, ys, ws = fitting_set(keep.nonzero().squeeze(1).to(device))
        held = held.to(device)
        res = fit_classifier(
            model,
            init,
            xs,
            ys,
            weights=ws,
            reg=reg,
            max_steps=max_steps,
            eval_every=eval_every,
            select=(data.x_val[held], data.y_val[held]),
            seed=seed,
        )
        curves.append(res["curve"])
        lrs.append(res["lr"])
        halvings += res["halvings"]
    steps = [s for s, _ in curves[0]]
    mean_curve = [sum(c[i][1] for c in curves) / len(curves) for i in range(len(steps))]
    best = max(range(len(steps)), key=lambda i: (mean_curve[i], -i))
    xs, ys, ws = fitting_set(torch.arange(n_val, device=device))
    final = fit_classifier(model, init, xs, ys, weights=ws, reg=reg, max_steps=steps[best], seed=seed)
    return {
        "params": final["params"],
        "best_step": steps[best],
        "selection_accuracy": mean_curve[best],
        "curve": list(zip(steps, mean_curve, strict=True)),
        "lr": final["lr"],
        "curvature": final["curvature"],
        "fold_lrs": lrs,
        "halvings": halvings + final["halvings"],
        "train_size": len(ys),
        "selection": f"{folds}-fold CV on validation" if folds > 1 else "80/20 split of validation",
    }


def _result(name: str, fit: dict, model: str, data: HypercleanData, train_size: int, selection: str) -> dict:
    return {
        "description": _DESCRIPTIONS.get(name, name),
        "test_accuracy": _accuracy(model, fit["params"], data.x_test, data.y_test),
        "selection_accuracy": fit["selection_accuracy"],
        "best_step": fit["best_step"],
        "lr": fit["lr"],
        "curvature": fit["curvature"],
        "halvings": fit["halvings"],
        "train_size": train_size,
        "selection": selection,
    }


def hyperclean_baselines(
    data: HypercleanData,
    model: str = "linear",
    reg: float = 0.0,
    seed: int = 0,
    *,
    hidden: int = 300,
    max_steps: int = 2000,
    eval_every: int = 10,
    folds: int = 5,
    patience: int = 20,
    include: Sequence[str] = BASELINES,
) -> dict[str, dict]:
    """The non-bilevel baselines of a hyper-cleaning instance (rules in the module docstring).

    Args:
        data: the instance (its device and dtype are used).
        model, reg, hidden: the classifier and its ridge, as in
            :func:`~bilevel.problems.hyperclean.hyperclean_problem`.
        seed: classifier initialisation (hidden-layer models), the cross-validation split and
            the power-iteration start.
        max_steps, eval_every: horizon and evaluation grid of the step-count selection.
        folds: cross-validation folds for the baselines trained on the validation set
            (``1``: one 80/20 split).
        patience: evaluations without improvement before ``noisy_early_stop`` stops.
        include: which baselines to compute (subset of :data:`BASELINES`).

    Returns:
        ``{name: result}`` in :data:`BASELINES` order; each result has ``description``,
        ``test_accuracy`` (%), ``selection_accuracy`` (% on the selection data at the chosen
        step), ``best_step``, ``lr``, ``curvature`` (``L₀``), ``halvings``, ``train_size`` and
        ``selection``.
    """
    if not isinstance(data, HypercleanData):
        raise TypeError(f"hyperclean_baselines expects a HypercleanData, got {type(data).__name__}")
    unknown = [name for name in include if name not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from {', '.join(BASELINES)}")
    reg = float(reg)

    def cross_validated(extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]) -> dict:
        return _cv_fit(model, extra, data, reg=reg, seed=seed, hidden=hidden, folds=folds, max_steps=max_steps, eval_every=eval_every)

    empty = (data.x_train[:0], data.y_train_noisy[:0], None)
    init = init_classifier(
        model, data.num_features, data.num_classes, hidden=hidden, seed=seed, dtype=data.x_train.dtype, device=data.x_train.device
    )
    on_val = (data.x_val, data.y_val)
    out: dict[str, dict] = {}
    for name in BASELINES:
        if name not in include:
            continue
        if name == "val_only":
            fit = cross_validated(empty)
            out[name] = _result(name, fit, model, data, fit["train_size"], fit["selection"])
        elif name == "noisy_plus_val":
            fit = cross_validated((data.x_train, data.y_train_noisy, None))
            out[name] = _result(name, fit, model, data, fit["train_size"], fit["selection"])
        elif name == "oracle":
            correct = data.y_train_noisy == data.y_train_true
            fit = cross_validated((data.x_train[correct], data.y_train_noisy[correct], None))
            out[name] = _result(name, fit, model, data, fit["train_size"], fit["selection"])
        elif name == "noisy_early_stop":
            fit = fit_classifier(
                model,
                init,
                data.x_train,
                data.y_train_noisy,
                reg=reg,
                max_steps=max_steps,
                eval_every=eval_every,
                select=on_val,
                patience=patience,
                seed=seed,
            )
            out[name] = _result(
                name,
                fit,
                model,
                data,
                len(data.y_train_noisy),
                f"validation accuracy, patience {patience} evaluations of {eval_every} steps",
            )
        else:  # no_cleaning: the lower level g(0, ·), weights σ(0) = 1/2
            half = torch.full_like(data.x_train[:, 0], 0.5)
            fit = fit_classifier(
                model,
                init,
                data.x_train,
                data.y_train_noisy,
                weights=half,
                reg=reg,
                max_steps=max_steps,
                eval_every=eval_every,
                select=on_val,
                seed=seed,
            )
            out[name] = _result(name, fit, model, data, len(data.y_train_noisy), f"validation accuracy, best of {max_steps} steps")
    return out


def retrain_with_weights(
    data: HypercleanData,
    weight_logits: Any,
    model: str = "linear",
    reg: float = 0.0,
    seed: int = 0,
    *,
    hidden: int = 300,
    max_steps: int = 2000,
    eval_every: int = 10,
    hard: bool = False,
    with_validation: bool = False,
    folds: int = 5,
) -> dict:
    """A fresh classifier trained with learned per-example weights; test accuracy.

    The objective is the bilevel lower level ``g(x, ·) = (1/n) Σ σ(x_i) CE_i + (reg/2)‖y‖²``
    on the noisy training set (``hard=True``: weights ``1[x_i ≥ 0]`` instead of ``σ(x_i)``),
    from :func:`~bilevel.problems.hyperclean.init_classifier` with ``seed``, with the stable
    step and the step count chosen on the validation set (the set the weights were learned
    on; no test data is looked at).

    With ``with_validation=True`` the validation examples join the fitting set with weight 1
    and the step count is chosen by ``folds``-fold cross-validation on the validation set,
    as for the ``noisy_plus_val`` baseline. (The weights were learned on the whole validation
    set, so the held-out folds are not fully independent of them.)

    Args:
        data: the instance the weights were learned on (same split and noise).
        weight_logits: ``[n_train]`` logits ``x``, or the upper variable ``{"weights": x}``.

    Returns:
        dict with ``test_accuracy``, ``selection_accuracy``, ``best_step``, ``lr``,
        ``curvature``, ``halvings``, ``train_size``, ``selection`` and
        ``kept_fraction`` (fraction of ``x_i ≥ 0``).
    """
    if isinstance(weight_logits, Mapping):
        weight_logits = weight_logits["weights"]
    logits = torch.as_tensor(weight_logits).detach().reshape(-1).to(device=data.x_train.device, dtype=data.x_train.dtype)
    if logits.numel() != len(data.y_train_noisy):
        raise ValueError(
            f"{logits.numel()} weight logits for {len(data.y_train_noisy)} training examples: "
            "the weights must come from a run on the same data (split and noise seed)"
        )
    weights = (logits >= 0).to(logits.dtype) if hard else torch.sigmoid(logits)
    kept = float((logits >= 0).double().mean())
    if with_validation:
        fit = _cv_fit(
            model,
            (data.x_train, data.y_train_noisy, weights),
            data,
            reg=float(reg),
            seed=seed,
            hidden=hidden,
            folds=folds,
            max_steps=max_steps,
            eval_every=eval_every,
        )
        result = _result("retrain_plus_val", fit, model, data, fit["train_size"], fit["selection"])
        result["description"] = "retrained with the learned weights, + validation"
    else:
        init = init_classifier(
            model, data.num_features, data.num_classes, hidden=hidden, seed=seed, dtype=data.x_train.dtype, device=data.x_train.device
        )
        fit = fit_classifier(
            model,
            init,
            data.x_train,
            data.y_train_noisy,
            weights=weights,
            reg=float(reg),
            max_steps=max_steps,
            eval_every=eval_every,
            select=(data.x_val, data.y_val),
            seed=seed,
        )
        result = _result("retrain", fit, model, data, len(data.y_train_noisy), f"validation accuracy, best of {max_steps} steps")
        result["description"] = "retrained with the learned weights"
    result["kept_fraction"] = kept
    return result


# --------------------------------------------------------------------------- few-shot


def fewshot_test_sampler(config: dict) -> Any:
    """The meta-test :class:`~bilevel.data.EpisodeSampler` a few-shot configuration is scored on.

    The runner's held-out sampler (:func:`bilevel.experiments.runner.fewshot_samplers`): the
    meta-test classes of the split seeded ``problem.seed + run.seed``, 25 tasks per batch,
    seed ``10_000 + problem.seed + run.seed``.
    """
    from .config import resolve
    from .runner import fewshot_samplers

    resolved = resolve(config)
    if resolved.data["problem"]["kind"] != "fewshot":
        raise ValueError(f"fewshot_test_sampler needs a few-shot configuration, got kind {resolved.data['problem']['kind']!r}")
    return fewshot_samplers(resolved)[2]


def fewshot_raw_pixel_baseline(
    config_or_sampler: Any,
    *,
    n_way: int | None = None,
    reg: float | None = None,
    feature_scale: float | None = None,
    num_tasks: int | None = None,
    steps: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Meta-test accuracy of the identity feature map (raw pixels).

    Exactly :meth:`~bilevel.problems.fewshot.FewshotProblem.meta_test` (same tasks, same
    head fit by :func:`~bilevel.problems.fewshot.solve_heads`, same ridge) with
    ``φ(a) = a`` flattened, under the same normalisation (pixels in [0, 1], rescaled to the
    sphere of radius ``feature_scale`` when it is > 0).

    Args:
        config_or_sampler: a few-shot configuration dict (its held-out sampler, ``n_way``,
            ``reg``, ``feature_scale``, ``eval_tasks``, ``eval_steps`` and ``dtype`` are
            used unless given here) or an :class:`~bilevel.data.EpisodeSampler`
            (then ``n_way``, ``reg`` and ``feature_scale`` are required).

    Returns:
        ``test_accuracy``, ``test_ci95``, ``test_tasks`` (as ``meta_test``) and ``description``.
    """
    from ..problems.fewshot import FewshotProblem, _scaled

    if isinstance(config_or_sampler, Mapping):
        from .config import resolve_config

        config = resolve_config(dict(config_or_sampler))
        p = config["problem"]
        sampler = fewshot_test_sampler(config)
        n_way = int(p["n_way"]) if n_way is None else n_way
        reg = float(p["reg"]) if reg is None else reg
        feature_scale = float(p["feature_scale"]) if feature_scale is None else feature_scale
        num_tasks = int(p["eval_tasks"]) if num_tasks is None else num_tasks
        steps = int(p["eval_steps"]) if steps is None else steps
        dtype = {"float32": torch.float32, "float64": torch.float64}.get(p.get("dtype", "float32"), dtype)
    else:
        sampler = config_or_sampler
        if n_way is None or reg is None or feature_scale is None:
            raise ValueError("with a sampler, give n_way, reg and feature_scale (those of the learned features' run)")
    num_tasks = 500 if num_tasks is None else num_tasks
    steps = 100 if steps is None else steps

    class _RawPixels(FewshotProblem):
        def features(self, x: Any, images: torch.Tensor) -> torch.Tensor:
            batch, m = images.shape[:2]
            return _scaled(images.flatten(2), self.feature_scale).view(batch, m, -1)

    def unused(x: Any, y: Any, batch: Any) -> torch.Tensor:  # Problem requires objectives; only meta_test is used
        raise NotImplementedError("the raw-pixel baseline has no bilevel objectives")

    problem = _RawPixels(
        upper=unused,
        lower=unused,
        x_init={},
        y_init={},
        name="fewshot-raw-pixels",
        feature_scale=float(feature_scale),
        n_way=int(n_way),
        meta_batch=sampler.meta_batch,
        reg=float(reg),
    )
    anchor = {"pixels": torch.zeros((), dtype=dtype)}  # meta_test reads the device/dtype from x
    metrics = problem.meta_test(anchor, sampler, num_tasks=num_tasks, steps=steps)
    scale = f"on the sphere of radius {feature_scale:g}" if feature_scale else "unnormalised"
    return {"description": f"raw pixels (identity features, {scale}), same ridge heads", **metrics}
