"""Plots of logs: metric vs iterations and vs time."""

import pytest

from bilevel.plotting import center_curve, metric_series, plot_runs, time_to_reach

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


# three seeds of one method: test accuracy and cumulative step time logged every 10 iterations
SEEDS = [
    [
        {"iteration": 0, "time": 0.0, "test_accuracy": 10.0},
        {"iteration": 10, "time": 1.0, "test_accuracy": 70.0},
        {"iteration": 20, "time": 2.0, "test_accuracy": 80.0},
    ],
    [
        {"iteration": 0, "time": 0.0, "test_accuracy": 10.0},
        {"iteration": 10, "time": 3.0, "test_accuracy": 76.0},
        {"iteration": 20, "time": 6.0, "test_accuracy": 84.0},
    ],
    [
        {"iteration": 0, "time": 0.0, "test_accuracy": 10.0},
        {"iteration": 10, "time": 8.0, "test_accuracy": 73.0},
        {"iteration": 20, "time": 9.0, "test_accuracy": 90.0},
    ],
]


def test_center_curve_median_takes_the_median_and_the_range_over_seeds():
    it, mid, low, high, times, n = center_curve(SEEDS, "test_accuracy", "median")
    assert n == 3 and it.tolist() == [0, 10, 20]
    assert mid.tolist() == [10.0, 73.0, 84.0]
    assert low.tolist() == [10.0, 70.0, 80.0] and high.tolist() == [10.0, 76.0, 90.0]
    # the time axis is the median of the seeds' times, not their mean (4.0, 5.67): one slow seed does not move it
    assert times.tolist() == [0.0, 3.0, 6.0]


def test_center_curve_mean_takes_the_mean_and_one_std():
    _, mid, low, high, times, _ = center_curve(SEEDS, "test_accuracy", "mean")
    assert mid[1] == pytest.approx(73.0) and mid[2] == pytest.approx(254.0 / 3)
    std = (((80 - 254 / 3) ** 2 + (84 - 254 / 3) ** 2 + (90 - 254 / 3) ** 2) / 3) ** 0.5
    assert high[2] - mid[2] == pytest.approx(std) and mid[2] - low[2] == pytest.approx(std)
    assert times.tolist() == pytest.approx([0.0, 4.0, 17.0 / 3])


def test_time_to_reach_is_the_first_logged_time_at_the_fraction_of_the_best_final_value():
    fast = [
        [
            {"iteration": 0, "time": 0.0, "test_accuracy": 10.0},
            {"iteration": 10, "time": 0.5, "test_accuracy": 82.0},
            {"iteration": 20, "time": 1.0, "test_accuracy": 83.0},
        ]
    ]
    best, reached = time_to_reach({"slow": SEEDS, "fast": fast}, "test_accuracy", (0.5, 0.95, 0.99, 1.0), center="median")
    # best final median: 84 (slow); 0.95 · 84 = 79.8, 0.99 · 84 = 83.16
    assert best == 84.0
    assert reached["slow"] == [3.0, 6.0, 6.0, 6.0]
    assert reached["fast"] == [0.5, 0.5, None, None]


def test_time_to_reach_without_the_metric_raises():
    with pytest.raises(ValueError, match="no run has records"):
        time_to_reach({"A": [RUN_A]}, "test_accuracy")


def test_time_axis_alone_draws_one_panel_at_the_median_times(tmp_path, monkeypatch):
    figures = _captured_axes(monkeypatch)
    plot_runs({"slow": SEEDS}, "test_accuracy", tmp_path / "tta.png", x="time", center="median")
    (ax,) = figures[-1].axes
    (line,) = ax.get_lines()
    assert line.get_xdata().tolist() == [0.0, 3.0, 6.0] and line.get_ydata().tolist() == [10.0, 73.0, 84.0]
    assert "time" in ax.get_xlabel() and "median" in ax.get_legend().get_title().get_text()
    # the band spans the lowest to the highest seed
    (band,) = ax.collections
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(10.0) and ys.max() == pytest.approx(90.0)


def test_iteration_axis_alone_and_bad_choices(tmp_path, monkeypatch):
    figures = _captured_axes(monkeypatch)
    plot_runs({"slow": SEEDS}, "test_accuracy", tmp_path / "it.png", x="iteration")
    (ax,) = figures[-1].axes
    assert ax.get_lines()[0].get_xdata().tolist() == [0, 10, 20] and ax.get_xlabel() == "upper iterations"
    with pytest.raises(ValueError, match="x='steps' is not one of"):
        plot_runs({"slow": SEEDS}, "test_accuracy", tmp_path / "bad.png", x="steps")
    with pytest.raises(ValueError, match="center='mode' is not one of"):
        plot_runs({"slow": SEEDS}, "test_accuracy", tmp_path / "bad.png", center="mode")


def test_plot_command_by_method_summarises_the_seeds_of_each_method(tmp_path, monkeypatch):
    """`bilevel plot DIRS --by-method --x time --center median`: one line per method, not per run."""
    import json

    import yaml

    from bilevel.cli import main

    dirs = []
    for method, runs in (("MEHA", SEEDS), ("BOME", SEEDS[:1])):
        for seed, records in enumerate(runs):
            run_dir = tmp_path / f"{method}-seed{seed}"
            run_dir.mkdir()
            (run_dir / "config.yaml").write_text(yaml.safe_dump({"method": {"name": method}, "run": {"seed": seed}}))
            (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            dirs.append(str(run_dir))
    figures = _captured_axes(monkeypatch)
    out = tmp_path / "tta.png"
    assert main(["plot", *dirs, "--by-method", "--x", "time", "--center", "median", "--ylim", "60,95", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    (ax,) = figures[-1].axes
    assert ax.get_ylim() == (60.0, 95.0)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert sorted(lines) == ["BOME", "MEHA"]
    assert lines["MEHA"].get_xdata().tolist() == [0.0, 3.0, 6.0] and lines["MEHA"].get_ydata().tolist() == [10.0, 73.0, 84.0]


def test_ylim_overrides_the_value_axis_and_is_checked(tmp_path, monkeypatch):
    figures = _captured_axes(monkeypatch)
    plot_runs({"slow": SEEDS}, "test_accuracy", tmp_path / "y.png", x="time", center="median", ylim=(60.0, 95.0))
    assert figures[-1].axes[0].get_ylim() == (60.0, 95.0)
    with pytest.raises(ValueError, match="low < high"):
        plot_runs({"slow": SEEDS}, "test_accuracy", tmp_path / "y.png", ylim=(95.0, 60.0))


def test_plot_command_bad_ylim_is_one_line(tmp_path, capsys):
    from bilevel.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log.jsonl").write_text('{"iteration": 0, "time": 0.0, "f1": 0.5}\n')
    assert main(["plot", str(run_dir), "--metric", "f1", "--ylim", "60", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bilevel: error: --ylim '60' is not two numbers") and err.count("\n") == 1


def test_against_samples_on_a_log_axis_the_median_and_band_over_seeds(tmp_path, monkeypatch):
    """x="samples" puts each point at the median of the seeds' samples seen; yscale="log"
    spans the decades from the start (included) to the lowest seed."""
    figures = _captured_axes(monkeypatch)
    seeds = [
        [{"iteration": 0, "time": 0.0, "samples": 0, "suboptimality": 10.0}, {"iteration": 50, "time": t, "samples": n, "suboptimality": v}]
        for t, n, v in ((1.0, 100, 1e-4), (2.0, 300, 1e-2), (3.0, 200, 1e-3))
    ]
    paths = plot_runs({"SABA": seeds}, "suboptimality", tmp_path / "s.png", x="samples", center="median", yscale="log")
    assert paths == [tmp_path / "s.png"]
    (ax,) = figures[-1].axes
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "samples seen"
    line = ax.get_lines()[0]
    assert line.get_xdata().tolist() == [0.0, 200.0] and line.get_ydata().tolist() == [10.0, 1e-3]
    low, high = ax.get_ylim()
    assert 1e-5 < low < 1e-4 and 10.0 < high < 20.0 and not ax.texts  # the start is on the axis, no note
    with pytest.raises(ValueError, match="yscale='symlog' is not one of 'linear', 'log'"):
        plot_runs({"SABA": seeds}, "suboptimality", tmp_path / "t.png", yscale="symlog")
    with pytest.raises(ValueError, match="lack 'samples'"):
        plot_runs({"A": [RUN_A]}, "f1", tmp_path / "u.png", x="samples")
