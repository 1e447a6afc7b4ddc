"""Experiment configurations: built-ins, overrides, validation errors, the run directory."""

import json

import pytest
import yaml

from bilevel.experiments import ConfigError, apply_overrides, build_experiment, builtin_configs, load_config, resolve_config, run_experiment
from bilevel.experiments.runner import build_method

TINY = {
    "name": "tiny",
    "problem": {"kind": "hyperclean", "dataset": "mnist5k", "n_train": 100, "n_val": 60, "n_test": 60, "baseline_steps": 20},
    "method": {"name": "CG"},
    "methods": {
        "CG": {"solver": "CG", "solver_steps": 3, "lr_upper": 0.1, "lr_lower": 0.5, "lower_steps": 3},
        "BAGDC": {"lr_upper": 0.1, "lr_lower": 0.5, "lr_dual": 0.5},
    },
    "run": {"max_iters": 6, "eval_every": 3, "log_every": 2, "checkpoint_every": 2, "threads": 1, "progress": False},
}


def test_every_builtin_config_resolves():
    names = set(builtin_configs())
    assert {
        "hyperclean_demo",
        "hyperclean_mnist_pbgd",
        "hyperclean_mnist_liu",
        "hyperclean_fashion_liu",
        "fewshot_demo",
        "fewshot_mnist_fashion",
        "fewshot_omniglot",
    } <= names
    for name in names:
        raw = load_config(name)
        config = resolve_config(raw)
        for method in config.get("methods") or {}:
            resolved = resolve_config(apply_overrides(raw, [f"method.name={method}"]))
            build_method(resolved["method"])


def test_overrides_parse_yaml_values_and_reach_the_method():
    config = apply_overrides(
        TINY, ["run.max_iters=9", "method.name=BAGDC", "method.lr_dual=0.25", "problem.noise_rate=0.3", "run.tensorboard=false"]
    )
    assert config["run"]["max_iters"] == 9 and config["problem"]["noise_rate"] == 0.3 and config["run"]["tensorboard"] is False
    resolved = resolve_config(config)
    assert resolved["method"]["lr_dual"] == 0.25 and resolved["method"]["lr_lower"] == 0.5  # preset kept
    method = build_method(resolved["method"])
    assert method.name == "BAGDC" and method.lr_dual == 0.25 and method.lr_upper.lr == 0.1
    assert TINY["run"]["max_iters"] == 6  # the input is not modified


@pytest.mark.parametrize(
    "override,message",
    [
        ("run.max_iter=5", "valid run keys: max_iters"),
        ("problem.noise=0.1", "valid problem keys"),
        ("method.lr_shadow=0.1", "valid method keys"),
        ("method.name=Newton", "unknown method 'Newton'"),
        ("max_iters", "section.key=value"),
        ("run.max_iters=-1", "run.max_iters"),
    ],
)
def test_bad_overrides_give_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(apply_overrides(TINY, [override]))


def test_unknown_config_name_lists_the_builtins():
    with pytest.raises(ConfigError, match="hyperclean_demo"):
        load_config("no_such_experiment")


def test_run_directory_layout_and_records(tmp_path):
    summary = run_experiment(TINY, tmp_path / "run", progress=False)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.yaml", "env.json", "log.jsonl", "checkpoint.pt", "summary.json"} <= files
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["method"]["solver_steps"] == 3 and config["run"]["eval_every"] == 3
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert {"python", "torch", "numpy", "device", "seed", "hostname", "command"} <= set(env)
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [0, 2, 3, 4, 6]
    assert "f1" in lines[0] and "upper_loss" in lines[1] and "f1" in lines[2] and "upper_loss" in lines[2] and "f1" not in lines[3]
    assert summary["iterations"] == 6 and summary["status"] == "max_iters" and "test_accuracy" in summary["metrics"]
    assert summary["baseline"]["f1"] == pytest.approx(2 / 3, abs=0.02)


def test_fewshot_experiment_builds_an_episodic_method():
    config = load_config("fewshot_demo")
    exp = build_experiment(apply_overrides(config, ["problem.eval_tasks=5"]))
    assert type(exp.method).__name__ == "EpisodicLower" and exp.problem.meta_batch == 4
    assert exp.data.batch_at(0)["support_x"].shape[:2] == (4, 2)  # 2-way 1-shot


def test_fewshot_meta_validation_classes_are_scored_apart_and_the_split_follows_the_seed():
    from bilevel.experiments.config import resolve
    from bilevel.experiments.runner import fewshot_classes, fewshot_samplers

    base = apply_overrides(
        load_config("fewshot_demo"), ["problem.eval_tasks=5", "problem.n_way=2", "problem.num_train_classes=5", "problem.num_val_classes=2"]
    )
    exp = build_experiment(base)
    metrics = exp.evaluate(exp.method.init(exp.problem, batch=exp.data.batch_at(0)))
    assert {"test_accuracy", "val_accuracy", "val_ci95"} <= set(metrics)
    config = resolve(base)
    train, val, test = fewshot_classes(config.problem, config.run.seed)
    assert (len(train), len(val), len(test)) == (5, 2, 3)
    _, val_sampler, test_sampler = fewshot_samplers(config)
    assert set(val_sampler.sample(0)["classes"].flatten().tolist()) <= set(val)
    assert set(test_sampler.sample(0)["classes"].flatten().tolist()) <= set(test)
    # run.seed moves the class split (problem.seed + run.seed), so a bench over seeds covers several splits
    splits = {tuple(fewshot_classes(resolve(apply_overrides(base, [f"run.seed={s}"])).problem, s)[2]) for s in range(5)}
    assert len(splits) == 5
    without = build_experiment(apply_overrides(load_config("fewshot_demo"), ["problem.eval_tasks=5", "problem.num_val_classes=0"]))
    assert "val_accuracy" not in without.baseline()
