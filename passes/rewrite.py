"""rewrite: replace each planned attention site by one SDPA, Flex or adaptive call (one emitter per target).

    probs = softmax(q @ k.mT * s + causal_mask, -1); out = probs @ repeat_kv(v)
      ->  out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s, enable_gqa=True)

Dead nodes of the old pattern are erased; new nodes carry meta["example_value"], stack_trace and
nn_module_stack of the softmax they replace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
from typing import Any

import torch
import torch.fx as fx

from asam_compile import _compat
from asam_compile.kernels import adaptive, dispatch, runtime
from asam_compile.passes import PassContext, StageResult
from asam_compile.passes.ir import AttentionMatch, Operand, WeightsDrop

log = logging.getLogger(__name__)
F = torch.nn.functional

_COPIED_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "seq_nr", "original_aten")


class _Emitter:
    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, like: fx.Node) -> None:
        self.graph = gm.graph
        self.anchor = anchor
        self.like = like

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        op = "call_method" if isinstance(target, str) else "call_function"
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node(op, target, args, kwargs)
        for key in _COPIED_META:
            if key in self.like.meta:
                node.meta[key] = self.like.meta[key]
        fargs = fx.node.map_arg(args, _compat.example_value)
        fkwargs = fx.node.map_arg(kwargs, _compat.example_value)
        # a call with no tensor argument (an in-graph block-mask build of a buffer-free mask) still runs in the
        # graph's fake mode, where its sizes may be symbolic
        mode = _compat.fake_mode_from((fargs, fkwargs)) or _compat.fake_mode_from([_compat.example_value(self.like)])
        with mode or contextlib.nullcontext():
            if target in (runtime.flex_attention_call, *adaptive.IN_GRAPH_CALLS):
                # same output as SDPA on the same q, k, v; cheaper and surer than tracing Flex on fakes
                q, k, v = fargs[:3]
                if fkwargs.get("enable_gqa"):
                    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
                    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
                val = F.scaled_dot_product_attention(q, k, v, scale=fkwargs["scale"])
            elif op == "call_method":
                val = getattr(fargs[0], target)(*fargs[1:], **fkwargs)
            else:
                val = target(*fargs, **fkwargs)
        node.meta["example_value"] = val
        return node


def _emit_steps(emit: _Emitter, node: fx.Node, steps: list[tuple[Any, tuple]]) -> fx.Node:
    for target, args in steps:
        node = emit(target, node, *args)
    return node


def _emit_operand(emit: _Emitter, op: Operand, rank: int, dtype: torch.dtype) -> fx.Node:
    node = _emit_steps(emit, op.node, op.steps)
    for _ in range(4 - rank):
        node = emit("unsqueeze", node, 0)
    if _compat.example_value(node).dtype != dtype:
        node = emit("to", node, dtype)
    return node


def _emit_mask(emit: _Emitter, m: AttentionMatch) -> tuple[fx.Node | None, fx.Node | None]:
    """(attn_mask, fully_masked_rows) for a dense mask; rows is a bool (..., L, 1) node or None. An additive
    mask's fully masked rows are its all -inf ones (the original gives NaN there)."""
    additive = None
    for t in m.terms:
        node = _emit_steps(emit, t.node, t.steps)
        if t.factor != 1.0:
            node = emit(torch.mul, node, t.factor)
        if t.negate:
            node = emit(torch.neg, node)
        additive = node if additive is None else emit(torch.add, additive, node)
    keep = None
    for fl in m.fills:
        mask = _emit_steps(emit, fl.mask, fl.steps)
        k = mask if fl.mask_is_keep else emit(torch.logical_not, mask)
        if _compat.example_value(k).dtype != torch.bool:
            k = emit("to", k, torch.bool)
        keep = k if keep is None else emit(torch.logical_and, keep, k)
    rows = None
    if additive is not None:
        if _compat.example_value(additive).dtype != m.compute_dtype:
            additive = emit("to", additive, m.compute_dtype)
        if keep is not None:
            additive = emit(torch.masked_fill, additive, emit(torch.logical_not, keep), float("-inf"))
        if m.fixup is not None:
            rows = emit("all", emit(torch.isneginf, additive), -1, keepdim=True)
            # SDPA's backward gives NaN on a row of -inf even where no gradient reaches it: the row is
            # replaced after SDPA anyway, so any finite value does
            additive = emit(torch.masked_fill, additive, rows, 0.0)
        return additive, rows
    if m.fixup is not None:
        rows = emit("all", emit(torch.logical_not, keep), -1, keepdim=True)
    return keep, rows


# Note [Gradients of fully masked rows]
# An additive mask of finfo.min (HF's `where(keep, 0, finfo.min)`) on every key of a row (left padding) makes the
# original's scores of that row exactly finfo.min: q.k is lost to rounding, the softmax is uniform and the
# output is the mean of V; SDPA and Flex give the same forward. Their backward does not: it recomputes the
# probabilities as exp(score - lse) with lse = finfo.min + log(S) rounded back to finfo.min, i.e. 1 instead of
# 1/S (dq off by several times on the CPU, torch 2.13), or gives 0 where a block mask left the row no key. The
# original's backward is the softmax's at uniform probabilities, passed to q.k through the addition:
#     ds_j = (dp_j - mean(dp)) / S,  dp_j = dout . v_j,  dq = scale * sum_j ds_j k_j,  dk_j += scale * ds_j q.
# Those rows are therefore replaced by mean(V) plus terms that are 0 in value and carry exactly that gradient:
# with dq = q - q.detach() and dk = k - k.detach() (zero-valued),
#     scale/S * (dq @ (Kd^T Vd) + qd @ (dk^T Vd)) - scale * (dq . mean(Kd) + qd . mean(dk)) * mean(Vd)
# (plus the same for the mask where it requires grad): O(S E^2) per head, no L x S scores. A masked_fill or
# where() fill cuts the gradient of filled positions in the original, so rows removed by fills keep the plain
# mean(V) (Note [Fully masked rows] in passes/plan.py).
ABSORBED = -1e30  # additive values this low absorb any score in float32 and bfloat16 (finfo.min is -3.4e38)


def _emit_uniform_rows(
    emit: _Emitter, q: fx.Node, k: fx.Node, v: fx.Node, scale: float, enable_gqa: bool, additive: fx.Node | None
) -> fx.Node:
    """mean(V) over the keys, with the gradient of a softmax at uniform probabilities (Note [Gradients of fully
    masked rows]); q, k, v 4-D in the compute dtype. `additive`: a dense additive mask that requires grad."""
    if enable_gqa:
        rep = _compat.example_value(q).shape[1] // _compat.example_value(k).shape[1]
        k, v = (emit("repeat_interleave", x, rep, 1) for x in (k, v))
    qd, kd, vd = (emit("detach", x) for x in (q, k, v))
    dq, dk = emit(torch.sub, q, qd), emit(torch.sub, k, kd)
    vbar, vdbar = emit("mean", v, -2, keepdim=True), emit("mean", vd, -2, keepdim=True)
    S = emit("size", k, 2) if isinstance(_compat.example_value(k).shape[2], torch.SymInt) else _compat.example_value(k).shape[2]
    kv = emit(torch.matmul, emit(torch.transpose, kd, -2, -1), vd)
    dkv = emit(torch.matmul, emit(torch.transpose, dk, -2, -1), vd)
    spread = emit(torch.add, emit(torch.matmul, dq, kv), emit(torch.matmul, qd, dkv))
    shift = emit(torch.add, emit(torch.mul, dq, emit("mean", kd, -2, keepdim=True)), emit(torch.mul, qd, emit("mean", dk, -2, keepdim=True)))
    shift = emit("sum", shift, -1, keepdim=True)
    lin = emit(torch.sub, emit(torch.mul, emit(torch.div, spread, S), scale), emit(torch.mul, emit(torch.mul, shift, scale), vdbar))
    if additive is not None:
        dm = emit(torch.sub, additive, emit("detach", additive))
        lin = emit(torch.add, lin, emit(torch.div, emit(torch.matmul, dm, vd), S))
        lin = emit(torch.sub, lin, emit(torch.mul, emit("mean", dm, -1, keepdim=True), vdbar))
    return emit(torch.add, vbar, lin)


def _emit_sizes(emit: _Emitter, q: fx.Node, k: fx.Node) -> dict[str, Any]:
    """B, H, L (from q) and S (from k): ints, or size nodes of q and k where they are symbolic."""
    qs, S = _compat.example_value(q).shape, _compat.example_value(k).shape[2]
    found = {"B": (qs[0], q, 0), "H": (qs[1], q, 1), "L": (qs[2], q, 2), "S": (S, k, 2)}
    return {n: emit("size", node, d) if isinstance(v, torch.SymInt) else v for n, (v, node, d) in found.items()}


def _emit_block_build(
    emit: _Emitter, m: AttentionMatch, q: fx.Node, k: fx.Node, builds: dict[str, list[fx.Node]]
) -> list[fx.Node]:
    """The in-graph block-mask build of a runtime mask (Note [Runtime masks as in-graph block masks] in
    passes/flex_plan.py), or of any mask under dynamic shapes: one call per mask and graph, emitted before its
    first site; its outputs as nodes. Symbolic sizes are read from this site's q and k (size nodes)."""
    plan = m.flex_plan
    if plan.key in builds:
        return builds[plan.key]
    sizes = _emit_sizes(emit, q, k)
    # the block mask spans B and H only where the mask depends on them (mask_batch_heads is 1 elsewhere)
    mask_bh = tuple(1 if d == 1 else sizes[n] for n, d in zip("BH", plan.mask_batch_heads))
    call = emit(
        runtime.block_mask_tensors_call, *plan.capture_nodes, mask_key=plan.key, batch_heads=mask_bh,
        seq_lengths=(sizes["L"], sizes["S"]), block_size=plan.block_size, device=_compat.example_value(m.out).device,
        neginf_key=plan.neginf_key, full_batch_heads=(sizes["B"], sizes["H"]),
    )
    call.meta.pop("nn_module_stack", None)  # shared by the layers: it belongs to none of them
    outs = [emit(operator.getitem, call, i) for i in range(len(_compat.example_value(call)))]
    builds[plan.key] = outs
    return outs


def _emit_tables(
    gm: fx.GraphModule, emit: _Emitter, m: AttentionMatch, q: fx.Node, k: fx.Node, tables: list[fx.Node] | None
) -> tuple[list[fx.Node], tuple[Any, Any]]:
    """The four block-mask tables of a Flex plan as nodes (`tables` built in the graph, or graph constants),
    and the (L, S) they span (size nodes where symbolic)."""
    plan = m.flex_plan
    if plan.in_graph:
        sizes = _emit_sizes(emit, q, k)
        return list(tables[:4]), (sizes["L"], sizes["S"])
    consts = []
    for field, tensor in zip(("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"), plan.tensors):
        name = f"_asam_{plan.key}_{field}"
        if not hasattr(gm, name):
            gm.register_buffer(name, tensor)
        with gm.graph.inserting_before(m.out):
            node = gm.graph.get_attr(name)
        mode = _compat.fake_mode_from([_compat.example_value(q)])
        node.meta["example_value"] = mode.from_tensor(tensor) if mode is not None else tensor
        consts.append(node)
    return consts, plan.seq_lengths


def _emit_flex(
    gm: fx.GraphModule, emit: _Emitter, m: AttentionMatch, q: fx.Node, k: fx.Node, v: fx.Node, tables: list[fx.Node] | None
) -> fx.Node:
    """flex_attention_call(q, k, v, <block-mask tensors: graph constants, or `tables` built in the graph>, ...)."""
    plan = m.flex_plan
    nodes, seq_lengths = _emit_tables(gm, emit, m, q, k, tables)
    return emit(
        runtime.flex_attention_call, q, k, v, *nodes, *plan.capture_nodes, mask_key=plan.key,
        block_size=plan.block_size, seq_lengths=seq_lengths, scale=m.scale, enable_gqa=m.enable_gqa,
        score_key=plan.score_key,
    )


def emit_sdpa(gm: fx.GraphModule, m: AttentionMatch, builds: dict[str, list[fx.Node]] | None = None) -> fx.Node:
    """Insert the SDPA call (and its layout/dtype glue) before the value matmul; return the new output.
    `builds`: in-graph block-mask builds already emitted in this graph, by mask key (shared by its sites)."""
    builds = {} if builds is None else builds
    emit = _Emitter(gm, m.out, m.softmax)
    dtype = m.compute_dtype
    q = _emit_operand(emit, m.q, m.rank, dtype)
    for f, is_div in m.sym_factors:
        q = emit(torch.div if is_div else torch.mul, q, f)
    k = _emit_operand(emit, m.k, m.rank, dtype)
    v = _emit_operand(emit, m.v, m.rank, dtype)
    tables = _emit_block_build(emit, m, q, k, builds) if m.mask_kind == "flex" and m.flex_plan.in_graph else None
    attn_mask, rows = (None, None)
    if m.mask_kind == "dense":
        attn_mask, rows = _emit_mask(emit, m)
    kwargs: dict[str, Any] = {
        "attn_mask": attn_mask,
        "dropout_p": m.dropout_p,
        "is_causal": m.mask_kind == "causal",
        "scale": m.scale,
    }
    if m.enable_gqa:
        kwargs["enable_gqa"] = True
    if m.adaptive is not None:
        st = m.adaptive
        causal = m.mask_kind == "causal"
        if m.mask_kind == "flex":  # Note [Adaptive over a structured mask] in asam_compile/kernels/adaptive.py
            nodes, _ = _emit_tables(gm, emit, m, q, k, tables)
            out = emit(
                adaptive.adaptive_masked_call, q, k, v, *nodes, *m.flex_plan.capture_nodes, mask_key=m.flex_plan.key,
                scale=m.scale, enable_gqa=m.enable_gqa, score_key=m.flex_plan.score_key, settings=st,
            )
        elif st.dense_fallback == "per_call":
            out = emit(torch.ops.asam.adaptive_attention.default, q, k, v, m.scale, causal, *adaptive.op_arguments(st))
        elif st.dense_fallback == "measured":  # Note [Dispatch by measured density]
            out = emit(torch.ops.asam.adaptive_dispatch.default, q, k, v, m.scale, causal,
                       *dispatch.op_arguments(st, m.dispatch_site))
        else:
            out = emit(adaptive.adaptive_attention_call, q, k, v, scale=m.scale, causal=causal,
                       enable_gqa=m.enable_gqa, settings=st)
    elif m.mask_kind == "flex":
        out = _emit_flex(gm, emit, m, q, k, v, tables)
    else:
        out = emit(F.scaled_dot_product_attention, q, k, v, **kwargs)
    uniform = _needs_uniform_grad(m)
    if uniform:
        # Note [Gradients of fully masked rows]: the rows an additive mask removes entirely
        if tables is not None:
            urows = tables[4]
        else:
            amax, amin = emit("amax", attn_mask, -1, keepdim=True), emit("amin", attn_mask, -1, keepdim=True)
            urows = emit(torch.logical_and, emit(torch.le, amax, ABSORBED), emit(torch.eq, amax, amin))
            urows = emit(torch.logical_and, urows, emit(torch.isfinite, amax))
        grad_mask = attn_mask if tables is None and _compat.example_value(attn_mask).requires_grad else None
        out = emit(torch.where, urows, _emit_uniform_rows(emit, q, k, v, m.scale, m.enable_gqa, grad_mask), out)
    nan_rows = None
    if tables is not None and m.fixup is not None:
        # rows of a runtime mask with no key left: the original's result, as on the dense path (with the uniform
        # gradient above, those rows already hold mean(V), gradients included)
        rows = None if uniform else tables[4]
        if m.fixup == "nan_if_all_neginf":  # an additive mask: a uniform average, or NaN where all -inf
            nan_rows = tables[5]
    if rows is not None:
        # Note [Fully masked rows] in passes/plan.py
        if m.fixup == "mean" or nan_rows is not None:
            v_full = _emit_operand(emit, m.v_full, m.rank, dtype)
            fill = emit("mean", v_full, -2, keepdim=True)
        else:
            fill = 0.0 if m.safe_softmax else float("nan")
        out = emit(torch.where, rows, fill, out)
    if nan_rows is not None:
        out = emit(torch.where, nan_rows, 0.0 if m.safe_softmax else float("nan"), out)
    for _ in range(4 - m.rank):
        out = emit("squeeze", out, 0)
    if m.out_perm is not None:
        out = emit(torch.permute, out, m.out_perm)
    if m.out_shape is not None:  # Note [Views of the scores] in passes/match.py
        out = emit(torch.reshape, out, m.out_shape)
    if _compat.example_value(out).dtype != m.out_dtype:
        out = emit("to", out, m.out_dtype)
    return out


def _needs_uniform_grad(m: AttentionMatch) -> bool:
    """Whether rows of an additive-only mask may be removed entirely in a graph that computes gradients
    (Note [Gradients of fully masked rows])."""
    grad = bool(_compat.example_value(m.out).requires_grad)
    return grad and m.fixup is not None and bool(m.terms) and not m.fills and (
        m.mask_kind == "dense" or (m.mask_kind == "flex" and m.flex_plan.in_graph))


def _remapped(m: AttentionMatch, replaced: dict[fx.Node, fx.Node]) -> AttentionMatch:
    """A copy of the match whose operands that the rewrite of an earlier site replaced point at their new nodes
    (the match itself is never changed once the match stage returns it)."""
    def node(op: Any) -> Any:
        return dataclasses.replace(op, node=replaced.get(op.node, op.node))

    return dataclasses.replace(
        m, q=node(m.q), k=node(m.k), v=node(m.v), v_full=node(m.v_full), terms=[node(t) for t in m.terms],
        fills=[dataclasses.replace(fl, mask=replaced.get(fl.mask, fl.mask)) for fl in m.fills],
    )


def _is_pure(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or node.is_impure():
        return False
    if node.op == "call_function" and getattr(node.target, "__module__", "") in ("_operator", "operator"):
        return True  # operator.and_/or_ are not in-place
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return not name.endswith("_")  # in-place ops are kept even when their result is unused


def _erase_dead(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase the old pattern and whatever pure producers only it used (e.g. a causal mask)."""
    work = list(nodes)
    while work:
        n = work.pop()
        if _compat.is_erased(n) or n.users or not _is_pure(n):
            continue
        inputs = n.all_input_nodes
        gm.graph.erase_node(n)
        work.extend(inputs)


def run(gm: fx.GraphModule, ctx: PassContext) -> StageResult:
    """Rewrite every planned site (ctx.sites) and mark its candidate rewritten. Counts them."""
    builds: dict[str, list[fx.Node]] = {}
    replaced: dict[fx.Node, fx.Node] = {}
    for _, m in ctx.sites:
        if isinstance(m, WeightsDrop):  # Note [nn.MultiheadAttention] in passes/match.py
            m.node.kwargs = {**m.node.kwargs, "need_weights": False}
            val = _compat.example_value(m.node)
            m.node.meta["example_value"] = (val[0], None)
            continue
        if replaced:
            m = _remapped(m, replaced)  # one site's output is another's operand (attention chained without projection)
        new = emit_sdpa(gm, m, builds)
        m.out.replace_all_uses_with(new)
        replaced[m.out] = new
        _erase_dead(gm, m.region)
    for cand, _ in ctx.sites:
        cand.status = "rewritten"
    if ctx.sites:
        log.debug("rewrite: %d attention sites", len(ctx.sites))
    return StageResult(gm, bool(ctx.sites), len(ctx.sites))
