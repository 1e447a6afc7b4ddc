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
