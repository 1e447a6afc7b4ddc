import pytest
import torch


@pytest.fixture
def float64_default():
    """Make float64 the default dtype for one test only (restored afterwards)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield torch.float64
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture
def gen():
    """A seeded generator, so every test draws the same numbers whatever the order."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def preserve_rng():
    """Restore the global torch / numpy / random states after a test that sets or restores them
    (checkpoint resume restores the saved RNG), so later tests see no difference."""
    import random

    import numpy as np

    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


@pytest.fixture
def tiny_config(tmp_path):
    """A tiny hyper-cleaning configuration (``test_experiments.TINY``) written to a YAML file."""
    import yaml

    from test_experiments import TINY

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return str(path)
