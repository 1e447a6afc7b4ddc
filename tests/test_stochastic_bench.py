"""``problem.kind: stochastic``: benchopt's stochastic problems run by ``bilevel run`` / ``bench``.

The presets are benchopt's published best parameters (the benchmark script's), a bench
writes the median-and-band table and the plots against time and samples, a stochastic run
resumes bit for bit (sampling is a pure function of (seed, iteration)), and the quadratic's
‖∇F(x)‖² falls under SABA.
"""

import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bilevel as bl
from bilevel.checkpoint import load_checkpoint
from bilevel.cli import main
from bilevel.experiments import ConfigError, apply_overrides, build_experiment, load_config, resolve_config, resume_run, run_experiment
from bilevel.experiments.runner import build_method, read_log
from bilevel.problems.benchmark import samples_per_iteration, samples_seen, stochastic_benchmark
from bilevel.updates import as_upper_optimizer

pytestmark = pytest.mark.usefixtures("preserve_rng")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
CONFIGS = {"stochastic_quadratic": "BEST_QUADRATIC", "stochastic_datacleaning": "BEST_DATACLEANING", "stochastic_logreg": "BEST_LOGREG"}
#: a small quadratic, so that a run is a fraction of a second
SMALL = ["problem.n_lower=512", "problem.n_upper=256", "run.progress=false"]


@pytest.fixture(scope="module")
def benchmark_script():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("stochastic")
    finally:
        sys.path.remove(str(BENCHMARKS))


def _same_option(ours, theirs):
    if isinstance(theirs, float) and isinstance(ours, float):
        return ours == pytest.approx(theirs, rel=1e-12)
    if isinstance(theirs, bl.Polynomial) and isinstance(ours, bl.Polynomial):
        return all(_same_option(float(getattr(ours, f)), float(getattr(theirs, f))) for f in ("value", "power", "shift"))
    return ours == theirs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_presets_are_the_benchmark_scripts_parameters(name, benchmark_script):
    """Every preset of the three configurations builds the method benchmarks/stochastic.py
    runs with benchopt's best parameters (make_method): the same class and options, the
    upper step as the same plain gradient step."""
    raw = load_config(name)
    best = getattr(benchmark_script, CONFIGS[name])
    assert set(raw["methods"]) == set(best)
    for method_name in best:
        resolved = resolve_config(apply_overrides(raw, [f"method.name={method_name}"]))
        assert resolved["problem"]["kind"] == "stochastic" and resolved["problem"]["batch_size"] == 64
        ours = build_method(resolved["method"])
        theirs = benchmark_script.make_method(method_name, best[method_name])
        assert type(ours) is type(theirs)
        for field in ours.__dataclass_fields__:
            a, b = getattr(ours, field), getattr(theirs, field)
            if field == "lr_upper":
                a, b = as_upper_optimizer(a, field).lr, as_upper_optimizer(b, field).lr
            assert _same_option(a, b), (method_name, field, a, b)


def test_a_bench_writes_the_median_table_and_both_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "stochastic_quadratic", "--methods", "SABA,SRBA", "--seeds", "0,1", *SMALL]
    argv += ["run.max_iters=40", "run.eval_every=10", "run.log_every=10", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    table = (out / "table.md").read_text()
    assert table.strip() in printed
    for stem in ("suboptimality-time", "suboptimality-samples"):
        for suffix in (".png", ".svg"):
            assert (out / f"{stem}{suffix}").stat().st_size > 1000
    assert not list(out.glob("baselines-*")) and not list(out.glob("retrained-*"))  # hyper-cleaning's parts are skipped
    header, _, *rows = table.splitlines()
    assert header.startswith("| method | final ‖∇F(x)‖²: median [min, max] | time (s): median [min, max] | samples seen")
    cells = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in rows}
    assert set(cells) == {"SABA", "SRBA"}
    for method in ("SABA", "SRBA"):
        finals = [json.loads((out / f"{method}-seed{s}" / "summary.json").read_text())["metrics"]["suboptimality"] for s in (0, 1)]
        assert finals[0] != finals[1]  # two seeds, two draws
        median, band = cells[method][0].split(" [")
        assert float(median) == pytest.approx(float(np.median(finals)), rel=1e-3)
        assert band == f"{min(finals):.3e}, {max(finals):.3e}]"
        assert cells[method][3] == "40"
    # samples: the benchmark's count, 2b per SABA iteration, SRBA's full refreshes of n + m every q iterations
    assert cells["SABA"][2].startswith(f"{40 * 2 * 64:,} [")
    q = int((512 + 256) * 0.5 / 64)
    assert cells["SRBA"][2].startswith(f"{math.ceil(40 / q) * 768 + (40 - math.ceil(40 / q)) * 4 * 64:,} [")
    bench = json.loads((out / "bench.json").read_text())
    assert bench["complete"] and bench["baselines"]["validated"] == [] and bench["retrained_test_accuracy"] is None


def test_the_log_holds_the_metric_time_and_samples_at_every_evaluation(tmp_path):
    config = load_config("stochastic_quadratic")
    run_experiment(config, tmp_path / "run", [*SMALL, "method.name=SRBA", "run.max_iters=30", "run.eval_every=10"], progress=False)
    evaluations = [r for r in read_log(tmp_path / "run") if "suboptimality" in r]
    assert [r["iteration"] for r in evaluations] == [0, 10, 20, 30]
    exp = build_experiment(apply_overrides(config, [*SMALL, "method.name=SRBA"]))
    for record in evaluations:
        assert record["samples"] == samples_seen(exp.method, exp.data, record["iteration"])
        assert record["time"] >= 0.0
    assert [r["time"] for r in evaluations] == sorted(r["time"] for r in evaluations)


def test_samples_seen_counts_srba_refreshes_as_the_iterations_draw_them():
    bench = stochastic_benchmark("quadratic", n_lower=300, n_upper=100, dim_x=2, dim_y=3)
    streams = bench.streams(batch_size=32, seed=0)
    method = bl.SRBA(period_frac=0.25)  # q = int(400 · 0.25 / 32) = 3
    counted, total = [0.0], 0.0
    for k in range(10):
        total += 400 if k % 3 == 0 else samples_per_iteration(method, 32)
        counted.append(total)
    assert [samples_seen(method, streams, k) for k in range(11)] == counted
    assert samples_seen(bl.StocBiO(lower_steps=4, neumann_steps=5), streams, 7) == 7 * (4 + 5 + 1 + 1) * 32


def _tensors(value):
    """Every tensor in nested dicts, lists and tuples, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value, key=str) for t in _tensors(value[key])]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


@pytest.mark.parametrize("method", ["SABA", "SRBA", "StocBiO", "F2SA"])
def test_an_interrupted_stochastic_run_resumes_bit_for_bit(tmp_path, method):
    config = load_config("stochastic_quadratic")
    overrides = [*SMALL, f"method.name={method}", "run.eval_every=6", "run.log_every=3", "run.checkpoint_every=3"]
    run_experiment(config, tmp_path / "straight", [*overrides, "run.max_iters=24"], progress=False)
    run_experiment(config, tmp_path / "stopped", [*overrides, "run.max_iters=10"], progress=False)
    resume_run(tmp_path / "stopped", max_iters=24, progress=False)
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["state"]
    resumed = load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")["state"]
    assert straight.k == resumed.k == 24
    a, b = _tensors(straight.to_dict()), _tensors(resumed.to_dict())
    assert len(a) == len(b) and len(a) >= 2
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    logs = [[{k: v for k, v in r.items() if k != "time"} for r in read_log(tmp_path / d)] for d in ("straight", "stopped")]
    assert logs[0] == logs[1]


def test_saba_drives_the_quadratics_suboptimality_down(tmp_path):
    """SABA with benchopt's constant steps on the benchmark's quadratic (n = 4096, m = 1024):
    variance reduction makes ‖∇F(x)‖² fall by decades within 600 iterations."""
    run_experiment(load_config("stochastic_quadratic"), tmp_path / "run", ["run.max_iters=600", "run.progress=false"], progress=False)
    values = [r["suboptimality"] for r in read_log(tmp_path / "run") if "suboptimality" in r]
    assert values[0] == pytest.approx(12.17, rel=1e-2)  # ‖∇F(x₀)‖² at x₀ = −2
    assert values[-1] < 1e-4 * values[0]
    assert min(values[len(values) // 2 :]) < min(values[: len(values) // 2])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["problem.name=covtype"], "problem.name='covtype' must be one of quadratic, datacleaning, logreg"),
        (
            ["problem.batch_size=2000"],
            "problem.batch_size=2000 is larger than the data (problem.n_upper=1024 samples): use problem.batch_size <= 1024",
        ),
        (
            ["problem.name=logreg", "problem.batch_size=700"],
            "problem.batch_size=700: Stream(batch_size=700) is larger than the data (599 samples)",
        ),
        (["problem.name=logreg", "problem.dim_x=3"], "problem.dim_x applies to problem.name=quadratic only, not to problem.name=logreg"),
        (["method.lr_lower={value: 0.1, pow: 0.5}"], "method.lr_lower={'value': 0.1, 'pow': 0.5} must be a number or a schedule"),
    ],
)
def test_bad_input_is_one_line(overrides, message, tmp_path, capsys):
    argv = ["run", "stochastic_quadratic", "problem.n_lower=4096", "problem.n_upper=1024", *overrides, "--out", str(tmp_path / "r")]
    if "problem.name=logreg" in overrides:
        argv = ["run", "stochastic_quadratic", *overrides, "--out", str(tmp_path / "r")]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_missing_mnist_for_data_cleaning_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    from bilevel.data import sources

    monkeypatch.setitem(sources.KNOWN_LOCATIONS, "mnist", ())
    monkeypatch.delenv("BILEVEL_DATA_DIR", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["run", "stochastic_datacleaning", "--data-dir", str(empty), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MNIST" in err and f"{empty} (root argument)" in err and "Traceback" not in err


def test_schedules_in_a_configuration_are_polynomial_steps():
    config = resolve_config(load_config("stochastic_quadratic") | {"method": {"name": "F2SA"}})
    method = build_method(config["method"])
    assert method.lr_lower == bl.Polynomial(0.1, 0.7142857142857143)
    assert method.lr_lower(3) == pytest.approx(0.1 * 4 ** (-5 / 7))
    assert as_upper_optimizer(method.lr_upper, "lr_upper").lr(0) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match=r"^method.lr_upper=\{'value': 'a', 'power': 1\} must be a number or a schedule"):
        resolve_config(apply_overrides(load_config("stochastic_quadratic"), ["method.lr_upper={value: a, power: 1}"]))


def test_the_benchmark_modules_docstring_example_runs():
    import doctest

    import bilevel.problems.benchmark as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0


def test_bilevel_plot_draws_run_directories_against_samples_on_a_log_axis(tmp_path, capsys):
    config = load_config("stochastic_quadratic")
    for seed in (0, 1):
        run_experiment(config, tmp_path / f"s{seed}", [*SMALL, "run.max_iters=20", "run.eval_every=10", f"run.seed={seed}"], progress=False)
    out = tmp_path / "plot.svg"
    argv = ["plot", str(tmp_path / "s0"), str(tmp_path / "s1"), "--by-method", "--metric", "suboptimality", "--x", "samples"]
    assert main([*argv, "--center", "median", "--log-y", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert "samples seen" in out.read_text()


def test_several_processes_are_refused_before_any_starts(tmp_path, capsys, monkeypatch):
    """A stochastic run is not split between processes (each would draw the same batches from
    its own copy of the data): ``--nproc 2`` is one line, for a run and for a resume, and
    torchrun is never launched."""
    from bilevel import distributed

    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("torchrun launched"))
    message = "problem.kind: stochastic runs in one process (asked for 2): its mini-batches of 64 samples are not split"
    assert main(["run", "stochastic_quadratic", *SMALL, "--nproc", "2", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "r").exists()
    assert main(["run", "stochastic_quadratic", *SMALL, "run.max_iters=4", "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["resume", str(tmp_path / "one"), "--nproc", "2", "--max-iters", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert read_log(tmp_path / "one")[-1]["iteration"] == 4
