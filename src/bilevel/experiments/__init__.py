"""Reproducible experiments behind the ``bilevel`` command line.

YAML configurations shipped with the package (``bilevel list``), the runner that turns
one into a run directory (config.yaml, env.json, log.jsonl, checkpoint.pt, summary.json,
manifest.json) and resumes it exactly, and benches of methods × seeds that can be resumed
too. See docs/experiments.md.

Example:
    >>> from bilevel.experiments import builtin_configs
    >>> "hyperclean_demo" in builtin_configs()
    True
"""

from .config import ConfigError, ResolvedConfig, apply_overrides, builtin_configs, load_config, resolve, resolve_config
from .runner import (
    Experiment,
    RunDirError,
    build_experiment,
    build_method,
    format_bench_table,
    read_log,
    resume_bench,
    resume_run,
    run_bench,
    run_experiment,
)

__all__ = [
    "ConfigError",
    "Experiment",
    "ResolvedConfig",
    "RunDirError",
    "apply_overrides",
    "build_experiment",
    "build_method",
    "builtin_configs",
    "format_bench_table",
    "load_config",
    "read_log",
    "resolve",
    "resolve_config",
    "resume_bench",
    "resume_run",
    "run_bench",
    "run_experiment",
]
