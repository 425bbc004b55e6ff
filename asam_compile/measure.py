"""How `asam-compile bench` and the scripts in benchmarks/ measure: one timer, out-of-memory handling, one run header.

    from asam_compile.measure import header_line, run_header, time_ms

    header = run_header("cuda", workload="attention alone B=1 H=16 D=128 bf16")
    print(header_line(header))  # device: NVIDIA H200 | torch 2.13.0 | asam_compile 0.1.0 (5aa8895) | ... | $ ...
    ms = time_ms(lambda: fn(q, k, v), "cuda", iters=10, warmup=2)

`time_ms` is the median of `iters` calls after `warmup` untimed ones: CUDA events on a GPU, recorded around
each call with a single synchronisation at the end (the host never waits between calls), and
`time.perf_counter` on a CPU. The first call of a compiled function compiles: make it before timing and report
it apart. `run_header` is what every run records beside its rows (JSON); `header_line` its one-line text form.
Nothing here imports the command line.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

# The header's own fields, in order; anything else given to run_header is the workload and follows them.
HEADER_KEYS = ("device_name", "torch", "transformers", "asam_compile", "git", "date", "command")


# ---------------------------------------------------------------------------------------------------------
# Timing


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: str | torch.device, iters: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of `iters` calls of fn() after `warmup` untimed calls (see the module docstring)."""
    if iters < 1:
        raise ValueError(f"time_ms: iters must be >= 1, got {iters}")
    for _ in range(warmup):
        fn()
    sync(device)
    if torch.device(device).type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) for start, end in events)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------
# Out of memory and other failures: a row that says so, and the sweep goes on


def is_oom(err: BaseException | None) -> bool:
    """Whether an exception (or one it wraps: Dynamo wraps what a backend raised) is an out-of-memory."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
            return True
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__
    return False


def describe_error(err: BaseException) -> str:
    """One line for a table cell: 'OOM: ...' or the innermost exception Dynamo wrapped, 'Type: first line'."""
    oom = is_oom(err)
    while (inner := getattr(err, "inner_exception", None) or err.__cause__) is not None and inner is not err:
        err = inner
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return (("OOM: " if oom else "") + text)[:240]


def free(device: str | torch.device) -> None:
    """Give back what the last configuration held: Python garbage, and the CUDA caching allocator's free blocks."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# The run header


def git_revision() -> str | None:
    """`git describe --always --dirty` of the checkout this package runs from; None when it is not one."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists() or not (root / "pyproject.toml").exists():
        return None  # an installed copy (or a folder inside someone else's repository): no revision to tell
    try:
        return subprocess.check_output(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=10"],
                                       text=True, stderr=subprocess.DEVNULL, timeout=10).strip() or None
    except Exception:  # noqa: BLE001 - no git, not a repository after all
        return None


def device_name(device: str | torch.device) -> str:
    """The card's name on CUDA; on a CPU the processor and the number of torch threads."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def command_line() -> str:
    """This process's command line, as it could be typed again: `python benchmarks/exact/bench_llama.py ...`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:  # python -m package
        head = ["python", "-m", spec.name.removesuffix(".__main__")]
    else:
        head = ["python", sys.argv[0]] if sys.argv[0].endswith(".py") else [Path(sys.argv[0]).name]
    return shlex.join(head + sys.argv[1:])


def run_header(device: str | torch.device, *, command: str | None = None, **workload: Any) -> dict[str, Any]:
    """The header of one run: card, torch, transformers (None when not installed), asam_compile and the git
    revision of its checkout, the date, the command line (this process's unless given); then `workload`, the
    keyword arguments in their order (by convention `workload="..."` for a one-line description)."""
    from asam_compile import __version__

    try:
        transformers = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        transformers = None
    clash = sorted(set(workload) & set(HEADER_KEYS))
    if clash:
        raise ValueError(f"run_header: {clash} are the header's own fields, not workload fields")
    return {"device_name": device_name(device), "torch": torch.__version__, "transformers": transformers,
            "asam_compile": __version__, "git": git_revision(),
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "command": command if command is not None else command_line(), **workload}


def header_line(header: dict[str, Any]) -> str:
    """run_header() as one line: 'device: ... | torch ... | asam_compile ... (rev) | date | workload | $ command'.
    Workload fields print as 'key value' (a `workload` field as it is); fields that are None are left out."""
    rev = f" ({header['git']})" if header.get("git") else ""
    parts = [f"device: {header['device_name']}", f"torch {header['torch']}"]
    if header.get("transformers"):
        parts.append(f"transformers {header['transformers']}")
    parts += [f"asam_compile {header['asam_compile']}{rev}", header["date"]]
    parts += [str(v) if k == "workload" else f"{k} {v}" for k, v in header.items()
              if k not in HEADER_KEYS and v is not None]
    if header.get("command"):
        parts.append(f"$ {header['command']}")
    return " | ".join(parts)
