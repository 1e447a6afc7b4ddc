"""Configuration values: numbers as a person types them, one-line errors naming key, value and expectation."""

import re

import pytest

from bilevel.experiments import ConfigError, apply_overrides, load_config, resolve_config
from bilevel.experiments.config import load_yaml
from bilevel.experiments.runner import build_method

TINY = {
    "name": "tiny",
    "problem": {"kind": "hyperclean", "dataset": "mnist5k", "n_train": 100, "n_val": 60, "n_test": 60},
    "method": {"name": "GALET"},
    "run": {"max_iters": 6, "eval_every": 3, "log_every": 2},
}
FEWSHOT = {"problem": {"kind": "fewshot"}, "method": {"name": "CG"}}


def _resolve(*overrides, config=TINY):
    return resolve_config(apply_overrides(config, list(overrides)))


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-3", 1e-3),
        ("1E6", 1e6),
        (".5", 0.5),
        ("-2e-4", -2e-4),
        ("+3e2", 300.0),
        ("1.0e-3", 1e-3),
        ("5", 5),
        ("010", 10),
        ("0x10", 16),
        (".inf", float("inf")),
        ("true", True),
        ("False", False),
        ("null", None),
    ],
)
def test_load_yaml_reads_numbers_a_person_types(text, value):
    parsed = load_yaml(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ["off", "on", "yes", "no", "1:30", "abc", "1e", "e3"])
def test_load_yaml_keeps_words_as_strings(text):
    assert load_yaml(text) == text


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("method.lr_lower=1e-3", "lr_lower", 1e-3),
        ("method.lr_upper=1e-3", "lr_upper", 1e-3),
        ("method.lr_shadow=1E-2", "lr_shadow", 1e-2),
        ("method.lr_lower=.5", "lr_lower", 0.5),
        ("method.lr_upper=2.5E-4", "lr_upper", 2.5e-4),
    ],
)
def test_method_numbers_in_exponent_form_reach_the_method(override, key, value):
    resolved = _resolve(override)
    assert resolved["method"][key] == value
    method = build_method(resolved["method"])
    assert (method.lr_upper.lr if key == "lr_upper" else getattr(method, key)) == value


def test_auto_step_sizes_are_written_as_auto_in_yaml():
    """``lr_lower: auto`` and ``lr_upper: auto`` reach the method as in Python; an auto upper
    step takes no ``upper: adam`` (it has no α to hand to Adam): one line saying so."""
    method = build_method(_resolve("method.name=BAGDC", "method.lr_lower=auto", "method.lr_upper=auto")["method"])
    assert method.lr_lower == "auto" and method.lr_upper == "auto"
    with pytest.raises(ConfigError, match=r"lr_upper: auto is the method's own step; it takes no upper: adam"):
        build_method(_resolve("method.name=BAGDC", "method.lr_upper=auto", "method.upper=adam")["method"])


def test_integer_keys_accept_integral_floats():
    resolved = _resolve("run.max_iters=1e4", "run.seed=1E3", "problem.n_train=5e2")
    assert resolved["run"]["max_iters"] == 10_000 and type(resolved["run"]["max_iters"]) is int
    assert resolved["run"]["seed"] == 1000 and resolved["problem"]["n_train"] == 500


def test_config_files_read_numbers_the_same_way(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "problem: {kind: hyperclean, n_train: 1e3}\nmethod: {name: GALET, lr_lower: 1e-3, stability_check: off}\nrun: {max_iters: 2E2}\n"
    )
    resolved = resolve_config(load_config(path))
    assert resolved["method"]["lr_lower"] == 1e-3 and resolved["method"]["stability_check"] == "off"
    assert resolved["run"]["max_iters"] == 200 and resolved["problem"]["n_train"] == 1000


def test_stability_check_off_is_the_word_off():
    assert build_method(_resolve("method.stability_check=off")["method"]).stability_check == "off"


@pytest.mark.parametrize(
    "override, message",
    [
        # method section: the runner's keys
        ("method.lr_upper=abc", "method.lr_upper='abc' must be a positive number, a schedule {value: α₀, power: p}, 'auto' or null"),
        ("method.lr_upper=[1,2]", "method.lr_upper=[1, 2] must be a positive number, a schedule {value: α₀, power: p}, 'auto' or null"),
        ("method.lr_upper=0", "method.lr_upper=0 must be a positive number, a schedule {value: α₀, power: p}, 'auto' or null"),
        ("method.lr_upper=.inf", "method.lr_upper=inf must be a positive number, a schedule {value: α₀, power: p}, 'auto' or null"),
        ("method.lr_upper=.nan", "method.lr_upper=nan must be a positive number, a schedule {value: α₀, power: p}, 'auto' or null"),
        ("method.lr_upper=true", "method.lr_upper=True must be a positive number, a schedule {value: α₀, power: p}, 'auto' or null"),
        ("method.upper=rmsprop", "method.upper='rmsprop' must be one of adam, sgd"),
        ("method.solver=LU", "method.solver='LU' must be one of CG, Neumann, FixedPoint"),
        ("method.solver_steps=0", "method.solver_steps=0 must be an integer >= 1"),
        ("method.solver_steps=2.5", "method.solver_steps=2.5 must be an integer >= 1"),
        ("method.solver_lr=-1e-3", "method.solver_lr=-0.001 must be a positive number or null"),
        ("method.episodic=maybe", "method.episodic='maybe' must be true or false"),
        # method section: the method's own arguments, checked by the method class
        ("method.lr_lower=abc", "method.lr_lower='abc' must be a positive number or 'auto'"),
        ("method.lr_lower=0", "method.lr_lower=0 must be a positive number (finite and > 0)"),
        ("method.lr_lower=-2e-4", "method.lr_lower=-0.0002 must be a positive number (finite and > 0)"),
        ("method.lr_lower=.inf", "method.lr_lower=inf must be a positive number (finite and > 0)"),
        ("method.lr_lower=.nan", "method.lr_lower=nan must be a positive number (finite and > 0)"),
        ("method.lr_shadow=[1,2]", "method.lr_shadow=[1, 2] must be a positive number (finite and > 0), not a list"),
        ("method.lower_steps=1.5", "method.lower_steps=1.5 must be an integer >= 1, not a float"),
        ("method.shadow_start=cold", "method.shadow_start='cold' must be one of 'auto', 'zero', 'warm'"),
        ("method.stability_check=on", "method.stability_check='on' must be one of 'warn', 'error', 'off'"),
        ("method.exact_metric=1", "method.exact_metric=1 must be true or false, not an int"),
        # run section
        ("run.seed=1e20", "run.seed=1e+20 must be an integer in [0, 2**32)"),
        ("run.seed=-1", "run.seed=-1 must be an integer in [0, 2**32)"),
        ("run.seed=4294967296", "run.seed=4294967296 must be an integer in [0, 2**32)"),
        ("run.seed=abc", "run.seed='abc' must be an integer in [0, 2**32)"),
        ("run.max_iters=-1", "run.max_iters=-1 must be an integer >= 0"),
        ("run.max_iters=1.5", "run.max_iters=1.5 must be an integer >= 0"),
        ("run.eval_every=0", "run.eval_every=0 must be an integer >= 1"),
        ("run.log_every=[1]", "run.log_every=[1] must be an integer >= 1"),
        ("run.checkpoint_every=-1", "run.checkpoint_every=-1 must be an integer >= 0 (0: only at the end)"),
        ("run.threads=0", "run.threads=0 must be a positive integer or null (PyTorch's default)"),
        ("run.tensorboard=yes", "run.tensorboard='yes' must be true or false"),
        ("run.progress=1", "run.progress=1 must be true or false"),
        # problem section
        ("problem.n_train=0", "problem.n_train=0 must be an integer >= 1 or null"),
        ("problem.n_val=0", "problem.n_val=0 must be an integer >= 1 or null"),
        ("problem.n_test=0", "problem.n_test=0 must be an integer >= 1 or null"),
        ("problem.noise_rate=1.5", "problem.noise_rate=1.5 must be a number in [0, 1]"),
        ("problem.noise_rate=abc", "problem.noise_rate='abc' must be a number in [0, 1]"),
        ("problem.reg=-1e-3", "problem.reg=-0.001 must be a number >= 0"),
        ("problem.hidden=0", "problem.hidden=0 must be an integer >= 1"),
        ("problem.seed=1e20", "problem.seed=1e+20 must be an integer in [0, 2**32)"),
        ("problem.model=cnn", "problem.model='cnn' must be one of linear, mlp, two_layer"),
        ("problem.dtype=float16", "problem.dtype='float16' must be one of float32, float64"),
        ("problem.data_dir=3", "problem.data_dir=3 must be a string or null"),
        ("problem.baseline_lr=0", "problem.baseline_lr=0 must be a positive number"),
        ("problem.baseline_steps=-1", "problem.baseline_steps=-1 must be an integer >= 0"),
    ],
)
def test_each_bad_value_gets_one_line_naming_key_value_and_expectation(override, message):
    with pytest.raises(ConfigError) as info:
        _resolve(override)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "override, message",
    [
        ("problem.n_way=1", "problem.n_way=1 must be an integer >= 2"),
        ("problem.k_shot=0", "problem.k_shot=0 must be an integer >= 1"),
        ("problem.reg=0", "problem.reg=0 must be a positive number"),
        ("problem.feature_scale=.inf", "problem.feature_scale=inf must be a positive number"),
        ("problem.backbone=resnet", "problem.backbone='resnet' must be one of conv, mlp"),
        ("problem.norm=batch", "problem.norm='batch' must be one of none, group"),
        ("problem.dataset=cifar", "problem.dataset='cifar' must be one of mnist5k, mnist_fashion, omniglot"),
        (
            "problem.num_train_classes=2",
            "problem.num_train_classes=2 must be >= problem.n_way=3 (each training episode draws n_way classes)",
        ),
        ("problem.per_class=0", "problem.per_class=0 must be an integer >= 1 or null"),
        ("problem.num_val_classes=-1", "problem.num_val_classes=-1 must be an integer >= 0"),
        (
            "problem.num_val_classes=2",
            "problem.num_val_classes=2 must be 0 or >= problem.n_way=3 (each meta-validation task draws n_way classes)",
        ),
    ],
)
def test_fewshot_bad_values(override, message):
    with pytest.raises(ConfigError) as info:
        _resolve(override, config=FEWSHOT)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "name, override, message",
    [
        ("BAGDC", "method.lr_dual=0", "method.lr_dual=0 must be a positive number (finite and > 0)"),
        ("BAGDC", "method.lower_mu=1", "method.lower_mu=1 must be a finite number in (0, 1)"),
        ("SlBAMM", "method.mu=2", "method.mu=2 must be a finite number in [0, 1)"),
        ("ITD", "method.truncate=0", "method.truncate=0 must be an integer >= 1"),
        ("BDA", "method.lr_lower_upper=.nan", "method.lr_lower_upper=nan must be a positive number (finite and > 0)"),
        ("AID", "method.warm_start_v=no", "method.warm_start_v='no' must be true or false, not a str"),
    ],
)
def test_method_arguments_are_checked_by_the_method_class(name, override, message):
    with pytest.raises(ConfigError) as info:
        _resolve(f"method.name={name}", override)
    assert str(info.value) == message


def test_cross_argument_errors_name_the_method():
    with pytest.raises(ConfigError, match=r"^method.truncate=50 cannot exceed lower_steps=3$"):
        _resolve("method.name=ITD", "method.lower_steps=3", "method.truncate=50")
    with pytest.raises(ConfigError, match=re.escape("method.order='jacobi' takes exactly one lower step")):
        _resolve("method.name=BAGDC", "method.order=jacobi", "method.lower_steps=3")


def test_errors_are_one_line():
    for override in ("method.lr_upper=abc", "run.seed=1e20", "method.lr_lower=abc"):
        with pytest.raises(ConfigError) as info:
            _resolve(override)
        assert "\n" not in str(info.value)


def test_the_advised_problem_data_dir_override_reaches_the_dataset_search(tmp_path, monkeypatch):
    from bilevel.data import DatasetNotFoundError, sources
    from bilevel.experiments import build_experiment

    monkeypatch.setitem(sources.KNOWN_LOCATIONS, "mnist", ())
    monkeypatch.delenv("BILEVEL_DATA_DIR", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        build_experiment(apply_overrides(load_config("hyperclean_mnist_liu"), [f"problem.data_dir={empty}"]))
    assert f"{empty} (root argument)" in str(info.value) and "problem.data_dir=DIR" in str(info.value)
    with pytest.raises(ConfigError, match=r"^problem.data_dir=3 must be a string or null$"):
        _resolve("problem.data_dir=3")
