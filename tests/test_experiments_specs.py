"""Configuration specs: the problem and run sections come from frozen spec dataclasses, a
configuration is resolved once per run, and YAML and Python agree on the upper optimizer
and on the names of AID's solvers."""

import dataclasses
import inspect

import pytest

import bilevel as bl
from bilevel.experiments import apply_overrides, load_config, run_bench, runner
from bilevel.experiments import config as C
from bilevel.problems.fewshot import fewshot_problem
from bilevel.problems.hyperclean import hyperclean_problem
from test_experiments import TINY


def test_the_keys_of_each_section_are_the_fields_of_its_spec():
    for kind, spec in C.PROBLEM_SPECS.items():
        fields = dataclasses.fields(spec)
        assert C.PROBLEM_KEYS[kind] == {f.name: f.default for f in fields} and C.PROBLEM_KEYS[kind]["kind"] == kind
        assert all("rule" in f.metadata for f in fields)
    assert {f.name: f.default for f in dataclasses.fields(C.RunSpec)} == C.RUN_KEYS
    with pytest.raises(C.ConfigError, match=r"unknown key problem.width; valid problem keys: kind, dataset, model, hidden"):
        C.resolve_config({"problem": {"width": 3}, "method": {"name": "GALET"}})


@pytest.mark.parametrize("spec, builder", [(C.HypercleanSpec, hyperclean_problem), (C.FewshotSpec, fewshot_problem)])
def test_keys_that_are_builder_arguments_take_the_builders_defaults(spec, builder):
    signature = inspect.signature(builder).parameters
    shared = [f for f in dataclasses.fields(spec) if f.name in signature and f.name not in ("seed", "dtype", "n_way", "meta_batch")]
    assert shared
    for f in shared:
        if f.name == "feature_scale":  # the one documented difference: the configuration requires a radius > 0
            assert f.default == 3.0 and signature[f.name].default == 0.0
        else:
            assert f.default == signature[f.name].default, f.name


def test_the_spec_forwards_its_builder_arguments_by_name():
    resolved = C.resolve(load_config("fewshot_demo"))
    spec = resolved.problem
    assert isinstance(spec, C.FewshotSpec) and isinstance(resolved.run, C.RunSpec)
    arguments = spec.arguments_for(fewshot_problem, exclude=("seed", "dtype"))
    assert set(arguments) == {
        "n_way",
        "meta_batch",
        "backbone",
        "reg",
        "channels",
        "blocks",
        "norm",
        "groups",
        "hidden",
        "features",
        "feature_scale",
    }
    assert arguments["hidden"] == resolved.data["problem"]["hidden"] and isinstance(C.FewshotSpec(reg=1).reg, float)


def test_a_configuration_is_resolved_once_per_run(tmp_path, monkeypatch):
    calls = []
    real = C.resolve_config
    monkeypatch.setattr(C, "resolve_config", lambda config: calls.append(1) or real(config))
    runner.run_experiment(dict(TINY), tmp_path / "run", ["run.max_iters=2"], progress=False)
    assert len(calls) == 1
    calls.clear()
    runner.resume_run(tmp_path / "run", max_iters=4, progress=False)
    assert len(calls) == 1
    calls.clear()
    run_bench(dict(TINY), methods=["CG", "BAGDC"], seeds=[0, 1], overrides=["run.max_iters=2"], out=tmp_path / "bench", progress=False)
    assert len(calls) == 4  # 2 methods × 2 seeds


@pytest.mark.parametrize("upper, expected", [(None, bl.SGD(lr=0.1)), ("sgd", bl.SGD(lr=0.1)), ("adam", bl.Adam(lr=0.1))])
def test_yaml_and_python_agree_on_the_upper_optimizer(upper, expected):
    section = {"problem": {"kind": "hyperclean"}, "method": {"name": "GALET", "lr_upper": 0.1, **({"upper": upper} if upper else {})}}
    resolved = C.resolve_config(section)["method"]
    assert resolved["upper"] == (upper or "sgd") == (upper or C.DEFAULT_UPPER)
    method = runner.build_method(resolved)
    assert method.parts.upper == expected
    if upper != "adam":
        assert method.parts.upper == bl.GALET(lr_upper=0.1).parts.upper  # a number is plain gradient steps in Python too
    with pytest.raises(C.ConfigError, match=r"upper: adam needs method.lr_upper"):  # SlBAMM's own α is "auto" (DoG)
        runner.build_method(C.resolve_config({"method": {"name": "SlBAMM", "upper": "adam"}})["method"])


def test_aid_solvers_are_named_aid_cg_aid_neumann_aid_fixedpoint_and_the_old_names_still_read():
    for name, solver in (("AID-CG", bl.CG), ("AID-Neumann", bl.Neumann), ("AID-FixedPoint", bl.FixedPoint)):
        cls, fixed = C.method_class(name)
        assert cls is bl.AID and fixed == {"solver": solver.__name__}
        assert C.method_class(C.RENAMED_METHODS.get(solver.__name__, "")) == (cls, fixed)
    demo = load_config("hyperclean_demo")
    assert {"AID-CG", "AID-Neumann"} <= set(demo["methods"]) and not {"CG", "Neumann"} & set(demo["methods"])
    for given in ("AID-CG", "CG"):  # the old name finds the renamed preset
        method = C.resolve_config(apply_overrides(demo, [f"method.name={given}"]))["method"]
        assert method["name"] == "AID-CG" and method["solver_steps"] == 5
    assert C.resolve_config(dict(TINY))["method"]["name"] == "CG"  # a configuration's own preset named CG is kept


def test_the_corruption_rule_is_a_configuration_key():
    """problem.exclude_true_class: false (default) redraws among all classes, true among the others only."""
    from bilevel.data.hyperclean import wrong_label_fraction
    from bilevel.experiments.config import apply_overrides

    base = {**TINY, "problem": {**TINY["problem"], "n_train": 200, "noise_rate": 0.5}}
    default = runner._hyperclean_data(C.resolve(base))
    excluded = runner._hyperclean_data(C.resolve(apply_overrides(base, ["problem.exclude_true_class=true"])))
    assert wrong_label_fraction(excluded) == 0.5
    assert wrong_label_fraction(default) < 0.5  # some redraws land on the true class
    with pytest.raises(C.ConfigError, match=r"problem.exclude_true_class='yes' must be true or false"):
        C.resolve(apply_overrides(base, ["problem.exclude_true_class=yes"]))
