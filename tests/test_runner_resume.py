"""Resume compares config.yaml with the configuration the checkpoint was made with.

A checkpoint's state belongs to one method, data set, model, dtype and seed: resuming it
under another would silently mix two runs. Only keys that cannot change the iterates
already made (iterations, evaluation/logging/checkpoint cadence, display, data folder)
may change.
"""

import json

import pytest
import yaml

from bilevel.checkpoint import CheckpointError
from bilevel.cli import main
from bilevel.experiments import resume_run, run_experiment
from bilevel.experiments.runner import config_differences
from test_experiments import TINY

pytestmark = pytest.mark.usefixtures("preserve_rng")


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def edit_config(run_dir, **changes):
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        config[section][name] = value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture
def stopped_run(tmp_path):
    """A CG run stopped at iteration 4 of TINY (checkpoint and config.yaml on disk)."""
    run_dir = tmp_path / "run"
    run_experiment(TINY, run_dir, ["run.max_iters=4"], progress=False)
    return run_dir


@pytest.mark.parametrize(
    "changes,keys",
    [
        ({"method__name": "BAGDC"}, ["method.name 'CG' → 'BAGDC'"]),
        ({"problem__seed": 3}, ["problem.seed 0 → 3"]),
        ({"problem__model": "mlp"}, ["problem.model 'linear' → 'mlp'"]),
        ({"problem__dtype": "float64", "run__seed": 2}, ["problem.dtype 'float32' → 'float64'", "run.seed 0 → 2"]),
    ],
)
def test_resume_refuses_a_configuration_that_changes_the_state(stopped_run, changes, keys, capsys):
    edit_config(stopped_run, **changes)
    before = snapshot(stopped_run)
    assert main(["resume", str(stopped_run), "--max-iters", "6", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "differs from the configuration its checkpoint was made with" in err
    for key in keys:
        assert key in err
    assert snapshot(stopped_run) == before  # nothing rewritten: the user can undo the edit and resume


def test_resume_refusal_is_a_checkpoint_error_in_the_library(stopped_run):
    edit_config(stopped_run, method__lr_lower=0.25)
    with pytest.raises(CheckpointError, match=r"method.lr_lower 0.5 → 0.25"):
        resume_run(stopped_run, 6, progress=False)


def test_changes_that_cannot_alter_the_iterates_are_allowed(stopped_run, tmp_path):
    """More iterations, another cadence, another data folder: resumed, earlier records kept."""
    edit_config(stopped_run, run__max_iters=8, run__eval_every=2, run__checkpoint_every=0, run__progress=False)
    summary = resume_run(stopped_run, progress=False, data_dir=tmp_path)
    assert summary["status"] == "max_iters" and summary["iterations"] == 8
    lines = [json.loads(line) for line in (stopped_run / "log.jsonl").read_text().splitlines()]
    # iterations 0-4 with the old cadence (evaluated at 0 and 3), then every 2 (6, 8)
    assert [r["iteration"] for r in lines] == [0, 2, 3, 4, 6, 8]
    assert [r["iteration"] for r in lines if "f1" in r] == [0, 3, 6, 8]
    assert yaml.safe_load((stopped_run / "config.yaml").read_text())["problem"]["data_dir"] == str(tmp_path)


def test_an_edited_cadence_resumes_on_the_same_iterates(stopped_run, tmp_path):
    straight = run_experiment(TINY, tmp_path / "straight", ["run.max_iters=8"], progress=False)
    edit_config(stopped_run, run__eval_every=2, run__log_every=1)
    resumed = resume_run(stopped_run, 8, progress=False)
    assert resumed["final_record"] == {**straight["final_record"], "time": resumed["final_record"]["time"]}
    assert resumed["metrics"] == straight["metrics"]


def test_config_differences_ignores_the_resumable_keys():
    saved = {
        "name": "a",
        "run": {"max_iters": 4, "seed": 0},
        "problem": {"data_dir": None, "n_train": 100},
        "methods": {"CG": {"lr_lower": 1}},
    }
    current = {
        "name": "b",
        "run": {"max_iters": 9, "seed": 0},
        "problem": {"data_dir": "/d", "n_train": 200},
        "methods": {"CG": {"lr_lower": 2}},
    }
    assert config_differences(saved, current) == ["problem.n_train 100 → 200"]


def test_plateau_reason_is_a_pure_function_of_the_evaluations():
    """Stop when none of the last `patience` evaluations beats the best before them by more
    than min_delta; never with too few evaluations; the message names the best iteration."""
    from bilevel.experiments.runner import plateau_reason

    evals = [{"iteration": 10 * i, "val_accuracy": v} for i, v in enumerate([50.0, 70.0, 80.0, 80.05, 79.0])]
    assert plateau_reason(evals[:2], "val_accuracy", 2, 0.1) is None  # too few
    assert plateau_reason(evals[:4], "val_accuracy", 2, 0.1) is None  # 80.0 beat 70.0
    reason = plateau_reason(evals, "val_accuracy", 2, 0.1)  # 80.05 and 79.0 vs 80.0
    assert reason is not None and "iteration 20" in reason and "80.00" in reason
    assert plateau_reason(evals, "val_accuracy", 2, 0.01) is None  # 80.05 > 80.0 + 0.01
    assert plateau_reason(evals, "val_accuracy", 4, 0.1) is None  # 70, 80 ... beat 50


def test_a_bench_run_stopped_on_validation_resumes_as_done_and_matches_a_straight_run(tmp_path):
    """run.stop_patience ends a run at a validation plateau (status 'stopped', counted in
    the bench's means); an early-stopped run stops where the evaluations say, so a rerun
    with a larger max_iters stops at the same iteration with the same iterates; a problem
    without val_accuracy is refused in one line."""
    from bilevel.experiments import run_bench
    from bilevel.experiments.runner import resume_bench

    overrides = ["run.max_iters=60", "run.eval_every=3", "run.stop_patience=1", "run.stop_min_delta=100"]
    bench = run_bench(TINY, ["BAGDC"], [0], overrides, out=tmp_path / "b", progress=False)
    summary = json.loads((tmp_path / "b" / "BAGDC-seed0" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["iterations"] == 3  # evaluations at 0 and 3: 3 is not 100 points better
    assert "plateaued" in summary["message"] and "run.stop_patience" in summary["message"]
    assert bench["unfinished"] == [] and "| BAGDC |" in bench["table"]  # in the table: a completed run
    again = resume_bench(tmp_path / "b", progress=False)
    assert again["table"] == bench["table"] and again["runs"] == bench["runs"]
    longer = run_experiment(TINY, tmp_path / "r", ["method.name=BAGDC", *overrides[1:], "run.max_iters=90"], progress=False)
    assert longer["iterations"] == 3 and longer["metrics"] == summary["metrics"]
