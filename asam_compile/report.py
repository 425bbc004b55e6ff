"""What asam did to each graph: every attention candidate, what it became or why it was refused."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any


class Reject(enum.Enum):
    """Why a candidate was left alone. The values are shown to users as they are."""

    SOFTMAX_NOT_LAST_DIM = "softmax is not over the key dimension (the last one)"
    LOG_SOFTMAX = "log_softmax is not attention: its output is not a probability distribution"
    SOFTMAX_IMPLICIT_DIM = "softmax without an explicit dim"
    PROBS_ESCAPE = "attention probabilities are used outside the pattern (e.g. output_attentions)"
    SCORES_ESCAPE = "attention scores are used outside the pattern"
    NO_VALUE_MATMUL = "softmax output does not feed a matmul with a value tensor"
    PROBS_CHANGED = "an op between softmax and the value matmul changes the probabilities"
    NO_QK_MATMUL = "softmax input is not a (scaled, masked) matmul of queries and keys"
    SCORE_OP_UNSUPPORTED = "an op on the scores is not a scale, a mask or a dtype cast"
    SCALE_NOT_SCALAR = "the scale is a tensor (e.g. per head) that cannot be folded exactly"
    SCALE_NOT_POSITIVE = "the scale is zero or negative"
    UNSUPPORTED_RANK = "queries/keys/values are not 2-D, 3-D or 4-D"
    SHAPE_MISMATCH = "query, key and value shapes do not form attention (head sizes or lengths differ)"
    MASK_NOT_BROADCASTABLE = "the mask does not broadcast to the scores the usual way"
    MASK_FILL_VALUE = "a masked_fill/where value is not -inf or a large negative number"
    DTYPE = "query/key/value dtypes cannot be reconciled"
    EINSUM_UNSUPPORTED = "an einsum equation that is not a plain attention contraction"
    EMPTY = "zero-length sequence or head size"
    CHANGED_IN_PLACE = "a tensor the attention reads is changed in place between the scores and the value matmul"
    SOFTCAP_NEEDS_FLEX = "tanh soft-capping of the scores runs only as a FlexAttention score_mod, and Flex cannot run here"
    ALREADY_SDPA = "already runs scaled_dot_product_attention"
    PASS_FAILED = "a pass of ours failed on this graph; the graph was restored and left as it was"


@dataclasses.dataclass
class Candidate:
    """One softmax the matcher looked at."""

    site: str  # the softmax node's name in the graph
    module: str  # module path from nn_module_stack, e.g. "model.layers.0.self_attn"
    source: str  # the user's source line, from stack_trace
    status: str  # "rewritten", "refused", or "matched" (found, but the rewrite pass did not run)
    target: str | None = None  # "sdpa" when rewritten
    reject: Reject | None = None
    detail: str = ""  # free text: which node, which value
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # is_causal, enable_gqa, mask, scale...

    @property
    def reason(self) -> str | None:
        if self.reject is None:
            return None
        return self.reject.value + (f" ({self.detail})" if self.detail else "")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["reject"] = self.reject.name if self.reject else None
        d["reason"] = self.reason
        return d


@dataclasses.dataclass
class GraphReport:
    """The report of one FX graph that Dynamo handed to the backend."""

    graph_id: int
    candidates: list[Candidate] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)  # passes that raised and were undone
    inductor_fallback: str | None = None  # Inductor failed on the rewritten graph: why

    @property
    def rewritten(self) -> list[Candidate]:
        return [c for c in self.candidates if c.status == "rewritten"]

    @property
    def refused(self) -> list[Candidate]:
        return [c for c in self.candidates if c.status == "refused"]

    def to_json(self) -> dict[str, Any]:
        return {
            "graph_id": self.graph_id,
            "candidates": [c.to_json() for c in self.candidates],
            "failures": self.failures,
            "inductor_fallback": self.inductor_fallback,
        }

    def summary(self) -> str:
        return (
            f"graph {self.graph_id}: {len(self.candidates)} attention candidates, "
            f"{len(self.rewritten)} rewritten, {len(self.refused)} refused"
            + (f", {len(self.failures)} pass failures" if self.failures else "")
        )


@dataclasses.dataclass
class Report:
    """All graphs of one model run. `str(report)` is a readable table."""

    graphs: list[GraphReport] = dataclasses.field(default_factory=list)

    @property
    def candidates(self) -> list[Candidate]:
        return [c for g in self.graphs for c in g.candidates]

    @property
    def rewritten(self) -> list[Candidate]:
        return [c for c in self.candidates if c.status == "rewritten"]

    @property
    def refused(self) -> list[Candidate]:
        return [c for c in self.candidates if c.status == "refused"]

    def to_json(self) -> str:
        return json.dumps([g.to_json() for g in self.graphs], indent=2, default=str)

    def __str__(self) -> str:
        from tabulate import tabulate

        rows = []
        for g in self.graphs:
            for c in g.candidates:
                if c.status in ("rewritten", "matched"):
                    what = ("" if c.status == "rewritten" else "matched, not rewritten: ") + c.target + "(" + ", ".join(f"{k}={v}" for k, v in c.info.items()) + ")"
                else:
                    what = "refused: " + (c.reason or "")
                rows.append([g.graph_id, c.site, c.module or "-", c.source or "-", what])
        head = (
            f"asam_compile report: {len(self.graphs)} graph(s), {len(self.candidates)} candidate(s), "
            f"{len(self.rewritten)} rewritten, {len(self.refused)} refused"
        )
        failures = [f"graph {g.graph_id}: {f}" for g in self.graphs for f in g.failures]
        table = tabulate(rows, headers=["graph", "site", "module", "source", "result"], maxcolwidths=[None, None, 40, 50, 60])
        return "\n".join([head, table] + (["pass failures:"] + failures if failures else []))
