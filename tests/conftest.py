"""Test fixtures: a private Inductor cache, and every test starting from a fresh Dynamo, clean counters, a seed."""

import contextlib

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters


@pytest.fixture(scope="session", autouse=True)
def private_inductor_cache():
    """Compile into a cache of this session only: artifacts that plain Inductor (with its attention pass on)
    left on disk before would otherwise be served to our graphs and hide what the backend does."""
    try:
        from torch._inductor.utils import fresh_cache
    except ImportError:  # older torch
        fresh_cache = contextlib.nullcontext
    with fresh_cache():
        yield


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def no_asam_env(monkeypatch):
    """The ASAM_* environment variables change the config; tests set them explicitly when they need them."""
    monkeypatch.delenv("ASAM_DUMP_DIR", raising=False)
    monkeypatch.delenv("ASAM_STRICT", raising=False)
