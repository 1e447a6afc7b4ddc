"""Hyper-cleaning problem: losses against hand computation, gradients, cleaning works."""

import math

import numpy as np
import pytest
import torch

import bilevel as bl
from bilevel.data import hyperclean_from_arrays
from bilevel.problems.hyperclean import classifier_logits, fit_lower, hyperclean_problem, init_classifier


def tiny_data(n_train=4, n_val=3, n_test=3, noise=0.5, seed=0, dim=3):
    g = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    return hyperclean_from_arrays(
        g.random((n, dim)),
        g.integers(0, 3, n),
        num_classes=3,
        max_pixel=1.0,
        name="tiny",
        noise_rate=noise,
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        dtype=torch.float64,
    )


def blobs(n_per_split=200, noise=0.5, seed=0, classes=3, dim=5):
    """Gaussian blobs, well separated, three equal splits; labels corrupted by the papers' rule."""
    g = np.random.default_rng(seed)
    centers = g.normal(0, 3, (classes, dim))
    labels = g.integers(0, classes, 3 * n_per_split)
    points = centers[labels] + g.normal(0, 1, (3 * n_per_split, dim))
    return hyperclean_from_arrays(
        points,
        labels,
        num_classes=classes,
        max_pixel=1.0,
        name="blobs",
        noise_rate=noise,
        seed=seed,
        n_train=n_per_split,
        n_val=n_per_split,
        n_test=n_per_split,
        dtype=torch.float64,
    )


def manual_ce(logits, label):
    return -logits[label] + math.log(sum(math.exp(v) for v in logits))


@pytest.mark.parametrize("model", ["linear", "mlp", "two_layer"])
def test_losses_match_hand_computation(model):
    data = tiny_data()
    problem = hyperclean_problem(data, model=model, reg=0.1, hidden=4, seed=3)
    y = init_classifier(model, 3, 3, hidden=4, seed=1, dtype=torch.float64)
    y = {k: v + 0.1 * torch.arange(v.numel(), dtype=v.dtype).reshape(v.shape) / v.numel() for k, v in y.items()}
    x = {"weights": torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=torch.float64)}

    def h(a):
        a = a.tolist()
        if model == "linear":
            W, b = y["W"].tolist(), y["b"].tolist()
            return [sum(a[i] * W[c][i] for i in range(3)) + b[c] for c in range(3)]  # W is [out, in]
        W1, b1, W2, b2 = (y[k].tolist() for k in ("W1", "b1", "W2", "b2"))
        hidden = [sum(a[i] * W1[j][i] for i in range(3)) + b1[j] for j in range(4)]
        if model == "mlp":
            hidden = [1 / (1 + math.exp(-v)) for v in hidden]
        return [sum(hidden[j] * W2[c][j] for j in range(4)) + b2[c] for c in range(3)]

    weights = [1 / (1 + math.exp(-v)) for v in x["weights"].tolist()]
    g_hand = sum(w * manual_ce(h(a), int(b)) for w, a, b in zip(weights, data.x_train, data.y_train_noisy, strict=True)) / 4
    g_hand += 0.05 * sum(float((t * t).sum()) for t in y.values())
    f_hand = sum(manual_ce(h(a), int(b)) for a, b in zip(data.x_val, data.y_val, strict=True)) / 3
    assert float(problem.g(x, y)) == pytest.approx(g_hand, rel=1e-10)
    assert float(problem.f(x, y)) == pytest.approx(f_hand, rel=1e-10)


def test_gradient_wrt_weight_logits():
    data = tiny_data()
    problem = hyperclean_problem(data, model="linear")
    y = {"W": torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), "b": torch.zeros(3, dtype=torch.float64)}
    x = {"weights": torch.tensor([0.5, -0.5, 1.0, 0.0], dtype=torch.float64, requires_grad=True)}
    (grad,) = torch.autograd.grad(problem.g(x, y), [x["weights"]])
    ce = torch.nn.functional.cross_entropy(data.x_train @ y["W"].T + y["b"], data.y_train_noisy, reduction="none")
    s = torch.sigmoid(x["weights"].detach())
    expected = s * (1 - s) * ce / 4  # d/dx_i of mean_i σ(x_i) CE_i
    assert torch.allclose(grad, expected, atol=1e-12)
    # double backward (mixed products) works and matches finite differences of ∇_y g
    lin = bl.Oracles().linearize(problem.lower, {"weights": x["weights"].detach()}, y, None)
    v = {"W": torch.ones(3, 3, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float64)}
    mixed = lin.mixed(v)["weights"]
    eps = 1e-6

    def grad_y_dot_v(xw):
        yy = {k: t.clone().requires_grad_(True) for k, t in y.items()}
        gr = torch.autograd.grad(problem.g({"weights": xw}, yy), list(yy.values()))
        return sum(float((a * v[k]).sum()) for a, k in zip(gr, yy, strict=True))

    fd = torch.tensor(
        [
            (grad_y_dot_v(x["weights"].detach() + eps * e) - grad_y_dot_v(x["weights"].detach() - eps * e)) / (2 * eps)
            for e in torch.eye(4, dtype=torch.float64)
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(mixed, fd, atol=1e-6)


def test_initialisation_is_seeded_and_follows_dtype():
    a = init_classifier("mlp", 5, 3, hidden=7, seed=4, dtype=torch.float64)
    b = init_classifier("mlp", 5, 3, hidden=7, seed=4, dtype=torch.float64)
    c = init_classifier("mlp", 5, 3, hidden=7, seed=5, dtype=torch.float64)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["W1"], c["W1"])
    assert a["W1"].abs().max() <= 1 / math.sqrt(5) and a["W1"].dtype == torch.float64
    assert all(float(t.abs().sum()) == 0 for t in init_classifier("linear", 5, 3).values())
    problem = hyperclean_problem(tiny_data(), model="two_layer", hidden=4)
    assert problem.x_init["weights"].dtype == torch.float64 and problem.y_init["W1"].shape == (4, 3)  # [out, in]
    assert problem.y_init["W2"].shape == (3, 4) and init_classifier("linear", 5, 3)["W"].shape == (3, 5)
    assert classifier_logits("two_layer", problem.y_init, tiny_data().x_val).shape == (3, 3)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="choose one of"):
        hyperclean_problem(tiny_data(), model="resnet")
    with pytest.raises(ValueError, match="reg"):
        hyperclean_problem(tiny_data(), reg=-1)
    with pytest.raises(TypeError, match="HypercleanData"):
        hyperclean_problem({"x": 1})


@pytest.mark.parametrize(
    "method",
    [
        bl.AID(lr_upper=bl.Adam(0.1), lr_lower=0.5, lower_steps=10, solver=bl.CG(steps=10)),
        bl.GALET(lr_upper=bl.Adam(0.1), lr_lower=0.5, lower_steps=5, lr_shadow=0.1, shadow_steps=5, stability_check="off"),
    ],
    ids=["AID-CG", "GALET"],
)
def test_methods_clean_gaussian_blobs(method):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, much faster on a busy machine
    try:
        _check_cleaning(method)
    finally:
        torch.set_num_threads(threads)


def _check_cleaning(method):
    torch.manual_seed(0)
    data = blobs()
    problem = hyperclean_problem(data, model="linear")
    baseline_y = fit_lower(problem, problem.x_init, problem.y_init, steps=300, lr=0.5)
    baseline = problem.evaluate(problem.x_init, baseline_y)
    assert baseline["f1"] == pytest.approx(2 * 0.5 / 1.5)  # every example kept
    result = bl.solve(problem, method, max_iters=100, log_every=50)
    metrics = problem.evaluate(result.x, result.y)
    assert metrics["f1"] > 0.75, metrics  # keeping every example gives 0.667
    assert metrics["test_accuracy"] > baseline["test_accuracy"], (metrics, baseline)


def test_a_model_too_big_for_memory_is_refused_before_allocation(monkeypatch):
    from bilevel import validation

    monkeypatch.setattr(validation, "available_memory", lambda: 10**9)
    allocated = []
    monkeypatch.setattr("bilevel.problems.hyperclean.init_classifier", lambda *a, **k: allocated.append(1))
    # 3 features, 3 classes, hidden = 2e7: 1.4e8 parameters (8 copies) + 7 examples × (2e7 + 3) activations (4 copies), float64
    with pytest.raises(MemoryError) as info:
        hyperclean_problem(tiny_data(), model="mlp", hidden=20_000_000)
    message = str(info.value)
    assert message.startswith(
        "the mlp hyper-cleaning model with hidden=20000000 (140,000,007 parameters in float64) "
        "needs about 13.4 GB but only 1.0 GB of memory is available: "
    )
    assert message.endswith(
        "reduce hidden or n_train (config: problem.hidden, problem.n_train), "
        "or use float32 (dtype=torch.float32; config: problem.dtype=float32) to halve it"
    )
    assert "\n" not in message and isinstance(info.value, ValueError) and not allocated
    monkeypatch.setattr(validation, "available_memory", lambda: None)  # unknown: no refusal
    hyperclean_problem(tiny_data(), model="linear")


def test_hidden_layer_start_is_the_float64_draw_in_every_dtype(monkeypatch):
    """Drawn in float64 block by block: the same numbers as one float64 draw, cast."""
    import bilevel.problems._init as init

    monkeypatch.setattr(init, "_CHUNK", 7)  # many blocks of 1-2 rows
    y32 = init_classifier("mlp", 5, 3, hidden=4, seed=3, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    expected = {}
    for name, shape, fan_in in (("W1", (5, 4), 5), ("b1", (4,), 5), ("W2", (4, 3), 4), ("b2", (3,), 4)):
        expected[name] = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * (1.0 / math.sqrt(fan_in))
        if name.startswith("W"):
            expected[name] = expected[name].T  # drawn [in, out], stored [out, in]
    for name, value in expected.items():
        assert torch.equal(y32[name], value.to(torch.float32))
    y64 = init_classifier("mlp", 5, 3, hidden=4, seed=3, dtype=torch.float64)
    assert all(torch.equal(y64[name], value) for name, value in expected.items())


def test_bad_hidden_names_the_argument():
    with pytest.raises(ValueError, match=r"^hyperclean_problem\(hidden=0\) must be an integer >= 1$"):
        hyperclean_problem(tiny_data(), model="mlp", hidden=0)
    with pytest.raises(ValueError, match=r"^hyperclean_problem\(reg=-1\) must be a number >= 0"):
        hyperclean_problem(tiny_data(), reg=-1)


def test_the_seeded_start_is_bilevel_0_1_s_in_out_draw_transposed():
    """Weights are stored [out, in] (F.linear); the numbers are the [in, out] draws of bilevel 0.1."""
    from bilevel.problems._init import seeded_uniform

    generator = torch.Generator().manual_seed(4)
    w1 = seeded_uniform((5, 7), 1 / math.sqrt(5), generator, torch.float64, None)
    b1 = seeded_uniform((7,), 1 / math.sqrt(5), generator, torch.float64, None)
    w2 = seeded_uniform((7, 3), 1 / math.sqrt(7), generator, torch.float64, None)
    y = init_classifier("mlp", 5, 3, hidden=7, seed=4, dtype=torch.float64)
    assert torch.equal(y["W1"], w1.T) and torch.equal(y["b1"], b1) and torch.equal(y["W2"], w2.T)
    inputs = torch.rand(6, 5, dtype=torch.float64)
    expected = torch.sigmoid(inputs @ w1 + b1) @ w2 + y["b2"]
    assert torch.allclose(classifier_logits("mlp", y, inputs), expected, atol=1e-14)
