"""plan: decide, per matched site, what its mask is and which kernel runs it; never mutates the graph.

    mask proven causal at compile time                 ->  mask_kind="causal"     (SDPA is_causal)
    structured mask (window, documents, run-time pad)  ->  mask_kind="flex"       (a Flex block mask, cost model)
    any other mask                                     ->  mask_kind="dense"      (SDPA attn_mask)
    mode="adaptive" or a module marked sparse           ->  adaptive settings      (asam_compile.kernels.adaptive)

Each plan is a copy of the match with its plan fields set (dataclasses.replace); the report's candidate gets the
target and the reasons.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Sequence

import sympy
import torch
import torch.fx as fx

from asam_compile.config import AsamConfig
from asam_compile import _compat
from asam_compile.passes import PassContext, StageResult
from asam_compile.passes.alias import mutated_inside
from asam_compile.passes.flex_plan import (
    flex_fixup, guarded_plan, lift_cached, plan_flex, plan_runtime_flex, softcap_plan,
)
from asam_compile.passes.ir import (
    LARGE_NEGATIVE, AttentionMatch, FlexPlan, Operand, Rejection, WeightsDrop, apply_steps, is_call, shape_after,
    val,
)
from asam_compile.passes.operands import repeat_source
from asam_compile.report import Candidate, Reject

log = logging.getLogger(__name__)
F = torch.nn.functional


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
    from asam_compile.passes.lift_graph import ancestors

    return ancestors(*nodes)


def _constant_inputs_ok(anc: set[fx.Node], config: AsamConfig) -> bool:
    for n in anc:
        if n.op == "placeholder":
            ev = val(n)
            if isinstance(ev, torch.Tensor):
                # Note [Buffers as constants]: buffers only; a parameter or anything that requires grad is a
                # run-time tensor, whatever its value at compile time (a zero-initialised learned bias).
                if config.trust_buffers and _compat.is_buffer(n) and not ev.requires_grad:
                    continue
                # a user tensor is fine only if nothing but its size is read
                if all(u.op == "call_method" and u.target in ("size", "dim") or is_call(u, getattr) and u.args[1] in ("shape", "device", "dtype") for u in n.users):
                    continue
                return False
            elif not isinstance(ev, torch.SymInt):
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
# masks] in passes/flex_plan.py); the sizes reach it as size nodes of q and k. The kernel choice is made once, at the example's
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
        ev = val(n) if n.op == "placeholder" else None
        sizes = [ev] if isinstance(ev, torch.SymInt) else list(ev.shape) if isinstance(ev, torch.Tensor) else []
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
        ev = val(n)
        if isinstance(ev, torch.SymInt):
            env[n] = _concrete([ev], subs)[0] if subs else int(x)
        elif subs and isinstance(x, torch.Tensor) and not _compat.is_param_or_buffer(n):
            env[n] = torch.empty(_concrete(ev.shape, subs), dtype=x.dtype, device=x.device)
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
    scores: Any, term_vals: list[torch.Tensor], fill_vals: list[torch.Tensor], shape: Sequence[int],
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


def plan_site(
    m: AttentionMatch, gm: fx.GraphModule, example_inputs: Sequence[Any], config: AsamConfig,
    mask_cache: dict[Any, Any] | None = None,
) -> AttentionMatch:
    """The match with its plan fields set: what its mask is, which kernel runs it, GQA. Raises Rejection."""
    softmax, dropout_p, rank = m.softmax, m.dropout_p, m.rank
    qv, sv = val(m.scores), val(m.out)
    mask_nodes, stepped = m.mask_nodes, m.mask_steps
    mask_kind, fixup, flex_plan = "none", None, None
    if mask_nodes:
        anc = _ancestors(mask_nodes)
        samples = _size_samples(anc) if _constant_inputs_ok(anc, config) else []
        kinds: set[str] = set()
        flex_ok = bool(samples)  # no query row is left without keys, at every sample
        biased = False  # some additive values on kept positions are not 0: a score_mod carries them
        for subs in samples:
            key = (tuple(mask_nodes), tuple((t.factor, t.negate) for t in m.terms),
                   tuple((fl.value, fl.mask_is_keep) for fl in m.fills), tuple(sorted(map(str, subs.items()))))
            if mask_cache is not None and key in mask_cache:
                kind, fully, exclusion_only = mask_cache[key]
            else:
                try:
                    # Static shapes: classify from the lifted index functions, row chunk by row chunk, so no
                    # L x S mask is made at compile time. Otherwise (or if the mask cannot be lifted) run
                    # the mask subgraph itself once.
                    lift_ok = subs == {} and rank == 4 and not any(stepped)
                    vals = lift_cached(mask_nodes, gm, example_inputs, mask_cache) if lift_ok else None
                    if not isinstance(vals, list):
                        vals = _evaluate(mask_nodes, anc, gm, example_inputs, subs)
                        vals = [apply_steps(x, steps) for x, steps in zip(vals, stepped)]
                    kind, fully, exclusion_only = _classify_mask(
                        m, vals[: len(m.terms)], vals[len(m.terms):], _concrete(qv.shape, subs), device=sv.device)
                    del vals
                except Exception as e:  # noqa: BLE001 - a mask we cannot evaluate stays dense
                    log.debug("mask of %s not evaluated at %s: %s", softmax.name, subs, e, exc_info=True)
                    # nothing is known about its rows: no Flex, and the run-time fully-masked-row fix-up
                    kinds, flex_ok, fixup = {"dense"}, False, _runtime_fixup(m)
                    break
                if mask_cache is not None:
                    mask_cache[key] = (kind, fully, exclusion_only)
            kinds.add(kind)
            flex_ok = flex_ok and not fully
            biased = biased or not exclusion_only
            if kind == "dense" and subs == {} and fully:
                fixup = "nan" if any(fl.value == float("-inf") for fl in m.fills) or not m.fills else "mean"
        if any(stepped):
            flex_ok = False  # Note [Views of the scores]: the lifter sees masks in the canonical layout only
        if "dense" in kinds and kinds <= {"dense", "causal", "none"} and flex_ok:  # causal at short lengths: fine
            flex_plan = guarded_plan(softmax, config, dropout_p, qv, plan_flex, softmax, m, mask_nodes, gm,
                                     example_inputs, config, qv, sv, mask_cache, biased)
        if len(kinds) == 1:
            mask_kind = kinds.pop()
            if mask_kind == "dense" and samples != [{}]:
                fixup = _runtime_fixup(m)
        else:
            mask_kind, fixup = "dense", _runtime_fixup(m)
        if not samples and mask_kind == "dense" and not any(stepped):
            # Note [Runtime masks as in-graph block masks] in passes/flex_plan.py
            flex_plan = guarded_plan(softmax, config, dropout_p, qv, plan_runtime_flex, softmax, m,
                                     mask_nodes, gm, example_inputs, config, qv, sv)

    if mask_kind == "dense" and isinstance(flex_plan, FlexPlan) and flex_plan.kernel == "flex":
        mask_kind, fixup = "flex", flex_fixup(flex_plan, fixup)
    if m.softcap is not None:
        mask_kind, flex_plan, fixup = softcap_plan(softmax, m, mask_kind, flex_plan, fixup, any(stepped),
                                                   dropout_p, gm, config, qv, sv)
    qs, vs = shape_after(m.q), shape_after(m.v)
    if mask_kind == "flex" and qs[-1] != vs[-1]:
        mask_kind, flex_plan = "dense", f"Flex needs equal query and value head sizes ({qs[-1]} vs {vs[-1]})"

    k, v, enable_gqa = _gqa_operands(m.k, m.v, mask_kind, rank, config)

    # Note [Tensors changed in place inside the pattern] in passes/alias.py
    sources = [m.q.node, k.node, v.node, m.v_full.node, *mask_nodes, *(f for f, _ in m.sym_factors)]
    if isinstance(flex_plan, FlexPlan):
        sources += list(flex_plan.capture_nodes)
    mutated = mutated_inside(sources, m.out, gm, mask_cache)
    if mutated is not None:
        raise Rejection(Reject.CHANGED_IN_PLACE, f"{mutated.name} changes a tensor in place between the scores and "
                        "the value matmul: one SDPA call there would read the changed value")
    return dataclasses.replace(m, k=k, v=v, enable_gqa=enable_gqa, mask_kind=mask_kind, fixup=fixup,
                               flex_plan=flex_plan)


def _gqa_operands(k: Operand, v: Operand, mask_kind: str, rank: int, config: AsamConfig) -> tuple[Operand, Operand, bool]:
    """GQA: K/V before their heads were repeated, and enable_gqa, where the kernel takes them; else k, v, False."""
    if config.use_gqa and mask_kind in ("none", "causal", "flex") and rank == 4 and not k.steps and not v.steps:
        rk, rv = repeat_source(k.node), repeat_source(v.node)
        if rk and rv and rk[1] == rv[1] and rk[1] > 1 and val(rk[0]).shape[1] == val(rv[0]).shape[1]:
            return Operand(rk[0]), Operand(rv[0]), True
    return k, v, False


def _runtime_fixup(scores: Any) -> str | None:
    if scores.fills:
        return "nan" if any(fl.value == float("-inf") for fl in scores.fills) else "mean"
    return "nan_if_all_neginf"  # an additive mask that may hold -inf rows at run time


def run(gm: fx.GraphModule, ctx: PassContext) -> StageResult:
    """Plan every matched site (ctx.sites); a site whose plan is refused leaves ctx.sites. Counts the
    sites that have a plan."""
    mask_cache: dict[Any, Any] = {}  # layers share one mask node: evaluate it once per graph
    root = _compat.compiled_frame_module()  # for asam_compile.sparse marks on the compiled module itself
    root_type = type(root) if root is not None else None
    planned = []
    for cand, m in ctx.sites:
        if isinstance(m, WeightsDrop):
            planned.append((cand, m))
            continue
        try:
            m = plan_site(m, gm, ctx.example_inputs, ctx.config, mask_cache)
        except Rejection as r:
            cand.status, cand.reject, cand.detail = "refused", r.reject, r.detail
            log.debug("refused %s (%s): %s", m.softmax.name, cand.module, cand.reason)
            continue
        # "matched" until the rewrite pass has run (a dry run with disable_passes=("rewrite",) stays so)
        cand.target = "flex" if m.mask_kind == "flex" else "sdpa"
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
        m = _plan_adaptive(m, ctx.config, cand, root_type)
        planned.append((cand, m))
        log.debug("planned %s (%s): %s", m.softmax.name, cand.module, cand.info)
    ctx.sites[:] = planned
    return StageResult(gm, False, len(planned))


def _plan_adaptive(m: AttentionMatch, config: AsamConfig, cand: Candidate, root_type: Any) -> AttentionMatch:
    """The plan, sent to adaptive sparse attention where its settings ask for it and it can run there."""
    from asam_compile.passes import adaptive_plan

    settings = adaptive_plan.site_settings(m.softmax, config, root_type)
    if settings is None:
        return m
    if m.softcap is not None:
        cand.info["adaptive"] = "exact: soft-capped scores run as an exact Flex score_mod"
        return m
    probs, out = val(m.softmax), val(m.out)
    qs, vs = shape_after(m.q), shape_after(m.v)
    # a mask whose Flex plan the cost model declined for the dense kernel: the adaptive call runs Flex on a
    # subset of its blocks (Note [Adaptive over a structured mask] in asam_compile/kernels/adaptive.py)
    to_flex = m.mask_kind == "dense" and isinstance(m.flex_plan, FlexPlan)
    why = adaptive_plan.refusal(m, settings, probs.shape[-2], probs.shape[-1], qs[-1], vs[-1], out.device,
                           bool(out.requires_grad), mask_kind="flex" if to_flex else m.mask_kind,
                           heads=math.prod(probs.shape[:-2]))
    if why is not None:
        cand.info["adaptive"] = f"exact: {why}"
        return m
    if to_flex:
        k, v, enable_gqa = _gqa_operands(m.k, m.v, "flex", m.rank, config)
        m = dataclasses.replace(m, mask_kind="flex", fixup=flex_fixup(m.flex_plan, m.fixup), k=k, v=v,
                                enable_gqa=enable_gqa)
        cand.info.update(mask=f"flex:{m.flex_plan.name}", enable_gqa=m.enable_gqa,
                         kernel=f"flex: adaptive, inside the mask's blocks (alone: {m.flex_plan.kernel}, {m.flex_plan.reason})")
    if settings.dense_fallback == "measured" and (m.mask_kind == "flex" or out.requires_grad):
        # Note [Dispatch by measured density]: inference without a mask or with a causal one
        settings = settings._replace(dense_fallback="none")
    site = None
    if settings.dense_fallback == "measured":  # Note [Dispatch by measured density]
        from asam_compile.kernels import dispatch

        site = dispatch.new_site(f"{cand.module or 'model'}.{m.softmax.name}")
        cand.info["dispatch_site"] = site  # what asam_compile.kernels.dispatch.decisions() lists it under
    m = dataclasses.replace(m, adaptive=settings, dispatch_site=site)
    cand.target = "adaptive"
    cand.info["adaptive"] = (
        f"coverage={settings.coverage}, max_density={settings.max_density}, window={settings.window}, "
        f"sinks={settings.sinks}, block_size={settings.block_size}"
        + f", dense_fallback={settings.dense_fallback}"
        + (f", estimator={settings.estimator}" if settings.estimator != "pooled" else "")
        + (f", inside the block mask of {m.flex_plan.name}" if m.mask_kind == "flex" else "")
    )
    return m
