"""Few-shot problem: shapes, batched heads equal a per-task loop, EpisodicLower, meta-test."""

import pytest
import torch
import torch.nn.functional as F

import bilevel as bl
from bilevel.data import EpisodeSampler
from bilevel.problems.fewshot import EpisodeSource, EpisodicLower, backbone_features, fewshot_problem, solve_heads


def classes(n=6, per=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {c: (torch.rand(per, 1, 28, 28, generator=g) * 0.3 + 0.1 * c).clamp(0, 1) for c in range(n)}


def sampler(meta_batch=3, seed=0):
    return EpisodeSampler(classes(), n_way=3, k_shot=2, q_query=3, meta_batch=meta_batch, seed=seed)


@pytest.mark.parametrize("backbone,options", [("mlp", dict(hidden=16, features=8)), ("conv", dict(channels=4, norm="group", groups=2))])
def test_shapes_and_batched_heads_equal_per_task_loop(backbone, options):
    problem = fewshot_problem(n_way=3, meta_batch=3, backbone=backbone, reg=0.3, dtype=torch.float64, **options)
    batch = sampler().sample(0, dtype=torch.float64)
    feat = problem.metadata["feature_dim"]
    assert problem.y_init["W"].shape == (3, feat, 3) and problem.y_init["b"].shape == (3, 3)
    g = torch.Generator().manual_seed(1)
    y = {"W": torch.randn(3, feat, 3, generator=g, dtype=torch.float64), "b": torch.randn(3, 3, generator=g, dtype=torch.float64)}
    x = problem.x_init
    lower, upper = 0.0, 0.0
    for b in range(3):  # the reference: one task at a time
        fs = backbone_features(backbone, x, batch["support_x"][b], 2)
        fq = backbone_features(backbone, x, batch["query_x"][b], 2)
        lower += F.cross_entropy(fs @ y["W"][b] + y["b"][b], batch["support_y"][b]) + 0.15 * (
            (y["W"][b] ** 2).sum() + (y["b"][b] ** 2).sum()
        )
        upper += F.cross_entropy(fq @ y["W"][b] + y["b"][b], batch["query_y"][b]) / 3
    assert float(problem.g(x, y, batch)) == pytest.approx(float(lower), rel=1e-12)
    assert float(problem.f(x, y, batch)) == pytest.approx(float(upper), rel=1e-12)
    # second derivatives exist (implicit methods need them)
    lin = bl.Oracles().linearize(problem.lower, x, y, batch)
    assert set(lin.mixed(y)) == set(x)


def test_episodic_lower_resets_heads_and_multiplier():
    seen = []

    class Spy(bl.AID):
        def step(self, problem, state, batch=None):
            seen.append((float(sum(t.abs().sum() for t in state.y.values())), float(sum(t.abs().sum() for t in state.v.values()))))
            return super().step(problem, state, batch)

    problem = fewshot_problem(n_way=3, meta_batch=2, backbone="mlp", hidden=8, features=4)
    method = EpisodicLower(Spy(lr_upper=bl.Adam(1e-3), lr_lower=0.1, lower_steps=3, solver=bl.CG(steps=3)))
    result = bl.solve(problem, method, data=EpisodeSource(sampler(meta_batch=2)), max_iters=3)
    assert result.iterations == 3 and method.name == "AID"
    assert float(sum(t.abs().sum() for t in result.y.values())) > 0  # the inner method did move y
    assert seen == [(0.0, 0.0)] * 3  # ... but each step started from zero heads and multiplier
    with pytest.raises(TypeError, match="EpisodicLower"):
        EpisodicLower(inner="AID")


def test_episode_source_is_a_pure_function_of_the_step():
    source = EpisodeSource(sampler())
    assert torch.equal(source.batch_at(5)["support_x"], source.batch_at(5)["support_x"])
    assert not torch.equal(source.batch_at(5)["support_x"], source.batch_at(6)["support_x"])


def test_solve_heads_reaches_the_optimum_and_meta_test_reports_ci():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2]] * 2)
    heads = solve_heads(feats, labels, 3, reg=0.5, steps=200)
    W = heads["W"].clone().requires_grad_(True)
    b = heads["b"].clone().requires_grad_(True)
    logits = torch.baddbmm(b.unsqueeze(1), feats, W)
    loss = sum(F.cross_entropy(logits[t], labels[t]) for t in range(2)) + 0.25 * ((W**2).sum() + (b**2).sum())
    grads = torch.autograd.grad(loss, [W, b])
    assert max(float(gr.abs().max()) for gr in grads) < 1e-8
    problem = fewshot_problem(n_way=3, meta_batch=2, backbone="mlp", hidden=8, features=4)
    metrics = problem.meta_test(problem.x_init, sampler(meta_batch=4, seed=9), num_tasks=10, steps=20)
    assert metrics["test_tasks"] == 10 and 0 <= metrics["test_accuracy"] <= 100 and metrics["test_ci95"] >= 0
    with pytest.raises(ValueError, match="reg"):
        fewshot_problem(n_way=3, meta_batch=2, reg=0)


def test_a_backbone_too_big_for_memory_is_refused_before_allocation(monkeypatch):
    from bilevel import validation

    monkeypatch.setattr(validation, "available_memory", lambda: 10**9)
    with pytest.raises(MemoryError) as info:
        fewshot_problem(n_way=3, meta_batch=2, backbone="mlp", hidden=1_000_000, features=8)
    message = str(info.value)
    # 784·1e6 + 1e6 + 1e6·8 + 8 backbone + 2·9·3 heads = 793,000,062 parameters, 8 copies in float32
    assert message == (
        "the mlp few-shot backbone with hidden=1000000, features=8 (793,000,062 parameters in float32) needs about 25.4 GB "
        "but only 1.0 GB of memory is available: reduce hidden/features (config: problem.hidden, problem.features)"
    )
    assert fewshot_problem(n_way=3, meta_batch=2, backbone="mlp", hidden=16, features=8).x_init["fc1_w"].shape == (784, 16)


def test_backbone_start_is_the_float64_draw_in_every_dtype(monkeypatch):
    import math

    import bilevel.problems._init as init
    from bilevel.problems.fewshot import init_backbone

    monkeypatch.setattr(init, "_CHUNK", 100)
    x = init_backbone("mlp", (1, 28, 28), hidden=6, features=5, seed=2, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    w1 = (torch.rand((784, 6), generator=g, dtype=torch.float64) * 2 - 1) * math.sqrt(6.0 / 784)
    w2 = (torch.rand((6, 5), generator=g, dtype=torch.float64) * 2 - 1) * math.sqrt(6.0 / 6)
    assert torch.equal(x["fc1_w"], w1.float()) and torch.equal(x["fc2_w"], w2.float())
