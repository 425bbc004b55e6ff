"""ir: the values the attention passes hand each other: operands, mask terms, matches, Flex plans, rejections.

    match  -> AttentionMatch (what the pattern is: q, k, v, scale, mask terms; plan fields unset) | Rejection
    plan   -> the same AttentionMatch with its plan fields set (mask kind, Flex plan, GQA, adaptive settings)
    rewrite   reads both and emits one SDPA / Flex / adaptive call per site
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from asam_compile import _compat
from asam_compile.report import Reject

# A finite fill or additive value at or below this removes a key exactly: exp(v - rowmax) underflows to 0
# in float32 for any score spread below 9,900. HF uses finfo(dtype).min, old BERT code -10000.
LARGE_NEGATIVE = -1e4


@dataclasses.dataclass(frozen=True)
class Operand:
    """A tensor made 4-D (B, H, L|S, E) for SDPA: `node` followed by view ops `steps` (target, args)."""

    node: fx.Node
    steps: list[tuple[Any, tuple]] = dataclasses.field(default_factory=list)

    def then(self, target: Any, *args: Any) -> "Operand":
        return Operand(self.node, self.steps + [(target, args)])


@dataclasses.dataclass(frozen=True)
class Fill:
    """Positions where `mask` is True (or False when `keep_where_true`) take the value `value`."""

    mask: fx.Node
    value: float
    mask_is_keep: bool  # True: mask marks positions to keep (where(m, scores, -inf))
    at: tuple | None = None  # shape of the scores where the fill applies (Note [Views of the scores] in passes/match.py)
    steps: list[tuple[Any, tuple]] = dataclasses.field(default_factory=list)  # to the canonical layout


@dataclasses.dataclass(frozen=True)
class Term:
    """An additive tensor term, multiplied by `factor` (scale applied after it was added)."""

    node: fx.Node
    factor: float
    negate: bool = False
    at: tuple | None = None  # shape of the scores where the term is added (Note [Views of the scores] in passes/match.py)
    steps: list[tuple[Any, tuple]] = dataclasses.field(default_factory=list)  # to the canonical layout


@dataclasses.dataclass(frozen=True)
class AttentionMatch:
    """One attention site. The match stage sets what the pattern is; the plan stage returns a copy with the
    fields from `mask_kind` on set (dataclasses.replace: a match is never changed once returned)."""

    softmax: fx.Node
    out: fx.Node  # the node whose value SDPA replaces (the PV matmul/einsum)
    q: Operand
    k: Operand
    v: Operand
    v_full: Operand  # v with repetition kept, for fully-masked-row fix-ups
    scale: float
    sym_factors: list[tuple[fx.Node, bool]]  # symbolic scale factors (node, is_divisor), folded into q
    terms: list[Term]
    fills: list[Fill]
    dropout_p: float
    compute_dtype: torch.dtype
    out_dtype: torch.dtype
    rank: int  # ndim of the original q/k/v (2, 3 or 4)
    out_perm: tuple[int, ...] | None  # permutation of the SDPA output to the original layout
    region: list[fx.Node]  # nodes of the pattern that may become dead
    scores: fx.Node  # a node of the scores in the canonical layout (Note [Views of the scores] in passes/match.py)
    safe_softmax: bool = False  # aten._safe_softmax: rows whose scores are all -inf give 0, not NaN
    out_shape: tuple[int, ...] | None = None  # the value matmul's shape, where it is a view of SDPA's layout
    softcap: float | None = None  # Note [Soft-capped scores] in passes/match.py: runs as a Flex score_mod
    # -- set by the plan stage
    mask_kind: str = "none"  # "none" | "causal" | "dense" | "flex"
    fixup: str | None = None  # None | "nan" | "mean" | "nan_if_all_neginf": what fully masked rows give
    enable_gqa: bool = False
    flex_plan: "FlexPlan | str | None" = None  # the block-sparse plan, or why a dense mask was kept
    adaptive: Any = None  # asam_compile.config.SparseSettings where the site goes adaptive sparse
    dispatch_site: str | None = None  # its key in asam_compile.kernels.dispatch.decisions() (dense_fallback="measured")

    @property
    def mask_nodes(self) -> list[fx.Node]:
        return [t.node for t in self.terms] + [fl.mask for fl in self.fills]

    @property
    def mask_steps(self) -> list[list[tuple[Any, tuple]]]:
        """Each mask node's steps into the canonical layout (Note [Views of the scores] in passes/match.py), in mask_nodes order."""
        return [t.steps for t in self.terms] + [fl.steps for fl in self.fills]


@dataclasses.dataclass
class FlexPlan:
    """A structured mask lifted into a mask_mod, with its BlockMask built at compile time (`tensors`) or in the
    graph on every call (`in_graph`)."""

    kernel: str  # "flex" or "sdpa": what the cost model chose
    reason: str
    name: str  # readable mask name, e.g. sliding_window_1024
    key: str  # key of the mask_mod in asam_compile.kernels.runtime.MASK_MODS
    density: float
    block_size: int
    seq_lengths: tuple[int, int]
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # kv_num_blocks, kv_indices, full_*
    score_key: str | None = None  # key of the score_mod in asam_compile.kernels.runtime.SCORE_MODS, for biases
    capture_nodes: tuple[fx.Node, ...] = ()  # nodes of the tensors the mask/score functions read
    # (B', H') of the block mask (1 where the mask does not depend on batch / head)
    mask_batch_heads: tuple[int, int] = (1, 1)
    # True: the mask reads runtime inputs and its block mask is built in the graph on every call
    # (Note [Masks read at run time] in passes/lift.py); `tensors` is then empty
    in_graph: bool = False
    neginf_key: str | None = None  # in_graph, additive mask: MASK_MODS key of "every term is -inf here"


class Rejection(Exception):
    """Why a candidate is left alone: a Reject reason and a detail that names the node."""

    def __init__(self, reject: Reject, detail: str = "") -> None:
        super().__init__(reject.value)
        self.reject, self.detail = reject, detail


def val(x: Any) -> Any:
    """The example value of a node (fake tensor, SymInt, ...), or x itself."""
    return _compat.example_value(x) if isinstance(x, fx.Node) else x


def is_call(node: Any, target: Any) -> bool:
    return isinstance(node, fx.Node) and node.target is target and node.op in ("call_function", "call_method")


def is_cast(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == "to"


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def apply_steps(x: Any, steps: list[tuple[Any, tuple]]) -> Any:
    """x put through view steps [(target, args)] (an Operand's, or a mask term's)."""
    for target, args in steps:
        x = target(x, *args)
    return x


def shape_after(op: Operand) -> tuple[Any, ...] | None:
    """The shape of an operand after its view steps, computed on the fake example value."""
    x = val(op.node)
    return tuple(apply_steps(x, op.steps).shape) if isinstance(x, torch.Tensor) else None


def as_4d(x: Any) -> Any:
    """The scores' example value with a leading batch dim of 1 for a 3-D (N, L, S) site (as rewrite emits it)."""
    return x.unsqueeze(0) if x.dim() == 3 else x


def size_hint(d: Any) -> int:
    """The example's value of a size (an int, or a SymInt's hint)."""
    if isinstance(d, torch.SymInt):
        hint = _compat.sym_hint(d)
        if hint is None:
            raise NotImplementedError(f"size {d} has no hint")
        return int(hint)
    return int(d)


@dataclasses.dataclass
class WeightsDrop:
    """An F.multi_head_attention_forward call whose attention weights nobody reads (Note [nn.MultiheadAttention] in passes/match.py)."""

    node: fx.Node
