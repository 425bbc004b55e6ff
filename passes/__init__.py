"""The graph passes of asam_compile, in pipeline order.

    normalize  one canonical call for each spelling of the ops attention is made of   (passes/normalize.py)
    match      grow a candidate outward from each softmax: patterns only               (passes/match.py,
               its operands: q, k, v in any spelling, scalars, GQA repeats              passes/operands.py)
    plan       what each site's mask is, which kernel runs it, adaptive or exact       (passes/plan.py)
    rewrite    one SDPA / Flex / adaptive call per planned site                        (passes/rewrite.py)

Each stage is a module with `run(gm, ctx) -> int` (how many things it changed or found); `ctx` is a
PassContext, which carries the sites from stage to stage. The backend runs PIPELINE in order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

PASS_NAMES = ("normalize", "match", "plan", "rewrite")


@dataclasses.dataclass
class PassContext:
    """What the stages share for one graph."""

    example_inputs: Sequence[Any]
    config: Any  # asam_compile.config.AsamConfig
    report: Any  # asam_compile.report.GraphReport: every candidate, in graph order
    # (Candidate, AttentionMatch | WeightsDrop) per site still in play: match adds, plan refines, rewrite emits
    sites: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)
