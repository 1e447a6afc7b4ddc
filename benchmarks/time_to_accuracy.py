"""Time to accuracy of a finished (or partly finished) bench: one table per bench folder.

For every method of a ``bilevel bench`` folder (its runs ``METHOD-seedS``), from the runs'
``log.jsonl`` and ``summary.json``:

* the final metric as trained (median over seeds, and mean ± population std), the
  iterations each seed ran (a run stopped early on validation data, ``run.stop_patience``,
  ran fewer than ``run.max_iters``) and its step time;
* the time to reach 95 % and 99 % of the best method's final median value
  (:func:`bilevel.plotting.time_to_reach`: on the centre curve over seeds, the first
  logged evaluation at or above the target, not interpolated; the curve covers the
  iterations every seed logged, so up to the earliest stop).

    PYTHONPATH=src python benchmarks/time_to_accuracy.py runs/fashion_liu_linear_full
    PYTHONPATH=src python benchmarks/time_to_accuracy.py BENCH --metric f1 --center mean
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import common  # noqa: F401  (sets sys.path)
from bilevel.experiments.runner import read_log
from bilevel.plotting import time_to_reach


def bench_runs(folder: Path) -> dict[str, list[tuple[dict, list[dict]]]]:
    """method -> [(summary, log records)] of its completed runs, in the manifest's order."""
    manifest = json.loads((folder / "manifest.json").read_text())
    runs: dict[str, list[tuple[dict, list[dict]]]] = {}
    for entry in manifest["runs"]:
        summary_path = folder / entry["dir"] / "summary.json"
        if entry["status"] in ("pending", "running", "interrupted", "diverged") or not summary_path.is_file():
            continue
        runs.setdefault(entry["method"], []).append((json.loads(summary_path.read_text()), read_log(folder / entry["dir"])))
    return runs


def table(folder: Path, metric: str = "test_accuracy", center: str = "median") -> str:
    runs = bench_runs(folder)
    if not runs:
        raise SystemExit(f"{folder}: no completed run yet")
    logs = {method: [log for _, log in items] for method, items in runs.items()}
    best, reached = time_to_reach(logs, metric, (0.95, 0.99), center=center)
    digits = 3 if abs(best) < 10 else 2  # F1 in [0, 1], accuracies in %
    lines = [
        f"best final {center} {metric}: {best:.{digits}f} (targets {0.95 * best:.{digits}f} and {0.99 * best:.{digits}f})",
        "",
        f"| method | seeds | final {metric}, median | mean ± std | iterations (per seed) "
        "| run's step time (s), median | time to 95 % (s) | time to 99 % (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, items in runs.items():
        finals = [float(summary["metrics"][metric]) for summary, _ in items]
        iterations = [int(summary["iterations"]) for summary, _ in items]
        times = [float(summary["time"]) for summary, _ in items]
        std = statistics.pstdev(finals) if len(finals) > 1 else 0.0
        t95, t99 = (f"{t:.1f}" if t is not None else "not reached" for t in reached[method])
        lines.append(
            f"| {method} | {len(items)} | {statistics.median(finals):.{digits}f} | "
            f"{statistics.fmean(finals):.{digits}f} ± {std:.{digits}f} | "
            f"{', '.join(map(str, iterations))} | {statistics.median(times):.1f} | {t95} | {t99} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benches", nargs="+", type=Path)
    p.add_argument("--metric", default="test_accuracy")
    p.add_argument("--center", default="median", choices=("median", "mean"))
    args = p.parse_args(argv)
    for folder in args.benches:
        print(f"## {folder}\n")
        print(table(folder, args.metric, args.center))
        print()


if __name__ == "__main__":
    main()
