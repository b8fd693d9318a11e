"""Shared fixtures. Heavy imports (transformers, the model floor) stay inside the fixtures,
so the tests under tests/core never load them."""

from __future__ import annotations

import pytest
import torch

from tests.scenarios import scenario  # noqa: F401  (the fixture)
from tests.scenarios import start as start_scenarios
from tests.scenarios import stop_all as stop_scenarios

# The tensors here are tiny: one thread is ~10x faster than an OpenMP team on a shared 2-core
# machine, where spinning threads fight the other processes for the cores.
torch.set_num_threads(1)


def pytest_collection_finish(session):
    start_scenarios(session.config, session.items)


def pytest_unconfigure(config):
    stop_scenarios(config)


TINY_ARGS = {
    "models": {
        # unquantized: the tests pin how often the drafter agrees (and int8 kernels take no float64)
        "drafter": {"source": "tiny-random:drafter", "dtype": "float64", "quantization": "none"},
        "verifier": {"source": "tiny-random:verifier", "dtype": "float64"},
    },
    "slim": {"layers": [0, 1, 3]},
}


def tiny_config(**overrides):
    from via_sd_ray.config import parse_config

    return parse_config({**TINY_ARGS, **overrides})


@pytest.fixture(scope="session")
def build_tiny_engine():
    """Builds a LocalEngine over the tiny models; keyword arguments replace whole config sections."""
    from via_sd_ray.models.local import LocalEngine

    return lambda **sections: LocalEngine(tiny_config(**sections))


@pytest.fixture(scope="session")
def tiny_engine(build_tiny_engine):
    """A LocalEngine over the tiny random drafter and verifier in float64 (exact greedy comparisons)."""
    return build_tiny_engine()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny verifier saved as a Hugging Face checkpoint directory (safetensors)."""
    from via_sd_ray.models import tiny

    directory = tmp_path_factory.mktemp("tiny-verifier")
    tiny.save_tiny(directory)
    return directory
