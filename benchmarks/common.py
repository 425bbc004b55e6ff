"""Helpers shared by the benchmark scripts: device-event timing and the git revision for headers."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

# Shared with the `asam-compile bench` command line; re-exported here for the benchmark scripts.
from asam_compile.cli import free, git_revision, is_oom, sync  # noqa: F401


def bench(fn: Callable[[], Any], device: str, iters: int, warmup_ms: int = 100, rep_ms: int = 200) -> float:
    """Median milliseconds of fn(): CUDA events through triton.testing.do_bench on a GPU, a host clock on CPU."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def git_rev() -> str:
    """The checkout's revision (`git describe --always --dirty`), or "unknown"."""
    return git_revision() or "unknown"
