"""Baselines of the hyper-cleaning and few-shot experiments, and the corruption rule's accounting."""

import math

import numpy as np
import pytest
import torch

from bilevel.data import cleaner_metrics, hyperclean_from_arrays
from bilevel.data.hyperclean import (
    corrupt_labels,
    data_f1_ceiling,
    expected_wrong_label_fraction,
    f1_ceiling,
    wrong_label_fraction,
)
from bilevel.experiments import baselines as B
from bilevel.problems.hyperclean import init_classifier


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems: one thread is faster, and far faster on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def blobs(noise_rate=0.4, seed=0, n=(120, 60, 60), classes=3, d=4, exclude=False, spread=1.2):
    """Gaussian blobs in float64: class c centred at 3·e_c (separable up to the spread)."""
    rng = np.random.default_rng(100 + seed)
    total = sum(n)
    labels = rng.integers(0, classes, size=total)
    centres = 3.0 * np.eye(classes, d)
    images = centres[labels] + spread * rng.standard_normal((total, d))
    return hyperclean_from_arrays(
        images,
        labels,
        num_classes=classes,
        max_pixel=1.0,
        name="blobs",
        noise_rate=noise_rate,
        seed=seed,
        n_train=n[0],
        n_val=n[1],
        n_test=n[2],
        dtype=torch.float64,
        exclude_true_class=exclude,
    )


def _old_corrupt(labels, noise_rate, num_classes, rng):
    # the rule as published before the option existed: the default must consume rng identically
    n = len(labels)
    k = round(noise_rate * n)
    index = rng.choice(n, size=k, replace=False)
    noisy = labels.copy()
    noisy[index] = rng.integers(0, num_classes, size=k)
    return noisy


# --------------------------------------------------------------------------- corruption rule


def test_default_corruption_is_unchanged():
    labels = np.random.default_rng(0).integers(0, 10, size=500)
    new, _ = corrupt_labels(labels, 0.5, 10, np.random.default_rng(3))
    np.testing.assert_array_equal(new, _old_corrupt(labels, 0.5, 10, np.random.default_rng(3)))


@pytest.mark.parametrize("num_classes", [2, 3, 10])
def test_excluding_the_true_class_makes_every_chosen_label_wrong(num_classes):
    labels = np.random.default_rng(1).integers(0, num_classes, size=1001)
    noisy, chosen = corrupt_labels(labels, 0.37, num_classes, np.random.default_rng(2), exclude_true=True)
    wrong = noisy != labels
    np.testing.assert_array_equal(wrong, chosen)
    assert wrong.sum() == round(0.37 * 1001)
    assert noisy.min() >= 0 and noisy.max() < num_classes
    if num_classes > 2:  # uniform over the other classes: every offset 1..C-1 occurs
        assert set(((noisy - labels) % num_classes)[chosen]) == set(range(1, num_classes))


def test_wrong_fraction_is_exactly_the_noise_rate_when_excluding():
    data = blobs(noise_rate=0.5, exclude=True, n=(200, 20, 20))
    assert wrong_label_fraction(data) == 0.5 == expected_wrong_label_fraction(0.5, 3, True, n=200)
    assert data_f1_ceiling(data) == 1.0 == f1_ceiling(0.5, 3, exclude_true_class=True)


def test_wrong_fraction_and_f1_ceiling_match_simulation_when_including():
    rate, classes, n, draws = 0.5, 10, 2000, 200
    wrong, ceiling_clean, ceiling_noisy = [], [], []
    labels = np.random.default_rng(5).integers(0, classes, size=n)
    for seed in range(draws):
        noisy, chosen = corrupt_labels(labels, rate, classes, np.random.default_rng(seed))
        correct = noisy == labels
        wrong.append(1 - correct.mean())
        # the best cleaner keeps exactly the correct labels; scored by the library's metric
        logits = torch.from_numpy(np.where(correct, 1.0, -1.0))
        ceiling_clean.append(cleaner_metrics(logits, torch.from_numpy(~chosen), rate)["f1"])
        tp, unchanged = (~correct).sum(), (chosen & correct).sum()
        ceiling_noisy.append(2 * tp / (2 * tp + unchanged))
    # binomial standard error of a mean over `draws` data sets, 5 sigma
    se = math.sqrt(rate / classes / n / draws)
    assert abs(np.mean(wrong) - expected_wrong_label_fraction(rate, classes)) < 5 * se
    assert expected_wrong_label_fraction(rate, classes) == pytest.approx(0.45)
    assert abs(np.mean(ceiling_clean) - f1_ceiling(rate, classes)) < 5 * se
    assert abs(np.mean(ceiling_noisy) - f1_ceiling(rate, classes, positive="noisy")) < 5 * se
    assert f1_ceiling(rate, classes) == pytest.approx(1 / 1.05)


def test_data_f1_ceiling_is_cleaner_metrics_of_the_perfect_label_checker():
    data = blobs(noise_rate=0.5, classes=3, n=(300, 10, 10))
    correct = data.y_train_noisy == data.y_train_true
    best = cleaner_metrics(torch.where(correct, 1.0, -1.0), data.clean_mask, data.noise_rate)["f1"]
    assert data_f1_ceiling(data) == pytest.approx(best)
    assert data_f1_ceiling(data) < 1.0  # some chosen labels were redrawn as their true class


# --------------------------------------------------------------------------- training rules


def test_linear_closed_form_gradient_matches_autograd():
    data = blobs()
    params = {
        k: torch.randn(v.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        for k, v in init_classifier("linear", 4, 3, dtype=torch.float64).items()
    }
    weights = torch.rand(len(data.y_train_noisy), dtype=torch.float64)
    value, grads = B._loss_and_grad("linear", params, data.x_train, data.y_train_noisy, weights, 0.3)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ref = B._objective("linear", leaves, data.x_train, data.y_train_noisy, weights, 0.3)
    ref_grads = torch.autograd.grad(ref, list(leaves.values()))
    assert value == pytest.approx(float(ref.detach()), rel=1e-12)
    for key, g in zip(leaves, ref_grads, strict=True):
        torch.testing.assert_close(grads[key], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model", ["linear", "two_layer"])
def test_step_rule_is_below_the_stability_limit(model):
    data = blobs()
    init = init_classifier(model, 4, 3, hidden=6, seed=0, dtype=torch.float64)
    names = list(init)
    sizes = [init[k].numel() for k in names]

    def flat_objective(theta):
        parts = dict(zip(names, (p.view_as(init[k]) for k, p in zip(names, theta.split(sizes), strict=True)), strict=True))
        return B._objective(model, parts, data.x_train, data.y_train_noisy, None, 0.0)

    theta = torch.cat([init[k].reshape(-1) for k in names])
    exact = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(flat_objective, theta)).abs().max())
    estimate = B.hessian_norm(model, init, data.x_train, data.y_train_noisy, iters=100)
    assert 0.9 * exact <= estimate <= exact * (1 + 1e-8)
    lr = B.stable_step(estimate)
    assert lr < 2.0 / exact
    with pytest.raises(ValueError):
        B.stable_step(estimate, factor=2.0)


def test_selected_step_is_the_argmax_of_validation_accuracy():
    data = blobs(noise_rate=0.6)
    init = init_classifier("linear", 4, 3, dtype=torch.float64)
    fit = B.fit_classifier("linear", init, data.x_train, data.y_train_noisy, max_steps=300, eval_every=5, select=(data.x_val, data.y_val))
    steps, accs = zip(*fit["curve"], strict=True)
    assert fit["best_step"] == steps[int(np.argmax(accs))]  # first maximum
    assert fit["selection_accuracy"] == max(accs) == B._accuracy("linear", fit["params"], data.x_val, data.y_val)
    assert fit["halvings"] == 0 and fit["steps_run"] == 300
    # replaying best_step steps without selection gives the selected classifier
    replay = B.fit_classifier("linear", init, data.x_train, data.y_train_noisy, max_steps=fit["best_step"])
    for key in init:
        torch.testing.assert_close(replay["params"][key], fit["params"][key])
    # early stopping with patience stops at the first plateau but keeps the best iterate seen
    early = B.fit_classifier(
        "linear", init, data.x_train, data.y_train_noisy, max_steps=300, eval_every=5, select=(data.x_val, data.y_val), patience=3
    )
    steps_e, accs_e = zip(*early["curve"], strict=True)
    assert early["best_step"] == steps_e[int(np.argmax(accs_e))]
    assert len(steps_e) - 1 - steps_e.index(early["best_step"]) <= 3


def test_step_is_halved_when_the_objective_would_increase():
    data = blobs()
    init = init_classifier("linear", 4, 3, dtype=torch.float64)
    fit = B.fit_classifier("linear", init, data.x_train, data.y_train_noisy, max_steps=20, lr=50.0)
    assert fit["halvings"] > 0 and math.isfinite(fit["final_loss"])


# --------------------------------------------------------------------------- baselines


def test_oracle_equals_noisy_plus_val_without_noise():
    data = blobs(noise_rate=0.0)
    table = B.hyperclean_baselines(data, max_steps=60, eval_every=5, folds=3, include=("oracle", "noisy_plus_val"))
    oracle, mixed = table["oracle"], table["noisy_plus_val"]
    assert oracle.pop("description") != mixed.pop("description")
    assert oracle == mixed


def test_baselines_table_on_blobs():
    data = blobs(noise_rate=0.6, spread=1.5)
    table = B.hyperclean_baselines(data, max_steps=150, eval_every=5, folds=2)
    assert list(table) == list(B.BASELINES)
    for name, row in table.items():
        assert 0 <= row["test_accuracy"] <= 100 and row["halvings"] == 0, name
        assert row["lr"] < 2 / row["curvature"]
    # x = 0 weighs every example 1/2: the same path as unit weights with the 1/L rule
    assert table["no_cleaning"]["lr"] == pytest.approx(2 * table["noisy_early_stop"]["lr"], rel=1e-6)
    assert table["oracle"]["train_size"] == int((data.y_train_noisy == data.y_train_true).sum()) + len(data.y_val)
    assert table["oracle"]["test_accuracy"] >= table["no_cleaning"]["test_accuracy"]


def test_retrain_with_zero_logits_is_the_no_cleaning_baseline():
    data = blobs(noise_rate=0.5)
    base = B.hyperclean_baselines(data, max_steps=100, eval_every=5, include=("no_cleaning",))["no_cleaning"]
    again = B.retrain_with_weights(data, {"weights": torch.zeros(len(data.y_train_noisy))}, max_steps=100, eval_every=5)
    for key in ("test_accuracy", "best_step", "selection_accuracy", "lr"):
        assert again[key] == base[key], key
    assert again["kept_fraction"] == 1.0
    # perfect weights: only correct labels count; the classifier beats (or ties) no cleaning
    perfect = torch.where(data.y_train_noisy == data.y_train_true, 20.0, -20.0)
    best = B.retrain_with_weights(data, perfect, max_steps=100, eval_every=5, hard=True)
    assert best["test_accuracy"] >= base["test_accuracy"]
    plus = B.retrain_with_weights(data, perfect, max_steps=60, eval_every=5, with_validation=True, folds=2)
    assert plus["train_size"] == len(data.y_train_noisy) + len(data.y_val)
    with pytest.raises(ValueError, match="same data"):
        B.retrain_with_weights(data, torch.zeros(3))


def test_mlp_baseline_runs():
    data = blobs()
    row = B.hyperclean_baselines(data, model="mlp", hidden=8, max_steps=40, eval_every=10, include=("noisy_early_stop",))
    assert row["noisy_early_stop"]["curvature"] > 0 and math.isfinite(row["noisy_early_stop"]["test_accuracy"])


# --------------------------------------------------------------------------- few-shot


def test_raw_pixel_baseline_is_the_meta_test_of_identity_features():
    from bilevel.data import EpisodeSampler
    from bilevel.problems.fewshot import _scaled, head_logits, solve_heads

    gen = torch.Generator().manual_seed(0)
    classes = {c: torch.rand(8, 1, 5, 5, generator=gen, dtype=torch.float64) + 0.3 * c for c in range(5)}
    sampler = EpisodeSampler(classes, n_way=3, k_shot=2, q_query=2, meta_batch=4, seed=0)
    out = B.fewshot_raw_pixel_baseline(sampler, n_way=3, reg=0.5, feature_scale=2.0, num_tasks=8, steps=30, dtype=torch.float64)
    accs = []
    for step in range(2):
        batch = sampler.sample(step, dtype=torch.float64)
        support, query = (_scaled(batch[k].flatten(2), 2.0) for k in ("support_x", "query_x"))
        heads = solve_heads(support, batch["support_y"], 3, 0.5, 30)
        accs.append((head_logits(query, heads).argmax(-1) == batch["query_y"]).double().mean(1))
    assert out["test_accuracy"] == pytest.approx(100 * float(torch.cat(accs).mean()))
    assert out["test_tasks"] == 8.0


def test_fewshot_test_sampler_is_the_runners():
    pytest.importorskip("mlxtend")
    from bilevel.experiments import build_experiment, load_config

    config = load_config("fewshot_demo")
    config["problem"]["eval_tasks"] = 25
    exp = build_experiment(config)
    ours = exp.problem.meta_test(
        exp.problem.x_init, B.fewshot_test_sampler(exp.config), num_tasks=25, steps=int(exp.config["problem"]["eval_steps"])
    )
    theirs = exp.baseline()
    assert ours["test_accuracy"] == theirs["test_accuracy"]
    raw = B.fewshot_raw_pixel_baseline(exp.config, num_tasks=25)
    assert 0 < raw["test_accuracy"] <= 100


def test_docstring_examples():
    import doctest

    import bilevel.data.hyperclean as data_module

    for module in (B, data_module):
        failures, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert attempted > 0 and failures == 0, module.__name__
