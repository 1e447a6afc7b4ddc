"""The bilevel command line, called through bilevel.cli.main."""

import json

import pytest

from bilevel.cli import main
from helpers import log_records as records


def test_run_prints_summary_and_writes_run_dir(tiny_config, tmp_path, capsys):
    assert main(["run", tiny_config, "run.max_iters=3", "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "CG: max_iters after 3 iterations" in out and "test_accuracy" in out and str(tmp_path / "r") in out
    assert (tmp_path / "r" / "summary.json").is_file()


@pytest.mark.parametrize("stop", [2, 4])
def test_resume_is_exact(tiny_config, tmp_path, stop):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["run", tiny_config, "method.name=BAGDC", "--out", str(full), "--no-progress"]) == 0
    assert main(["run", tiny_config, "method.name=BAGDC", f"run.max_iters={stop}", "--out", str(part), "--no-progress"]) == 0
    assert records(part)[-1]["iteration"] == stop
    assert main(["resume", str(part), "--max-iters", "6", "--no-progress"]) == 0
    assert records(part) == records(full)
    assert json.loads((part / "summary.json").read_text())["metrics"] == json.loads((full / "summary.json").read_text())["metrics"]


def test_bench_writes_table_and_plots(tiny_config, tmp_path, capsys):
    out = tmp_path / "bench"
    assert (
        main(["bench", tiny_config, "--methods", "CG,BAGDC", "--seeds", "0,1", "run.max_iters=3", "--out", str(out), "--no-progress"]) == 0
    )
    printed = capsys.readouterr().out
    assert "| method | test acc (%) | F1 | time (s) | iterations |" in printed
    assert "| CG |" in printed and "| BAGDC |" in printed and "no cleaning" in printed
    for name in ("table.md", "bench.json", "test_accuracy.png", "test_accuracy.svg", "f1.png", "f1.svg", "CG-seed1/log.jsonl"):
        assert (out / name).is_file(), name
    assert str(out / "test_accuracy.png") in printed


def test_plot_command(tiny_config, tmp_path, capsys):
    main(["run", tiny_config, "run.max_iters=3", "--out", str(tmp_path / "a"), "--no-progress"])
    main(["run", tiny_config, "run.max_iters=3", "method.name=BAGDC", "--out", str(tmp_path / "b"), "--no-progress"])
    target = tmp_path / "plot.svg"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--metric", "f1", "--out", str(target)]) == 0
    assert target.is_file() and "<svg" in target.read_text()[:400]


def test_list_and_data(capsys):
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "hyperclean_demo" in listed and "fewshot_omniglot" in listed
    assert main(["data"]) == 0
    assert "mnist5k" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["run", "no_such_config"], "no configuration file"),
        (["run", "TINY", "run.max_iter=3"], "valid run keys"),
        (["run", "TINY", "problem.dataset=omniglot_missing"], "omniglot_missing"),
        (["resume", "MISSING"], "not a run directory"),
        (["bench", "TINY", "--methods", "CG", "--seeds", "a,b"], "--seeds"),
        (["plot", "MISSING", "--out", "x.png"], "no log.jsonl"),
    ],
)
def test_errors_exit_2_with_one_line(argv, message, tiny_config, tmp_path, capsys):
    argv = [tiny_config if a == "TINY" else str(tmp_path / "nothing") if a == "MISSING" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bilevel: error:") and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_checkpoint_is_a_clear_error(tiny_config, tmp_path, capsys):
    main(["run", tiny_config, "run.max_iters=2", "--out", str(tmp_path / "r"), "--no-progress"])
    (tmp_path / "r" / "checkpoint.pt").unlink()
    assert main(["resume", str(tmp_path / "r")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_a_bad_configuration_under_nproc_is_one_line_before_any_process_starts(tiny_config, tmp_path, capsys, monkeypatch):
    """``bilevel run --nproc 2`` resolves the configuration first: an error is one line from
    this process, not one per launched process with torchrun's traceback."""
    from bilevel import distributed

    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("torchrun launched"))
    assert main(["run", tiny_config, "method.name=Nope", "--nproc", "2", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method 'Nope'" in err and not (tmp_path / "r").exists()
