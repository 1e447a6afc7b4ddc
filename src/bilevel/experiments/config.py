"""Experiment configurations: loading built-in or user YAML files, overrides, validation.

A configuration has four sections::

    problem:  kind (hyperclean | fewshot | stochastic), dataset or name, model/backbone, sizes, seed, ...
    method:   name (a preset of ``methods`` or a method name) and keyword arguments
    methods:  named method presets (the tuned settings used by ``bilevel bench``)
    run:      max_iters, eval_every, log_every, checkpoint_every, seed, tensorboard, progress,
              threads, stop_patience, stop_min_delta (early stopping on validation accuracy)

Overrides ``section.key=value`` parse ``value`` as YAML (so ``0.1`` is a float, ``true``
a bool, ``[1, 2]`` a list), with every number a person types read as a number:
``1e-3``, ``1E6``, ``.5``, ``-2e-4`` (plain YAML 1.1 reads the exponent forms as
strings); configuration files are read the same way (:func:`load_yaml`). Unknown keys
raise :class:`ConfigError`, whose message lists the valid ones; a bad value raises one
line naming the key, the value and what is expected, e.g.
``run.seed=1e+20 must be an integer in [0, 2**32)``. Integer keys accept integral
numbers written as floats (``run.max_iters=1e4``).

A step size of a method (``lr_lower``, ``lr_upper``, ``lr_shadow``, ...) is a number or a
decreasing schedule written as a mapping ``{value: β₀, power: p}`` (optionally ``shift: s``),
the step ``β₀ (k + s)^{−p}`` (:class:`bilevel.Polynomial`, s = 1 by default), as the
stochastic presets write benchopt's decreasing steps.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import yaml

if TYPE_CHECKING:
    from ..methods.base import Method

from ..problems.benchmark import NAMES as STOCHASTIC_PROBLEMS
from ..problems.fewshot import fewshot_problem
from ..problems.hyperclean import hyperclean_problem

__all__ = [
    "DEFAULT_UPPER",
    "METHOD_ALIASES",
    "PROBLEM_KEYS",
    "PROBLEM_SPECS",
    "RENAMED_METHODS",
    "RUN_KEYS",
    "ConfigError",
    "FewshotSpec",
    "HypercleanSpec",
    "ResolvedConfig",
    "RunSpec",
    "Spec",
    "StochasticSpec",
    "apply_overrides",
    "builtin_configs",
    "load_config",
    "load_yaml",
    "method_arguments",
    "method_class",
    "problem_spec",
    "resolve",
    "resolve_config",
]


class ConfigError(ValueError):
    """A configuration or an override is invalid; the message says what is valid."""


_SEED_HIGH = 2**32


class _Rule:
    """The expected type and range of one configuration key; ``check`` returns the value to keep."""

    def __init__(self, expected: str, accept: Callable[[Any], tuple[bool, Any]]):
        self.expected = expected
        self.accept = accept  # value -> (ok, value to keep)

    def check(self, label: str, value: Any) -> Any:
        ok, kept = self.accept(value)
        if not ok:
            raise ConfigError(f"{label}={value!r} must be {self.expected}")
        return kept


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer(low: int, high: int | None = None, optional: bool = False) -> _Rule:
    """An integer in ``[low, high)``; an integral float (``1e4``) is kept as an int."""
    expected = (
        f"an integer in [{low}, 2**32)"
        if high == _SEED_HIGH
        else (f"an integer in [{low}, {high})" if high is not None else f"an integer >= {low}")
    )

    def accept(value: Any) -> tuple[bool, Any]:
        if value is None:
            return optional, value
        if _is_number(value) and not isinstance(value, numbers.Integral):
            if not (math.isfinite(value) and float(value).is_integer()):
                return False, value
            value = int(value)
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            return False, value
        return low <= int(value) and (high is None or int(value) < high), int(value)

    return _Rule(expected + (" or null" if optional else ""), accept)


def _number(expected: str, test: Callable[[float], object], optional: bool = False) -> _Rule:
    """A finite real number for which ``test(value)`` holds."""

    def accept(value: Any) -> tuple[bool, Any]:
        if value is None:
            return optional, value
        return _is_number(value) and math.isfinite(value) and bool(test(value)), value

    return _Rule(expected + (" or null" if optional else ""), accept)


def _choice(*choices: str) -> _Rule:
    return _Rule(f"one of {', '.join(choices)}", lambda value: (isinstance(value, str) and value in choices, value))


def _text(optional: bool = False) -> _Rule:
    return _Rule(
        "a string" + (" or null" if optional else ""), lambda value: ((optional and value is None) or isinstance(value, str), value)
    )


_BOOL = _Rule("true or false", lambda value: (isinstance(value, bool), value))
_POSITIVE = _number("a positive number", lambda v: v > 0)
_NONNEGATIVE = _number("a number >= 0", lambda v: v >= 0)
_SEED = _integer(0, _SEED_HIGH)
_COUNT = _integer(1)
_DTYPE = _choice("float32", "float64")


def key(default: Any, rule: _Rule) -> Any:
    """A configuration key: its default and the rule its value must satisfy."""
    return dataclasses.field(default=default, metadata={"rule": rule})


def builder_default(builder: Callable, name: str) -> Any:
    """The default of the builder's argument ``name``: a key that is a builder argument takes
    its default from the builder's signature, so there is one source for it."""
    return inspect.signature(builder).parameters[name].default


class Spec:
    """Base of the frozen spec dataclasses: each field is a key of a configuration section,
    its default the key's default and its metadata the rule its value must satisfy."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        # a number given for a float key is a float (YAML reads ``reg: 1`` as an int)
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.type in ("float", "Optional[float]") and _is_number(value) and not isinstance(value, float):
                object.__setattr__(self, f.name, float(value))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{key: default}`` of every key, in order."""
        return {f.name: f.default for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def resolve(cls, given: dict) -> dict:
        """``given`` checked (unknown keys, every value against its rule) with the defaults filled in."""
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        _check_keys(cls.section, given, [f.name for f in fields])
        values = {**cls.defaults(), **given}
        for f in fields:
            values[f.name] = f.metadata["rule"].check(f"{cls.section}.{f.name}", values[f.name])
        return values

    def arguments_for(self, builder: Callable, exclude: Sequence[str] = ()) -> dict[str, Any]:
        """The keys that are arguments of ``builder`` (by name), as keyword arguments."""
        parameters = inspect.signature(builder).parameters
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in parameters and f.name not in exclude}  # type: ignore[arg-type]


_DATASET = _text()
_KINDS = ("hyperclean", "fewshot", "stochastic")


@dataclass(frozen=True)
class HypercleanSpec(Spec):
    """The problem section of a hyper-cleaning configuration (``problem.kind: hyperclean``).

    ``model``, ``reg`` and ``hidden`` are arguments of
    :func:`~bilevel.problems.hyperclean.hyperclean_problem` and take its defaults; ``seed``
    seeds the data split and the label noise (``run.seed`` is added to it).
    """

    section: ClassVar[str] = "problem"

    kind: str = key("hyperclean", _choice(*_KINDS))
    dataset: str = key("mnist5k", _DATASET)
    model: str = key(builder_default(hyperclean_problem, "model"), _choice("linear", "mlp", "two_layer"))
    hidden: int = key(builder_default(hyperclean_problem, "hidden"), _COUNT)
    noise_rate: float = key(0.5, _number("a number in [0, 1]", lambda v: 0 <= v <= 1))
    #: False (default, the PBGD code's rule): a corrupted label is redrawn from all classes, the
    #: true one included (a 50 % rate leaves 45 % wrong labels with 10 classes); True: from the
    #: other classes only (exactly noise_rate wrong, Franceschi et al.'s intent)
    exclude_true_class: bool = key(False, _BOOL)
    seed: int = key(0, _SEED)
    n_train: int | None = key(None, _integer(1, optional=True))
    n_val: int | None = key(None, _integer(1, optional=True))
    n_test: int | None = key(None, _integer(1, optional=True))
    reg: float = key(builder_default(hyperclean_problem, "reg"), _NONNEGATIVE)
    data_dir: str | None = key(None, _text(optional=True))
    dtype: str = key("float32", _DTYPE)
    baseline_steps: int = key(500, _integer(0))
    baseline_lr: float = key(0.5, _POSITIVE)


@dataclass(frozen=True)
class FewshotSpec(Spec):
    """The problem section of a few-shot configuration (``problem.kind: fewshot``).

    The keys named as arguments of :func:`~bilevel.problems.fewshot.fewshot_problem` take
    its defaults, except ``feature_scale``: 3.0 here (features on the sphere of radius 3,
    bounded head curvature; the configuration requires a positive radius), where the
    Python builder's 0.0 means no normalisation. ``seed`` plus ``run.seed`` seeds the class
    split (meta-train / meta-validation / meta-test) and the held-out tasks, as the data seed
    of hyper-cleaning: a bench over seeds is a bench over class splits.
    """

    section: ClassVar[str] = "problem"

    kind: str = key("fewshot", _choice(*_KINDS))
    dataset: str = key("mnist5k", _choice("mnist5k", "mnist_fashion", "omniglot"))
    backbone: str = key(builder_default(fewshot_problem, "backbone"), _choice("conv", "mlp"))
    n_way: int = key(3, _integer(2))
    k_shot: int = key(1, _COUNT)
    q_query: int = key(15, _COUNT)
    meta_batch: int = key(4, _COUNT)
    num_train_classes: int = key(6, _COUNT)
    #: meta-validation classes (0: none), taken after the meta-train classes from the same
    #: seeded permutation; runs then also report val_accuracy on them, and every choice
    #: (step size, iteration count) should look at those only
    num_val_classes: int = key(0, _integer(0))
    per_class: int | None = key(None, _integer(1, optional=True))
    channels: int = key(builder_default(fewshot_problem, "channels"), _COUNT)
    blocks: int = key(builder_default(fewshot_problem, "blocks"), _COUNT)
    norm: str = key(builder_default(fewshot_problem, "norm"), _choice("none", "group"))
    groups: int = key(builder_default(fewshot_problem, "groups"), _COUNT)
    hidden: int = key(builder_default(fewshot_problem, "hidden"), _COUNT)
    features: int = key(builder_default(fewshot_problem, "features"), _COUNT)
    feature_scale: float = key(3.0, _POSITIVE)
    reg: float = key(builder_default(fewshot_problem, "reg"), _POSITIVE)
    seed: int = key(0, _SEED)
    eval_tasks: int = key(100, _COUNT)
    eval_steps: int = key(100, _COUNT)
    data_dir: str | None = key(None, _text(optional=True))
    dtype: str = key("float32", _DTYPE)


@dataclass(frozen=True)
class StochasticSpec(Spec):
    """The problem section of a stochastic benchmark configuration (``problem.kind: stochastic``).

    ``name`` is one of benchopt's problems of :mod:`bilevel.problems.benchmark`: ``quadratic``
    (the simulated finite-sum quadratic, metric ``suboptimality`` = ‖∇F(x)‖²),
    ``datacleaning`` (MNIST data cleaning, metric ``test_error``; needs the MNIST files and
    scikit-learn) or ``logreg`` (per-feature L2 logistic regression on scikit-learn's digits,
    metric ``suboptimality``). The data are fixed by ``seed`` (default: the benchmark's, 2442,
    32 and 0); ``run.seed`` seeds only the draws of the sample streams, so a bench over seeds
    is a bench over mini-batch sequences on one problem, as in the benchmark. ``batch_size``
    is the size of every upper and lower batch (the benchmark's 64). ``n_lower``,
    ``n_upper``, ``dim_x``, ``dim_y`` are the quadratic's sizes; ``noise_rate`` and ``reg``
    data cleaning's corrupted fraction and ``reg ‖W‖²``; ``data_dir`` is searched first for
    MNIST (the other problems need no files). ``dtype`` null is float32 (logreg: float64).
    """

    section: ClassVar[str] = "problem"

    kind: str = key("stochastic", _choice(*_KINDS))
    name: str = key("quadratic", _choice(*STOCHASTIC_PROBLEMS))
    seed: int | None = key(None, _Rule("an integer in [0, 2**32) or null (the benchmark's)", _integer(0, _SEED_HIGH, optional=True).accept))
    batch_size: int = key(64, _COUNT)
    n_lower: int = key(4096, _COUNT)
    n_upper: int = key(1024, _COUNT)
    dim_x: int = key(10, _COUNT)
    dim_y: int = key(20, _COUNT)
    noise_rate: float = key(0.5, _number("a number in [0, 1]", lambda v: 0 <= v <= 1))
    reg: float = key(0.2, _NONNEGATIVE)
    data_dir: str | None = key(None, _text(optional=True))
    dtype: str | None = key(
        None, _Rule("float32, float64 or null (the problem's default)", lambda v: (v in (None, "float32", "float64"), v))
    )

    #: the keys that only some problems read (a key given for another problem is refused)
    only_for: ClassVar[dict[str, str]] = {
        "n_lower": "quadratic",
        "n_upper": "quadratic",
        "dim_x": "quadratic",
        "dim_y": "quadratic",
        "noise_rate": "datacleaning",
        "reg": "datacleaning",
    }


@dataclass(frozen=True)
class RunSpec(Spec):
    """The run section: iterations, cadences, seed, outputs."""

    section: ClassVar[str] = "run"

    max_iters: int = key(200, _integer(0))
    eval_every: int = key(20, _COUNT)
    log_every: int = key(10, _COUNT)
    checkpoint_every: int = key(0, _Rule("an integer >= 0 (0: only at the end)", _integer(0).accept))
    seed: int = key(0, _SEED)
    tensorboard: bool = key(False, _BOOL)
    progress: bool = key(True, _BOOL)
    threads: int | None = key(None, _Rule("a positive integer or null (PyTorch's default)", _integer(1, optional=True).accept))
    # early stopping on validation data: after this many evaluations whose val_accuracy is
    # not above the best before them by more than stop_min_delta (points), the run ends
    stop_patience: int | None = key(None, _Rule("a positive integer or null (never stop early)", _integer(1, optional=True).accept))
    stop_min_delta: float = key(0.1, _NONNEGATIVE)


#: the spec of the problem section of each problem kind.
PROBLEM_SPECS: dict[str, type[Spec]] = {"hyperclean": HypercleanSpec, "fewshot": FewshotSpec, "stochastic": StochasticSpec}

#: keys of the problem section, per kind, with their defaults (a view of :data:`PROBLEM_SPECS`).
PROBLEM_KEYS: dict[str, dict[str, Any]] = {kind: spec.defaults() for kind, spec in PROBLEM_SPECS.items()}

#: keys of the run section with their defaults (a view of :class:`RunSpec`).
RUN_KEYS: dict[str, Any] = RunSpec.defaults()


#: method keys read by the runner (the others go to the method's constructor).
METHOD_RULES: dict[str, _Rule] = {
    "upper": _choice("adam", "sgd"),
    "lr_upper": _Rule(
        "a positive number, a schedule {value: α₀, power: p}, 'auto' or null",
        lambda v: (v is None or v == "auto" or isinstance(v, dict) or (_is_number(v) and math.isfinite(v) and v > 0), v),
    ),
    "solver": _choice("CG", "Neumann", "FixedPoint"),
    "solver_steps": _COUNT,
    "solver_lr": _number("a positive number", lambda v: v > 0, optional=True),
    "episodic": _BOOL,
}


_SCHEDULE_KEYS = ("value", "power", "shift")


def schedule(label: str, value: Any) -> Any:
    """A step written in a configuration: a mapping ``{value: β₀, power: p[, shift: s]}`` is
    the schedule ``β₀ (k + s)^{−p}`` (:class:`bilevel.Polynomial`); anything else is returned
    as it is (the method checks it). ``label`` (``method.lr_lower``) names the key in errors."""
    if not isinstance(value, dict):
        return value
    from ..schedules import Polynomial

    unknown = sorted(set(value) - set(_SCHEDULE_KEYS))
    missing = [k for k in ("value", "power") if k not in value]
    numbers_ok = all(_is_number(v) and math.isfinite(v) for v in value.values())
    if unknown or missing or not numbers_ok:
        raise ConfigError(
            f"{label}={value!r} must be a number or a schedule {{value: β₀, power: p}} (the step β₀ (k+1)^-p; "
            f"optional shift: s for β₀ (k+s)^-p) with numbers"
        )
    try:
        return Polynomial(**{k: float(v) for k, v in value.items()})
    except ValueError as err:
        raise ConfigError(f"{label}={value!r}: {str(err).splitlines()[0]}") from None


def method_arguments(section: dict) -> dict[str, Any]:
    """The keyword arguments of the method's constructor in a method section: the keys the
    runner does not read, with every schedule mapping made a :class:`bilevel.Polynomial`."""
    return {k: schedule(f"method.{k}", v) for k, v in section.items() if k not in METHOD_COMMON_KEYS and k != "method"}


def _check_values(section: str, values: dict, rules: dict[str, _Rule]) -> None:
    """Check (and normalise in place) every value of ``values`` that has a rule."""
    for key, rule in rules.items():
        if key in values:
            values[key] = rule.check(f"{section}.{key}", values[key])


#: method keys handled by the runner rather than passed to the method's constructor.
METHOD_COMMON_KEYS = ("name", "upper", "lr_upper", "solver", "solver_steps", "solver_lr", "episodic")

#: accepted method names -> (class name, fixed keyword arguments); AID's solvers are named
#: as in the benchmarks, ``AID-CG``, ``AID-Neumann``, ``AID-FixedPoint`` (``CG`` is the solver).
METHOD_ALIASES: dict[str, tuple[str, dict]] = {
    "GALET": ("GALET", {}),
    "SlBAMM": ("SlBAMM", {}),
    "sl-BAMM": ("SlBAMM", {}),
    "BAMM": ("SlBAMM", {}),
    "BAGDC": ("BAGDC", {}),
    "AID": ("AID", {}),
    "AID-CG": ("AID", {"solver": "CG"}),
    "AID-Neumann": ("AID", {"solver": "Neumann"}),
    "AID-FixedPoint": ("AID", {"solver": "FixedPoint"}),
    "ITD": ("ITD", {}),
    "RHG": ("ITD", {}),
    "TRHG": ("TRHG", {}),
    "T-RHG": ("TRHG", {}),
    "BDA": ("BDA", {}),
    "BOME": ("BOME", {}),
    "PBGD": ("PBGD", {}),
    "V-PBGD": ("PBGD", {"variant": "value"}),
    "G-PBGD": ("PBGD", {"variant": "gradient"}),
    "MEHA": ("MEHA", {}),
    "IAPTTGM": ("IAPTTGM", {}),
    "IAPTT-GM": ("IAPTTGM", {}),
    "SOBA": ("SOBA", {}),
    "MASOBA": ("MASOBA", {}),
    "MA-SOBA": ("MASOBA", {}),
    "SABA": ("SABA", {}),
    "SRBA": ("SRBA", {}),
    "StocBiO": ("StocBiO", {}),
    "AmIGO": ("AmIGO", {}),
    "F2SA": ("F2SA", {}),
}

#: the names of bilevel 0.1 for AID with a solver, still read (configurations and run
#: directories written before); a built-in preset of the new name is found under the old one.
RENAMED_METHODS: dict[str, str] = {"CG": "AID-CG", "Neumann": "AID-Neumann", "FixedPoint": "AID-FixedPoint"}

#: the upper optimizer of ``method.lr_upper`` when ``method.upper`` is not given: plain
#: gradient steps, as a number means in Python (``bl.GALET(lr_upper=0.1)``).
DEFAULT_UPPER = "sgd"


# Numbers and booleans as YAML 1.2 and a person read them. PyYAML follows YAML 1.1, whose
# float pattern needs a dot and a signed exponent (so "1e-3" and "1E6" stay strings), whose
# integers include octal "010" (= 8) and base-60 "1:30" (= 90), and whose booleans include
# yes/no/on/off (so stability_check=off would be False).
_BOOL_TAG, _INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_BOOL_WORDS = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^[-+]?(?:[0-9][0-9_]*|0[xX][0-9a-fA-F_]+|0o[0-7_]+|0b[01_]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` reading numbers and booleans the YAML 1.2 way: ``1e-3``, ``1E6``, ``.5``,
    ``010`` = 10; only true/false are booleans (``off`` is a string)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, _BOOL_WORDS, list("tTfF"))
# integers first: "12" is an int, "12.0" and "1e3" floats
_Loader.add_implicit_resolver(_INT_TAG, _INT, list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign = -1 if text[0] == "-" else 1
    text = text.lstrip("+-")
    for prefix, base in (("0x", 16), ("0X", 16), ("0o", 8), ("0b", 2)):
        if text.startswith(prefix):
            return sign * int(text[2:], base)
    return sign * int(text, 10)


_Loader.add_constructor(_INT_TAG, _construct_int)


def load_yaml(text: str) -> Any:
    """Parse YAML text as ``yaml.safe_load`` does, reading ``1e-3``, ``1E6``, ``.5`` as numbers."""
    return yaml.load(text, Loader=_Loader)


def builtin_configs() -> dict[str, Path]:
    """Name -> path of the YAML configurations shipped in ``bilevel/experiments``."""
    folder = resources.files("bilevel.experiments")
    return {Path(str(entry)).stem: Path(str(entry)) for entry in folder.iterdir() if str(entry).endswith(".yaml")}


def load_config(name_or_path: str | Path) -> dict:
    """Read a configuration from a YAML path or the name of a built-in one (``bilevel list``)."""
    path = Path(name_or_path)
    if not path.is_file():
        builtins = builtin_configs()
        key = path.name[:-5] if path.name.endswith(".yaml") else path.name
        if str(name_or_path) in builtins or (key in builtins and path.parent == Path(".")):
            path = builtins[key]
        else:
            raise ConfigError(
                f"no configuration file {str(name_or_path)!r} and no built-in configuration of that name; "
                f"built-in: {', '.join(sorted(builtins))}"
            )
    try:
        config = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a mapping with sections problem, method, run")
    config.setdefault("name", path.stem)
    return config


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    """A copy of ``config`` with ``section.key=value`` overrides applied (values via YAML)."""
    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. run.max_iters=100")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if any(not p for p in parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        try:
            value = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"cannot parse the value of override {item!r}: {str(err).splitlines()[0]}") from err
        if len(parts) == 1:
            if parts[0] != "name":
                raise ConfigError(f"override {item!r} must name a section and a key (problem.*, method.*, run.*) or be name=...")
            config["name"] = str(value)
            continue
        node = config
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return config


def method_class(name: str) -> tuple[type[Method], dict[str, Any]]:
    """The method class and fixed arguments of a method name (see :data:`METHOD_ALIASES`;
    the older names of :data:`RENAMED_METHODS` are read too)."""
    import bilevel

    name = RENAMED_METHODS.get(name, name)
    if name not in METHOD_ALIASES:
        raise ConfigError(f"unknown method {name!r}; valid: {', '.join(METHOD_ALIASES)}")
    class_name, fixed = METHOD_ALIASES[name]
    return getattr(bilevel, class_name), dict(fixed)


def _check_keys(section: str, given: dict, valid: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"valid {section} keys: {', '.join(valid)}"
        )


def resolve_method(config: dict) -> dict:
    """The method section with its preset (``methods[name]``) filled in, checked."""
    section = config.get("method") or {}
    if isinstance(section, str):
        section = {"name": section}
    if not isinstance(section, dict) or "name" not in section:
        raise ConfigError("the method section needs a name, e.g. method.name=GALET")
    presets = config.get("methods") or {}
    name = section["name"]
    if name not in presets and RENAMED_METHODS.get(name) in presets:
        name = RENAMED_METHODS[name]  # e.g. method.name=CG finds the AID-CG preset
    resolved: dict[str, Any] = {**copy.deepcopy(presets.get(name, {})), **section, "name": name}
    base_name: Any = resolved.get("method", name)  # a str once method_class has accepted it
    resolved.pop("method", None)
    cls, fixed = method_class(base_name)
    resolved = {**fixed, **resolved}
    resolved["name"] = name
    if base_name != name:
        resolved["method"] = base_name
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in ("lr_upper", "oracles", "project_x", "solver")]
    valid = [*list(METHOD_COMMON_KEYS), "method", *fields]
    _check_keys("method", resolved, valid)
    resolved.setdefault("upper", DEFAULT_UPPER)
    _check_values("method", resolved, METHOD_RULES)
    schedule("method.lr_upper", resolved.get("lr_upper"))
    _check_method_arguments(cls, name, method_arguments(resolved))
    return resolved


_ARGUMENT = re.compile(r"^[\w-]+\((\w+)=")


def _check_method_arguments(cls: type[Method], name: str, kwargs: dict) -> None:
    """Construct the method once so that its own validation names a bad ``method.key``."""
    try:
        cls(**kwargs)
    except (TypeError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        match = _ARGUMENT.match(message)
        if match and match.group(1) in kwargs:
            key = match.group(1)
            prefix = f"{match.group(0)}{kwargs[key]!r})"
            if message.startswith(prefix):
                raise ConfigError(f"method.{key}={kwargs[key]!r}{message[len(prefix) :]}") from None
        raise ConfigError(f"method {name}: {message}") from None


def problem_spec(config: dict) -> Spec:
    """The typed problem section of a resolved configuration (a :class:`HypercleanSpec` or
    :class:`FewshotSpec`)."""
    section = config["problem"]
    return PROBLEM_SPECS[section["kind"]](**section)


@dataclass(frozen=True)
class ResolvedConfig:
    """A configuration resolved by :func:`resolve`: every default filled in, every key
    checked. The runner resolves a configuration once and hands this on, so building
    and running never resolve it again.

    Attributes:
        data: the complete configuration as plain data (what ``config.yaml`` holds).
    """

    data: dict

    @property
    def problem(self) -> Spec:
        """The typed problem section (:class:`HypercleanSpec` or :class:`FewshotSpec`)."""
        return problem_spec(self.data)

    @property
    def run(self) -> RunSpec:
        """The typed run section."""
        return RunSpec(**self.data["run"])


def resolve(config: dict | ResolvedConfig) -> ResolvedConfig:
    """``config`` resolved (a :class:`ResolvedConfig` is returned as it is)."""
    if isinstance(config, ResolvedConfig):
        return config
    return ResolvedConfig(resolve_config(config))


def _check_stochastic(given: dict, resolved: dict) -> None:
    """A key that the chosen benchmark problem does not read, given another value than its
    default, is refused (it would change nothing); so is a batch larger than the quadratic's
    data. (A resolved configuration holds every key at its default: it passes.)"""
    name, defaults = resolved["name"], StochasticSpec.defaults()
    ignored = sorted(k for k in given if StochasticSpec.only_for.get(k, name) != name and resolved[k] != defaults[k])
    if ignored:
        raise ConfigError(
            f"{', '.join(f'problem.{k}' for k in ignored)} "
            f"appl{'ies' if len(ignored) == 1 else 'y'} to problem.name={StochasticSpec.only_for[ignored[0]]} only, "
            f"not to problem.name={name}: remove {'it' if len(ignored) == 1 else 'them'}"
        )
    if name == "quadratic":
        smallest = min(("n_lower", resolved["n_lower"]), ("n_upper", resolved["n_upper"]), key=lambda item: item[1])
        if resolved["batch_size"] > smallest[1]:
            raise ConfigError(
                f"problem.batch_size={resolved['batch_size']} is larger than the data (problem.{smallest[0]}={smallest[1]} samples): "
                f"use problem.batch_size <= {smallest[1]}"
            )


def resolve_config(config: dict) -> dict:
    """Fill defaults and check every key; returns a new, complete configuration."""
    config = copy.deepcopy(config)
    _check_keys("top-level", config, ["name", "description", "problem", "method", "methods", "run"])
    problem = config.get("problem") or {}
    if not isinstance(problem, dict):
        raise ConfigError(f"the problem section must be a mapping of keys to values, got {problem!r}")
    kind = problem.get("kind", "hyperclean")
    if not isinstance(kind, str) or kind not in PROBLEM_SPECS:
        raise ConfigError(f"problem.kind={kind!r} must be one of {', '.join(PROBLEM_SPECS)}")
    config["problem"] = PROBLEM_SPECS[kind].resolve(problem)
    if kind == "fewshot" and config["problem"]["num_train_classes"] < config["problem"]["n_way"]:
        p = config["problem"]
        raise ConfigError(
            f"problem.num_train_classes={p['num_train_classes']!r} must be >= problem.n_way={p['n_way']!r} "
            f"(each training episode draws n_way classes)"
        )
    if kind == "fewshot" and 0 < config["problem"]["num_val_classes"] < config["problem"]["n_way"]:
        p = config["problem"]
        raise ConfigError(
            f"problem.num_val_classes={p['num_val_classes']!r} must be 0 or >= problem.n_way={p['n_way']!r} "
            f"(each meta-validation task draws n_way classes)"
        )
    if kind == "stochastic":
        _check_stochastic(problem, config["problem"])
    run = config.get("run") or {}
    if not isinstance(run, dict):
        raise ConfigError(f"the run section must be a mapping of keys to values, got {run!r}")
    config["run"] = RunSpec.resolve(run)
    config["method"] = resolve_method(config)
    config.setdefault("name", "experiment")
    return config
