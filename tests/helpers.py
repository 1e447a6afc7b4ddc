"""Helpers shared by the method tests (imported as ``helpers``; pytest puts tests/ on sys.path)."""

from dataclasses import dataclass

import pytest
import torch

from bilevel.updates import UpperOptimizer


@dataclass(frozen=True)
class RecordDirection(UpperOptimizer):
    """An upper 'optimizer' that leaves x unchanged and stores the direction d in its state."""

    lr: float = 0.0

    def init(self, x):
        return {}

    def update(self, x, d, state, k):
        return x, {"d": d}


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def random_state(method, problem, seed=0):
    """A state at random ``(x0, y0)`` with a random multiplier ``v0``; returns ``(state, x0, y0, v0)``."""
    gen = torch.Generator().manual_seed(seed)
    n = problem.x_init["x"].numel()
    rnd = lambda: torch.randn(n, generator=gen, dtype=torch.float64)
    x0, y0, v0 = rnd(), rnd(), rnd()
    return method.init(problem, {"x": x0}, {"y": y0}).replace(v={"y": v0}), x0, y0, v0


#: step sizes every method must refuse at construction, with how the message shows them.
BAD_STEP_SIZES = [
    (0.0, "0.0"),
    (-2e-4, "-0.0002"),
    (float("inf"), "inf"),
    (float("nan"), "nan"),
    (True, "True"),
    ("1e-3", "'1e-3'"),
    ([1, 2], r"\[1, 2\]"),
]


def assert_rejects_step_size(cls, field, value, shown):
    """``cls(field=value)`` fails with one line naming the class, the argument and the value."""
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\({field}={shown}\) must be a positive number"):
        cls(**{field: value})


def log_records(run_dir):
    """The records of ``run_dir/log.jsonl`` without their timing field (equal between two runs)."""
    import json

    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in lines]
