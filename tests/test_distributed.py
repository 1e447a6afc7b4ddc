"""Data-parallel runs (bilevel.distributed): 2 gloo processes on CPU, 127.0.0.1 only.

Each distributed test spawns its processes once and runs every scenario in them (a
spawn costs ~2 s of imports); every wait is bounded by a timeout.
"""

import datetime
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import bilevel as bl
from bilevel.data import EpisodeSampler, hyperclean_from_arrays
from bilevel.distributed import DataParallel, DistributedError, ShardedSource, _shard_hyperclean, shard
from bilevel.problems.fewshot import EpisodeSource, fewshot_problem
from bilevel.problems.hyperclean import classifier_logits, hyperclean_problem

F64 = torch.float64
ITERS = 3
SPAWN_TIMEOUT = 60.0

pytestmark = pytest.mark.usefixtures("preserve_rng")


# -- the problems and methods compared ---------------------------------------------------------
def hyperclean():
    """Hyper-cleaning of a linear classifier, its data in the batch (16 training, 8 validation
    examples, 4 features, 3 classes); x weighs the training examples by their index."""
    g = torch.Generator().manual_seed(0)
    a_tr, a_val = torch.randn(16, 4, generator=g, dtype=F64), torch.randn(8, 4, generator=g, dtype=F64)
    b_tr, b_val = torch.randint(0, 3, (16,), generator=g), torch.randint(0, 3, (8,), generator=g)
    batch = {"a": a_tr, "b": b_tr, "i": torch.arange(16), "a_val": a_val, "b_val": b_val}

    def lower(x, y, bt):
        losses = F.cross_entropy(classifier_logits("linear", y, bt["a"]), bt["b"], reduction="none")
        return (torch.sigmoid(x["weights"][bt["i"]]) * losses).mean() + 0.05 * ((y["W"] ** 2).sum() + (y["b"] ** 2).sum())

    def upper(x, y, bt):
        return F.cross_entropy(classifier_logits("linear", y, bt["a_val"]), bt["b_val"])

    y0 = {"W": 0.1 * torch.randn(3, 4, generator=g, dtype=F64), "b": torch.zeros(3, dtype=F64)}
    problem = bl.Problem(upper, lower, x_init={"weights": torch.zeros(16, dtype=F64)}, y_init=y0, name="hyperclean")
    return problem, batch, 0


def fewshot():
    """The few-shot problem (MLP backbone, 2 tasks of 2-way 4-shot, 2 queries per class);
    the shots of every task are split between the processes (dim 1)."""
    problem = fewshot_problem(n_way=2, meta_batch=2, image_shape=(1, 4, 4), hidden=8, features=4, reg=0.5, dtype=F64)
    g = torch.Generator().manual_seed(1)
    batch = {
        "support_x": torch.rand(2, 8, 1, 4, 4, generator=g, dtype=F64),
        "support_y": torch.tensor([[0, 1] * 4] * 2),
        "query_x": torch.rand(2, 4, 1, 4, 4, generator=g, dtype=F64),
        "query_y": torch.tensor([[0, 1] * 2] * 2),
    }
    return problem, batch, 1


PROBLEMS = {"hyperclean": hyperclean, "fewshot": fewshot}


def builtin(name):
    """The library's own problems and sources, which solve splits by itself: hyper-cleaning
    (its data inside the problem) and few-shot episodes from an EpisodeSource."""
    g = torch.Generator().manual_seed(2)
    if name == "hyperclean":
        images = torch.rand(48, 5, generator=g)
        labels = (images[:, 0] > 0.5).long()
        data = hyperclean_from_arrays(
            images.numpy(), labels.numpy(), num_classes=2, max_pixel=1.0, name="blobs", n_train=16, n_val=8, n_test=8, dtype=F64
        )
        return hyperclean_problem(data, model="mlp", hidden=3, reg=0.01), None
    classes = {c: torch.rand(6, 1, 4, 4, generator=g) + c for c in range(4)}
    sampler = EpisodeSampler(classes, n_way=2, k_shot=2, q_query=2, meta_batch=2, seed=0)
    problem = fewshot_problem(n_way=2, meta_batch=2, image_shape=(1, 4, 4), hidden=8, features=4, dtype=F64)
    return problem, EpisodeSource(sampler, dtype=F64)


def run_builtin(name):
    problem, data = builtin(name)
    method = bl.AID(lr_upper=0.5, lr_lower=0.2, lower_steps=2, solver=bl.CG(steps=3))
    result = bl.solve(problem, method, data=data, max_iters=ITERS)
    return {"x": result.x, "y": result.y, "v": result.v}


def methods():
    off = {"stability_check": "off"}
    return {
        "GALET": bl.GALET(lr_upper=0.1, lr_lower=0.2, lower_steps=2, shadow_steps=2, lr_shadow=0.1, **off),
        "SlBAMM": bl.SlBAMM(lr_upper=0.1, lr_lower=0.2, dual_step="linesearch", **off),
        "BAGDC": bl.BAGDC(lr_upper=0.1, lr_lower=0.2, lower_steps=2, dual_step="periodic", period=2, **off),
        "AID-CG": bl.AID(lr_upper=0.1, lr_lower=0.2, lower_steps=2, solver=bl.CG(steps=3)),
        "ITD": bl.ITD(lr_upper=0.1, lr_lower=0.2, lower_steps=3),
        # the other two oracle modes: forward-over-reverse (torch.func) and finite differences
        "AID-forward": bl.AID(lr_upper=0.1, lr_lower=0.2, lower_steps=2, solver=bl.CG(steps=3), oracles=bl.Oracles(mode="forward")),
        "AID-fd": bl.AID(lr_upper=0.1, lr_lower=0.2, lower_steps=2, solver=bl.CG(steps=3), oracles=bl.Oracles(mode="finite_difference")),
    }


def methods_for(problem_name):
    """The five methods on both problems; the other oracle modes on hyper-cleaning only."""
    names = list(methods())
    return names if problem_name == "hyperclean" else [n for n in names if n not in ("AID-forward", "AID-fd")]


def run_one(problem_name, method_name, world_size=1, rank=0, checkpoint=None):
    problem, batch, dim = PROBLEMS[problem_name]()
    data = ShardedSource(batch, dims=dim, rank=rank, world_size=world_size) if world_size > 1 else batch
    result = bl.solve(problem, methods()[method_name], data=data, max_iters=ITERS, checkpoint=checkpoint)
    return {"x": result.x, "y": result.y, "v": result.v, "history": result.history}


def run_fp16(world_size=1, rank=0):
    """AID-CG on the hyper-cleaning problem in float32 with float16 autocast and loss scaling."""
    problem, batch, dim = hyperclean()
    as32 = lambda tree: {k: v.float() if v.is_floating_point() else v for k, v in tree.items()}
    problem = problem.replace(x_init=as32(problem.x_init), y_init=as32(problem.y_init))
    data = ShardedSource(as32(batch), dims=dim, rank=rank, world_size=world_size) if world_size > 1 else as32(batch)
    result = bl.solve(problem, methods()["AID-CG"], data=data, max_iters=ITERS, precision="fp16")
    return {"x": result.x, "y": result.y, "scales": result.series("loss_scale")}


def close(a, b, tol=1e-10):
    fa = [t for t in torch.utils._pytree.tree_leaves(a) if isinstance(t, torch.Tensor)]
    fb = [t for t in torch.utils._pytree.tree_leaves(b) if isinstance(t, torch.Tensor)]
    assert len(fa) == len(fb)
    return max((float((s - t).abs().max()) for s, t in zip(fa, fb, strict=True)), default=0.0) <= tol


# -- spawning -----------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir, scenario, timeout_s):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        out = SCENARIOS[scenario](rank, world_size, Path(out_dir))
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        if scenario == "dead":
            os._exit(0)  # the group lost a member: skip its teardown, which waits out the timeout
        if dist.is_initialized():  # the command-line scenarios tear the group down themselves
            dist.destroy_process_group()


def spawn(scenario, tmp_path, world_size=2, timeout_s=5.0, meanwhile=None):
    """Run ``SCENARIOS[scenario]`` on ``world_size`` processes; their outputs by rank (and
    the value of ``meanwhile()``, called here while they run)."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, str(tmp_path), scenario, timeout_s)) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + SPAWN_TIMEOUT
    here = meanwhile() if meanwhile is not None else None
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} process(es) still running after {SPAWN_TIMEOUT} s: a collective hung"
    outs = {r: torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size) if (tmp_path / f"rank{r}.pt").exists()}
    return outs if meanwhile is None else (outs, here)


def _scenario_iterates(rank, world_size, out_dir):
    out = {}
    for problem_name in PROBLEMS:
        for method_name in methods_for(problem_name):
            ckpt = out_dir / "galet.ckpt" if (problem_name, method_name) == ("hyperclean", "GALET") else None
            out[problem_name, method_name] = run_one(problem_name, method_name, world_size, rank, checkpoint=ckpt)
    for name in ("hyperclean", "fewshot"):
        out["builtin", name] = run_builtin(name)
    out["fp16"] = run_fp16(world_size, rank)
    # processes that start from different points are refused, on every process, with one line
    problem, batch, _ = hyperclean()
    x0 = {"weights": torch.full((16,), float(rank), dtype=F64)}
    try:
        bl.solve(problem, methods()["AID-CG"], x0=x0, data=ShardedSource(batch), max_iters=1)
        out["mismatch"] = None
    except DistributedError as err:
        out["mismatch"] = str(err)
    return out


def _scenario_dead(rank, world_size, out_dir):
    """Rank 1 dies in the middle of iteration 2; rank 0 must fail with a clear error."""
    problem, batch, _ = hyperclean()
    calls = {"n": 0}
    lower = problem.lower

    def dying_lower(x, y, bt):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 12:
            os._exit(3)
        return lower(x, y, bt)

    start = time.monotonic()
    try:
        bl.solve(problem.replace(lower=dying_lower), methods()["AID-CG"], data=ShardedSource(batch), max_iters=50)
        return {"error": None, "seconds": time.monotonic() - start}
    except DistributedError as err:
        return {"error": str(err), "seconds": time.monotonic() - start}


def _scenario_resume(rank, world_size, out_dir):
    """`bilevel resume two --max-iters 4` as torchrun would start it on this rank."""
    from bilevel.cli import main

    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank))
    return {"status": main(["resume", str(out_dir / "two"), "--max-iters", "4", "--no-progress"])}


SCENARIOS = {"iterates": _scenario_iterates, "dead": _scenario_dead, "resume": _scenario_resume}


# -- tests --------------------------------------------------------------------------------------
def test_two_processes_give_the_single_process_iterates(tmp_path):
    def references():
        runs = {(p, m): run_one(p, m) for p in PROBLEMS for m in methods_for(p)}
        return runs, {name: run_builtin(name) for name in ("hyperclean", "fewshot")}, run_fp16()

    outs, (refs, builtin_refs, fp16_ref) = spawn("iterates", tmp_path, meanwhile=references)
    assert sorted(outs) == [0, 1]
    for problem_name in PROBLEMS:
        for method_name in methods_for(problem_name):
            ref = refs[problem_name, method_name]
            for rank in (0, 1):
                got = outs[rank][problem_name, method_name]
                # finite differences divide rounding-level differences of gradients by 2ε: 1e-7 there
                tol = 1e-7 if method_name == "AID-fd" else 1e-10
                for key in ("x", "y", "v"):
                    assert close(got[key], ref[key], tol), (problem_name, method_name, rank, key)
                for mine, theirs in zip(got["history"], ref["history"], strict=True):
                    for key, value in theirs.items():
                        if key != "time":
                            assert mine[key] == pytest.approx(value, rel=tol, abs=1e-12), (problem_name, method_name, key)
            # the iterates moved (a run that does nothing would match trivially)
            assert not close(ref["x"], PROBLEMS[problem_name]()[0].x_init, tol=1e-6)
    for name in ("hyperclean", "fewshot"):
        ref = builtin_refs[name]
        assert not close(ref["x"], builtin(name)[0].x_init, tol=1e-6)
        for rank in (0, 1):
            assert all(close(outs[rank]["builtin", name][key], ref[key]) for key in ("x", "y", "v")), (name, rank)
    # float16 with loss scaling: the processes agree on every scale and hold the same iterates,
    # those of one process to float16's rounding (the shards' products round differently)
    assert outs[0]["fp16"]["scales"] == outs[1]["fp16"]["scales"] == fp16_ref["scales"]
    assert close(outs[0]["fp16"]["x"], outs[1]["fp16"]["x"], 0.0) and close(outs[0]["fp16"]["y"], outs[1]["fp16"]["y"], 0.0)
    assert close(outs[0]["fp16"]["x"], fp16_ref["x"], 1e-2) and not close(fp16_ref["x"], hyperclean()[0].x_init, 1e-3)
    # rank 0 wrote the checkpoint; one process resumes it to the same point as an uninterrupted run
    payload = bl.load_checkpoint(tmp_path / "galet.ckpt")
    assert payload["meta"]["world_size"] == 2 and payload["state"].k == ITERS
    problem, batch, _ = hyperclean()
    resumed = bl.solve(problem, methods()["GALET"], data=batch, max_iters=ITERS + 2, resume=tmp_path / "galet.ckpt")
    straight = bl.solve(problem, methods()["GALET"], data=batch, max_iters=ITERS + 2)
    assert close(resumed.x, straight.x) and close(resumed.y, straight.y)
    for rank in (0, 1):
        assert "rank 1 has (iteration, Σx, Σy)" in outs[rank]["mismatch"]


def test_a_dead_process_makes_the_others_fail_clearly(tmp_path):
    outs = spawn("dead", tmp_path, timeout_s=5.0)
    assert list(outs) == [0]  # rank 1 died without writing
    error = outs[0]["error"]
    assert error is not None and error.startswith("rank 0: the ") and "another process died" in error
    assert outs[0]["seconds"] < 10.0


# -- single-process checks (no group) -----------------------------------------------------------
def test_without_a_group_data_parallel_is_the_identity():
    problem, batch, _ = hyperclean()
    dp = DataParallel()
    assert dp.world_size == 1 and dp.rank == 0 and dp.problem(problem) is problem
    assert shard(batch) is batch
    assert dp.all_reduce_scalar(torch.tensor(2.0)) == 2.0


def test_shard_splits_equal_parts_and_refuses_uneven_ones():
    batch = {"a": torch.arange(12).view(6, 2), "table": torch.arange(5)}
    part = shard(batch, rank=2, world_size=3, dims={"a": 0, "table": None})
    assert part["a"].tolist() == [[8, 9], [10, 11]] and part["table"] is batch["table"]
    assert shard((torch.arange(4),), rank=1, world_size=2)[0].tolist() == [2, 3]
    with pytest.raises(ValueError, match=r"batch\['a'\] has 6 entries along dim 0, which cannot be split into 4 equal shards"):
        shard(batch, rank=0, world_size=4, dims={"a": 0, "table": None})
    with pytest.raises(ValueError, match="at most 6"):
        ShardedSource({"a": torch.arange(6)}, rank=0, world_size=8).batch_at(0)


def test_builtin_hyperclean_refuses_shards_of_unequal_size():
    problem, _ = builtin("hyperclean")
    with pytest.raises(ValueError, match=r"n_train=16 cannot be split into 3 equal shards: run on a number of processes \(--nproc\)"):
        _shard_hyperclean(problem, 0, 3)


def test_solve_distributed_true_without_a_group_says_how_to_start_one():
    problem, batch, _ = hyperclean()
    with pytest.raises(ValueError, match="needs an initialised process group: launch with torchrun"):
        bl.solve(problem, methods()["AID-CG"], data=batch, max_iters=1, distributed=True)
    with pytest.raises(TypeError, match="must be True, False or None"):
        bl.solve(problem, methods()["AID-CG"], data=batch, max_iters=1, distributed="yes")


# -- the command line ---------------------------------------------------------------------------
def test_cli_nproc_relaunches_itself_through_torchrun_on_loopback(monkeypatch, tiny_config, tmp_path):
    import subprocess

    from bilevel.cli import main

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command, env: calls.append((command, env)) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["run", tiny_config, "run.max_iters=2", "--nproc", "2", "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    ((command, env),) = calls
    assert command[1:4] == ["-m", "torch.distributed.run", "--nnodes=1"] and "--nproc_per_node=2" in command
    assert "--master_addr=127.0.0.1" in command
    assert command[command.index("bilevel") :] == [
        "bilevel",
        "run",
        tiny_config,
        "run.max_iters=2",
        "--out",
        str(tmp_path / "r"),
        "--no-progress",
    ]
    assert env["BILEVEL_DISTRIBUTED_WORKER"] == "1"


def test_cli_nproc_refuses_a_bad_count(capsys, tiny_config, monkeypatch):
    from bilevel.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["run", tiny_config, "--nproc", "0"]) == 2
    assert "--nproc=0 must be a positive number of processes" in capsys.readouterr().err


def test_cli_nproc_2_gives_the_run_of_one_process(tiny_config, tmp_path):
    """End to end: `bilevel run CONFIG --nproc 2` through torchrun (a few seconds of imports)."""
    import json
    import subprocess
    import sys

    from bilevel.cli import main

    args = [tiny_config, "run.max_iters=2", "run.eval_every=2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BILEVEL_DIST_TIMEOUT": "30"}
    proc = subprocess.Popen([sys.executable, "-m", "bilevel", "run", *args, "--nproc", "2", "--out", str(tmp_path / "two")], env=env)
    assert main(["run", *args, "--out", str(tmp_path / "one")]) == 0
    assert proc.wait(timeout=SPAWN_TIMEOUT) == 0
    one, two = ([json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("one", "two"))
    assert len(one) == len(two) > 1
    for a, b in zip(one, two, strict=True):
        for key in ("upper_loss", "stationarity"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5)  # float32 configuration
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "tiny.yaml", "two"]


def _one_process_run(tiny_config, tmp_path):
    """A 2-iteration float64 run of the tiny configuration by one process (its folder)."""
    from bilevel.cli import main

    args = [tiny_config, "run.max_iters=2", "run.eval_every=2", "problem.dtype=float64", "--no-progress"]
    assert main(["run", *args, "--out", str(tmp_path / "one")]) == 0
    return tmp_path / "one"


def test_two_processes_resume_a_one_process_run_to_its_iterates(tiny_config, tmp_path):
    """`bilevel resume RUN_DIR --nproc 2` of a checkpoint one process wrote: the same iterates
    as one process resuming it (float64, 1e-10); rank 0 alone writes the folder."""
    import json
    import shutil

    from bilevel.cli import main

    one = _one_process_run(tiny_config, tmp_path)
    shutil.copytree(one, tmp_path / "two")
    x_at_2 = bl.load_checkpoint(one / "checkpoint.pt")["state"].x
    outs, status = spawn("resume", tmp_path, meanwhile=lambda: main(["resume", str(one), "--max-iters", "4", "--no-progress"]))
    assert status == 0 and outs[0]["status"] == outs[1]["status"] == 0
    a, b = (bl.load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("one", "two"))
    assert a["state"].k == b["state"].k == 4 and b["meta"]["world_size"] == 2 and "world_size" not in a["meta"]
    for name in ("x", "y", "v"):
        assert close(getattr(a["state"], name), getattr(b["state"], name), 1e-10), name
    assert not close(a["state"].x, x_at_2, 1e-6)  # the resumed iterations moved x
    logs = [[json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert [r["iteration"] for r in logs[0]] == [r["iteration"] for r in logs[1]] == [0, 2, 4]
    for r1, r2 in zip(*logs, strict=True):
        for key in ("upper_loss", "stationarity", "test_accuracy"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-9), key
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("rank")) == ["one", "tiny.yaml", "two"]


def test_cli_resume_nproc_checks_before_starting_any_process(monkeypatch, capsys, tiny_config, tmp_path):
    import shutil
    import subprocess

    import yaml

    from bilevel.cli import main

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command, env: calls.append(command) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = _one_process_run(tiny_config, tmp_path)
    capsys.readouterr()
    # more processes than the data split into: one line, nothing launched
    assert main(["resume", str(one), "--nproc", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "n_train=100 cannot be split into 3 equal shards: run on a number of processes (--nproc)" in err
    # a configuration that differs from the checkpoint's: one line, nothing launched
    config = yaml.safe_load((one / "config.yaml").read_text())
    changed = shutil.copytree(one, tmp_path / "changed")
    config["method"]["lr_lower"] = 0.25
    (changed / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["resume", str(changed), "--nproc", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "differs from the configuration its checkpoint was made with (method.lr_lower 0.5 → 0.25" in err
    assert main(["resume", str(one), "--nproc", "0"]) == 2
    assert "--nproc=0 must be a positive number of processes" in capsys.readouterr().err
    assert calls == []
    # a good request relaunches itself through torchrun with the same options
    assert main(["resume", str(one), "--nproc", "2", "--max-iters", "4", "--no-progress"]) == 0
    ((command,),) = [calls]
    assert "--nproc_per_node=2" in command
    assert command[command.index("bilevel") :] == ["bilevel", "resume", str(one), "--max-iters", "4", "--no-progress"]


def test_docstring_examples_run():
    import doctest
    import importlib

    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    failures, attempted = doctest.testmod(importlib.import_module("bilevel.distributed"), optionflags=flags)
    assert attempted > 0 and failures == 0
