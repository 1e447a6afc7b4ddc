"""Experiment configurations: loading built-in or user YAML files, overrides, validation.

A configuration has four sections::

    problem:  kind (hyperclean | fewshot), dataset, model/backbone, sizes, seed, ...
    method:   name (a preset of ``methods`` or a method name) and keyword arguments
    methods:  named method presets (the tuned settings used by ``bilevel bench``)
    run:      max_iters, eval_every, log_every, checkpoint_every, seed, tensorboard, progress

Overrides ``section.key=value`` parse ``value`` with ``yaml.safe_load`` (so ``0.1`` is a
float, ``true`` a bool, ``[1, 2]`` a list). Unknown keys raise :class:`ConfigError`,
whose message lists the valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import yaml

__all__ = [
    "ConfigError",
    "builtin_configs",
    "load_config",
    "apply_overrides",
    "resolve_config",
    "method_class",
    "METHOD_ALIASES",
    "PROBLEM_KEYS",
    "RUN_KEYS",
]


class ConfigError(ValueError):
    """A configuration or an override is invalid; the message says what is valid."""


#: keys of the problem section, per kind, with their defaults.
PROBLEM_KEYS: dict[str, dict[str, Any]] = {
    "hyperclean": {
        "kind": "hyperclean",
        "dataset": "mnist5k",
        "model": "linear",
        "hidden": 300,
        "noise_rate": 0.5,
        "seed": 0,
        "n_train": None,
        "n_val": None,
        "n_test": None,
        "reg": 0.0,
        "data_dir": None,
        "dtype": "float32",
        "baseline_steps": 500,
        "baseline_lr": 0.5,
    },
    "fewshot": {
        "kind": "fewshot",
        "dataset": "mnist5k",
        "backbone": "mlp",
        "n_way": 3,
        "k_shot": 1,
        "q_query": 15,
        "meta_batch": 4,
        "num_train_classes": 6,
        "per_class": None,
        "channels": 32,
        "blocks": 4,
        "norm": "none",
        "groups": 4,
        "hidden": 256,
        "features": 64,
        "feature_scale": 3.0,
        "reg": 0.5,
        "seed": 0,
        "eval_tasks": 100,
        "eval_steps": 100,
        "data_dir": None,
        "dtype": "float32",
    },
}

RUN_KEYS: dict[str, Any] = {
    "max_iters": 200,
    "eval_every": 20,
    "log_every": 10,
    "checkpoint_every": 0,
    "seed": 0,
    "tensorboard": False,
    "progress": True,
    "threads": None,
}

#: method keys handled by the runner rather than passed to the method's constructor.
METHOD_COMMON_KEYS = ("name", "upper", "lr_upper", "solver", "solver_steps", "solver_lr", "episodic")

#: accepted method names -> (class name, fixed keyword arguments)
METHOD_ALIASES: dict[str, tuple[str, dict]] = {
    "GALET": ("GALET", {}),
    "SlBAMM": ("SlBAMM", {}),
    "sl-BAMM": ("SlBAMM", {}),
    "BAMM": ("SlBAMM", {}),
    "BAGDC": ("BAGDC", {}),
    "AID": ("AID", {}),
    "CG": ("AID", {"solver": "CG"}),
    "Neumann": ("AID", {"solver": "Neumann"}),
    "FixedPoint": ("AID", {"solver": "FixedPoint"}),
    "ITD": ("ITD", {}),
    "RHG": ("ITD", {}),
    "TRHG": ("TRHG", {}),
    "T-RHG": ("TRHG", {}),
    "BDA": ("BDA", {}),
}


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
        if str(name_or_path) in builtins or key in builtins and path.parent == Path("."):
            path = builtins[key]
        else:
            raise ConfigError(
                f"no configuration file {str(name_or_path)!r} and no built-in configuration of that name; "
                f"built-in: {', '.join(sorted(builtins))}"
            )
    try:
        config = yaml.safe_load(path.read_text())
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
            value = yaml.safe_load(raw) if raw.strip() else None
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


def method_class(name: str):
    """The method class and fixed arguments of a method name (see :data:`METHOD_ALIASES`)."""
    import bilevel

    if name not in METHOD_ALIASES:
        raise ConfigError(f"unknown method {name!r}; valid: {', '.join(METHOD_ALIASES)}")
    class_name, fixed = METHOD_ALIASES[name]
    return getattr(bilevel, class_name), dict(fixed)


def _check_keys(section: str, given: dict, valid: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(f'{section}.{k}' for k in unknown)}; valid {section} keys: {', '.join(valid)}")


def resolve_method(config: dict) -> dict:
    """The method section with its preset (``methods[name]``) filled in, checked."""
    section = config.get("method") or {}
    if isinstance(section, str):
        section = {"name": section}
    if not isinstance(section, dict) or "name" not in section:
        raise ConfigError("the method section needs a name, e.g. method.name=GALET")
    presets = config.get("methods") or {}
    name = section["name"]
    resolved = {**copy.deepcopy(presets.get(name, {})), **section}
    base_name = resolved.get("method", name)
    resolved.pop("method", None)
    cls, fixed = method_class(base_name)
    resolved = {**fixed, **resolved}
    resolved["name"] = name
    if base_name != name:
        resolved["method"] = base_name
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in ("lr_upper", "oracles", "project_x", "solver")]
    valid = list(METHOD_COMMON_KEYS) + ["method"] + fields
    _check_keys("method", resolved, valid)
    if resolved.get("upper", "adam") not in ("adam", "sgd"):
        raise ConfigError(f"method.upper={resolved['upper']!r} must be 'adam' or 'sgd'")
    return resolved


def resolve_config(config: dict) -> dict:
    """Fill defaults and check every key; returns a new, complete configuration."""
    config = copy.deepcopy(config)
    _check_keys("top-level", config, ["name", "description", "problem", "method", "methods", "run"])
    problem = config.get("problem") or {}
    kind = problem.get("kind", "hyperclean")
    if kind not in PROBLEM_KEYS:
        raise ConfigError(f"problem.kind={kind!r} must be one of {', '.join(PROBLEM_KEYS)}")
    _check_keys("problem", problem, list(PROBLEM_KEYS[kind]))
    config["problem"] = {**PROBLEM_KEYS[kind], **problem}
    run = config.get("run") or {}
    _check_keys("run", run, list(RUN_KEYS))
    config["run"] = {**RUN_KEYS, **run}
    for key in ("max_iters", "eval_every", "log_every"):
        value = config["run"][key]
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "max_iters" else 1):
            raise ConfigError(f"run.{key}={value!r} must be an integer >= {0 if key == 'max_iters' else 1}")
    threads = config["run"]["threads"]
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"run.threads={threads!r} must be a positive integer or null (PyTorch's default)")
    if not isinstance(config["run"]["checkpoint_every"], int) or config["run"]["checkpoint_every"] < 0:
        raise ConfigError(f"run.checkpoint_every={config['run']['checkpoint_every']!r} must be an integer >= 0 (0: only at the end)")
    config["method"] = resolve_method(config)
    config.setdefault("name", "experiment")
    return config
