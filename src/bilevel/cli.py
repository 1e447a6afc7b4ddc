"""The ``bilevel`` command line: run, bench, plot, resume, data, list.

    bilevel run CONFIG_OR_NAME [section.key=value ...] [--out DIR]
    bilevel bench CONFIG_OR_NAME --methods GALET,SlBAMM,BAGDC,RHG,CG --seeds 0,1,2 [key=value ...] [--out DIR]
    bilevel plot RUN_DIR [RUN_DIR ...] --metric test_accuracy --out FILE
    bilevel resume RUN_DIR [--max-iters N]
    bilevel data [--data-dir DIR]
    bilevel list

CONFIG_OR_NAME is a YAML file or the name of a built-in configuration (``bilevel list``).
Errors (missing dataset, bad override, missing checkpoint) print one line on stderr and
exit with status 2.

Example:
    >>> from bilevel.cli import main
    >>> main(["list"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser", "bench", "format_bench_table"]

EXIT_USAGE = 2


class CLIError(Exception):
    """An error reported as one line on stderr (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bilevel", description="Bilevel optimization experiments (hyper-cleaning, few-shot).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run one experiment into a run directory")
    p.add_argument("config", metavar="CONFIG_OR_NAME")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--out", default=None, help="run directory (default runs/<name>-<method>-<timestamp>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("bench", help="run several methods × seeds, print a table, write plots")
    p.add_argument("config", metavar="CONFIG_OR_NAME")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: every preset of the config)")
    p.add_argument("--seeds", default="0", help="comma-separated run seeds (default 0)")
    p.add_argument("--out", default=None, help="output directory (default runs/bench-<name>-<timestamp>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("plot", help="plot a metric of run directories against iterations and time")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--metric", default="test_accuracy")
    p.add_argument("--out", required=True, help="output file (.png or .svg)")

    p = sub.add_parser("resume", help="continue a stopped run from its checkpoint")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--max-iters", type=int, default=None, help="new total number of iterations")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("data", help="show which datasets are available and how to install the others")
    p.add_argument("--data-dir", default=None, help="directory searched first")

    sub.add_parser("list", help="list the built-in configurations")
    return parser


def _parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise CLIError(f"--{what} needs at least one value, e.g. --{what} {'GALET,CG' if what == 'methods' else '0,1'}")
    return items


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def _pm(values: Sequence[float], digits: int) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_bench_table(rows: dict, kind: str, baseline: Optional[dict] = None) -> str:
    """Markdown table of a bench: one row per method (mean ± std over seeds)."""
    if kind == "hyperclean":
        header = "| method | test acc (%) | F1 | time (s) | iterations |\n|---|---|---|---|---|"
    else:
        header = "| method | meta-test acc (%) | 95% CI (%) | time (s) | iterations |\n|---|---|---|---|---|"
    lines = [header]
    for method, summaries in rows.items():
        acc = [s["metrics"].get("test_accuracy") for s in summaries]
        second = [s["metrics"].get("f1" if kind == "hyperclean" else "test_ci95") for s in summaries]
        times = [s["time"] for s in summaries]
        iters = sorted({s["iterations"] for s in summaries})
        lines.append(
            f"| {method} | {_pm(acc, 2)} | {_pm(second, 3 if kind == 'hyperclean' else 2)} | {_pm(times, 1)} | {','.join(map(str, iters))} |"
        )
    if baseline:
        acc = [b.get("test_accuracy") for b in baseline]
        second = [b.get("f1" if kind == "hyperclean" else "test_ci95") for b in baseline]
        label = "no cleaning (x = 0)" if kind == "hyperclean" else "random features"
        lines.append(f"| {label} | {_pm(acc, 2)} | {_pm(second, 3 if kind == 'hyperclean' else 2)} | - | - |")
    return "\n".join(lines)


def bench(config_name: str, methods: Optional[Sequence[str]], seeds: Sequence[int], overrides: Sequence[str] = (), out: Optional[str] = None, progress: bool = True) -> dict:
    """Run ``methods × seeds``; write runs, ``table.md``, ``bench.json`` and plots under ``out``."""
    from .experiments import load_config, read_log, run_experiment
    from .experiments.config import apply_overrides, resolve_config
    from .plotting import plot_runs

    base = load_config(config_name)
    resolved = resolve_config(apply_overrides(base, overrides))  # fail early on bad overrides
    kind = resolved["problem"]["kind"]
    if methods is None:
        methods = list(base.get("methods") or [resolved["method"]["name"]])
    for method in methods:
        resolve_config(apply_overrides(base, [*overrides, f"method.name={method}"]))
    out_dir = Path(out) if out else Path("runs") / f"bench-{base['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict = {}
    logs: dict = {}
    baselines = []
    for method in methods:
        for seed in seeds:
            run_dir = out_dir / f"{method}-seed{seed}"
            summary = run_experiment(base, run_dir, [*overrides, f"method.name={method}", f"run.seed={seed}"], progress=progress)
            rows.setdefault(method, []).append(summary)
            logs.setdefault(method, []).append(read_log(run_dir))
            if method == methods[0]:
                baselines.append(summary.get("baseline") or {})
    table = format_bench_table(rows, kind, baselines if any(baselines) else None)
    (out_dir / "table.md").write_text(table + "\n")
    metrics = ["test_accuracy"] + (["f1"] if kind == "hyperclean" else [])
    plots = []
    for metric in metrics:
        plots += plot_runs(logs, metric, out_dir / metric, formats=("png", "svg"), title=f"{base['name']}: {metric}")
    payload = {"config": base["name"], "methods": list(methods), "seeds": list(seeds), "overrides": list(overrides), "runs": rows, "table": table, "plots": [str(p) for p in plots]}
    (out_dir / "bench.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return {"table": table, "plots": plots, "out": out_dir}


def _cmd_list() -> None:
    import yaml

    from .experiments import builtin_configs

    for name, path in sorted(builtin_configs().items()):
        description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        print(f"{name:26s} {description}")


def _run(args) -> int:
    if args.command == "list":
        _cmd_list()
        return 0
    if args.command == "data":
        from .data.sources import format_report, report

        print(format_report(report(args.data_dir)))
        return 0
    if args.command == "run":
        from .experiments import load_config, run_experiment

        summary = run_experiment(load_config(args.config), args.out, args.overrides, progress=not args.no_progress)
        _print_summary(summary)
        return 0
    if args.command == "resume":
        from .experiments import resume_run

        summary = resume_run(args.run_dir, args.max_iters, progress=not args.no_progress)
        _print_summary(summary)
        return 0
    if args.command == "bench":
        seeds = []
        for s in _parse_list(args.seeds, "seeds"):
            try:
                seeds.append(int(s))
            except ValueError:
                raise CLIError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
        methods = _parse_list(args.methods, "methods") if args.methods is not None else None
        result = bench(args.config, methods, seeds, args.overrides, args.out, progress=not args.no_progress)
        print(result["table"])
        print(f"\nruns, table.md and bench.json in {result['out']}")
        print("plots: " + ", ".join(str(p) for p in result["plots"]))
        return 0
    if args.command == "plot":
        from .experiments import read_log
        from .plotting import plot_runs

        runs = {}
        for run_dir in args.run_dirs:
            records = read_log(run_dir)
            label = Path(run_dir).name
            config = Path(run_dir) / "config.yaml"
            if config.is_file():
                import yaml

                cfg = yaml.safe_load(config.read_text())
                label = f"{cfg['method']['name']} (seed {cfg['run']['seed']})"
                if label in runs:
                    label = f"{label} {Path(run_dir).name}"
            runs[label] = [records]
        paths = plot_runs(runs, args.metric, args.out)
        print(f"wrote {', '.join(map(str, paths))}")
        return 0
    raise CLIError(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first


def _print_summary(summary: dict) -> None:
    metrics = summary["metrics"]
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("test_accuracy", "f1", "precision", "recall", "test_ci95", "val_loss") if k in metrics)
    print(f"{summary['method']}: {summary['status']} after {summary['iterations']} iterations, {summary['time']:.1f} s; {shown}")
    base = summary.get("baseline") or {}
    if "test_accuracy" in base:
        print(f"baseline ({base.get('description', '')}): test_accuracy {base['test_accuracy']:.4g}" + (f", f1 {base['f1']:.4g}" if "f1" in base else ""))
    print(f"run directory: {summary['run_dir']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``bilevel`` and ``python -m bilevel``; returns the exit status."""
    from .checkpoint import CheckpointError
    from .data.errors import DatasetError
    from .experiments.config import ConfigError
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
    except DivergenceError as err:
        print(f"bilevel: run diverged: {err}", file=sys.stderr)
        return 1
    except (CLIError, ConfigError, DatasetError, CheckpointError, FileNotFoundError, ValueError, ImportError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"bilevel: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("bilevel: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
