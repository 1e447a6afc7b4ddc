"""The runnable examples in the public docstrings run and print what they claim."""

import doctest
import importlib

import pytest

MODULES = [
    "bilevel.problem",
    "bilevel.oracles",
    "bilevel.solve",
    "bilevel.methods.aid",
    "bilevel.methods.itd",
    "bilevel.methods.galet",
    "bilevel.methods.bamm",
    "bilevel.methods.bagdc",
    "bilevel.methods.bome",
    "bilevel.methods.pbgd",
    "bilevel.methods.meha",
    "bilevel.methods.iaptt",
    "bilevel.methods.stochastic",
    "bilevel.streams",
    "bilevel.check",
    "bilevel.finite_difference",
    "bilevel.auto",
    "bilevel.distributed",
    "bilevel.precision",
    "bilevel.parts.unroll",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    failures, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0, f"{name} has no runnable example"
    assert failures == 0
