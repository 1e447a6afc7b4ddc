import os

import pytest
import torch

import bilevel as bl
from bilevel import checkpoint as ckpt
from bilevel.methods.base import State

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("preserve_rng")


def _state(k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)
    return State(
        x={"x": r(4), "s": r(())},
        y={"W": r(2, 3), "b": r(3)},
        v={"W": r(2, 3), "b": r(3)},
        opt={"m": {"x": r(4), "s": r(())}, "s": {"x": r(4), "s": r(())}},
        k=k,
        extra={"y_init": {"W": r(2, 3), "b": r(3)}, "step": torch.tensor(0.25, dtype=F64)},
    )


def _assert_trees_equal(a, b):
    la, lb = bl.tree.leaves(a), bl.tree.leaves(b)
    assert len(la) == len(lb)
    for p, q in zip(la, lb, strict=True):
        assert p.dtype == q.dtype and torch.equal(p, q)


def _assert_states_equal(a, b):
    assert a.k == b.k and isinstance(a.k, int)
    for field in ("x", "y", "v", "opt", "extra"):
        _assert_trees_equal(getattr(a, field), getattr(b, field))
    assert set(a.opt) == set(b.opt) and set(a.extra) == set(b.extra)


def test_round_trip_of_state_history_and_meta(tmp_path):
    state = _state()
    history = [{"iteration": 1, "time": 0.1, "stationarity": 2.5}, {"iteration": 2, "time": 0.2, "stationarity": 1.25}]
    path = bl.save_checkpoint(tmp_path / "run" / "checkpoint.pt", state, history, {"method": "AID", "seed": 3})
    assert path == tmp_path / "run" / "checkpoint.pt" and path.is_file()
    payload = bl.load_checkpoint(path)
    assert isinstance(payload["state"], State)
    _assert_states_equal(payload["state"], state)
    assert payload["history"] == history
    assert payload["meta"] == {"method": "AID", "seed": 3}
    assert payload["format"] == ckpt.FORMAT_VERSION


def test_round_trip_of_a_state_without_multiplier(tmp_path):
    state = State(x={"x": torch.ones(2, dtype=F64)}, y=torch.zeros(3, dtype=F64), v=None, k=0)
    bl.save_checkpoint(tmp_path / "c.pt", state, [])
    loaded = bl.load_checkpoint(tmp_path / "c.pt")["state"]
    assert loaded.v is None and loaded.opt == {} and loaded.extra == {}
    assert torch.equal(loaded.y, state.y)


def test_rng_state_is_saved_and_restored(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    bl.save_checkpoint(tmp_path / "c.pt", _state(), [])
    expected = (torch.rand(3), np.random.rand(2), random.random())
    torch.rand(10), np.random.rand(10), random.random()
    ckpt.restore_rng(bl.load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    bl.save_checkpoint(path, _state(k=1), [])
    bl.save_checkpoint(path, _state(k=2), [])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]
    assert bl.load_checkpoint(path)["state"].k == 2


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failing_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    path = tmp_path / "checkpoint.pt"
    old = _state(k=7, seed=1)
    bl.save_checkpoint(path, old, [{"iteration": 7}])
    before = path.read_bytes()

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")  # a partial write, then the failure
        raise error

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(type(error)):
        bl.save_checkpoint(path, _state(k=8), [{"iteration": 8}])
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]
    assert path.read_bytes() == before
    payload = bl.load_checkpoint(path)
    _assert_states_equal(payload["state"], old)
    assert payload["history"] == [{"iteration": 7}]


def test_loading_a_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(bl.CheckpointError, match=r"no checkpoint at .*nothing\.pt"):
        bl.load_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(bl.CheckpointError, match="no checkpoint"):
        bl.load_checkpoint(tmp_path)  # a directory is not a checkpoint


def test_loading_garbage_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00\x01 this is not a pickle \xff" * 10)
    with pytest.raises(bl.CheckpointError, match=r"garbage\.pt is not a readable bilevel checkpoint") as info:
        bl.load_checkpoint(path)
    assert "safe" not in str(info.value)  # garbage is unreadable, not unsafe
    assert isinstance(info.value, RuntimeError)


def test_loading_a_foreign_torch_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(bl.CheckpointError, match=r"weights\.pt is not a bilevel checkpoint \(no format version and state in it\)"):
        bl.load_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(bl.CheckpointError, match="not a bilevel checkpoint"):
        bl.load_checkpoint(path)
