import itertools
import time

import pytest
import torch

import bilevel as bl
from bilevel.problems import T1, T1g

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("preserve_rng")


class InterruptAt:
    """A data source that raises KeyboardInterrupt (as Ctrl-C would) when iteration ``at`` asks for its batch."""

    def __init__(self, at=5):
        self.at = at

    def batch_at(self, k):
        if k == self.at:
            raise KeyboardInterrupt
        return None


class SlowAID(bl.AID):
    def step(self, problem, state, batch=None):
        time.sleep(0.02)
        return super().step(problem, state, batch)


def _aid():
    return bl.AID(lr_upper=0.2, lr_lower=0.5, lower_steps=3, solver=bl.CG(steps=4))


def test_status_values():
    assert [s.value for s in bl.Status] == ["converged", "max_iters", "max_time", "diverged", "interrupted", "stopped"]
    assert bl.Status.CONVERGED == "converged"


def test_converged_with_tol_stops_at_the_first_record_below_tol():
    tol = 1e-12
    result = bl.solve(T1(n=4), bl.AID(lr_upper=0.3, lr_lower=0.5, lower_steps=5, solver=bl.CG(steps=2)), max_iters=500, tol=tol)
    assert result.status is bl.Status.CONVERGED
    stat = result.series("stationarity")
    assert stat[-1] <= tol and all(s > tol for s in stat[:-1])
    assert result.iterations == len(stat) < 500
    assert "stationarity" in result.message and "tol" in result.message


def test_converged_on_another_diagnostic():
    result = bl.solve(T1(n=4), _aid(), max_iters=500, tol=1e-10, stop_on="lower_grad_sq")
    assert result.status is bl.Status.CONVERGED
    assert result.final["lower_grad_sq"] <= 1e-10 and all(v > 1e-10 for v in result.series("lower_grad_sq")[:-1])


def test_a_callback_that_returns_a_reason_stops_the_run_at_that_record(tmp_path):
    """on_log returning a string ends the run there (Status.STOPPED, the string as message);
    returning None (every logger) never stops it; the checkpoint holds the stopped state."""

    class StopAtSix:
        def on_log(self, record):
            return "enough at 6" if record["iteration"] == 6 else None

    class Quiet:
        def on_log(self, record):
            return None

    result = bl.solve(T1g(n=4), _aid(), max_iters=20, log_every=2, callbacks=[Quiet(), StopAtSix()], checkpoint=tmp_path / "c.pt")
    assert result.status is bl.Status.STOPPED and result.message == "enough at 6"
    assert result.iterations == 6 and [r["iteration"] for r in result.history] == [2, 4, 6]
    assert bl.load_checkpoint(tmp_path / "c.pt")["state"].k == 6
    assert bl.solve(T1g(n=4), _aid(), max_iters=8, callbacks=[Quiet()]).status is bl.Status.MAX_ITERS


def test_max_iters():
    result = bl.solve(T1g(n=4), _aid(), max_iters=7)
    assert result.status is bl.Status.MAX_ITERS
    assert result.iterations == 7 == result.state.k
    assert [r["iteration"] for r in result.history] == list(range(1, 8))
    zero = bl.solve(T1g(n=4), _aid(), max_iters=0)
    assert zero.iterations == 0 and zero.history == [] and zero.final == {}
    assert torch.equal(zero.x["x"], T1g(n=4).x_init["x"])


def test_max_time_stops_once_the_step_time_is_spent():
    problem = T1(n=3)
    result = bl.solve(problem, SlowAID(lr_upper=0.1, lr_lower=0.5, lower_steps=1, solver=bl.CG(steps=1)), max_iters=1000, max_time=0.05)
    assert result.status is bl.Status.MAX_TIME
    assert 1 <= result.iterations <= 3
    assert result.wall_time >= 0.05
    assert result.history[-1]["time"] == pytest.approx(result.wall_time)


def test_divergence_raises_naming_the_iteration_and_the_quantity():
    with pytest.raises(
        bl.DivergenceError,
        match=r"AID diverged at iteration \d+: "
        r"(\w+ = [0-9.e+]+ (exceeds the divergence threshold|ran away from its start value)|\w+ is (nan|inf))",
    ) as info:
        bl.solve(T1g(n=6), bl.AID(lr_upper=10.0, lr_lower=0.5, lower_steps=5, solver=bl.CG(steps=6)), max_iters=200)
    assert "reduce the step sizes" in str(info.value)
    assert isinstance(info.value, FloatingPointError)


def test_divergence_with_status_returns_diverged_and_keeps_the_bad_record():
    threshold = 1e6
    result = bl.solve(
        T1g(n=6),
        bl.AID(lr_upper=10.0, lr_lower=0.5, lower_steps=5, solver=bl.CG(steps=6)),
        max_iters=200,
        on_divergence="status",
        divergence_threshold=threshold,
    )
    assert result.status is bl.Status.DIVERGED
    assert result.iterations < 200
    last = result.final
    assert any(abs(v) > threshold for k, v in last.items() if k not in ("iteration", "time"))
    assert all(abs(v) <= threshold for rec in result.history[:-1] for k, v in rec.items() if k not in ("iteration", "time"))
    assert result.final["iteration"] == result.iterations


def test_divergence_message_names_the_iteration_of_the_diverged_record():
    result = bl.solve(
        T1g(n=6),
        bl.AID(lr_upper=10.0, lr_lower=0.5, lower_steps=5, solver=bl.CG(steps=6)),
        max_iters=200,
        on_divergence="status",
    )
    assert f"iteration {result.final['iteration']}:" in result.message


def test_nan_in_the_variables_is_divergence():
    problem = bl.Problem(
        upper=lambda x, y, b: (y["y"] ** 2).sum() + torch.sqrt(1.0 - x["x"]).sum(),
        lower=lambda x, y, b: 0.5 * ((y["y"] - x["x"]) ** 2).sum(),
    )
    x0, y0 = {"x": torch.zeros(2, dtype=F64)}, {"y": torch.zeros(2, dtype=F64)}
    result = bl.solve(
        problem, bl.AID(lr_upper=5.0, lr_lower=1.0, lower_steps=1, solver=bl.CG(steps=1)), x0, y0, max_iters=20, on_divergence="status"
    )
    assert result.status is bl.Status.DIVERGED
    assert "nan" in result.message.lower()


def test_log_every_records_every_kth_iteration_and_the_last():
    result = bl.solve(T1g(n=4), _aid(), max_iters=10, log_every=3)
    assert [r["iteration"] for r in result.history] == [3, 6, 9, 10]
    full = bl.solve(T1g(n=4), _aid(), max_iters=10)
    for rec in result.history:
        ref = full.history[rec["iteration"] - 1]
        assert {k: v for k, v in rec.items() if k != "time"} == {k: v for k, v in ref.items() if k != "time"}


def test_history_series_and_result_properties():
    result = bl.solve(T1g(n=4), _aid(), max_iters=6)
    keys = {"iteration", "time", "upper_loss", "lower_grad_sq", "direction_sq", "linsys_residual_sq", "stationarity"}
    assert all(set(rec) == keys for rec in result.history)
    assert result.series("upper_loss") == [rec["upper_loss"] for rec in result.history]
    assert result.series("nope") == []
    assert all(isinstance(rec["iteration"], int) for rec in result.history)
    assert all(isinstance(v, float) for rec in result.history for k, v in rec.items() if k != "iteration")
    times = result.series("time")
    assert all(b >= a for a, b in itertools.pairwise(times)) and times[-1] == pytest.approx(result.wall_time)
    assert result.final is result.history[-1]
    assert result.x is result.state.x and result.y is result.state.y and result.v is result.state.v
    # the logged stationarity of AID is ‖d‖² = direction_sq
    assert result.series("stationarity") == result.series("direction_sq")


class CountingSource:
    def __init__(self):
        self.calls = []

    def batch_at(self, k):
        self.calls.append(k)
        return 1.0 + 0.1 * k


def test_data_source_batch_at_receives_the_iteration():
    seen = []

    def lower(x, y, b):
        seen.append(b)
        return 0.5 * (y["y"] ** 2).sum() - b * (x["x"] * y["y"]).sum()

    problem = bl.Problem(upper=lambda x, y, b: 0.5 * ((y["y"] - 1.0) ** 2).sum(), lower=lower)
    x0, y0 = {"x": torch.ones(2, dtype=F64)}, {"y": torch.zeros(2, dtype=F64)}
    source = CountingSource()
    method = bl.AID(lr_upper=0.1, lr_lower=1.0, lower_steps=1, solver=bl.CG(steps=1))
    result = bl.solve(problem, method, x0, y0, data=source, max_iters=4)
    assert source.calls == [0, 0, 1, 2, 3]  # init at k = 0, then one batch per step
    assert set(seen) == {1.0, 1.1, 1.2, 1.3}
    # the last step used batch 1.3: y = 1.3 x after one exact lower step (lr 1 on ½‖y‖² − b xᵀy)
    x_before_last = bl.solve(problem, method, x0, y0, data=CountingSource(), max_iters=3).x["x"]
    torch.testing.assert_close(result.y["y"], 1.3 * x_before_last, rtol=1e-14, atol=0)


def test_fixed_data_is_passed_unchanged():
    seen = []
    problem = bl.Problem(
        upper=lambda x, y, b: ((y["y"] - b["t"]) ** 2).sum(),
        lower=lambda x, y, b: seen.append(id(b)) or 0.5 * ((y["y"] - x["x"]) ** 2).sum(),
    )
    batch = {"t": torch.ones(2, dtype=F64)}
    bl.solve(problem, _aid(), {"x": torch.zeros(2, dtype=F64)}, {"y": torch.zeros(2, dtype=F64)}, data=batch, max_iters=2)
    assert set(seen) == {id(batch)}
    assert bl.FixedBatch(batch).batch_at(99) is batch


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"problem": "T1"}, TypeError, "expects a bilevel.Problem"),
        ({"method": "AID"}, TypeError, "expects a bilevel method"),
        ({"on_divergence": "ignore"}, ValueError, "on_divergence='ignore'"),
        ({"max_iters": -1}, ValueError, "max_iters=-1"),
        ({"max_iters": 2.5}, ValueError, "max_iters=2.5"),
        ({"log_every": 0}, ValueError, "log_every=0"),
        ({"tol": 1e-3, "stop_on": "nonsense"}, ValueError, r"stop_on='nonsense'\) is not a diagnostic of AID; available: direction_sq"),
        ({"tol": -1e-3}, ValueError, r"solve\(tol=-0.001\)"),
        ({"tol": float("nan")}, ValueError, r"solve\(tol=nan\)"),
        ({"max_time": -1.0}, ValueError, r"solve\(max_time=-1.0\)"),
        ({"max_time": 0}, ValueError, r"solve\(max_time=0\)"),
        ({"checkpoint_every": -5}, ValueError, r"solve\(checkpoint_every=-5\)"),
        ({"checkpoint_every": 2.5}, TypeError, r"solve\(checkpoint_every=2.5\)"),
        ({"divergence_factor": 0.5}, ValueError, r"solve\(divergence_factor=0.5\)"),
        ({"stop_on": 3}, ValueError, r"stop_on=3"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"problem": T1(n=2), "method": _aid(), "max_iters": 3}
    args.update(kwargs)
    problem, method = args.pop("problem"), args.pop("method")
    with pytest.raises(error, match=match):
        bl.solve(problem, method, **args)


def test_solve_does_not_modify_the_start_point():
    x0 = {"x": torch.full((3,), 2.0, dtype=F64)}
    y0 = {"y": torch.full((3,), -1.0, dtype=F64)}
    result = bl.solve(T1(n=3), _aid(), x0, y0, max_iters=5)
    assert torch.equal(x0["x"], torch.full((3,), 2.0, dtype=F64)) and torch.equal(y0["y"], torch.full((3,), -1.0, dtype=F64))
    assert not torch.equal(result.x["x"], x0["x"])


def test_invalid_start_is_reported_before_running():
    problem = T1(n=2)
    with pytest.raises(ValueError, match=r"x\['x'\] contains 1 NaN/Inf"):
        bl.solve(problem, _aid(), {"x": torch.tensor([0.0, float("nan")], dtype=F64)}, max_iters=3)


def test_keyboard_interrupt_returns_interrupted_and_writes_the_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    method = bl.AID(lr_upper=0.2, lr_lower=0.5, lower_steps=3, solver=bl.CG(steps=4))
    result = bl.solve(T1g(n=4), method, data=InterruptAt(5), max_iters=50, checkpoint=path)
    assert result.status is bl.Status.INTERRUPTED
    assert result.iterations == 5 and len(result.history) == 5
    assert "interrupted at iteration 5" in result.message
    payload = bl.load_checkpoint(path)
    assert payload["state"].k == 5
    assert payload["meta"]["status"] == "interrupted"
    assert torch.equal(payload["state"].x["x"], result.x["x"])
    assert payload["history"] == result.history


def test_checkpoint_every_writes_during_the_run(tmp_path):
    path = tmp_path / "ckpt.pt"
    snapshots = []

    class Spy:
        def on_log(self, record):
            if path.exists():
                snapshots.append((record["iteration"], bl.load_checkpoint(path)["state"].k))

    bl.solve(T1g(n=4), _aid(), max_iters=9, checkpoint=path, checkpoint_every=4, callbacks=[Spy()])
    # on_log of iteration k runs before the checkpoint of iteration k is written
    assert snapshots == [(5, 4), (6, 4), (7, 4), (8, 4), (9, 8)]
    final = bl.load_checkpoint(path)
    assert final["state"].k == 9 and final["meta"]["status"] == "max_iters" and final["meta"]["method"] == "AID"


@pytest.mark.parametrize("upper", ["sgd", "adam"])
def test_resume_reproduces_the_uninterrupted_history_exactly(tmp_path, upper):
    problem = T1g(n=6)
    lr_upper = 0.1 if upper == "sgd" else bl.Adam(lr=0.05)
    method = bl.AID(lr_upper=lr_upper, lr_lower=0.5, lower_steps=3, solver=bl.CG(steps=6), warm_start_v=True)
    full = bl.solve(problem, method, max_iters=60)
    path = tmp_path / "ckpt.pt"
    first = bl.solve(problem, method, max_iters=30, checkpoint=path)
    assert first.iterations == 30
    resumed = bl.solve(problem, method, max_iters=60, resume=path)
    assert resumed.iterations == 60 and resumed.status is bl.Status.MAX_ITERS
    strip = lambda h: [{k: v for k, v in rec.items() if k != "time"} for rec in h]
    assert strip(resumed.history) == strip(full.history)
    for a, b in ((resumed.x, full.x), (resumed.y, full.y), (resumed.v, full.v), (resumed.state.opt, full.state.opt)):
        for p, q in zip(bl.tree.leaves(a), bl.tree.leaves(b), strict=True):
            assert torch.equal(p, q)
    # the step time carries over
    assert resumed.history[29]["time"] == first.history[29]["time"]
    assert bl.load_checkpoint(path)["meta"]["wall_time"] == first.wall_time
    times = resumed.series("time")
    assert times[30] > times[29] == first.wall_time and all(b >= a for a, b in itertools.pairwise(times))


def test_resume_from_a_loaded_payload_after_an_interrupt(tmp_path):
    problem = T1g(n=4)
    kwargs = dict(lr_upper=0.2, lr_lower=0.5, lower_steps=3, solver=bl.CG(steps=4))
    path = tmp_path / "ckpt.pt"
    bl.solve(problem, bl.AID(**kwargs), data=InterruptAt(5), max_iters=20, checkpoint=path)
    resumed = bl.solve(problem, bl.AID(**kwargs), max_iters=20, resume=bl.load_checkpoint(path))
    full = bl.solve(problem, bl.AID(**kwargs), max_iters=20)
    assert torch.equal(resumed.x["x"], full.x["x"])
    assert [r["iteration"] for r in resumed.history] == list(range(1, 21))


class GlobalRandomSource:
    """A stochastic data source drawing from the global torch RNG (not a pure function of k)."""

    def batch_at(self, k):
        return 1.0 + 0.1 * torch.rand((), dtype=F64)


def test_resume_restores_the_global_rng_for_stochastic_data(tmp_path):
    def lower(x, y, b):
        return 0.5 * (y["y"] ** 2).sum() - b * (x["x"] * y["y"]).sum()

    problem = bl.Problem(upper=lambda x, y, b: 0.5 * ((y["y"] - 1.0) ** 2).sum() + 0.5 * (x["x"] ** 2).sum(), lower=lower)
    x0, y0 = {"x": torch.ones(3, dtype=F64)}, {"y": torch.zeros(3, dtype=F64)}
    method = bl.AID(lr_upper=0.2, lr_lower=1.0, lower_steps=1, solver=bl.CG(steps=1))
    path = tmp_path / "ckpt.pt"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        full = bl.solve(problem, method, x0, y0, data=GlobalRandomSource(), max_iters=12)
        torch.manual_seed(0)
        bl.solve(problem, method, x0, y0, data=GlobalRandomSource(), max_iters=6, checkpoint=path)
        torch.rand(100)  # a new process would have another RNG state
        resumed = bl.solve(problem, method, data=GlobalRandomSource(), max_iters=12, resume=path)
    strip = lambda h: [{k: v for k, v in rec.items() if k != "time"} for rec in h]
    assert strip(resumed.history) == strip(full.history)
    assert torch.equal(resumed.x["x"], full.x["x"])


# --- divergence: exact iteration, runaway, blame ---------------------------------------


def _quadratic_upper_problem(curvature=1.0):
    """f = ½ c‖x‖² + ½‖y − 1‖², g = ½‖y − x‖²: an upper step α > 2/(c + 1) makes x oscillate and grow."""
    return bl.Problem(
        upper=lambda x, y, b: 0.5 * curvature * (x["x"] ** 2).sum() + 0.5 * ((y["y"] - 1.0) ** 2).sum(),
        lower=lambda x, y, b: 0.5 * ((y["y"] - x["x"]) ** 2).sum(),
        x_init={"x": torch.full((3,), 1.0, dtype=F64)},
        y_init={"y": torch.zeros(3, dtype=F64)},
    )


def _growing_aid():
    return bl.AID(lr_upper=2.5, lr_lower=1.0, lower_steps=3, solver=bl.CG(steps=2))


def test_runaway_loss_is_divergence_relative_to_the_start_not_only_above_1e12():
    problem = _quadratic_upper_problem()
    free = bl.solve(problem, _growing_aid(), max_iters=8, divergence_factor=None)
    losses = free.series("upper_loss")
    assert free.status is bl.Status.MAX_ITERS and max(losses) < 1e12 and losses[-1] > 1e5  # the old rule saw nothing
    start = losses[0]
    first = next(r["iteration"] for r in free.history if abs(r["upper_loss"]) > 1e4 * max(abs(start), 1.0))
    with pytest.raises(bl.DivergenceError, match=rf"diverged at iteration {first}: upper_loss = .* ran away from its start value") as info:
        bl.solve(problem, _growing_aid(), max_iters=8)
    assert info.value.iteration == first and info.value.quantity == "upper_loss"
    assert info.value.result.status is bl.Status.DIVERGED and info.value.result.iterations == first
    loose = bl.solve(problem, _growing_aid(), max_iters=8, divergence_factor=1e9)
    assert loose.status is bl.Status.MAX_ITERS


@pytest.mark.parametrize("log_every", [1, 4, 10])
def test_divergence_is_reported_at_the_exact_iteration_whatever_log_every(log_every):
    problem = _quadratic_upper_problem()
    reference = bl.solve(problem, _growing_aid(), max_iters=30, on_divergence="status")
    first = reference.iterations
    assert reference.status is bl.Status.DIVERGED and first < 10
    result = bl.solve(problem, _growing_aid(), max_iters=30, on_divergence="status", log_every=log_every)
    assert result.iterations == first and result.final["iteration"] == first
    assert f"diverged at iteration {first}:" in result.message
    assert result.final["upper_loss"] == pytest.approx(reference.final["upper_loss"], rel=1e-12)
    # the records before the failure are the grid of log_every, all good
    assert [r["iteration"] for r in result.history[:-1]] == list(range(log_every, first, log_every))


def test_blow_up_at_the_first_step_with_log_every_10_is_iteration_1():
    problem = _quadratic_upper_problem()
    method = bl.AID(lr_upper=1e9, lr_lower=1.0, lower_steps=3, solver=bl.CG(steps=2))
    with pytest.raises(bl.DivergenceError, match=r"diverged at iteration 2: ") as info:
        bl.solve(problem, method, max_iters=50, log_every=10)
    # iteration 1 moves x by 1e9·∇f (finite); iteration 2 evaluates f there: 1e17 > 1e4·f0
    assert info.value.iteration == 2
    assert "reduce the step sizes" in str(info.value)


def test_nan_returned_by_the_objective_at_finite_variables_names_the_objective():
    problem = bl.Problem(
        upper=lambda x, y, b: (y["y"] ** 2).sum() + 4.0 * torch.log(2.0 - x["x"]).sum(),
        lower=lambda x, y, b: 0.5 * ((y["y"] - x["x"]) ** 2).sum(),
    )
    x0, y0 = {"x": torch.zeros(2, dtype=F64)}, {"y": torch.zeros(2, dtype=F64)}
    # f decreases as x → 2 with no stationary point before: a finite step jumps past 2, where log(2 − x) is NaN
    method = bl.AID(lr_upper=0.3, lr_lower=1.0, lower_steps=1, solver=bl.CG(steps=1))
    result = bl.solve(problem, method, x0, y0, max_iters=200, on_divergence="status", log_every=7)
    assert result.status is bl.Status.DIVERGED
    k = result.iterations
    assert f"diverged at iteration {k}: upper_loss is nan" in result.message
    assert f"the upper objective f returns nan at the finite x, y of iteration {k - 1}" in result.message
    assert "reduce the step sizes (e.g." not in result.message


# --- host synchronisation: one transfer per record, none between records -----------------


class _HostTransfers:
    """Counts the ways a tensor's value reaches the host: item, tolist, bool, float, int."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            original = getattr(torch.Tensor, name)

            def counting(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counting)


@pytest.mark.parametrize(
    "method",
    [
        bl.GALET(lr_upper=0.1, lr_lower=0.5, lower_steps=2, lr_shadow=0.2, shadow_steps=3, stability_check="off"),
        bl.SlBAMM(lr_upper=0.1, lr_lower=0.5, dual_step="fixed", lr_dual=0.5, stability_check="off"),
        bl.SlBAMM(lr_upper=0.1, lr_lower=0.5, dual_step="linesearch", stability_check="off"),
        bl.BAGDC(lr_upper=0.1, lr_lower=0.5, lr_dual=0.5, stability_check="off"),
        bl.AID(lr_upper=0.1, lr_lower=0.5, lower_steps=2, solver=bl.CG(steps=3)),
        bl.ITD(lr_upper=0.1, lr_lower=0.5, lower_steps=3),
    ],
    ids=lambda m: m.name,
)
def test_one_host_transfer_per_logged_record_and_none_between(monkeypatch, method):
    problem = T1g(n=4)
    bl.solve(problem, method, max_iters=2)  # warm caches outside the count
    counter = _HostTransfers(monkeypatch)
    bl.solve(problem, method, max_iters=20, log_every=5, validate=False)
    short = counter.count
    counter.count = 0
    bl.solve(problem, method, max_iters=40, log_every=5, validate=False)
    assert counter.count - short == 4  # 20 more iterations, 4 more records, 4 more transfers


# --- checkpoint writes: checked up front, failures keep the result ------------------------


def test_an_unwritable_checkpoint_folder_is_reported_before_the_first_iteration(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the checkpoint folder should be")
    calls = []
    problem = bl.Problem(upper=lambda x, y, b: calls.append(1) or (y["y"] ** 2).sum(), lower=lambda x, y, b: ((y["y"] - x["x"]) ** 2).sum())
    with pytest.raises(OSError, match=r"cannot write the checkpoint .*not-a-folder/ckpt\.pt: .*choose a writable folder"):
        bl.solve(
            problem,
            _aid(),
            {"x": torch.ones(2, dtype=F64)},
            {"y": torch.zeros(2, dtype=F64)},
            max_iters=5,
            checkpoint=blocker / "ckpt.pt",
            validate=False,
        )
    assert calls == []


def test_a_failed_checkpoint_write_warns_and_keeps_the_result(tmp_path, monkeypatch):
    import errno
    import sys

    solve_module = sys.modules["bilevel.solve"]  # the package attribute `bilevel.solve` is the function

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(solve_module, "save_checkpoint", disk_full)
    with pytest.warns(
        solve_module.CheckpointWriteWarning, match=r"could not write the checkpoint .* at iteration 30: No space left on device"
    ):
        result = bl.solve(T1g(n=4), _aid(), max_iters=30, checkpoint=tmp_path / "ckpt.pt", checkpoint_every=0)
    assert result.status is bl.Status.MAX_ITERS and result.iterations == 30
    assert "No space left on device" in result.checkpoint_error
    assert len(result.history) == 30


def test_successful_runs_have_no_checkpoint_error(tmp_path):
    result = bl.solve(T1g(n=4), _aid(), max_iters=3, checkpoint=tmp_path / "ckpt.pt")
    assert result.checkpoint_error is None and (tmp_path / "ckpt.pt").is_file()


# --- resume checks what the state depends on -------------------------------------------


def test_resume_refuses_a_checkpoint_of_another_method(tmp_path):
    path = tmp_path / "ckpt.pt"
    problem = T1g(n=4)
    bl.solve(problem, bl.GALET(lr_upper=0.1, lr_lower=0.5, lower_steps=2, lr_shadow=0.2, shadow_steps=3), max_iters=3, checkpoint=path)
    with pytest.raises(bl.CheckpointError, match=r"written by a different method configuration \(class: 'GALET' → 'SlBAMM'"):
        bl.solve(problem, bl.SlBAMM(lr_upper=0.1, lr_lower=0.5), max_iters=6, resume=path)
    with pytest.raises(bl.CheckpointError, match=r"lr_lower: 0\.5 → 0\.25"):
        bl.solve(problem, bl.GALET(lr_upper=0.1, lr_lower=0.25, lower_steps=2, lr_shadow=0.2, shadow_steps=3), max_iters=6, resume=path)
    # the same configuration resumes, to more iterations than first planned
    resumed = bl.solve(
        problem, bl.GALET(lr_upper=0.1, lr_lower=0.5, lower_steps=2, lr_shadow=0.2, shadow_steps=3), max_iters=6, resume=path
    )
    assert resumed.iterations == 6


def test_resume_refuses_a_checkpoint_of_another_problem(tmp_path):
    path = tmp_path / "ckpt.pt"
    bl.solve(T1g(n=4), _aid(), max_iters=3, checkpoint=path)
    with pytest.raises(bl.CheckpointError, match=r"belongs to another problem"):
        bl.solve(T1g(n=5), _aid(), max_iters=6, resume=path)
    with pytest.raises(bl.CheckpointError, match=r"belongs to another problem"):
        bl.solve(T1g(n=4), _aid(), {"x": torch.zeros(4, dtype=torch.float32)}, max_iters=6, resume=path)


def test_a_checkpoint_of_an_older_format_resumes_despite_options_added_since(tmp_path):
    """A format-2 checkpoint's method spec lacks options added later (BAGDC.line_search_numerator)."""
    path = tmp_path / "ckpt.pt"
    method = bl.BAGDC(lr_upper=0.1, lr_lower=0.5, lr_dual=0.5, stability_check="off")
    bl.solve(T1g(n=4), method, max_iters=3, checkpoint=path)
    payload = bl.load_checkpoint(path)
    del payload["meta"]["method_spec"]["line_search_numerator"]
    payload["format"] = bl.checkpoint.FORMAT_VERSION - 1
    assert bl.solve(T1g(n=4), method, max_iters=5, resume=payload).iterations == 5
    payload["meta"]["method_spec"]["lr_dual"] = 0.25  # a real difference is still refused
    with pytest.raises(bl.CheckpointError, match=r"lr_dual: 0\.25 → 0\.5"):
        bl.solve(T1g(n=4), method, max_iters=5, resume=payload)
    payload["format"] = bl.checkpoint.FORMAT_VERSION  # same format: a missing field is a difference
    payload["meta"]["method_spec"]["lr_dual"] = 0.5
    with pytest.raises(bl.CheckpointError, match=r"line_search_numerator: '<absent>'"):
        bl.solve(T1g(n=4), method, max_iters=5, resume=payload)


def test_a_failure_the_replay_does_not_reproduce_is_reported_without_blaming_a_point():
    """A data source that is not a pure function of the iteration: bad once, good on replay."""

    class BadOnce:
        def __init__(self):
            self.served = set()

        def batch_at(self, k):
            first = k not in self.served
            self.served.add(k)
            return float("nan") if (k == 2 and first) else 1.0

    problem = bl.Problem(
        upper=lambda x, y, b: 0.5 * ((y["y"] - b) ** 2).sum(),
        lower=lambda x, y, b: 0.5 * ((y["y"] - x["x"]) ** 2).sum(),
    )
    x0, y0 = {"x": torch.zeros(2, dtype=F64)}, {"y": torch.zeros(2, dtype=F64)}
    result = bl.solve(problem, _aid(), x0, y0, data=BadOnce(), max_iters=20, log_every=5, on_divergence="status")
    assert result.status is bl.Status.DIVERGED and result.iterations == 5
    assert "replaying from iteration 0 did not reproduce it" in result.message
    assert "objective" not in result.message
