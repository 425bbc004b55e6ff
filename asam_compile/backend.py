"""The `asam` torch.compile backend: run our passes on Dynamo's graph, then hand it to Inductor."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import itertools
import json
import logging
import os
import threading
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx

from asam_compile import _compat
from asam_compile.kernels import adaptive, runtime
from asam_compile.config import AsamConfig
from asam_compile.report import GraphReport, Reject, Report

log = logging.getLogger(__name__)

_graph_counter = itertools.count()
_local = threading.local()
_warned: set[str] = set()


class Capture:
    """What `capture()` collected: one report and one final graph per graph compiled inside the block."""

    def __init__(self) -> None:
        self.reports: list[GraphReport] = []
        self.graphs: list[fx.GraphModule] = []  # the graphs handed to Inductor (after our passes)

    @property
    def report(self) -> Report:
        return Report(list(self.reports))

    @property
    def n_rewritten(self) -> int:
        return sum(len(r.rewritten) for r in self.reports)


@contextlib.contextmanager
def capture() -> Iterator[Capture]:
    """Collect the reports and final graphs of every asam compile that happens inside the block."""
    cap = Capture()
    stack = _local.__dict__.setdefault("captures", [])
    stack.append(cap)
    try:
        yield cap
    finally:
        stack.remove(cap)


def _publish(report: GraphReport, gm: fx.GraphModule) -> None:
    for cap in getattr(_local, "captures", []):
        cap.reports.append(report)
        cap.graphs.append(gm)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def run_passes(
    gm: fx.GraphModule, example_inputs: Sequence[Any], config: AsamConfig
) -> tuple[fx.GraphModule, GraphReport]:
    """Run the pipeline (asam_compile.passes.PASS_NAMES) on a copy of `gm`. The pipeline owns snapshots, dumps,
    recovery: a stage that raises is undone and reported, and the rest goes on without it."""
    from asam_compile.passes import PASS_NAMES, PassContext

    report = GraphReport(graph_id=next(_graph_counter))
    dump = _Dumper(config.dump_dir, report.graph_id)
    dump.code("00_input", gm)

    current = _compat.copy_graph_module(gm)
    ctx = PassContext(example_inputs, config, report)
    for i, name in enumerate(PASS_NAMES, start=1):
        if name in config.disable_passes:
            continue
        stage = importlib.import_module(f"asam_compile.passes.{name}")
        snapshot = _compat.copy_graph_module(current)
        try:
            result = stage.run(current, ctx)
            log.debug("%s: %d (graph %s)", name, result.count, "changed" if result.modified else "unchanged")
            current.graph.lint()
            current.recompile()
        except Exception as e:  # noqa: BLE001 - any failure of ours must not break the user's model
            if config.strict:
                raise
            current = snapshot
            report.failures.append(f"{name}: {type(e).__name__}: {e}")
            if name != "normalize":
                for c in report.candidates:
                    if c.status in ("rewritten", "matched"):
                        c.status, c.target, c.reject = "refused", None, Reject.PASS_FAILED
                        c.detail = f"{name} pass failed: {e}"
                ctx.sites.clear()  # nothing left to plan or rewrite
            _warn_once(
                f"{name}:{type(e).__name__}",
                f"asam_compile: pass '{name}' failed ({type(e).__name__}: {e}); the graph was restored "
                "and compilation goes on without it. options={'strict': True} re-raises.",
            )
        dump.code(f"{i:02d}_{name}", current)
    dump.json("report", report.to_json())
    log.info("%s", report.summary())
    return current, report


def asam_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None, mode: str | None = None
) -> Callable[..., Any]:
    """The `asam` backend: `torch.compile(model, backend="asam", options={...})`."""
    config = AsamConfig.from_options(options)
    if mode is not None:
        log.debug("torch.compile mode=%r is passed on to Inductor", mode)
    new_gm, report = run_passes(gm, example_inputs, config)
    _publish(report, new_gm)
    if not config.inductor:
        return new_gm.forward
    try:
        pristine = _compat.copy_graph_module(new_gm)  # compile_fx consumes what it is given
        before = _compat.fuse_attention_count()
        compiled = _compile(new_gm, example_inputs, mode, config)
        if config.disable_inductor_sfdp and _compat.fuse_attention_count() > before:
            # Note [Inductor's attention pass]: the patterns were not all found; never keep their result.
            _warn_once(
                "sfdp-leak",
                "asam_compile: Inductor's own attention pass fired on a graph despite being disabled; "
                "recompiling with Inductor's pattern matcher off (slower code, right numbers).",
            )
            with _compat.inductor_pattern_matcher_off():
                compiled = _compat.compile_fx(pristine, example_inputs, mode, _cache_key(config) + ":nopm")
        return compiled
    except Exception as e:  # noqa: BLE001
        if config.strict or not report.rewritten:
            raise
        report.inductor_fallback = f"{type(e).__name__}: {e}"
        if any(c.target in ("flex", "adaptive") for c in report.rewritten):
            # Flex is the newest path: before giving up on the rewrite, try SDPA (exact, dense masks).
            _warn_once(
                f"inductor-flex:{type(e).__name__}",
                f"asam_compile: Inductor failed on a graph with Flex attention ({type(e).__name__}: {e}); "
                "retrying with flex='never' and allow_sparse=False (exact SDPA with dense masks).",
            )
            try:
                dense_config = dataclasses.replace(config, flex="never", allow_sparse=False)
                dense_gm, dense_report = run_passes(gm, example_inputs, dense_config)
                compiled = _compile(dense_gm, example_inputs, mode, dense_config)
                report.candidates = dense_report.candidates
                return compiled
            except Exception:  # noqa: BLE001 - fall through to the original graph
                log.debug("dense retry failed too", exc_info=True)
        _warn_once(
            f"inductor:{type(e).__name__}",
            f"asam_compile: Inductor failed on the rewritten graph ({type(e).__name__}: {e}); "
            "retrying with the original graph.",
        )
        return _compile(gm, example_inputs, mode, config)


def _compile(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None, config: AsamConfig):
    """compile_fx with Inductor's attention patterns taken out (Note [Inductor's attention pass]).

    How many patterns were taken out is part of the cache key: where none could be found (an Inductor
    whose entries we cannot recognise), Inductor's FX graph cache is off for the compile, so a graph that
    its patterns rewrote is never stored and never served back without the fire being seen
    (Note [FX graph cache]).
    """
    with _compat.inductor_sfdp_disabled(config.disable_inductor_sfdp, _devices(example_inputs)) as removed:
        key = f"{_cache_key(config)}:sfdp-{removed}"
        use_cache = not (config.disable_inductor_sfdp and removed == 0)
        flex_on_cpu = any(d.type == "cpu" for d in _devices(example_inputs)) and any(
            n.target in (runtime.flex_attention_call, *adaptive.IN_GRAPH_CALLS) for n in gm.graph.nodes
        )
        return _compat.compile_fx(gm, example_inputs, mode, key, use_cache=use_cache, flex_on_cpu=flex_on_cpu)


def _cache_key(config: AsamConfig) -> str:
    from asam_compile import __version__

    return f"{__version__}:{config.cache_key()}"


def _devices(example_inputs: Sequence[Any]) -> list[torch.device]:
    return sorted({x.device for x in example_inputs if isinstance(x, torch.Tensor)}, key=str)


def explain(model: Callable[..., Any], *args: Any, options: dict[str, Any] | None = None, **kwargs: Any) -> Report:
    """Compile `model` with our passes only (no Inductor), run it once on the inputs, return the report."""
    opts = dict(options or {})
    opts["inductor"] = False
    AsamConfig.from_options(opts)  # validate before tracing

    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        return asam_backend(gm, example_inputs, options=opts)

    with capture() as cap, torch.no_grad():
        torch.compiler.reset()  # explain must see a fresh trace; see Note [explain resets Dynamo]
        torch.compile(model, backend=backend)(*args, **kwargs)
    torch.compiler.reset()
    _add_dispatch_decisions(cap.report)
    return cap.report


def _add_dispatch_decisions(report: Report) -> None:
    """What the measured dispatch of each adaptive site decided on the call explain() made: info["dispatch"]
    (Note [Dispatch by measured density] in asam_compile/kernels/dispatch.py)."""
    from asam_compile.kernels import dispatch

    measured = dispatch.decisions()
    for cand in report.candidates:
        site = cand.info.get("dispatch_site")
        if site in measured:
            cand.info["dispatch"] = "; ".join(
                f"{bucket}: sparse heads {list(d['sparse'] or ())} of densities {[round(x, 2) for x in d['density']]}"
                for bucket, d in measured[site].items())


# Note [explain resets Dynamo]
# Dynamo caches compiled frames per code object. A model compiled before with another backend could
# otherwise be served from that cache and explain() would see no graph. explain() is a debugging tool,
# so paying a reset (and a recompile of whatever ran before) is the price of a truthful answer.


class _Dumper:
    """Writes readable code before/after each pass and a JSON report into dump_dir/graph_<id>/."""

    def __init__(self, root: str | os.PathLike | None, graph_id: int) -> None:
        self.dir = None
        if root:
            self.dir = os.path.join(os.fspath(root), f"graph_{graph_id:03d}")
            os.makedirs(self.dir, exist_ok=True)

    def code(self, name: str, gm: fx.GraphModule) -> None:
        if self.dir:
            with open(os.path.join(self.dir, f"{name}.py"), "w") as f:
                f.write(gm.print_readable(print_output=False))

    def json(self, name: str, obj: Any) -> None:
        if self.dir:
            with open(os.path.join(self.dir, f"{name}.json"), "w") as f:
                json.dump(obj, f, indent=2, default=str)


# Note [Inductor's attention pass]
# Inductor's fuse_attention.py registers ~30 attention patterns on the joint graph. They rewrite softmax
# over a non-last dimension as if it were over the last one (pytorch issue 196468: relative error 0.3-0.9
# on torch 2.13), never emit is_causal or enable_gqa, and would fight our rewrite on the candidates we
# refused on purpose. While our backend hands a graph to Inductor, those patterns are taken out of its
# pattern pass and put back afterwards; the other joint-graph patterns (pad_mm, misc) still run.


# Note [FX graph cache]
# Inductor caches compiled graphs by a key made of the graph, its inputs and Inductor's config. We change
# that config only by taking the fuse_attention patterns out (Note [Inductor's attention pass]), which the
# key does not see: a near miss compiled earlier by plain Inductor (miscompiled by its pattern) would be
# served to us from the cache. A do-nothing joint_custom_pre_pass whose uuid() holds our version and
# options puts both into the key, so asam's entries are apart from plain Inductor's and from each other,
# and stay cacheable (a custom pass without a uuid() would bypass the cache).
# The key also holds how many of Inductor's attention patterns we took out. Where that is 0 (an Inductor
# whose entries we could not recognise: torch 2.11 before we read their check functions), a fire could be
# stored in the cache and later served back without the counter moving, so such compiles bypass the cache
# and the fire check in asam_backend always sees the truth.
