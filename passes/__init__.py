"""The graph passes of asam_compile, in pipeline order.

    normalize  one canonical call for each spelling of the ops attention is made of   (passes/normalize.py)
    match      grow a candidate outward from each softmax: patterns only               (passes/match.py,
               its operands: q, k, v in any spelling, scalars, GQA repeats              passes/operands.py)
    plan       what each site's mask is, which kernel runs it, adaptive or exact       (passes/plan.py)
    rewrite    one SDPA / Flex / adaptive call per planned site                        (passes/rewrite.py)

Each stage is a module with `run(gm, ctx) -> StageResult`; `ctx` is a PassContext, which carries the sites from
stage to stage, and its report the entries each stage adds. The backend runs PASS_NAMES in order.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # the config module imports PASS_NAMES from here
    import torch.fx as fx

    from asam_compile.config import AsamConfig
    from asam_compile.report import GraphReport

PASS_NAMES = ("normalize", "match", "plan", "rewrite")


@dataclasses.dataclass
class PassContext:
    """What the stages share for one graph."""

    example_inputs: Sequence[Any]
    config: AsamConfig
    report: GraphReport  # every candidate, in graph order
    # (Candidate, AttentionMatch | WeightsDrop) per site still in play: match adds, plan refines, rewrite emits
    sites: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class StageResult:
    """What a stage returns (as torch.fx.passes.infra.PassResult, plus a count); its report entries are in
    ctx.report and the sites it hands on in ctx.sites."""

    graph_module: fx.GraphModule
    modified: bool  # whether the graph changed
    count: int  # nodes canonicalised, sites matched, planned or rewritten
