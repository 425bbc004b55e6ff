"""match: grow an attention candidate outward from each softmax; patterns only, never mutates the graph.

    scores = (q * a) @ (k * b).transpose(-2, -1) / c     # any placement of scalar factors
    scores = scores + mask | masked_fill(m, -inf) | where(m, scores, min)
    probs  = softmax(scores, -1[, dtype]) [.to(d)] [dropout]
    out    = probs @ v                                    ->  AttentionMatch(q, k, v, scale, mask terms, ...)

What the mask means (causal, structured, run-time), which kernel runs it and whether the site goes adaptive is
the plan stage's (passes/plan.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from typing import Any

import torch
import torch.fx as fx

from asam_compile.passes import PassContext, StageResult
from asam_compile.passes.alias import may_mutate
from asam_compile.passes.ir import (
    LARGE_NEGATIVE, AttentionMatch, Fill, Rejection, Term, WeightsDrop, apply_steps, is_call, is_cast, is_number, shape_after,
    val,
)
from asam_compile.passes.normalize import _is_tensor
from asam_compile.passes.operands import (
    fold, into_layout, is_scalar, is_tensor_scalar, qk_operands, scalar_hint, value_operand,
)
from asam_compile.report import Candidate, Reject

log = logging.getLogger(__name__)
F = torch.nn.functional
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
        (node.op == "call_method" and node.target in ("view", "reshape")) or is_call(node, torch.reshape)
    ):
        return False
    src, out = val(node.args[0]) if isinstance(node.args[0], fx.Node) else None, val(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor) or src.dim() < 2 or out.dim() < 2:
        return False
    if any(not isinstance(d, int) for d in (*src.shape, *out.shape)):
        return False
    return tuple(src.shape[-2:]) == tuple(out.shape[-2:]) and src.numel() == out.numel()


def _is_identity_view(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("contiguous", "clone")


SAFE_SOFTMAXES = (torch.ops.aten._safe_softmax, torch.ops.aten._safe_softmax.default)


def is_softmax(node: fx.Node) -> bool:
    """A softmax the matcher grows a candidate from: torch.softmax (normalized), or aten._safe_softmax (how
    SDPA's math path decomposes: a row of -inf gives 0 instead of NaN)."""
    return is_call(node, torch.softmax) or (node.op == "call_function" and node.target in SAFE_SOFTMAXES)


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
        if is_cast(user) or _is_identity_view(user) or is_batch_reshape(user):
            region.append(user)
            cur = user
            continue
        if is_call(user, F.dropout) or is_call(user, torch.dropout):  # (x, p, training[, inplace]) both
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
        if is_call(user, torch.matmul) and user.args[0] is cur:
            return user, dropout_p, region, cur
        if is_call(user, torch.einsum):
            return user, dropout_p, region, cur
        if _reaches_matmul(user):
            raise Rejection(Reject.PROBS_CHANGED, f"{user.name} ({user.target if isinstance(user.target, str) else getattr(user.target, '__name__', user.target)})")
        raise Rejection(Reject.NO_VALUE_MATMUL, user.name)


def _reaches_matmul(node: fx.Node, depth: int = 4) -> bool:
    if depth == 0:
        return False
    for u in node.users:
        if is_call(u, torch.matmul) or is_call(u, torch.einsum) or _reaches_matmul(u, depth - 1):
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
    return is_call(node, torch.tanh) or (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "tanh")


def _match_softcap(tanh: fx.Node, chain: list[tuple[str, Any]], region: list[fx.Node]) -> fx.Node:
    """Note [Soft-capped scores]: the scores under `c * tanh(x / c)`; records ("softcap", c) in the chain."""
    outer = chain[-1] if chain else None
    if outer is None or outer[0] != "mul" or not is_number(outer[1]):
        raise Rejection(Reject.SCORE_OP_UNSUPPORTED, f"{tanh.name} (tanh) is not soft-capping c * tanh(x / c)")
    c = float(outer[1])
    inner = tanh.args[0]
    if not isinstance(inner, fx.Node) or len(inner.users) != 1 or not (is_call(inner, torch.div) or is_call(inner, torch.mul)):
        raise Rejection(Reject.SCORE_OP_UNSUPPORTED, f"{tanh.name} (tanh) is not soft-capping c * tanh(x / c)")
    x, d = inner.args
    f = fold(d)
    if not (is_number(f) and isinstance(x, fx.Node) and c > 0
            and (f == c if is_call(inner, torch.div) else abs(f * c - 1.0) < 1e-9)):
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
        if is_call(cur, torch.matmul) or is_call(cur, torch.einsum) or is_call(cur, torch.baddbmm):
            return True
        if is_cast(cur) or _is_identity_view(cur) or is_call(cur, torch.masked_fill) or is_batch_reshape(cur) or _is_tanh(cur):
            cur = cur.args[0]
        elif is_call(cur, torch.where):
            nxt = [a for a in cur.args[1:] if isinstance(a, fx.Node) and _reaches_qk(a, depth - 1)]
            return bool(nxt)
        elif any(is_call(cur, t) for t in (torch.mul, torch.div, torch.add, torch.sub)):
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
            if is_call(n, torch.matmul) or is_call(n, torch.einsum) or is_call(n, torch.baddbmm):
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
        if is_call(cur, torch.matmul) or is_call(cur, torch.einsum):
            break
        if is_call(cur, torch.baddbmm):  # beta * input + alpha * (q @ kT): BLOOM's ALiBi scores
            bias, beta, alpha = cur.args[0], cur.kwargs.get("beta", 1), cur.kwargs.get("alpha", 1)
            if not (is_number(beta) and is_number(alpha)):
                raise Rejection(Reject.SCALE_NOT_SCALAR, f"{cur.name}: baddbmm with beta={beta}, alpha={alpha}")
            if beta != 0 and isinstance(bias, fx.Node) and _is_tensor(bias):
                chain.append(("term", Term(bias, float(beta), at=tuple(val(cur).shape))))
            chain.append(("mul", float(alpha)))
            break
        if is_cast(cur) or _is_identity_view(cur) or is_batch_reshape(cur):
            cur = cur.args[0]
            continue
        if is_call(cur, torch.mul) or is_call(cur, torch.div):
            a, b = cur.args
            if is_call(cur, torch.div):
                side = (a, b) if isinstance(a, fx.Node) and _reaches_qk(a) else None
            else:
                side = _scores_side(a, b)
            if side is None:
                raise _no_qk(cur)
            s, other = side
            if is_tensor_scalar(other):
                # Note [0-dim runtime scales]: folded into q where nothing was added or filled after it
                chain.append(("div" if is_call(cur, torch.div) else "mul", other))
                cur = s
                continue
            if not is_scalar(other):
                raise Rejection(Reject.SCALE_NOT_SCALAR, f"{cur.name} multiplies by a tensor")
            chain.append(("div" if is_call(cur, torch.div) else "mul", fold(other)))
            cur = s
            continue
        if is_call(cur, torch.add) or is_call(cur, torch.sub):
            a, b = cur.args
            side = _scores_side(a, b)
            if side is None:
                raise _no_qk(cur)
            s, other = side
            if is_call(cur, torch.sub) and s is b:
                raise Rejection(Reject.SCORE_OP_UNSUPPORTED, f"{cur.name} negates the scores")
            if isinstance(other, fx.Node) and _is_tensor(other):
                chain.append(("term", Term(other, 1.0, negate=is_call(cur, torch.sub), at=tuple(val(cur).shape))))
            # a scalar shift cancels in softmax: exact, nothing to record
            cur = s
            continue
        if is_call(cur, torch.masked_fill):
            s, mask, value = cur.args
            if not is_scalar(value):
                raise Rejection(Reject.MASK_FILL_VALUE, f"{cur.name} fills with a tensor")
            chain.append(("fill", Fill(mask, scalar_hint(value), mask_is_keep=False, at=tuple(val(cur).shape))))
            cur = s
            continue
        if is_call(cur, torch.where) and len(cur.args) == 3:
            c, a, b = cur.args
            if isinstance(a, fx.Node) and _is_tensor(a) and _reaches_qk(a) and is_scalar(b):
                chain.append(("fill", Fill(c, scalar_hint(b), mask_is_keep=True, at=tuple(val(cur).shape))))
                cur = a
                continue
            if isinstance(b, fx.Node) and _is_tensor(b) and _reaches_qk(b) and is_scalar(a):
                chain.append(("fill", Fill(c, scalar_hint(a), mask_is_keep=False, at=tuple(val(cur).shape))))
                cur = b
                continue
            raise Rejection(Reject.SCORE_OP_UNSUPPORTED, f"{cur.name}: where() with a tensor on both sides")
        if _is_tanh(cur):
            cur = _match_softcap(cur, chain, region)
            continue
        name = cur.target if isinstance(cur.target, str) else getattr(cur.target, "__name__", str(cur.target))
        if may_mutate(cur):  # normalize left it in place: a view or another reader shares the scores
            raise Rejection(Reject.CHANGED_IN_PLACE, f"{cur.name} ({name}) changes the scores in place while "
                            "another view of them is read (Note [In-place arithmetic on a fresh tensor] in passes/normalize.py)")
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
            if is_tensor_scalar(item):  # Note [0-dim runtime scales]
                if terms or fills:
                    raise Rejection(Reject.SCALE_NOT_SCALAR, f"{item.name}: a tensor scale applied after a mask")
                continue
            if isinstance(item, fx.Node):
                f = scalar_hint(item)
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


def match_attention(softmax: fx.Node) -> AttentionMatch:
    """Grow a candidate outward from one softmax node. Never mutates the graph. Raises Rejection."""
    if softmax.target is torch.log_softmax:
        raise Rejection(Reject.LOG_SOFTMAX)
    x, dim = softmax.args[:2]
    xv = val(x)
    if dim % xv.dim() != xv.dim() - 1:
        raise Rejection(Reject.SOFTMAX_NOT_LAST_DIM, f"dim={dim} of a {xv.dim()}-D tensor")
    out, dropout_p, probs_region, probs = _match_probs(softmax)
    scores = _match_scores(x)
    q_factors: list[tuple[Any, bool]] = []
    q, k, labels = qk_operands(scores.qk, q_factors)
    v, out_perm = value_operand(out, probs, labels)
    # Note [Views of the scores]: the layout with the most leading dims among the scores' and probabilities'
    layouts = [scores.qk, *reversed(scores.region), softmax, *probs_region]
    canon = max(layouts, key=lambda n: val(n).dim() if isinstance(val(n), torch.Tensor) else -1)
    out_shape = None
    if any(is_batch_reshape(n) for n in layouts):
        q, k, v, out_shape = into_layout(canon, q, k, v, out, scores, labels)

    # scale: python numbers fold into SDPA's scale; symbolic ones are multiplied into q
    scale, sym = 1.0, []
    for f, is_div in q_factors + scores.factors:
        if isinstance(f, fx.Node):
            if not is_tensor_scalar(f) and scalar_hint(f) <= 0:
                raise Rejection(Reject.SCALE_NOT_POSITIVE, f.name)
            sym.append((f, is_div))
        else:
            scale = scale / f if is_div else scale * f
    if not scale > 0 or math.isinf(scale):
        raise Rejection(Reject.SCALE_NOT_POSITIVE, f"scale={scale}")

    # shapes
    qv, sv = val(canon), val(out)
    rank = qv.dim()
    if rank not in (2, 3, 4):
        raise Rejection(Reject.UNSUPPORTED_RANK, f"{rank}-D scores")
    L, S = qv.shape[-2], qv.shape[-1]
    if any(isinstance(d, int) and d == 0 for d in (L, S, sv.shape[-1])):
        raise Rejection(Reject.EMPTY)
    for t in [*scores.terms, *scores.fills]:
        m = t.node if isinstance(t, Term) else t.mask
        mv = apply_steps(val(m), t.steps)
        try:
            shape = torch.broadcast_shapes(tuple(mv.shape), tuple(qv.shape))
        except RuntimeError:
            raise Rejection(Reject.MASK_NOT_BROADCASTABLE, m.name)
        if tuple(shape) != tuple(qv.shape):
            raise Rejection(Reject.MASK_NOT_BROADCASTABLE, f"{m.name} {tuple(mv.shape)} vs scores {tuple(qv.shape)}")
    # shapes after our layout glue: batch dims must agree (SDPA does not broadcast them like matmul does)
    qs, ks, vs = (shape_after(o) for o in (q, k, v))
    if qs is None or ks is None or vs is None:
        raise Rejection(Reject.SHAPE_MISMATCH, "operand shapes unknown")
    if not (qs[:-2] == ks[:-2] == vs[:-2] and qs[-1] == ks[-1] and ks[-2] == vs[-2]):
        raise Rejection(Reject.SHAPE_MISMATCH, f"q {tuple(qs)}, k {tuple(ks)}, v {tuple(vs)}")
    # dtypes: SDPA runs in the dtype the original matmuls ran in (the autocast dtype under autocast)
    compute_dtype = torch.promote_types(qv.dtype, sv.dtype)
    if not compute_dtype.is_floating_point:
        raise Rejection(Reject.DTYPE, str(compute_dtype))

    return AttentionMatch(
        softmax=softmax, out=out, q=q, k=k, v=v, v_full=v, scale=scale, sym_factors=sym,
        terms=scores.terms, fills=scores.fills, dropout_p=dropout_p, compute_dtype=compute_dtype,
        out_dtype=sv.dtype, rank=rank, out_perm=out_perm, region=[out, *probs_region, softmax, *scores.region],
        scores=canon, safe_softmax=softmax.target in SAFE_SOFTMAXES, out_shape=out_shape, softcap=scores.softcap,
    )


# Note [nn.MultiheadAttention]
# Dynamo keeps nn.MultiheadAttention as one F.multi_head_attention_forward call. With need_weights=False that
# function runs SDPA itself; with need_weights=True (its default) it computes the weights by hand (bmm,
# softmax, dropout, bmm) to return them averaged over heads. Where the caller drops them (SigLIP's pooling
# head: `self.attention(probe, x, x)[0]`), the call is the same computation as with need_weights=False, so
# the rewrite turns that flag off and MHA's own SDPA path runs. Where the weights are used, it stays.


def match_mha(node: fx.Node) -> WeightsDrop:
    """Note [nn.MultiheadAttention]. Raises Rejection."""
    need = node.kwargs.get("need_weights", node.args[15] if len(node.args) > 15 else True)  # its 16th parameter
    if need is False:
        raise Rejection(Reject.ALREADY_SDPA, "need_weights=False")
    if need is not True:
        raise Rejection(Reject.PROBS_ESCAPE, f"need_weights={need!r} is not a constant")
    if any(not (is_call(u, operator.getitem) and u.args[1] == 0) for u in node.users):
        raise Rejection(Reject.PROBS_ESCAPE, f"{node.name} returns its attention weights (need_weights=True) to the caller")
    return WeightsDrop(node)


def run(gm: fx.GraphModule, ctx: PassContext) -> StageResult:
    """Match every softmax (and nn.MultiheadAttention call); record a Candidate for each in the report and
    (candidate, match) in ctx.sites for the plan stage. Counts the matches."""
    for node in gm.graph.nodes:
        if is_call(node, F.multi_head_attention_forward):
            cand = Candidate(site=node.name, module=module_path(node), source=source_line(node), status="refused")
            try:
                ctx.sites.append((cand, match_mha(node)))
                cand.status, cand.target = "matched", "sdpa"
                cand.info = {"mha": "need_weights=True with the weights unused: run with need_weights=False (SDPA)"}
            except Rejection as r:
                cand.reject, cand.detail = r.reject, r.detail
            ctx.report.candidates.append(cand)
            continue
        implicit = is_call(node, F.softmax) and len(node.args) < 2 and node.kwargs.get("dim") is None
        if not (is_softmax(node) or is_call(node, torch.log_softmax) or implicit):
            continue
        cand = Candidate(site=node.name, module=module_path(node), source=source_line(node), status="refused")
        ctx.report.candidates.append(cand)
        if implicit:  # normalize leaves these alone: the legacy dim depends on the rank
            cand.reject = Reject.SOFTMAX_IMPLICIT_DIM
            continue
        try:
            m = match_attention(node)
        except Rejection as r:
            cand.reject, cand.detail = r.reject, r.detail
            log.debug("refused %s (%s): %s", node.name, cand.module, cand.reason)
            continue
        cand.status = "matched"  # until the plan stage says how (or refuses it), and the rewrite has run
        ctx.sites.append((cand, m))
    return StageResult(gm, False, len(ctx.sites))
