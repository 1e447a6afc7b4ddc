"""Reproducible experiments behind the ``bilevel`` command line.

YAML configurations shipped with the package (``bilevel list``), the runner that turns
one into a run directory (config.yaml, env.json, log.jsonl, checkpoint.pt, summary.json)
and resumes it exactly. See docs/experiments.md.

Example:
    >>> from bilevel.experiments import builtin_configs
    >>> "hyperclean_demo" in builtin_configs()
    True
"""

from .config import ConfigError, apply_overrides, builtin_configs, load_config, resolve_config
from .runner import Experiment, build_experiment, build_method, read_log, resume_run, run_experiment

__all__ = [
    "ConfigError", "apply_overrides", "builtin_configs", "load_config", "resolve_config",
    "Experiment", "build_experiment", "build_method", "read_log", "resume_run", "run_experiment",
]
