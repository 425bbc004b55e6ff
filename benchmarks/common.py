"""Helpers shared by the benchmark scripts: device-event timing and the git revision for headers."""

from __future__ import annotations

import gc
import statistics
import subprocess
import time
from typing import Any, Callable

import torch


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
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def is_oom(e: BaseException | None) -> bool:
    """Whether an exception (or one it wraps: Dynamo wraps what a backend raised) is an out-of-memory."""
    while e is not None:
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def free(dev: str) -> None:
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
