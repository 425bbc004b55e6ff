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


# ------------------------------------------------------------------------------------ hypothesis profiles
#
# "ci" (the default): a few hundred examples over all property tests, the same ones every run
# (derandomize), no example database: a failure in CI reproduces anywhere.
# "long": ASAM_HYPOTHESIS_PROFILE=long, 5000 examples for each of the two main property tests (each test takes
# a share of max_examples, see budget() in tests/test_properties.py), random; ASAM_HYPOTHESIS_SEED fixes the
# seed, so that shards with different seeds cover different examples (benchmarks/tools/hypothesis_long.py runs them).
# ASAM_HYPOTHESIS_EXAMPLES overrides max_examples of either profile.

import os as _os

from hypothesis import HealthCheck as _HealthCheck
from hypothesis import core as _hypothesis_core
from hypothesis import settings as _settings

_PROFILE_DEFAULTS = {
    "deadline": None,
    "database": None,
    "print_blob": True,
    "suppress_health_check": [_HealthCheck.function_scoped_fixture, _HealthCheck.too_slow],
}
_settings.register_profile("ci", max_examples=300, derandomize=True, **_PROFILE_DEFAULTS)
_settings.register_profile("long", max_examples=10000, derandomize=False, **_PROFILE_DEFAULTS)
_profile = _os.environ.get("ASAM_HYPOTHESIS_PROFILE", "ci")
if _os.environ.get("ASAM_HYPOTHESIS_EXAMPLES"):
    _settings.register_profile(
        f"{_profile}-n", _settings.get_profile(_profile), max_examples=int(_os.environ["ASAM_HYPOTHESIS_EXAMPLES"])
    )
    _profile = f"{_profile}-n"
_settings.load_profile(_profile)
if _os.environ.get("ASAM_HYPOTHESIS_SEED") and not _settings.default.derandomize:
    # what `pytest --hypothesis-seed=N` sets; that option, when given, is applied later and wins
    _hypothesis_core.global_force_seed = int(_os.environ["ASAM_HYPOTHESIS_SEED"])
