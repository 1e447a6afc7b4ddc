"""benchmarks/floor.py: the hand-written loops are the library's algorithms.

Each hand loop's iterates equal ``method.step``'s in float64 after 12 steps (relative
1e-12), and the comparison does fail when a hand loop draws other samples, drops SABA's
memory or changes an option (SRBA's refresh period among them): the floor's timings compare
the same computation.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def floor():
    # one thread, as the benchmark runs: these problems are too small for a second one
    threads = torch.get_num_threads()
    sys.path.insert(0, str(BENCHMARKS))
    torch.set_num_threads(1)
    try:
        yield importlib.import_module("floor")
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(BENCHMARKS))


METHODS = ["GALET", "sl-BAMM", "BAGDC", "AID-CG", "ITD", "BOME", "V-PBGD", "G-PBGD", "MEHA", "IAPTT-GM"]
METHODS += ["SOBA", "SABA", "SRBA", "MA-SOBA", "StocBiO", "AmIGO", "F2SA"]


def test_every_library_configuration_has_a_hand_loop(floor):
    D = floor.Data(4, 2, n=20)
    assert sorted(floor.library_methods()) == sorted(METHODS) == sorted(floor.hand_steps(D, D.streams()))


@pytest.mark.parametrize("name", METHODS)
def test_hand_loop_iterates_equal_the_library_in_float64(floor, name):
    worst = floor.check([name])
    assert worst[name] <= 1e-12


class _NextIteration:
    """Streams whose iteration k gives the draws of iteration k + 1 (other samples)."""

    def __init__(self, streams):
        self.streams = streams

    def batch_at(self, k):
        return self.streams.batch_at(k + 1)


@pytest.mark.parametrize("name", ["SOBA", "SABA", "SRBA", "StocBiO"])
def test_check_fails_when_the_hand_loop_draws_other_samples(floor, monkeypatch, name):
    original = floor.hand_steps
    monkeypatch.setattr(floor, "hand_steps", lambda D, streams: original(D, _NextIteration(streams)))
    with pytest.raises(SystemExit, match="differ"):
        floor.check([name])


def test_check_fails_when_saba_loses_its_memory(floor, monkeypatch):
    original = floor.hand_steps

    def without_memory(D, streams):
        steps = original(D, streams)
        return {**steps, "SABA": steps["SOBA"]}  # the same oracles and draws, no SAGA tables

    monkeypatch.setattr(floor, "hand_steps", without_memory)
    with pytest.raises(SystemExit, match="differ"):
        floor.check(["SABA"])


@pytest.mark.parametrize(
    ("name", "loop", "option"),
    [
        ("BOME", "hand_bome", {"eta": 0.51}),
        ("V-PBGD", "hand_vpbgd", {"gamma": 10.1}),
        ("G-PBGD", "hand_gpbgd", {"gamma": 10.1}),
        ("MEHA", "hand_meha", {"p": 0.26}),
        ("IAPTT-GM", "hand_iaptt", {"beta_z": 0.11}),
        ("MA-SOBA", "hand_masoba", {"theta": 0.2}),
        ("SRBA", "hand_srba", {"period_frac": 0.4}),
        ("AmIGO", "hand_amigo", {"N": 9}),
        ("F2SA", "hand_f2sa", {"delta0": 0.0}),
    ],
)
def test_check_fails_when_an_option_differs(floor, monkeypatch, name, loop, option):
    monkeypatch.setattr(floor, loop, _with(getattr(floor, loop), option))
    with pytest.raises(SystemExit, match="differ"):
        floor.check([name])


def _with(function, option):
    return lambda *args, **kwargs: function(*args, **{**kwargs, **option})


def test_check_refuses_iterates_that_never_moved(floor, monkeypatch):
    monkeypatch.setattr(floor, "hand_steps", lambda D, streams: {"SOBA": lambda s: s})
    monkeypatch.setattr(floor, "library_methods", lambda: {"SOBA": floor.bl.SOBA(lr_upper=1e-300, lr_lower=1e-300)})
    with pytest.raises(SystemExit, match="never moved"):
        floor.check(["SOBA"], iters=1)
