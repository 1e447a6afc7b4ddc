"""bilevel.state: typed part states, their registry, and the plain data checkpoints hold."""

from typing import NamedTuple

import pytest
import torch

import bilevel as bl
from bilevel.parts import EmptyState, PeriodicState, UnrollState
from bilevel.state import STATE_TAG, State, part_state, registered_states, states_from_plain, states_to_plain
from bilevel.updates import AdamState, SGDState

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("preserve_rng")


def _tree(seed, shape=(3,)):
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(*shape, generator=gen, dtype=F64), "b": torch.randn(2, generator=gen, dtype=F64)}


def _typed_state():
    x, y = _tree(0), _tree(1)
    return State(
        x=x,
        y=y,
        v=_tree(2),
        k=7,
        opt=AdamState(m=_tree(3), s=_tree(4)),
        extra={
            "lower": EmptyState(),
            "multiplier": PeriodicState(eta=torch.tensor(0.3, dtype=F64)),
            "unroll": UnrollState(y_init=_tree(5)),
        },
    )


def _equal(a, b):
    la, lb = bl.tree.leaves(a), bl.tree.leaves(b)
    return len(la) == len(lb) and all(p.dtype == q.dtype and torch.equal(p, q) for p, q in zip(la, lb, strict=False))


def test_the_library_registers_its_part_states():
    names = registered_states()
    for cls in (EmptyState, AdamState, SGDState, PeriodicState, UnrollState):
        assert names[cls.__name__] is cls


def test_to_dict_is_plain_data_and_from_dict_restores_the_typed_states():
    state = _typed_state()
    plain = state.to_dict()
    assert plain["opt"][STATE_TAG] == "AdamState" and plain["extra"]["multiplier"] == {
        STATE_TAG: "PeriodicState",
        "eta": state.extra["multiplier"].eta,
    }
    assert plain["extra"]["lower"] == {STATE_TAG: "EmptyState"}

    def plain_only(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain_only(v) for k, v in value.items())
        if type(value) in (list, tuple):
            return all(plain_only(v) for v in value)
        return isinstance(value, (torch.Tensor, int, float, str, type(None)))

    assert plain_only(plain)
    back = State.from_dict(plain)
    assert type(back.opt) is AdamState and type(back.extra["multiplier"]) is PeriodicState and type(back.extra["unroll"]) is UnrollState
    assert back.extra["lower"] == EmptyState() and back.k == 7
    for field in ("x", "y", "v", "opt", "extra"):
        assert _equal(getattr(back, field), getattr(state, field)), field


def test_nested_states_and_user_dicts_pass_through():
    nested = {"inner": [SGDState(momentum=_tree(6)), {"plain": torch.ones(1)}], "t": (1, "a")}
    back = states_from_plain(states_to_plain(nested))
    assert type(back["inner"][0]) is SGDState and _equal(back["inner"][0], nested["inner"][0])
    assert back["inner"][1]["plain"] is nested["inner"][1]["plain"] and back["t"] == (1, "a")
    assert State.from_dict(State(x=torch.zeros(1), y=torch.zeros(1), opt={"d": torch.ones(1)}).to_dict()).opt["d"].item() == 1.0


def test_unknown_or_malformed_states_are_refused():
    with pytest.raises(ValueError, match=r"unknown part state 'Trap'"):
        states_from_plain({STATE_TAG: "Trap", "cmd": "rm"})
    with pytest.raises(ValueError, match=r"part state AdamState has fields \['m'\], expected \['m', 's'\]"):
        states_from_plain({STATE_TAG: "AdamState", "m": torch.zeros(1)})


def test_part_state_registers_named_tuples_only_and_one_class_a_name():
    with pytest.raises(TypeError, match="NamedTuple"):
        part_state(dict)

    class AdamState(NamedTuple):  # same name as the library's, another class
        m: object

    with pytest.raises(ValueError, match="already registered"):
        part_state(AdamState)


def test_legacy_states_of_bilevel_0_1_are_converted():
    m, s, mom, y0 = _tree(1), _tree(2), _tree(3), _tree(4)
    eta = torch.tensor(0.2, dtype=F64)
    base = {"x": _tree(0), "y": _tree(0), "v": None, "k": 3}
    adam = State.from_dict({**base, "opt": {"m": m, "s": s}, "extra": {"eta": eta}}, legacy=True)
    assert type(adam.opt) is AdamState and _equal(adam.opt.m, m) and _equal(adam.opt.s, s)
    assert type(adam.extra["multiplier"]) is PeriodicState and torch.equal(adam.extra["multiplier"].eta, eta)
    sgd = State.from_dict({**base, "opt": {"momentum": mom}, "extra": {"y_init": y0}}, legacy=True)
    assert type(sgd.opt) is SGDState and _equal(sgd.opt.momentum, mom) and _equal(sgd.extra["unroll"].y_init, y0)
    plain = State.from_dict({**base, "opt": {}, "extra": {}}, legacy=True)
    assert plain.opt == EmptyState() and plain.extra == {}
    custom = State.from_dict({**base, "opt": {"d": m}, "extra": {}}, legacy=True)
    assert set(custom.opt) == {"d"} and _equal(custom.opt["d"], m)


def test_a_run_with_typed_states_is_checkpointed_and_resumed_exactly(tmp_path):
    problem = bl.problems.T1g(n=4)
    method = bl.BAGDC(lr_upper=bl.Adam(0.02), lr_lower=0.3, dual_step="periodic", period=3, stability_check="off")
    full = bl.solve(problem, method, max_iters=10)
    path = tmp_path / "checkpoint.pt"
    bl.solve(problem, method, max_iters=5, checkpoint=path)
    saved = bl.load_checkpoint(path)["state"]
    assert type(saved.opt) is AdamState and type(saved.extra["multiplier"]) is PeriodicState
    resumed = bl.solve(problem, method, max_iters=10, resume=path)
    assert _equal(resumed.state.x, full.state.x) and _equal(resumed.state.opt, full.state.opt)
    assert _equal(resumed.state.extra, full.state.extra)
