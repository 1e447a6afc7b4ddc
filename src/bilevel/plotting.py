"""Plots of experiment logs: a metric against iterations and against time (matplotlib, Agg).

Each label (a method) has several runs (seeds); at every iteration logged by all of them
the plot draws a centre and a band over the runs:

* ``center="mean"``: the mean, band ± one (population) standard deviation;
* ``center="median"``: the median, band from the lowest to the highest run (the whole
  spread: with 3 seeds a quantile band would be the extremes anyway).

Against time, each point sits at the same statistic of the runs' cumulative method step
times at that iteration (``time`` of the log records: steps only, no evaluation); against
samples (``x="samples"``, the stochastic benchmarks' records), at the samples drawn up to it.
``yscale="log"`` draws a suboptimality such as ‖∇F(x)‖² on a log axis.

:func:`time_to_reach` reads the same centre curves and gives, per label, the first logged
time at which the metric reaches a fraction of the best final value of all labels
(time to accuracy).

Example:
    >>> from bilevel.plotting import plot_runs, time_to_reach
    >>> runs = {"GALET": [[{"iteration": 0, "time": 0.0, "f1": 0.6}, {"iteration": 10, "time": 1.0, "f1": 0.8}]]}
    >>> paths = plot_runs(runs, "f1", "/tmp/bilevel_doc_plot.png")
    >>> [p.suffix for p in paths]
    ['.png']
    >>> plot_runs(runs, "f1", "/tmp/bilevel_doc_time.png", x="time", center="median")[0].name
    'bilevel_doc_time.png'
    >>> time_to_reach(runs, "f1", (0.5, 0.99))
    (0.8, {'GALET': [0.0, 1.0]})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "CENTERS",
    "METRIC_LABELS",
    "X_AXES",
    "Y_SCALES",
    "center_axis",
    "center_curve",
    "metric_series",
    "plot_runs",
    "time_to_reach",
    "value_limits",
]

METRIC_LABELS = {
    "test_accuracy": "test accuracy (%)",
    "f1": "cleaner F1",
    "precision": "cleaner precision",
    "recall": "cleaner recall",
    "val_loss": "validation loss",
    "upper_loss": "upper loss f",
    "stationarity": "stationarity",
    "suboptimality": "suboptimality ‖∇F(x)‖²",
    "test_error": "test error",
    "value_func": "value function F(x)",
}


def metric_series(records: Sequence[dict], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(iterations, times, values)`` of the records that hold ``metric``."""
    rows = [(r["iteration"], r.get("time", np.nan), r[metric]) for r in records if metric in r]
    if not rows:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    it, tm, val = (np.asarray(c, dtype=float) for c in zip(*rows, strict=True))
    return it, tm, val


#: what ``plot_runs`` draws per label: the mean with ± std, or the median with the range
CENTERS = ("mean", "median")
#: the panels of ``plot_runs``: both (iterations and time), or one: iterations, time or samples seen
X_AXES = ("both", "iteration", "time", "samples")
#: the value axis of ``plot_runs``
Y_SCALES = ("linear", "log")
_X_LABELS = {"iteration": "upper iterations", "time": "cumulative time (s, method steps only)", "samples": "samples seen"}


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{what}={value!r} is not one of {', '.join(map(repr, choices))}: pick one of them")


def center_curve(
    label_runs: Sequence[Sequence[dict]], metric: str, center: str = "mean"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int] | None:
    """The curve of one label over its runs, on the iterations that every run logged.

    Returns ``(iterations, centre, low, high, times, n_runs)``: with ``center="mean"`` the
    mean and mean ∓ std (population), with ``"median"`` the median and the lowest and
    highest run; ``times`` is the same statistic (mean or median) of the runs' cumulative
    step times. ``None`` when no run holds ``metric`` or the runs share no iteration.
    """
    _check_choice("center", center, CENTERS)
    series = [metric_series(r, metric) for r in label_runs]
    series = [s for s in series if len(s[0])]
    if not series:
        return None
    common = sorted(set.intersection(*(set(s[0].tolist()) for s in series)))
    if not common:
        return None
    values = np.stack([np.interp(common, s[0], s[2]) for s in series])
    times = np.stack([np.interp(common, s[0], s[1]) for s in series])
    if center == "median":
        mid, low, high, tmid = np.median(values, 0), values.min(0), values.max(0), np.median(times, 0)
    else:
        mean, std = values.mean(0), values.std(0)
        mid, low, high, tmid = mean, mean - std, mean + std, times.mean(0)
    return np.asarray(common, dtype=float), mid, low, high, tmid, len(series)


def center_axis(label_runs: Sequence[Sequence[dict]], metric: str, key: str, iterations: np.ndarray, center: str = "mean") -> np.ndarray:
    """The centre (mean or median over runs) of the record field ``key`` (e.g. ``samples``)
    at ``iterations``, read from the records that hold ``metric``, as :func:`center_curve`
    does for ``time``. Raises ``ValueError`` when a run's records lack ``key``."""
    _check_choice("center", center, CENTERS)
    columns = []
    for records in label_runs:
        rows = [(r["iteration"], r.get(key)) for r in records if metric in r]
        if not rows:
            continue
        if any(value is None for _, value in rows):
            raise ValueError(f"the records with {metric!r} lack {key!r}: plot against iterations or time instead")
        its, values = (np.asarray(c, dtype=float) for c in zip(*rows, strict=True))
        columns.append(np.interp(iterations, its, values))
    stacked = np.stack(columns)
    result: np.ndarray = np.median(stacked, 0) if center == "median" else stacked.mean(0)
    return result


def time_to_reach(
    runs: Mapping[str, Sequence[Sequence[dict]]],
    metric: str,
    fractions: Sequence[float] = (0.95, 0.99),
    center: str = "median",
) -> tuple[float, dict[str, list[float | None]]]:
    """Time to a fraction of the best final value (for a metric where higher is better).

    ``best`` is the highest last value of the labels' centre curves (:func:`center_curve`);
    for each label and fraction ``q`` the result is the centre time of the first logged
    iteration whose centre value is ``≥ q · best`` (``None``: never reached). The
    resolution is the logging interval of the metric (no interpolation between records).

    Args:
        runs: label -> list of runs (lists of log records), as :func:`plot_runs`.
        metric: the record key, e.g. ``test_accuracy``.
        fractions: the fractions q of ``best``.
        center: ``"median"`` or ``"mean"`` over the runs of a label.

    Returns:
        ``(best, {label: [time for each fraction]})``. Raises ``ValueError`` when no run
        holds ``metric``.
    """
    curves = {label: center_curve(label_runs, metric, center) for label, label_runs in runs.items()}
    kept = {label: c for label, c in curves.items() if c is not None}
    if not kept:
        raise ValueError(f"no run has records with the metric {metric!r}")
    best = max(float(c[1][-1]) for c in kept.values())
    reached: dict[str, list[float | None]] = {}
    for label, (_, mid, _, _, times, _) in kept.items():
        row: list[float | None] = []
        for q in fractions:
            hit = np.flatnonzero(mid >= q * best)
            row.append(float(times[hit[0]]) if len(hit) else None)
        reached[label] = row
    return best, reached


def value_limits(curves: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], yscale: str = "linear") -> tuple[float, float] | None:
    """The value axis of a plot: the range of the curves after iteration 0, padded.

    ``curves`` are ``(iterations, low, high)`` (mean − std and mean + std; the mean twice
    for one seed). The starting point is left out because it is the same for every
    method and often far from the rest: a hyper-cleaning classifier starts at zero with
    about 9 % test accuracy, which would squeeze the 80-90 % band where the methods
    differ into a few pixels. ``None`` when nothing but iteration 0 was logged (then the
    start is all there is to show, and matplotlib's own limits are fine). With
    ``yscale="log"`` the range is that of all the positive values, the start included (a
    log axis shows the decades from the start on), padded by a factor.
    """
    if yscale == "log":
        positive = np.concatenate([np.concatenate([lo, hi]) for _, lo, hi in curves]) if curves else np.zeros(0)
        positive = positive[np.isfinite(positive) & (positive > 0)]
        if not len(positive):
            return None
        low, high = float(positive.min()), float(positive.max())
        pad = (high / low) ** 0.05 if high > low else 1.5
        return low / pad, high * pad
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
    *,
    x: str = "both",
    center: str = "mean",
    ylim: tuple[float, float] | None = None,
    yscale: str = "linear",
) -> list[Path]:
    """One figure, one line per label: metric vs iteration and vs time (``x="both"``, two
    panels), or one of the two alone (``x="iteration"`` or ``x="time"``: time to accuracy).

    Args:
        runs: label -> list of runs (each a list of log records, e.g. one per seed). The
            runs of one label are summarised on their common iterations (:func:`center_curve`).
        metric: the record key to plot (e.g. ``test_accuracy``, ``f1``).
        out: output path; its suffix gives the format unless ``formats`` is given, in
            which case ``out`` without suffix is the stem and one file per format is written.
        title: figure title.
        x: ``"both"``, ``"iteration"``, ``"time"`` (cumulative method step time) or
            ``"samples"`` (the records' ``samples`` field: samples drawn so far).
        center: ``"mean"`` (band ± one std) or ``"median"`` (band: lowest to highest run).
        ylim: ``(low, high)`` of the value axis instead of :func:`value_limits` (e.g. to
            show the last points when one method starts far below the others).
        yscale: ``"linear"`` or ``"log"`` (a suboptimality that falls by decades).

    Returns:
        the written paths. Raises ``ValueError`` when no run holds ``metric``.

    The value axis spans the curves after iteration 0 (:func:`value_limits`); a start
    value outside it is written in a corner of the plot.
    """
    _check_choice("x", x, X_AXES)
    _check_choice("center", center, CENTERS)
    _check_choice("yscale", yscale, Y_SCALES)
    if ylim is not None and not (len(ylim) == 2 and float(ylim[0]) < float(ylim[1])):
        raise ValueError(f"ylim={ylim!r} is not (low, high) with low < high: give two increasing numbers")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    paths = [out.with_suffix("." + f.lstrip(".")) for f in formats] if formats else [out if out.suffix else out.with_suffix(".png")]
    if x == "both":
        fig, (ax_it, ax_time) = plt.subplots(1, 2, figsize=(10, 3.8))
        panels = [("iteration", ax_it), ("time", ax_time)]
    else:
        fig, ax_one = plt.subplots(1, 1, figsize=(6.4, 4.2))
        panels = [(x, ax_one)]
    axes = [ax for _, ax in panels]
    plotted = 0
    curves, starts = [], []
    for label, label_runs in runs.items():
        curve = center_curve(label_runs, metric, center)
        if curve is None:
            continue
        iterations, mid, low, high, times, n_runs = curve
        curves.append((iterations, low, high))
        starts += [float(v) for v in mid[iterations == 0]]
        for kind, ax in panels:
            xs = (
                iterations
                if kind == "iteration"
                else times
                if kind == "time"
                else center_axis(label_runs, metric, kind, iterations, center)
            )
            (line,) = ax.plot(xs, mid, label=label if ax is axes[0] else None, lw=1.6)
            if n_runs > 1:
                ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, lw=0)
        plotted += 1
    if not plotted:
        plt.close(fig)
        raise ValueError(f"no run has records with the metric {metric!r}")
    ylabel = METRIC_LABELS.get(metric, metric)
    limits = (float(ylim[0]), float(ylim[1])) if ylim is not None else value_limits(curves, yscale)
    for ax in axes:
        ax.set_yscale(yscale)
    if limits is not None:
        for ax in axes:
            ax.set_ylim(*limits)
        off = [v for v in starts if not limits[0] <= v <= limits[1]]
        if off:
            # the clipped start is still stated, so the reader knows where the lines come from
            span = f"{min(off):.3g}" if min(off) == max(off) else f"{min(off):.3g}-{max(off):.3g}"
            below = max(off) < limits[0]
            axes[0].annotate(
                f"iteration 0: {span} ({'below' if below else 'above'} the axis)",
                xy=(0.01, 0.02 if below else 0.97),
                xycoords="axes fraction",
                va="bottom" if below else "top",
                fontsize=7,
                color="0.35",
            )
    band = "mean, band ± std over runs" if center == "mean" else "median, band min-max over runs"
    for kind, ax in panels:
        ax.set_xlabel(_X_LABELS[kind])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title=band, title_fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
    plt.close(fig)
    return paths
