import csv
import json

import pytest

import bilevel as bl
from bilevel.problems import T1g

pytestmark = pytest.mark.usefixtures("preserve_rng")


def _aid():
    return bl.AID(lr_upper=0.2, lr_lower=0.5, lower_steps=3, solver=bl.CG(steps=4))


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_logger_writes_one_line_per_logged_record(tmp_path):
    path = tmp_path / "logs" / "run.jsonl"
    result = bl.solve(T1g(n=4), _aid(), max_iters=10, log_every=3, callbacks=[bl.JSONLinesLogger(path, flush_every=2)])
    lines = path.read_text().splitlines()
    assert len(lines) == len(result.history) == 4
    records = [json.loads(line) for line in lines]
    assert records == result.history  # same keys, exact float round trip
    assert [r["iteration"] for r in records] == [3, 6, 9, 10]
    assert set(records[0]) == {"iteration", "time", "upper_loss", "lower_grad_sq", "direction_sq", "linsys_residual_sq", "stationarity"}


def test_jsonl_logger_overwrites_a_previous_fresh_run(tmp_path):
    path = tmp_path / "run.jsonl"
    bl.solve(T1g(n=4), _aid(), max_iters=5, callbacks=[bl.JSONLinesLogger(path)])
    bl.solve(T1g(n=4), _aid(), max_iters=3, callbacks=[bl.JSONLinesLogger(path)])
    assert [r["iteration"] for r in _read_jsonl(path)] == [1, 2, 3]


def test_csv_logger_writes_a_header_and_one_row_per_record(tmp_path):
    path = tmp_path / "run.csv"
    result = bl.solve(T1g(n=4), _aid(), max_iters=7, log_every=2, callbacks=[bl.CSVLogger(path)])
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(result.history) == 4
    assert list(rows[0]) == list(result.history[0])
    for row, rec in zip(rows, result.history, strict=True):
        assert int(row["iteration"]) == rec["iteration"]
        for key in rec:
            assert float(row[key]) == rec[key]
    assert path.read_text().count("\n") == 5


def test_progress_bar_disabled_runs_and_tracks_iterations():
    bar = bl.ProgressBar(disable=True, keys=("stationarity", "upper_loss"))
    result = bl.solve(T1g(n=4), _aid(), max_iters=6, log_every=2, callbacks=[bar])
    assert result.iterations == 6
    assert bar._last == 6


def test_callbacks_receive_start_log_and_end():
    events = []

    class Spy:
        def on_start(self, run):
            events.append(("start", run["start"], run["max_iters"], run["method"].name))

        def on_log(self, record):
            events.append(("log", record["iteration"]))

        def on_end(self, result):
            events.append(("end", result.status.value))

    class OnlyLog:
        def on_log(self, record):
            events.append(("only", record["iteration"]))

    bl.solve(T1g(n=4), _aid(), max_iters=3, callbacks=[Spy(), OnlyLog()])
    assert events == [
        ("start", 0, 3, "AID"),
        ("log", 1),
        ("only", 1),
        ("log", 2),
        ("only", 2),
        ("log", 3),
        ("only", 3),
        ("end", "max_iters"),
    ]


def test_jsonl_logger_on_resume_keeps_earlier_lines(tmp_path):
    problem, log = T1g(n=4), tmp_path / "run.jsonl"
    ckpt20, ckpt = tmp_path / "at20.pt", tmp_path / "ckpt.pt"
    bl.solve(problem, _aid(), max_iters=20, checkpoint=ckpt20, callbacks=[bl.JSONLinesLogger(log)])
    # continue to 30 (appending 21..30), then restart from the iteration-20 checkpoint to 40
    bl.solve(problem, _aid(), max_iters=30, resume=ckpt20, checkpoint=ckpt, callbacks=[bl.JSONLinesLogger(log)])
    assert [r["iteration"] for r in _read_jsonl(log)] == list(range(1, 31))
    result = bl.solve(problem, _aid(), max_iters=40, resume=ckpt20, callbacks=[bl.JSONLinesLogger(log)])
    records = _read_jsonl(log)
    assert [r["iteration"] for r in records] == list(range(1, 41))  # 21..30 of the abandoned run are dropped
    assert records == result.history


def test_tensorboard_logger_reports_a_missing_package_clearly(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("no tensorboard")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        bl.TensorBoardLogger(tmp_path).on_start({})


def test_jsonl_logger_keeps_the_records_logged_before_a_divergence_error(tmp_path):
    path = tmp_path / "run.jsonl"
    logger = bl.JSONLinesLogger(path)
    method = bl.AID(lr_upper=3.0, lr_lower=0.5, lower_steps=5, solver=bl.CG(steps=6))
    with pytest.raises(bl.DivergenceError):
        bl.solve(T1g(n=6), method, max_iters=500, callbacks=[logger])
    iterations = [r["iteration"] for r in _read_jsonl(path)]
    assert len(iterations) >= 2 and iterations == list(range(1, len(iterations) + 1))


def test_progress_bar_names_the_run_and_keeps_the_latest_values(capsys):
    """The label says which run (a bench: "GALET seed 0 (1/6)"); an evaluation metric
    logged every few records stays shown between them."""
    bar = bl.ProgressBar(keys=("upper_loss", "test_accuracy"), desc="GALET seed 0 (1/6)")
    bar.on_start({"start": 0, "max_iters": 30, "method": None})
    bar.on_log({"iteration": 10, "upper_loss": 0.51234, "test_accuracy": 81.257})
    bar.on_log({"iteration": 20, "upper_loss": 0.4321})
    assert bar.shown == {"upper_loss": "0.4321", "test_accuracy": "81.26"}
    bar._bar.refresh()
    bar.on_end(None)
    err = capsys.readouterr().err
    assert "GALET seed 0 (1/6)" in err and "test_accuracy=81.26" in err and "upper_loss=0.4321" in err


def test_csv_logger_on_resume_keeps_the_rows_up_to_the_resume_point(tmp_path):
    problem, log = T1g(n=4), tmp_path / "run.csv"
    ckpt20 = tmp_path / "at20.pt"
    bl.solve(problem, _aid(), max_iters=20, checkpoint=ckpt20)
    bl.solve(problem, _aid(), max_iters=30, resume=ckpt20, callbacks=[bl.CSVLogger(log)])
    result = bl.solve(problem, _aid(), max_iters=25, resume=ckpt20, callbacks=[bl.CSVLogger(log)])
    with log.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["iteration"]) for row in rows] == list(range(21, 26))  # 26..30 of the abandoned run are dropped
    assert [float(row["stationarity"]) for row in rows] == [r["stationarity"] for r in result.history[20:]]


def test_csv_logger_resuming_an_empty_file_writes_the_header_on_the_first_record(tmp_path):
    log = tmp_path / "run.csv"
    log.write_text("")
    logger = bl.CSVLogger(log)
    logger.on_start({"start": 5})
    logger.on_log({"iteration": 6, "stationarity": 0.5})
    logger.on_end(None)
    assert log.read_text().splitlines() == ["iteration,stationarity", "6,0.5"]


@pytest.mark.parametrize(
    "make",
    [
        lambda p: bl.ProgressBar(disable=True),
        lambda p: bl.JSONLinesLogger(p / "log.jsonl"),
        lambda p: bl.CSVLogger(p / "log.csv"),
        lambda p: bl.TensorBoardLogger(p),
    ],
    ids=["progress", "jsonl", "csv", "tensorboard"],
)
def test_a_record_before_on_start_is_refused_naming_the_callback(tmp_path, make):
    callback = make(tmp_path)
    with pytest.raises(RuntimeError, match=rf"^{type(callback).__name__}\.on_start\(run\) must be called before on_log"):
        callback.on_log({"iteration": 1, "stationarity": 1.0})
    callback.on_end(None)  # ending a callback that never started is harmless


def test_tensorboard_logger_writes_every_diagnostic_but_the_iteration(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("open", log_dir))

        def add_scalar(self, key, value, step):
            calls.append((key, value, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    logger = bl.TensorBoardLogger(tmp_path / "tb")
    logger.on_start({"start": 0})
    logger.on_log({"iteration": 3, "stationarity": 0.25, "upper_loss": 1.5})
    logger.on_end(None)
    assert calls == [("open", str(tmp_path / "tb")), ("stationarity", 0.25, 3), ("upper_loss", 1.5, 3), ("close",)]


def test_python_dash_m_bilevel_runs_the_command_line():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "bilevel", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "usage: bilevel" in done.stdout
