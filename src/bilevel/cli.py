"""The ``bilevel`` command line: run, bench, plot, resume, data, list.

    bilevel run CONFIG_OR_NAME [section.key=value ...] [--out DIR] [--overwrite] [--data-dir DIR]
    bilevel bench CONFIG_OR_NAME [--methods GALET,CG] [--seeds 0,1,2] [section.key=value ...] [--out DIR] [--overwrite] [--data-dir DIR]
    bilevel plot RUN_DIR [RUN_DIR ...] --metric test_accuracy --out FILE [--x both|iteration|time|samples] [--center mean|median]
                 [--by-method] [--ylim LOW,HIGH] [--log-y]
    bilevel resume RUN_DIR|BENCH_DIR [--max-iters N] [--data-dir DIR] [--nproc N]
    bilevel check CONFIG_OR_NAME [--methods GALET,CG] [--warmup N] [section.key=value ...] [--data-dir DIR]
    bilevel data [--data-dir DIR]
    bilevel list

CONFIG_OR_NAME is a YAML file or the name of a built-in configuration (``bilevel list``).
Every error prints one line ``bilevel: ...`` on stderr. Exit status (docs/experiments.md):

    0    done
    1    a run diverged (a bench: after finishing the others and printing the table);
         ``check``: a method's hypergradient failed the check (docs/check.md)
    2    bad input or configuration: unknown config, bad override, missing dataset,
         a checkpoint that does not match, an output folder that is not empty
    3    environment: an output folder that cannot be written, disk full, out of memory,
         a missing optional package; a run that finished but whose files could not all be
         written prints its summary first
    4    an unexpected error (a bug in bilevel): the traceback is printed
    130  interrupted (Ctrl-C): the running method was checkpointed; ``bilevel resume`` continues

Example:
    >>> from bilevel.cli import main
    >>> main(["list"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from .experiments.runner import format_bench_table

__all__ = [
    "EXIT_DIVERGED",
    "EXIT_ENVIRONMENT",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "bench",
    "build_parser",
    "format_bench_table",
    "main",
]

EXIT_OK = 0
EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERNAL = 4
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """An error in the command line itself, reported as one line (exit status 2)."""


_OVERRIDES_HELP = "optional overrides of the configuration, e.g. run.max_iters=500 method.name=CG"
_DATA_DIR_HELP = "directory searched first for datasets (the same as problem.data_dir=DIR)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bilevel",
        description="Bilevel optimization experiments (hyper-cleaning, few-shot, stochastic benchmarks).",
        epilog="exit status: 0 done, 1 diverged, 2 bad input or configuration, 3 environment (I/O, disk, memory), 130 interrupted",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # nargs="*" positionals need default=[]: without it argparse reports them as required
    p = sub.add_parser("run", help="run one experiment into a run directory")
    p.add_argument("config", metavar="CONFIG_OR_NAME", help="a YAML file or a built-in configuration (bilevel list)")
    p.add_argument("overrides", nargs="*", default=[], metavar="section.key=value", help=_OVERRIDES_HELP)
    p.add_argument("--out", default=None, help="run directory, new or empty (default runs/<name>-<method>-<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out: remove the files bilevel wrote there (only those)")
    p.add_argument("--data-dir", default=None, help=_DATA_DIR_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc", type=int, default=1, help="data-parallel processes on this machine, launched with torchrun (docs/distributed.md)"
    )

    p = sub.add_parser("bench", help="run several methods × seeds, print a table, write plots")
    p.add_argument("config", metavar="CONFIG_OR_NAME", help="a YAML file or a built-in configuration (bilevel list)")
    p.add_argument("overrides", nargs="*", default=[], metavar="section.key=value", help=_OVERRIDES_HELP)
    p.add_argument("--methods", default=None, help="comma-separated method names (default: every preset of the config)")
    p.add_argument("--seeds", default="0", help="comma-separated run seeds (default 0)")
    p.add_argument("--out", default=None, help="output directory, new or empty (default runs/bench-<name>-<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out: remove the files bilevel wrote there (only those)")
    p.add_argument("--data-dir", default=None, help=_DATA_DIR_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("plot", help="plot a metric of run directories against iterations and time")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--metric", default="test_accuracy")
    p.add_argument("--out", required=True, help="output file (.png or .svg)")
    p.add_argument(
        "--x",
        default="both",
        choices=("both", "iteration", "time", "samples"),
        help="x axis: both panels (default), iterations, cumulative step time, or samples seen (stochastic benchmarks)",
    )
    p.add_argument("--log-y", action="store_true", help="log value axis (e.g. --metric suboptimality)")
    p.add_argument("--center", default="mean", choices=("mean", "median"), help="per line: mean ± std (default) or median, band min-max")
    p.add_argument("--by-method", action="store_true", help="one line per method, its run directories (seeds) summarised together")
    p.add_argument("--ylim", default=None, metavar="LOW,HIGH", help="value axis range, e.g. 60,85 (default: the curves after iteration 0)")

    p = sub.add_parser("resume", help="continue a stopped run, or finish a bench, from its folder")
    p.add_argument("run_dir", metavar="RUN_DIR|BENCH_DIR")
    p.add_argument("--max-iters", type=int, default=None, help="new total number of iterations (a run directory only)")
    p.add_argument("--data-dir", default=None, help=_DATA_DIR_HELP)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes on this machine, launched with torchrun; any number resumes any checkpoint (docs/distributed.md)",
    )

    p = sub.add_parser("check", help="check each method's hypergradient at the experiment's initial point (docs/check.md)")
    p.add_argument("config", metavar="CONFIG_OR_NAME", help="a YAML file or a built-in configuration (bilevel list)")
    p.add_argument("overrides", nargs="*", default=[], metavar="section.key=value", help=_OVERRIDES_HELP)
    p.add_argument("--methods", default=None, help="comma-separated method names (default: every preset of the config)")
    p.add_argument("--warmup", type=int, default=200, help="iterations at fixed x before the direction is taken (default 200)")
    p.add_argument("--from-initial-y", action="store_true", help="start the methods at the config's initial y, not at the lower solution")
    p.add_argument("--data-dir", default=None, help=_DATA_DIR_HELP)

    p = sub.add_parser("data", help="show which datasets are available and how to install the others")
    p.add_argument("--data-dir", default=None, help="directory searched first")

    sub.add_parser("list", help="list the built-in configurations")
    return parser


def _parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise CLIError(f"--{what} needs at least one value, e.g. --{what} {'GALET,CG' if what == 'methods' else '0,1'}")
    return items


def bench(
    config_name: str,
    methods: Sequence[str] | None,
    seeds: Sequence[int],
    overrides: Sequence[str] = (),
    out: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Run ``methods × seeds``; write runs, ``table.md``, ``bench.json``, plots and
    ``manifest.json`` under ``out`` (see :func:`bilevel.experiments.runner.run_bench`)."""
    from .experiments.runner import run_bench

    return run_bench(config_name, methods, seeds, overrides, out, progress, overwrite=overwrite)


def _cmd_list() -> None:
    import yaml

    from .experiments import builtin_configs

    for name, path in sorted(builtin_configs().items()):
        description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        print(f"{name:26s} {description}")


def _err(message: str) -> None:
    print(f"bilevel: {message}", file=sys.stderr)


def _run_status(summary: dict) -> int:
    """Exit status of a finished ``run``/``resume``, with its one line on stderr."""
    run_dir = summary["run_dir"]
    if summary["status"] == "interrupted":
        _err(f"interrupted at iteration {summary['iterations']} (checkpointed); continue with: bilevel resume {run_dir}")
        return EXIT_INTERRUPTED
    if summary.get("write_errors"):
        if summary.get("summary_written") is False:
            print(json.dumps(summary, default=str))
        _err(
            f"error: the run ended ({summary['status']}, result printed above) but {summary['write_errors'][0]}"
            + (f" (and {len(summary['write_errors']) - 1} more write errors)" if len(summary["write_errors"]) > 1 else "")
            + "; free some space or fix the folder, then rerun or resume it"
        )
        return EXIT_ENVIRONMENT
    if summary["status"] == "diverged":
        _err(f"diverged: {summary['message']} (last good state in {run_dir}/checkpoint.pt, summary in {run_dir}/summary.json)")
        return EXIT_DIVERGED
    return EXIT_OK


def _bench_status(result: dict) -> int:
    print(result["table"])
    print(f"\nruns, table.md, bench.json and manifest.json in {result['out']}")
    if result["plots"]:
        print("plots: " + ", ".join(str(p) for p in result["plots"]))
    if result["interrupted"]:
        _err(
            f"interrupted: {len(result['unfinished'])} of {len(result['runs'])} runs unfinished (the running one checkpointed); "
            f"finish them with: bilevel resume {result['out']}"
        )
        return EXIT_INTERRUPTED
    if result["write_errors"]:
        _err(
            f"error: the bench ended (table printed above) but {result['write_errors'][0]}"
            + (f" (and {len(result['write_errors']) - 1} more write errors)" if len(result["write_errors"]) > 1 else "")
        )
        return EXIT_ENVIRONMENT
    if result["diverged"]:
        _err(
            f"{len(result['diverged'])} of {len(result['runs'])} runs diverged ({'; '.join(result['diverged'])}); "
            "the table reports the others"
        )
        return EXIT_DIVERGED
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    if args.command == "list":
        _cmd_list()
        return EXIT_OK
    if args.command == "data":
        from .data.sources import format_report, report

        print(format_report(report(args.data_dir)))
        return EXIT_OK
    if args.command == "run":
        from . import distributed
        from .experiments import load_config
        from .experiments.config import apply_overrides
        from .experiments.runner import check_processes, data_dir_override, run_experiment

        overrides = list(args.overrides) + ([data_dir_override(args.data_dir)] if args.data_dir is not None else [])
        if args.nproc != 1 and not distributed.launched_by_torchrun():
            check_processes(apply_overrides(load_config(args.config), overrides), args.nproc)  # one line, before any process starts
        if args.nproc != 1 or distributed.launched_by_torchrun():
            return distributed.run_command(
                args,
                overrides,
                lambda out, progress: run_experiment(
                    load_config(args.config), out, overrides, progress=progress, overwrite=args.overwrite, on_divergence="status"
                ),
                _print_summary,
                _run_status,
            )
        summary = run_experiment(
            load_config(args.config), args.out, overrides, progress=not args.no_progress, overwrite=args.overwrite, on_divergence="status"
        )
        _print_summary(summary)
        return _run_status(summary)
    if args.command == "resume":
        from . import distributed
        from .experiments.runner import check_resume

        if args.nproc != 1 or distributed.launched_by_torchrun():
            return distributed.resume_command(
                args,
                lambda: check_resume(args.run_dir, args.nproc, args.max_iters, data_dir=args.data_dir),
                lambda folder, main: _resume(args, folder, main),
            )
        return _resume(args, args.run_dir, True)
    if args.command == "bench":
        from .experiments.runner import data_dir_override

        seeds = []
        for s in _parse_list(args.seeds, "seeds"):
            try:
                seeds.append(int(s))
            except ValueError:
                raise CLIError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
        methods = _parse_list(args.methods, "methods") if args.methods is not None else None
        overrides = list(args.overrides) + ([data_dir_override(args.data_dir)] if args.data_dir is not None else [])
        return _bench_status(
            bench(args.config, methods, seeds, overrides, args.out, progress=not args.no_progress, overwrite=args.overwrite)
        )
    if args.command == "check":
        return _check(args)
    if args.command == "plot":
        from .experiments import read_log
        from .plotting import plot_runs

        runs: dict[str, list[list[dict]]] = {}
        for run_dir in args.run_dirs:
            records = read_log(run_dir)
            label = Path(run_dir).name
            config = Path(run_dir) / "config.yaml"
            if config.is_file():
                import yaml

                cfg = yaml.safe_load(config.read_text())
                label = f"{cfg['method']['name']} (seed {cfg['run']['seed']})"
                if args.by_method:
                    runs.setdefault(str(cfg["method"]["name"]), []).append(records)
                    continue
                if label in runs:
                    label = f"{label} {Path(run_dir).name}"
            runs[label] = [records]
        ylim = None
        if args.ylim is not None:
            try:
                low, high = (float(v) for v in args.ylim.split(","))
            except ValueError:
                raise CLIError(f"--ylim {args.ylim!r} is not two numbers LOW,HIGH: write e.g. --ylim 60,85") from None
            ylim = (low, high)
        paths = plot_runs(runs, args.metric, args.out, x=args.x, center=args.center, ylim=ylim, yscale="log" if args.log_y else "linear")
        print(f"wrote {', '.join(map(str, paths))}")
        return EXIT_OK
    raise CLIError(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first


def _resume(args: argparse.Namespace, folder: str, main: bool) -> int:
    """``bilevel resume``: a bench or a run folder. ``main=False``: a process of a distributed
    resume other than rank 0, which works on its copy of the folder and prints nothing."""
    from .experiments.runner import read_manifest, resume_bench, resume_run

    progress = main and not args.no_progress
    manifest = read_manifest(folder) if Path(folder).is_dir() else None
    if manifest is not None and manifest["kind"] == "bench":
        if args.max_iters is not None:
            raise CLIError("--max-iters applies to a run directory; a bench resumes with the iterations it was started with")
        result = resume_bench(folder, progress=progress, data_dir=args.data_dir)
        return _bench_status(result) if main else EXIT_OK
    summary = resume_run(folder, args.max_iters, progress=progress, data_dir=args.data_dir, on_divergence="status")
    if not main:
        return EXIT_OK
    _print_summary(summary)
    return _run_status(summary)


def _check(args: argparse.Namespace) -> int:
    """``bilevel check``: one line per method; status 1 when any fails (a warn passes)."""
    from .check import check_experiment
    from .experiments.runner import data_dir_override

    if args.warmup < 0:
        raise CLIError(f"--warmup must be an integer >= 0, got {args.warmup}")
    methods = _parse_list(args.methods, "methods") if args.methods is not None else None
    overrides = list(args.overrides) + ([data_dir_override(args.data_dir)] if args.data_dir is not None else [])
    ref, results = check_experiment(args.config, methods, overrides, warmup=args.warmup, solve_y=not args.from_initial_y)
    where = "the lower solution" if not args.from_initial_y else "the initial y"
    print(
        f"reference: {ref.kind} at the initial x (lower solve ‖∇_y g‖ = {ref.lower_residual:.2g}, estimated error {ref.error:.2g}"
        + (f"; {ref.note}" if ref.note else "")
        + f"); methods start at {where}, {args.warmup} warm-up iterations"
    )
    for name, check in results:
        print(f"{name}: {check.verdict} — {check.reason}")
    failed = [name for name, check in results if check.verdict == "fail"]
    if failed:
        _err(f"{len(failed)} of {len(results)} methods failed the hypergradient check: {', '.join(failed)}")
        return EXIT_DIVERGED
    return EXIT_OK


def _print_summary(summary: dict) -> None:
    metrics = summary["metrics"]
    shown = ", ".join(
        f"{k} {metrics[k]:.4g}"
        for k in ("test_accuracy", "f1", "precision", "recall", "test_ci95", "val_loss", "suboptimality", "test_error", "samples")
        if k in metrics
    )
    if summary["status"] == "diverged":
        head = f"{summary['method']}: diverged at iteration {summary.get('diverged_at', summary['iterations'])}, {summary['time']:.1f} s"
        shown = f"last evaluation (iteration {summary.get('metrics_iteration')}): {shown}"
    else:
        head = f"{summary['method']}: {summary['status']} after {summary['iterations']} iterations, {summary['time']:.1f} s"
    print(f"{head}; {shown}")
    base = summary.get("baseline") or {}
    if "test_accuracy" in base:
        print(
            f"baseline ({base.get('description', '')}): test_accuracy {base['test_accuracy']:.4g}"
            + (f", f1 {base['f1']:.4g}" if "f1" in base else "")
        )
    print(f"run directory: {summary['run_dir']}")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _os_message(err: OSError) -> str:
    """``OSError`` as one line: its reason, the file, and what to do about a full disk."""
    text = err.strerror or _one_line(err)
    if err.filename:
        text += f": {err.filename}"
    if err.errno == errno.ENOSPC and "free" not in text:
        text += " (the disk is full: free some space or choose another --out)"
    return text


def _out_of_memory(err: BaseException) -> bool:
    try:
        import torch

        if isinstance(err, getattr(torch, "OutOfMemoryError", ())):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(err, RuntimeError) and ("out of memory" in str(err) or "can't allocate memory" in str(err))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bilevel`` and ``python -m bilevel``; returns the exit status.

    The statuses are listed in the module docstring. User mistakes (2) and environment
    failures (3) are one line on stderr; only an unexpected error (4, a bug) prints a
    traceback. A missing file the user named (a config, a run directory) is bad input,
    reported by the code that reads it as a 2; any other ``OSError`` is the environment.
    """
    from .checkpoint import CheckpointError
    from .data.errors import DatasetError
    from .experiments.config import ConfigError
    from .experiments.runner import RunDirError
    from .solve import DivergenceError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options: `bench NAME --methods A,B run.max_iters=10`
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _run(args)
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except DivergenceError as err:
        _err(f"diverged: {_one_line(err)}")
        return EXIT_DIVERGED
    except MemoryError as err:
        # before ValueError: the library's refusal to allocate (InsufficientMemoryError) is both
        _err(f"error: {_one_line(err) if str(err).strip() else 'out of memory: use smaller sizes (e.g. problem.n_train) or free memory'}")
        return EXIT_ENVIRONMENT
    except (CLIError, ConfigError, DatasetError, CheckpointError, RunDirError, ValueError, TypeError) as err:
        _err(f"error: {_one_line(err)}")
        return EXIT_USAGE
    except BrokenPipeError:
        # the reader of stdout went away (`bilevel list | head`): nothing to report; point
        # stdout at /dev/null so that the interpreter's final flush does not fail again
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as err:
        _err(f"error: {_os_message(err)}")
        return EXIT_ENVIRONMENT
    except ImportError as err:
        _err(f"error: {_one_line(err)}")
        return EXIT_ENVIRONMENT
    except Exception as err:
        if _out_of_memory(err):
            _err(f"error: out of memory ({_one_line(err)[:160]}): use smaller sizes or free memory")
            return EXIT_ENVIRONMENT
        traceback.print_exc()
        _err(f"internal error: {type(err).__name__}: {_one_line(err)[:200]} (a bug in bilevel: please report it with the traceback above)")
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
