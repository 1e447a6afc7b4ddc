"""Output folders, exit codes and --data-dir of the command line (bilevel.cli.main).

What is protected: a finished run is never overwritten without --overwrite; --overwrite
removes only what bilevel wrote; a run that fails before its first iteration leaves the
folder byte for byte as it was; a write that fails keeps the result and exits 3.
"""

import errno
import json
import sys
import tempfile
from types import SimpleNamespace

import pytest
import yaml

import bilevel.experiments.runner as runner
from bilevel.cli import main
from helpers import log_records as records

pytestmark = pytest.mark.usefixtures("preserve_rng")


def snapshot(folder):
    """Every file under ``folder`` with its bytes (``None`` when the folder does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(err):
    return err.count("\n") == 1 and "Traceback" not in err


# --- item 1: existing results are never overwritten by surprise ---------------------------


def test_run_refuses_a_folder_holding_a_finished_run(tiny_config, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", tiny_config, "run.max_iters=3", "--out", str(out), "--no-progress"]) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(["run", tiny_config, "run.max_iters=4", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and "already holds a bilevel run" in err and f"bilevel resume {out}" in err and "--overwrite" in err
    assert snapshot(out) == before


def test_bench_refuses_a_non_empty_folder(tiny_config, tmp_path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["bench", tiny_config, "--methods", "CG", "run.max_iters=2", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and "not empty" in err and "--overwrite" in err
    assert snapshot(out) == {"notes.txt": b"mine"}


def test_out_dot_never_replaces_a_hand_written_config(tiny_config, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.yaml").write_text("# my own notes\n")
    monkeypatch.chdir(work)
    assert main(["run", tiny_config, "run.max_iters=2", "--out", ".", "--no-progress"]) == 2
    assert "bilevel did not write it" in capsys.readouterr().err
    assert main(["run", tiny_config, "run.max_iters=2", "--out", ".", "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and "config.yaml was not written by bilevel" in err
    assert snapshot(work) == {"config.yaml": b"# my own notes\n"}


def test_overwrite_replaces_only_what_bilevel_wrote(tiny_config, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", tiny_config, "run.max_iters=4", "--out", str(out), "--no-progress"]) == 0
    (out / "notes.txt").write_text("keep me")
    assert main(["run", tiny_config, "run.max_iters=2", "method.name=BAGDC", "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert (out / "notes.txt").read_text() == "keep me"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"]["name"] == "BAGDC" and config["run"]["max_iters"] == 2
    assert [r["iteration"] for r in records(out)] == [0, 2]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "run" and "notes.txt" not in manifest["files"]


def test_a_run_that_fails_before_its_first_iteration_leaves_the_folder_as_it_was(tiny_config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    assert main(["run", tiny_config, "run.max_iters=2", "--out", str(out), "--no-progress"]) == 0
    before = snapshot(out)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails
    capsys.readouterr()
    # a new run with --overwrite that cannot start: the old run stays whole
    assert main(["run", tiny_config, "run.tensorboard=true", "--out", str(out), "--overwrite", "--no-progress"]) == 2
    assert "pip install tensorboard" in capsys.readouterr().err
    assert snapshot(out) == before
    # a resume that cannot start (the config asks for tensorboard) changes nothing either
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["run"]["tensorboard"] = True
    config["run"]["max_iters"] = 4
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    edited = snapshot(out)
    assert main(["resume", str(out), "--no-progress"]) == 2
    assert snapshot(out) == edited
    # a failed start into a new folder leaves no folder behind
    fresh = tmp_path / "new" / "run"
    assert main(["run", tiny_config, "run.tensorboard=true", "--out", str(fresh), "--no-progress"]) == 2
    assert not (tmp_path / "new").exists()


def test_overwrite_of_a_bench_removes_its_runs_and_keeps_other_files(tiny_config, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bench", tiny_config, "--methods", "CG,BAGDC", "run.max_iters=2", "--out", str(out), "--no-progress"]) == 0
    (out / "notes.txt").write_text("keep")
    assert main(["bench", tiny_config, "--methods", "BAGDC", "run.max_iters=2", "--out", str(out), "--overwrite", "--no-progress"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "CG-seed0" not in names and {"BAGDC-seed0", "notes.txt", "table.md", "manifest.json"} <= names
    assert (out / "notes.txt").read_text() == "keep"


# --- item 5 and the exit codes -----------------------------------------------------------


def test_exit_codes(tiny_config, tmp_path, monkeypatch, capsys):
    """0 done, 1 diverged, 2 bad input, 3 environment, 4 bug, 130 interrupted."""
    assert main(["run", tiny_config, "run.max_iters=2", "--out", str(tmp_path / "ok"), "--no-progress"]) == 0
    capsys.readouterr()

    assert (
        main(
            [
                "run",
                tiny_config,
                "method.name=BAGDC",
                "method.lr_lower=1e30",
                "method.stability_check=off",
                "--out",
                str(tmp_path / "div"),
                "--no-progress",
            ]
        )
        == 1
    )
    out, err = capsys.readouterr()
    assert one_line(err) and "diverged at iteration 1" in err and "diverged at iteration 1" in out
    assert json.loads((tmp_path / "div" / "summary.json").read_text())["status"] == "diverged"

    assert main(["run", tiny_config, "run.max_iters=x", "--no-progress"]) == 2
    assert one_line(capsys.readouterr().err)

    def no_memory(config):
        raise MemoryError()

    monkeypatch.setattr(runner, "build_experiment", no_memory)
    assert main(["run", tiny_config, "--out", str(tmp_path / "mem"), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert one_line(err) and "out of memory" in err

    def too_big(config):  # the library's refusal before allocating: a MemoryError and a ValueError
        from bilevel.validation import InsufficientMemoryError

        raise InsufficientMemoryError(
            "the mlp hyper-cleaning model needs about 12.5 GB but only 2.0 GB of memory is available: reduce hidden"
        )

    monkeypatch.setattr(runner, "build_experiment", too_big)
    assert main(["run", tiny_config, "--out", str(tmp_path / "big"), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert one_line(err) and "needs about 12.5 GB" in err

    def bug(config):
        raise RuntimeError("something impossible")

    monkeypatch.setattr(runner, "build_experiment", bug)
    assert main(["run", tiny_config, "--out", str(tmp_path / "bug"), "--no-progress"]) == 4
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("bilevel: internal error: RuntimeError: something impossible")


def test_an_unwritable_output_folder_fails_before_the_run_with_exit_3(tiny_config, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # the write probe (root ignores chmod)
    out = tmp_path / "new" / "run"
    assert main(["run", tiny_config, "--out", str(out), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert one_line(err) and "cannot write to the output folder" in err and str(out) in err
    assert not (tmp_path / "new").exists()


def test_a_full_disk_before_the_run_is_reported_with_exit_3(tiny_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000))
    assert main(["run", tiny_config, "--out", str(tmp_path / "r"), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert one_line(err) and "MB free" in err and "free some space" in err
    assert not (tmp_path / "r").exists()


def test_a_checkpoint_write_that_fails_keeps_the_result_and_exits_3(tiny_config, tmp_path, monkeypatch, capsys):
    solve_module = sys.modules["bilevel.solve"]  # `bilevel.solve` is the function

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(solve_module, "save_checkpoint", disk_full)
    out = tmp_path / "r"
    assert main(["run", tiny_config, "--out", str(out), "--no-progress"]) == 3
    printed, err = capsys.readouterr()
    assert "CG: max_iters after 6 iterations" in printed and "test_accuracy" in printed
    assert one_line(err) and "could not write the checkpoint" in err and "No space left on device" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 6 and summary["write_errors"]
    assert [r["iteration"] for r in records(out)] == [0, 2, 3, 4, 6]


def test_a_summary_write_that_fails_prints_the_summary_and_exits_3(tiny_config, tmp_path, monkeypatch, capsys):
    real = runner._write_json

    def full_for_summary(path, payload):
        if path.name == "summary.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, payload)

    monkeypatch.setattr(runner, "_write_json", full_for_summary)
    out = tmp_path / "r"
    assert main(["run", tiny_config, "--out", str(out), "--no-progress"]) == 3
    printed, err = capsys.readouterr()
    kept = json.loads(printed.strip().splitlines()[-1])
    assert kept["iterations"] == 6 and "f1" in kept["metrics"]
    assert one_line(err) and "summary.json" in err
    assert not (out / "summary.json").exists() and (out / "checkpoint.pt").is_file()


@pytest.mark.parametrize("where", ["after", "before"])
def test_ctrl_c_in_run_exits_130_and_resume_is_exact(tiny_config, tmp_path, monkeypatch, capsys, where):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["run", tiny_config, "method.name=BAGDC", "--out", str(full), "--no-progress"]) == 0
    real = runner._Recorder.on_log

    def interrupt_at_3(self, record):
        # "before": Ctrl-C lands during the evaluation of iteration 3; "after": once it is logged
        if where == "after":
            real(self, record)
        if record["iteration"] == 3:
            raise KeyboardInterrupt
        if where == "before":
            real(self, record)

    monkeypatch.setattr(runner._Recorder, "on_log", interrupt_at_3)
    capsys.readouterr()
    assert main(["run", tiny_config, "method.name=BAGDC", "--out", str(part), "--no-progress"]) == 130
    out, err = capsys.readouterr()
    assert "interrupted after 3 iterations" in out and one_line(err) and f"bilevel resume {part}" in err
    assert json.loads((part / "summary.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(runner._Recorder, "on_log", real)
    assert main(["resume", str(part), "--no-progress"]) == 0
    assert records(part) == records(full)


# --- item 7: --data-dir ------------------------------------------------------------------


def test_run_and_bench_accept_data_dir(tiny_config, tmp_path, capsys):
    data = tmp_path / "my data"
    data.mkdir()
    assert main(["run", tiny_config, "run.max_iters=1", "--data-dir", str(data), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["problem"]["data_dir"] == str(data)
    assert (
        main(
            [
                "bench",
                tiny_config,
                "--methods",
                "CG",
                "run.max_iters=1",
                "--data-dir",
                str(data),
                "--out",
                str(tmp_path / "b"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert yaml.safe_load((tmp_path / "b" / "CG-seed0" / "config.yaml").read_text())["problem"]["data_dir"] == str(data)


def test_data_dir_reaches_the_dataset_search(tmp_path, monkeypatch, capsys):
    from bilevel.data import sources

    monkeypatch.setitem(sources.KNOWN_LOCATIONS, "mnist", ())
    monkeypatch.delenv("BILEVEL_DATA_DIR", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(["run", "hyperclean_mnist_liu", "run.max_iters=1", "--data-dir", str(empty), "--out", str(tmp_path / "r"), "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err
    assert one_line(err) and "MNIST" in err and f"{empty} (root argument)" in err and "--data-dir DIR" in err
    assert not (tmp_path / "r").exists()


# --- item 9: usage -------------------------------------------------------------------------


def test_run_without_overrides_does_not_claim_they_are_required(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "required: CONFIG_OR_NAME" in err and "section.key=value" not in err.split("error:")[1]
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "optional overrides" in capsys.readouterr().out
