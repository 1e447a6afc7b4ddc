"""Build and run experiments from configurations; write and resume run directories.

A run directory holds::

    config.yaml    the resolved configuration (every default filled in)
    env.json       python/torch/numpy versions, device, threads, seed, hostname, command line
    log.jsonl      one JSON object per logged iteration: the method's diagnostics
                   (every run.log_every iterations) merged with the evaluation metrics
                   (every run.eval_every iterations, and at iteration 0 and the end)
    checkpoint.pt  bilevel.solve checkpoint (atomic): every run.checkpoint_every
                   iterations (0: never in between), at the end and on Ctrl-C
    summary.json   final metrics, status, iterations, times, the no-cleaning baseline
    manifest.json  the files bilevel wrote in this folder (``--overwrite`` removes only those)
    tensorboard/   only with run.tensorboard=true

One run is one call of :func:`bilevel.solve`: the evaluation is a callback whose
``on_log`` sees the current state (``run["state"]``), so interrupts, checkpoints and
divergence have a single path, the one of ``solve``. ``solve`` records diagnostics every
gcd(log_every, eval_every) iterations, so every evaluation has its record; log.jsonl keeps
the records of the log and evaluation grids. The evaluations live in the checkpoint's
``meta``, so a resumed run (``bilevel resume``) rebuilds log.jsonl from the checkpoint and
gives the same records as an uninterrupted run, timing fields aside. The evaluation saves
and restores the global RNG, so it cannot change the iterates either.

Why the output folder is guarded (docs/experiments.md, "Output folders"): a run refuses a
non-empty folder (``RunDirError``), ``overwrite=True`` removes only what bilevel wrote
there (listed in ``manifest.json``), and everything that can fail before the first
iteration (configuration, data, tensorboard, writability, initialisation, the baseline)
is done before the folder is touched, so a failed start leaves it as it was. A resumed
run refuses a configuration whose state-relevant keys differ from the checkpoint's.

Example:
    >>> from bilevel.experiments import load_config, run_experiment
    >>> config = load_config("hyperclean_demo")                        # doctest: +SKIP
    >>> summary = run_experiment(config, "runs/demo", overrides=["run.max_iters=50"])  # doctest: +SKIP
    >>> summary["metrics"]["f1"]                                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import functools
import json
import math
import os
import platform
import random
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import torch
import yaml

import bilevel

from ..auto import AutoStepReporter
from ..callbacks import ProgressBar, TensorBoardLogger
from ..checkpoint import CheckpointError, capture_rng, load_checkpoint, probe_writable
from ..methods.base import Method, State
from ..solve import CheckpointWriteWarning, DivergenceError, Result, Status, solve, spec_changes
from .config import (
    DEFAULT_UPPER,
    RUN_KEYS,
    ConfigError,
    FewshotSpec,
    HypercleanSpec,
    ResolvedConfig,
    StochasticSpec,
    apply_overrides,
    method_arguments,
    method_class,
    resolve,
    schedule,
)

__all__ = [
    "BENCH_FILES",
    "COMPLETED",
    "FINISHED",
    "MANIFEST",
    "RESUMABLE_CHANGES",
    "RUN_FILES",
    "TIMING_KEYS",
    "Experiment",
    "OutputDir",
    "RunDirError",
    "build_experiment",
    "build_method",
    "check_resume",
    "config_differences",
    "data_dir_override",
    "default_run_dir",
    "format_bench_table",
    "plateau_reason",
    "read_log",
    "read_manifest",
    "resume_bench",
    "resume_run",
    "run_bench",
    "run_experiment",
    "stochastic_metric",
    "write_manifest",
]

#: record fields that measure time (they differ between two runs of the same experiment).
TIMING_KEYS = ("time",)

#: the files a run writes in its directory (``manifest.json`` lists them).
RUN_FILES = ("config.yaml", "env.json", "log.jsonl", "checkpoint.pt", "summary.json", "tensorboard")

#: the file naming what bilevel wrote in a folder (a run or a bench).
MANIFEST = "manifest.json"

#: configuration keys that may differ between a checkpoint and the configuration resuming
#: it: they cannot change the iterates already made (the number of iterations, the
#: evaluation/logging/checkpoint cadence, display, where the data files are found, the
#: other presets). Every other key — method and its fields, problem, data and dtype,
#: seed — is compared.
RESUMABLE_CHANGES = (
    "name",
    "description",
    "methods",
    "problem.data_dir",
    "run.max_iters",
    "run.eval_every",
    "run.log_every",
    "run.checkpoint_every",
    "run.tensorboard",
    "run.progress",
    "run.threads",
    "run.stop_patience",
    "run.stop_min_delta",
)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class RunDirError(ValueError):
    """A folder given on the command line cannot be used as asked: an output folder that
    is not empty (or holds files bilevel did not write in the way), or a folder that is
    not a run/bench directory. Bad input: the CLI exits with status 2."""


@dataclass
class Experiment:
    """Everything a run needs, built from a resolved configuration."""

    config: dict
    problem: Any
    method: Method
    data: Any
    evaluate: Callable[[State], dict]
    baseline: Callable[[], dict] = field(default=dict)


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"problem.dtype={name!r} must be one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def build_method(section: dict, episodic: bool = False) -> Method:
    """The method object of a resolved method section (see :mod:`bilevel.experiments.config`)."""
    base = section.get("method", section["name"])
    cls, _ = method_class(base)
    kwargs = method_arguments(section)
    upper, given = section.get("upper", DEFAULT_UPPER), schedule("method.lr_upper", section.get("lr_upper"))
    if given == "auto":  # the method's parameter-free upper step (bilevel.auto), as lr_upper="auto" in Python
        if upper != DEFAULT_UPPER:
            raise ConfigError(f"method {section['name']}: lr_upper: auto is the method's own step; it takes no upper: {upper}")
        kwargs["lr_upper"] = "auto"
    elif given is not None or upper != DEFAULT_UPPER:
        # a number is plain gradient steps, as in Python; upper: adam without lr_upper uses the method's own α
        lr: Any = (
            (given if callable(given) else float(given))
            if given is not None
            else next(f.default for f in dataclasses.fields(cls) if f.name == "lr_upper")
        )
        if lr == "auto":  # the method's own upper step is the parameter-free DoG (bilevel.auto): no α to hand to Adam/SGD
            raise ConfigError(f"method {section['name']}: upper: {upper} needs method.lr_upper (without upper, the step is 'auto')")
        kwargs["lr_upper"] = bilevel.Adam(lr=lr) if upper == "adam" else bilevel.SGD(lr=lr)
    if "solver" in section:
        solvers = {"CG": bilevel.CG, "Neumann": bilevel.Neumann, "FixedPoint": bilevel.FixedPoint}
        name = section["solver"]
        if name not in solvers:
            raise ConfigError(f"method.solver={name!r} must be one of {', '.join(solvers)}")
        options: dict[str, float] = {"steps": int(section.get("solver_steps", 10))}
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


def _hyperclean_data(config: ResolvedConfig) -> Any:
    """The hyper-cleaning instance of a configuration (split and noise seed ``problem.seed + run.seed``)."""
    from ..data import make_hyperclean_data

    spec, seed = config.problem, config.run.seed
    assert isinstance(spec, HypercleanSpec)
    return make_hyperclean_data(
        spec.dataset,
        noise_rate=spec.noise_rate,
        exclude_true_class=spec.exclude_true_class,
        seed=spec.seed + seed,
        n_train=spec.n_train,
        n_val=spec.n_val,
        n_test=spec.n_test,
        root=spec.data_dir,
        dtype=_dtype(spec.dtype),
    )


def strong_baselines(config: dict | ResolvedConfig) -> dict[str, dict]:
    """The non-bilevel baselines of a hyper-cleaning configuration's instance, for the bench table.

    Validation only, noisy train + validation, noisy train with early stopping on
    validation, no cleaning with its step count chosen on validation, and the oracle
    (truly clean train + validation), each with a stable step ``1/L₀`` and its step count
    chosen on validation data only; the baselines trained on the validation set choose
    their step count on one held-out 20 % of it (``folds=1``) to keep a bench fast (see
    :func:`bilevel.experiments.baselines.hyperclean_baselines` and ``docs/baselines.md``).
    """
    from .baselines import hyperclean_baselines

    resolved = config if isinstance(config, ResolvedConfig) else resolve(config)
    spec = resolved.problem
    assert isinstance(spec, HypercleanSpec)
    data = _hyperclean_data(resolved)
    rows = _rng_neutral(lambda: hyperclean_baselines(data, spec.model, spec.reg, resolved.run.seed, hidden=spec.hidden, folds=1))
    return {name: {k: row[k] for k in ("description", "test_accuracy", "best_step", "lr")} for name, row in rows.items()}


def _val_accuracy(problem: Any, data: Any, y: dict) -> float:
    """Accuracy (%) of the classifier ``y`` on the clean validation set."""
    with torch.no_grad():
        logits = problem.logits({k: v.detach() for k, v in y.items()}, data.x_val)
        return 100.0 * float((logits.argmax(1) == data.y_val).double().mean())


def retrained_accuracy(config: dict | ResolvedConfig, run_dir: str | Path) -> dict:
    """Test accuracy of a fresh classifier retrained with a finished run's learned weights.

    The run's final upper variable ``x`` (from ``RUN_DIR/checkpoint.pt``) weights the noisy
    training examples by ``σ(x_i)``; a classifier is trained from its initialisation on that
    lower objective with the stable step ``1/L₀`` and its step count chosen on the validation
    set (:func:`bilevel.experiments.baselines.retrain_with_weights`; no test data is looked
    at). Test accuracy "as trained" mixes how well a method cleans with how long it trained
    its own classifier; this number keeps only the first.

    Returns:
        ``{"iterations", "description", "test_accuracy", "val_accuracy", "best_step", "lr",
        "kept_fraction"}`` (``iterations``: the run's iteration count the weights come from).
    """
    from .baselines import retrain_with_weights

    resolved = config if isinstance(config, ResolvedConfig) else resolve(config)
    spec = resolved.problem
    assert isinstance(spec, HypercleanSpec)
    state = load_checkpoint(Path(run_dir) / "checkpoint.pt", map_location="cpu")["state"]
    data = _hyperclean_data(resolved)
    row = _rng_neutral(lambda: retrain_with_weights(data, state.x, spec.model, spec.reg, resolved.run.seed, hidden=spec.hidden))
    kept = ("description", "test_accuracy", "best_step", "lr", "kept_fraction")
    return {"iterations": int(state.k), **{k: row[k] for k in kept}, "val_accuracy": row["selection_accuracy"]}


def _build_hyperclean(config: ResolvedConfig) -> Experiment:
    from ..problems.hyperclean import fit_lower, hyperclean_problem

    spec, seed = config.problem, config.run.seed
    assert isinstance(spec, HypercleanSpec)
    data = _hyperclean_data(config)
    # the keys named as the builder's arguments (model, reg, hidden) are forwarded by name
    problem = hyperclean_problem(data, seed=seed, **spec.arguments_for(hyperclean_problem, exclude=("seed",)))
    method = build_method(config.data["method"])

    def evaluate(state: State) -> dict:
        # validation accuracy too: presets and step counts are chosen on it, never on test accuracy
        return {**problem.evaluate(state.x, state.y), "val_accuracy": _val_accuracy(problem, data, state.y)}

    def baseline() -> dict:
        steps = spec.baseline_steps
        y = fit_lower(problem, problem.x_init, problem.y_init, steps=steps, lr=spec.baseline_lr)
        metrics = {**problem.evaluate(problem.x_init, y), "val_accuracy": _val_accuracy(problem, data, y)}
        return {"description": f"no cleaning: x = 0 (equal weights), {steps} GD steps on the noisy labels", **metrics}

    return Experiment(config=config.data, problem=problem, method=method, data=None, evaluate=evaluate, baseline=baseline)


def fewshot_classes(spec: FewshotSpec, run_seed: int = 0) -> tuple[Any, Any, Any]:
    """Meta-train, meta-validation (empty unless ``problem.num_val_classes``) and meta-test
    classes of a few-shot configuration; the split is seeded by ``problem.seed + run.seed``
    (Omniglot: its background / evaluation sets, no meta-validation classes)."""
    from ..data import build_embedded_classes, build_mnist_fashion_classes, load_omniglot
    from ..data.fewshot import split_meta_classes

    dataset, seed = spec.dataset, spec.seed + run_seed
    if dataset in ("mnist5k", "mnist_fashion"):
        if dataset == "mnist5k":
            classes = build_embedded_classes(spec.per_class)
        else:
            classes = build_mnist_fashion_classes(spec.data_dir, "train", spec.per_class)
        try:
            train, val, test = split_meta_classes(classes, spec.num_train_classes, spec.num_val_classes, seed=seed)
        except ValueError as err:
            raise ConfigError(f"problem.num_train_classes / problem.num_val_classes: {err}") from None
        if len(test) < spec.n_way:
            raise ConfigError(
                f"problem.n_way={spec.n_way} needs at least {spec.n_way} meta-test classes; {dataset} has {len(classes)} classes, "
                f"{spec.num_train_classes} meta-train and {spec.num_val_classes} meta-validation leave {len(test)}: use fewer"
            )
        return train, val, test
    if dataset == "omniglot":
        if spec.num_val_classes:
            raise ConfigError("problem.num_val_classes is not supported for omniglot (fixed background / evaluation sets): set it to 0")
        train = load_omniglot(spec.data_dir, background=True)
        test = load_omniglot(spec.data_dir, background=False, first_class_id=len(train))
        return train, {}, test
    raise ConfigError(f"problem.dataset={dataset!r} for few-shot must be one of mnist5k, mnist_fashion, omniglot")


def fewshot_samplers(config: ResolvedConfig) -> tuple[Any, Any, Any]:
    """The meta-training, meta-validation (``None`` without meta-validation classes) and
    meta-test :class:`~bilevel.data.EpisodeSampler` of a few-shot configuration.

    The held-out samplers draw 25 tasks per batch, seeded ``10_000 + s`` (meta-test) and
    ``20_000 + s`` (meta-validation) with ``s = problem.seed + run.seed``, the split seed:
    every method of a seed is scored on the same tasks.
    """
    from ..data import EpisodeSampler

    spec, seed = config.problem, config.run.seed
    assert isinstance(spec, FewshotSpec)
    train, val, test = fewshot_classes(spec, seed)
    shape = dict(n_way=spec.n_way, k_shot=spec.k_shot, q_query=spec.q_query)
    sampler = EpisodeSampler(train, meta_batch=spec.meta_batch, seed=seed, **shape)
    test_sampler = EpisodeSampler(test, meta_batch=25, seed=10_000 + spec.seed + seed, **shape)
    val_sampler = EpisodeSampler(val, meta_batch=25, seed=20_000 + spec.seed + seed, **shape) if val else None
    return sampler, val_sampler, test_sampler


def _build_fewshot(config: ResolvedConfig) -> Experiment:
    from ..problems.fewshot import EpisodeSource, fewshot_problem

    spec, seed = config.problem, config.run.seed
    assert isinstance(spec, FewshotSpec)
    dtype = _dtype(spec.dtype)
    sampler, val_sampler, test_sampler = fewshot_samplers(config)
    # the keys named as the builder's arguments (n_way, meta_batch, backbone, reg, ...) are forwarded by name
    problem = fewshot_problem(
        image_shape=sampler.image_shape, seed=seed, dtype=dtype, **spec.arguments_for(fewshot_problem, exclude=("seed", "dtype"))
    )
    method = build_method(config.data["method"], episodic=True)

    def scores(x: Any) -> dict:
        metrics = problem.meta_test(x, test_sampler, num_tasks=spec.eval_tasks, steps=spec.eval_steps)
        if val_sampler is not None:
            val = problem.meta_test(x, val_sampler, num_tasks=spec.eval_tasks, steps=spec.eval_steps)
            metrics.update(val_accuracy=val["test_accuracy"], val_ci95=val["test_ci95"])
        return metrics

    def evaluate(state: State) -> dict:
        return scores(state.x)

    def baseline() -> dict:
        return {"description": "untrained (random) feature extractor", **scores(problem.x_init)}

    return Experiment(
        config=config.data, problem=problem, method=method, data=EpisodeSource(sampler, dtype=dtype), evaluate=evaluate, baseline=baseline
    )


def _build_stochastic(config: ResolvedConfig) -> Experiment:
    """A benchmark problem of :mod:`bilevel.problems.benchmark` on its sample streams (seeded
    by ``run.seed``); each evaluation reports the problem's metric and the samples seen."""
    from ..problems.benchmark import samples_seen, stochastic_benchmark

    spec = config.problem
    assert isinstance(spec, StochasticSpec)
    from .. import distributed

    if distributed.is_active():
        check_processes(config, torch.distributed.get_world_size())
    sizes = {"n_lower": spec.n_lower, "n_upper": spec.n_upper, "dim_x": spec.dim_x, "dim_y": spec.dim_y}
    bench = stochastic_benchmark(
        spec.name,
        seed=spec.seed,
        **sizes,
        noise_rate=spec.noise_rate,
        reg=spec.reg,
        dtype=_dtype(spec.dtype) if spec.dtype is not None else None,
        data_dir=spec.data_dir,
    )
    try:
        streams = bench.streams(batch_size=spec.batch_size, seed=config.run.seed)
    except ValueError as err:  # a batch larger than the data: name the key to change
        raise ConfigError(f"problem.batch_size={spec.batch_size}: {str(err).splitlines()[0]}") from None
    method = build_method(config.data["method"])

    def evaluate(state: State) -> dict:
        return {**bench.evaluate(state), "samples": samples_seen(method, streams, int(state.k))}

    return Experiment(config=config.data, problem=bench.problem, method=method, data=streams, evaluate=evaluate)


def check_processes(config: dict | ResolvedConfig, nproc: int) -> None:
    """Refuse ``nproc > 1`` processes for a problem kind that is not split between them.

    ``problem.kind: stochastic`` is not: every process would draw the same mini-batches
    from its own full copy of the data, a one-process run at ``nproc`` times its cost.
    """
    data = config.data if isinstance(config, ResolvedConfig) else resolve(config).data
    if nproc > 1 and data["problem"]["kind"] == "stochastic":
        raise ConfigError(
            f"problem.kind: stochastic runs in one process (asked for {nproc}): its mini-batches of "
            f"{data['problem']['batch_size']} samples are not split between processes; run it without --nproc"
        )


def build_experiment(config: dict | ResolvedConfig) -> Experiment:
    """Problem, method, data source and evaluation of a configuration (resolved here,
    unless it is a :class:`~bilevel.experiments.config.ResolvedConfig` already)."""
    config = resolve(config)
    torch.manual_seed(config.run.seed)
    if config.run.threads is not None:
        # small problems run faster on one thread, and much faster on a busy machine
        torch.set_num_threads(config.run.threads)
    kind = config.data["problem"]["kind"]
    if kind == "hyperclean":
        return _build_hyperclean(config)
    if kind == "stochastic":
        return _build_stochastic(config)
    return _build_fewshot(config)


def default_run_dir(config: dict, root: str | Path = "runs") -> Path:
    """``runs/<config name>-<method>-<YYYYmmdd-HHMMSS>`` (a suffix avoids collisions)."""
    return _fresh_path(Path(root) / f"{config.get('name', 'run')}-{config['method']['name']}-{time.strftime('%Y%m%d-%H%M%S')}")


def _fresh_path(base: Path) -> Path:
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


def _write_text(path: Path, text: str) -> None:
    """Write atomically (temporary file + rename): a failed write keeps the old file whole."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _write_json(path: Path, payload: dict) -> None:
    _write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------
# output folders: what bilevel wrote there, refusing to replace anything else
# --------------------------------------------------------------------------------------

#: the files a bench writes at the top of its folder (plus one run directory per method × seed).
BENCH_FILES = (
    "table.md",
    "bench.json",
    "test_accuracy.png",
    "test_accuracy.svg",
    "f1.png",
    "f1.svg",
    *(f"{metric}-{axis}.{fmt}" for metric in ("suboptimality", "test_error") for axis in ("time", "samples") for fmt in ("png", "svg")),
)


def read_manifest(folder: str | Path) -> dict | None:
    """``folder/manifest.json`` if bilevel wrote it (``kind`` run or bench), else ``None``."""
    manifest = _read_json(Path(folder) / MANIFEST)
    if isinstance(manifest, dict) and manifest.get("format") == "bilevel" and manifest.get("kind") in ("run", "bench"):
        return manifest
    return None


def write_manifest(folder: str | Path, manifest: dict) -> None:
    """Write ``folder/manifest.json`` (atomically); ``manifest`` needs ``kind`` and ``files``."""
    _write_json(Path(folder) / MANIFEST, {"format": "bilevel", "version": 1, **manifest})


def _owned(folder: Path) -> tuple[str | None, list[Path]]:
    """What kind of bilevel folder ``folder`` is (run, bench or ``None``) and the paths bilevel
    wrote there, contents before their folders (the order to remove them in).

    A folder written by this version lists its files in ``manifest.json``; one written
    before manifests existed is recognised by its env.json (run) or bench.json (bench).
    """
    manifest = read_manifest(folder)
    if manifest is not None:
        paths: list[Path] = []
        if manifest["kind"] == "bench":
            for entry in manifest.get("runs", []):
                sub = folder / str(entry.get("dir", ""))
                if entry.get("dir") and sub.is_dir():
                    paths += _owned(sub)[1] + [sub]
        paths += [folder / str(name) for name in manifest.get("files", [])]
        return manifest["kind"], [*paths, folder / MANIFEST]
    env = _read_json(folder / "env.json")
    if isinstance(env, dict) and "bilevel" in env and "command" in env and (folder / "config.yaml").is_file():
        return "run", [folder / name for name in RUN_FILES]
    bench = _read_json(folder / "bench.json")
    if isinstance(bench, dict) and {"config", "methods", "seeds", "runs"} <= set(bench):
        paths = []
        for method in bench.get("methods") or []:
            for seed in bench.get("seeds") or []:
                sub = folder / f"{method}-seed{seed}"
                if sub.is_dir() and _owned(sub)[0] == "run":
                    paths += _owned(sub)[1] + [sub]
        return "bench", paths + [folder / name for name in BENCH_FILES]
    return None, []


def _remove_owned(path: Path) -> None:
    """Remove one path bilevel wrote; a folder only once it is empty (what else is in it stays)."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            if path.name == "tensorboard":
                for event in path.glob("events.out.tfevents.*"):
                    event.unlink()
            try:
                path.rmdir()
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
    except FileNotFoundError:
        pass


def _preview(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class OutputDir:
    """An output folder, checked before a run or bench writes anything into it.

    :meth:`inspect` refuses a non-empty folder unless ``overwrite``, and even then refuses
    when a file bilevel is about to write exists and was not written by bilevel (a
    hand-written ``config.yaml`` is never replaced). :meth:`prepare` creates the folder and
    checks that it can be written (and has room for a checkpoint) before the first
    iteration; :meth:`undo` removes the folders it created when the run fails before it
    started; :meth:`clear` removes what bilevel wrote there before (``--overwrite``), and is
    called only once the new run is about to write.
    """

    path: Path
    kind: str
    owned: list = field(default_factory=list)
    created: list = field(default_factory=list)

    @classmethod
    def inspect(cls, path: str | Path, kind: str, overwrite: bool, writes: Sequence[str]) -> OutputDir:
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunDirError(f"{path} is a file, not a folder: give a new or empty folder as --out")
        entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        if not entries:
            return cls(path, kind)
        found, owned = _owned(path)
        if not overwrite:
            if found is not None:
                raise RunDirError(
                    f"{path} already holds a bilevel {found}: continue it with `bilevel resume {path}`, "
                    f"replace it with --overwrite, or choose another --out"
                )
            raise RunDirError(
                f"{path} is not empty ({_preview(entries)}) and bilevel did not write it: choose a new or empty folder "
                f"as --out, or pass --overwrite to write beside these files (bilevel never removes files it did not write)"
            )
        owned_set = set(owned)
        for name in writes:
            target = path / name
            if target.exists() and target not in owned_set and not (target.is_dir() and not any(target.iterdir())):
                raise RunDirError(
                    f"--overwrite replaces only files bilevel wrote, and {target} was not written by bilevel: "
                    f"move it away or choose another --out"
                )
        return cls(path, kind, owned)

    def prepare(self) -> None:
        """Create the folder (remembering what was created) and check that it is writable."""
        missing, parent = [], self.path
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self.created.append(folder)
            probe_writable(self.path)
        except OSError as err:
            self.undo()
            raise OSError(
                err.errno,
                f"cannot write to the output folder {self.path} ({err.strerror or err}): choose another --out or make it writable",
            ) from None

    def check_space(self, needed: int) -> None:
        """Refuse to start when the disk lacks room for ``needed`` bytes (checkpoint and logs)."""
        try:
            free = shutil.disk_usage(self.path).free
        except OSError:
            return
        if free < needed:
            raise OSError(
                errno.ENOSPC,
                f"the output folder {self.path} has {free / 1e6:.1f} MB free and the run needs about "
                f"{needed / 1e6:.1f} MB (checkpoint and logs): free some space or choose another --out",
            )

    def undo(self) -> None:
        """Remove the (empty) folders :meth:`prepare` created: a failed start leaves no trace."""
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        self.created = []

    def clear(self) -> None:
        """Remove what bilevel wrote here before (only with ``overwrite``); keep everything else."""
        for path in self.owned:
            _remove_owned(path)
        self.owned = []
        self.created = []
        self.path.mkdir(parents=True, exist_ok=True)


def _bytes_needed(state: State, config: dict) -> int:
    """Disk a run needs: two checkpoints (the atomic write keeps the old one until the
    rename), the log, and a margin."""

    def nbytes(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(nbytes(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(nbytes(v) for v in value)
        return 0

    run = config["run"]
    records = int(run["max_iters"]) // math.gcd(int(run["log_every"]), int(run["eval_every"])) + 2
    return 2 * nbytes(state.to_dict()) + 2 * 1000 * records + 1_000_000


# --------------------------------------------------------------------------------------
# resuming: what may change between a checkpoint and the configuration resuming it
# --------------------------------------------------------------------------------------


def _may_change(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_CHANGES)


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key old → new`` for every key outside :data:`RESUMABLE_CHANGES` whose value differs."""
    return [f"{key} {old!r} → {new!r}" for key, old, new in spec_changes(saved, current, ignore=_may_change)]


# --------------------------------------------------------------------------------------
# the run: one solve call, evaluation and logging as its callback
# --------------------------------------------------------------------------------------


_R = TypeVar("_R")


def _rng_neutral(fn: Callable[..., _R], *args: Any) -> _R:
    """``fn(*args)`` with the global RNGs restored afterwards, so an evaluation (or the
    baseline) can never change the iterates, whatever the evaluation cadence."""
    saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        return fn(*args)
    finally:
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _segment_at(segments: Sequence[dict], k: int) -> dict:
    """The cadence in force at iteration ``k`` (segment s covers ``(s.start, next.start]``)."""
    segment = segments[0]
    for candidate in segments[1:]:
        if k > candidate["start"]:
            segment = candidate
    return segment


def _log_lines(history: Sequence[dict], evals: Sequence[dict], segments: Sequence[dict], n: int, upto: int) -> list[dict]:
    """The log records of iterations ``≤ upto``: diagnostics merged with evaluations.

    Diagnostics are kept every ``log_every`` and ``eval_every`` iterations and at ``n``
    (the current ``max_iters``); evaluations every ``eval_every`` iterations, at 0 and at
    ``n``, with the cadence in force when they were made (``segments``). So a run stopped
    at K (an earlier ``max_iters``, or Ctrl-C) and resumed to N has the records of an
    uninterrupted run to N: the extra record and evaluation at K are dropped.
    """
    lines: dict[int, dict] = {}
    for record in history:
        k = int(record["iteration"])
        segment = _segment_at(segments, k)
        if k <= upto and (k % segment["log_every"] == 0 or k % segment["eval_every"] == 0 or k == n):
            lines[k] = dict(record)
    for record in evals:
        k = int(record["iteration"])
        if k <= upto and (k % _segment_at(segments, k)["eval_every"] == 0 or k == n):
            lines.setdefault(k, {"iteration": k}).update(record)
    return [lines[k] for k in sorted(lines)]


def plateau_reason(evals: Sequence[dict], metric: str, patience: int, min_delta: float) -> str | None:
    """Why a run stops early on validation data, or ``None`` to go on.

    The run stops when none of its last ``patience`` evaluations has ``metric`` above the
    best value of the evaluations before them by more than ``min_delta``. A pure function
    of the evaluations (kept in every checkpoint), so a resumed run stops where an
    uninterrupted one would.
    """
    values = [(int(e["iteration"]), float(e[metric])) for e in evals if metric in e]
    if len(values) <= patience:
        return None
    best_iteration, best = max(values[:-patience], key=lambda item: item[1])
    if max(value for _, value in values[-patience:]) > best + min_delta:
        return None
    return (
        f"{metric} plateaued: no gain above {min_delta:g} over {best:.2f} (iteration {best_iteration}) "
        f"in the last {patience} evaluations (run.stop_patience)"
    )


class _Recorder:
    """The runner's one :func:`~bilevel.solve` callback.

    At each record it evaluates the current state (``run["state"]``) on the evaluation
    grid, appends the evaluation to ``evals`` (the list stored in the checkpoint's meta, so
    every checkpoint carries the evaluations made up to it), writes the log line, and
    feeds the progress bar and TensorBoard. A failed write to log.jsonl does not stop the
    run: the error is kept (``errors``) and the runner rewrites the log at the end from
    the history, which holds every record.
    """

    def __init__(
        self,
        exp: Experiment,
        run_dir: Path,
        history: list,
        evals: list,
        segments: list,
        bar: ProgressBar,
        tensorboard: TensorBoardLogger | None,
    ):
        self.exp, self.path = exp, run_dir / "log.jsonl"
        self.history, self.evals, self.segments = history, evals, segments
        self.n = int(exp.config["run"]["max_iters"])
        self.bar, self.tensorboard = bar, tensorboard
        self.errors: list[str] = []
        self.run: dict | None = None
        self._handle: IO[str] | None = None

    def _failed(self, err: OSError) -> None:
        self.errors.append(f"could not write {self.path}: {err.strerror or err}")
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
        self._handle = None

    def on_start(self, run: dict[str, Any]) -> None:
        self.run = run
        lines = _log_lines(self.history, self.evals, self.segments, self.n, run["start"])
        try:
            _write_text(self.path, "".join(json.dumps(line) + "\n" for line in lines))
            self._handle = self.path.open("a")
        except OSError as err:
            self._failed(err)
        if self.tensorboard is not None:
            try:
                self.tensorboard.on_start(run)
            except OSError as err:
                self.errors.append(f"could not write TensorBoard events: {err.strerror or err}")
                self.tensorboard = None
        self.bar.on_start(run)
        if lines:
            self.bar.on_log(lines[-1])

    def on_log(self, record: dict[str, float]) -> str | None:
        assert self.run is not None, "on_start(run) comes before on_log(record)"
        k = int(record["iteration"])
        segment = self.segments[-1]
        if k % segment["eval_every"] == 0 or k == self.n:
            evaluation = {"iteration": k, "time": record["time"], **_rng_neutral(self.exp.evaluate, self.run["state"])}
            self.evals.append(evaluation)
            line = {**record, **evaluation}
        elif k % segment["log_every"] == 0:
            line = dict(record)
        else:
            return None
        if self._handle is not None:
            try:
                self._handle.write(json.dumps(line) + "\n")
                self._handle.flush()
            except OSError as err:
                self._failed(err)
        if self.tensorboard is not None:
            try:
                self.tensorboard.on_log(line)
            except OSError as err:
                self.errors.append(f"could not write TensorBoard events: {err.strerror or err}")
                self.tensorboard = None
        self.bar.on_log(line)
        run = self.exp.config["run"]
        if not run.get("stop_patience") or k == 0 or self.evals[-1]["iteration"] != k:  # no evaluation at this record
            return None
        if "val_accuracy" not in line:
            raise ConfigError(
                "run.stop_patience stops on val_accuracy, which this problem does not report "
                "(few-shot: give problem.num_val_classes meta-validation classes)"
            )
        min_delta = float(run.get("stop_min_delta", RUN_KEYS["stop_min_delta"]))  # a config written before the key existed
        return plateau_reason(self.evals, "val_accuracy", int(run["stop_patience"]), min_delta)

    def on_end(self, result: Result | None) -> None:
        self.close()

    def close(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError as err:
                self._failed(err)
            self._handle = None
        if self.tensorboard is not None:
            try:
                self.tensorboard.on_end(None)
            except OSError as err:
                self.errors.append(f"could not write TensorBoard events: {err.strerror or err}")
            self.tensorboard = None
        self.bar.on_end(None)


def _check_tensorboard(config: dict) -> None:
    if config["run"]["tensorboard"]:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                "run.tensorboard=true needs the tensorboard package: pip install tensorboard (or run.tensorboard=false)"
            ) from None


def _first_batch(data: Any) -> Any:
    return data.batch_at(0) if data is not None else None


def _execute(exp: Experiment, run_dir: Path, start: dict, progress: bool, label: str | None) -> tuple[dict, DivergenceError | None]:
    """One :func:`solve` call from ``start`` (fresh or from a checkpoint); the summary,
    and the :class:`DivergenceError` if the run diverged."""
    config, run = exp.config, exp.config["run"]
    n = int(run["max_iters"])
    state, history, evals = start["state"], list(start["history"]), start["evals"]
    segments = list(start["segments"])
    cadence = {"log_every": int(run["log_every"]), "eval_every": int(run["eval_every"])}
    if not segments or any(segments[-1].get(key) != value for key, value in cadence.items()):
        segments.append({"start": int(state.k), **cadence})
    stochastic = config["problem"]["kind"] == "stochastic"
    shown = ("upper_loss", "suboptimality", "test_error") if stochastic else ("upper_loss", "test_accuracy")
    bar = ProgressBar(keys=shown, desc=label or config["method"]["name"], disable=not progress)
    tensorboard = TensorBoardLogger(run_dir / "tensorboard") if run["tensorboard"] else None
    recorder = _Recorder(exp, run_dir, history, evals, segments, bar, tensorboard)
    meta = {"config": exp.config, "config_name": config.get("name"), "max_iters": n, "evals": evals, "segments": segments}
    payload = {
        "state": state,
        "history": history,
        "rng": start["rng"],
        "meta": {**start.get("meta", {}), "wall_time": float(start["wall_time"])},
    }
    error: DivergenceError | None = None
    with warnings.catch_warnings():
        # reported once, in the summary and by the CLI's exit status 3
        warnings.simplefilter("ignore", CheckpointWriteWarning)
        try:
            result = solve(
                exp.problem,
                exp.method,
                data=exp.data,
                max_iters=n,
                callbacks=[recorder, AutoStepReporter()],  # prints auto steps (none for given steps)
                log_every=math.gcd(cadence["log_every"], cadence["eval_every"]),
                checkpoint=run_dir / "checkpoint.pt",
                checkpoint_every=int(run["checkpoint_every"]),
                resume=payload,
                validate=False,
                meta=meta,
            )
        except DivergenceError as err:
            if err.result is None:
                raise
            result, error = err.result, err
        finally:
            recorder.close()
    state = result.state
    if result.status is not Status.DIVERGED and (not evals or evals[-1]["iteration"] != state.k):
        # stopped between two evaluations (Ctrl-C): the summary reports the final state
        evals.append({"iteration": state.k, "time": result.wall_time, **_rng_neutral(exp.evaluate, state)})
    errors = list(recorder.errors)
    if errors:
        # the history holds every record: one more try to leave a complete log behind
        try:
            _write_text(recorder.path, "".join(json.dumps(line) + "\n" for line in _log_lines(result.history, evals, segments, n, state.k)))
            errors = [e for e in errors if not e.startswith(f"could not write {recorder.path}")]
        except OSError:
            pass
    if result.checkpoint_error:
        errors.append(result.checkpoint_error)
    final = next((e for e in reversed(evals) if e["iteration"] <= state.k), evals[-1])
    summary = {
        "name": config.get("name"),
        "method": config["method"]["name"],
        "status": result.status.value,
        "message": result.message,
        "iterations": state.k,
        "max_iters": n,
        "time": result.wall_time,
        "total_seconds": time.perf_counter() - start["started"] + float(start.get("total_seconds", 0.0)),
        "metrics": {k: v for k, v in final.items() if k not in ("iteration", "time")},
        "metrics_iteration": final["iteration"],
        "final_record": result.history[-1] if result.history else {},
        "seed": config["run"]["seed"],
    }
    if result.status is Status.DIVERGED:
        summary["diverged_at"] = int(getattr(error, "iteration", None) or state.k)
        summary["quantity"] = getattr(error, "quantity", None)
    if errors:
        summary["write_errors"] = errors
    return summary, error


def _finish(run_dir: Path, summary: dict, baseline: dict, error: DivergenceError | None, on_divergence: str) -> dict:
    """Write summary.json (a failed write is reported in the summary, which is returned
    all the same), then raise the divergence if asked to."""
    summary["baseline"] = baseline
    summary["run_dir"] = str(run_dir)
    try:
        _write_json(run_dir / "summary.json", summary)
    except OSError as err:
        summary.setdefault("write_errors", []).append(f"could not write {run_dir / 'summary.json'}: {err.strerror or err}")
        summary["summary_written"] = False
    if error is not None and on_divergence == "raise":
        raise error
    return summary


def _begin_run_dir(output: OutputDir, config: dict) -> None:
    """The first writes of a fresh run: old bilevel files out, manifest, config, environment."""
    output.clear()
    write_manifest(output.path, {"kind": "run", "files": list(RUN_FILES)})
    _write_text(output.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    _write_json(output.path / "env.json", _environment(config))


def run_experiment(
    config: dict | ResolvedConfig,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    progress: bool = True,
    runs_root: str | Path = "runs",
    *,
    overwrite: bool = False,
    on_divergence: str = "raise",
    label: str | None = None,
    before_write: Callable[[], None] | None = None,
) -> dict:
    """Run a configuration (plus ``section.key=value`` overrides) into a run directory.

    Args:
        config: a configuration dict (:func:`~bilevel.experiments.load_config`), or one
            resolved already (:class:`~bilevel.experiments.config.ResolvedConfig`, not
            resolved again when there are no overrides).
        out: the run directory (default :func:`default_run_dir` under ``runs_root``). It
            must be new or empty, else :class:`RunDirError`.
        overrides: ``section.key=value`` strings.
        progress: show a progress bar (also needs ``run.progress``).
        overwrite: allow a non-empty ``out``: the files bilevel wrote there before are
            removed once the new run is about to start; other files are kept, and one
            that is in the way (e.g. a hand-written ``config.yaml``) is refused.
        on_divergence: ``"raise"`` (:class:`~bilevel.solve.DivergenceError` after writing
            summary.json) or ``"status"`` (return the summary with status ``diverged``
            and ``diverged_at``).
        label: the progress bar's label (default: the method's name).
        before_write: called right before the first write into ``out`` (a bench clears
            its folder there, so a run that fails to start leaves it untouched).

    Returns:
        the summary (also written to ``summary.json``), with ``run_dir`` added, and
        ``write_errors`` when a log, checkpoint or summary write failed (the run itself
        finished: its result is in the summary).
    """
    started = time.perf_counter()
    if on_divergence not in ("raise", "status"):
        raise ValueError(f"on_divergence={on_divergence!r} must be 'raise' or 'status'")
    if not (isinstance(config, ResolvedConfig) and not overrides):  # resolved once, here
        config = resolve(apply_overrides(config.data if isinstance(config, ResolvedConfig) else config, overrides))
    run_dir = Path(out) if out is not None else default_run_dir(config.data, runs_root)
    output = OutputDir.inspect(run_dir, "run", overwrite, (*RUN_FILES, MANIFEST))
    exp = build_experiment(config)
    _check_tensorboard(exp.config)
    try:
        output.prepare()
        state = exp.method.init(exp.problem, None, None, _first_batch(exp.data), validate=True)
        output.check_space(_bytes_needed(state, exp.config))
        rng = capture_rng()
        evals = [{"iteration": 0, "time": 0.0, **_rng_neutral(exp.evaluate, state)}]
        baseline = _rng_neutral(exp.baseline)
    except BaseException:
        output.undo()
        raise
    if before_write is not None:
        before_write()
    _begin_run_dir(output, exp.config)
    start = {"state": state, "history": [], "evals": evals, "segments": [], "rng": rng, "meta": {}, "wall_time": 0.0, "started": started}
    summary, error = _execute(exp, run_dir, start, progress and exp.config["run"]["progress"], label)
    return _finish(run_dir, summary, baseline, error, on_divergence)


def data_dir_override(data_dir: str | Path) -> str:
    """The override ``problem.data_dir=DIR`` for any path (quoted, so YAML reads it as a string)."""
    return f"problem.data_dir={json.dumps(str(data_dir))}"


def _load_resumable(
    run_dir: Path, max_iters: int | None, data_dir: str | Path | None
) -> tuple[Path, str, dict, ResolvedConfig, dict | None]:
    """The checks of :func:`resume_run` that read the folder and change nothing: ``(config.yaml's
    path, its text, the checkpoint's payload, the resolved configuration, the manifest)``."""
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a run directory: there is no such folder (give the folder a `bilevel run` wrote)")
    manifest = read_manifest(run_dir)
    if manifest is not None and manifest["kind"] == "bench":
        raise RunDirError(f"{run_dir} is a bench folder, not a run directory: resume it with resume_bench (`bilevel resume {run_dir}`)")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise RunDirError(f"{run_dir} is not a run directory: it has no config.yaml (give the folder a `bilevel run` wrote)")
    payload = load_checkpoint(run_dir / "checkpoint.pt")
    text = config_path.read_text()
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{config_path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path} must hold a mapping with sections problem, method, run")
    config = copy.deepcopy(config)
    if max_iters is not None:
        config.setdefault("run", {})["max_iters"] = max_iters
    if data_dir is not None:
        config.setdefault("problem", {})["data_dir"] = str(data_dir)
    resolved = resolve(config)
    meta = dict(payload.get("meta") or {})
    saved = meta.get("config")
    if isinstance(saved, dict):
        differences = config_differences(saved, resolved.data)
        if differences:
            shown = "; ".join(differences[:6]) + ("; ..." if len(differences) > 6 else "")
            raise CheckpointError(
                f"{config_path} differs from the configuration its checkpoint was made with ({shown}): resuming would "
                f"continue that state under another configuration. Restore these values, or start a new run with `bilevel run` "
                f"(a resume may change only {', '.join(k for k in RESUMABLE_CHANGES if k not in ('name', 'description', 'methods'))})"
            )
    return config_path, text, payload, resolved, manifest


def resume_run(
    run_dir: str | Path,
    max_iters: int | None = None,
    progress: bool = True,
    *,
    data_dir: str | Path | None = None,
    on_divergence: str = "raise",
    label: str | None = None,
) -> dict:
    """Continue a stopped run from ``RUN_DIR/checkpoint.pt`` (optionally to a new ``max_iters``).

    The configuration is read from ``RUN_DIR/config.yaml`` and compared with the one the
    checkpoint was made with: a difference outside :data:`RESUMABLE_CHANGES` (another
    method, method field, data, model, dtype or seed) raises
    :class:`~bilevel.checkpoint.CheckpointError` listing the keys, since the saved state
    would continue under a configuration that did not produce it. Nothing in the folder
    changes until every check passed; then ``log.jsonl`` is rebuilt from the checkpoint
    and extended, ``summary.json`` rewritten.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    config_path, text, payload, resolved, manifest = _load_resumable(run_dir, max_iters, data_dir)
    meta = dict(payload.get("meta") or {})
    exp = build_experiment(resolved)
    _check_tensorboard(exp.config)
    state = payload["state"]
    n = int(exp.config["run"]["max_iters"])
    if state.k > n:
        raise ConfigError(f"the checkpoint is at iteration {state.k}, beyond max_iters={n}: give a larger --max-iters")
    output = OutputDir(run_dir, "run")
    output.prepare()
    output.check_space(_bytes_needed(state, exp.config))
    wall_time = float(meta.get("wall_time", 0.0))
    evals = list(meta.get("evals") or [])
    if (state.k % int(exp.config["run"]["eval_every"]) == 0 or state.k == n) and not any(e["iteration"] == state.k for e in evals):
        evals.append({"iteration": state.k, "time": wall_time, **_rng_neutral(exp.evaluate, state)})
    previous = _read_json(run_dir / "summary.json")
    previous = previous if isinstance(previous, dict) else {}
    baseline = previous.get("baseline") or _rng_neutral(exp.baseline)
    # every check passed: from here on the folder changes
    new_text = yaml.safe_dump(exp.config, sort_keys=False)
    if new_text != text:
        _write_text(config_path, new_text)
    if manifest is None:
        write_manifest(run_dir, {"kind": "run", "files": list(RUN_FILES)})
    start = {
        "state": state,
        "history": list(payload["history"]),
        "evals": evals,
        "segments": list(meta.get("segments") or []),
        "rng": payload["rng"],
        "meta": {k: v for k, v in meta.items() if k not in ("evals", "segments", "config")},
        "wall_time": wall_time,
        "started": started,
        "total_seconds": float(previous.get("total_seconds", 0.0)),
    }
    summary, error = _execute(exp, run_dir, start, progress and exp.config["run"]["progress"], label)
    return _finish(run_dir, summary, baseline, error, on_divergence)


def check_resume(folder: str | Path, nproc: int, max_iters: int | None = None, *, data_dir: str | Path | None = None) -> None:
    """The checks ``bilevel resume FOLDER --nproc N`` makes before it starts any process, so
    that a bad request is one line, not one per process: the configuration of every
    checkpoint left to resume against the one it was made with (:func:`resume_run`'s
    check), and the data split into ``nproc`` equal shards
    (:func:`bilevel.distributed.check_shards`). Changes nothing."""
    from ..distributed import check_shards

    folder = Path(folder)
    manifest = read_manifest(folder) if folder.is_dir() else None
    resolved: ResolvedConfig | None = None
    if manifest is not None and manifest["kind"] == "bench":
        if max_iters is not None:
            raise ConfigError("--max-iters applies to a run directory; a bench resumes with the iterations it was started with")
        overrides = list(manifest["overrides"]) + ([data_dir_override(data_dir)] if data_dir is not None else [])
        for entry in manifest["runs"]:
            if entry["status"] in FINISHED:
                continue
            run_dir = folder / entry["dir"]
            if (
                entry["status"] in ("interrupted", "running")
                and (run_dir / "checkpoint.pt").is_file()
                and (run_dir / "config.yaml").is_file()
            ):
                loaded = _load_resumable(run_dir, None, data_dir)[3]
            else:
                loaded = resolve(apply_overrides(manifest["base_config"], _run_overrides(overrides, entry)))
            resolved = resolved or loaded
        if resolved is None:
            return  # every run finished: the resume only rebuilds the table
    else:
        resolved = _load_resumable(folder, max_iters, data_dir)[3]
    check_processes(resolved, nproc)
    exp = build_experiment(resolved)  # the runs of a bench share their problem section: one split to check
    check_shards(exp.problem, exp.data, nproc)


def read_log(run_dir: str | Path) -> list[dict]:
    """The records of ``RUN_DIR/log.jsonl``."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no log.jsonl: give a run directory written by `bilevel run`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------
# benches: methods × seeds into one folder, with a manifest to resume them
# --------------------------------------------------------------------------------------

#: run statuses after which a bench does not run a method × seed again.
FINISHED = ("max_iters", "converged", "max_time", "stopped", "diverged")
#: statuses whose metrics enter a bench's means (a diverged or interrupted run does not).
COMPLETED = ("max_iters", "converged", "max_time", "stopped")


def _mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    kept = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not kept:
        return math.nan, math.nan, 0
    mean = sum(kept) / len(kept)
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / len(kept)) if len(kept) > 1 else 0.0
    return mean, std, len(kept)


def _pm(values: Sequence[float | None], digits: int) -> str:
    """``mean ± std`` over seeds; one value alone is printed as it is (no ``± 0.00``)."""
    mean, std, count = _mean_std(values)
    if count == 0:
        return "-"
    if count == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _status_note(summary: dict) -> str:
    status = summary.get("status")
    if status == "diverged":
        return f"diverged at iteration {summary.get('diverged_at', summary.get('iterations'))}"
    if status == "interrupted":
        return f"interrupted at iteration {summary.get('iterations')} of {summary.get('max_iters')}"
    return str(status)


def format_bench_table(
    rows: dict,
    kind: str,
    baseline: Sequence[dict] | None = None,
    notes: dict | None = None,
    strong: Sequence[dict] | None = None,
    retrained: dict | None = None,
) -> str:
    """Markdown table of a bench: one row per method, mean ± std over its completed seeds.

    ``retrained`` (hyper-cleaning: method -> the test accuracies of a fresh classifier
    retrained with each completed run's learned weights, :func:`retrained_accuracy`) adds a
    column "retrained acc (%)" after "iterations" (the baselines' cells repeat their test
    accuracy there: they are trained that way already).

    Runs that diverged or were interrupted do not enter the means (a 37-iteration run
    averaged with 200-iteration ones would mean nothing); they are named in a last
    ``notes`` column ("seed 1: diverged at iteration 37"), together with ``notes``
    (method -> list of strings, e.g. runs not started). The column appears only when a
    row has a note.

    ``kind="stochastic"`` (benchopt's problems) gives another table: per method the final
    ``suboptimality`` or ``test_error``, the step time and the samples seen, each the median
    over the completed seeds with the lowest and highest in brackets; there are no baselines.
    """
    notes = notes or {}
    if kind == "stochastic":
        return _stochastic_table(rows, notes)
    second_key = "f1" if kind == "hyperclean" else "test_ci95"
    second_digits = 3 if kind == "hyperclean" else 2
    body, any_note = [], False
    for method in list(rows) + [m for m in notes if m not in rows]:
        summaries = rows.get(method, [])
        done = [s for s in summaries if s.get("status", "max_iters") in COMPLETED]
        row_notes = [f"seed {s.get('seed')}: {_status_note(s)}" for s in summaries if s not in done] + list(notes.get(method, []))
        any_note = any_note or bool(row_notes)
        acc = [s["metrics"].get("test_accuracy") for s in done]
        second = [s["metrics"].get(second_key) for s in done]
        times = [s["time"] for s in done]
        iters = sorted({s["iterations"] for s in done})
        cells = [method, _pm(acc, 2), _pm(second, second_digits), _pm(times, 1), ",".join(map(str, iters)) or "-"]
        if retrained is not None:
            cells.append(_pm(list(retrained.get(method, [])), 2))
        body.append((cells, "; ".join(row_notes)))
    if kind == "hyperclean":
        header = ["method", "test acc (%)", "F1", "time (s)", "iterations"]
    else:
        header = ["method", "meta-test acc (%)", "95% CI (%)", "time (s)", "iterations"]
    extra = 0
    if retrained is not None:
        header.append("retrained acc (%)")
        extra = 1
    # the non-bilevel baselines (one dict per seed: name -> row), mean ± std over seeds
    for name in dict.fromkeys(key for per_seed in strong or () for key in per_seed):
        values = [per_seed[name]["test_accuracy"] for per_seed in strong or () if name in per_seed]
        description = next(per_seed[name]["description"] for per_seed in strong or () if name in per_seed)
        second = [per_seed[name].get(second_key) for per_seed in strong or () if name in per_seed]
        second_cell = _pm(second, second_digits) if any(v is not None for v in second) else "-"
        body.append(([f"baseline: {description}", _pm(values, 2), second_cell, "-", "-"] + [_pm(values, 2)] * extra, ""))
    if baseline:
        label = "no cleaning (x = 0, fixed step count)" if kind == "hyperclean" else "random features"
        cells = [
            label,
            _pm([b.get("test_accuracy") for b in baseline], 2),
            _pm([b.get(second_key) for b in baseline], second_digits),
            "-",
            "-",
        ] + ["-"] * extra
        body.append((cells, ""))
    if any_note:
        header.append("notes")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cells, note in body:
        lines.append("| " + " | ".join(cells + ([note] if any_note else [])) + " |")
    return "\n".join(lines)


def stochastic_metric(summary: dict) -> str:
    """The headline metric of a stochastic benchmark run: ``suboptimality`` (‖∇F(x)‖²) when
    its summary has it, else ``test_error``."""
    return "suboptimality" if "suboptimality" in summary.get("metrics", {}) else "test_error"


def _bench_metric(rows: dict) -> str:
    """The headline metric of a stochastic bench: the first run summary with metrics decides."""
    return next((stochastic_metric(s) for summaries in rows.values() for s in summaries if s.get("metrics")), "suboptimality")


def _median_band(values: Sequence[float | None], fmt: str) -> str:
    """``median [min, max]`` over seeds; one value alone is printed as it is."""
    kept = sorted(float(v) for v in values if v is not None and not math.isnan(float(v)))
    if not kept:
        return "-"
    median = float(np.median(kept))
    if len(kept) == 1:
        return format(median, fmt)
    return f"{format(median, fmt)} [{format(kept[0], fmt)}, {format(kept[-1], fmt)}]"


def _stochastic_table(rows: dict, notes: dict) -> str:
    """The bench table of ``problem.kind: stochastic``: per method the final metric
    (``suboptimality`` or ``test_error``), the step time and the samples seen, each as the
    median over the completed seeds with the lowest and highest seed in brackets."""
    body, any_note = [], False
    metric = _bench_metric(rows)
    for method in list(rows) + [m for m in notes if m not in rows]:
        summaries = rows.get(method, [])
        done = [s for s in summaries if s.get("status", "max_iters") in COMPLETED]
        row_notes = [f"seed {s.get('seed')}: {_status_note(s)}" for s in summaries if s not in done] + list(notes.get(method, []))
        any_note = any_note or bool(row_notes)
        cells = [
            method,
            _median_band([s["metrics"].get(metric) for s in done], ".3e" if metric == "suboptimality" else ".4f"),
            _median_band([s["time"] for s in done], ".2f"),
            _median_band([s["metrics"].get("samples") for s in done], ",.0f"),
            ",".join(map(str, sorted({s["iterations"] for s in done}))) or "-",
        ]
        body.append((cells, "; ".join(row_notes)))
    what = "‖∇F(x)‖²" if metric == "suboptimality" else "test error"
    header = [
        "method",
        f"final {what}: median [min, max]",
        "time (s): median [min, max]",
        "samples seen: median [min, max]",
        "iterations",
    ]
    if any_note:
        header.append("notes")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells + ([note] if any_note else [])) + " |" for cells, note in body]
    return "\n".join(lines)


def _bench_dir(name: str) -> Path:
    return _fresh_path(Path("runs") / f"bench-{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def run_bench(
    config: dict | str | Path,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    progress: bool = True,
    *,
    overwrite: bool = False,
) -> dict:
    """Run ``methods × seeds`` into ``out``: one run directory each, ``table.md``,
    ``bench.json``, plots, and ``manifest.json`` (the plan and each run's status).

    Ctrl-C checkpoints the running method, marks it interrupted, stops the bench and
    still writes the table of what finished (``result["interrupted"]``); a diverged run
    is marked in the table and the bench goes on. :func:`resume_bench` finishes what is
    left. ``out`` must be new or empty unless ``overwrite`` (see :class:`OutputDir`).

    Returns:
        ``{"table", "plots", "out", "interrupted", "diverged", "write_errors", "runs"}``.
    """
    from .config import load_config

    base = load_config(config) if not isinstance(config, dict) else copy.deepcopy(config)
    if methods is None:
        methods = list(base.get("methods") or [_method_name(apply_overrides(base, overrides))])
    methods, seeds = list(methods), [int(s) for s in seeds]
    named: tuple[tuple[str, list[Any]], ...] = (("methods", methods), ("seeds", seeds))
    for what, values in named:
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(f"--{what} names {', '.join(repeated)} more than once: give each once")
    out_dir = Path(out) if out is not None else _bench_dir(str(base.get("name", "bench")))
    runs: list[dict[str, Any]] = [{"method": m, "seed": s, "dir": f"{m}-seed{s}", "status": "pending"} for m in methods for s in seeds]
    # every run's configuration, resolved once before anything runs (a bad one fails the bench now)
    configs = {r["dir"]: resolve(apply_overrides(base, _run_overrides(overrides, r))) for r in runs}
    resolved = configs[runs[0]["dir"]].data
    output = OutputDir.inspect(out_dir, "bench", overwrite, (*BENCH_FILES, MANIFEST, *(r["dir"] for r in runs)))
    manifest = {
        "kind": "bench",
        "config": base.get("name"),
        "base_config": base,
        "problem_kind": resolved["problem"]["kind"],
        "methods": methods,
        "seeds": seeds,
        "overrides": list(overrides),
        "runs": runs,
        "files": list(BENCH_FILES),
    }
    output.prepare()
    return _bench_loop(output, manifest, progress, committed=False, configs=configs)


def resume_bench(out: str | Path, progress: bool = True, *, data_dir: str | Path | None = None) -> dict:
    """Finish a bench from its ``manifest.json``: resume the interrupted runs from their
    checkpoints, start the ones never started, keep the finished ones, and rebuild
    ``table.md``, ``bench.json`` and the plots. Same result as :func:`run_bench`."""
    out = Path(out)
    manifest = read_manifest(out)
    if manifest is None or manifest["kind"] != "bench":
        raise RunDirError(f"{out} is not a bench folder: it has no bench manifest.json (give the --out folder of a `bilevel bench`)")
    output = OutputDir(out, "bench")
    output.prepare()
    return _bench_loop(output, manifest, progress, committed=True, data_dir=data_dir)


def _method_name(config: dict) -> str:
    section = config.get("method") or {}
    return str(section if isinstance(section, str) else section.get("name", ""))


def _run_overrides(overrides: Sequence[str], entry: dict) -> list[str]:
    """The overrides of one run of a bench: the bench's, then its method and seed."""
    return [*overrides, f"method.name={entry['method']}", f"run.seed={entry['seed']}"]


def _bench_loop(
    output: OutputDir,
    manifest: dict,
    progress: bool,
    committed: bool,
    data_dir: str | Path | None = None,
    configs: dict | None = None,
) -> dict:
    out, runs = output.path, manifest["runs"]
    base = manifest["base_config"]
    overrides = list(manifest["overrides"]) + ([data_dir_override(data_dir)] if data_dir is not None else [])
    interrupted = False

    def commit() -> None:
        # the first write into the bench folder: only now is an old bench (--overwrite) removed
        nonlocal committed
        if not committed:
            output.clear()
            write_manifest(out, manifest)
            committed = True

    try:
        for i, entry in enumerate(runs):
            if entry["status"] in FINISHED:
                continue
            run_dir = out / entry["dir"]
            label = f"{entry['method']} seed {entry['seed']} ({i + 1}/{len(runs)})"
            previous = entry["status"]

            def started() -> None:
                commit()
                entry["status"] = "running"  # noqa: B023 -- called only within this iteration, before the loop moves on
                write_manifest(out, manifest)

            try:
                if previous in ("interrupted", "running") and (run_dir / "checkpoint.pt").is_file() and (run_dir / "config.yaml").is_file():
                    started()
                    summary = resume_run(run_dir, progress=progress, data_dir=data_dir, on_divergence="status", label=label)
                else:
                    resolved = (configs or {}).get(entry["dir"]) or resolve(apply_overrides(base, _run_overrides(overrides, entry)))
                    summary = run_experiment(
                        resolved,
                        run_dir,
                        progress=progress,
                        overwrite=True,
                        on_divergence="status",
                        label=label,
                        before_write=started,
                    )
            except KeyboardInterrupt:
                entry["status"] = "interrupted" if entry["status"] == "running" else previous
                interrupted = True
                break
            entry.update(status=summary["status"], iterations=summary["iterations"], message=summary["message"])
            write_manifest(out, manifest)
            if summary["status"] == "interrupted":
                interrupted = True
                break
    except BaseException:
        if committed:
            with contextlib.suppress(OSError):
                write_manifest(out, manifest)
        else:
            output.undo()
        raise
    if not committed:
        if interrupted:
            # stopped before anything was written: the folder is as it was
            output.undo()
            raise KeyboardInterrupt
        commit()
    return {**_bench_report(out, manifest, configs, interrupted), "interrupted": interrupted}


def _baselines_file(seed: int) -> str:
    return f"baselines-seed{seed}.json"


def _strong_baselines(out: Path, manifest: dict, write_errors: list[str], configs: dict | None = None, compute: bool = True) -> list[dict]:
    """The non-bilevel baselines of each seed that has a completed run, computed once per
    seed and kept in ``baselines-seed<s>.json`` (a resumed bench reads them back);
    ``configs`` are the runs' resolved configurations when the bench has them already.
    ``compute=False`` (a bench stopped by Ctrl-C, which should exit at once) uses only the
    kept ones; the resumed bench computes the others."""
    done = {e["seed"] for e in manifest["runs"] if e["status"] in COMPLETED}
    overrides = list(manifest["overrides"])
    result = []
    for seed in manifest["seeds"]:
        if seed not in done:
            continue
        path = out / _baselines_file(seed)
        cached = _read_json(path) if path.is_file() else None
        if not isinstance(cached, dict):
            if not compute:
                continue
            entry = next(e for e in manifest["runs"] if e["seed"] == seed)
            config = (configs or {}).get(entry["dir"]) or resolve(
                apply_overrides(manifest["base_config"], _run_overrides(overrides, entry))
            )
            cached = strong_baselines(config)
            if _baselines_file(seed) not in manifest["files"]:
                manifest["files"].append(_baselines_file(seed))
                write_manifest(out, manifest)
            try:
                _write_json(path, cached)
            except OSError as err:
                write_errors.append(f"could not write {path}: {err.strerror or err}")
        result.append(cached)
    return result


def _entry_config(manifest: dict, entry: dict, configs: dict | None) -> ResolvedConfig:
    """A bench run's resolved configuration (the one the bench holds, or rebuilt from the manifest)."""
    known = (configs or {}).get(entry["dir"])
    if isinstance(known, ResolvedConfig):
        return known
    return resolve(apply_overrides(manifest["base_config"], _run_overrides(list(manifest["overrides"]), entry)))


def _cached_json(out: Path, manifest: dict, name: str, write_errors: list[str], compute: Callable[[], dict]) -> dict:
    """``out/name`` read back, or ``compute()`` written there (and listed in the manifest's files)."""
    path = out / name
    if name not in manifest["files"]:
        manifest["files"].append(name)
        write_manifest(out, manifest)
    value = compute()
    try:
        _write_json(path, value)
    except OSError as err:
        write_errors.append(f"could not write {path}: {err.strerror or err}")
    return value


def _retrained(
    out: Path, manifest: dict, write_errors: list[str], configs: dict | None = None, compute: bool = True
) -> dict[str, list[float]]:
    """Method -> the retrained test accuracies of its completed runs (:func:`retrained_accuracy`),
    computed once per run and kept in ``retrained-<run>.json`` (recomputed when the run has
    gone on since: a resumed bench to more iterations). ``compute=False`` (Ctrl-C) uses only
    the kept ones."""
    result: dict[str, list[float]] = {}
    for entry in manifest["runs"]:
        if entry["status"] not in COMPLETED:
            continue
        name = f"retrained-{entry['dir']}.json"
        cached = _read_json(out / name) if (out / name).is_file() else None
        if not isinstance(cached, dict) or cached.get("iterations") != entry.get("iterations"):
            if not compute or not (out / entry["dir"] / "checkpoint.pt").is_file():
                continue
            config = _entry_config(manifest, entry, configs)
            cached = _cached_json(out, manifest, name, write_errors, functools.partial(retrained_accuracy, config, out / entry["dir"]))
        result.setdefault(entry["method"], []).append(float(cached["test_accuracy"]))
    return result


def _raw_pixel_row(config: ResolvedConfig) -> dict:
    from .baselines import fewshot_raw_pixel_baseline

    return {"raw_pixels": _rng_neutral(fewshot_raw_pixel_baseline, config.data)}


def _raw_pixels(out: Path, manifest: dict, write_errors: list[str], configs: dict | None = None, compute: bool = True) -> list[dict]:
    """The few-shot raw-pixel baseline of each seed (class split) that has a completed run
    (:func:`bilevel.experiments.baselines.fewshot_raw_pixel_baseline`: the same held-out
    tasks, normalisation and ridge heads on the flattened pixels), kept in
    ``baselines-raw-pixels-seed<s>.json``."""
    result = []
    for seed in manifest["seeds"]:
        done = [e for e in manifest["runs"] if e["seed"] == seed and e["status"] in COMPLETED]
        name = f"baselines-raw-pixels-seed{seed}.json"
        cached = _read_json(out / name) if (out / name).is_file() else None
        if not isinstance(cached, dict):
            if not compute or not done:
                continue
            config = _entry_config(manifest, done[0], configs)
            cached = _cached_json(out, manifest, name, write_errors, functools.partial(_raw_pixel_row, config))
        result.append(cached)
    return result


def _bench_report(out: Path, manifest: dict, configs: dict | None = None, interrupted: bool = False) -> dict:
    """Table, bench.json and plots from the run directories' summaries and logs."""
    from ..plotting import plot_runs

    kind, methods = manifest["problem_kind"], manifest["methods"]
    rows: dict = {m: [] for m in methods}
    notes: dict = {}
    baselines: dict = {}
    logs: dict = {}
    write_errors: list[str] = []
    for entry in manifest["runs"]:
        summary = _read_json(out / entry["dir"] / "summary.json") if entry["status"] != "pending" else None
        if not isinstance(summary, dict) or summary.get("status") != entry["status"]:
            what = {"pending": "not run", "running": "stopped while running (no summary)"}.get(
                entry["status"], f"{entry['status']} (no summary)"
            )
            notes.setdefault(entry["method"], []).append(f"seed {entry['seed']}: {what}")
            continue
        rows[entry["method"]].append(summary)
        write_errors += [f"{entry['dir']}: {e}" for e in summary.get("write_errors", [])]
        if summary.get("baseline") and entry["seed"] not in baselines:
            baselines[entry["seed"]] = summary["baseline"]
        if summary["status"] in COMPLETED:
            with contextlib.suppress(RunDirError, ValueError):
                logs.setdefault(entry["method"], []).append(read_log(out / entry["dir"]))
    baseline = [baselines[s] for s in manifest["seeds"] if s in baselines]
    retrained = None
    strong: list[dict] = []
    if kind == "hyperclean":
        strong = _strong_baselines(out, manifest, write_errors, configs, compute=not interrupted)
        retrained = _retrained(out, manifest, write_errors, configs, compute=not interrupted)
    elif kind == "fewshot":
        strong = _raw_pixels(out, manifest, write_errors, configs, compute=not interrupted)
    # a stochastic benchmark has no baseline: the methods are compared with each other on one problem
    table = format_bench_table(rows, kind, baseline or None, notes, strong, retrained)
    figures: list[tuple[str, str, dict]] = [("test_accuracy", "test_accuracy", {})]
    if kind == "hyperclean":
        figures.append(("f1", "f1", {}))
    if kind == "stochastic":
        metric = _bench_metric(rows)
        yscale = "log" if metric == "suboptimality" else "linear"
        figures = [(metric, f"{metric}-{x}", {"x": x, "center": "median", "yscale": yscale}) for x in ("time", "samples")]
    plots: list[Path] = []
    for metric, stem, options in figures:
        band = ", median and min-max band over seeds" if options.get("center") == "median" else ""
        try:
            plots += plot_runs(logs, metric, out / stem, formats=("png", "svg"), title=f"{manifest['config']}: {metric}{band}", **options)
        except ValueError:
            pass  # no completed run holds this metric yet
        except OSError as err:
            write_errors.append(f"could not write the {stem} plot in {out}: {err.strerror or err}")
    diverged = [
        f"{e['method']} seed {e['seed']} at iteration {(_read_json(out / e['dir'] / 'summary.json') or {}).get('diverged_at', '?')}"
        for e in manifest["runs"]
        if e["status"] == "diverged"
    ]
    unfinished = [e["dir"] for e in manifest["runs"] if e["status"] not in FINISHED]
    payload = {
        "config": manifest["config"],
        "methods": methods,
        "seeds": manifest["seeds"],
        "overrides": manifest["overrides"],
        "complete": not unfinished,
        "status": {e["dir"]: e["status"] for e in manifest["runs"]},
        "runs": rows,
        "baselines": {"fixed_step_no_cleaning": baseline, "validated": strong},
        "retrained_test_accuracy": retrained,
        "table": table,
        "plots": [str(p) for p in plots],
    }
    for name, text in (("table.md", table + "\n"), ("bench.json", json.dumps(payload, indent=2, default=str) + "\n")):
        try:
            _write_text(out / name, text)
        except OSError as err:
            write_errors.append(f"could not write {out / name}: {err.strerror or err}")
    return {
        "table": table,
        "plots": plots,
        "out": out,
        "diverged": diverged,
        "unfinished": unfinished,
        "write_errors": write_errors,
        "runs": manifest["runs"],
    }
