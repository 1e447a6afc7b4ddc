"""Plots of logs: metric vs iterations and vs time."""

import pytest

from bilevel.plotting import metric_series, plot_runs

RUN_A = [{"iteration": 0, "time": 0.0, "f1": 0.6}, {"iteration": 5, "time": 1.0}, {"iteration": 10, "time": 2.0, "f1": 0.8}]
RUN_B = [{"iteration": 0, "time": 0.0, "f1": 0.5}, {"iteration": 10, "time": 4.0, "f1": 0.9}]


def test_metric_series_keeps_records_with_the_metric():
    it, tm, val = metric_series(RUN_A, "f1")
    assert it.tolist() == [0, 10] and tm.tolist() == [0.0, 2.0] and val.tolist() == [0.6, 0.8]


def test_plot_writes_png_and_svg(tmp_path):
    paths = plot_runs({"GALET": [RUN_A, RUN_B], "CG": [RUN_B]}, "f1", tmp_path / "f1", formats=("png", "svg"))
    assert [p.name for p in paths] == ["f1.png", "f1.svg"]
    assert paths[0].read_bytes()[:4] == b"\x89PNG" and "<svg" in paths[1].read_text()[:400]
    assert paths[0].stat().st_size < 200_000


def test_plot_without_the_metric_raises(tmp_path):
    with pytest.raises(ValueError, match="no run has records"):
        plot_runs({"A": [RUN_A]}, "test_accuracy", tmp_path / "x.png")


def _captured_axes(monkeypatch):
    """The axes of the figures plot_runs draws (captured when it closes them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures, close = [], plt.close

    def keep(fig=None):
        if fig is not None:
            figures.append(fig)
        close(fig)

    monkeypatch.setattr(plt, "close", keep)
    return figures


def test_the_value_axis_shows_the_spread_not_the_starting_point(tmp_path, monkeypatch):
    """Iteration 0 (a zero classifier, 9 %) must not squeeze the 80-90 % band."""
    figures = _captured_axes(monkeypatch)
    a = [
        {"iteration": 0, "time": 0.0, "test_accuracy": 9.0},
        {"iteration": 20, "time": 1.0, "test_accuracy": 80.0},
        {"iteration": 40, "time": 2.0, "test_accuracy": 88.0},
    ]
    b = [
        {"iteration": 0, "time": 0.0, "test_accuracy": 9.0},
        {"iteration": 20, "time": 1.5, "test_accuracy": 84.0},
        {"iteration": 40, "time": 3.0, "test_accuracy": 90.0},
    ]
    plot_runs({"GALET": [a], "CG": [b]}, "test_accuracy", tmp_path / "acc.png")
    ax_it, ax_time = figures[-1].axes
    for ax in (ax_it, ax_time):
        low, high = ax.get_ylim()
        assert 78.0 < low < 80.0 and 90.0 < high < 92.0
    notes = [t.get_text() for t in ax_it.texts]
    assert notes == ["iteration 0: 9 (below the axis)"]


def test_the_value_axis_covers_the_seed_band(tmp_path, monkeypatch):
    figures = _captured_axes(monkeypatch)
    plot_runs({"GALET": [RUN_A, RUN_B]}, "f1", tmp_path / "f1.png")
    low, high = figures[-1].axes[0].get_ylim()
    # at iteration 10 the seeds give 0.8 and 0.9: mean 0.85, std 0.05
    assert low < 0.8 and high > 0.9 and high - low < 0.2
