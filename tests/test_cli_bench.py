"""Benches survive Ctrl-C and divergence: exit status, table, manifest, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bilevel.experiments.runner as runner
from bilevel.cli import main
from bilevel.experiments.runner import format_bench_table
from helpers import log_records as records

pytestmark = pytest.mark.usefixtures("preserve_rng")


def statuses(out):
    return {r["dir"]: r["status"] for r in json.loads((out / "manifest.json").read_text())["runs"]}


def test_a_diverging_method_is_marked_and_the_others_reported(tiny_config, tmp_path, capsys):
    out = tmp_path / "b"
    argv = [
        "bench",
        tiny_config,
        "--methods",
        "CG,BAGDC",
        "--seeds",
        "0,1",
        "methods.BAGDC.lr_lower=1e30",
        "methods.BAGDC.stability_check=off",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 1
    printed, err = capsys.readouterr()
    table = (out / "table.md").read_text()
    assert table.strip() in printed
    lines = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    # no completed run: no accuracy, and no retrained accuracy either (the last "-" before the notes)
    assert lines["BAGDC"].startswith("| BAGDC | - | - | - | - | - | seed 0: diverged at iteration 1; seed 1: diverged at iteration 1 |")
    assert " ± " in lines["CG"] and "| 6 |" in lines["CG"]
    assert err.count("\n") == 1 and "2 of 4 runs diverged" in err and "BAGDC seed 0 at iteration 1" in err
    assert statuses(out) == {"CG-seed0": "max_iters", "CG-seed1": "max_iters", "BAGDC-seed0": "diverged", "BAGDC-seed1": "diverged"}
    assert json.loads((out / "bench.json").read_text())["complete"] is True


def test_ctrl_c_stops_the_bench_and_resume_finishes_it(tiny_config, tmp_path, monkeypatch, capsys):
    full, out = tmp_path / "full", tmp_path / "b"
    argv = [
        "bench",
        tiny_config,
        "--methods",
        "CG,BAGDC,CG-slow",
        "--seeds",
        "0",
        "methods.CG-slow.method=CG",
        "methods.CG-slow.lr_upper=0.05",
        "--no-progress",
    ]
    assert main([*argv, "--out", str(full)]) == 0
    real = runner._Recorder.on_log

    def ctrl_c_in_bagdc(self, record):
        real(self, record)
        if self.bar.desc == "BAGDC seed 0 (2/3)" and record["iteration"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner._Recorder, "on_log", ctrl_c_in_bagdc)
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 130
    printed, err = capsys.readouterr()
    assert err.count("\n") == 1 and "2 of 3 runs unfinished" in err and f"bilevel resume {out}" in err
    assert "seed 0: interrupted at iteration 3 of 6" in printed and "seed 0: not run" in printed
    assert statuses(out) == {"CG-seed0": "max_iters", "BAGDC-seed0": "interrupted", "CG-slow-seed0": "pending"}
    assert not (out / "CG-slow-seed0").exists()
    bench = json.loads((out / "bench.json").read_text())
    assert bench["complete"] is False and bench["status"]["BAGDC-seed0"] == "interrupted"
    assert not (out / "baselines-seed0.json").exists()  # Ctrl-C exits at once: the baselines wait for the resume

    monkeypatch.setattr(runner._Recorder, "on_log", real)
    assert main(["resume", str(out), "--no-progress"]) == 0
    assert statuses(out) == statuses(full)
    for name in ("CG-seed0", "BAGDC-seed0", "CG-slow-seed0"):
        assert records(out / name) == records(full / name), name
    done, reference = json.loads((out / "bench.json").read_text()), json.loads((full / "bench.json").read_text())
    assert done["complete"] is True
    assert (out / "baselines-seed0.json").read_text() == (full / "baselines-seed0.json").read_text()
    for method in ("CG", "BAGDC", "CG-slow"):
        assert done["runs"][method][0]["metrics"] == reference["runs"][method][0]["metrics"]
    assert main(["resume", str(out), "--max-iters", "9"]) == 2


def test_the_table_reports_one_seed_without_a_zero_std_and_notes_unfinished_runs():
    done = {"status": "max_iters", "seed": 0, "metrics": {"test_accuracy": 85.123, "f1": 0.8912}, "time": 12.34, "iterations": 200}
    other = {**done, "seed": 1, "metrics": {"test_accuracy": 87.123, "f1": 0.9012}}
    stopped = {"status": "interrupted", "seed": 1, "iterations": 37, "max_iters": 200, "metrics": {"test_accuracy": 50.0}, "time": 1.0}
    table = format_bench_table({"GALET": [done], "CG": [done, other], "BAGDC": [done, stopped]}, "hyperclean")
    rows = table.splitlines()
    assert rows[0] == "| method | test acc (%) | F1 | time (s) | iterations | notes |"
    assert rows[2] == "| GALET | 85.12 | 0.891 | 12.3 | 200 |  |"
    assert rows[3] == "| CG | 86.12 ± 1.00 | 0.896 ± 0.005 | 12.3 ± 0.0 | 200 |  |"
    assert rows[4] == "| BAGDC | 85.12 | 0.891 | 12.3 | 200 | seed 1: interrupted at iteration 37 of 200 |"
    assert "notes" not in format_bench_table({"GALET": [done]}, "hyperclean")


def _wait_for(predicate, timeout, proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def _logged_iterations(run_dir):
    try:
        return [json.loads(line)["iteration"] for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def test_sigint_to_a_bench_subprocess_exits_130_and_resume_completes_it(tmp_path):
    """A real Ctrl-C (SIGINT) to `python -m bilevel bench`, then `bilevel resume BENCH_DIR`."""
    out = tmp_path / "bench"
    n = 2000  # about 3 s of steps: the interrupt lands well inside the run, however fast the machine
    sizes = [
        "problem.n_train=200",
        "problem.n_val=100",
        "problem.n_test=200",
        "problem.baseline_steps=20",
        f"run.max_iters={n}",
        "run.log_every=10",
        "run.eval_every=500",
        "run.checkpoint_every=0",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(runner.__file__).parents[2])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bilevel",
            "bench",
            "hyperclean_demo",
            "--methods",
            "BAGDC",
            "--seeds",
            "0,1",
            *sizes,
            "--out",
            str(out),
            "--no-progress",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = out / "BAGDC-seed0"
        # inside the iterations: iteration 0 (written when solve starts) and a later record
        assert _wait_for(lambda: any(k > 0 for k in _logged_iterations(first)), 120, proc), proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("bilevel: interrupted: 2 of 2 runs unfinished")
    assert "Traceback" not in stderr
    assert "seed 0: interrupted at iteration" in stdout and "seed 1: not run" in stdout
    summary = json.loads((first / "summary.json").read_text())
    stopped_at = summary["iterations"]
    assert summary["status"] == "interrupted" and 0 < stopped_at < n
    assert json.loads((out / "bench.json").read_text())["status"] == {"BAGDC-seed0": "interrupted", "BAGDC-seed1": "pending"}
    assert "interrupted at iteration" in (out / "table.md").read_text()

    assert main(["resume", str(out), "--no-progress"]) == 0
    bench = json.loads((out / "bench.json").read_text())
    assert bench["complete"] is True and set(bench["status"].values()) == {"max_iters"}
    assert [s["iterations"] for s in bench["runs"]["BAGDC"]] == [n, n]
    iterations = _logged_iterations(first)
    assert iterations == sorted(set(iterations)) and iterations[-1] == n and len(iterations) == n // 10 + 1
    assert "interrupted" not in (out / "table.md").read_text() and (out / "test_accuracy.png").is_file()


def test_the_hyperclean_table_carries_the_validated_baselines_computed_once_per_seed(tiny_config, tmp_path, capsys, monkeypatch):
    calls = []
    original = runner.strong_baselines

    def counting(config):
        calls.append(config.run.seed)
        return original(config)

    monkeypatch.setattr(runner, "strong_baselines", counting)
    out = tmp_path / "b"
    assert main(["bench", tiny_config, "--methods", "CG,BAGDC", "--seeds", "0,1", "--out", str(out), "--no-progress"]) == 0
    assert sorted(calls) == [0, 1]  # once per seed, not once per method and seed
    table = (out / "table.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    for label in (
        "baseline: validation set only",
        "baseline: noisy train + validation",
        "baseline: noisy train, early stopping on validation",
        "baseline: no cleaning (x = 0), step count chosen on validation",
        "baseline: oracle: truly clean train + validation",
        "no cleaning (x = 0, fixed step count)",
    ):
        assert label in rows and " ± " in rows[label]
    cached = json.loads((out / "baselines-seed1.json").read_text())
    assert set(cached) == {"val_only", "noisy_plus_val", "noisy_early_stop", "no_cleaning", "oracle"}
    assert all(0.0 <= row["test_accuracy"] <= 100.0 and row["lr"] > 0 for row in cached.values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"baselines-seed0.json", "baselines-seed1.json"} <= set(manifest["files"])  # --overwrite may remove them
    bench = json.loads((out / "bench.json").read_text())
    assert bench["baselines"]["validated"][1] == cached
    capsys.readouterr()
    calls.clear()
    assert main(["resume", str(out), "--no-progress"]) == 0  # the report is rebuilt from the cached baselines
    assert calls == []
    assert (out / "table.md").read_text() == table


def test_the_hyperclean_table_reports_the_accuracy_retrained_with_each_runs_learned_weights(tiny_config, tmp_path, capsys, monkeypatch):
    import yaml

    from bilevel.checkpoint import load_checkpoint
    from bilevel.experiments.baselines import retrain_with_weights
    from bilevel.experiments.config import resolve

    out = tmp_path / "b"
    assert main(["bench", tiny_config, "--methods", "CG,BAGDC", "--seeds", "0", "--out", str(out), "--no-progress"]) == 0
    table = (out / "table.md").read_text()
    header, _, *lines = table.splitlines()
    assert header == "| method | test acc (%) | F1 | time (s) | iterations | retrained acc (%) |"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines}
    for method in ("CG", "BAGDC"):
        cached = json.loads((out / f"retrained-{method}-seed0.json").read_text())
        # the same as retraining by hand on the run's final weights (steps chosen on validation)
        config = resolve(yaml.safe_load((out / f"{method}-seed0" / "config.yaml").read_text()))
        x = load_checkpoint(out / f"{method}-seed0" / "checkpoint.pt")["state"].x
        direct = retrain_with_weights(runner._hyperclean_data(config), x, "linear", 0.0, 0)
        assert cached["test_accuracy"] == direct["test_accuracy"] and cached["iterations"] == 6
        assert rows[method][4] == f"{direct['test_accuracy']:.2f}"
    # the baselines are trained that way already: their retrained cell repeats their accuracy
    assert rows["baseline: validation set only"][0] == rows["baseline: validation set only"][4]
    assert rows["no cleaning (x = 0, fixed step count)"][4] == "-"
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"retrained-CG-seed0.json", "retrained-BAGDC-seed0.json"} <= set(manifest["files"])
    assert json.loads((out / "bench.json").read_text())["retrained_test_accuracy"]["BAGDC"] == [direct["test_accuracy"]]

    def refuse(*args):
        raise AssertionError("a kept retraining was recomputed")

    monkeypatch.setattr(runner, "retrained_accuracy", refuse)
    capsys.readouterr()
    assert main(["resume", str(out), "--no-progress"]) == 0
    assert (out / "table.md").read_text() == table
