"""Build and run experiments from configurations; write the run directory.

A run directory holds::

    config.yaml    the resolved configuration (every default filled in)
    env.json       python/torch/numpy versions, device, threads, seed, hostname, command line
    log.jsonl      one JSON object per logged iteration: the method's diagnostics
                   (every run.log_every iterations) merged with the evaluation metrics
                   (every run.eval_every iterations, and at iteration 0 and the end)
    checkpoint.pt  bilevel.solve checkpoint (atomic): every run.checkpoint_every
                   iterations (0: never in between), at the end and on Ctrl-C
    summary.json   final metrics, status, iterations, times, the no-cleaning baseline
    tensorboard/   only with run.tensorboard=true

Evaluation needs the current state, which :func:`bilevel.solve`'s ``on_log`` callbacks
do not receive; the runner therefore calls ``solve`` in chunks of ``run.eval_every``
iterations, continuing each chunk from the previous one's state through ``solve``'s
``resume`` payload (state, history, RNG, elapsed time). The iterations are the same
as one long call, so the records are too; a resumed run (``bilevel resume``) rebuilds
log.jsonl from the checkpoint's history and evaluations and gives the same records as
an uninterrupted run, timing fields aside.

Example:
    >>> from bilevel.experiments import load_config, run_experiment
    >>> config = load_config("hyperclean_demo")                        # doctest: +SKIP
    >>> summary = run_experiment(config, "runs/demo", overrides=["run.max_iters=50"])  # doctest: +SKIP
    >>> summary["metrics"]["f1"]                                       # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import yaml

import bilevel
from ..callbacks import JSONLinesLogger, ProgressBar, TensorBoardLogger
from ..checkpoint import CheckpointError, capture_rng, load_checkpoint, save_checkpoint
from ..methods.base import Method, State
from ..solve import Status, solve
from .config import METHOD_COMMON_KEYS, ConfigError, apply_overrides, method_class, resolve_config

__all__ = ["Experiment", "build_experiment", "build_method", "run_experiment", "resume_run", "default_run_dir", "read_log", "TIMING_KEYS"]

#: record fields that measure time (they differ between two runs of the same experiment).
TIMING_KEYS = ("time",)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Experiment:
    """Everything a run needs, built from a resolved configuration."""

    config: dict
    problem: Any
    method: Method
    data: Any
    evaluate: Callable[[State], dict]
    baseline: Callable[[], dict] = field(default=lambda: {})


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"problem.dtype={name!r} must be one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def build_method(section: dict, episodic: bool = False) -> Method:
    """The method object of a resolved method section (see :mod:`bilevel.experiments.config`)."""
    base = section.get("method", section["name"])
    cls, _ = method_class(base)
    kwargs = {k: v for k, v in section.items() if k not in METHOD_COMMON_KEYS and k != "method"}
    if section.get("lr_upper") is not None:
        lr = float(section["lr_upper"])
        kwargs["lr_upper"] = bilevel.Adam(lr=lr) if section.get("upper", "adam") == "adam" else bilevel.SGD(lr=lr)
    if "solver" in section:
        solvers = {"CG": bilevel.CG, "Neumann": bilevel.Neumann, "FixedPoint": bilevel.FixedPoint}
        name = section["solver"]
        if name not in solvers:
            raise ConfigError(f"method.solver={name!r} must be one of {', '.join(solvers)}")
        options = {"steps": int(section.get("solver_steps", 10))}
        if name != "CG" and section.get("solver_lr") is not None:
            options["lr"] = float(section["solver_lr"])
        kwargs["solver"] = solvers[name](**options)
    try:
        method = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"method {section['name']}: {err}") from err
    if episodic or section.get("episodic"):
        from ..problems.fewshot import EpisodicLower

        method = EpisodicLower(method)
    return method


def _build_hyperclean(config: dict) -> Experiment:
    from ..data import make_hyperclean_data
    from ..problems.hyperclean import fit_lower, hyperclean_problem

    p, run = config["problem"], config["run"]
    data = make_hyperclean_data(
        p["dataset"], noise_rate=float(p["noise_rate"]), seed=int(p["seed"]) + int(run["seed"]),
        n_train=p["n_train"], n_val=p["n_val"], n_test=p["n_test"], root=p["data_dir"], dtype=_dtype(p["dtype"]),
    )
    problem = hyperclean_problem(data, model=p["model"], reg=float(p["reg"]), hidden=int(p["hidden"]), seed=int(run["seed"]))
    method = build_method(config["method"])

    def evaluate(state: State) -> dict:
        return problem.evaluate(state.x, state.y)

    def baseline() -> dict:
        y = fit_lower(problem, problem.x_init, problem.y_init, steps=int(p["baseline_steps"]), lr=float(p["baseline_lr"]))
        metrics = problem.evaluate(problem.x_init, y)
        return {"description": f"no cleaning: x = 0 (equal weights), {p['baseline_steps']} GD steps on the noisy labels", **metrics}

    return Experiment(config=config, problem=problem, method=method, data=None, evaluate=evaluate, baseline=baseline)


def _fewshot_classes(p: dict):
    from ..data import build_embedded_classes, build_mnist_fashion_classes, load_omniglot, split_classes

    dataset = p["dataset"]
    if dataset == "mnist5k":
        return split_classes(build_embedded_classes(p["per_class"]), int(p["num_train_classes"]), seed=int(p["seed"]))
    if dataset == "mnist_fashion":
        classes = build_mnist_fashion_classes(p["data_dir"], "train", p["per_class"])
        return split_classes(classes, int(p["num_train_classes"]), seed=int(p["seed"]))
    if dataset == "omniglot":
        train = load_omniglot(p["data_dir"], background=True)
        test = load_omniglot(p["data_dir"], background=False, first_class_id=len(train))
        return train, test
    raise ConfigError(f"problem.dataset={dataset!r} for few-shot must be one of mnist5k, mnist_fashion, omniglot")


def _build_fewshot(config: dict) -> Experiment:
    from ..data import EpisodeSampler
    from ..problems.fewshot import EpisodeSource, fewshot_problem

    p, run = config["problem"], config["run"]
    dtype = _dtype(p["dtype"])
    train, test = _fewshot_classes(p)
    shape = dict(n_way=int(p["n_way"]), k_shot=int(p["k_shot"]), q_query=int(p["q_query"]))
    sampler = EpisodeSampler(train, meta_batch=int(p["meta_batch"]), seed=int(run["seed"]), **shape)
    # meta-test tasks do not depend on the run seed: every run is scored on the same tasks
    test_sampler = EpisodeSampler(test, meta_batch=25, seed=10_000 + int(p["seed"]), **shape)
    problem = fewshot_problem(
        n_way=shape["n_way"], meta_batch=int(p["meta_batch"]), image_shape=sampler.image_shape, backbone=p["backbone"],
        reg=float(p["reg"]), channels=int(p["channels"]), blocks=int(p["blocks"]), norm=p["norm"], groups=int(p["groups"]),
        hidden=int(p["hidden"]), features=int(p["features"]), feature_scale=float(p["feature_scale"]), seed=int(run["seed"]), dtype=dtype,
    )
    method = build_method(config["method"], episodic=True)

    def evaluate(state: State) -> dict:
        return problem.meta_test(state.x, test_sampler, num_tasks=int(p["eval_tasks"]), steps=int(p["eval_steps"]))

    def baseline() -> dict:
        metrics = problem.meta_test(problem.x_init, test_sampler, num_tasks=int(p["eval_tasks"]), steps=int(p["eval_steps"]))
        return {"description": "untrained (random) feature extractor", **metrics}

    return Experiment(config=config, problem=problem, method=method, data=EpisodeSource(sampler, dtype=dtype), evaluate=evaluate, baseline=baseline)


def build_experiment(config: dict) -> Experiment:
    """Problem, method, data source and evaluation of a configuration (resolved here)."""
    config = resolve_config(config)
    torch.manual_seed(int(config["run"]["seed"]))
    if config["run"]["threads"] is not None:
        # small problems run faster on one thread, and much faster on a busy machine
        torch.set_num_threads(int(config["run"]["threads"]))
    if config["problem"]["kind"] == "hyperclean":
        return _build_hyperclean(config)
    return _build_fewshot(config)


def default_run_dir(config: dict, root: str | Path = "runs") -> Path:
    """``runs/<config name>-<method>-<YYYYmmdd-HHMMSS>`` (a suffix avoids collisions)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{config.get('name', 'run')}-{config['method']['name']}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def _environment(config: dict) -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "bilevel": bilevel.__version__,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "seed": config["run"]["seed"],
        "hostname": socket.gethostname(),
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class _Forward:
    """Pass ``on_log`` to a callback whose ``on_start``/``on_end`` the runner calls once."""

    def __init__(self, callbacks):
        self.callbacks = callbacks

    def on_log(self, record):
        for cb in self.callbacks:
            cb.on_log(record)


def _on_grid(k: int, every: int, last: int) -> bool:
    return k % every == 0 or k == last


def _log_lines(history: Sequence[dict], evals: Sequence[dict], run: dict, upto: int) -> list[dict]:
    """The log records of iterations ``≤ upto``: diagnostics merged with evaluations.

    Diagnostics are kept every ``log_every`` and ``eval_every`` iterations and at
    ``max_iters``; evaluations every ``eval_every`` iterations, at 0 and at ``max_iters``,
    so a run stopped at K and resumed to N has the records of an uninterrupted run to N.
    """
    n, log_every, eval_every = run["max_iters"], run["log_every"], run["eval_every"]
    lines: dict[int, dict] = {}
    for record in history:
        k = int(record["iteration"])
        if k <= upto and (_on_grid(k, log_every, n) or k % eval_every == 0):
            lines[k] = dict(record)
    for record in evals:
        k = int(record["iteration"])
        if k <= upto and _on_grid(k, eval_every, n):
            lines.setdefault(k, {"iteration": k}).update(record)
    return [lines[k] for k in sorted(lines)]


def _execute(exp: Experiment, run_dir: Path, payload: Optional[dict], progress: bool) -> dict:
    """The chunked solve loop shared by fresh and resumed runs; returns the summary."""
    config, run = exp.config, exp.config["run"]
    n = int(run["max_iters"])
    checkpoint_path = run_dir / "checkpoint.pt"
    logger = JSONLinesLogger(run_dir / "log.jsonl", flush_every=1)
    observers = [logger]
    if run["tensorboard"]:
        try:
            import tensorboard  # noqa: F401
        except ImportError as err:
            raise ConfigError("run.tensorboard=true needs the tensorboard package: pip install tensorboard (or run.tensorboard=false)") from err
        observers.append(TensorBoardLogger(run_dir / "tensorboard"))
    bar = ProgressBar(keys=("upper_loss",), desc=f"{config['method']['name']}", disable=not progress)
    started = time.perf_counter()

    if payload is None:
        state = exp.method.init(exp.problem, None, None, _first_batch(exp.data), validate=True)
        history: list = []
        evals = [{"iteration": 0, "time": 0.0, **exp.evaluate(state)}]
        wall_time = 0.0
    else:
        state, history = payload["state"], list(payload["history"])
        evals = list(payload["meta"].get("evals", []))
        wall_time = float(payload["meta"].get("wall_time", 0.0))
        if state.k > n:
            raise ConfigError(f"the checkpoint is at iteration {state.k}, beyond max_iters={n}: give a larger --max-iters")
        if not evals or evals[-1]["iteration"] != state.k:
            evals.append({"iteration": state.k, "time": wall_time, **exp.evaluate(state)})
    start_k = state.k
    run_info = {"problem": exp.problem, "method": exp.method, "state": state, "max_iters": n, "start": start_k}
    # log.jsonl is rebuilt from the authoritative history/evaluations, then appended to
    logger.on_start({**run_info, "start": 0})
    for line in _log_lines(history, evals, run, start_k):
        logger.on_log(line)
    for cb in observers[1:] + [bar]:
        cb.on_start(run_info)
    written_upto = start_k

    def meta(status: str) -> dict:
        return {"evals": evals, "wall_time": wall_time, "status": status, "config_name": config.get("name"), "max_iters": n, "method": exp.method.name}

    status, message = Status.MAX_ITERS, f"{n} iterations done"
    try:
        while state.k < n:
            stop = min(n, (state.k // run["eval_every"] + 1) * run["eval_every"])
            result = _solve_chunk(exp, state, history, wall_time, stop, run, checkpoint_path, bar, observers, meta("running"))
            state, history, wall_time = result.state, list(result.history), result.wall_time
            if result.status != Status.MAX_ITERS:
                status, message = result.status, result.message
            evals.append({"iteration": state.k, "time": wall_time, **exp.evaluate(state)})
            for line in _log_lines(history, evals, run, state.k):
                if line["iteration"] > written_upto:
                    logger.on_log(line)
            written_upto = state.k
            if status != Status.MAX_ITERS:
                break
            if run["checkpoint_every"]:
                save_checkpoint(checkpoint_path, state, history, meta("running"))
    except KeyboardInterrupt:
        status, message = Status.INTERRUPTED, f"interrupted at iteration {state.k}"
    finally:
        save_checkpoint(checkpoint_path, state, history, meta(status.value))
        for cb in [logger] + observers[1:] + [bar]:
            cb.on_end(None)
    final = next((e for e in reversed(evals) if e["iteration"] == state.k), evals[-1])
    summary = {
        "name": config.get("name"),
        "method": config["method"]["name"],
        "status": status.value,
        "message": message,
        "iterations": state.k,
        "max_iters": n,
        "time": wall_time,
        "total_seconds": time.perf_counter() - started + float((payload or {}).get("meta", {}).get("total_seconds", 0.0)),
        "metrics": {k: v for k, v in final.items() if k not in ("iteration", "time")},
        "final_record": history[-1] if history else {},
        "seed": config["run"]["seed"],
    }
    return summary


def _first_batch(data):
    return data.batch_at(0) if data is not None else None


def _solve_chunk(exp, state, history, wall_time, stop, run, checkpoint_path, bar, observers, meta):
    # the state comes from method.init (fresh run) or the previous chunk / checkpoint:
    # solve continues from it through a resume payload (RNG captured = left unchanged)
    resume = {"state": state, "history": history, "rng": capture_rng(), "meta": {"wall_time": wall_time}}
    return solve(
        exp.problem, exp.method, data=exp.data, max_iters=stop, callbacks=[_Forward([bar] + observers[1:])],
        log_every=run["log_every"], checkpoint=checkpoint_path if run["checkpoint_every"] else None,
        checkpoint_every=run["checkpoint_every"], resume=resume, validate=False, meta=meta,
    )


def run_experiment(
    config: dict,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    progress: bool = True,
    runs_root: str | Path = "runs",
) -> dict:
    """Run a configuration (plus ``section.key=value`` overrides) into a run directory.

    Args:
        config: a configuration dict (:func:`~bilevel.experiments.load_config`).
        out: the run directory (default :func:`default_run_dir` under ``runs_root``).
        overrides: ``section.key=value`` strings.
        progress: show a progress bar (also needs ``run.progress``).

    Returns:
        the summary (also written to ``summary.json``), with ``run_dir`` added.
    """
    config = resolve_config(apply_overrides(config, overrides))
    exp = build_experiment(config)
    run_dir = Path(out) if out is not None else default_run_dir(exp.config, runs_root)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(exp.config, sort_keys=False))
    _write_json(run_dir / "env.json", _environment(exp.config))
    baseline = exp.baseline()
    summary = _execute(exp, run_dir, None, progress and exp.config["run"]["progress"])
    summary["baseline"] = baseline
    summary["run_dir"] = str(run_dir)
    _write_json(run_dir / "summary.json", summary)
    return summary


def resume_run(run_dir: str | Path, max_iters: Optional[int] = None, progress: bool = True) -> dict:
    """Continue a stopped run from ``RUN_DIR/checkpoint.pt`` (optionally to a new ``max_iters``).

    The configuration is read from ``RUN_DIR/config.yaml``; ``log.jsonl`` is rebuilt from
    the checkpoint and extended, ``summary.json`` rewritten.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory: it has no config.yaml")
    payload = load_checkpoint(run_dir / "checkpoint.pt")
    config = yaml.safe_load(config_path.read_text())
    if max_iters is not None:
        config["run"]["max_iters"] = int(max_iters)
    exp = build_experiment(config)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(exp.config, sort_keys=False))
    previous = {}
    if (run_dir / "summary.json").is_file():
        previous = json.loads((run_dir / "summary.json").read_text())
    payload["meta"]["total_seconds"] = previous.get("total_seconds", 0.0)
    summary = _execute(exp, run_dir, payload, progress and exp.config["run"]["progress"])
    summary["baseline"] = previous.get("baseline") or exp.baseline()
    summary["run_dir"] = str(run_dir)
    _write_json(run_dir / "summary.json", summary)
    return summary


def read_log(run_dir: str | Path) -> list[dict]:
    """The records of ``RUN_DIR/log.jsonl``."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no log.jsonl: give a run directory written by `bilevel run`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
