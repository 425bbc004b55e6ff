"""match: grow an attention candidate outward from each softmax; never mutates the graph.

    scores = (q * a) @ (k * b).transpose(-2, -1) / c     # any placement of scalar factors
    scores = scores + mask | masked_fill(m, -inf) | where(m, scores, min)
    probs  = softmax(scores, -1[, dtype]) [.to(d)] [dropout]
    out    = probs @ v                                    ->  AttentionMatch(q, k, v, scale, mask, ...)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from typing import Any, Sequence

import sympy
import torch
import torch.fx as fx

from asam_compile import _compat
from asam_compile.report import Candidate, GraphReport, Reject
from asam_compile.passes.normalize import _is_tensor, may_alias_input

log = logging.getLogger(__name__)
F = torch.nn.functional

# A finite fill or additive value at or below this removes a key exactly: exp(v - rowmax) underflows to 0
# in float32 for any score spread below 9,900. HF uses finfo(dtype).min, old BERT code -10000.
LARGE_NEGATIVE = -1e4


@dataclasses.dataclass
class Operand:
    """A tensor made 4-D (B, H, L|S, E) for SDPA: `node` followed by view ops `steps` (target, args)."""

    node: fx.Node
    steps: list[tuple[Any, tuple]] = dataclasses.field(default_factory=list)

    def then(self, target: Any, *args: Any) -> "Operand":
        return Operand(self.node, self.steps + [(target, args)])


@dataclasses.dataclass
class Fill:
    """Positions where `mask` is True (or False when `keep_where_true`) take the value `value`."""

    mask: fx.Node
    value: float
    mask_is_keep: bool  # True: mask marks positions to keep (where(m, scores, -inf))
    at: tuple | None = None  # shape of the scores where the fill applies (Note [Views of the scores])
    steps: list[tuple[Any, tuple]] = dataclasses.field(default_factory=list)  # to the canonical layout


@dataclasses.dataclass
class Term:
    """An additive tensor term, multiplied by `factor` (scale applied after it was added)."""

    node: fx.Node
    factor: float
    negate: bool = False
    at: tuple | None = None  # shape of the scores where the term is added (Note [Views of the scores])
    steps: list[tuple[Any, tuple]] = dataclasses.field(default_factory=list)  # to the canonical layout


@dataclasses.dataclass
class AttentionMatch:
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
    mask_kind: str  # "none" | "causal" | "dense"
    fixup: str | None  # None | "nan" | "mean": what fully masked rows give in the original
    dropout_p: float
    enable_gqa: bool
    compute_dtype: torch.dtype
    out_dtype: torch.dtype
    rank: int  # ndim of the original q/k/v (2, 3 or 4)
    out_perm: tuple[int, ...] | None  # permutation of the SDPA output to the original layout
    region: list[fx.Node]  # nodes of the pattern that may become dead
    flex_plan: "FlexPlan | str | None" = None  # the block-sparse plan, or why a dense mask was kept
    adaptive: Any = None  # asam_compile.adaptive.SparseSettings where the site goes adaptive sparse
    safe_softmax: bool = False  # aten._safe_softmax: rows whose scores are all -inf give 0, not NaN
    out_shape: tuple[int, ...] | None = None  # the value matmul's shape, where it is a view of SDPA's layout
    softcap: float | None = None  # Note [Soft-capped scores]: runs as a Flex score_mod


@dataclasses.dataclass
class FlexPlan:
    """A structured mask lifted into a mask_mod, with its BlockMask built at compile time (`tensors`) or in the
    graph on every call (`in_graph`)."""

    kernel: str  # "flex" or "sdpa": what the cost model chose
    reason: str
    name: str  # readable mask name, e.g. sliding_window_1024
    key: str  # key of the mask_mod in asam_compile.runtime.MASK_MODS
    density: float
    block_size: int
    seq_lengths: tuple[int, int]
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # kv_num_blocks, kv_indices, full_*
    score_key: str | None = None  # key of the score_mod in asam_compile.runtime.SCORE_MODS, for biases
    capture_nodes: tuple[fx.Node, ...] = ()  # nodes of the tensors the mask/score functions read
    # (B', H') of the block mask (1 where the mask does not depend on batch / head)
    mask_batch_heads: tuple[int, int] = (1, 1)
    # True: the mask reads runtime inputs and its block mask is built in the graph on every call
    # (Note [Masks read at run time] in passes/lift.py); `tensors` is then empty
    in_graph: bool = False
    neginf_key: str | None = None  # in_graph, additive mask: MASK_MODS key of "every term is -inf here"


class Rejection(Exception):
    def __init__(self, reject: Reject, detail: str = "") -> None:
        super().__init__(reject.value)
        self.reject, self.detail = reject, detail


def _val(x: Any) -> Any:
    return _compat.example_value(x) if isinstance(x, fx.Node) else x


# Note [0-dim constants]
# Models build scalars as 0-dim tensors inside the graph: GPT-2's legacy path divides the scores by
# `torch.full([], head_dim ** 0.5, dtype=..., device=...)` and fills with `torch.full([], finfo.min)`,
# DistilBERT fills with `torch.tensor(-inf)`. A 0-dim tensor of a floating dtype does not change the dtype of
# the scores it meets, so it acts as the Python number it holds, rounded to its own dtype: the matcher reads
# it as that number (folded into SDPA's scale, or a fill value), and the rewrite leaves the node to die.


def _const_scalar(x: Any, depth: int = 0) -> float | None:
    """The number a 0-dim tensor built from constants holds (Note [0-dim constants]), or None."""
    if not isinstance(x, fx.Node) or depth > 4 or x.op not in ("call_function", "call_method"):
        return None
    v = _val(x)
    if not isinstance(v, torch.Tensor) or v.dim() != 0 or not v.dtype.is_floating_point:
        return None
    if _is_cast(x) or (x.op == "call_method" and x.target in ("float", "half", "bfloat16", "double", "contiguous", "clone")):
        inner = _const_scalar(x.args[0], depth + 1)
        return None if inner is None else float(torch.tensor(inner, dtype=torch.float64).to(v.dtype))
    if x.op != "call_function":
        return None
    if x.target is torch.full and len(x.args) >= 2 and isinstance(x.args[0], (list, tuple)) and not x.args[0]:
        value = x.args[1]
    elif x.target in (torch.tensor, torch.scalar_tensor, torch.as_tensor) and x.args:
        value = x.args[0]
    else:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(torch.tensor(value, dtype=torch.float64).to(v.dtype))


# Note [0-dim runtime scales]
# PyTorch's own attention patterns take the scale as a 0-dim tensor input (`scores.div(inv_scale)` with
# inv_scale a graph input). Such a factor is multiplied into q (or divides it), like a symbolic scale: exact
# up to rounding, and its gradient flows. It cannot be read at compile time, so it is taken only where no
# mask term or fill came before it (it would scale them by an unknown amount), and it has no sign check:
# (q / t) . k is (q . k) / t for any t.


def _is_tensor_scalar(x: Any) -> bool:
    """A 0-dim floating tensor that is not a compile-time constant (Note [0-dim runtime scales])."""
    v = _val(x)
    return (isinstance(x, fx.Node) and isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype.is_floating_point
            and _const_scalar(x) is None)


def _fold(x: Any) -> Any:
    """x, or the number it holds where it is a 0-dim constant (Note [0-dim constants])."""
    c = _const_scalar(x)
    return x if c is None else c


def _is_scalar(x: Any) -> bool:
    if _const_scalar(x) is not None:
        return True
    v = _val(x)
    return isinstance(v, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(v, bool)


def _scalar_hint(x: Any) -> float:
    c = _const_scalar(x)
    if c is not None:
        return c
    v = _val(x)
    if isinstance(v, (torch.SymInt, torch.SymFloat)):
        hint = _compat.sym_hint(v)
        return float(hint) if hint is not None else float("nan")
    return float(v)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# Note [Views of the scores]
# BART computes its scores as a 3-D bmm, views them 4-D to add the mask and back to 3-D for the softmax and the
# value bmm; BLOOM adds ALiBi in 3-D (baddbmm) and masks in 4-D; DeBERTa views the probabilities before its
# bmm. A view or reshape that keeps the last two dims (queries, keys) and regroups only the leading ones is
# the same row-major regrouping of (batch, head) whichever side of an op it sits on. The matcher therefore
# looks through such reshapes and works in one canonical layout: the one with the most leading dims among
# the scores' and probabilities' layouts (4-D where the mask is added in 4-D). q, k and v are reshaped into
# it, a mask term added in another layout is expanded over its leading dims there and reshaped, and the
# output is reshaped back to the value matmul's shape. Static shapes only; such a mask stays a dense SDPA mask.


def is_batch_reshape(node: Any) -> bool:
    """A view / reshape that keeps the last two dims and regroups only the leading ones (static shapes)."""
    if not isinstance(node, fx.Node) or not (
        (node.op == "call_method" and node.target in ("view", "reshape")) or _call(node, torch.reshape)
    ):
        return False
    src, out = _val(node.args[0]) if isinstance(node.args[0], fx.Node) else None, _val(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor) or src.dim() < 2 or out.dim() < 2:
        return False
    if any(not isinstance(d, int) for d in (*src.shape, *out.shape)):
        return False
    return tuple(src.shape[-2:]) == tuple(out.shape[-2:]) and src.numel() == out.numel()


def _call(node: Any, target: Any) -> bool:
    return isinstance(node, fx.Node) and node.target is target and node.op in ("call_function", "call_method")


def _is_cast(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == "to"


def _is_identity_view(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("contiguous", "clone")


SAFE_SOFTMAXES = (torch.ops.aten._safe_softmax, torch.ops.aten._safe_softmax.default)


def is_softmax(node: fx.Node) -> bool:
    """A softmax the matcher grows a candidate from: torch.softmax (normalized), or aten._safe_softmax (how
    SDPA's math path decomposes: a row of -inf gives 0 instead of NaN)."""
    return _call(node, torch.softmax) or (node.op == "call_function" and node.target in SAFE_SOFTMAXES)


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L['self']", "")


def source_line(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [l.strip() for l in trace.strip().splitlines() if l.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            where = lines[i].split(",")
            loc = where[0].replace("File ", "").strip('"').split("/")[-1] + ":" + where[1].replace(" line ", "").strip()
            code = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{loc}: {code}"
    return ""


# ---------------------------------------------------------------------------------------------------
# probs side


def _match_probs(softmax: fx.Node) -> tuple[fx.Node, float, list[fx.Node], fx.Node]:
    """Follow the probabilities to the value matmul. Returns (consumer, dropout_p, region, probs)."""
    region: list[fx.Node] = []
    cur, dropout_p = softmax, 0.0
    while True:
        users = list(cur.users)
        if len(users) != 1:
            raise Rejection(Reject.PROBS_ESCAPE if len(users) > 1 else Reject.NO_VALUE_MATMUL, cur.name)
        (user,) = users
        if _is_cast(user) or _is_identity_view(user) or is_batch_reshape(user):
            region.append(user)
            cur = user
            continue
        if _call(user, F.dropout) or _call(user, torch.dropout):  # (x, p, training[, inplace]) both
            p = user.kwargs.get("p", user.args[1] if len(user.args) > 1 else 0.5)
            training = user.kwargs.get("training", user.args[2] if len(user.args) > 2 else True)
            inplace = user.kwargs.get("inplace", user.args[3] if len(user.args) > 3 else False)
            if not isinstance(training, bool) or inplace or (training and not isinstance(p, (int, float))):
                raise Rejection(Reject.PROBS_CHANGED, f"dropout with non-constant arguments: {user.name}")
            if training:
                dropout_p = float(p)
            region.append(user)
            cur = user
            continue
        if _call(user, torch.matmul) and user.args[0] is cur:
            return user, dropout_p, region, cur
        if _call(user, torch.einsum):
            return user, dropout_p, region, cur
        if _reaches_matmul(user):
            raise Rejection(Reject.PROBS_CHANGED, f"{user.name} ({user.target if isinstance(user.target, str) else getattr(user.target, '__name__', user.target)})")
        raise Rejection(Reject.NO_VALUE_MATMUL, user.name)


def _reaches_matmul(node: fx.Node, depth: int = 4) -> bool:
    if depth == 0:
        return False
    for u in node.users:
        if _call(u, torch.matmul) or _call(u, torch.einsum) or _reaches_matmul(u, depth - 1):
            return True
    return False


# ---------------------------------------------------------------------------------------------------
# scores side


@dataclasses.dataclass
class _Scores:
    qk: fx.Node
    factors: list[tuple[Any, bool]]  # (scalar, is_divisor) applied after the matmul, innermost first
    terms: list[Term]
    fills: list[Fill]
    region: list[fx.Node]
    softcap: float | None = None  # Note [Soft-capped scores]: c in c * tanh(scores / c)


# Note [Soft-capped scores]
# Gemma 2 caps its scores as `c * tanh(scores / c)` before adding the mask. SDPA has no place for it; Flex does:
# a score_mod `c * tanh(score / c)` (then the lifted bias, if any) on the scaled scores, exact. So a soft-capped
# site always runs Flex, with its mask's block mask (or a full / causal one); where Flex cannot run (CPU
# training, dropout, flex='never', a mask that cannot be lifted) it is refused with a reason that names the tanh.


def _is_tanh(node: Any) -> bool:
    return _call(node, torch.tanh) or (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "tanh")


def _match_softcap(tanh: fx.Node, chain: list[tuple[str, Any]], region: list[fx.Node]) -> fx.Node:
    """Note [Soft-capped scores]: the scores under `c * tanh(x / c)`; records ("softcap", c) in the chain."""
    outer = chain[-1] if chain else None
    if outer is None or outer[0] != "mul" or not _is_number(outer[1]):
        raise Rejection(Reject.SCORE_OP_UNSUPPORTED, f"{tanh.name} (tanh) is not soft-capping c * tanh(x / c)")
    c = float(outer[1])
    inner = tanh.args[0]
    if not isinstance(inner, fx.Node) or len(inner.users) != 1 or not (_call(inner, torch.div) or _call(inner, torch.mul)):
        raise Rejection(Reject.SCORE_OP_UNSUPPORTED, f"{tanh.name} (tanh) is not soft-capping c * tanh(x / c)")
    x, d = inner.args
    f = _fold(d)
    if not (_is_number(f) and isinstance(x, fx.Node) and c > 0
            and (f == c if _call(inner, torch.div) else abs(f * c - 1.0) < 1e-9)):
        raise Rejection(Reject.SCORE_OP_UNSUPPORTED, f"{tanh.name} (tanh) is not soft-capping c * tanh(x / c)")
    chain[-1] = ("softcap", c)
    region.append(inner)
    return x


def _scores_side(a: Any, b: Any) -> tuple[Any, Any] | None:
    """Which operand of a binary op carries the scores: (scores, other), or None."""
    for x, y in ((a, b), (b, a)):
        if isinstance(x, fx.Node) and _is_tensor(x) and _reaches_qk(x):
            return x, y
    return None


def _reaches_qk(node: fx.Node, depth: int = 12) -> bool:
    """Whether `node` is a QK matmul reached through ops the scores parser accepts."""
    cur = node
    for _ in range(depth):
        if not isinstance(cur, fx.Node):
            return False
        if _call(cur, torch.matmul) or _call(cur, torch.einsum) or _call(cur, torch.baddbmm):
            return True
        if _is_cast(cur) or _is_identity_view(cur) or _call(cur, torch.masked_fill) or is_batch_reshape(cur) or _is_tanh(cur):
            cur = cur.args[0]
        elif _call(cur, torch.where):
            nxt = [a for a in cur.args[1:] if isinstance(a, fx.Node) and _reaches_qk(a, depth - 1)]
            return bool(nxt)
        elif any(_call(cur, t) for t in (torch.mul, torch.div, torch.add, torch.sub)):
            return any(isinstance(a, fx.Node) and _reaches_qk(a, depth - 1) for a in cur.args[:2])
        else:
            return False
    return False


def _no_qk(node: fx.Node) -> Rejection:
    """The rejection for a scores op whose operands do not lead to the QK matmul through known ops."""
    for a in node.args:
        if isinstance(a, fx.Node) and _is_tensor(a) and _depends_on_matmul(a):
            name = a.target if isinstance(a.target, str) else getattr(a.target, "__name__", str(a.target))
            return Rejection(Reject.SCORE_OP_UNSUPPORTED, f"{a.name} ({name})")
    return Rejection(Reject.NO_QK_MATMUL, node.name)


def _depends_on_matmul(node: fx.Node, depth: int = 8) -> bool:
    frontier, seen = [node], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if _call(n, torch.matmul) or _call(n, torch.einsum) or _call(n, torch.baddbmm):
                return True
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return False


def _match_scores(x: fx.Node) -> _Scores:
    """Parse the softmax input down to the QK matmul. Every node on the way must have one user."""
    chain: list[tuple[str, Any]] = []  # outermost first
    region: list[fx.Node] = []
    cur = x
    while True:
        if len(cur.users) != 1:
            raise Rejection(Reject.SCORES_ESCAPE, cur.name)
        region.append(cur)
        if _call(cur, torch.matmul) or _call(cur, torch.einsum):
            break
        if _call(cur, torch.baddbmm):  # beta * input + alpha * (q @ kT): BLOOM's ALiBi scores
            bias, beta, alpha = cur.args[0], cur.kwargs.get("beta", 1), cur.kwargs.get("alpha", 1)
            if not (_is_number(beta) and _is_number(alpha)):
                raise Rejection(Reject.SCALE_NOT_SCALAR, f"{cur.name}: baddbmm with beta={beta}, alpha={alpha}")
            if beta != 0 and isinstance(bias, fx.Node) and _is_tensor(bias):
                chain.append(("term", Term(bias, float(beta), at=tuple(_val(cur).shape))))
            chain.append(("mul", float(alpha)))
            break
        if _is_cast(cur) or _is_identity_view(cur) or is_batch_reshape(cur):
            cur = cur.args[0]
            continue
        if _call(cur, torch.mul) or _call(cur, torch.div):
            a, b = cur.args
            if _call(cur, torch.div):
                side = (a, b) if isinstance(a, fx.Node) and _reaches_qk(a) else None
            else:
                side = _scores_side(a, b)
            if side is None:
                raise _no_qk(cur)
            s, other = side
            if _is_tensor_scalar(other):
                # Note [0-dim runtime scales]: folded into q where nothing was added or filled after it
                chain.append(("div" if _call(cur, torch.div) else "mul", other))
                cur = s
                continue
            if not _is_scalar(other):
                raise Rejection(Reject.SCALE_NOT_SCALAR, f"{cur.name} multiplies by a tensor")
            chain.append(("div" if _call(cur, torch.div) else "mul", _fold(other)))
            cur = s
            continue
        if _call(cur, torch.add) or _call(cur, torch.sub):
            a, b = cur.args
            side = _scores_side(a, b)
            if side is None:
                raise _no_qk(cur)
            s, other = side
            if _call(cur, torch.sub) and s is b:
                raise Rejection(Reject.SCORE_OP_UNSUPPORTED, f"{cur.name} negates the scores")
            if isinstance(other, fx.Node) and _is_tensor(other):
                chain.append(("term", Term(other, 1.0, negate=_call(cur, torch.sub), at=tuple(_val(cur).shape))))
            # a scalar shift cancels in softmax: exact, nothing to record
            cur = s
            continue
        if _call(cur, torch.masked_fill):
            s, mask, value = cur.args
            if not _is_scalar(value):
                raise Rejection(Reject.MASK_FILL_VALUE, f"{cur.name} fills with a tensor")
            chain.append(("fill", Fill(mask, _scalar_hint(value), mask_is_keep=False, at=tuple(_val(cur).shape))))
            cur = s
            continue
        if _call(cur, torch.where) and len(cur.args) == 3:
            c, a, b = cur.args
            if isinstance(a, fx.Node) and _is_tensor(a) and _reaches_qk(a) and _is_scalar(b):
                chain.append(("fill", Fill(c, _scalar_hint(b), mask_is_keep=True, at=tuple(_val(cur).shape))))
                cur = a
                continue
            if isinstance(b, fx.Node) and _is_tensor(b) and _reaches_qk(b) and _is_scalar(a):
                chain.append(("fill", Fill(c, _scalar_hint(a), mask_is_keep=False, at=tuple(_val(cur).shape))))
                cur = b
                continue
            raise Rejection(Reject.SCORE_OP_UNSUPPORTED, f"{cur.name}: where() with a tensor on both sides")
        if _is_tanh(cur):
            cur = _match_softcap(cur, chain, region)
            continue
        name = cur.target if isinstance(cur.target, str) else getattr(cur.target, "__name__", str(cur.target))
        if _may_mutate(cur):  # normalize left it in place: a view or another reader shares the scores
            raise Rejection(Reject.CHANGED_IN_PLACE, f"{cur.name} ({name}) changes the scores in place while "
                            "another view of them is read (Note [In-place arithmetic on a fresh tensor])")
        raise Rejection(Reject.SCORE_OP_UNSUPPORTED, f"{cur.name} ({name})")

    # Fold innermost first: a later multiply scales the terms and fill values recorded before it.
    factors: list[tuple[Any, bool]] = []
    terms: list[Term] = []
    fills: list[Fill] = []
    softcap = None
    for kind, item in reversed(chain):
        if kind == "softcap":  # Note [Soft-capped scores]
            if terms or fills:
                raise Rejection(Reject.SCORE_OP_UNSUPPORTED, "a mask added inside the tanh soft-capping")
            softcap = item
            continue
        if kind in ("mul", "div") and softcap is not None:
            raise Rejection(Reject.SCORE_OP_UNSUPPORTED, "a scale applied after the tanh soft-capping")
        if kind in ("mul", "div"):
            factors.append((item, kind == "div"))
            if _is_tensor_scalar(item):  # Note [0-dim runtime scales]
                if terms or fills:
                    raise Rejection(Reject.SCALE_NOT_SCALAR, f"{item.name}: a tensor scale applied after a mask")
                continue
            if isinstance(item, fx.Node):
                f = _scalar_hint(item)
            else:
                f = float(item)
            f = 1.0 / f if kind == "div" else f
            for t in terms:
                t.factor *= f
            for fl in fills:
                fl.value *= f
        elif kind == "term":
            terms.append(item)
        else:
            fills.append(item)
    for fl in fills:
        if not (fl.value == float("-inf") or fl.value <= LARGE_NEGATIVE):
            raise Rejection(Reject.MASK_FILL_VALUE, f"fill value {fl.value}")
    finite = {fl.value for fl in fills if fl.value != float("-inf")}
    if len(finite) > 1 or (finite and len(finite) != len({fl.value for fl in fills})):
        raise Rejection(Reject.MASK_FILL_VALUE, "masks fill different values")
    return _Scores(cur, factors, terms, fills, region, softcap)


# ---------------------------------------------------------------------------------------------------
# operands


def _peel_scalars(node: Any, factors: list[tuple[Any, bool]]) -> Any:
    """Strip scalar mul/div (and transposes are NOT stripped here) from an operand."""
    while isinstance(node, fx.Node) and (_call(node, torch.mul) or _call(node, torch.div)):
        a, b = node.args
        if _call(node, torch.mul) and (_is_scalar(a) or _is_tensor_scalar(a)) and isinstance(b, fx.Node):
            a, b = b, a
        if not (isinstance(a, fx.Node) and (_is_scalar(b) or _is_tensor_scalar(b))) or _val(a).dim() == 0:
            break
        factors.append((_fold(b), _call(node, torch.div)))
        node = a
    return node


def _is_last_two_swap(node: Any) -> bool:
    """x.transpose(-2, -1), or x.permute(0, .., n-1, n-2) (the same view): Kᵀ as attention code writes it."""
    is_method = isinstance(node, fx.Node) and node.op == "call_method" and node.target == "permute"
    if _call(node, torch.permute) or is_method:
        dims = node.kwargs.get("dims", node.args[1:])
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        n = _val(node).dim()
        if len(dims) != n or not all(isinstance(d, int) for d in dims) or n < 2:
            return False
        return [d % n for d in dims] == [*range(n - 2), n - 1, n - 2]
    if not _call(node, torch.transpose):
        return False
    n = _val(node).dim()
    return sorted((node.args[1] % n, node.args[2] % n)) == [n - 2, n - 1]


def _key_operand(kt: fx.Node, factors: list[tuple[Any, bool]]) -> Operand:
    """Kᵀ given as `kt`: return K, cancelling a transpose of the last two dims where there is one."""
    node = _peel_scalars(kt, factors)
    if _is_last_two_swap(node):
        base = _peel_scalars(node.args[0], factors)
        return Operand(base)
    return Operand(node, [(torch.transpose, (-2, -1))])


def _parse_einsum(eq: str, ndims: Sequence[int]) -> tuple[list[str], str] | None:
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != len(ndims):
        return None
    letters = [c for c in "ZYXWVUTSRPONM" if c not in eq]
    res = []
    for spec, nd in zip(ins, ndims):
        if "..." in spec:
            n_ell = nd - (len(spec) - 3)
            spec = spec.replace("...", "".join(letters[:n_ell]))
        res.append(spec)
    if "..." in out:
        n_ell = max(nd - (len(s) - 3) for s, nd in zip(lhs.split(","), ndims) if "..." in s)
        out = out.replace("...", "".join(letters[:n_ell]))
    for spec in res + [out]:
        if len(set(spec)) != len(spec):
            return None
    return res, out


def _qk_operands(qk: fx.Node, factors: list[tuple[Any, bool]]) -> tuple[Operand, Operand, list[str] | None]:
    """Q and K (each (..., L, E) / (..., S, E)) of the scores node; labels of the scores for einsum."""
    if _call(qk, torch.matmul) or _call(qk, torch.baddbmm):
        a, b = qk.args[-2:]
        if _val(a).dim() != _val(b).dim():
            raise Rejection(Reject.UNSUPPORTED_RANK, "query and key ranks differ")
        q = Operand(_peel_scalars(a, factors))
        return q, _key_operand(b, factors), None
    eq, *ops = qk.args
    if len(ops) != 2:
        raise Rejection(Reject.EINSUM_UNSUPPORTED, eq)
    parsed = _parse_einsum(eq, [_val(o).dim() for o in ops])
    if parsed is None:
        raise Rejection(Reject.EINSUM_UNSUPPORTED, eq)
    (la, lb), lo = parsed
    contracted = [c for c in la if c in lb and c not in lo]
    if len(contracted) != 1 or len(lo) < 2:
        raise Rejection(Reject.EINSUM_UNSUPPORTED, eq)
    (e,) = contracted
    ql, kl, batch = lo[-2], lo[-1], lo[:-2]
    if ql in lb and ql not in la and kl in la:  # K written first ("bhsd,bhld->bhls"): the same contraction
        (la, lb), ops = (lb, la), [ops[1], ops[0]]
    if ql not in la or ql in lb or kl not in lb or kl in la or any(c not in la or c not in lb for c in batch):
        raise Rejection(Reject.EINSUM_UNSUPPORTED, eq)
    if set(la) != set(batch + ql + e) or set(lb) != set(batch + kl + e):
        raise Rejection(Reject.EINSUM_UNSUPPORTED, eq)
    q = _permuted(Operand(_peel_scalars(ops[0], factors)), [la.index(c) for c in batch + ql + e])
    k = _permuted(Operand(_peel_scalars(ops[1], factors)), [lb.index(c) for c in batch + kl + e])
    return q, k, list(lo)


def _permuted(op: Operand, perm: list[int]) -> Operand:
    if perm == list(range(len(perm))):
        return op
    return op.then(torch.permute, tuple(perm))


def _value_operand(out: fx.Node, probs: fx.Node, score_labels: list[str] | None) -> tuple[Operand, tuple[int, ...] | None]:
    if _call(out, torch.matmul):
        return Operand(out.args[1]), None
    eq, *ops = out.args
    if len(ops) != 2:
        raise Rejection(Reject.EINSUM_UNSUPPORTED, eq)
    parsed = _parse_einsum(eq, [_val(o).dim() for o in ops])
    if parsed is None:
        raise Rejection(Reject.EINSUM_UNSUPPORTED, eq)
    specs, lo = parsed
    pi = 0 if ops[0] is probs else 1
    lp, lv = specs[pi], specs[1 - pi]
    n = len(lp)
    batch, ql, kl = lp[:-2], lp[-2], lp[-1]
    e = [c for c in lv if c not in lp]
    if len(e) != 1 or kl not in lv or kl in lo or set(lv) != set(batch + kl + e[0]) or set(lo) != set(batch + ql + e[0]):
        raise Rejection(Reject.EINSUM_UNSUPPORTED, eq)
    if score_labels is not None and len(score_labels) != n:
        raise Rejection(Reject.EINSUM_UNSUPPORTED, eq)
    v = _permuted(Operand(ops[1 - pi]), [lv.index(c) for c in batch + kl + e[0]])
    natural = batch + ql + e[0]
    perm = tuple(natural.index(c) for c in lo)
    return v, (None if perm == tuple(range(len(perm))) else perm)


def _repeat_source(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(k, n_rep) if `node` is k with heads repeated n_rep times in repeat_interleave order (HF repeat_kv)."""
    val = _val(node)
    if val.dim() != 4:
        return None
    if _call(node, torch.repeat_interleave) or (node.op == "call_method" and node.target == "repeat_interleave"):
        src, reps = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
        if isinstance(reps, int) and dim is not None and dim % 4 == 1 and isinstance(src, fx.Node):
            return src, reps
        return None
    if node.op == "call_method" and node.target == "reshape" or _call(node, torch.reshape):
        ex = node.args[0]
        if not (isinstance(ex, fx.Node) and ex.op == "call_method" and ex.target == "expand"):
            return None
        un = ex.args[0]
        src = None
        if isinstance(un, fx.Node) and un.op == "call_method" and un.target == "unsqueeze" and un.args[1] == 2:
            src = un.args[0]
        elif _call(un, operator.getitem) and isinstance(un.args[1], tuple):
            idx = un.args[1]
            if len(idx) >= 3 and idx[2] is None and all(i == slice(None) for i in idx[:2]) and all(i == slice(None) for i in idx[3:]):
                src = un.args[0]
        if src is None or _val(src).dim() != 4:
            return None
        ev = _val(ex)
        sv = _val(src)
        if ev.dim() != 5 or ev.shape[1] != sv.shape[1] or ev.shape[3:] != sv.shape[2:] or ev.shape[0] != sv.shape[0]:
            return None
        n_rep = ev.shape[2]
        if not isinstance(n_rep, int) or tuple(val.shape) != (sv.shape[0], sv.shape[1] * n_rep, *sv.shape[2:]):
            return None
        return src, n_rep
    return None


# ---------------------------------------------------------------------------------------------------
# masks


# Note [Buffers as constants]
# nanoGPT and GPT-2 keep a causal tril in a module buffer and slice it (`bias[:, :, :T, :T]`). Dynamo
# lifts the buffer into a graph input and guards on its shape, not its values. With trust_buffers (the
# default) we read the buffer once at compile time and, if the sliced mask is exactly causal, emit
# is_causal=True: a later in-place edit of that buffer would then not be seen. That is the trade every
# user of such a model wants (flash attention instead of a materialised mask), and it can be turned off.
# Parameters are never read so, nor any tensor that requires grad: Swin and BEiT initialise their learned
# relative-position biases to zero, which read at compile time is "no mask" and would never train (and an
# optimizer step or load_state_dict changes a parameter without a recompile).

# Note [Fully masked rows]
# A query row whose keys are all masked gives: NaN in eager with a -inf fill or an all -inf additive
# mask; a uniform average of V with a finite fill (masked_fill(m, finfo.min)); and about the same with an
# additive finfo.min mask. SDPA gives zeros for -inf (safe softmax, PyTorch >= 2.5) and a uniform average
# for an additive finfo.min. We keep the original's result: after SDPA, rows that were fully masked by a
# fill get NaN (-inf fills) or the mean of V (finite fills), and rows all -inf in an additive mask get NaN.
# A causal mask proven at compile time has no such rows and needs no fix-up.


def _ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    """The mask nodes and every node they are computed from."""
    from asam_compile.passes.lift import ancestors

    return ancestors(*nodes)


def _constant_inputs_ok(anc: set[fx.Node], config: Any) -> bool:
    for n in anc:
        if n.op == "placeholder":
            val = _val(n)
            if isinstance(val, torch.Tensor):
                # Note [Buffers as constants]: buffers only; a parameter or anything that requires grad is a
                # run-time tensor, whatever its value at compile time (a zero-initialised learned bias).
                if config.trust_buffers and _compat.is_buffer(n) and not val.requires_grad:
                    continue
                # a user tensor is fine only if nothing but its size is read
                if all(u.op == "call_method" and u.target in ("size", "dim") or _call(u, getattr) and u.args[1] in ("shape", "device", "dtype") for u in n.users):
                    continue
                return False
            elif not isinstance(val, torch.SymInt):
                return False
        elif n.op == "get_attr":
            continue
        elif n.op in ("call_function", "call_method"):
            if getattr(n.target, "_nondeterministic_seeded", False) or n.target in (torch.rand, torch.randn, torch.rand_like, torch.randint, F.dropout):
                return False
    return True


# Note [Flex under dynamic shapes]
# A graph compiled with symbolic lengths cannot carry a block mask made for one length: a shape-only mask
# that can be lifted (lift() supports symbolic sizes) gets its block mask built in the graph on every call,
# for the call's sizes, by the in-graph build of runtime masks (Note [Runtime masks as in-graph block
# masks]); the sizes reach it as size nodes of q and k. The kernel choice is made once, at the example's
# sizes. One trap (torch 2.13): FlexAttention traces mask_mod with a nested Dynamo, which under
# torch.compile(dynamic=True) turned our closures' int and float constants into graph inputs, and
# Inductor's FakeTensorUpdater then asserted ("A subgraph argument other than striding has been modified");
# the Flex call therefore runs that trace with ints and floats specialised (_compat.static_closures).
# Masks that read runtime inputs stay dense SDPA masks under dynamic shapes (their captures have symbolic
# shapes, which the lifter does not take).

# Note [Masks under dynamic shapes]
# A mask that depends only on shapes is evaluated at compile time and compared with the causal pattern.
# With static shapes that evaluation is a proof: Dynamo guards on every size. Under dynamic shapes the
# graph serves many lengths, so the mask is evaluated for several assignments of the size symbols (the
# example's, and smaller ones down to 2) and called causal only if every evaluation is causal. This is
# evidence, not a proof: a mask that is causal at all those lengths but not at some larger one would be
# misread. Masks written from index comparisons (HF, tril/triu, slices of a tril buffer) have no such
# thresholds. A dense mask under dynamic shapes gets the run-time fully-masked-row fix-up.


def _size_samples(anc: set[fx.Node]) -> list[dict[Any, int]]:
    """Assignments {sympy symbol: value} to evaluate a shape-only mask at; [{}] for static shapes."""
    symbols: dict[Any, int] = {}
    for n in anc:
        val = _val(n) if n.op == "placeholder" else None
        sizes = [val] if isinstance(val, torch.SymInt) else list(val.shape) if isinstance(val, torch.Tensor) else []
        for d in sizes:
            if not isinstance(d, torch.SymInt):
                continue
            for sym in _compat.sym_expr(d).free_symbols:
                hint = _compat.symbol_hint(_compat.sym_shape_env(d), sym)
                if hint is None:
                    return []
                symbols[sym] = int(hint)
    if not symbols:
        return [{}]
    samples = []
    for i in range(6):
        sample = {}
        for j, (sym, hint) in enumerate(symbols.items()):
            choices = [hint, 2, 3, max(2, hint - 1), max(2, hint // 2), 5]
            sample[sym] = choices[(i + j) % len(choices)] if i else hint
        samples.append(sample)
    return samples


def _concrete(shape: Sequence[Any], subs: dict[Any, int]) -> tuple[int, ...]:
    out = []
    for d in shape:
        if isinstance(d, torch.SymInt):
            expr = sympy.sympify(_compat.sym_expr(d).xreplace(subs))
            if expr.free_symbols:  # symbols the mask does not depend on keep their example value
                expr = expr.xreplace({s: _compat.symbol_hint(_compat.sym_shape_env(d), s) for s in expr.free_symbols})
            out.append(int(expr))
        else:
            out.append(int(d))
    return tuple(out)


def _evaluate(nodes: list[fx.Node], anc: set[fx.Node], gm: fx.GraphModule, example_inputs: Sequence[Any], subs: dict[Any, int]) -> list[Any]:
    """Run the ancestor subgraph of `nodes` on the example inputs, sizes replaced by `subs`."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    env: dict[fx.Node, Any] = {}
    for n, x in zip(placeholders, example_inputs):
        if n not in anc:
            continue
        val = _val(n)
        if isinstance(val, torch.SymInt):
            env[n] = _concrete([val], subs)[0] if subs else int(x)
        elif subs and isinstance(x, torch.Tensor) and not _compat.is_param_or_buffer(n):
            env[n] = torch.empty(_concrete(val.shape, subs), dtype=x.dtype, device=x.device)
        else:
            env[n] = x
    interp = fx.Interpreter(gm)
    for n in gm.graph.nodes:
        if n not in anc or n.op == "placeholder":
            continue
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        env[n] = getattr(interp, n.op)(n.target, args, kwargs)
    return [env[n] for n in nodes]


def _classify_mask(
    scores: _Scores, term_vals: list[torch.Tensor], fill_vals: list[torch.Tensor], shape: Sequence[int],
    chunk_elems: int = 1 << 24, device: torch.device | None = None,
) -> tuple[str, bool, bool]:
    """(kind, fully, exclusion_only) of a known mask: kind is "none" | "causal" | "dense"; fully says
    whether some query row has every key masked; exclusion_only whether the mask only removes keys
    (additive values are 0 on every kept position), so that a boolean keep-mask says all of it.

    Works on the mask's own device in row chunks of about `chunk_elems` elements, so that a long sequence
    costs no float64 copy of an L x S mask (an 8k HF mask is evaluated once per graph, see run()).
    """
    tensors = [t for t in term_vals + fill_vals if isinstance(t, torch.Tensor)]
    dev = device if device is not None else tensors[0].device if tensors else torch.device("cpu")
    L, S = shape[-2], shape[-1]
    lead = math.prod(shape[:-2])
    rows = max(1, chunk_elems // max(1, S * lead))

    lead4 = (1,) * (2 - len(shape[:-2])) + tuple(shape[:-2]) if len(shape) <= 4 else None

    def rows_of(t: Any, i: int, j: int) -> Any:
        if hasattr(t, "fn"):  # a lifted index function (passes/lift.py): evaluate just these rows
            b = torch.arange(lead4[0], device=dev)[:, None, None, None]
            h = torch.arange(lead4[1], device=dev)[None, :, None, None]
            q = torch.arange(i, j, device=dev)[None, None, :, None]
            kv = torch.arange(S, device=dev)[None, None, None, :]
            v = torch.as_tensor(t.fn(b, h, q, kv), device=dev)
            return v.broadcast_to((*lead4, j - i, S)).reshape(*shape[:-2], j - i, S)
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-2] == L:
            return t[..., i:j, :]
        return t

    all_keep, causal, zero_on_keep, fully_masked = True, True, True, False
    for i in range(0, L, rows):
        j = min(L, i + rows)
        chunk = (*shape[:-2], j - i, S)
        add = torch.zeros(chunk, dtype=torch.float32, device=dev)
        for t, v in zip(scores.terms, term_vals):
            v = rows_of(v, i, j).to(dev, torch.float32) * t.factor
            add = add - v if t.negate else add + v
        keep = add > LARGE_NEGATIVE
        for fl, m in zip(scores.fills, fill_vals):
            m = rows_of(m, i, j).to(dev).bool()
            keep = keep & (m if fl.mask_is_keep else ~m)
        zero_on_keep = zero_on_keep and bool(torch.where(keep, add, 0.0).eq(0).all())
        all_keep = all_keep and bool(keep.all())
        fully_masked = fully_masked or bool((~keep).all(-1).any())
        if causal:
            q = torch.arange(i, j, device=dev)[:, None]
            kv = torch.arange(S, device=dev)[None, :]
            causal = torch.equal(keep, (kv <= q).expand_as(keep))
    if not zero_on_keep:
        return "dense", fully_masked, False
    if all_keep:
        return "none", False, True
    return ("causal" if causal else "dense"), fully_masked, True


# ---------------------------------------------------------------------------------------------------


def match_attention(
    softmax: fx.Node, gm: fx.GraphModule, example_inputs: Sequence[Any], config: Any,
    mask_cache: dict[Any, Any] | None = None,
) -> AttentionMatch:
    """Grow a candidate outward from one softmax node. Never mutates the graph. Raises Rejection."""
    if softmax.target is torch.log_softmax:
        raise Rejection(Reject.LOG_SOFTMAX)
    x, dim = softmax.args[:2]
    xv = _val(x)
    if dim % xv.dim() != xv.dim() - 1:
        raise Rejection(Reject.SOFTMAX_NOT_LAST_DIM, f"dim={dim} of a {xv.dim()}-D tensor")
    out, dropout_p, probs_region, probs = _match_probs(softmax)
    scores = _match_scores(x)
    q_factors: list[tuple[Any, bool]] = []
    q, k, labels = _qk_operands(scores.qk, q_factors)
    v, out_perm = _value_operand(out, probs, labels)
    # Note [Views of the scores]: the layout with the most leading dims among the scores' and probabilities'
    layouts = [scores.qk, *reversed(scores.region), softmax, *probs_region]
    canon = max(layouts, key=lambda n: _val(n).dim() if isinstance(_val(n), torch.Tensor) else -1)
    out_shape = None
    if any(is_batch_reshape(n) for n in layouts):
        q, k, v, out_shape = _into_layout(canon, q, k, v, out, scores, labels)

    # scale: python numbers fold into SDPA's scale; symbolic ones are multiplied into q
    scale, sym = 1.0, []
    for f, is_div in q_factors + scores.factors:
        if isinstance(f, fx.Node):
            if not _is_tensor_scalar(f) and _scalar_hint(f) <= 0:
                raise Rejection(Reject.SCALE_NOT_POSITIVE, f.name)
            sym.append((f, is_div))
        else:
            scale = scale / f if is_div else scale * f
    if not scale > 0 or math.isinf(scale):
        raise Rejection(Reject.SCALE_NOT_POSITIVE, f"scale={scale}")

    # shapes
    qv, sv = _val(canon), _val(out)
    rank = qv.dim()
    if rank not in (2, 3, 4):
        raise Rejection(Reject.UNSUPPORTED_RANK, f"{rank}-D scores")
    L, S = qv.shape[-2], qv.shape[-1]
    if any(isinstance(d, int) and d == 0 for d in (L, S, sv.shape[-1])):
        raise Rejection(Reject.EMPTY)

    # mask
    mask_nodes = [t.node for t in scores.terms] + [fl.mask for fl in scores.fills]
    stepped = [t.steps for t in scores.terms] + [fl.steps for fl in scores.fills]
    for m, steps in zip(mask_nodes, stepped):
        mv = _val(m)
        for target, args in steps:
            mv = target(mv, *args)
        try:
            shape = torch.broadcast_shapes(tuple(mv.shape), tuple(qv.shape))
        except RuntimeError:
            raise Rejection(Reject.MASK_NOT_BROADCASTABLE, m.name)
        if tuple(shape) != tuple(qv.shape):
            raise Rejection(Reject.MASK_NOT_BROADCASTABLE, f"{m.name} {tuple(mv.shape)} vs scores {tuple(qv.shape)}")
    mask_kind, fixup, flex_plan = "none", None, None
    if mask_nodes:
        anc = _ancestors(mask_nodes)
        samples = _size_samples(anc) if _constant_inputs_ok(anc, config) else []
        kinds: set[str] = set()
        flex_ok = bool(samples)  # no query row is left without keys, at every sample
        biased = False  # some additive values on kept positions are not 0: a score_mod carries them
        for subs in samples:
            key = (tuple(mask_nodes), tuple((t.factor, t.negate) for t in scores.terms),
                   tuple((fl.value, fl.mask_is_keep) for fl in scores.fills), tuple(sorted(map(str, subs.items()))))
            if mask_cache is not None and key in mask_cache:
                kind, fully, exclusion_only = mask_cache[key]
            else:
                try:
                    # Static shapes: classify from the lifted index functions, row chunk by row chunk, so no
                    # L x S mask is made at compile time. Otherwise (or if the mask cannot be lifted) run
                    # the mask subgraph itself once.
                    lift_ok = subs == {} and rank == 4 and not any(stepped)
                    vals = _lift_cached(mask_nodes, gm, example_inputs, mask_cache) if lift_ok else None
                    if not isinstance(vals, list):
                        vals = _evaluate(mask_nodes, anc, gm, example_inputs, subs)
                        vals = [_apply_steps(val, steps) for val, steps in zip(vals, stepped)]
                    kind, fully, exclusion_only = _classify_mask(
                        scores, vals[: len(scores.terms)], vals[len(scores.terms):], _concrete(qv.shape, subs), device=sv.device)
                    del vals
                except Exception as e:  # noqa: BLE001 - a mask we cannot evaluate stays dense
                    log.debug("mask of %s not evaluated at %s: %s", softmax.name, subs, e, exc_info=True)
                    # nothing is known about its rows: no Flex, and the run-time fully-masked-row fix-up
                    kinds, flex_ok, fixup = {"dense"}, False, _runtime_fixup(scores)
                    break
                if mask_cache is not None:
                    mask_cache[key] = (kind, fully, exclusion_only)
            kinds.add(kind)
            flex_ok = flex_ok and not fully
            biased = biased or not exclusion_only
            if kind == "dense" and subs == {} and fully:
                fixup = "nan" if any(fl.value == float("-inf") for fl in scores.fills) or not scores.fills else "mean"
        if any(stepped):
            flex_ok = False  # Note [Views of the scores]: the lifter sees masks in the canonical layout only
        if "dense" in kinds and kinds <= {"dense", "causal", "none"} and flex_ok:  # causal at short lengths: fine
            flex_plan = _guarded_plan(softmax, config, dropout_p, qv, _plan_flex, softmax, scores, mask_nodes, gm,
                                      example_inputs, config, qv, sv, mask_cache, biased)
        if len(kinds) == 1:
            mask_kind = kinds.pop()
            if mask_kind == "dense" and samples != [{}]:
                fixup = _runtime_fixup(scores)
        else:
            mask_kind, fixup = "dense", _runtime_fixup(scores)
        if not samples and mask_kind == "dense" and not any(stepped):
            # Note [Runtime masks as in-graph block masks]
            flex_plan = _guarded_plan(softmax, config, dropout_p, qv, _plan_runtime_flex, softmax, scores,
                                      mask_nodes, gm, example_inputs, config, qv, sv)

    if mask_kind == "dense" and isinstance(flex_plan, FlexPlan) and flex_plan.kernel == "flex":
        mask_kind, fixup = "flex", _flex_fixup(flex_plan, fixup)
    if scores.softcap is not None:
        mask_kind, flex_plan, fixup = _softcap_plan(softmax, scores, mask_kind, flex_plan, fixup, any(stepped),
                                                    dropout_p, gm, config, qv, sv)

    # shapes after our layout glue: batch dims must agree (SDPA does not broadcast them like matmul does)
    qs, ks, vs = (_shape_after(o) for o in (q, k, v))
    if qs is None or ks is None or vs is None:
        raise Rejection(Reject.SHAPE_MISMATCH, "operand shapes unknown")
    if not (qs[:-2] == ks[:-2] == vs[:-2] and qs[-1] == ks[-1] and ks[-2] == vs[-2]):
        raise Rejection(Reject.SHAPE_MISMATCH, f"q {tuple(qs)}, k {tuple(ks)}, v {tuple(vs)}")
    if mask_kind == "flex" and qs[-1] != vs[-1]:
        mask_kind, flex_plan = "dense", f"Flex needs equal query and value head sizes ({qs[-1]} vs {vs[-1]})"

    v_full = v
    k, v, enable_gqa = _gqa_operands(k, v, mask_kind, rank, config)

    # Note [Tensors changed in place inside the pattern]
    sources = [q.node, k.node, v.node, v_full.node, *mask_nodes, *(f for f, _ in sym)]
    if isinstance(flex_plan, FlexPlan):
        sources += list(flex_plan.capture_nodes)
    mutated = _mutated_inside(sources, out, gm, mask_cache)
    if mutated is not None:
        raise Rejection(Reject.CHANGED_IN_PLACE, f"{mutated.name} changes a tensor in place between the scores and "
                        "the value matmul: one SDPA call there would read the changed value")

    # dtypes: SDPA runs in the dtype the original matmuls ran in (the autocast dtype under autocast)
    out_dtype = sv.dtype
    compute_dtype = torch.promote_types(qv.dtype, sv.dtype)
    if not compute_dtype.is_floating_point:
        raise Rejection(Reject.DTYPE, str(compute_dtype))

    return AttentionMatch(
        softmax=softmax, out=out, q=q, k=k, v=v, v_full=v_full, scale=scale, sym_factors=sym,
        terms=scores.terms, fills=scores.fills, mask_kind=mask_kind, fixup=fixup, dropout_p=dropout_p,
        enable_gqa=enable_gqa, compute_dtype=compute_dtype, out_dtype=out_dtype, rank=rank,
        out_perm=out_perm, region=[out, *probs_region, softmax, *scores.region], flex_plan=flex_plan,
        safe_softmax=softmax.target in SAFE_SOFTMAXES, out_shape=out_shape, softcap=scores.softcap,
    )


def _softcap_plan(
    softmax: fx.Node, scores: _Scores, mask_kind: str, flex_plan: "FlexPlan | str | None", fixup: str | None,
    stepped: bool, dropout_p: float, gm: fx.GraphModule, config: Any, qv: Any, sv: Any,
) -> tuple[str, "FlexPlan", str | None]:
    """Note [Soft-capped scores]: the site's Flex plan (its mask's, or a full / causal block mask), whose
    score_mod carries the soft-capping; raises a Rejection that names the tanh where Flex cannot run."""
    from asam_compile import cost
    from asam_compile.block_mask import build_block_mask

    def refuse(why: str) -> Rejection:
        return Rejection(Reject.SOFTCAP_NEEDS_FLEX, f"tanh soft-capping (c={scores.softcap}): {why}")

    if dropout_p:
        raise refuse("Flex has no attention dropout")
    if qv.dim() == 2:
        raise refuse("Flex is used for 3-D and 4-D attention only")
    if stepped:
        raise refuse("the mask is added in another layout of the scores")
    E = sv.shape[-1]
    kernel, why = cost.choose_kernel(B=1, H=1, L=1, S=1, E=E if isinstance(E, int) else 16, density=1.0,
                                     device_type=sv.device.type, requires_grad=bool(_val(softmax).requires_grad),
                                     policy="never" if config.flex == "never" else "always")
    if kernel != "flex":
        raise refuse(why)
    if mask_kind == "flex":
        return mask_kind, flex_plan, fixup
    if mask_kind == "dense":
        if not isinstance(flex_plan, FlexPlan):
            raise refuse(flex_plan or "the mask cannot be made a Flex block mask")
        plan = dataclasses.replace(flex_plan, kernel="flex", reason=f"soft-capping as a score_mod; {flex_plan.reason}")
        return "flex", plan, _flex_fixup(plan, fixup)
    q4 = _as_4d(qv)
    if any(not isinstance(d, int) for d in (*q4.shape, *sv.shape)):
        raise refuse("dynamic shapes (a full or causal block mask is built for static shapes only)")
    B, H, L, S = q4.shape
    causal = mask_kind == "causal"

    def keep_fn(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return kv <= q if causal else (q >= 0) & (kv >= 0)

    name = "causal" if causal else "full"
    keep_fn.__name__ = name
    mask_key = f"softcap_{name}_{abs(hash((id(gm), softmax.name))) % 10**8}"
    block_mask, density = build_block_mask(keep_fn, 1, 1, L, S, sv.device, block_size=config.block_size,
                                           key=(f"softcap_{name}", L, S, config.block_size, str(sv.device)))
    _, score_key, _ = _register(mask_key, keep_fn, scores, [], False, in_graph=False)
    tensors = (block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    plan = FlexPlan("flex", f"soft-capping as a score_mod over a {name} block mask", name, mask_key, density,
                    config.block_size, (L, S), tensors, score_key, (), (1, 1))
    return "flex", plan, None


def _apply_steps(val: Any, steps: list[tuple[Any, tuple]]) -> Any:
    for target, args in steps:
        val = target(val, *args)
    return val


def _into_layout(
    canon: fx.Node, q: Operand, k: Operand, v: Operand, out: fx.Node, scores: _Scores, labels: list[str] | None
) -> tuple[Operand, Operand, Operand, tuple[int, ...] | None]:
    """Note [Views of the scores]: q, k, v and the mask terms reshaped into `canon`'s layout; the shape the
    output is reshaped back to (None where it is already that layout)."""
    if labels is not None or not _call(out, torch.matmul):
        raise Rejection(Reject.EINSUM_UNSUPPORTED, "an einsum with views of the scores between the matmuls")
    lead = tuple(_val(canon).shape[:-2])
    n = math.prod(lead)

    def to_lead(op: Operand, what: str) -> Operand:
        shape = _shape_after(op)
        if shape is None or any(not isinstance(d, int) for d in shape) or math.prod(shape[:-2]) != n:
            raise Rejection(Reject.SHAPE_MISMATCH, f"{what} {shape} does not regroup into the scores' leading dims {lead}")
        return op if tuple(shape[:-2]) == lead else op.then(torch.reshape, (*lead, *shape[-2:]))

    for item in [*scores.terms, *scores.fills]:
        at = item.at
        node = item.node if isinstance(item, Term) else item.mask
        mv = _val(node)
        if at is None or tuple(at[:-2]) == lead:
            continue
        if not isinstance(mv, torch.Tensor) or mv.dim() > len(at) or math.prod(at[:-2]) != n:
            raise Rejection(Reject.MASK_NOT_BROADCASTABLE, f"{node.name} is applied to the scores in layout {at}")
        padded = (1,) * (len(at) - mv.dim()) + tuple(mv.shape)
        last2 = padded[-2:]
        item.steps = [(torch.reshape, (padded,)), (torch.Tensor.expand, ((*at[:-2], *last2),)),
                      (torch.reshape, ((*lead, *last2),))]
    ov = _val(out)
    return to_lead(q, "query"), to_lead(k, "key"), to_lead(v, "value"), (
        None if tuple(ov.shape[:-2]) == lead else tuple(ov.shape))


def _flex_fixup(plan: FlexPlan, fixup: str | None) -> str | None:
    """The fully-masked-row fix-up a dense-mask site keeps when its mask becomes this Flex plan: a run-time
    mask may leave rows without keys on some call, so they keep it; a compile-time one was checked to leave
    none (Note [Fully masked rows])."""
    return fixup if plan.in_graph else None


def _gqa_operands(k: Operand, v: Operand, mask_kind: str, rank: int, config: Any) -> tuple[Operand, Operand, bool]:
    """GQA: K/V before their heads were repeated, and enable_gqa, where the kernel takes them; else k, v, False."""
    if config.use_gqa and mask_kind in ("none", "causal", "flex") and rank == 4 and not k.steps and not v.steps:
        rk, rv = _repeat_source(k.node), _repeat_source(v.node)
        if rk and rv and rk[1] == rv[1] and rk[1] > 1 and _val(rk[0]).shape[1] == _val(rv[0]).shape[1]:
            return Operand(rk[0]), Operand(rv[0]), True
    return k, v, False


# Note [Tensors changed in place inside the pattern]
# The original reads q, k and the mask where it computes the scores, and v at the value matmul; the one SDPA
# call that replaces it reads all of them at the value matmul. An op that changes one of them in place in
# between (`k.mul_(2)`, `k[:, :, 0] = 0`, `mask.zero_()` after the scores are made) would reach SDPA but not
# the original. So an op that may change a tensor in place, placed after the first read of an SDPA input on
# the way to the value matmul and before the value matmul, refuses the site when the tensor it writes may
# alias one the site reads. Aliasing is tracked through the ops that may return a view of their input
# (views, reshapes, slicing, casts that may return self, in-place ops, which return their input): two
# tensors may alias when they reach the same base through such ops. Every other op makes a new tensor, so a
# write to an unrelated tensor (a MoE router's `probs /= probs.sum()` between a layer's shared mask and its
# attention) no longer refuses the site. Found by tests/test_properties.py; the aliasing by issue 14.

_INPLACE_OPERATORS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul,
}



def _may_mutate(node: fx.Node) -> bool:
    """Whether `node` may change one of its inputs in place (x.add_, x[i] = y, x += y, inplace=True, out=)."""
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        if getattr(node.target, "__module__", "") in ("_operator", "operator"):
            return False  # operator.and_ / or_ / not_ are not in place
        name = getattr(node.target, "__name__", "")
    elif node.op == "call_method":
        name = node.target
    else:
        return False
    if name.endswith("_") and not name.endswith("__"):
        return True
    return node.kwargs.get("inplace") is True or node.kwargs.get("out") is not None


def _written(node: fx.Node) -> list[fx.Node]:
    """The tensors a mutating node may write: its first argument, or `out=`."""
    out = node.kwargs.get("out")
    found = [out] if isinstance(out, fx.Node) else [a for a in out if isinstance(a, fx.Node)] if isinstance(out, (tuple, list)) else []
    first = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    if isinstance(first, fx.Node):
        found.append(first)
    return found


def _alias_roots(node: fx.Node, memo: dict[fx.Node, frozenset[fx.Node]]) -> frozenset[fx.Node]:
    """The base tensors `node` may be a view of (itself when it is a new tensor)."""
    if node in memo:
        return memo[node]
    chain = []
    cur = node
    while True:
        if cur in memo:
            roots = memo[cur]
            break
        base = cur.args[0] if cur.args else None
        if isinstance(base, fx.Node) and (may_alias_input(cur) or _may_mutate(cur)):
            chain.append(cur)
            cur = base
            continue
        roots = frozenset({cur})
        break
    for n in chain:
        memo[n] = roots
    memo[node] = roots
    return roots


def _mutated_inside(sources: list[Any], out: fx.Node, gm: fx.GraphModule, cache: dict[Any, Any] | None) -> fx.Node | None:
    """The first node that may change a tensor aliasing one of `sources` after the pattern first reads one of
    them on the way to `out`, and before `out`; None if there is none."""
    cache = {} if cache is None else cache
    order = cache.get(("order", id(gm)))
    if order is None:
        order = cache[("order", id(gm))] = {n: i for i, n in enumerate(gm.graph.nodes)}
    memo = cache.setdefault(("alias", id(gm)), {})
    srcs = {s for s in sources if isinstance(s, fx.Node)}
    if not srcs:
        return None
    lowest = min(order[s] for s in srcs)
    # ancestors of `out` that come after the earliest source, not looking past a source: the nodes on the way
    # from the sources to out. A read behind a source (another layer reading a shared mask, whose output is
    # this site's q) made that source's value before this site and is not one of this site's reads.
    seen, todo = {out}, [out]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in seen and order[a] >= lowest:
                seen.add(a)
                if a not in srcs:
                    todo.append(a)
    reads = [order[u] for s in srcs for u in s.users if u in seen]
    if not reads:
        return None
    read_roots = frozenset().union(*(_alias_roots(s, memo) for s in srcs))
    start, end = min(reads), order[out]
    nodes = list(gm.graph.nodes)
    for n in nodes[start:end]:
        if _may_mutate(n) and any(_alias_roots(w, memo) & read_roots for w in _written(n)):
            return n
    return None


# Note [Captured tensors in Flex]
# lift() can read module buffers and tensor constants (a tril buffer, ALiBi slopes). At compile time
# build_block_mask runs the lifted functions on the real tensors. When Inductor traces our runtime flex
# call, FlexAttention traces mask_mod/score_mod on fake tensors, where a captured real tensor fails
# ("Please convert all Tensors to FakeTensors", torch 2.13). So the nodes that make those tensors are
# passed to the flex call as extra graph arguments, and the call rebinds each lift.Capture to its traced
# value while FlexAttention traces; the closures then capture graph values, which Flex supports.


def _lift_cached(mask_nodes: list[fx.Node], gm: fx.GraphModule, example_inputs: Sequence[Any], cache: dict[Any, Any]) -> list[Any] | str:
    """The lifted index functions of the mask nodes, or the reason (a string) why they cannot be lifted.
    Lifted once per graph: layers share one mask node."""
    from asam_compile.passes.lift import NotLiftable, lift

    key = ("lift", tuple(mask_nodes))
    if key not in cache:
        try:
            cache[key] = lift(mask_nodes, gm, example_inputs)
        except NotLiftable as e:
            log.debug("mask %s not lifted: %s", [n.name for n in mask_nodes], e)
            cache[key] = f"mask not liftable: {e}"
    return cache[key]


def _guarded_plan(
    softmax: fx.Node, config: Any, dropout_p: float, qv: Any, planner: Any, *args: Any
) -> FlexPlan | str:
    """planner(*args), where Flex can run at all (a string says why not); a planner that raises leaves the site
    on its dense mask (strict re-raises). `qv`: the scores' example value."""
    if dropout_p:
        return "Flex has no attention dropout"
    if config.flex == "never":
        return "flex='never'"
    if qv.dim() == 2:
        return "Flex is used for 3-D and 4-D attention only"
    try:
        return planner(*args)
    except Exception as e:  # noqa: BLE001 - Flex is an optimisation: the dense mask stays exact
        if config.strict:
            raise
        log.warning("asam_compile: Flex planning failed for %s (%s: %s); kept a dense mask",
                    softmax.name, type(e).__name__, e)
        return f"Flex planning failed: {type(e).__name__}: {e}"


def _plan_flex(
    softmax: fx.Node, scores: _Scores, mask_nodes: list[fx.Node], gm: fx.GraphModule,
    example_inputs: Sequence[Any], config: Any, qv: Any, sv: Any, cache: dict[Any, Any], biased: bool = False,
) -> FlexPlan | str:
    """Lift a compile-time mask into a mask_mod, build its BlockMask and ask the cost model. Returns the
    plan, or the reason (a string) why the site keeps a dense mask."""
    from asam_compile import cost
    from asam_compile.block_mask import build_block_mask
    from asam_compile.passes.lift import name_mask

    qv = _as_4d(qv)  # a 3-D (N, L, E) site runs as (1, N, L, E): its N is Flex's head dim
    dynamic = any(isinstance(d, torch.SymInt) for d in (*qv.shape, *sv.shape))
    lifted = _lift_cached(mask_nodes, gm, example_inputs, cache)
    if isinstance(lifted, str):
        return lifted
    key = ("flex", tuple(mask_nodes), tuple((t.factor, t.negate) for t in scores.terms),
           tuple((fl.value, fl.mask_is_keep) for fl in scores.fills))
    if key not in cache:
        cache[key] = _lifted_keep(scores, lifted)
    keep_fn, axes = cache[key]
    if dynamic:
        return _plan_dynamic_flex(softmax, scores, lifted, keep_fn, axes, key, gm, config, qv, sv, biased)
    B, H, L, S = (int(d) for d in qv.shape)
    E = int(sv.shape[-1])
    Bm, Hm = (B if "b" in axes else 1), (H if "h" in axes else 1)
    device = sv.device
    name = name_mask(keep_fn, L, S)
    mask_key = f"{name}_{abs(hash((id(gm), key))) % 10**8}"
    keep_fn.__name__ = name
    block_mask, density = build_block_mask(keep_fn, Bm, Hm, L, S, device, block_size=config.block_size, key=(mask_key, Bm, Hm, L, S, str(device)))
    kernel, reason = cost.choose_kernel(B=B, H=H, L=L, S=S, E=E, density=density, device_type=device.type,
                                        requires_grad=bool(_val(softmax).requires_grad), policy=config.flex)
    captures, score_key, _ = _register(mask_key, keep_fn, scores, lifted, biased, in_graph=False)
    if score_key and biased:
        reason += "; additive bias as a score_mod"
    tensors = (block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    return FlexPlan(kernel, reason, name, mask_key, density, config.block_size, (L, S), tensors, score_key,
                    tuple(c.node for c in captures), (Bm, Hm))


# Note [Runtime masks as in-graph block masks]
# A mask that reads runtime inputs (padding, document ids from caller-given position_ids) is lifted with
# runtime captures (Note [Masks read at run time] in passes/lift.py). Its block mask is built inside the
# graph on every call (asam_compile.runtime.block_mask_tensors_call, once per mask per graph, shared by the
# layers), from the traced values: one fused pass over the (B', H', L, S) mask elements, never stored, then
# a sort of the (B', H', L/128, S/128) block table. The same build says which query rows have no key
# left; those get the original's result (Note [Fully masked rows]), as on the dense path, because padding
# makes such rows at run time (left padding) and we cannot know at compile time.
# Density for the cost model comes from the example call's values (the first call); the kernel choice is
# then fixed for the graph. Additive terms are left out of the score (kept positions add 0) only where the
# graph proves each term is 0 or a removed-key value whatever the runtime values are (a `where` or
# `masked_fill` of constants: HF's masks); otherwise a score_mod adds them, which is exact for any values.
# Static shapes only (Note [Flex under dynamic shapes]); 3-D sites run as 4-D ones with a batch of 1.

_BUILD_ELEMENTS_PER_S = 2.0e11  # in-graph block-mask build, mask elements per second (H100, est.)


def _exclusion_only(node: Any, depth: int = 0) -> bool:
    """Every value of `node` is 0 or at most LARGE_NEGATIVE whatever the runtime inputs: constants put
    through where / masked_fill and shape or dtype ops."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return node == 0 or node <= LARGE_NEGATIVE
    if not isinstance(node, fx.Node) or depth > 64:
        return False
    if node.op not in ("call_function", "call_method"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    args = node.args
    if name == "where" and len(args) == 3:
        return _exclusion_only(args[1], depth + 1) and _exclusion_only(args[2], depth + 1)
    if name == "masked_fill" and len(args) == 3:
        return _exclusion_only(args[0], depth + 1) and _exclusion_only(args[2], depth + 1)
    if name in ("tensor", "scalar_tensor", "full") and args:
        value = args[0] if name != "full" else (args[1] if len(args) > 1 else node.kwargs.get("fill_value"))
        return not isinstance(value, fx.Node) and _exclusion_only(value, depth + 1)
    if name in ("zeros", "zeros_like", "new_zeros"):
        return True
    if name in ("to", "type", "float", "half", "bfloat16", "double", "expand", "expand_as", "broadcast_to",
                "view", "reshape", "unsqueeze", "squeeze", "contiguous", "clone", "getitem", "permute",
                "transpose", "repeat", "narrow", "slice", "select"):
        return bool(args) and _exclusion_only(args[0], depth + 1)
    return False


def _plan_runtime_flex(
    softmax: fx.Node, scores: _Scores, mask_nodes: list[fx.Node], gm: fx.GraphModule,
    example_inputs: Sequence[Any], config: Any, qv: Any, sv: Any,
) -> FlexPlan | str:
    """Note [Runtime masks as in-graph block masks]: the plan for a mask that reads runtime inputs, or the
    reason (a string) why it keeps a dense mask."""
    from asam_compile.passes.lift import NotLiftable, lift, name_mask

    qv = _as_4d(qv)
    if any(isinstance(d, torch.SymInt) for d in (*qv.shape, *sv.shape)):
        return "Flex under dynamic shapes is not built yet (Note [Flex under dynamic shapes])"
    try:
        lifted = lift(mask_nodes, gm, example_inputs, runtime=True)
    except NotLiftable as e:
        return f"mask not liftable: {e}"
    captures = lifted[0].captures if lifted else ()
    read = sorted({c.node.name for c in captures if c.runtime and c.node is not None})
    if not read:
        return "mask reads runtime inputs the lifter did not capture"
    keep_fn, axes = _lifted_keep(scores, lifted)
    biased = bool(scores.terms) and not all(_exclusion_only(t.node) for t in scores.terms)
    L, S = int(qv.shape[2]), int(qv.shape[3])
    short = [n.removeprefix("l_").removeprefix("kwargs_").removeprefix("args_").strip("_") for n in read]
    name = f"{name_mask(keep_fn, L, S).replace('lifted_mask', 'mask')}_with_{'_'.join(short)}"
    mask_key = f"{name}_{abs(hash((id(gm), tuple(mask_nodes)))) % 10**8}"
    return _in_graph_plan(softmax, scores, lifted, keep_fn, axes, name, mask_key, qv, sv, config, biased,
                          f"block mask built in the graph from {', '.join(read)}")


def _register(
    mask_key: str, keep_fn: Any, scores: _Scores, lifted: list[Any], biased: bool, in_graph: bool
) -> tuple[tuple[Any, ...], str | None, str | None]:
    """Register a plan's functions with the runtime under `mask_key`: the mask_mod and its captures, the
    score_mod of an additive bias (Note [Index-built score biases]) and, for a block mask built in the graph
    from an additive mask, the "all -inf" rows function. Returns (captures, score_key, neginf_key)."""
    from asam_compile import runtime

    runtime.register_mask_mod(mask_key, keep_fn)
    captures = lifted[0].captures if lifted else ()
    runtime.register_captures(mask_key, captures)
    score_key = None
    if biased or scores.softcap is not None:
        score_key = runtime.register_score_mod(f"bias_{mask_key}", _lifted_bias(scores, lifted, biased))
    neginf_key = None
    if in_graph and scores.terms and not scores.fills:  # Note [Fully masked rows]: all -inf gives NaN
        neginf_key = runtime.register_mask_mod(f"neginf_{mask_key}", _lifted_neginf(scores, lifted))
    return captures, score_key, neginf_key


def _lifted_neginf(scores: _Scores, lifted: list[Any]) -> Any:
    """(b, h, q, kv) -> the additive terms sum to -inf there (the original's softmax row gives NaN if all do)."""
    terms = list(zip(scores.terms, lifted[: len(scores.terms)]))

    def neginf_mask(b: Any, h: Any, q: Any, kv: Any) -> Any:
        add = None
        for t, lf in terms:
            v = lf.fn(b, h, q, kv).to(torch.float32) * t.factor
            v = -v if t.negate else v
            add = v if add is None else add + v
        return torch.isneginf(add)

    return neginf_mask



def _as_4d(x: Any) -> Any:
    """The scores' example value with a leading batch dim of 1 for a 3-D (N, L, S) site (as rewrite emits it)."""
    return x.unsqueeze(0) if x.dim() == 3 else x


def _size_hint(d: Any) -> int:
    """The example's value of a size (an int, or a SymInt's hint)."""
    if isinstance(d, torch.SymInt):
        hint = _compat.sym_hint(d)
        if hint is None:
            raise NotImplementedError(f"size {d} has no hint")
        return int(hint)
    return int(d)


def _in_graph_plan(
    softmax: fx.Node, scores: _Scores, lifted: list[Any], keep_fn: Any, axes: frozenset[str], name: str,
    mask_key: str, qv: Any, sv: Any, config: Any, biased: bool, where: str,
) -> FlexPlan:
    """A plan whose block mask is built in the graph on every call (runtime masks, dynamic shapes). The cost
    model and the report see the example call: its sizes and, through the captures, its values."""
    from asam_compile import cost
    from asam_compile.block_mask import build_block_mask

    B, H, L, S = (_size_hint(d) for d in qv.shape)
    E = _size_hint(sv.shape[-1])
    Bh, Hh = (B if "b" in axes else 1), (H if "h" in axes else 1)
    keep_fn.__name__ = name
    try:
        _, density = build_block_mask(keep_fn, Bh, Hh, L, S, sv.device, block_size=config.block_size)
    except Exception as e:  # noqa: BLE001 - no example values: plan for the worst case
        log.debug("in-graph mask %s: example density not computed: %s", name, e)
        density = 1.0
    kernel, reason = cost.choose_kernel(B=B, H=H, L=L, S=S, E=E, density=density, device_type=sv.device.type,
                                        requires_grad=bool(_val(softmax).requires_grad), policy=config.flex,
                                        build_s=Bh * Hh * L * S / _BUILD_ELEMENTS_PER_S)
    reason = f"{reason}; {where}"
    captures, score_key, neginf_key = _register(mask_key, keep_fn, scores, lifted, biased, in_graph=True)
    if score_key and biased:
        reason += "; additive terms as a score_mod"
    Bm, Hm = (qv.shape[0] if "b" in axes else 1), (qv.shape[1] if "h" in axes else 1)
    return FlexPlan(kernel, reason, name, mask_key, density, config.block_size, tuple(qv.shape[2:]), (), score_key,
                    tuple(c.node for c in captures), (Bm, Hm), in_graph=True, neginf_key=neginf_key)


def _plan_dynamic_flex(
    softmax: fx.Node, scores: _Scores, lifted: list[Any], keep_fn: Any, axes: frozenset[str], key: Any,
    gm: fx.GraphModule, config: Any, qv: Any, sv: Any, biased: bool,
) -> FlexPlan | str:
    """Note [Flex under dynamic shapes]: a shape-only mask in a graph that serves many lengths gets its block
    mask built in the graph on every call, for the call's sizes (the in-graph build of runtime masks)."""
    from asam_compile.passes.lift import name_mask

    L, S = _size_hint(qv.shape[2]), _size_hint(qv.shape[3])
    name = name_mask(keep_fn, L, S)
    mask_key = f"{name}_{abs(hash((id(gm), key))) % 10**8}"
    return _in_graph_plan(softmax, scores, lifted, keep_fn, axes, name, mask_key, qv, sv, config, biased,
                          f"dynamic shapes: block mask built in the graph (chosen at the example's {L}x{S})")


# Note [Index-built score biases]
# An additive mask whose values on kept positions are not all 0 (ALiBi, relative-position biases), when it
# can be lifted, becomes two functions: keep(b, h, q, kv) = (sum of terms > LARGE_NEGATIVE) & fills, the
# block mask's mask_mod, and bias(b, h, q, kv) = sum of the scaled terms, added by a score_mod:
# flex computes q.k * scale + bias, the same order as SDPA's q.k * scale + attn_mask.


def _lifted_bias(scores: _Scores, lifted: list[Any], biased: bool = True) -> Any:
    """score_mod(score, b, h, q, kv) = score (soft-capped, Note [Soft-capped scores]) + the additive terms at
    (b, h, q, kv) where `biased`."""
    terms = list(zip(scores.terms, lifted[: len(scores.terms)])) if biased else []
    cap = scores.softcap

    def lifted_bias(score: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
        if cap is not None:
            score = torch.tanh(score / cap) * cap
        for t, lf in terms:
            v = lf.fn(b, h, q, kv).to(score.dtype) * t.factor
            score = score - v if t.negate else score + v
        return score

    return lifted_bias


def _lifted_keep(scores: _Scores, lifted: list[Any]) -> tuple[Any, frozenset[str]]:
    """keep(b, h, q, kv): the positions the original mask leaves in, from the lifted terms and fills."""
    terms = list(zip(scores.terms, lifted[: len(scores.terms)]))
    fills = list(zip(scores.fills, lifted[len(scores.terms):]))
    axes = frozenset().union(*(lf.axes for lf in lifted)) if lifted else frozenset()

    def keep_fn(b: Any, h: Any, q: Any, kv: Any) -> Any:
        keep = None
        if terms:
            add = None
            for t, lf in terms:
                v = lf.fn(b, h, q, kv).to(torch.float32) * t.factor
                v = -v if t.negate else v
                add = v if add is None else add + v
            keep = add > LARGE_NEGATIVE
        for fl, lf in fills:
            m = lf.fn(b, h, q, kv).bool()
            m = m if fl.mask_is_keep else ~m
            keep = m if keep is None else keep & m
        return keep

    return keep_fn, axes


def _shape_after(op: Operand) -> tuple[Any, ...] | None:
    """The shape of an operand after its view steps, computed on the fake example value."""
    val = _val(op.node)
    if not isinstance(val, torch.Tensor):
        return None
    for target, args in op.steps:
        val = target(val, *args)
    return tuple(val.shape)


def _runtime_fixup(scores: _Scores) -> str | None:
    if scores.fills:
        return "nan" if any(fl.value == float("-inf") for fl in scores.fills) else "mean"
    return "nan_if_all_neginf"  # an additive mask that may hold -inf rows at run time


# Note [nn.MultiheadAttention]
# Dynamo keeps nn.MultiheadAttention as one F.multi_head_attention_forward call. With need_weights=False that
# function runs SDPA itself; with need_weights=True (its default) it computes the weights by hand (bmm,
# softmax, dropout, bmm) to return them averaged over heads. Where the caller drops them (SigLIP's pooling
# head: `self.attention(probe, x, x)[0]`), the call is the same computation as with need_weights=False, so
# the rewrite turns that flag off and MHA's own SDPA path runs. Where the weights are used, it stays.


@dataclasses.dataclass
class WeightsDrop:
    """An F.multi_head_attention_forward call whose attention weights nobody reads (Note [nn.MultiheadAttention])."""

    node: fx.Node


def match_mha(node: fx.Node) -> WeightsDrop:
    """Note [nn.MultiheadAttention]. Raises Rejection."""
    need = node.kwargs.get("need_weights", node.args[15] if len(node.args) > 15 else True)  # its 16th parameter
    if need is False:
        raise Rejection(Reject.ALREADY_SDPA, "need_weights=False")
    if need is not True:
        raise Rejection(Reject.PROBS_ESCAPE, f"need_weights={need!r} is not a constant")
    if any(not (_call(u, operator.getitem) and u.args[1] == 0) for u in node.users):
        raise Rejection(Reject.PROBS_ESCAPE, f"{node.name} returns its attention weights (need_weights=True) to the caller")
    return WeightsDrop(node)


def run(gm: fx.GraphModule, example_inputs: Sequence[Any], config: Any, report: GraphReport) -> list[AttentionMatch | WeightsDrop]:
    """Match every softmax (and nn.MultiheadAttention call); record a Candidate for each; return the matches."""
    matches: list[AttentionMatch | WeightsDrop] = []
    mask_cache: dict[Any, Any] = {}  # layers share one mask node: evaluate it once per graph
    root = _compat.compiled_frame_module()  # for asam_compile.sparse marks on the compiled module itself
    root_type = type(root) if root is not None else None
    for node in gm.graph.nodes:
        if _call(node, F.multi_head_attention_forward):
            cand = Candidate(site=node.name, module=module_path(node), source=source_line(node), status="refused")
            try:
                matches.append(match_mha(node))
                cand.status, cand.target = "matched", "sdpa"
                cand.info = {"mha": "need_weights=True with the weights unused: run with need_weights=False (SDPA)"}
            except Rejection as r:
                cand.reject, cand.detail = r.reject, r.detail
            report.candidates.append(cand)
            continue
        implicit = _call(node, F.softmax) and len(node.args) < 2 and node.kwargs.get("dim") is None
        if not (is_softmax(node) or _call(node, torch.log_softmax) or implicit):
            continue
        cand = Candidate(site=node.name, module=module_path(node), source=source_line(node), status="refused")
        if implicit:  # normalize leaves these alone: the legacy dim depends on the rank
            cand.reject = Reject.SOFTMAX_IMPLICIT_DIM
            report.candidates.append(cand)
            continue
        try:
            m = match_attention(node, gm, example_inputs, config, mask_cache)
        except Rejection as r:
            cand.reject, cand.detail = r.reject, r.detail
            log.debug("refused %s (%s): %s", node.name, cand.module, cand.reason)
        else:
            # "matched" until the rewrite pass has run (a dry run with disable_passes=("rewrite",) stays so)
            cand.status, cand.target = "matched", ("flex" if m.mask_kind == "flex" else "sdpa")
            cand.info = {
                "mask": f"{m.mask_kind}:{m.flex_plan.name}" if isinstance(m.flex_plan, FlexPlan) else m.mask_kind,
                "is_causal": m.mask_kind == "causal",
                "enable_gqa": m.enable_gqa,
                "dropout_p": m.dropout_p,
                "scale": round(m.scale, 6) if not m.sym_factors else "symbolic",
            }
            if isinstance(m.flex_plan, FlexPlan):
                cand.info["density"] = round(m.flex_plan.density, 3)
                if m.flex_plan.score_key:
                    cand.info["score_mod"] = f"softcap({m.softcap})" if m.softcap is not None else "lifted_bias"
                cand.info["kernel"] = f"{m.flex_plan.kernel}: {m.flex_plan.reason}"
            elif isinstance(m.flex_plan, str):
                cand.info["kernel"] = f"sdpa: {m.flex_plan}"
            _plan_adaptive(node, m, config, cand, root_type)
            matches.append(m)
            log.debug("matched %s (%s): %s", node.name, cand.module, cand.info)
        report.candidates.append(cand)
    return matches


def _plan_adaptive(softmax: fx.Node, m: AttentionMatch, config: Any, cand: Candidate, root_type: Any) -> None:
    """Send the site to adaptive sparse attention where its settings ask for it and it can run there."""
    from asam_compile.passes import adaptive

    settings = adaptive.site_settings(softmax, config, root_type)
    if settings is None:
        return
    if m.softcap is not None:
        cand.info["adaptive"] = "exact: soft-capped scores run as an exact Flex score_mod"
        return
    probs, out = _val(m.softmax), _val(m.out)
    qs, vs = _shape_after(m.q), _shape_after(m.v)
    # a mask whose Flex plan the cost model declined for the dense kernel: the adaptive call runs Flex on a
    # subset of its blocks (Note [Adaptive over a structured mask] in asam_compile/adaptive.py)
    to_flex = m.mask_kind == "dense" and isinstance(m.flex_plan, FlexPlan)
    why = adaptive.refusal(m, settings, probs.shape[-2], probs.shape[-1], qs[-1], vs[-1], out.device,
                           bool(out.requires_grad), mask_kind="flex" if to_flex else m.mask_kind)
    if why is not None:
        cand.info["adaptive"] = f"exact: {why}"
        return
    if to_flex:
        m.mask_kind, m.fixup = "flex", _flex_fixup(m.flex_plan, m.fixup)
        m.k, m.v, m.enable_gqa = _gqa_operands(m.k, m.v, "flex", m.rank, config)
        cand.info.update(mask=f"flex:{m.flex_plan.name}", enable_gqa=m.enable_gqa,
                         kernel=f"flex: adaptive, inside the mask's blocks (alone: {m.flex_plan.kernel}, {m.flex_plan.reason})")
    m.adaptive = settings
    cand.target = "adaptive"
    cand.info["adaptive"] = (
        f"coverage={settings.coverage}, max_density={settings.max_density}, window={settings.window}, "
        f"sinks={settings.sinks}, block_size={settings.block_size}"
        + (", dense_fallback=True" if settings.dense_fallback else "")
        + (f", estimator={settings.estimator}" if settings.estimator != "pooled" else "")
        + (f", inside the block mask of {m.flex_plan.name}" if m.mask_kind == "flex" else "")
    )
