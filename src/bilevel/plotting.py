"""Plots of experiment logs: a metric against iterations and against time (matplotlib, Agg).

Example:
    >>> from bilevel.plotting import plot_runs
    >>> runs = {"GALET": [[{"iteration": 0, "time": 0.0, "f1": 0.6}, {"iteration": 10, "time": 1.0, "f1": 0.8}]]}
    >>> paths = plot_runs(runs, "f1", "/tmp/bilevel_doc_plot.png")
    >>> [p.suffix for p in paths]
    ['.png']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["METRIC_LABELS", "metric_series", "plot_runs", "value_limits"]

METRIC_LABELS = {
    "test_accuracy": "test accuracy (%)",
    "f1": "cleaner F1",
    "precision": "cleaner precision",
    "recall": "cleaner recall",
    "val_loss": "validation loss",
    "upper_loss": "upper loss f",
    "stationarity": "stationarity",
}


def metric_series(records: Sequence[dict], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(iterations, times, values)`` of the records that hold ``metric``."""
    rows = [(r["iteration"], r.get("time", np.nan), r[metric]) for r in records if metric in r]
    if not rows:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    it, tm, val = (np.asarray(c, dtype=float) for c in zip(*rows, strict=True))
    return it, tm, val


def value_limits(curves: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[float, float] | None:
    """The value axis of a plot: the range of the curves after iteration 0, padded.

    ``curves`` are ``(iterations, low, high)`` (mean − std and mean + std; the mean twice
    for one seed). The starting point is left out because it is the same for every
    method and often far from the rest: a hyper-cleaning classifier starts at zero with
    about 9 % test accuracy, which would squeeze the 80-90 % band where the methods
    differ into a few pixels. ``None`` when nothing but iteration 0 was logged (then the
    start is all there is to show, and matplotlib's own limits are fine).
    """
    low_parts = [lo[it > 0] for it, lo, _ in curves]
    high_parts = [hi[it > 0] for it, _, hi in curves]
    lows = np.concatenate(low_parts) if low_parts else np.zeros(0)
    highs = np.concatenate(high_parts) if high_parts else np.zeros(0)
    finite = np.isfinite(lows) & np.isfinite(highs)
    if not finite.any():
        return None
    low, high = float(lows[finite].min()), float(highs[finite].max())
    pad = 0.08 * (high - low) if high > low else max(abs(high) * 0.01, 1e-3)
    return low - pad, high + pad


def plot_runs(
    runs: Mapping[str, Sequence[Sequence[dict]]],
    metric: str,
    out: str | Path,
    formats: Sequence[str] | None = None,
    title: str | None = None,
) -> list[Path]:
    """One figure, two panels (metric vs iteration, metric vs time), one line per label.

    Args:
        runs: label -> list of runs (each a list of log records, e.g. one per seed). Runs
            of one label are averaged on their common iterations (band: ± one std).
        metric: the record key to plot (e.g. ``test_accuracy``, ``f1``).
        out: output path; its suffix gives the format unless ``formats`` is given, in
            which case ``out`` without suffix is the stem and one file per format is written.
        title: figure title.

    Returns:
        the written paths. Raises ``ValueError`` when no run holds ``metric``.

    The value axis spans the curves after iteration 0 (:func:`value_limits`); a start
    value outside it is written in a corner of the plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    paths = [out.with_suffix("." + f.lstrip(".")) for f in formats] if formats else [out if out.suffix else out.with_suffix(".png")]
    fig, (ax_it, ax_time) = plt.subplots(1, 2, figsize=(10, 3.8))
    plotted = 0
    curves, starts = [], []
    for label, label_runs in runs.items():
        series = [metric_series(r, metric) for r in label_runs]
        series = [s for s in series if len(s[0])]
        if not series:
            continue
        common = sorted(set.intersection(*(set(s[0].tolist()) for s in series)))
        if not common:
            continue
        values = np.stack([np.interp(common, s[0], s[2]) for s in series])
        times = np.stack([np.interp(common, s[0], s[1]) for s in series])
        mean, std, tmean = values.mean(0), values.std(0), times.mean(0)
        curves.append((np.asarray(common), mean - std, mean + std))
        starts += [float(v) for v in mean[np.asarray(common) == 0]]
        for ax, xs in ((ax_it, np.asarray(common)), (ax_time, tmean)):
            (line,) = ax.plot(xs, mean, label=label if ax is ax_it else None, lw=1.6)
            if len(series) > 1:
                ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
        plotted += 1
    if not plotted:
        plt.close(fig)
        raise ValueError(f"no run has records with the metric {metric!r}")
    ylabel = METRIC_LABELS.get(metric, metric)
    limits = value_limits(curves)
    if limits is not None:
        for ax in (ax_it, ax_time):
            ax.set_ylim(*limits)
        off = [v for v in starts if not limits[0] <= v <= limits[1]]
        if off:
            # the clipped start is still stated, so the reader knows where the lines come from
            span = f"{min(off):.3g}" if min(off) == max(off) else f"{min(off):.3g}-{max(off):.3g}"
            below = max(off) < limits[0]
            ax_it.annotate(
                f"iteration 0: {span} ({'below' if below else 'above'} the axis)",
                xy=(0.01, 0.02 if below else 0.97),
                xycoords="axes fraction",
                va="bottom" if below else "top",
                fontsize=7,
                color="0.35",
            )
    ax_it.set_xlabel("upper iterations")
    ax_time.set_xlabel("time (s, method steps only)")
    for ax in (ax_it, ax_time):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_it.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
    plt.close(fig)
    return paths
